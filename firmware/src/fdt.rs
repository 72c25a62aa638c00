//! The flattened device tree handed to the kernel in X0.
//!
//! DT mode ([`build_dtb`]): every device, memory per socket (carve-outs and GPU memory absent),
//! the firmware region as /reserved-memory (mapped, so it stays "System RAM"), the PCIe host
//! bridge with one child node per GPU holding its `nvidia,*` properties.
//!
//! ACPI mode ([`build_efi_stub_dtb`]): only `/chosen`, naming the EFI system table and memory
//! map; the kernel then takes everything else from ACPI.

use vm_fdt::{FdtWriter, FdtWriterResult};

use crate::description::Platform;
use crate::layout::*;
use crate::resolved::Resolved;
use crate::{gpu_properties, Error};

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

impl BootParams {
    /// Boot parameters for inspecting the firmware without a VM: the MPIDRs KVM gives vCPUs
    /// by default (Aff0 = id % 16, Aff1 = id / 16), a console command line, no initrd, a
    /// zero seed.
    pub fn example(vcpus: u32) -> Self {
        BootParams {
            cmdline: "console=ttyAMA0".into(),
            initrd: None,
            mpidrs: (0..u64::from(vcpus))
                .map(|i| (1 << 31) | ((i >> 4) << 8) | (i & 0xf))
                .collect(),
            rng_seed: [0; 32],
        }
    }
}

/// Where the EFI hand-off is, for `/chosen` in ACPI mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EfiHandoff {
    pub system_table: u64,
    pub mmap_start: u64,
    pub mmap_size: u32,
    pub desc_size: u32,
    pub desc_version: u32,
}

const PHANDLE_GIC: u32 = 1;
const PHANDLE_APB_PCLK: u32 = 2;

/// GIC interrupt specifier types and flags (dt-bindings/interrupt-controller/arm-gic.h).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// `linux,uefi-secure-boot` value for "disabled" (enum efi_secureboot_mode).
pub const UEFI_SECURE_BOOT_DISABLED: u32 = 2;

/// `compatible` of gracevm's test device node.
pub const TESTDEV_COMPATIBLE: &str = "gracevm,testdev";

/// Node name of the console, also used for `stdout-path`.
pub fn uart_node_name() -> String {
    format!("pl011@{UART_BASE:x}")
}

/// Node name of the PCIe host bridge.
pub fn pcie_node_name() -> String {
    format!("pcie@{PCI_ECAM_BASE:x}")
}

fn check_size(dtb: Vec<u8>) -> Result<Vec<u8>, Error> {
    if dtb.len() as u64 > DTB_MAX_SIZE {
        return Err(Error::Fdt(format!(
            "DTB is {} bytes, over the 2 MiB limit",
            dtb.len()
        )));
    }
    Ok(dtb)
}

fn check_mpidrs(platform: &Platform, boot: &BootParams) -> Result<(), Error> {
    if boot.mpidrs.len() != platform.vcpus as usize {
        return Err(Error::Fdt(format!(
            "{} MPIDRs given for {} vCPUs",
            boot.mpidrs.len(),
            platform.vcpus
        )));
    }
    Ok(())
}

/// Build the full DTB for `platform` booted in DT mode (whatever `platform.boot` says).
pub fn build_dtb(platform: &Resolved, boot: &BootParams) -> Result<Vec<u8>, Error> {
    check_mpidrs(platform, boot)?;
    let dtb = write_dt(platform, boot).map_err(|e| Error::Fdt(e.to_string()))?;
    check_size(restore_long_names(&dtb)?)
}

/// Property names longer than the 31 characters the DT spec recommends (and vm-fdt
/// enforces) that the kernel's drivers nevertheless read.
const LONG_NAMES: [&str; 1] = [crate::description::EGM_RETIRED_PAGES_DATA_BASE];

/// The name to give vm-fdt for property `name`: itself, or a short placeholder that
/// [`restore_long_names`] turns back into `name`.
fn long_name_alias(name: &str) -> String {
    match LONG_NAMES.iter().position(|n| *n == name) {
        Some(i) => format!("gracevm,long-name-{i}"),
        None => name.to_string(),
    }
}

fn be32(b: &[u8], off: usize) -> Result<u32, Error> {
    b.get(off..off + 4)
        .map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| Error::Fdt(format!("truncated DTB at {off:#x}")))
}

