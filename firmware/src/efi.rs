//! The firmware-less EFI hand-off arm64 Linux accepts from anyone: an EFI system table whose
//! configuration table names the RSDP (and says no runtime service is supported), and an EFI
//! memory map, both named in `/chosen` (`linux,uefi-*`). No boot or runtime services exist:
//! the system table's pointers to them are 0.

use crate::layout::{MemoryMap, FIRMWARE_BASE, FIRMWARE_SIZE, MIB};

pub const SYSTEM_TABLE_SIGNATURE: u64 = 0x5453_5953_2049_4249; // "IBI SYST"
/// EFI 2.70: the kernel prints "EFI v2.7".
pub const SYSTEM_TABLE_REVISION: u32 = (2 << 16) | 70;
pub const SYSTEM_TABLE_SIZE: usize = 120;
pub const CONFIG_TABLE_ENTRY_SIZE: usize = 24;
pub const MEMORY_DESCRIPTOR_SIZE: usize = 40;
pub const MEMORY_DESCRIPTOR_VERSION: u32 = 1;
pub const PAGE_SIZE: u64 = 4096;
/// What `fw_vendor` points to, as NUL-terminated UCS-2.
pub const FW_VENDOR: &str = "gracevm";

/// Offsets, inside the EFI part of the firmware region, of what [`system_table`] writes.
pub const VENDOR_OFFSET: usize = 0x80;
pub const CONFIG_TABLE_OFFSET: usize = 0xC0;
pub const RT_PROPERTIES_OFFSET: usize = 0x140;
const MAX_CONFIG_TABLES: usize =
    (RT_PROPERTIES_OFFSET - CONFIG_TABLE_OFFSET) / CONFIG_TABLE_ENTRY_SIZE;

/// Memory attribute: write-back cacheable.
pub const MEMORY_WB: u64 = 0x8;
/// Memory attribute: needs a runtime mapping; never set here.
pub const MEMORY_RUNTIME: u64 = 1 << 63;

/// An EFI GUID in its in-memory byte order (first three fields little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const fn new(a: u32, b: u16, c: u16, d: [u8; 8]) -> Self {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }
}

/// ACPI 2.0 RSDP: 8868e871-e4f1-11d3-bc22-0080c73c8881.
pub const ACPI_20_TABLE_GUID: Guid = Guid::new(
    0x8868_e871,
    0xe4f1,
    0x11d3,
    [0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81],
);
/// EFI_RT_PROPERTIES_TABLE: eb66918a-7eef-402a-842e-931d21c38ae9.
pub const RT_PROPERTIES_TABLE_GUID: Guid = Guid::new(
    0xeb66_918a,
    0x7eef,
    0x402a,
    [0x84, 0x2e, 0x93, 0x1d, 0x21, 0xc3, 0x8a, 0xe9],
);

/// EFI memory types used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    ConventionalMemory = 7,
    AcpiReclaimMemory = 9,
}

/// One EFI memory descriptor (version 1, 40 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryDescriptor {
    pub kind: MemoryType,
    pub phys: u64,
    /// Number of 4 KiB EFI pages.
    pub pages: u64,
    pub attribute: u64,
}

