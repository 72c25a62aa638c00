//! ACPI tables for the firmware-less EFI boot: RSDP -> XSDT -> FADT (-> DSDT), MADT, GTDT,
//! SPCR, MCFG, SRAT. Built with rust-vmm's `acpi_tables` where it has the table (RSDP, XSDT,
//! FADT, MCFG, AML); the rest are written field by field into its generic [`Sdt`], which keeps
//! the length and checksum right.
//!
//! What the DSDT holds:
//! - `\_SB.COM0`: the PL011 (`ARMH0011`), MMIO + GSIV 33.
//! - `\_SB.TDEV`: gracevm's test device (`GRVM0001`), MMIO only.
//! - `\_SB.PCI0`: the ECAM host bridge (`PNP0A08`/`PNP0A03`), only when the platform has GPUs,
//!   with `_CRS` (buses, 32-bit window, 64-bit prefetchable window), `_PRT` (INTx of every slot
//!   to SPIs 3..6 with the standard swizzle), `RES0` (`PNP0C02` reserving the ECAM) and one
//!   `GPUn` per GPU with `_ADR` and the `_DSD` device properties the nvgrace-gpu/EGM drivers
//!   read.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package,
    Path, ResourceTemplate, Uuid, ONE, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

use crate::layout::*;
use crate::resolved::Resolved;
use crate::{gpu_properties, BootParams, Error};

pub const OEM_ID: [u8; 6] = *b"GRACVM";
pub const OEM_TABLE_ID: [u8; 8] = *b"GRACEVM ";
pub const OEM_REVISION: u32 = 1;

/// `_HID` of gracevm's test device.
pub const TESTDEV_HID: &str = "GRVM0001";
/// Device-properties UUID of `_DSD` packages.
pub const DEVICE_PROPERTIES_UUID: &str = "daffd814-6eba-4d8c-8a91-bc9bbf4aa301";

/// Tables are placed on this alignment.
const TABLE_ALIGN: u64 = 16;

/// One table as the guest sees it, at its guest physical address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// The table's signature ("RSDP" for the RSD PTR structure), also its file name.
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// AML bytes already encoded.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml(obj: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    obj.to_aml_bytes(&mut v);
    v
}

/// A table with the standard header around `body`, length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(*signature, 36, revision, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(body);
    t.as_slice().to_vec()
}

/// Little-endian field writer for hand-built tables.
#[derive(Default)]
struct Fields(Vec<u8>);

