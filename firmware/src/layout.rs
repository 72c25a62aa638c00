//! The guest physical memory map, in one place (read it top to bottom).
//!
//! | GPA                              | what                                                   |
//! |----------------------------------|--------------------------------------------------------|
//! | 0x00_0800_0000                   | GICv3 distributor (64 KiB)                             |
//! | 0x00_080A_0000                   | GICv3 redistributors, 128 KiB per vCPU                 |
//! | 0x00_0900_0000                   | PL011 UART, SPI 1 (INTID 33)                           |
//! | 0x00_0901_0000                   | gracevm test device (boot timer, checks)               |
//! | 0x00_0A00_0000 + s * 2 MiB       | socket s isolated retired-pages table block (64 KiB)   |
//! | 0x00_1000_0000 .. 0x00_3EFF_FFFF | PCIe 32-bit MMIO window; INTx A..D on SPIs 3..6        |
//! | 0x00_3F00_0000 .. 0x00_3FFF_FFFF | PCIe ECAM, segment 0, buses 0..15                      |
//! | 0x00_4000_0000 ..                | socket 0 RAM (firmware region, kernel, initrd, DTB)    |
//! | 0x20_0000_0000 * s               | socket s RAM, s = 1..3                                 |
//! | 0x80_0000_0000 + s * 64 GiB      | socket s EGM carve-out (default base)                  |
//! | 0xC0_0000_0000 .. 0xCF_FFFF_FFFF | PCIe 64-bit prefetchable window (64 GiB)               |
//! | 0xD0_0000_0000 ..                | GPU memory: one aperture per GPU, in order, 1 GiB aligned |
//!
//! Real Grace puts socket s at `s << 44` with its EGM part at the start of the socket's DRAM.
//! We keep the order (RAM, carve-outs, PCIe, GPU memory) but pack it below 1 TiB, so the
//! default platform needs only the 40-bit IPA every arm64 KVM offers: sockets get 128 GiB
//! slots, carve-outs 64 GiB slots (a carve-out may be placed anywhere below 2^48 with
//! `base`), GPU apertures are laid out one after the other from 0xD0_0000_0000 (past 1 TiB
//! when they exceed 192 GiB in total: `Platform::required_ipa_bits` says how far). Carve-outs
//! and GPU memory are in no memory map (not in the EFI map, not in /memory); each is its own
//! range, so the VMM backs it with its own memslot.
//!
//! Inside socket 0 RAM the boot images sit at fixed places:
//! | RAM offset                   | what                                            |
//! |------------------------------|-------------------------------------------------|
//! | 0                            | firmware region, 2 MiB (see below)              |
//! | 2 MiB                        | kernel Image (2 MiB aligned, as arm64 requires) |
//! | top - 2 MiB                  | DTB (at most 2 MiB, in a 2 MiB block of its own)|
//! | below the DTB                | initrd, page aligned                            |
//!
//! The firmware region (EFI ACPI-reclaim memory in ACPI mode, /reserved-memory in DT mode):
//! | region offset | what                                                            |
//! |---------------|-----------------------------------------------------------------|
//! | 0x0_0000      | EFI system table, vendor string, configuration table, RT props  |
//! | 0x0_1000      | EFI memory map                                                  |
//! | 0x0_2000      | ACPI tables, RSDP first                                         |
//! | 0x10_0000     | EGM retired-pages tables, one 64 KiB slot per socket            |

use std::fmt;

use crate::description::{Platform, Readiness, TablePlacement, NVIDIA_VENDOR_ID};

/// Bytes in a KiB/MiB/GiB, for readable sizes.
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const GIC_DIST_BASE: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 64 * KIB;
pub const GIC_REDIST_BASE: u64 = 0x080A_0000;
/// Each GICv3 redistributor has an RD and an SGI frame of 64 KiB each.
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 128 * KIB;

pub const UART_BASE: u64 = 0x0900_0000;
pub const UART_SIZE: u64 = 4 * KIB;
/// SPI number of the UART (INTID = 32 + SPI).
pub const UART_SPI: u32 = 1;

pub const TESTDEV_BASE: u64 = 0x0901_0000;
pub const TESTDEV_SIZE: u64 = 4 * KIB;