/// Rewrite the strings block of `dtb` so every placeholder of [`long_name_alias`] carries its
/// real name: walks the structure block, rebuilds the strings block and patches each
/// property's name offset.
fn restore_long_names(dtb: &[u8]) -> Result<Vec<u8>, Error> {
    const FDT_BEGIN_NODE: u32 = 1;
    const FDT_END_NODE: u32 = 2;
    const FDT_PROP: u32 = 3;
    const FDT_NOP: u32 = 4;
    const FDT_END: u32 = 9;
    let off_struct = be32(dtb, 8)? as usize;
    let off_strings = be32(dtb, 12)? as usize;
    let size_strings = be32(dtb, 32)? as usize;
    let size_struct = be32(dtb, 36)? as usize;
    if off_strings + size_strings != dtb.len() || off_struct + size_struct > off_strings {
        return Err(Error::Fdt("unexpected DTB block order".into()));
    }
    let name_at = |off: usize| -> Result<String, Error> {
        let s = &dtb[off_strings + off..off_strings + size_strings];
        let end = s
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| Error::Fdt("unterminated property name".into()))?;
        Ok(String::from_utf8_lossy(&s[..end]).into_owned())
    };
    let mut out = dtb[..off_strings].to_vec();
    let mut strings: Vec<u8> = Vec::new();
    let mut offsets: std::collections::HashMap<String, u32> = Default::default();
    let mut pos = off_struct;
    loop {
        let token = be32(dtb, pos)?;
        pos += 4;
        match token {
            FDT_BEGIN_NODE => {
                let name_len = dtb[pos..]
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or_else(|| Error::Fdt("unterminated node name".into()))?;
                pos += (name_len + 1).div_ceil(4) * 4;
            }
            FDT_PROP => {
                let len = be32(dtb, pos)? as usize;
                let mut name = name_at(be32(dtb, pos + 4)? as usize)?;
                if let Some(i) = name.strip_prefix("gracevm,long-name-") {
                    let i: usize = i.parse().map_err(|_| Error::Fdt(name.clone()))?;
                    name = LONG_NAMES[i].to_string();
                }
                let next = strings.len() as u32;
                let off = *offsets.entry(name.clone()).or_insert_with(|| {
                    strings.extend_from_slice(name.as_bytes());
                    strings.push(0);
                    next
                });
                out[pos + 4..pos + 8].copy_from_slice(&off.to_be_bytes());
                pos += 8 + len.div_ceil(4) * 4;
            }
            FDT_END_NODE | FDT_NOP => {}
            FDT_END => break,
            t => return Err(Error::Fdt(format!("unknown DTB token {t:#x}"))),
        }
    }
    let total = (out.len() + strings.len()) as u32;
    out[4..8].copy_from_slice(&total.to_be_bytes());
    out[32..36].copy_from_slice(&(strings.len() as u32).to_be_bytes());
    out.extend_from_slice(&strings);
    Ok(out)
}

/// Build the DTB of an ACPI boot: only `/chosen`, with the EFI hand-off.
pub fn build_efi_stub_dtb(boot: &BootParams, efi: &EfiHandoff) -> Result<Vec<u8>, Error> {
    let write = || -> FdtWriterResult<Vec<u8>> {
        let mut fdt = FdtWriter::new()?;
        let root = fdt.begin_node("")?;
        fdt.property_u32("#address-cells", 2)?;
        fdt.property_u32("#size-cells", 2)?;
        let chosen = fdt.begin_node("chosen")?;
        write_chosen_common(&mut fdt, boot)?;
        fdt.property_u64("linux,uefi-system-table", efi.system_table)?;
        fdt.property_u64("linux,uefi-mmap-start", efi.mmap_start)?;
        fdt.property_u32("linux,uefi-mmap-size", efi.mmap_size)?;
        fdt.property_u32("linux,uefi-mmap-desc-size", efi.desc_size)?;
        fdt.property_u32("linux,uefi-mmap-desc-ver", efi.desc_version)?;
        // efi_secureboot_mode_disabled, what the EFI stub reports without secure boot (0,
        // "unset", makes the kernel warn that the mode could not be determined).
        fdt.property_u32("linux,uefi-secure-boot", UEFI_SECURE_BOOT_DISABLED)?;
        fdt.end_node(chosen)?;
        fdt.end_node(root)?;
        fdt.finish()
    };
    check_size(write().map_err(|e| Error::Fdt(e.to_string()))?)
}