impl Fields {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// GSIV of an SPI.
fn spi_gsiv(spi: u32) -> u32 {
    32 + spi
}

/// GSIV of a PPI.
fn ppi_gsiv(ppi: u32) -> u32 {
    16 + ppi
}

/// Every table, placed from `base` on: RSDP first, then XSDT, FADT, DSDT and the rest.
pub fn tables(platform: &Resolved, boot: &BootParams, base: u64) -> Result<Vec<AcpiTable>, Error> {
    let map = platform.map();
    let has_pci = !map.gpus.is_empty();

    let mut others: Vec<(&str, Vec<u8>)> = vec![
        ("DSDT", dsdt(platform, map)),
        ("APIC", madt(&boot.mpidrs)),
        ("GTDT", gtdt()),
        ("SPCR", spcr()),
    ];
    if has_pci {
        others.push(("MCFG", mcfg()));
    }
    others.push(("SRAT", srat(map)));

    // Place: RSDP, XSDT, FADT, then the others in order.
    let align = |a: u64| a.div_ceil(TABLE_ALIGN) * TABLE_ALIGN;
    let rsdp_addr = base;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * others.len() as u64; // FADT + others minus DSDT
    let fadt_addr = align(xsdt_addr + xsdt_len);
    let mut next = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let mut placed = Vec::new();
    for (sig, bytes) in others {
        placed.push(AcpiTable {
            signature: sig.to_string(),
            addr: next,
            bytes,
        });
        next = align(next + placed.last().map_or(0, |t| t.bytes.len() as u64));
    }
    let end = next;
    if end - base > FW_ACPI_MAX {
        return Err(Error::Acpi(format!(
            "the ACPI tables take {} bytes, more than the {} the firmware region has for them",
            end - base,
            FW_ACPI_MAX
        )));
    }

    let dsdt_addr = placed[0].addr;
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(dsdt_addr);
    // ARM boot architecture flags: PSCI_COMPLIANT | PSCI_USE_HVC.
    fadt.arm_boot_arch = 0x3u16.into();
    let fadt = aml(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    for t in placed.iter().filter(|t| t.signature != "DSDT") {
        xsdt.add_entry(t.addr);
    }
    let xsdt = aml(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);

    let rsdp = aml(&Rsdp::new(OEM_ID, xsdt_addr));

    let mut all = vec![
        AcpiTable {
            signature: "RSDP".into(),
            addr: rsdp_addr,
            bytes: rsdp,
        },
        AcpiTable {
            signature: "XSDT".into(),
            addr: xsdt_addr,
            bytes: xsdt,
        },
        AcpiTable {
            signature: "FACP".into(),
            addr: fadt_addr,
            bytes: fadt,
        },
    ];
    all.extend(placed);
    Ok(all)
}

/// MADT: one GICC per vCPU (GICv3: no CPU interface MMIO), the GICD and the GICR range.
fn madt(mpidrs: &[u64]) -> Vec<u8> {
    let mut f = Fields::default();
    f.u32(0); // local interrupt controller address: none on arm64
    f.u32(0); // flags: no PC-AT dual 8259
    for (i, &mpidr) in mpidrs.iter().enumerate() {
        // GIC CPU interface (type 0xB), the 80-byte ACPI 6.3 layout.
        f.u8(0xB).u8(80).u16(0);
        f.u32(i as u32); // CPU interface number
        f.u32(i as u32); // ACPI processor UID
        f.u32(1); // flags: enabled, level-triggered interrupts
        f.u32(0); // parking protocol version
        f.u32(0); // performance interrupt: no PMU
        f.u64(0); // parked address
        f.u64(0); // GICC base: none with GICv3 system registers
        f.u64(0); // GICV
        f.u64(0); // GICH
        f.u32(ppi_gsiv(GIC_MAINTENANCE_PPI)); // VGIC maintenance interrupt
        f.u64(0); // GICR base: given by the GICR structure below
        f.u64(mpidr & 0xff_00ff_ffff); // MPIDR affinity fields
        f.u8(0); // processor power efficiency class
        f.u8(0); // reserved
        f.u16(0); // SPE overflow interrupt: none
    }
    // GIC distributor (type 0xC).
    f.u8(0xC).u8(24).u16(0);
    f.u32(0); // GIC id
    f.u64(GIC_DIST_BASE);
    f.u32(0); // system vector base
    f.u8(3); // GIC version 3
    f.zeros(3);
    // GIC redistributor discovery range (type 0xE).
    f.u8(0xE).u8(16).u16(0);
    f.u64(GIC_REDIST_BASE);
    f.u32(gic_redist_size(mpidrs.len() as u32) as u32);
    sdt(b"APIC", 5, &f.0)
}

/// GTDT (revision 2): the architected timer's interrupts, level-high and always on; no
/// memory-mapped timers.
fn gtdt() -> Vec<u8> {
    const ALWAYS_ON: u32 = 1 << 2;
    let [sec_el1, ns_el1, virt, ns_el2] = TIMER_PPIS.map(ppi_gsiv);
    let mut f = Fields::default();
    f.u64(u64::MAX); // CntControlBase: none
    f.u32(0); // reserved
    for gsiv in [sec_el1, ns_el1, virt, ns_el2] {
        f.u32(gsiv).u32(ALWAYS_ON);
    }
    f.u64(u64::MAX); // CntReadBase: none
    f.u32(0); // platform timer count
    f.u32(0); // platform timer offset
    sdt(b"GTDT", 2, &f.0)
}

/// SPCR (revision 2): the PL011 console, 32-bit MMIO, GIC interrupt.
fn spcr() -> Vec<u8> {
    let mut f = Fields::default();
    f.u8(3); // interface type: ARM PL011
    f.zeros(3);
    // Base address, generic address structure: system memory, 32-bit, dword access.
    f.u8(0).u8(32).u8(0).u8(3).u64(UART_BASE);
    f.u8(1 << 3); // interrupt type: ARM GIC
    f.u8(0); // PC-AT IRQ: none
    f.u32(spi_gsiv(UART_SPI));
    f.u8(7); // 115200 baud
    f.u8(0); // no parity
    f.u8(1); // 1 stop bit
    f.u8(0); // no flow control
    f.u8(0); // terminal type VT100
    f.u8(0); // reserved
    f.u16(0xffff); // PCI device id: not a PCI device
    f.u16(0xffff); // PCI vendor id
    f.u8(0).u8(0).u8(0); // PCI bus, device, function
    f.u32(0); // PCI flags
    f.u8(0); // PCI segment
    f.u32(0); // reserved
    sdt(b"SPCR", 2, &f.0)
}

/// MCFG: the ECAM of segment 0, buses 0..15.
fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(PCI_ECAM_BASE, 0, 0, (PCI_BUSES - 1) as u8);
    aml(&m)
}

/// SRAT (revision 3): each vCPU's and each socket's RAM proximity domain; a hot-pluggable
/// zero-length memory placeholder per EGM and GPU domain (as real Grace firmware has, so the
/// kernel creates those NUMA nodes); a Generic Initiator per GPU with its PCI handle.
fn srat(map: &MemoryMap) -> Vec<u8> {
    let mut f = Fields::default();
    f.u32(1); // reserved, 1 for backward compatibility
    f.u64(0); // reserved
    let sockets = map.ram.len();
    for cpu in 0..map.vcpus {
        let socket = cpu_socket(cpu, map.vcpus, sockets);
        // GICC affinity (type 3, 18 bytes).
        f.u8(3).u8(18);
        f.u32(map.ram[socket].pxm);
        f.u32(cpu); // ACPI processor UID, as in the MADT
        f.u32(1); // enabled
        f.u32(0); // clock domain
    }
    let mut body = f.0;
    for r in &map.ram {
        body.extend(aml(
            &MemoryAffinity::new(r.pxm, r.range.base, r.range.size).enabled()
        ));
    }
    for c in &map.carve_outs {
        body.extend(aml(&MemoryAffinity::new(c.pxm, 0, 0)
            .enabled()
            .hotpluggable()));
    }
    for g in &map.gpus {
        body.extend(aml(&MemoryAffinity::new(g.pxm, 0, 0)
            .enabled()
            .hotpluggable()));
        // Generic Initiator affinity (type 5, 32 bytes), written by hand: acpi_tables 0.2
        // stores the PCI handle's bus and devfn bytes swapped. The handle is segment (u16)
        // then BDF (u16: bus << 8 | devfn).
        let mut gi = Fields::default();
        gi.u8(5).u8(32).u8(0);
        gi.u8(1); // device handle type: PCI
        gi.u32(g.pxm);
        gi.u16(0); // segment
        gi.u16(u16::from(g.devfn())); // bus 0
        gi.zeros(12);
        gi.u32(1); // enabled
        gi.u32(0); // reserved
        body.extend(gi.0);
    }
    sdt(b"SRAT", 3, &body)
}

/// DSDT (revision 2, so AML integers are 64-bit).
fn dsdt(platform: &Resolved, map: &MemoryMap) -> Vec<u8> {
    // AML objects borrow their children, so each device is encoded in one expression.
    let com0 = aml(&Device::new(
        "COM0".into(),
        vec![
            &Name::new("_HID".into(), &"ARMH0011"),
            &Name::new("_UID".into(), &ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &Memory32Fixed::new(true, UART_BASE as u32, UART_SIZE as u32),
                    &Interrupt::new(true, false, false, false, spi_gsiv(UART_SPI)),
                ]),
            ),
        ],
    ));
    let tdev = aml(&Device::new(
        "TDEV".into(),
        vec![
            &Name::new("_HID".into(), &TESTDEV_HID),
            &Name::new("_UID".into(), &ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Memory32Fixed::new(
                    true,
                    TESTDEV_BASE as u32,
                    TESTDEV_SIZE as u32,
                )]),
            ),
        ],
    ));
    let mut sb = com0;
    sb.extend(tdev);
    if !map.gpus.is_empty() {
        sb.extend(pci0(platform, map));
    }
    let scope = acpi_tables::aml::Scope::raw("\\_SB_".into(), sb);
    sdt(b"DSDT", 2, &scope)
}

