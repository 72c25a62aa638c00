//! The suite's one memory mapping type: a device file mapped from an offset (a VFIO region
//! through the device fd, `/dev/egmN` with the caller's raw offset and sharing, guest physical
//! memory through `/dev/mem`), or an inaccessible anonymous range, with bounds-checked aligned
//! volatile u32/u64 accesses. Every `mmap`, `mremap` and `munmap` of the suite is here.
//!
//! The file offset is the caller's and is passed to `mmap` as it is (page alignment, bounds
//! and offset encoding are the driver's to check), and a refused `mmap` comes back as the
//! `io::Error` so a test can compare its errno.

use std::os::fd::{AsRawFd, BorrowedFd};

pub use crate::devmem::Access;

/// `mmap` sharing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    Private,
}

/// `len` bytes of a mapping, from `lead` bytes into it; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    /// What mmap returned, and its length.
    base: *mut u8,
    map_len: usize,
    /// Bytes from `base` to byte 0 of this mapping (a /dev/mem window that starts mid-page).
    lead: usize,
    len: usize,
    /// File offset of byte 0.
    offset: u64,
    /// `None`: PROT_NONE, no access at all.
    access: Option<Access>,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from file offset `offset`, `MAP_SHARED`. The error is `mmap`'s
    /// own (its errno is what the driver returned), or `EINVAL` for an offset beyond `off_t`
    /// or a 0 length.
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
        let base = map(Some(fd), file_offset, len, prot, libc::MAP_SHARED)?;
        Ok(Mapping::whole(base, len, offset, Some(access)))
    }

    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, sharing, fd, offset)` with the offset passed
    /// bit for bit (`off_t` is 64-bit here; an offset beyond it reaches the kernel as the
    /// negative `off_t` it is), so the driver and the mm core see what the test chose; `Err` is
    /// mmap's errno.
    pub fn raw(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        sharing: Sharing,
    ) -> std::io::Result<Mapping> {
        let flags = match sharing {
            Sharing::Shared => libc::MAP_SHARED,
            Sharing::Private => libc::MAP_PRIVATE,
        };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let base = map(Some(fd), offset as libc::off_t, len, prot, flags)?;
        Ok(Mapping::whole(base, len, offset, Some(Access::ReadWrite)))
    }

    /// `len` bytes of fresh anonymous `PROT_NONE` memory: a user pointer the kernel cannot
    /// read ([`Mapping::addr`]). Any access through it panics.
    pub fn inaccessible(len: usize) -> std::io::Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let base = map(None, 0, len, libc::PROT_NONE, flags)?;
        Ok(Mapping::whole(base, len, 0, None))
    }

    /// `len` bytes of fresh anonymous read-write memory, locked in RAM (its frames stay where
    /// they are, so their physical address can be handed to the VMM).
    pub fn locked(len: usize) -> std::io::Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let base = map(None, 0, len, libc::PROT_READ | libc::PROT_WRITE, flags)?;
        let mapping = Mapping::whole(base, len, 0, Some(Access::ReadWrite));
        // SAFETY: mlock reads no memory; base/len are the live mapping just made.
        if unsafe { libc::mlock(base.cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(mapping)
    }

    /// `[offset, offset + len)` of the file opened as `fd`, mapped from the enclosing pages
    /// (`offset` need not be page aligned): byte 0 is at `offset`.
    pub(crate) fn window(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        access: Access,
    ) -> Result<Mapping, String> {
        if len == 0 {
            return Err("empty mapping".into());
        }
        let page = crate::devmem::page_size() as u64;
        let start = offset & !(page - 1);
        let lead = (offset - start) as usize;
        let map_len = (lead as u64)
            .checked_add(len as u64)
            .and_then(|n| n.checked_add(page - 1))
            .map(|n| n & !(page - 1))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or("length overflows")?;
        if libc::off_t::try_from(start).is_err() {
            return Err("address beyond off_t".into());
        }
        let mut map = Mapping::new(fd, start, map_len, access).map_err(|e| format!("mmap: {e}"))?;
        map.lead = lead;
        map.len = len;
        map.offset = offset;
        Ok(map)
    }

    fn whole(base: *mut u8, len: usize, offset: u64, access: Option<Access>) -> Mapping {
        Mapping {
            base,
            map_len: len,
            lead: 0,
            len,
            offset,
            access,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file offset of byte 0 (for a /dev/mem mapping: its guest physical address).
    pub fn file_offset(&self) -> u64 {
        self.offset
    }

    /// The virtual address of byte 0.
    pub fn addr(&self) -> usize {
        self.base as usize + self.lead
    }

    /// Pointer to `offset`, after checking an aligned `size`-byte access fits (mmap returns
    /// page-aligned addresses, so with the lead an aligned offset is an aligned address).
    fn at(&self, offset: usize, size: usize, write: bool) -> *mut u8 {
        assert!(
            offset % size == 0 && (self.lead + offset) % size == 0,
            "unaligned {size}-byte access at mapping offset {offset:#x}"
        );
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "{size}-byte access at offset {offset:#x} beyond the {:#x}-byte mapping",
            self.len
        );
        assert!(self.access.is_some(), "access to an inaccessible mapping");
        assert!(
            !write || self.access == Some(Access::ReadWrite),
            "write to a read-only mapping"
        );
        // SAFETY: lead + offset + size <= lead + len <= map_len (checked above), so the
        // pointer stays inside the mapping.
        unsafe { self.base.add(self.lead + offset) }
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

    /// Copies `bytes` to byte `offset` (any alignment).
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset
                .checked_add(bytes.len())
                .is_some_and(|end| end <= self.len),
            "{}-byte copy at offset {offset:#x} beyond the {:#x}-byte mapping",
            bytes.len(),
            self.len
        );
        assert!(
            self.access == Some(Access::ReadWrite),
            "write to a mapping that is not writable"
        );
        // SAFETY: the destination is inside the writable mapping (checked above), which no
        // Rust reference points into, and cannot overlap `bytes` (a Rust slice elsewhere).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.add(self.lead + offset),
                bytes.len(),
            );
        }
    }

    /// The two u64 at byte `offset` (16-byte aligned) in one load-pair instruction: an access
    /// that gives the hypervisor no instruction syndrome when it traps (MMIO), so the VMM must
    /// report a guest fault. Elsewhere than aarch64, two loads.
    pub fn read_pair(&self, offset: usize) -> (u64, u64) {
        let ptr = self.at(offset, 16, false).cast::<u64>();
        #[cfg(target_arch = "aarch64")]
        {
            let (a, b): (u64, u64);
            // SAFETY: 16 bytes in bounds and aligned (checked by `at`), in a mapping that lives
            // as long as self; ldp only reads them.
            unsafe {
                std::arch::asm!("ldp {a}, {b}, [{p}]", p = in(reg) ptr, a = out(reg) a,
                    b = out(reg) b, options(nostack, readonly));
            }
            (a, b)
        }
        #[cfg(not(target_arch = "aarch64"))]
        // SAFETY: as above; two volatile loads.
        unsafe {
            (ptr.read_volatile(), ptr.add(1).read_volatile())
        }
    }

    /// `mremap` to `new_len` (`may_move`: MREMAP_MAYMOVE); on success the mapping is the new
    /// one.
    pub fn remap(&mut self, new_len: usize, may_move: bool) -> std::io::Result<()> {
        let flags = if may_move { libc::MREMAP_MAYMOVE } else { 0 };
        let new_map_len = new_len
            .checked_add(self.lead)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: base/map_len are a live mapping of ours; on success the old range is
        // replaced by the returned one, which we then own; on failure nothing changes.
        let ptr = unsafe { libc::mremap(self.base.cast(), self.map_len, new_map_len, flags) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        self.base = ptr.cast();
        self.map_len = new_map_len;
        self.len = new_len;
        Ok(())
    }
}

/// The one `mmap` call: a fresh mapping placed by the kernel.
fn map(
    fd: Option<BorrowedFd<'_>>,
    offset: libc::off_t,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
) -> std::io::Result<*mut u8> {
    let fd = fd.map_or(-1, |fd| fd.as_raw_fd());
    // SAFETY: no address hint, so the kernel places the mapping where nothing of ours lives: it
    // aliases no Rust object. A file descriptor is one the caller holds open for the call; the
    // mapping may outlive it, as mmap(2) allows.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
    if ptr == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ptr.cast())
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are exactly the live mapping, unmapped only here.
        unsafe {
            libc::munmap(self.base.cast(), self.map_len);
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

    #[test]
    fn test_raw_private_writes_stay_private_shared_reach_file() {
        let page = crate::devmem::page_size();
        let (path, file) = scratch("raw", 2 * page);
        {
            let shared = Mapping::raw(file.as_fd(), page as u64, page, Sharing::Shared).unwrap();
            let private = Mapping::raw(file.as_fd(), 0, page, Sharing::Private).unwrap();
            shared.write_u64(8, 0x5eed);
            private.write_u64(0, 0xc0ff);
            assert_eq!(private.read_u64(0), 0xc0ff);
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            u64::from_ne_bytes(bytes[page + 8..page + 16].try_into().unwrap()),
            0x5eed
        );
        assert_eq!(u64::from_ne_bytes(bytes[..8].try_into().unwrap()), 0);
        let beyond = Mapping::raw(file.as_fd(), 3, page, Sharing::Shared);
        assert_eq!(beyond.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn test_remap_grows_in_place_or_refuses_inaccessible_panics() {
        let page = crate::devmem::page_size();
        let (path, file) = scratch("remap", 2 * page);
        let mut map = Mapping::raw(file.as_fd(), 0, page, Sharing::Shared).unwrap();
        map.write_u64(0, 7);
        map.remap(2 * page, true).unwrap();
        assert_eq!((map.len(), map.read_u64(0)), (2 * page, 7));
        map.write_u64(page, 8);
        let none = Mapping::inaccessible(page).unwrap();
        assert_ne!(none.addr(), 0);
        let panics =
            |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
        assert!(panics(&|| {
            none.read_u64(0);
        }));
        std::fs::remove_file(path).unwrap();
    }
}