impl MemoryDescriptor {
    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    pub fn to_bytes(&self) -> [u8; MEMORY_DESCRIPTOR_SIZE] {
        let mut b = [0u8; MEMORY_DESCRIPTOR_SIZE];
        b[0..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        // 4..8: padding
        b[8..16].copy_from_slice(&self.phys.to_le_bytes());
        // 16..24: virtual start, 0 (no runtime mapping)
        b[24..32].copy_from_slice(&self.pages.to_le_bytes());
        b[32..40].copy_from_slice(&self.attribute.to_le_bytes());
        b
    }
}

/// The EFI memory map of `map`: socket 0's firmware region as ACPI reclaim memory, the rest of
/// every socket's RAM as conventional memory, all write-back cacheable and 2 MiB aligned.
/// Carve-outs and GPU memory are left out: the kernel must never see them as RAM.
pub fn memory_descriptors(map: &MemoryMap) -> Vec<MemoryDescriptor> {
    let mut v = Vec::new();
    for r in &map.ram {
        let (mut base, mut size) = (r.range.base, r.range.size);
        if base == FIRMWARE_BASE {
            v.push(MemoryDescriptor {
                kind: MemoryType::AcpiReclaimMemory,
                phys: FIRMWARE_BASE,
                pages: FIRMWARE_SIZE / PAGE_SIZE,
                attribute: MEMORY_WB,
            });
            base += FIRMWARE_SIZE;
            size -= FIRMWARE_SIZE;
        }
        if size > 0 {
            v.push(MemoryDescriptor {
                kind: MemoryType::ConventionalMemory,
                phys: base,
                pages: size / PAGE_SIZE,
                attribute: MEMORY_WB,
            });
        }
    }
    debug_assert!(v
        .iter()
        .all(|d| d.phys % (2 * MIB) == 0 && d.size() % (2 * MIB) == 0));
    v
}

/// The memory map as the kernel reads it: descriptors back to back.
pub fn encode_memory_map(descs: &[MemoryDescriptor]) -> Vec<u8> {
    descs.iter().flat_map(|d| d.to_bytes()).collect()
}

/// EFI_RT_PROPERTIES_TABLE: version 1, length 8, no runtime service supported.
pub fn rt_properties() -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..2].copy_from_slice(&1u16.to_le_bytes());
    b[2..4].copy_from_slice(&8u16.to_le_bytes());
    // 4..8: RuntimeServicesSupported = 0
    b
}

/// The EFI part of the firmware region for a system table at guest address `base`: the
/// system table, its vendor string, the configuration table naming the RSDP at `rsdp` and the
/// RT properties table. Returns `RT_PROPERTIES_OFFSET + 8` bytes.
pub fn system_table(base: u64, rsdp: u64) -> Vec<u8> {
    let rt_props = base + RT_PROPERTIES_OFFSET as u64;
    let config = [
        (ACPI_20_TABLE_GUID, rsdp),
        (RT_PROPERTIES_TABLE_GUID, rt_props),
    ];
    debug_assert!(config.len() <= MAX_CONFIG_TABLES);

    let mut b = vec![0u8; RT_PROPERTIES_OFFSET + 8];
    let put_u64 =
        |b: &mut [u8], off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    let put_u32 =
        |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());

    // efi_table_hdr_t
    put_u64(&mut b, 0, SYSTEM_TABLE_SIGNATURE);
    put_u32(&mut b, 8, SYSTEM_TABLE_REVISION);
    put_u32(&mut b, 12, SYSTEM_TABLE_SIZE as u32);
    // 16: crc32, filled last; 20: reserved
    put_u64(&mut b, 24, base + VENDOR_OFFSET as u64); // fw_vendor
    put_u32(&mut b, 32, 1); // fw_revision
                            // 40..88: console handles and protocols, none
    put_u64(&mut b, 88, 0); // runtime services
    put_u64(&mut b, 96, 0); // boot services
    put_u64(&mut b, 104, config.len() as u64); // nr_tables
    put_u64(&mut b, 112, base + CONFIG_TABLE_OFFSET as u64); // tables
    let crc = crc32(&b[..SYSTEM_TABLE_SIZE]);
    put_u32(&mut b, 16, crc);

    for (i, c) in FW_VENDOR.encode_utf16().enumerate() {
        b[VENDOR_OFFSET + 2 * i..VENDOR_OFFSET + 2 * i + 2].copy_from_slice(&c.to_le_bytes());
    }
    for (i, (guid, addr)) in config.iter().enumerate() {
        let off = CONFIG_TABLE_OFFSET + i * CONFIG_TABLE_ENTRY_SIZE;
        b[off..off + 16].copy_from_slice(&guid.0);
        put_u64(&mut b, off + 16, *addr);
    }
    b[RT_PROPERTIES_OFFSET..].copy_from_slice(&rt_properties());
    b
}