fn write_dt(platform: &Resolved, boot: &BootParams) -> FdtWriterResult<Vec<u8>> {
    let map = platform.map();
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "nvidia,gracevm")?;
    fdt.property_string("model", "gracevm Grace-like platform")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    write_cpus(&mut fdt, &boot.mpidrs, map.ram.len())?;
    write_memory(&mut fdt, map)?;
    write_reserved_memory(&mut fdt)?;
    write_gic(&mut fdt, platform.vcpus)?;
    write_timer(&mut fdt)?;
    write_psci(&mut fdt)?;
    write_uart(&mut fdt)?;
    write_testdev(&mut fdt)?;
    if !map.gpus.is_empty() {
        write_pcie(&mut fdt, platform, map)?;
    }
    let chosen = fdt.begin_node("chosen")?;
    write_chosen_common(&mut fdt, boot)?;
    fdt.property_string("stdout-path", &format!("/{}", uart_node_name()))?;
    fdt.end_node(chosen)?;

    fdt.end_node(root)?;
    fdt.finish()
}

fn write_cpus(fdt: &mut FdtWriter, mpidrs: &[u64], sockets: usize) -> FdtWriterResult<()> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for (i, mpidr) in mpidrs.iter().enumerate() {
        // Only the affinity fields belong in `reg`.
        let aff = mpidr & 0xff_00ff_ffff;
        let cpu = fdt.begin_node(&format!("cpu@{aff:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_array_u64("reg", &[aff])?;
        let node = cpu_socket(i as u32, mpidrs.len() as u32, sockets);
        fdt.property_u32("numa-node-id", node as u32)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)
}

/// One memory node per socket; NUMA node = socket index. Carve-outs and GPU memory are absent.
fn write_memory(fdt: &mut FdtWriter, map: &MemoryMap) -> FdtWriterResult<()> {
    for r in &map.ram {
        let node = fdt.begin_node(&format!("memory@{:x}", r.range.base))?;
        fdt.property_string("device_type", "memory")?;
        fdt.property_array_u64("reg", &[r.range.base, r.range.size])?;
        fdt.property_u32("numa-node-id", r.socket as u32)?;
        fdt.end_node(node)?;
    }
    Ok(())
}

/// The firmware region (retired-pages tables) kept from the kernel's allocator but mapped
/// (no `no-map`), so it stays "System RAM" as in ACPI mode and memremap() hands back the
/// linear map.
fn write_reserved_memory(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let rm = fdt.begin_node("reserved-memory")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    let node = fdt.begin_node(&format!("firmware@{FIRMWARE_BASE:x}"))?;
    fdt.property_array_u64("reg", &[FIRMWARE_BASE, FIRMWARE_SIZE])?;
    fdt.end_node(node)?;
    fdt.end_node(rm)
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
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_TYPE_LEVEL_HIGH],
    )?;
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

fn write_testdev(fdt: &mut FdtWriter) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&format!("testdev@{TESTDEV_BASE:x}"))?;
    fdt.property_string("compatible", TESTDEV_COMPATIBLE)?;
    fdt.property_array_u64("reg", &[TESTDEV_BASE, TESTDEV_SIZE])?;
    fdt.end_node(node)
}

