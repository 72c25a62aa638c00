//! What gracevm's (absent) firmware hands the kernel, built from one platform description:
//! in ACPI mode (the default, like real Grace) the firmware-less EFI hand-off (system table,
//! memory map, ACPI tables) and a DTB holding only `/chosen`; in DT mode a full DTB. In both,
//! the EGM retired-pages tables the GPUs' properties point to.
//!
//! Pure code: description in, bytes out. No KVM, no I/O except [`Firmware::write_to`], so
//! every builder is tested on any host and checked by independent parsers (`dtc`, `iasl`) in
//! `tests/host`.
//!
//! The VMM resolves the description once ([`Platform::resolve`]: validated, memory map
//! placed), calls [`build`] and then: writes [`Firmware::blob`] at [`layout::FIRMWARE_BASE`]
//! and [`Firmware::dtb`] at [`layout::dtb_addr`], backs every range of [`Resolved::map`]
//! (RAM, carve-outs, GPU memory) with memory, and enters the kernel with X0 = the DTB address.

pub mod acpi;
pub mod description;
pub mod efi;
pub mod fdt;
pub mod layout;
pub mod resolved;

use std::path::{Path, PathBuf};

pub use acpi::AcpiTable;
pub use description::{
    Addr, BootMode, EgmRegion, Gpu, GpuModel, Platform, Readiness, Size, Socket, TablePlacement,
};
pub use fdt::{build_dtb, BootParams};
pub use layout::{CarveOut, GpuFunction, GuestRange, MemoryMap, SocketRam};
pub use resolved::Resolved;

use description::{
    EGM_BASE_PA, EGM_PXM, EGM_RETIRED_PAGES_DATA_BASE, EGM_SIZE, GPU_MEM_BASE_PA, GPU_MEM_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("platform description {origin}: {msg}")]
    Description { origin: String, msg: String },
    #[error("device tree: {0}")]
    Fdt(String),
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Kernel command-line words an ACPI boot needs: no EFI runtime services exist. (The
/// RT_PROPERTIES table says so too; either one alone keeps the kernel from calling through
/// the NULL runtime table.)
pub const ACPI_EXTRA_CMDLINE: &str = "efi=noruntime";

/// Everything the guest sees before its first instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Firmware {
    pub boot: BootMode,
    /// The DTB, for `layout::dtb_addr`; X0 at kernel entry.
    pub dtb: Vec<u8>,
    /// To be written at [`layout::FIRMWARE_BASE`] (at most [`layout::FIRMWARE_SIZE`] bytes;
    /// the rest of the region must read as zero, as fresh guest RAM does). Empty when there
    /// is nothing to place (DT mode without carve-outs).
    pub blob: Vec<u8>,
    /// Words appended to the DTB's `bootargs` (already there; for logs and reports).
    pub extra_cmdline: String,
    /// ACPI tables as placed in the blob, RSDP first; empty in DT mode.
    pub acpi_tables: Vec<AcpiTable>,
    /// The EFI memory map as placed in the blob; empty in DT mode.
    pub efi_memory_map: Vec<efi::MemoryDescriptor>,
    /// Retired-pages tables outside the firmware region (`retired_pages_table = "isolated"`):
    /// guest address and bytes, each inside its carve-out's `table_block`.
    pub isolated_tables: Vec<(u64, Vec<u8>)>,
}

/// The `nvidia,*` properties of GPU `g` (u64 values, in emission order), with its fault knobs
/// applied. GPUs on a socket without a carve-out get only the GPU memory properties.
pub fn gpu_properties(platform: &Resolved, g: &GpuFunction) -> Vec<(&'static str, u64)> {
    let knobs = platform.gpus.get(g.index);
    let mut props = vec![
        (GPU_MEM_BASE_PA, g.memory.base),
        (GPU_MEM_SIZE, g.memory.size),
    ];
    if let Some(c) = platform.map().carve_out(g.socket) {
        let table = knobs
            .and_then(|k| k.retired_pages_base)
            .map_or(c.retired_pages_table, |a| a.0);
        props.extend([
            (EGM_PXM, u64::from(c.pxm)),
            (EGM_BASE_PA, c.range.base),
            (EGM_SIZE, c.range.size),
            (EGM_RETIRED_PAGES_DATA_BASE, table),
        ]);
    }
    if let Some(k) = knobs {
        props.retain(|(name, _)| !k.omit_properties.iter().any(|o| o == name));
        for (name, value) in props.iter_mut() {
            if k.zero_properties.iter().any(|z| z == name) {
                *value = 0;
            }
        }
    }
    props
}