/// The CRC32 the EFI table headers carry (IEEE 802.3, as UEFI specifies).
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::{Platform, Size};
    use crate::layout::GIB;

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn test_crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn test_guid_byte_order() {
        assert_eq!(
            ACPI_20_TABLE_GUID.0,
            [
                0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11, 0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c,
                0x88, 0x81
            ]
        );
    }

    #[test]
    fn test_system_table_fields() {
        let base = FIRMWARE_BASE;
        let b = system_table(base, 0x4000_2000);
        assert_eq!(u64_at(&b, 0), SYSTEM_TABLE_SIGNATURE);
        assert_eq!(&b[8..12], &SYSTEM_TABLE_REVISION.to_le_bytes());
        assert_eq!(&b[12..16], &120u32.to_le_bytes());
        let mut zeroed = b[..120].to_vec();
        zeroed[16..20].fill(0);
        assert_eq!(&b[16..20], &crc32(&zeroed).to_le_bytes());
        assert_eq!(u64_at(&b, 88), 0, "no runtime services");
        assert_eq!(u64_at(&b, 96), 0, "no boot services");
        assert_eq!(u64_at(&b, 104), 2);
        let tables = (u64_at(&b, 112) - base) as usize;
        assert_eq!(&b[tables..tables + 16], &ACPI_20_TABLE_GUID.0);
        assert_eq!(u64_at(&b, tables + 16), 0x4000_2000);
        assert_eq!(&b[tables + 24..tables + 40], &RT_PROPERTIES_TABLE_GUID.0);
        let rt = (u64_at(&b, tables + 40) - base) as usize;
        assert_eq!(&b[rt..rt + 8], &[1, 0, 8, 0, 0, 0, 0, 0]);
        let vendor = (u64_at(&b, 24) - base) as usize;
        assert_eq!(&b[vendor..vendor + 4], &[b'g', 0, b'r', 0]);
        assert_eq!(&b[vendor + 14..vendor + 16], &[0, 0], "NUL-terminated");
    }

    #[test]
    fn test_memory_map_aligned_and_excludes_carve_outs_and_gpu_memory() {
        let mut p = Platform::default();
        p.sockets.push(crate::description::Socket {
            ram: Size(GIB),
            pxm: None,
            egm: None,
        });
        let map = p.resolve().unwrap().map().clone();
        let descs = memory_descriptors(&map);
        assert_eq!(descs.len(), 3);
        assert_eq!(descs[0].kind, MemoryType::AcpiReclaimMemory);
        assert_eq!(
            (descs[0].phys, descs[0].size()),
            (FIRMWARE_BASE, FIRMWARE_SIZE)
        );
        assert_eq!(descs[1].kind, MemoryType::ConventionalMemory);
        let total: u64 = descs.iter().map(|d| d.size()).sum();
        assert_eq!(total, p.system_ram());
        for d in &descs {
            assert_eq!(d.phys % (2 * MIB), 0);
            assert_eq!(d.size() % (2 * MIB), 0);
            assert_eq!(d.attribute & MEMORY_RUNTIME, 0);
            assert_ne!(d.attribute & MEMORY_WB, 0);
            let r = crate::layout::GuestRange::new(d.phys, d.size());
            for c in &map.carve_outs {
                assert!(!r.overlaps(&c.range), "{r} lists carve-out {}", c.range);
            }
            for g in &map.gpus {
                assert!(!r.overlaps(&g.memory), "{r} lists GPU memory {}", g.memory);
            }
        }
        let bytes = encode_memory_map(&descs);
        assert_eq!(bytes.len(), 3 * MEMORY_DESCRIPTOR_SIZE);
        assert_eq!(&bytes[0..4], &9u32.to_le_bytes());
        assert_eq!(u64_at(&bytes, 8), FIRMWARE_BASE);
        assert_eq!(u64_at(&bytes, 24), FIRMWARE_SIZE / PAGE_SIZE);
        assert_eq!(u64_at(&bytes, 32), MEMORY_WB);
    }
}
