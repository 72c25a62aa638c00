//! Spec section 3, `open` (matrix 5.3, 5.4): every first open zeroes the region; a second
//! open is refused while the first (or its mapping) lives.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use gracevm_contract::findings::{self, Finding};
use gracevm_contract::kernel_log::Report as KernelReport;

use crate::devmem::{self, Access};
use crate::egm::{self, ChildEnd, EgmRegion, EGM_RETIRED_PAGES_LIST};
use crate::ktap::note;
use crate::mapping::{Mapping, Sharing};
use crate::outcome::{check, Checks, Outcome};
use crate::procfs::bytes;
use crate::registry::Context;
use crate::testdev::TestDev;

use super::machine::*;

/// Dirties three words of the carve-out through /dev/mem (when the boot pattern is gone
/// already) and checks the VMM sees them.
pub(super) fn dirty_through_devmem(dev: &TestDev, region: &EgmRegion) -> Result<(), Outcome> {
    for offset in [0, region.size / 2, region.size - 8] {
        let gpa = region.base + offset;
        let map = devmem::map(gpa, 8, Access::ReadWrite)
            .map_err(|why| Outcome::fail(format!("5.3: {why}")))?;
        let value = marker(3, offset);
        map.write_u64(0, value);
        let seen = vmm_peek(dev, gpa)?;
        if seen != value {
            return Err(Outcome::fail(format!(
                "5.3: wrote {value:#x} at {gpa:#x} through /dev/mem, the VMM sees {seen:#x}"
            )));
        }
    }
    Ok(())
}

/// 5.3: the VMM's boot pattern is intact before the first open (nobody touched the carve-out),
/// and the open zeroes the whole region (VMM CHECK_VALUE 0).
pub(super) fn open_zeroes(ctx: &Context) -> Outcome {
    let (_m, regions) = check!(ready_all(ctx));
    let dev = check!(testdev(ctx));
    let mut checks = Checks::new();
    for (i, region) in regions.iter().enumerate() {
        let Some(carveout) = region.carveout else {
            continue;
        };
        match check!(vmm_boot_pattern(&dev, region.base, region.size)) {
            None => note(format!(
                "5.3: before the first open of egm{} the VMM sees the boot pattern over all {}",
                region.pxm,
                bytes(region.size)
            )),
            Some(at) if i == 0 => {
                let seen = check!(vmm_peek(&dev, region.base + at));
                note(format!(
                    "5.3: the carve-out no longer holds its boot pattern at +{at:#x} ({seen:#x}, \
                     pattern {:#x}): {} was opened before (a re-run?); dirtying it through \
                     /dev/mem",
                    carveout.pattern_word(at),
                    egm::node_path(region.pxm)
                ));
                check!(dirty_through_devmem(&dev, region));
            }
            // Opening an earlier region wrote into this one.
            Some(at) => {
                checks.fail(format!(
                    "5.3: egm{} lost its boot pattern at +{at:#x} before it was ever opened: \
                     opening another region wrote into it",
                    region.pxm
                ));
                check!(dirty_through_devmem(&dev, region));
            }
        }
        let start = Instant::now();
        let file = check!(open(region));
        let took = start.elapsed();
        match check!(vmm_all_value(&dev, region.base, region.size, 0)) {
            None => note(format!(
                "5.3: open of egm{} took {} ms; the VMM sees all {} zero",
                region.pxm,
                took.as_millis(),
                bytes(region.size)
            )),
            Some(at) => {
                let seen = check!(vmm_peek(&dev, region.base + at));
                checks.fail(format!(
                    "5.3: after the first open of egm{} the VMM sees {seen:#x} at +{at:#x}: \
                     expected the whole region zeroed",
                    region.pxm
                ));
            }
        }
        drop(file);
    }
    checks.outcome()
}

