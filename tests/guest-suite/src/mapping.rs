//! A shared mapping of a device file (a VFIO region through the device fd, `/dev/egmN`), with
//! bounds-checked aligned volatile u64 accesses.
//!
//! Unlike [`crate::devmem::PhysMap`] the file offset is the caller's and is passed to `mmap`
//! as it is (page alignment, bounds and offset encoding are the driver's to check), and a
//! refused `mmap` comes back as the `io::Error` so a test can compare its errno.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::devmem::Access;

/// `len` bytes of a file mapped `MAP_SHARED` from byte `offset`; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    offset: u64,
    access: Access,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from file offset `offset`. The error is `mmap`'s own (its errno
    /// is what the driver returned), or `EINVAL` for an offset beyond `off_t` or a 0 length.
    pub fn new(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        access: Access,
    ) -> std::io::Result<Mapping> {
        let einval = || std::io::Error::from_raw_os_error(libc::EINVAL);
        let file_offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
        if len == 0 {
            return Err(einval());
        }
        let prot = match access {
            Access::Read => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a fresh shared mapping placed by the kernel (no address hint) of a file the
        // caller holds open for the call; it aliases no Rust object, and the mapping may
        // outlive the descriptor, as mmap(2) allows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            offset,
            access,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file offset of byte 0.
    pub fn file_offset(&self) -> u64 {
        self.offset
    }

    /// Pointer to `offset`, after checking an aligned `size`-byte access fits (mmap returns
    /// page-aligned addresses, so an aligned offset is an aligned address).
    fn at(&self, offset: usize, size: usize, write: bool) -> *mut u8 {
        assert!(
            offset % size == 0,
            "unaligned {size}-byte access at mapping offset {offset:#x}"
        );
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "{size}-byte access at offset {offset:#x} beyond the {:#x}-byte mapping",
            self.len
        );
        assert!(
            !write || self.access == Access::ReadWrite,
            "write to a read-only mapping"
        );
        // SAFETY: offset + size <= len (checked above), so the pointer stays inside the mapping.
        unsafe { self.ptr.add(offset) }
    }

    /// The u64 at byte `offset` (8-byte aligned), one volatile load.
    pub fn read_u64(&self, offset: usize) -> u64 {
        let ptr = self.at(offset, 8, false).cast::<u64>();
        // SAFETY: in bounds and aligned (checked by `at`); the mapping lives as long as self.
        unsafe { ptr.read_volatile() }
    }

    /// Stores `value` at byte `offset` (8-byte aligned), one volatile store.
    pub fn write_u64(&self, offset: usize, value: u64) {
        let ptr = self.at(offset, 8, true).cast::<u64>();
        // SAFETY: in bounds, aligned and writable (checked by `at`); no Rust reference points
        // into the mapping.
        unsafe { ptr.write_volatile(value) }
    }

    /// The u32 at byte `offset` (4-byte aligned), one volatile load.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let ptr = self.at(offset, 4, false).cast::<u32>();
        // SAFETY: in bounds and aligned (checked by `at`); the mapping lives as long as self.
        unsafe { ptr.read_volatile() }
    }

    /// Stores `value` at byte `offset` (4-byte aligned), one volatile store.
    pub fn write_u32(&self, offset: usize, value: u32) {
        let ptr = self.at(offset, 4, true).cast::<u32>();
        // SAFETY: in bounds, aligned and writable (checked by `at`); no Rust reference points
        // into the mapping.
        unsafe { ptr.write_volatile(value) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, unmapped only here.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn scratch(name: &str, len: usize) -> (String, std::fs::File) {
        let path = std::env::temp_dir()
            .join(format!("guest-suite-mapping-{name}-{}", std::process::id()))
            .to_string_lossy()
            .into_owned();
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn test_mapping_at_offset_writes_land_in_file() {
        let page = crate::devmem::page_size();
        let (path, file) = scratch("rw", 3 * page);
        {
            let map = Mapping::new(file.as_fd(), page as u64, page, Access::ReadWrite).unwrap();
            assert_eq!(map.len(), page);
            assert_eq!(map.file_offset(), page as u64);
            map.write_u64(0x18, 0x4750_554d_0000_0018);
            assert_eq!(map.read_u64(0x18), 0x4750_554d_0000_0018);
            assert_eq!(map.read_u64(0x20), 0);
        }
        let bytes = std::fs::read(&path).unwrap();
        let at = page + 0x18;
        assert_eq!(
            u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap()),
            0x4750_554d_0000_0018
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn test_mapping_refusals_return_errno() {
        let page = crate::devmem::page_size();
        let (path, file) = scratch("errno", page);
        let errno = |offset: u64, len: usize| {
            Mapping::new(file.as_fd(), offset, len, Access::Read)
                .unwrap_err()
                .raw_os_error()
        };
        assert_eq!(errno(0, 0), Some(libc::EINVAL));
        assert_eq!(errno(3, page), Some(libc::EINVAL));
        assert_eq!(errno(u64::MAX, page), Some(libc::EINVAL));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn test_mapping_bad_accesses_panic() {
        let page = crate::devmem::page_size();
        let (path, file) = scratch("bounds", page);
        let ro = Mapping::new(file.as_fd(), 0, 16, Access::Read).unwrap();
        let panics =
            |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
        assert!(panics(&|| {
            ro.read_u64(16);
        }));
        assert!(panics(&|| {
            ro.read_u64(4);
        }));
        assert!(panics(&|| ro.write_u64(0, 1)));
        assert_eq!(ro.read_u64(8), 0);
        std::fs::remove_file(path).unwrap();
    }
}