/// The PCIe host bridge and the GPUs under it.
fn pci0(platform: &Resolved, map: &MemoryMap) -> Vec<u8> {
    let crs = aml(&ResourceTemplate::new(vec![
        &AddressSpace::<u16>::new_bus_number(0, (PCI_BUSES - 1) as u16),
        &AddressSpace::<u32>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            PCI_MMIO32_BASE as u32,
            (PCI_MMIO32_BASE + PCI_MMIO32_SIZE - 1) as u32,
            None,
        ),
        &AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::PreFetchable,
            true,
            PCI_MMIO64_BASE,
            PCI_MMIO64_BASE + PCI_MMIO64_SIZE - 1,
            None,
        ),
    ]));

    // _PRT: INTA..INTD (pins 0..3) of every device on bus 0.
    let entries: Vec<Raw> = (0..32u32)
        .flat_map(|dev| {
            (0..4u32).map(move |pin| {
                let adr = (dev << 16) | 0xffff;
                let gsiv = spi_gsiv(PCI_INTX_SPI_BASE + (dev + pin) % 4);
                Raw(aml(&Package::new(vec![&adr, &pin, &ZERO, &gsiv])))
            })
        })
        .collect();
    let prt = aml(&Package::new(
        entries.iter().map(|e| e as &dyn Aml).collect(),
    ));

    let res0 = aml(&Device::new(
        "RES0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&Memory32Fixed::new(
                    false,
                    PCI_ECAM_BASE as u32,
                    PCI_ECAM_SIZE as u32,
                )]),
            ),
        ],
    ));

    let mut children = vec![
        Raw(aml(&Name::new("_HID".into(), &EISAName::new("PNP0A08")))),
        Raw(aml(&Name::new("_CID".into(), &EISAName::new("PNP0A03")))),
        Raw(aml(&Name::new("_SEG".into(), &ZERO))),
        Raw(aml(&Name::new("_BBN".into(), &ZERO))),
        Raw(aml(&Name::new("_UID".into(), &ZERO))),
        Raw(aml(&Name::new("_CCA".into(), &ONE))),
        // The root complex hangs off socket 0.
        Raw(aml(&Name::new("_PXM".into(), &map.ram[0].pxm))),
        Raw(aml(&Name::new("_CRS".into(), &Raw(crs)))),
        Raw(aml(&Name::new("_PRT".into(), &Raw(prt)))),
        Raw(res0),
    ];
    for g in &map.gpus {
        children.push(Raw(gpu_device(g, &gpu_properties(platform, g))));
    }
    aml(&Device::new(
        "PCI0".into(),
        children.iter().map(|c| c as &dyn Aml).collect(),
    ))
}

