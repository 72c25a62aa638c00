//! The VFIO userspace API (legacy container/group flavour), as much as the GPU tests need:
//! a container on `/dev/vfio/vfio` set to the no-IOMMU backend, a group
//! (`/dev/vfio/noiommu-N`), a device fd from the group, device and region info with the
//! capability chain, and windows of a region mapped through the device fd.
//!
//! The structures and constants are rust-vmm's `vfio-bindings` (bindgen output of
//! `include/uapi/linux/vfio.h`, with the layout asserted for the target). The header builds
//! every ioctl number with `_IO(VFIO_TYPE, VFIO_BASE + n)`, a macro bindgen cannot translate:
//! the numbers are declared here with vmm-sys-util's `ioctl_io_nr!` (`_IO`) from the crate's
//! `VFIO_TYPE` and `VFIO_BASE`, as rust-vmm's `vfio-ioctls` does. No size or direction is
//! encoded: the structures carry their own `argsz`. (`vfio-ioctls`, the safe layer over them,
//! does not fit: its container accepts only the Type1 IOMMU backends, not no-IOMMU, its
//! groups are `/dev/vfio/N` only, it runs the whole open sequence itself where the tests judge
//! each step, and its ioctl numbers are private.)
//!
//! The capability chain of an INFO ioctl: when the reply sets `..._FLAG_CAPS`, `cap_offset`
//! is the byte offset (from the start of the INFO buffer) of the first
//! `vfio_info_cap_header { u16 id; u16 version; u32 next; }`, and each `next` is the offset of
//! the following one (0 ends the chain). A buffer too small for the chain comes back with the
//! flag set, `cap_offset` 0 and `argsz` raised to the size needed: [`Device::region_info`]
//! then asks again with that size.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::mem::offset_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// The whole of `vfio.h` as bound by the crate; the short names below are the ones the suite
/// uses.
pub use vfio_bindings::bindings::vfio as uapi;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_info_cap_header, vfio_region_info,
    vfio_region_info_cap_sparse_mmap, vfio_region_sparse_mmap_area,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

use crate::devmem::Access;
use crate::mapping::Mapping;

/// The container node.
pub const CONTAINER_PATH: &str = "/dev/vfio/vfio";

/// `VFIO_API_VERSION`: what `VFIO_GET_API_VERSION` returns.
pub const API_VERSION: u32 = uapi::VFIO_API_VERSION;
/// `VFIO_NOIOMMU_IOMMU`: the IOMMU backend of no-IOMMU groups (`VFIO_CHECK_EXTENSION`,
/// `VFIO_SET_IOMMU` argument).
pub const NOIOMMU_IOMMU: u32 = uapi::VFIO_NOIOMMU_IOMMU;

/// `VFIO_TYPE` (`';'`), the ioctl type of every VFIO request, widened for `ioctl_io_nr!`.
const VFIO_TYPE: u32 = uapi::VFIO_TYPE as u32;
/// `VFIO_BASE` (100), the number of the first VFIO request.
const VFIO_BASE: u32 = uapi::VFIO_BASE;

// On the container: no argument, returns API_VERSION.
ioctl_io_nr!(GET_API_VERSION, VFIO_TYPE, VFIO_BASE);
// On the container: the extension (an IOMMU type) by value; returns 1 when supported.
ioctl_io_nr!(CHECK_EXTENSION, VFIO_TYPE, VFIO_BASE + 1);
// On the container once a group is attached: the IOMMU type by value.
ioctl_io_nr!(SET_IOMMU, VFIO_TYPE, VFIO_BASE + 2);
// On a group: `struct vfio_group_status *` with `argsz` set.
ioctl_io_nr!(GROUP_GET_STATUS, VFIO_TYPE, VFIO_BASE + 3);
// On a group: `__s32 *` pointing at the container fd.
ioctl_io_nr!(GROUP_SET_CONTAINER, VFIO_TYPE, VFIO_BASE + 4);
// On a group: no argument; every device fd must be closed first.
ioctl_io_nr!(GROUP_UNSET_CONTAINER, VFIO_TYPE, VFIO_BASE + 5);
// On a group with a container set: `char *`, the device's name (a PCI device's BDF,
// `0000:00:01.0`), NUL-terminated; returns a new device fd.
ioctl_io_nr!(GROUP_GET_DEVICE_FD, VFIO_TYPE, VFIO_BASE + 6);
// On a device: `struct vfio_device_info *` with `argsz` set.
ioctl_io_nr!(DEVICE_GET_INFO, VFIO_TYPE, VFIO_BASE + 7);
// On a device: `struct vfio_region_info *` with `argsz` and `index` set, followed by room for
// the capability chain.
ioctl_io_nr!(DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);

