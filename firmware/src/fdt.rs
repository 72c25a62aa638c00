//! The flattened device tree handed to the kernel in X0.

use vm_fdt::{FdtWriter, FdtWriterResult};

use crate::description::Platform;
use crate::layout::*;
use crate::Error;

/// What the VMM knows only at boot time: where it put things, and what KVM said.
#[derive(Clone, Debug, Default)]
pub struct BootParams {
    pub cmdline: String,
    /// Guest-physical [start, end) of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
    /// MPIDR_EL1 of each vCPU as KVM reports it, in vCPU order.
    pub mpidrs: Vec<u64>,
    /// Seed for the kernel's RNG and KASLR (the guest has no entropy source of its own).
    pub rng_seed: [u8; 32],
}

const PHANDLE_GIC: u32 = 1;
const PHANDLE_APB_PCLK: u32 = 2;

/// GIC interrupt specifier types and flags (dt-bindings/interrupt-controller/arm-gic.h).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// Node name of the console, also used for `stdout-path`.
pub fn uart_node_name() -> String {
    format!("pl011@{UART_BASE:x}")
}

/// Build the DTB for `platform` booted in DT mode.
pub fn build_dtb(platform: &Platform, boot: &BootParams) -> Result<Vec<u8>, Error> {
    let dtb = write_dt(platform, boot).map_err(|e| Error::Fdt(e.to_string()))?;
    if dtb.len() as u64 > DTB_MAX_SIZE {
        return Err(Error::Fdt(format!(
            "DTB is {} bytes, over the 2 MiB limit",
            dtb.len()
        )));
    }
    Ok(dtb)
}

fn write_dt(platform: &Platform, boot: &BootParams) -> FdtWriterResult<Vec<u8>> {
    if boot.mpidrs.len() != platform.vcpus as usize {
        return Err(vm_fdt::Error::InvalidString);
    }
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "nvidia,gracevm")?;
    fdt.property_string("model", "gracevm Grace-like platform")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    write_cpus(&mut fdt, &boot.mpidrs)?;
    write_memory(&mut fdt, platform)?;
    write_gic(&mut fdt, platform.vcpus)?;
    write_timer(&mut fdt)?;
    write_psci(&mut fdt)?;
    write_uart(&mut fdt)?;
    write_chosen(&mut fdt, boot)?;

    fdt.end_node(root)?;
    fdt.finish()
}

fn write_cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> FdtWriterResult<()> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in mpidrs {
        // Only the affinity fields belong in `reg`.
        let aff = mpidr & 0xff_00ff_ffff;
        let cpu = fdt.begin_node(&format!("cpu@{aff:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_array_u64("reg", &[aff])?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)
}

fn write_memory(fdt: &mut FdtWriter, platform: &Platform) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("memory@{RAM_BASE:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[RAM_BASE, platform.boot_ram()])?;
    fdt.end_node(node)
}

fn write_gic(fdt: &mut FdtWriter, vcpus: u32) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("intc@{GIC_DIST_BASE:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64(
        "reg",
        &[
            GIC_DIST_BASE,
            GIC_DIST_SIZE,
            GIC_REDIST_BASE,
            gic_redist_size(vcpus),
        ],
    )?;
    // Maintenance interrupt: PPI 9.
    fdt.property_array_u32("interrupts", &[GIC_PPI, 9, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_phandle(PHANDLE_GIC)?;
    fdt.end_node(node)
}

fn write_timer(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let irqs: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &irqs)?;
    fdt.end_node(node)
}

fn write_psci(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(node)
}

fn write_uart(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let clk = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", 24_000_000)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_APB_PCLK)?;
    fdt.end_node(clk)?;

    let node = fdt.begin_node(&uart_node_name())?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[UART_BASE, UART_SIZE])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, UART_SPI, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_array_u32("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
    fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
    fdt.end_node(node)
}

fn write_chosen(fdt: &mut FdtWriter, boot: &BootParams) -> FdtWriterResult<()> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &boot.cmdline)?;
    fdt.property_string("stdout-path", &format!("/{}", uart_node_name()))?;
    if let Some((start, end)) = boot.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.property("rng-seed", &boot.rng_seed)?;
    let kaslr = u64::from_le_bytes(boot.rng_seed[..8].try_into().expect("8 bytes"));
    fdt.property_u64("kaslr-seed", kaslr)?;
    fdt.end_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(vcpus: usize) -> BootParams {
        BootParams {
            cmdline: "console=ttyAMA0".into(),
            initrd: Some((0x4800_0000, 0x4810_0000)),
            mpidrs: (0..vcpus as u64).map(|i| 0x8000_0000 | i).collect(),
            rng_seed: [7; 32],
        }
    }

    #[test]
    fn test_dtb_builds_with_magic_header() {
        let dtb = build_dtb(&Platform::default(), &boot(1)).unwrap();
        assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
    }

    #[test]
    fn test_dtb_mpidr_count_mismatch_is_error() {
        let p = Platform {
            vcpus: 2,
            ..Platform::default()
        };
        assert!(build_dtb(&p, &boot(1)).is_err());
    }
}