/// `Device(GPUn)` with `_ADR` and `_DSD` holding `props` (u64 values).
fn gpu_device(g: &GpuFunction, props: &[(&str, u64)]) -> Vec<u8> {
    let adr = (u32::from(g.device) << 16) | u32::from(g.function);
    let entries: Vec<Raw> = props
        .iter()
        .map(|(name, value)| Raw(aml(&Package::new(vec![&name.to_string(), value]))))
        .collect();
    let props = Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
    let uuid = Uuid::new(DEVICE_PROPERTIES_UUID);
    let dsd = Package::new(vec![&uuid, &props]);
    let name = format!("GPU{:X}", g.index);
    aml(&Device::new(
        Path::new(&name),
        vec![
            &Name::new("_ADR".into(), &adr),
            &Name::new("_DSD".into(), &dsd),
        ],
    ))
}

/// The 8-bit sum of `bytes` (0 for a table with a right checksum).
pub fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::{Gpu, GpuModel, Platform, Size, Socket};

    fn boot(vcpus: u32) -> BootParams {
        BootParams::example(vcpus)
    }

    fn rich_platform() -> Platform {
        let mut p = Platform {
            vcpus: 4,
            ..Platform::default()
        };
        p.sockets.push(Socket {
            ram: Size(GIB),
            pxm: None,
            egm: Some(crate::description::EgmRegion {
                base: None,
                size: Size(2 * GIB),
                pxm: None,
                retired_pages: vec![],
                retired_pages_count: None,
                retired_pages_table: Default::default(),
            }),
        });
        p.gpus.push(Gpu::new(GpuModel::Gb200, 0, GIB));
        p.gpus.push(Gpu::new(GpuModel::Gh200, 1, 2 * GIB));
        p.validate().unwrap();
        p
    }

    fn find<'a>(t: &'a [AcpiTable], sig: &str) -> &'a AcpiTable {
        t.iter().find(|t| t.signature == sig).unwrap()
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn test_acpi_every_checksum_and_length_right() {
        for p in [Platform::minimal(), Platform::default(), rich_platform()] {
            let t = tables(&p.resolve().unwrap(), &boot(p.vcpus), 0x4000_2000).unwrap();
            for table in &t {
                let b = &table.bytes;
                if table.signature == "RSDP" {
                    assert_eq!(&b[..8], b"RSD PTR ");
                    assert_eq!(byte_sum(&b[..20]), 0, "RSDP checksum");
                    assert_eq!(byte_sum(b), 0, "RSDP extended checksum");
                    assert_eq!(u32_at(b, 20) as usize, b.len());
                    assert_eq!(b[15], 2, "RSDP revision");
                    continue;
                }
                assert_eq!(&b[..4], table.signature.as_bytes());
                assert_eq!(u32_at(b, 4) as usize, b.len(), "{} length", table.signature);
                assert_eq!(byte_sum(b), 0, "{} checksum", table.signature);
                assert_eq!(table.addr % TABLE_ALIGN, 0);
            }
        }
    }

    #[test]
    fn test_acpi_pointers_chain_rsdp_xsdt_fadt_dsdt() {
        let p = Platform::default();
        let t = tables(&p.resolve().unwrap(), &boot(1), 0x4000_2000).unwrap();
        let rsdp = find(&t, "RSDP");
        let xsdt = find(&t, "XSDT");
        assert_eq!(u64_at(&rsdp.bytes, 24), xsdt.addr);
        let entries: Vec<u64> = (36..xsdt.bytes.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt.bytes, o))
            .collect();
        let named: Vec<&str> = entries
            .iter()
            .map(|a| t.iter().find(|t| t.addr == *a).unwrap().signature.as_str())
            .collect();
        assert_eq!(named, ["FACP", "APIC", "GTDT", "SPCR", "MCFG", "SRAT"]);
        let fadt = find(&t, "FACP");
        assert_eq!(fadt.bytes.len(), 276);
        assert_eq!(u64_at(&fadt.bytes, 140), find(&t, "DSDT").addr, "X_DSDT");
        assert_ne!(u32_at(&fadt.bytes, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(
            &fadt.bytes[129..131],
            &[3, 0],
            "PSCI_COMPLIANT | PSCI_USE_HVC"
        );
        // No overlap between placed tables.
        let mut spans: Vec<(u64, u64)> = t
            .iter()
            .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    }

    #[test]
    fn test_acpi_madt_has_gicc_per_vcpu_with_mpidr() {
        let p = rich_platform();
        let b = boot(4);
        let t = tables(&p.resolve().unwrap(), &b, 0x4000_2000).unwrap();
        let madt = &find(&t, "APIC").bytes;
        assert_eq!(madt.len(), 44 + 4 * 80 + 24 + 16);
        for i in 0..4 {
            let off = 44 + i * 80;
            assert_eq!(madt[off], 0xB);
            assert_eq!(u64_at(madt, off + 68), b.mpidrs[i] & 0xff_00ff_ffff);
        }
        assert_eq!(madt[44 + 320], 0xC);
        assert_eq!(madt[44 + 320 + 20], 3, "GICv3");
    }

    #[test]
    fn test_acpi_srat_domains() {
        let p = rich_platform();
        let t = tables(&p.resolve().unwrap(), &boot(4), 0x4000_2000).unwrap();
        let srat = &find(&t, "SRAT").bytes;
        assert_eq!(srat[8], 3, "revision");
        // Walk the subtables: (type, pxm, base, len, flags).
        let mut off = 48;
        let mut seen = Vec::new();
        while off < srat.len() {
            let (ty, len) = (srat[off], srat[off + 1] as usize);
            match ty {
                1 => seen.push((
                    1,
                    u32_at(srat, off + 2),
                    u64_at(srat, off + 8),
                    u64_at(srat, off + 16),
                    u32_at(srat, off + 28),
                )),
                3 => seen.push((ty, u32_at(srat, off + 2), 0, 0, 0)),
                5 => {
                    let bdf = u16::from_le_bytes([srat[off + 10], srat[off + 11]]);
                    seen.push((ty, u32_at(srat, off + 4), u64::from(bdf), 0, 0));
                }
                _ => panic!("unexpected SRAT type {ty}"),
            }
            off += len;
        }
        assert_eq!(off, srat.len());
        assert!(seen.contains(&(1, 0, RAM_BASE, GIB, 1)));
        assert!(seen.contains(&(1, 1, SOCKET_RAM_STRIDE, GIB, 1)));
        assert!(
            seen.contains(&(1, 4, 0, 0, 3)),
            "EGM placeholder, hot-pluggable"
        );
        assert!(seen.contains(&(1, 5, 0, 0, 3)));
        let gi: Vec<(u32, u64)> = seen
            .iter()
            .filter(|s| s.0 == 5)
            .map(|s| (s.1, s.2))
            .collect();
        assert_eq!(
            gi,
            [(8, 1 << 3), (9, 2 << 3), (10, 3 << 3)],
            "(pxm, bus 0 devfn)"
        );
        let gicc: Vec<u32> = seen.iter().filter(|s| s.0 == 3).map(|s| s.1).collect();
        assert_eq!(gicc, [0, 0, 1, 1]);
    }

    #[test]
    fn test_acpi_dsdt_revision_and_gpu_devices() {
        let p = rich_platform();
        let t = tables(&p.resolve().unwrap(), &boot(4), 0x4000_2000).unwrap();
        let dsdt = &find(&t, "DSDT").bytes;
        assert!(
            dsdt[8] >= 2,
            "DSDT revision must be >= 2 for 64-bit integers"
        );
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"ARMH0011"));
        assert!(has(TESTDEV_HID.as_bytes()));
        for n in ["GPU0", "GPU1", "GPU2", "PCI0", "_DSD", "_PRT"] {
            assert!(has(n.as_bytes()), "{n}");
        }
        assert!(has(format!(
            "{}\0",
            crate::description::EGM_RETIRED_PAGES_DATA_BASE
        )
        .as_bytes()));
        // The GPU memory base is a 64-bit integer: QWordPrefix then the value.
        let mut q = vec![0x0e];
        q.extend_from_slice(&GPU_MEM_BASE.to_le_bytes());
        assert!(has(&q));
    }

    #[test]
    fn test_acpi_no_gpu_means_no_pci_and_no_mcfg() {
        let p = Platform::minimal();
        let t = tables(&p.resolve().unwrap(), &boot(1), 0x4000_2000).unwrap();
        assert!(t.iter().all(|t| t.signature != "MCFG"));
        let dsdt = &find(&t, "DSDT").bytes;
        assert!(!dsdt.windows(4).any(|w| w == b"PCI0"));
    }
}
