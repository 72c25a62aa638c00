//! Guest physical memory through `/dev/mem`, for tests that look at memory the kernel does not
//! own (EGM carve-outs, GPU memory) or talk to the VMM's test device.
//!
//! Mappings are opened `O_SYNC`: on arm64 that (and any address outside System RAM) makes the
//! mapping Device memory, where only naturally aligned accesses are allowed and every access
//! must be a single load or store. So this module offers only aligned volatile 32- and 64-bit
//! accesses, and checks alignment and bounds before touching the mapping.

use std::fs::OpenOptions;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::mapping::Mapping;

pub const DEV_MEM: &str = "/dev/mem";

/// How a mapping may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// `[phys, phys + len)` mapped through /dev/mem (the enclosing pages, as a [`Mapping`] of the
/// file); unmapped on drop.
#[derive(Debug)]
pub struct PhysMap {
    /// The enclosing pages.
    map: Mapping,
    /// Bytes from the start of `map` to `phys`.
    lead: usize,
    phys: u64,
    len: usize,
}

/// The kernel's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and reads no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

impl PhysMap {
    /// Maps `len` bytes of guest physical memory from `phys`.
    pub fn new(phys: u64, len: usize, access: Access) -> Result<PhysMap, String> {
        PhysMap::map_file(DEV_MEM, phys, len, access)
    }

    /// Maps `len` bytes of the file `path` from byte `phys` (/dev/mem, or a plain file in
    /// tests).
    fn map_file(path: &str, phys: u64, len: usize, access: Access) -> Result<PhysMap, String> {
        let what = || format!("{path} [{phys:#x}, +{len:#x})");
        if len == 0 {
            return Err(format!("{}: empty mapping", what()));
        }
        let page = page_size() as u64;
        let start = phys & !(page - 1);
        let lead = (phys - start) as usize;
        let map_len = (lead as u64)
            .checked_add(len as u64)
            .and_then(|n| n.checked_add(page - 1))
            .map(|n| n & !(page - 1))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("{}: length overflows", what()))?;
        if libc::off_t::try_from(start).is_err() {
            return Err(format!("{}: address beyond off_t", what()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .custom_flags(libc::O_SYNC)
            .open(path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        let map = Mapping::new(file.as_fd(), start, map_len, access)
            .map_err(|e| format!("mmap of {}: {e}", what()))?;
        Ok(PhysMap {
            map,
            lead,
            phys,
            len,
        })
    }

    /// Guest physical address of offset 0.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The offset in `map` of an aligned `size`-byte access at `offset`, after checking it is
    /// inside `[phys, phys + len)` (the mapping's own checks cover the address alignment, as
    /// its start is page aligned, and writability).
    fn at(&self, offset: usize, size: usize) -> usize {
        assert!(
            offset % size == 0,
            "unaligned {size}-byte access at {:#x}",
            self.phys + offset as u64
        );
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "access at offset {offset:#x} beyond the {:#x}-byte mapping of {:#x}",
            self.len,
            self.phys
        );
        self.lead + offset
    }

    /// The u64 at byte `offset` (8-byte aligned), one volatile load.
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.map.read_u64(self.at(offset, 8))
    }

    /// Stores `value` at byte `offset` (8-byte aligned), one volatile store.
    pub fn write_u64(&self, offset: usize, value: u64) {
        self.map.write_u64(self.at(offset, 8), value)
    }

    /// The u32 at byte `offset` (4-byte aligned), one volatile load.
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.map.read_u32(self.at(offset, 4))
    }

    /// Stores `value` at byte `offset` (4-byte aligned), one volatile store.
    pub fn write_u32(&self, offset: usize, value: u32) {
        self.map.write_u32(self.at(offset, 4), value)
    }
}

/// The first u64 of `map` (from byte `from`, for `len` bytes) that differs from
/// `expected(offset)`, as `(offset, found)`, and how many differ.
pub fn compare_u64(
    map: &PhysMap,
    from: usize,
    len: usize,
    expected: impl Fn(usize) -> u64,
) -> (Option<(usize, u64)>, usize) {
    let mut first = None;
    let mut count = 0;
    for offset in (from..from + len).step_by(8) {
        let found = map.read_u64(offset);
        if found != expected(offset) {
            count += 1;
            first.get_or_insert((offset, found));
        }
    }
    (first, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file of `pages` pages of zeros.
    fn scratch(name: &str, pages: usize) -> String {
        let path =
            std::env::temp_dir().join(format!("guest-suite-devmem-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; pages * page_size()]).unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn test_phys_map_unaligned_start_reads_and_writes_at_offset() {
        let path = scratch("rw", 3);
        let page = page_size();
        let phys = (page + 0x18) as u64;
        {
            let map = PhysMap::map_file(&path, phys, 0x40, Access::ReadWrite).unwrap();
            assert_eq!(map.phys(), phys);
            assert_eq!(map.len(), 0x40);
            map.write_u64(8, 0x1122_3344_5566_7788);
            map.write_u32(0x10, 0xdead_beef);
            assert_eq!(map.read_u64(8), 0x1122_3344_5566_7788);
            assert_eq!(map.read_u32(0xc), 0x1122_3344);
            assert_eq!(map.read_u32(0x10), 0xdead_beef);
            let (first, count) = compare_u64(&map, 0, 0x40, |_| 0);
            assert_eq!(first, Some((8, 0x1122_3344_5566_7788)));
            assert_eq!(count, 2);
        }
        let bytes = std::fs::read(&path).unwrap();
        let at = page + 0x18 + 8;
        assert_eq!(
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn test_phys_map_out_of_bounds_unaligned_readonly_write_panic() {
        let path = scratch("bounds", 1);
        let rw = PhysMap::map_file(&path, 0, 16, Access::ReadWrite).unwrap();
        let ro = PhysMap::map_file(&path, 0, 16, Access::Read).unwrap();
        let panics =
            |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
        assert!(panics(&|| {
            rw.read_u64(16);
        }));
        assert!(panics(&|| {
            rw.read_u64(4);
        }));
        assert!(panics(&|| rw.write_u32(2, 0)));
        assert!(panics(&|| ro.write_u64(0, 1)));
        assert_eq!(ro.read_u64(8), 0);
        assert!(PhysMap::map_file(&path, 0, 0, Access::Read).is_err());
        assert!(PhysMap::map_file("/nonexistent/mem", 0, 8, Access::Read).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