pub const GROUP_FLAGS_VIABLE: u32 = uapi::VFIO_GROUP_FLAGS_VIABLE;
/// A vfio-pci device (fixed region indexes below).
pub const DEVICE_FLAGS_PCI: u32 = uapi::VFIO_DEVICE_FLAGS_PCI;

pub const REGION_FLAG_READ: u32 = uapi::VFIO_REGION_INFO_FLAG_READ;
pub const REGION_FLAG_WRITE: u32 = uapi::VFIO_REGION_INFO_FLAG_WRITE;
pub const REGION_FLAG_MMAP: u32 = uapi::VFIO_REGION_INFO_FLAG_MMAP;
/// The reply has a capability chain.
pub const REGION_FLAG_CAPS: u32 = uapi::VFIO_REGION_INFO_FLAG_CAPS;

/// The only parts of the region that may be mapped (`vfio_info_cap_header.id` is a `__u16`;
/// bindgen types the `#define` as `u32`).
pub const CAP_SPARSE_MMAP: u16 = uapi::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
/// A device-specific region's type and subtype.
pub const CAP_TYPE: u16 = uapi::VFIO_REGION_INFO_CAP_TYPE as u16;

/// vfio-pci's fixed region indexes (BARs 0..5, ROM, config space, VGA).
pub const PCI_CONFIG_REGION_INDEX: u32 = uapi::VFIO_PCI_CONFIG_REGION_INDEX;
pub const PCI_NUM_REGIONS: u32 = uapi::VFIO_PCI_NUM_REGIONS;
/// vfio-pci places region `i` at device-fd offset `i << 40` (`VFIO_PCI_OFFSET_SHIFT`). Kept
/// here: it is a kernel-internal convention (`drivers/vfio/pci/vfio_pci_priv.h`), not uAPI,
/// so no binding has it; REGION_INFO's `offset` is the authority.
pub const PCI_OFFSET_SHIFT: u32 = 40;

/// `struct vfio_region_sparse_mmap_area { __aligned_u64 offset, size; }` (offset from the
/// start of the region).
pub type SparseArea = vfio_region_sparse_mmap_area;

/// Where the areas of a `struct vfio_region_info_cap_sparse_mmap` start in the capability's
/// body (after its `vfio_info_cap_header`: `nr_areas`, `reserved`, then `areas[]`).
const SPARSE_AREAS_AT: usize = offset_of!(vfio_region_info_cap_sparse_mmap, areas)
    - std::mem::size_of::<vfio_info_cap_header>();

/// A failed VFIO operation: what was attempted and the OS error.
#[derive(Debug)]
pub struct Error {
    what: String,
    source: std::io::Error,
}

impl Error {
    fn new(what: impl Into<String>, source: std::io::Error) -> Error {
        Error {
            what: what.into(),
            source,
        }
    }