/// The redistributors must end below the UART; this bounds the vCPU count.
pub const MAX_VCPUS: u32 = ((UART_BASE - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU) as u32;

/// Number of interrupt lines given to the vGIC (SGIs+PPIs+SPIs), a multiple of 32: KVM's
/// least, 32 SPIs, as the platform wires only the UART and the PCI INTx lines. The guest's GIC
/// driver programs every SPI at boot, each register write a trapped access (nested: 181 such
/// exits per boot with 96 SPIs, 91 with 32).
pub const GIC_NR_IRQS: u32 = 64;

// Every SPI the platform wires must exist on the vGIC.
const _: () = assert!(UART_SPI < GIC_NR_IRQS - 32 && PCI_INTX_SPI_BASE + 4 <= GIC_NR_IRQS - 32);

/// Architected timer PPIs: secure phys, non-secure phys, virtual, hypervisor phys.
pub const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// GIC maintenance interrupt PPI.
pub const GIC_MAINTENANCE_PPI: u32 = 9;

/// PCIe 32-bit non-prefetchable MMIO window.
pub const PCI_MMIO32_BASE: u64 = 0x1000_0000;
pub const PCI_MMIO32_SIZE: u64 = 0x2F00_0000;
/// PCIe ECAM: 1 MiB per bus.
pub const PCI_ECAM_BASE: u64 = 0x3F00_0000;
pub const PCI_BUSES: u32 = 16;
pub const PCI_ECAM_SIZE: u64 = PCI_BUSES as u64 * MIB;
/// PCIe 64-bit prefetchable MMIO window.
pub const PCI_MMIO64_BASE: u64 = 0xC0_0000_0000;
pub const PCI_MMIO64_SIZE: u64 = 64 * GIB;
/// INTA..INTD of a slot go to SPIs base + (device + pin) % 4 (the standard swizzle).
pub const PCI_INTX_SPI_BASE: u32 = 3;

pub const RAM_BASE: u64 = 0x4000_0000;
/// Sockets 1.. get their RAM at `socket * SOCKET_RAM_STRIDE`.
pub const SOCKET_RAM_STRIDE: u64 = 128 * GIB;
pub const MAX_SOCKETS: usize = 4;

/// Default EGM carve-out of socket s: `EGM_DEFAULT_BASE + s * EGM_DEFAULT_STRIDE`.
pub const EGM_DEFAULT_BASE: u64 = 0x80_0000_0000;
pub const EGM_DEFAULT_STRIDE: u64 = 64 * GIB;

/// GPU memory apertures start here, each 1 GiB aligned.
pub const GPU_MEM_BASE: u64 = 0xD0_0000_0000;
pub const GPU_MEM_ALIGN: u64 = GIB;
/// GPU n is PCI 0000:00:(n+1).0, so at most 8 GPUs (with 4 sockets and 4 carve-outs that is
/// 16 proximity domains, the NUMA nodes a NODES_SHIFT=4 kernel has).
pub const MAX_GPUS: usize = 8;

/// The largest guest physical address space any arm64 KVM offers.
pub const MAX_IPA_BITS: u32 = 48;
pub const MAX_IPA: u64 = 1 << MAX_IPA_BITS;

/// The first 2 MiB of RAM hold what the firmware hands over (EFI system table, memory map,
/// ACPI tables, retired-pages tables); 2 MiB so every EFI descriptor stays 2 MiB aligned.
pub const FIRMWARE_BASE: u64 = RAM_BASE;
pub const FIRMWARE_SIZE: u64 = 2 * MIB;
pub const KERNEL_OFFSET: u64 = FIRMWARE_SIZE;
pub const DTB_MAX_SIZE: u64 = 2 * MIB;

/// Offsets inside the firmware region.
pub const FW_EFI_SYSTAB_OFFSET: u64 = 0;
pub const FW_EFI_MMAP_OFFSET: u64 = 0x1000;
pub const FW_EFI_MMAP_MAX: u64 = FW_ACPI_OFFSET - FW_EFI_MMAP_OFFSET;
pub const FW_ACPI_OFFSET: u64 = 0x2000;
pub const FW_ACPI_MAX: u64 = FW_RETIRED_PAGES_OFFSET - FW_ACPI_OFFSET;
pub const FW_RETIRED_PAGES_OFFSET: u64 = MIB;
/// One retired-pages table slot per socket: u64 count + RETIRED_PAGES_MAX u64 addresses
/// (32 KiB + 8), in a 64 KiB slot so it starts on a page of any kernel page size.
pub const RETIRED_PAGES_SLOT: u64 = 64 * KIB;
pub const RETIRED_PAGES_MAX: usize = 4096;
pub const RETIRED_PAGES_TABLE_SIZE: u64 = 8 + 8 * RETIRED_PAGES_MAX as u64;

/// `retired_pages_table = "isolated"`: socket s's table block, in no memory map, with a hole
/// of at least its own size after it; the table is its last 4 KiB page.
pub const ISOLATED_TABLE_BASE: u64 = 0x0A00_0000;
pub const ISOLATED_TABLE_STRIDE: u64 = 2 * MIB;
pub const ISOLATED_TABLE_BLOCK: u64 = 64 * KIB;
pub const ISOLATED_TABLE_PAGE: u64 = 4 * KIB;

/// Smallest socket-0 RAM that holds the firmware region, a minimal kernel, an initrd and the
/// DTB.
pub const MIN_RAM: u64 = 64 * MIB;

// Compile-time checks of the table above.
const _: () = assert!(RETIRED_PAGES_TABLE_SIZE <= RETIRED_PAGES_SLOT);
const _: () =
    assert!(FW_RETIRED_PAGES_OFFSET + MAX_SOCKETS as u64 * RETIRED_PAGES_SLOT <= FIRMWARE_SIZE);
const _: () = assert!(MAX_VCPUS >= 64);
const _: () = assert!(TESTDEV_BASE + TESTDEV_SIZE <= ISOLATED_TABLE_BASE);
const _: () =
    assert!(ISOLATED_TABLE_BASE + MAX_SOCKETS as u64 * ISOLATED_TABLE_STRIDE <= PCI_MMIO32_BASE);
const _: () = assert!(2 * ISOLATED_TABLE_BLOCK <= ISOLATED_TABLE_STRIDE);

/// Where the redistributor region of `vcpus` vCPUs ends (exclusive).
pub fn gic_redist_size(vcpus: u32) -> u64 {
    u64::from(vcpus) * GIC_REDIST_SIZE_PER_CPU
}

/// Address of the DTB for a socket-0 RAM of `ram_size` bytes.
pub fn dtb_addr(ram_size: u64) -> u64 {
    RAM_BASE + ram_size - DTB_MAX_SIZE
}

/// Base of socket `s`'s RAM.
pub fn socket_ram_base(s: usize) -> u64 {
    if s == 0 {
        RAM_BASE
    } else {
        s as u64 * SOCKET_RAM_STRIDE
    }
}

/// Default base of socket `s`'s EGM carve-out.
pub fn egm_default_base(s: usize) -> u64 {
    EGM_DEFAULT_BASE + s as u64 * EGM_DEFAULT_STRIDE
}

/// Guest physical address of socket `s`'s retired-pages table.
pub fn retired_pages_table(s: usize) -> u64 {
    FIRMWARE_BASE + FW_RETIRED_PAGES_OFFSET + s as u64 * RETIRED_PAGES_SLOT
}

/// Socket `s`'s isolated table block.
pub fn isolated_table_block(s: usize) -> GuestRange {
    GuestRange::new(
        ISOLATED_TABLE_BASE + s as u64 * ISOLATED_TABLE_STRIDE,
        ISOLATED_TABLE_BLOCK,
    )
}

/// PCI device number of GPU `n` on bus 0 (function 0).
pub fn gpu_pci_device(n: usize) -> u8 {
    n as u8 + 1
}

/// The socket vCPU `cpu` of `vcpus` belongs to: vCPUs are split evenly, in order.
pub fn cpu_socket(cpu: u32, vcpus: u32, sockets: usize) -> usize {
    (u64::from(cpu) * sockets as u64 / u64::from(vcpus.max(1))) as usize
}

/// Bits of guest physical address space needed to reach `top` (exclusive); at least 32.
pub fn ipa_bits(top: u64) -> u32 {
    if top <= 1 {
        return 32;
    }
    (64 - (top - 1).leading_zeros()).max(32)
}

/// A range of guest physical addresses, [base, base + size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuestRange {
    pub base: u64,
    pub size: u64,
}