/// A retired-pages table: LE u64 count, then the addresses.
pub fn retired_pages_table(pages: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 8 * pages.len());
    b.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        b.extend_from_slice(&p.to_le_bytes());
    }
    b
}

/// Copy `bytes` into `blob` at guest address `addr` (inside the firmware region).
fn place(blob: &mut Vec<u8>, addr: u64, bytes: &[u8]) {
    let off = (addr - layout::FIRMWARE_BASE) as usize;
    if blob.len() < off + bytes.len() {
        blob.resize(off + bytes.len(), 0);
    }
    blob[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Build everything for `platform` booted with `boot` (a [`Resolved`] platform validated).
pub fn build(platform: &Resolved, boot: &BootParams) -> Result<Firmware, Error> {
    let mut blob = Vec::new();
    let isolated_tables = place_retired_pages_tables(platform.map(), &mut blob);
    let fw = match platform.boot {
        BootMode::Dt => Firmware {
            boot: BootMode::Dt,
            dtb: build_dtb(platform, boot)?,
            blob: Vec::new(),
            extra_cmdline: String::new(),
            acpi_tables: vec![],
            efi_memory_map: vec![],
            isolated_tables,
        },
        BootMode::Acpi => efi_handoff(platform, boot, &mut blob, isolated_tables)?,
    };
    // Whole pages, so the VMM's write covers every byte the tables' pages hold.
    blob.resize(blob.len().div_ceil(4096) * 4096, 0);
    debug_assert!(blob.len() as u64 <= layout::FIRMWARE_SIZE);
    Ok(Firmware { blob, ..fw })
}

/// Retired-pages tables: one slot per socket with a carve-out, each a zeroed 64 KiB slot
/// (at least one zeroed page, as real firmware provides) with the count and addresses.
/// An isolated table gets only the room its page has: the count always, then as many
/// entries as fit. Returns the isolated ones; the others are placed in `blob`.
fn place_retired_pages_tables(map: &MemoryMap, blob: &mut Vec<u8>) -> Vec<(u64, Vec<u8>)> {
    let mut isolated_tables = Vec::new();
    for c in &map.carve_outs {
        let mut slot = retired_pages_table(&c.retired_pages);
        slot.resize(c.table_room() as usize, 0);
        if c.table_block.is_some() {
            isolated_tables.push((c.retired_pages_table, slot));
        } else {
            place(blob, c.retired_pages_table, &slot);
        }
    }
    isolated_tables
}

/// The ACPI boot: tables, EFI memory map and system table in `blob`, and the stub DTB that
/// points the kernel at them.
fn efi_handoff(
    platform: &Resolved,
    boot: &BootParams,
    blob: &mut Vec<u8>,
    isolated_tables: Vec<(u64, Vec<u8>)>,
) -> Result<Firmware, Error> {
    let acpi_base = layout::FIRMWARE_BASE + layout::FW_ACPI_OFFSET;
    let tables = acpi::tables(platform, boot, acpi_base)?;
    for t in &tables {
        place(blob, t.addr, &t.bytes);
    }
    let descs = efi::memory_descriptors(platform.map());
    let mmap = efi::encode_memory_map(&descs);
    if mmap.len() as u64 > layout::FW_EFI_MMAP_MAX {
        return Err(Error::Acpi(format!(
            "EFI memory map of {} bytes does not fit",
            mmap.len()
        )));
    }
    let mmap_start = layout::FIRMWARE_BASE + layout::FW_EFI_MMAP_OFFSET;
    place(blob, mmap_start, &mmap);
    let systab = layout::FIRMWARE_BASE + layout::FW_EFI_SYSTAB_OFFSET;
    place(blob, systab, &efi::system_table(systab, tables[0].addr));

    let mut with_extra = boot.clone();
    let missing = !boot
        .cmdline
        .split_whitespace()
        .any(|w| w == ACPI_EXTRA_CMDLINE);
    if missing {
        with_extra.cmdline = format!("{} {ACPI_EXTRA_CMDLINE}", boot.cmdline)
            .trim()
            .to_string();
    }
    let handoff = fdt::EfiHandoff {
        system_table: systab,
        mmap_start,
        mmap_size: mmap.len() as u32,
        desc_size: efi::MEMORY_DESCRIPTOR_SIZE as u32,
        desc_version: efi::MEMORY_DESCRIPTOR_VERSION,
    };
    Ok(Firmware {
        boot: BootMode::Acpi,
        dtb: fdt::build_efi_stub_dtb(&with_extra, &handoff)?,
        blob: Vec::new(),
        extra_cmdline: if missing {
            ACPI_EXTRA_CMDLINE.to_string()
        } else {
            String::new()
        },
        acpi_tables: tables,
        efi_memory_map: descs,
        isolated_tables,
    })
}

/// File name of the DTB in [`Firmware::write_to`]'s directory.
pub const DTB_FILE: &str = "gracevm.dtb";
/// File name of the firmware blob (what lands at `FIRMWARE_BASE`).
pub const BLOB_FILE: &str = "firmware.bin";

impl Firmware {
    /// Write what the guest sees into `dir` (created if missing): `gracevm.dtb`,
    /// `firmware.bin`, and each ACPI table as `<signature>.dat` (`RSDP.dat`, `XSDT.dat`,
    /// `FACP.dat`, `DSDT.dat`, `APIC.dat`, ...) for `dtc -I dtb` and `iasl -d`. Returns the
    /// files written.
    pub fn write_to(&self, dir: &Path) -> Result<Vec<PathBuf>, Error> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut files = vec![
            (dir.join(DTB_FILE), &self.dtb),
            (dir.join(BLOB_FILE), &self.blob),
        ];
        for t in &self.acpi_tables {
            files.push((dir.join(format!("{}.dat", t.signature)), &t.bytes));
        }
        for (path, bytes) in &files {
            std::fs::write(path, bytes).map_err(io(path))?;
        }
        Ok(files.into_iter().map(|(p, _)| p).collect())
    }
}

/// Build the firmware of `platform` and write it into `dir` (see [`Firmware::write_to`]).
pub fn write_dir(
    platform: &Resolved,
    boot: &BootParams,
    dir: &Path,
) -> Result<Vec<PathBuf>, Error> {
    build(platform, boot)?.write_to(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use layout::{FIRMWARE_BASE, FIRMWARE_SIZE, GIB};

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn test_build_acpi_blob_holds_systab_mmap_tables() {
        let p = Platform::default();
        let fw = build(&p.resolve().unwrap(), &BootParams::example(1)).unwrap();
        assert!(fw.blob.len() as u64 <= FIRMWARE_SIZE);
        assert_eq!(u64_at(&fw.blob, 0), efi::SYSTEM_TABLE_SIGNATURE);
        let mmap = layout::FW_EFI_MMAP_OFFSET as usize;
        assert_eq!(&fw.blob[mmap..mmap + 4], &9u32.to_le_bytes());
        for t in &fw.acpi_tables {
            let off = (t.addr - FIRMWARE_BASE) as usize;
            assert_eq!(&fw.blob[off..off + t.bytes.len()], &t.bytes[..]);
        }
        assert_eq!(fw.extra_cmdline, "efi=noruntime");
        assert_eq!(fw.acpi_tables[0].signature, "RSDP");
    }

    #[test]
    fn test_build_isolated_table_is_cut_to_its_page() {
        let text = "[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\n\
                    retired_pages_count = 512\nretired_pages_table = \"isolated\"\n\
                    [[gpu]]\nmem_size = \"1G\"\n";
        let p = Platform::from_toml(text, "t").unwrap();
        let map = p.resolve().unwrap().map().clone();
        let c = &map.carve_outs[0];
        let block = c.table_block.unwrap();
        assert_eq!(c.retired_pages_table, block.end() - 4096);
        assert!(!map.ram.iter().any(|r| r.range.overlaps(&block)));
        let fw = build(&p.resolve().unwrap(), &BootParams::default()).unwrap();
        assert_eq!(fw.isolated_tables.len(), 1);
        let (addr, bytes) = &fw.isolated_tables[0];
        assert_eq!(*addr, c.retired_pages_table);
        assert_eq!(bytes.len(), 4096, "the count and 511 entries: one page");
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), 512);
        assert_eq!(
            u64::from_le_bytes(bytes[4088..].try_into().unwrap()),
            c.retired_pages[510]
        );
        let props = gpu_properties(&p.resolve().unwrap(), &map.gpus[0]);
        assert!(props.contains(&(EGM_RETIRED_PAGES_DATA_BASE, c.retired_pages_table)));
    }

    #[test]
    fn test_build_retired_pages_table_in_blob() {
        let mut p = Platform::default();
        p.sockets[0].egm.as_mut().unwrap().retired_pages =
            vec![Addr(0x80_0000_1000), Addr(0x80_0000_5000)];
        for boot in [BootMode::Acpi, BootMode::Dt] {
            p.boot = boot;
            let fw = build(&p.resolve().unwrap(), &BootParams::example(1)).unwrap();
            let off = (layout::retired_pages_table(0) - FIRMWARE_BASE) as usize;
            assert_eq!(u64_at(&fw.blob, off), 2);
            assert_eq!(u64_at(&fw.blob, off + 8), 0x80_0000_1000);
            assert_eq!(u64_at(&fw.blob, off + 16), 0x80_0000_5000);
            assert!(fw.blob.len() >= off + 4096, "a whole zeroed page at least");
            assert!(fw.blob[off + 24..off + 4096].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn test_build_dt_without_carve_out_has_empty_blob() {
        let mut p = Platform::minimal();
        p.boot = BootMode::Dt;
        let fw = build(&p.resolve().unwrap(), &BootParams::example(1)).unwrap();
        assert!(fw.blob.is_empty());
        assert!(fw.acpi_tables.is_empty());
        assert_eq!(fw.extra_cmdline, "");
    }

    #[test]
    fn test_resolve_rejects_invalid_description() {
        let mut p = Platform::default();
        p.sockets[0].egm.as_mut().unwrap().size = Size(GIB / 2);
        let e = p.resolve().unwrap_err();
        assert!(e.contains("multiples of 1G"), "{e}");
    }

    #[test]
    fn test_build_does_not_repeat_noruntime() {
        let mut b = BootParams::example(1);
        b.cmdline = "console=ttyAMA0 efi=noruntime".into();
        let fw = build(&Platform::default().resolve().unwrap(), &b).unwrap();
        assert_eq!(fw.extra_cmdline, "");
    }

    #[test]
    fn test_gpu_properties_shared_egm_and_fault_knobs() {
        let mut p = Platform::default();
        let mut second = Gpu::new(GpuModel::Gb200, 0, GIB);
        second.omit_properties = vec![description::EGM_PXM.into()];
        second.zero_properties = vec![description::GPU_MEM_SIZE.into()];
        p.gpus.push(second);
        let mut third = Gpu::new(GpuModel::Gb200, 0, GIB);
        third.retired_pages_base = Some(Addr(0));
        p.gpus.push(third);
        let r = p.resolve().unwrap();
        let map = r.map();
        let props: Vec<_> = map.gpus.iter().map(|g| gpu_properties(&r, g)).collect();
        assert_eq!(props[0].len(), 6);
        let get = |i: usize, n: &str| props[i].iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(
            get(0, EGM_BASE_PA),
            get(1, EGM_BASE_PA),
            "GB200s share the EGM"
        );
        assert_eq!(get(0, EGM_PXM), Some(4));
        assert_eq!(get(1, EGM_PXM), None);
        assert_eq!(get(1, GPU_MEM_SIZE), Some(0));
        assert_eq!(get(2, EGM_RETIRED_PAGES_DATA_BASE), Some(0));
        assert_eq!(
            get(0, EGM_RETIRED_PAGES_DATA_BASE),
            Some(layout::retired_pages_table(0))
        );
    }

    #[test]
    fn test_gpu_without_carve_out_has_only_memory_properties() {
        let mut p = Platform::minimal();
        p.gpus.push(Gpu::new(GpuModel::Gh200, 0, GIB));
        let map = p.resolve().unwrap().map().clone();
        let props = gpu_properties(&p.resolve().unwrap(), &map.gpus[0]);
        let names: Vec<&str> = props.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [GPU_MEM_BASE_PA, GPU_MEM_SIZE]);
    }

    #[test]
    fn test_write_to_names_files_by_signature() {
        let dir = std::env::temp_dir().join(format!("gracevm-fw-unit-{}", std::process::id()));
        let files = write_dir(
            &Platform::default().resolve().unwrap(),
            &BootParams::example(1),
            &dir,
        )
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for n in [
            "gracevm.dtb",
            "RSDP.dat",
            "FACP.dat",
            "DSDT.dat",
            "APIC.dat",
            "SRAT.dat",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
