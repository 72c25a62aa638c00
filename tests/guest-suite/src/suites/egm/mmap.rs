//! Spec section 3, `mmap` (matrix 5.5): the whole region, its bounds, offset bits from 40 up
//! aliasing, MAP_PRIVATE, and no growth through mremap.

use std::os::fd::{AsFd, BorrowedFd};

use gracevm_contract::findings;

use crate::egm;
use crate::ktap::note;
use crate::mapping::{Mapping, Sharing};
use crate::outcome::{check, Checks, Outcome};
use crate::procfs::bytes;
use crate::registry::Context;

use super::machine::*;

/// 5.5: `mmap(len = size)` works, and words written through it land at the same offsets of
/// the carve-out as the VMM sees it; untouched memory reads 0 (zeroed by the open).
pub(super) fn mmap_whole(ctx: &Context) -> Outcome {
    let (m, regions) = check!(ready_all(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page as u64;
    let mut checks = Checks::new();
    for region in &regions {
        let file = check!(open(region));
        let Ok(size) = usize::try_from(region.size) else {
            return Outcome::fail("region size beyond usize");
        };
        let map = check!(Mapping::raw(file.as_fd(), 0, size, Sharing::Shared)
            .map_err(io_fail("5.5: mmap(len = egm size)")));
        // The region's PXM in every marker: a node wired to another region shows.
        let tag = 0x50 | (region.pxm & 0xf);
        let offsets = [0, page + 8, region.size / 2 + 0x18, region.size - 8];
        for offset in offsets {
            check!(expect_landed(
                &mut checks,
                &dev,
                &format!("5.5: egm{} offset {offset:#x}", region.pxm),
                &map,
                offset as usize,
                region.base + offset,
                marker(tag, offset)
            ));
        }
        let untouched = 2 * page;
        let seen = map.read_u64(untouched as usize);
        checks.expect(seen == 0, || {
            format!(
                "5.5: egm{}: untouched offset {untouched:#x} reads {seen:#x} through the \
                 mapping, expected 0",
                region.pxm
            )
        });
        if let Some(at) = check!(vmm_all_value(&dev, region.base + untouched, page, 0)) {
            checks.fail(format!(
                "5.5: egm{}: the VMM sees non-zero at +{:#x}, a page nothing wrote",
                region.pxm,
                untouched + at
            ));
        }
        if !checks.failed() {
            note(format!(
                "5.5: egm{}: {} mapped; writes at {} seen by the VMM at the same offsets",
                region.pxm,
                bytes(region.size),
                offsets
                    .iter()
                    .map(|o| format!("{o:#x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    checks.outcome()
}

/// 5.5: bounds. `size + page` and `(size - page, 2 pages)` and `(size, 1 page)` and
/// `((1 << 40) + size, 1 page)` are EINVAL; `(size - page, 1 page)` works and lands at the
/// region's last page; an offset that overflows is EOVERFLOW; an impossible length fails.
pub(super) fn mmap_bounds(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let size = region.size;
    let file = check!(open(&region));
    let fd = file.as_fd();
    let mut checks = Checks::new();
    let mut refused =
        |what: &str, offset: u64, len: usize, want: &[i32]| {
            let result = Mapping::raw(fd, offset, len, Sharing::Shared);
            let ok = egm::errno(&result).is_some_and(|e| want.contains(&e));
            checks.expect(ok, || {
                let extra = if result.is_ok()
                    && offset.checked_add(len as u64).is_some_and(|end| end > size)
                {
                    format!(
                        " (the mapping reaches beyond the region: [{}])",
                        findings::V1_MMAP_BOUNDS.key
                    )
                } else {
                    String::new()
                };
                format!(
                "5.5: {what} (offset {offset:#x}, len {len:#x}): expected {}, observed {}{extra}",
                want.iter().map(|&e| egm::errno_name(e)).collect::<Vec<_>>().join(" or "),
                egm::result_name(&result)
            )
            });
            // A wrongly granted mapping is dropped untouched.
        };
    let Ok(size_len) = usize::try_from(size) else {
        return Outcome::fail("region size beyond usize");
    };
    refused("len = size + page", 0, size_len + page, &[libc::EINVAL]);
    refused(
        "two pages from size - page",
        size - page as u64,
        2 * page,
        &[libc::EINVAL],
    );
    refused("one page at offset size", size, page, &[libc::EINVAL]);
    refused(
        "one page at (1 << 40) + size",
        (1 << egm::OFFSET_SHIFT) + size,
        page,
        &[libc::EINVAL],
    );
    // Bits from 40 up are discarded, bit 39 is not: a driver masking the offset lower
    // would map what 0 maps.
    refused(
        "one page at offset 1 << 39 (past the region)",
        1 << (egm::OFFSET_SHIFT - 1),
        page,
        &[libc::EINVAL],
    );
    check_mm_core(fd, page, &mut checks);
    match Mapping::raw(fd, size - page as u64, page, Sharing::Shared) {
        Ok(last) => check!(expect_landed(
            &mut checks,
            &dev,
            "5.5: (size - page, 1 page)",
            &last,
            page - 8,
            region.base + size - 8,
            marker(6, size - 8)
        )),
        Err(e) => checks.fail(format!(
            "5.5: one page at size - page: expected success, observed {e}"
        )),
    }
    checks.outcome()
}

/// 5.5, refused by the mm core before the driver's mmap runs (do_mmap: file_mmap_ok gives
/// EOVERFLOW for an offset whose end wraps, a length beyond TASK_SIZE is ENOMEM): checked so a
/// broken kernel shows, but not counted as driver checks.
fn check_mm_core(fd: BorrowedFd<'_>, page: usize, checks: &mut Checks) {
    let mut core = Vec::new();
    for (what, offset, len, want) in [
        (
            "offset overflowing the address space",
            !(page as u64 - 1),
            page,
            libc::EOVERFLOW,
        ),
        (
            "length overflowing the address space",
            0,
            !(page - 1),
            libc::ENOMEM,
        ),
    ] {
        let result = Mapping::raw(fd, offset, len, Sharing::Shared);
        core.push(format!("{what}: {}", egm::result_name(&result)));
        if result.is_ok() {
            checks.fail(format!(
                "5.5 (mm core): {what} was mapped; expected {}",
                egm::errno_name(want)
            ));
        }
    }
    note(format!(
        "5.5 refused by the mm core before the driver: {}",
        core.join("; ")
    ));
}

/// 5.5: offset bits from 40 up are discarded: `1 << 40` maps what 0 maps, `(1 << 40) + x`
/// what `x` maps (writes through one are read through the other and seen by the VMM).
pub(super) fn mmap_offset_alias(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let file = check!(open(&region));
    let fd = file.as_fd();
    let alias = 1u64 << egm::OFFSET_SHIFT;
    let mut checks = Checks::new();
    let low = check!(Mapping::raw(fd, 0, 2 * page, Sharing::Shared)
        .map_err(io_fail("5.5: mmap of 2 pages at 0")));
    let high = match Mapping::raw(fd, alias, 2 * page, Sharing::Shared) {
        Ok(map) => map,
        Err(e) => {
            return Outcome::fail(format!(
                "5.5: mmap of 2 pages at offset 1 << 40: expected success (aliases 0), \
                 observed {e}"
            ))
        }
    };
    let x = marker(7, 8);
    low.write_u64(8, x);
    let through_high = high.read_u64(8);
    checks.expect(through_high == x, || {
        format!("5.5: wrote {x:#x} at 0 + 8, offset (1 << 40) + 8 reads {through_high:#x}")
    });
    let y = marker(8, page as u64 + 16);
    high.write_u64(page + 16, y);
    let through_low = low.read_u64(page + 16);
    checks.expect(through_low == y, || {
        format!(
            "5.5: wrote {y:#x} at (1 << 40) + page + 16, offset page + 16 reads {through_low:#x}"
        )
    });
    for (gpa, value) in [(region.base + 8, x), (region.base + page as u64 + 16, y)] {
        let seen = check!(vmm_peek(&dev, gpa));
        checks.expect(seen == value, || {
            format!("5.5: the VMM sees {seen:#x} at {gpa:#x}, expected {value:#x}")
        });
    }
    let far = (3 << egm::OFFSET_SHIFT) | page as u64;
    match Mapping::raw(fd, far, page, Sharing::Shared) {
        Ok(map) => {
            let seen = map.read_u64(16);
            checks.expect(seen == y, || {
                format!("5.5: offset (3 << 40) | page + 16 reads {seen:#x}, expected {y:#x}")
            });
        }
        Err(e) => checks.fail(format!(
            "5.5: mmap at (3 << 40) | page: expected success (aliases page), observed {e}"
        )),
    }
    let top = alias + region.size - page as u64;
    match Mapping::raw(fd, top, page, Sharing::Shared) {
        Ok(map) => check!(expect_landed(
            &mut checks,
            &dev,
            "5.5: ((1 << 40) + size - page, 1 page)",
            &map,
            0,
            region.base + region.size - page as u64,
            marker(9, region.size - page as u64)
        )),
        Err(e) => checks.fail(format!(
            "5.5: one page at (1 << 40) + size - page: expected success, observed {e}"
        )),
    }
    checks.outcome()
}

/// 5.5, review point: v2 accepts MAP_PRIVATE, and writes then go to private COW pages, not to
/// the EGM region. XFAIL when a private mapping is granted and its write does not reach the
/// carve-out; PASS when MAP_PRIVATE is refused.
pub(super) fn mmap_private(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let file = check!(open(&region));
    let map = match Mapping::raw(file.as_fd(), page as u64, page, Sharing::Private) {
        Ok(map) => map,
        Err(e) => {
            note(format!("5.5: MAP_PRIVATE refused: {e}"));
            return Outcome::Pass;
        }
    };
    let gpa = region.base + page as u64;
    let before = map.read_u64(0);
    let value = marker(10, page as u64);
    map.write_u64(0, value);
    let back = map.read_u64(0);
    let seen = check!(vmm_peek(&dev, gpa));
    if seen == value {
        return Outcome::fail(format!(
            "5.5: a MAP_PRIVATE write of {value:#x} reached the carve-out (the VMM sees it at \
             {gpa:#x}): private mappings must not write the region"
        ));
    }
    Outcome::xfail(format!(
        "5.5 review point: MAP_PRIVATE accepted (writes go to COW pages, not EGM): the \
         mapping read {before:#x}, then read back {back:#x} after writing {value:#x}; the VMM \
         still sees {seen:#x} at {gpa:#x}"
    ))
}

/// 5.5: the mapping cannot grow (VM_DONTEXPAND/VM_PFNMAP): mremap to two pages fails in place
/// and with MREMAP_MAYMOVE, and the mapping still works afterwards.
pub(super) fn mmap_no_grow(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let file = check!(open(&region));
    let mut map = check!(Mapping::raw(file.as_fd(), 0, page, Sharing::Shared)
        .map_err(io_fail("5.5: mmap of one page")));
    let mut checks = Checks::new();
    for may_move in [false, true] {
        let what = if may_move {
            "with MREMAP_MAYMOVE"
        } else {
            "in place"
        };
        let result = map.remap(2 * page, may_move);
        checks.expect(result.is_err(), || {
            format!("5.5: mremap growth {what} to 2 pages succeeded: the mapping is expandable")
        });
        if let Err(e) = &result {
            note(format!("5.5: mremap growth {what}: {e}"));
        }
        if result.is_ok() {
            // Back to one page so the rest of the test looks at the original mapping.
            let _ = map.remap(page, false);
        }
    }
    check!(expect_landed(
        &mut checks,
        &dev,
        "5.5: write after the refused mremap",
        &map,
        0x20,
        region.base + 0x20,
        marker(11, 0x20)
    ));
    checks.outcome()
}