impl GuestRange {
    pub const fn new(base: u64, size: u64) -> Self {
        GuestRange { base, size }
    }

    /// Exclusive end (saturating, so a bogus range cannot wrap).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr < self.end()
    }

    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.base, self.end())
    }
}

/// One socket's RAM, listed in every memory map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketRam {
    pub socket: usize,
    pub pxm: u32,
    pub range: GuestRange,
}

/// One socket's EGM carve-out: in no memory map, backed by the VMM with its own memslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarveOut {
    pub socket: usize,
    /// `nvidia,egm-pxm`.
    pub pxm: u32,
    pub range: GuestRange,
    pub retired_pages: Vec<u64>,
    /// Guest physical address of this carve-out's retired-pages table.
    pub retired_pages_table: u64,
    /// The table's own block when it is isolated (`None`: in the firmware region).
    pub table_block: Option<GuestRange>,
}

impl CarveOut {
    /// Bytes of table the firmware can write at `retired_pages_table`.
    pub fn table_room(&self) -> u64 {
        match self.table_block {
            Some(block) => block.end() - self.retired_pages_table,
            None => RETIRED_PAGES_SLOT,
        }
    }
}

/// One GPU function: where it sits on PCI and where its memory is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuFunction {
    /// Index among the description's [[gpu]] tables.
    pub index: usize,
    pub socket: usize,
    /// Generic Initiator proximity domain.
    pub pxm: u32,
    pub vendor_id: u16,
    pub device_id: u16,
    /// PCI address: segment 0, bus 0, this device, function 0.
    pub device: u8,
    pub function: u8,
    /// GPU memory aperture (`nvidia,gpu-mem-base-pa`, `nvidia,gpu-mem-size`).
    pub memory: GuestRange,
    pub readiness: Readiness,
}