/// PCI address cells: phys.hi of a memory space (32-bit, 64-bit prefetchable).
const PCI_SPACE_MEM32: u32 = 0x0200_0000;
const PCI_SPACE_MEM64_PREF: u32 = 0x4300_0000;

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn write_pcie(fdt: &mut FdtWriter, platform: &Resolved, map: &MemoryMap) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&pcie_node_name())?;
    fdt.property_string("compatible", "pci-host-ecam-generic")?;
    fdt.property_string("device_type", "pci")?;
    fdt.property_u32("#address-cells", 3)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("#interrupt-cells", 1)?;
    fdt.property_array_u64("reg", &[PCI_ECAM_BASE, PCI_ECAM_SIZE])?;
    fdt.property_array_u32("bus-range", &[0, PCI_BUSES - 1])?;
    fdt.property_u32("linux,pci-domain", 0)?;
    fdt.property_null("dma-coherent")?;
    let mut ranges = Vec::new();
    for (space, base, size) in [
        (PCI_SPACE_MEM32, PCI_MMIO32_BASE, PCI_MMIO32_SIZE),
        (PCI_SPACE_MEM64_PREF, PCI_MMIO64_BASE, PCI_MMIO64_SIZE),
    ] {
        // child (3 cells), parent (2 cells), size (2 cells); identity mapped.
        ranges.extend([
            space,
            hi(base),
            lo(base),
            hi(base),
            lo(base),
            hi(size),
            lo(size),
        ]);
    }
    fdt.property_array_u32("ranges", &ranges)?;
    // INTx: the swizzle repeats every 4 devices, so the mask keeps the low 2 device bits.
    fdt.property_array_u32("interrupt-map-mask", &[0x1800, 0, 0, 7])?;
    let mut imap = Vec::new();
    for dev in 0..4u32 {
        for pin in 1..=4u32 {
            let spi = PCI_INTX_SPI_BASE + (dev + pin - 1) % 4;
            // child unit address (3) + pin, GIC phandle, GIC unit address (#address-cells
            // = 2 in the GIC node), GIC specifier (3).
            imap.extend([
                dev << 11,
                0,
                0,
                pin,
                PHANDLE_GIC,
                0,
                0,
                GIC_SPI,
                spi,
                IRQ_TYPE_LEVEL_HIGH,
            ]);
        }
    }
    fdt.property_array_u32("interrupt-map", &imap)?;

    for g in &map.gpus {
        let child = fdt.begin_node(&if g.function == 0 {
            format!("gpu@{:x}", g.device)
        } else {
            format!("gpu@{:x},{:x}", g.device, g.function)
        })?;
        fdt.property_array_u32("reg", &[u32::from(g.devfn()) << 8, 0, 0, 0, 0])?;
        fdt.property_string(
            "compatible",
            &format!("pci{:x},{:x}", g.vendor_id, g.device_id),
        )?;
        for (name, value) in gpu_properties(platform, g) {
            fdt.property_u64(&long_name_alias(name), value)?;
        }
        fdt.end_node(child)?;
    }
    fdt.end_node(node)
}

/// `/chosen` properties both boot modes share.
fn write_chosen_common(fdt: &mut FdtWriter, boot: &BootParams) -> FdtWriterResult<()> {
    fdt.property_string("bootargs", &boot.cmdline)?;
    if let Some((start, end)) = boot.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.property("rng-seed", &boot.rng_seed)?;
    let kaslr = u64::from_le_bytes(boot.rng_seed[..8].try_into().expect("8 bytes"));
    fdt.property_u64("kaslr-seed", kaslr)
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
        let dtb = build_dtb(&Platform::default().resolve().unwrap(), &boot(1)).unwrap();
        assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
        let dtb = build_dtb(&Platform::minimal().resolve().unwrap(), &boot(1)).unwrap();
        assert_eq!(&dtb[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
    }

    #[test]
    fn test_dtb_mpidr_count_mismatch_is_error() {
        let p = Platform {
            vcpus: 2,
            ..Platform::default()
        };
        assert!(build_dtb(&p.resolve().unwrap(), &boot(1)).is_err());
    }

    #[test]
    fn test_dtb_gpu_properties_are_8_bytes() {
        let dtb = build_dtb(&Platform::default().resolve().unwrap(), &boot(1)).unwrap();
        // Property names live in the strings block; the value of gpu-mem-base-pa is
        // big-endian 8 bytes somewhere in the structure block.
        let be = GPU_MEM_BASE.to_be_bytes();
        assert!(dtb.windows(8).any(|w| w == be));
        for name in crate::description::GPU_PROPERTIES {
            let needle = format!("{name}\0");
            assert!(
                dtb.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{name}"
            );
        }
        assert!(!dtb.windows(9).any(|w| w == b"long-name"));
    }

    #[test]
    fn test_example_mpidrs_follow_kvm() {
        let b = BootParams::example(18);
        assert_eq!(b.mpidrs[0], 0x8000_0000);
        assert_eq!(b.mpidrs[15], 0x8000_000f);
        assert_eq!(b.mpidrs[17], 0x8000_0101);
    }
}
