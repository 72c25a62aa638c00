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

/// The kernel's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and reads no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

/// `[phys, phys + len)` of guest physical memory, mapped through /dev/mem (the enclosing
/// pages): byte 0 of the mapping is `phys`.
pub fn map(phys: u64, len: usize, access: Access) -> Result<Mapping, String> {
    map_file(DEV_MEM, phys, len, access)
}

/// `len` bytes of the file `path` from byte `phys` (/dev/mem, or a plain file in tests).
fn map_file(path: &str, phys: u64, len: usize, access: Access) -> Result<Mapping, String> {
    let what = || format!("{path} [{phys:#x}, +{len:#x})");
    let file = OpenOptions::new()
        .read(true)
        .write(access == Access::ReadWrite)
        .custom_flags(libc::O_SYNC)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    Mapping::window(file.as_fd(), phys, len, access).map_err(|e| format!("{}: {e}", what()))
}

/// The first u64 of `map` (from byte `from`, for `len` bytes) that differs from
/// `expected(offset)`, as `(offset, found)`, and how many differ.
pub fn compare_u64(
    map: &Mapping,
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
            let map = map_file(&path, phys, 0x40, Access::ReadWrite).unwrap();
            assert_eq!(map.file_offset(), phys);
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
        let rw = map_file(&path, 0, 16, Access::ReadWrite).unwrap();
        let ro = map_file(&path, 0, 16, Access::Read).unwrap();
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
        assert!(map_file(&path, 0, 0, Access::Read).is_err());
        assert!(map_file("/nonexistent/mem", 0, 8, Access::Read).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