impl GpuFunction {
    /// devfn as in the PCI spec: device << 3 | function.
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }
}

/// Where a platform puts its memory: what the VMM maps and what the firmware describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryMap {
    pub vcpus: u32,
    pub ram: Vec<SocketRam>,
    pub carve_outs: Vec<CarveOut>,
    pub gpus: Vec<GpuFunction>,
}

impl MemoryMap {
    /// Place everything `p` describes. Defaults are resolved here (PXMs, carve-out bases).
    /// Only [`Platform::resolve`] calls it, after validating: the one place the map is made.
    pub(crate) fn new(p: &Platform) -> Self {
        let mut ram = Vec::new();
        let mut carve_outs = Vec::new();
        for (i, s) in p.sockets.iter().enumerate() {
            ram.push(SocketRam {
                socket: i,
                pxm: s.pxm.unwrap_or(i as u32),
                range: GuestRange::new(socket_ram_base(i), s.ram.0),
            });
            if let Some(egm) = &s.egm {
                carve_outs.push(CarveOut {
                    socket: i,
                    pxm: egm.pxm.unwrap_or(4 + i as u32),
                    range: GuestRange::new(
                        egm.base.map_or(egm_default_base(i), |a| a.0),
                        egm.size.0,
                    ),
                    retired_pages: egm.retired_pages.iter().map(|a| a.0).collect(),
                    retired_pages_table: match egm.retired_pages_table {
                        TablePlacement::Firmware => retired_pages_table(i),
                        TablePlacement::Isolated => {
                            isolated_table_block(i).end() - ISOLATED_TABLE_PAGE
                        }
                    },
                    table_block: match egm.retired_pages_table {
                        TablePlacement::Firmware => None,
                        TablePlacement::Isolated => Some(isolated_table_block(i)),
                    },
                });
            }
        }
        let mut gpus = Vec::new();
        let mut next = GPU_MEM_BASE;
        for (i, g) in p.gpus.iter().enumerate() {
            let memory = GuestRange::new(next, g.mem_size.0);
            next = memory
                .end()
                .div_ceil(GPU_MEM_ALIGN)
                .saturating_mul(GPU_MEM_ALIGN);
            gpus.push(GpuFunction {
                index: i,
                socket: g.socket,
                pxm: g.pxm.unwrap_or(8 + i as u32),
                vendor_id: NVIDIA_VENDOR_ID,
                device_id: g.pci_device_id(),
                device: gpu_pci_device(i),
                function: 0,
                memory,
                readiness: g.readiness,
            });
        }
        MemoryMap {
            vcpus: p.vcpus,
            ram,
            carve_outs,
            gpus,
        }
    }

    /// The carve-out of socket `s`, if it has one.
    pub fn carve_out(&self, socket: usize) -> Option<&CarveOut> {
        self.carve_outs.iter().find(|c| c.socket == socket)
    }

    /// RAM listed in the memory maps, in total.
    pub fn ram_total(&self) -> u64 {
        self.ram.iter().map(|r| r.range.size).sum()
    }