    /// The errno, when the failure was the kernel's.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Error {}

impl From<Error> for String {
    fn from(error: Error) -> String {
        error.to_string()
    }
}

/// `ioctl(fd, request, arg)` with an integer (or no) argument; the return value or the errno.
fn ioctl_value(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    arg: libc::c_ulong,
) -> std::io::Result<i32> {
    // SAFETY: every request passed here takes its argument by value (or ignores it), so the
    // kernel dereferences no pointer of ours.
    let ret = unsafe { ioctl_with_val(fd, request, arg) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, request, ptr)` where the kernel reads and writes at most `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` must be valid for reads and writes of `len` bytes for the duration of the call, and
/// `request` must be one whose argument is such a buffer of at most `len` bytes (for VFIO INFO
/// ioctls: the buffer's `argsz` field is at most `len`).
unsafe fn ioctl_ptr(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    ptr: *mut libc::c_void,
) -> std::io::Result<i32> {
    // SAFETY: the caller guarantees `ptr` is a live buffer of the size the request uses.
    let ret = unsafe { ioctl_with_mut_ptr(fd, request, ptr) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A VFIO container (`/dev/vfio/vfio`).
#[derive(Debug)]
pub struct Container {
    file: File,
}

impl Container {
    /// Opens the container and checks the API version.
    pub fn open() -> Result<Container, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTAINER_PATH)
            .map_err(|e| Error::new(format!("open {CONTAINER_PATH}"), e))?;
        let container = Container { file };
        let version = ioctl_value(&container.file, GET_API_VERSION(), 0)
            .map_err(|e| Error::new("VFIO_GET_API_VERSION", e))?;
        if u32::try_from(version) != Ok(API_VERSION) {
            return Err(Error::new(
                format!("VFIO_GET_API_VERSION returned {version}, expected {API_VERSION}"),
                std::io::Error::from_raw_os_error(libc::EPROTO),
            ));
        }
        Ok(container)
    }

    /// Whether the container supports `extension` (`VFIO_CHECK_EXTENSION`).
    pub fn check_extension(&self, extension: u32) -> Result<bool, Error> {
        ioctl_value(&self.file, CHECK_EXTENSION(), extension.into())
            .map(|ret| ret > 0)
            .map_err(|e| Error::new(format!("VFIO_CHECK_EXTENSION({extension})"), e))
    }

    /// Selects the IOMMU backend (`VFIO_SET_IOMMU`); needs an attached group.
    pub fn set_iommu(&self, iommu: u32) -> Result<(), Error> {
        ioctl_value(&self.file, SET_IOMMU(), iommu.into())
            .map(drop)
            .map_err(|e| Error::new(format!("VFIO_SET_IOMMU({iommu})"), e))
    }
}

/// A VFIO group (`/dev/vfio/N` or `/dev/vfio/noiommu-N`).
#[derive(Debug)]
pub struct Group {
    file: File,
    path: String,
}

impl Group {
    /// The node of no-IOMMU group `group` (the number of its iommu_group in sysfs).
    pub fn noiommu_path(group: u32) -> String {
        format!("/dev/vfio/noiommu-{group}")
    }

    pub fn open(path: &str) -> Result<Group, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::new(format!("open {path}"), e))?;
        Ok(Group {
            file,
            path: path.to_string(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// `VFIO_GROUP_GET_STATUS` flags.
    pub fn status(&self) -> Result<u32, Error> {
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: `status` is a live vfio_group_status whose argsz is its own size.
        unsafe {
            ioctl_ptr(
                &self.file,
                GROUP_GET_STATUS(),
                std::ptr::from_mut(&mut status).cast(),
            )
        }
        .map_err(|e| Error::new(format!("VFIO_GROUP_GET_STATUS on {}", self.path), e))?;
        Ok(status.flags)
    }

    /// Attaches the group to `container` (`VFIO_GROUP_SET_CONTAINER`).
    pub fn set_container(&self, container: &Container) -> Result<(), Error> {
        let mut fd: i32 = container.file.as_raw_fd();
        // SAFETY: the argument is a live __s32 holding the container fd; the kernel reads 4
        // bytes.
        unsafe {
            ioctl_ptr(
                &self.file,
                GROUP_SET_CONTAINER(),
                std::ptr::from_mut(&mut fd).cast(),
            )
        }
        .map(drop)
        .map_err(|e| Error::new(format!("VFIO_GROUP_SET_CONTAINER on {}", self.path), e))
    }

    /// A device fd for `name` (a PCI BDF) (`VFIO_GROUP_GET_DEVICE_FD`).
    pub fn device(&self, name: &str) -> Result<Device, Error> {
        let what = || format!("VFIO_GROUP_GET_DEVICE_FD({name:?}) on {}", self.path);
        let cname = CString::new(name)
            .map_err(|_| Error::new(what(), std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: the argument is a NUL-terminated string that lives across the call; the
        // kernel only reads it (strndup_user up to the NUL).
        let fd = unsafe {
            ioctl_ptr(
                &self.file,
                GROUP_GET_DEVICE_FD(),
                cname.as_ptr().cast_mut().cast(),
            )
        }
        .map_err(|e| Error::new(what(), e))?;
        // SAFETY: on success the ioctl returns a new file descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Device {
            file: File::from(owned),
            name: name.to_string(),
        })
    }
}

/// What `VFIO_DEVICE_GET_INFO` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// One capability of an INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub id: u16,
    pub version: u16,
    /// Offset of its header in the INFO buffer.
    pub offset: usize,
    /// The bytes after the 8-byte header: up to the next capability when that one follows
    /// it, else to the end of the buffer.
    pub body: Vec<u8>,
}

/// What `VFIO_DEVICE_GET_REGION_INFO` says about one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// Where the region starts in the device fd (for `pread`/`pwrite`/`mmap`).
    pub offset: u64,
    pub caps: Vec<Capability>,
}

impl RegionInfo {
    /// Decodes a whole REGION_INFO reply (`vfio_region_info` then the chain it points to).
    /// A reply flagging a chain without delivering it (`cap_offset` 0) is an error: the
    /// caller did not give the kernel room for it.
    pub fn parse(buf: &[u8]) -> Result<RegionInfo, String> {
        let header = std::mem::size_of::<vfio_region_info>();
        if buf.len() < header {
            return Err(format!(
                "region info of {} bytes, shorter than the {header}-byte vfio_region_info",
                buf.len()
            ));
        }
        let flags = u32_at(buf, offset_of!(vfio_region_info, flags));
        let cap_offset = u32_at(buf, offset_of!(vfio_region_info, cap_offset));
        let caps = if flags & REGION_FLAG_CAPS == 0 {
            Vec::new()
        } else if cap_offset == 0 {
            return Err(format!(
                "region info flags a capability chain but cap_offset is 0 (argsz {} too small)",
                u32_at(buf, offset_of!(vfio_region_info, argsz))
            ));
        } else {
            parse_capability_chain(buf, cap_offset, header)?
        };
        Ok(RegionInfo {
            index: u32_at(buf, offset_of!(vfio_region_info, index)),
            flags,
            size: u64_at(buf, offset_of!(vfio_region_info, size)),
            offset: u64_at(buf, offset_of!(vfio_region_info, offset)),
            caps,
        })
    }

    pub fn capability(&self, id: u16) -> Option<&Capability> {
        self.caps.iter().find(|cap| cap.id == id)
    }

    /// The sparse-mmap areas: `None` without that capability, `Err` when it is malformed.
    pub fn sparse_areas(&self) -> Option<Result<Vec<SparseArea>, String>> {
        self.capability(CAP_SPARSE_MMAP).map(parse_sparse_mmap)
    }

    pub fn mmappable(&self) -> bool {
        self.flags & REGION_FLAG_MMAP != 0
    }

    /// The flags as `READ|WRITE|MMAP|CAPS`.
    pub fn flags_text(&self) -> String {
        flags_text(self.flags)
    }
}

/// `READ|WRITE|MMAP|CAPS` (and any unknown bits in hex) for region flags; `0` for none.
pub fn flags_text(flags: u32) -> String {
    let names = [
        (REGION_FLAG_READ, "READ"),
        (REGION_FLAG_WRITE, "WRITE"),
        (REGION_FLAG_MMAP, "MMAP"),
        (REGION_FLAG_CAPS, "CAPS"),
    ];
    let mut parts: Vec<String> = names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| name.to_string())
        .collect();
    let known = names.iter().fold(0, |all, (bit, _)| all | bit);
    if flags & !known != 0 {
        parts.push(format!("{:#x}", flags & !known));
    }
    if parts.is_empty() {
        "0".to_string()
    } else {
        parts.join("|")
    }
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes(buf[at..at + 2].try_into().expect("2 bytes"))
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Walks the capability chain of an INFO reply `buf` from `first` (the reply's
/// `cap_offset`; 0 is an empty chain). Every header must lie inside `buf`, at or after
/// `min_offset` (the end of the fixed INFO structure), 4-byte aligned, and no header may be
/// visited twice.
pub fn parse_capability_chain(
    buf: &[u8],
    first: u32,
    min_offset: usize,
) -> Result<Vec<Capability>, String> {
    let header = std::mem::size_of::<vfio_info_cap_header>();
    let mut caps = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut at = first as usize;
    while at != 0 {
        if at < min_offset {
            return Err(format!(
                "capability at {at:#x} overlaps the {min_offset}-byte info structure"
            ));
        }
        if at % 4 != 0 {
            return Err(format!("capability at {at:#x} is not 4-byte aligned"));
        }
        if at.checked_add(header).is_none_or(|end| end > buf.len()) {
            return Err(format!(
                "capability at {at:#x} runs past the {}-byte info buffer",
                buf.len()
            ));
        }
        if !seen.insert(at) {
            return Err(format!("capability chain loops back to {at:#x}"));
        }
        let next = u32_at(buf, at + offset_of!(vfio_info_cap_header, next)) as usize;
        let end = if next > at {
            next.min(buf.len())
        } else {
            buf.len()
        };
        caps.push(Capability {
            id: u16_at(buf, at + offset_of!(vfio_info_cap_header, id)),
            version: u16_at(buf, at + offset_of!(vfio_info_cap_header, version)),
            offset: at,
            body: buf[at + header..end].to_vec(),
        });
        at = next;
    }
    Ok(caps)
}

/// The areas of a `VFIO_REGION_INFO_CAP_SPARSE_MMAP` capability (version 1).
pub fn parse_sparse_mmap(cap: &Capability) -> Result<Vec<SparseArea>, String> {
    if cap.id != CAP_SPARSE_MMAP {
        return Err(format!(
            "capability {} is not SPARSE_MMAP ({CAP_SPARSE_MMAP})",
            cap.id
        ));
    }
    if cap.version != 1 {
        return Err(format!("SPARSE_MMAP version {}, expected 1", cap.version));
    }
    if cap.body.len() < SPARSE_AREAS_AT {
        return Err(format!(
            "SPARSE_MMAP body of {} bytes, no room for nr_areas",
            cap.body.len()
        ));
    }
    let count = u32_at(&cap.body, 0) as usize;
    let area = std::mem::size_of::<SparseArea>();
    let needed = count
        .checked_mul(area)
        .and_then(|n| n.checked_add(SPARSE_AREAS_AT));
    if needed.is_none_or(|n| n > cap.body.len()) {
        return Err(format!(
            "SPARSE_MMAP claims {count} areas but its body has {} bytes",
            cap.body.len()
        ));
    }
    Ok((0..count)
        .map(|i| {
            let at = SPARSE_AREAS_AT + i * area;
            SparseArea {
                offset: u64_at(&cap.body, at),
                size: u64_at(&cap.body, at + 8),
            }
        })
        .collect())
}

/// A VFIO device fd.
#[derive(Debug)]
pub struct Device {
    file: File,
    name: String,
}

/// How many times [`Device::region_info`] grows its buffer for the chain before giving up.
const REGION_INFO_TRIES: usize = 4;

impl Device {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `VFIO_DEVICE_GET_INFO` (the fixed part; device capabilities are not decoded).
    pub fn info(&self) -> Result<DeviceInfo, Error> {
        let mut raw = vfio_device_info {
            argsz: std::mem::size_of::<vfio_device_info>() as u32,
            ..Default::default()
        };
        // SAFETY: `raw` is a live vfio_device_info whose argsz is its own size, so the kernel
        // writes no capability past it.
        unsafe {
            ioctl_ptr(
                &self.file,
                DEVICE_GET_INFO(),
                std::ptr::from_mut(&mut raw).cast(),
            )
        }
        .map_err(|e| Error::new(format!("VFIO_DEVICE_GET_INFO on {}", self.name), e))?;
        Ok(DeviceInfo {
            flags: raw.flags,
            num_regions: raw.num_regions,
            num_irqs: raw.num_irqs,
        })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`, with its capability chain (asking
    /// again with the `argsz` the kernel wants when the first buffer is too small).
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Error> {
        let what = || format!("VFIO_DEVICE_GET_REGION_INFO({index}) on {}", self.name);
        let mut argsz = std::mem::size_of::<vfio_region_info>();
        for _ in 0..REGION_INFO_TRIES {
            // u64 words keep the buffer 8-byte aligned, as vfio_region_info needs.
            let mut words = vec![0u64; argsz.div_ceil(8)];
            let raw = vfio_region_info {
                argsz: argsz as u32,
                index,
                ..Default::default()
            };
            // SAFETY: `words` is at least 32 bytes and 8-byte aligned, so it holds a
            // vfio_region_info at its start.
            unsafe { words.as_mut_ptr().cast::<vfio_region_info>().write(raw) };
            // SAFETY: the buffer is `words.len() * 8 >= argsz` bytes and lives across the
            // call; the kernel writes at most argsz bytes.
            unsafe {
                ioctl_ptr(
                    &self.file,
                    DEVICE_GET_REGION_INFO(),
                    words.as_mut_ptr().cast(),
                )
            }
            .map_err(|e| Error::new(what(), e))?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let wanted = u32_at(&bytes, offset_of!(vfio_region_info, argsz)) as usize;
            let flags = u32_at(&bytes, offset_of!(vfio_region_info, flags));
            if flags & REGION_FLAG_CAPS != 0 && wanted > argsz {
                argsz = wanted;
                continue;
            }
            return RegionInfo::parse(&bytes[..argsz]).map_err(|why| {
                Error::new(
                    format!("{}: {why}", what()),
                    std::io::Error::from_raw_os_error(libc::EPROTO),
                )
            });
        }
        Err(Error::new(
            format!("{}: argsz kept growing", what()),
            std::io::Error::from_raw_os_error(libc::EPROTO),
        ))
    }

    /// Reads `buf.len()` bytes at device-fd offset `offset` (region offset + offset in it).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::new(
                format!("pread {} bytes at {offset:#x} of {}", buf.len(), self.name),
                e,
            )
        })
    }

    /// Writes `buf` at device-fd offset `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.file.write_all_at(buf, offset).map_err(|e| {
            Error::new(
                format!("pwrite {} bytes at {offset:#x} of {}", buf.len(), self.name),
                e,
            )
        })
    }

    /// The u64 at `offset_in_region` of `region`, read through the device fd.
    pub fn read_u64(&self, region: &RegionInfo, offset_in_region: u64) -> Result<u64, Error> {
        let mut buf = [0u8; 8];
        self.read_at(region.offset + offset_in_region, &mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Maps `len` bytes of `region` from `offset_in_region` (page aligned). The error keeps
    /// the driver's errno.
    pub fn map(
        &self,
        region: &RegionInfo,
        offset_in_region: u64,
        len: usize,
        access: Access,
    ) -> Result<Mapping, Error> {
        let at = region.offset.checked_add(offset_in_region).ok_or_else(|| {
            Error::new(
                "region offset overflows",
                std::io::Error::from_raw_os_error(libc::EOVERFLOW),
            )
        })?;
        Mapping::new(self.file.as_fd(), at, len, access).map_err(|e| {
            Error::new(
                format!(
                    "mmap of region {} [{offset_in_region:#x}, +{len:#x}) of {}",
                    region.index, self.name
                ),
                e,
            )
        })
    }
}

/// A device opened through a no-IOMMU group. Fields drop in order: the device fd is closed
/// before its group, the group before the container.
#[derive(Debug)]
pub struct NoIommuDevice {
    pub device: Device,
    pub group: Group,
    pub container: Container,
}

impl NoIommuDevice {
    /// Container, group `/dev/vfio/noiommu-<group>` attached to it, no-IOMMU backend, then
    /// the device fd of `name` (a BDF).
    pub fn open(group: u32, name: &str) -> Result<NoIommuDevice, Error> {
        let container = Container::open()?;
        if !container.check_extension(NOIOMMU_IOMMU)? {
            return Err(Error::new(
                "container does not offer VFIO_NOIOMMU_IOMMU (vfio.enable_unsafe_noiommu_mode \
                 off?)",
                std::io::Error::from_raw_os_error(libc::ENODEV),
            ));
        }
        let group = Group::open(&Group::noiommu_path(group))?;
        let status = group.status()?;
        if status & GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::new(
                format!(
                    "{} is not viable (flags {status:#x}): a device of the group is not bound \
                     to a vfio driver",
                    group.path()
                ),
                std::io::Error::from_raw_os_error(libc::EPERM),
            ));
        }
        group.set_container(&container)?;
        container.set_iommu(NOIOMMU_IOMMU)?;
        let device = group.device(name)?;
        Ok(NoIommuDevice {
            device,
            group,
            container,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A REGION_INFO reply: the fixed structure then `caps` (id, version, body) chained in
    /// order, each 8-byte aligned as vfio_info_cap_add places them.
    fn reply(index: u32, flags: u32, size: u64, caps: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
        let mut buf = vec![0u8; 32];
        let mut offsets = Vec::new();
        for (id, version, body) in caps {
            let at = buf.len();
            offsets.push(at);
            buf.extend_from_slice(&id.to_ne_bytes());
            buf.extend_from_slice(&version.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(body);
            buf.resize(buf.len().div_ceil(8) * 8, 0);
        }
        for pair in offsets.windows(2) {
            buf[pair[0] + 4..pair[0] + 8].copy_from_slice(&(pair[1] as u32).to_ne_bytes());
        }
        let flags = if caps.is_empty() {
            flags
        } else {
            flags | REGION_FLAG_CAPS
        };
        let len = buf.len() as u32;
        buf[0..4].copy_from_slice(&len.to_ne_bytes());
        buf[4..8].copy_from_slice(&flags.to_ne_bytes());
        buf[8..12].copy_from_slice(&index.to_ne_bytes());
        let first = offsets.first().map_or(0, |&at| at as u32);
        buf[12..16].copy_from_slice(&first.to_ne_bytes());
        buf[16..24].copy_from_slice(&size.to_ne_bytes());
        buf[24..32].copy_from_slice(&(u64::from(index) << 40).to_ne_bytes());
        buf
    }

    fn sparse_body(areas: &[(u64, u64)]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(areas.len() as u32).to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        for (offset, size) in areas {
            body.extend_from_slice(&offset.to_ne_bytes());
            body.extend_from_slice(&size.to_ne_bytes());
        }
        body
    }

    #[test]
    fn test_ioctl_numbers_match_vfio_h() {
        assert_eq!(GET_API_VERSION(), 0x3b64);
        assert_eq!(CHECK_EXTENSION(), 0x3b65);
        assert_eq!(SET_IOMMU(), 0x3b66);
        assert_eq!(GROUP_GET_STATUS(), 0x3b67);
        assert_eq!(GROUP_SET_CONTAINER(), 0x3b68);
        assert_eq!(GROUP_UNSET_CONTAINER(), 0x3b69);
        assert_eq!(GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(DEVICE_GET_INFO(), 0x3b6b);
        assert_eq!(DEVICE_GET_REGION_INFO(), 0x3b6c);
    }

    #[test]
    fn test_region_info_nvgrace_usemem_sparse_area_parsed() {
        let buf = reply(
            4,
            REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP,
            1 << 30,
            &[(CAP_SPARSE_MMAP, 1, sparse_body(&[(0, 0x3000_0000)]))],
        );
        let info = RegionInfo::parse(&buf).unwrap();
        assert_eq!(info.index, 4);
        assert_eq!(info.size, 1 << 30);
        assert_eq!(info.offset, 4 << 40);
        assert!(info.mmappable());
        assert_eq!(info.flags_text(), "READ|WRITE|MMAP|CAPS");
        assert_eq!(info.caps.len(), 1);
        assert_eq!(info.caps[0].offset, 32);
        assert_eq!(
            info.sparse_areas(),
            Some(Ok(vec![SparseArea {
                offset: 0,
                size: 0x3000_0000
            }]))
        );
    }

    #[test]
    fn test_region_info_two_caps_chained_both_found() {
        let mut type_body = Vec::new();
        type_body.extend_from_slice(&(1u32 << 31 | 0x10de).to_ne_bytes());
        type_body.extend_from_slice(&7u32.to_ne_bytes());
        let buf = reply(
            9,
            REGION_FLAG_READ,
            0x1000,
            &[
                (CAP_TYPE, 1, type_body),
                (
                    CAP_SPARSE_MMAP,
                    1,
                    sparse_body(&[(0, 0x800), (0x1000, 0x800)]),
                ),
            ],
        );
        let info = RegionInfo::parse(&buf).unwrap();
        assert_eq!(
            info.caps.iter().map(|c| c.id).collect::<Vec<_>>(),
            [CAP_TYPE, CAP_SPARSE_MMAP]
        );
        assert_eq!(info.capability(CAP_TYPE).unwrap().body.len(), 8);
        assert_eq!(info.sparse_areas().unwrap().unwrap().len(), 2);
    }

    #[test]
    fn test_region_info_without_caps_plain_bar() {
        let info = RegionInfo::parse(&reply(4, 0, 0, &[])).unwrap();
        assert_eq!(info.size, 0);
        assert!(info.caps.is_empty());
        assert_eq!(info.sparse_areas(), None);
        assert_eq!(info.flags_text(), "0");
    }

    #[test]
    fn test_region_info_caps_flag_without_offset_errors() {
        let mut buf = reply(4, REGION_FLAG_MMAP, 1 << 30, &[]);
        buf[4..8].copy_from_slice(&(REGION_FLAG_MMAP | REGION_FLAG_CAPS).to_ne_bytes());
        buf[0..4].copy_from_slice(&56u32.to_ne_bytes());
        let err = RegionInfo::parse(&buf).unwrap_err();
        assert!(err.contains("cap_offset is 0"), "{err}");
        assert!(RegionInfo::parse(&buf[..31]).is_err());
    }

    #[test]
    fn test_capability_chain_malformed_offsets_error() {
        let good = reply(
            4,
            0,
            8,
            &[
                (CAP_SPARSE_MMAP, 1, sparse_body(&[(0, 8)])),
                (CAP_TYPE, 1, vec![0; 8]),
            ],
        );
        assert_eq!(parse_capability_chain(&good, 32, 32).unwrap().len(), 2);
        assert_eq!(parse_capability_chain(&good, 0, 32).unwrap(), vec![]);
        // Inside the fixed structure, unaligned, past the end.
        assert!(parse_capability_chain(&good, 16, 32).is_err());
        assert!(parse_capability_chain(&good, 34, 32).is_err());
        assert!(parse_capability_chain(&good, good.len() as u32, 32).is_err());
        // A chain pointing back at its first header.
        let mut looped = good.clone();
        let second = u32_at(&good, 32 + 4) as usize;
        looped[second + 4..second + 8].copy_from_slice(&32u32.to_ne_bytes());
        let err = parse_capability_chain(&looped, 32, 32).unwrap_err();
        assert!(err.contains("loops"), "{err}");
        // A next pointer past the buffer.
        let mut dangling = good.clone();
        dangling[second + 4..second + 8].copy_from_slice(&4096u32.to_ne_bytes());
        assert!(parse_capability_chain(&dangling, 32, 32).is_err());
    }

    #[test]
    fn test_sparse_mmap_truncated_or_wrong_version_errors() {
        let cap = |version: u16, body: Vec<u8>| Capability {
            id: CAP_SPARSE_MMAP,
            version,
            offset: 32,
            body,
        };
        let mut short = sparse_body(&[(0, 1 << 30)]);
        short.truncate(20);
        assert!(parse_sparse_mmap(&cap(1, short))
            .unwrap_err()
            .contains("claims 1"));
        assert!(parse_sparse_mmap(&cap(2, sparse_body(&[]))).is_err());
        assert!(parse_sparse_mmap(&cap(1, vec![0; 4])).is_err());
        assert_eq!(parse_sparse_mmap(&cap(1, sparse_body(&[]))), Ok(vec![]));
        let mut huge = sparse_body(&[]);
        huge[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_sparse_mmap(&cap(1, huge)).is_err());
        let other = Capability {
            id: CAP_TYPE,
            ..cap(1, sparse_body(&[]))
        };
        assert!(parse_sparse_mmap(&other).is_err());
    }

    #[test]
    fn test_flags_text_unknown_bits_in_hex() {
        assert_eq!(flags_text(REGION_FLAG_READ | 0x100), "READ|0x100");
    }
}