/// 5.4: a second open is EBUSY; dup and fork share the open; a close with a mapping alive
/// keeps it busy until munmap; the next open succeeds and zeroes again.
pub(super) fn open_exclusive(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let node = egm::node_path(region.pxm);
    let page = m.page;
    let mut checks = Checks::new();
    let first = check!(open(&region));
    let second = egm::open_node(region.pxm);
    checks.expect(egm::errno(&second) == Some(libc::EBUSY), || {
        format!(
            "5.4: second concurrent open of {node}: expected EBUSY, observed {}",
            egm::result_name(&second)
        )
    });
    if let Ok(second) = &second {
        // A driver that lets a second open through must still serve it: use it (in a child,
        // which an oops kills rather than the test) and say what happened.
        checks.fail(format!(
            "5.4 [{}]: the second open succeeded; using it: {}",
            findings::V1_MULTI_OPEN.key,
            use_second_open(second.as_fd(), page)
        ));
    }
    drop(second);
    let dup = check!(first.try_clone().map_err(io_fail("5.4: dup")));
    let via_dup = egm::retired_pages_call(dup.as_fd(), EGM_RETIRED_PAGES_LIST, 8, 0);
    checks.expect(via_dup.is_ok(), || {
        format!(
            "5.4: EGM_RETIRED_PAGES_LIST through a dup: {}",
            egm::result_name(&via_dup)
        )
    });
    // A forked child shares the open file: it can use it, and cannot open again.
    let pxm = region.pxm;
    let inherited = first.as_fd();
    let mut child = check!(egm::fork_child(|| {
        let mut code = 0;
        match egm::open_node(pxm) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(_) => code |= 1,
            Ok(_) => code |= 2,
        }
        if egm::retired_pages_call(inherited, EGM_RETIRED_PAGES_LIST, 8, 0).is_err() {
            code |= 4;
        }
        code
    })
    .map_err(io_fail("fork")));
    match child.wait_timeout(Duration::from_secs(30)) {
        Some(ChildEnd::Exited(0)) => {}
        Some(ChildEnd::Exited(code)) => {
            checks.expect(code & 3 == 0, || {
                format!(
                    "5.4: a forked child's open of {node}: expected EBUSY, observed {}",
                    if code & 2 != 0 {
                        "success"
                    } else {
                        "another error"
                    }
                )
            });
            checks.expect(code & 4 == 0, || {
                "5.4: a forked child cannot use the inherited descriptor".into()
            });
        }
        other => checks.fail(format!("5.4: forked child: {other:?}")),
    }
    // Close with a mapping alive: the file stays open.
    let map = check!(
        Mapping::raw(first.as_fd(), page as u64, page, Sharing::Shared)
            .map_err(io_fail("5.4: mmap of one page"))
    );
    let value = marker(4, page as u64 + 8);
    check!(expect_landed(
        &mut checks,
        &dev,
        "5.4: write through the mapping",
        &map,
        8,
        region.base + page as u64 + 8,
        value
    ));
    drop(dup);
    drop(first);
    let while_mapped = egm::open_node(region.pxm);
    checks.expect(egm::errno(&while_mapped) == Some(libc::EBUSY), || {
        format!(
            "5.4: open after close with a mapping alive: expected EBUSY, observed {}",
            egm::result_name(&while_mapped)
        )
    });
    drop(while_mapped);
    drop(map);
    let again = egm::open_node(region.pxm);
    match &again {
        Ok(_) => {
            let gpa = region.base + page as u64 + 8;
            let seen = check!(vmm_peek(&dev, gpa));
            checks.expect(seen == 0, || {
                format!(
                    "5.4: reopen after close + munmap: the VMM still sees {seen:#x} at {gpa:#x} \
                     (expected zeroed again)"
                )
            });
            if let Some(at) = check!(vmm_all_value(&dev, region.base, region.size, 0)) {
                checks.fail(format!(
                    "5.4: reopen after close + munmap: the VMM sees non-zero at +{at:#x}"
                ));
            }
        }
        Err(e) => checks.fail(format!(
            "5.4: open after close + munmap: expected success, observed {e}"
        )),
    }
    drop(again);
    checks.outcome()
}

/// mmap and the retired-pages ioctl through a descriptor the driver should never have handed
/// out, in a child: what became of the child.
pub(super) fn use_second_open(fd: std::os::fd::BorrowedFd<'_>, page: usize) -> String {
    let child = egm::fork_child(|| {
        let mut code = 0;
        if egm::retired_pages_call(fd, EGM_RETIRED_PAGES_LIST, 8, 0).is_err() {
            code |= 1;
        }
        match Mapping::raw(fd, 0, page, Sharing::Shared) {
            Ok(map) => {
                map.write_u64(0, marker(9, 0));
            }
            Err(_) => code |= 2,
        }
        code
    });
    match child {
        Err(e) => format!("fork failed: {e}"),
        Ok(mut child) => match child.wait_timeout(Duration::from_secs(30)) {
            Some(ChildEnd::Exited(0)) => "ioctl and mmap worked".into(),
            Some(ChildEnd::Exited(code)) => format!(
                "ioctl {}, mmap {}",
                if code & 1 != 0 { "failed" } else { "worked" },
                if code & 2 != 0 { "failed" } else { "worked" }
            ),
            Some(end) => format!(
                "the process using it {end} (a kernel oops dereferencing the descriptor's missing \
                 state; see the kernel report)"
            ),
            None => "the process using it hung for 30 s".into(),
        },
    }
}

/// An oops in the driver while a second descriptor is used: v1's multi-open, whose second
/// open has no private data (fixed in v2: a regression fails by name).
pub(super) fn known_multi_open(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    in_driver(report).then_some(findings::V1_MULTI_OPEN)
}