    /// Every range the platform claims, named for messages; RAM, carve-outs and GPU memory
    /// included, plus the fixed devices and PCIe windows.
    pub fn named_ranges(&self) -> Vec<(String, GuestRange)> {
        let mut v = vec![
            (
                "GIC distributor".to_string(),
                GuestRange::new(GIC_DIST_BASE, GIC_DIST_SIZE),
            ),
            (
                "GIC redistributors".to_string(),
                GuestRange::new(GIC_REDIST_BASE, gic_redist_size(self.vcpus)),
            ),
            ("UART".to_string(), GuestRange::new(UART_BASE, UART_SIZE)),
            (
                "test device".to_string(),
                GuestRange::new(TESTDEV_BASE, TESTDEV_SIZE),
            ),
            (
                "PCIe 32-bit window".to_string(),
                GuestRange::new(PCI_MMIO32_BASE, PCI_MMIO32_SIZE),
            ),
            (
                "PCIe ECAM".to_string(),
                GuestRange::new(PCI_ECAM_BASE, PCI_ECAM_SIZE),
            ),
            (
                "PCIe 64-bit window".to_string(),
                GuestRange::new(PCI_MMIO64_BASE, PCI_MMIO64_SIZE),
            ),
        ];
        for r in &self.ram {
            v.push((format!("socket {} RAM", r.socket), r.range));
        }
        for c in &self.carve_outs {
            v.push((format!("socket {} EGM carve-out", c.socket), c.range));
        }
        for g in &self.gpus {
            v.push((format!("gpu {} memory", g.index), g.memory));
        }
        v
    }

    /// Exclusive end of the highest range.
    pub fn top(&self) -> u64 {
        self.named_ranges()
            .iter()
            .map(|(_, r)| r.end())
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layout_devices_do_not_overlap() {
        let mut ranges = [
            (GIC_DIST_BASE, GIC_DIST_SIZE),
            (GIC_REDIST_BASE, gic_redist_size(MAX_VCPUS)),
            (UART_BASE, UART_SIZE),
            (TESTDEV_BASE, TESTDEV_SIZE),
            (PCI_MMIO32_BASE, PCI_MMIO32_SIZE),
            (PCI_ECAM_BASE, PCI_ECAM_SIZE),
            (RAM_BASE, SOCKET_RAM_STRIDE - RAM_BASE),
            (socket_ram_base(MAX_SOCKETS - 1), SOCKET_RAM_STRIDE),
            (EGM_DEFAULT_BASE, MAX_SOCKETS as u64 * EGM_DEFAULT_STRIDE),
            (PCI_MMIO64_BASE, PCI_MMIO64_SIZE),
            (GPU_MEM_BASE, GIB),
        ];
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn test_layout_boot_images_aligned() {
        assert_eq!((RAM_BASE + KERNEL_OFFSET) % (2 * MIB), 0);
        assert_eq!(dtb_addr(MIN_RAM) % (2 * MIB), 0);
        assert!(dtb_addr(MIN_RAM) > RAM_BASE + KERNEL_OFFSET);
    }

    #[test]
    fn test_layout_firmware_region_fits() {
        let end = FW_RETIRED_PAGES_OFFSET + MAX_SOCKETS as u64 * RETIRED_PAGES_SLOT;
        assert!(end <= FIRMWARE_SIZE);
        assert_eq!(retired_pages_table(1) % (64 * KIB), 0);
    }

    #[test]
    fn test_layout_carve_outs_section_aligned() {
        for s in 0..MAX_SOCKETS {
            assert_eq!(egm_default_base(s) % GIB, 0);
            assert_eq!(socket_ram_base(s) % GIB, 0);
        }
        assert_eq!(GPU_MEM_BASE % GIB, 0);
    }

    #[test]
    fn test_layout_max_vcpus_fits_below_uart() {
        assert!(GIC_REDIST_BASE + gic_redist_size(MAX_VCPUS) <= UART_BASE);
    }

    #[test]
    fn test_layout_ipa_bits() {
        assert_eq!(ipa_bits(0x8000_0000), 32);
        assert_eq!(ipa_bits(1 << 40), 40);
        assert_eq!(ipa_bits((1 << 40) + 1), 41);
    }

    #[test]
    fn test_layout_cpu_socket_split_evenly() {
        let s: Vec<usize> = (0..4).map(|c| cpu_socket(c, 4, 2)).collect();
        assert_eq!(s, [0, 0, 1, 1]);
        assert_eq!(cpu_socket(0, 1, 4), 0);
    }

    #[test]
    fn test_memory_map_gpu_apertures_packed_and_aligned() {
        let mut p = Platform::default();
        p.gpus.push(crate::description::Gpu::new(
            crate::description::GpuModel::Gb200,
            0,
            3 * GIB / 2,
        ));
        p.gpus.push(crate::description::Gpu::new(
            crate::description::GpuModel::Gb200,
            0,
            GIB,
        ));
        let map = p.resolve().unwrap().map().clone();
        let bases: Vec<u64> = map.gpus.iter().map(|g| g.memory.base).collect();
        assert_eq!(
            bases,
            [GPU_MEM_BASE, GPU_MEM_BASE + GIB, GPU_MEM_BASE + 3 * GIB]
        );
        assert_eq!(map.gpus[2].devfn(), 3 << 3);
    }
}
