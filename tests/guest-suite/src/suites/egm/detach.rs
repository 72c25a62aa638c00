//! Spec section 4 and matrix 5.11, the GPU taken away under a holder (v2 08/15, 09/15): unbind
//! or remove while `/dev/egmN` is open or mapped, then use and close it.

use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gracevm_contract::findings::{self, Finding};
use gracevm_contract::kernel_log::Report as KernelReport;

use crate::egm::{self, ChildEnd, Pipe};
use crate::ktap::note;
use crate::mapping::{Mapping, Sharing};
use crate::outcome::{check, Checks, Outcome};
use crate::registry::Context;

use super::machine::*;

/// How the test takes the GPU away from the driver.
#[derive(Clone, Copy, Debug)]
pub(super) struct Detach {
    verb: &'static str,
    apply: fn(&str) -> Result<Duration, String>,
    /// What the GPUs are afterwards.
    left: &'static str,
}

pub(super) const UNBIND: Detach = Detach {
    verb: "unbinding",
    apply: egm::unbind_gpu,
    left: "unbound",
};
pub(super) const REMOVE: Detach = Detach {
    verb: "removing",
    apply: egm::remove_pci_device,
    left: "removed from the PCI bus",
};

impl Detach {
    fn apply(self, bdf: &str) -> Result<(), String> {
        (self.apply)(bdf).map(|_| ())
    }
}

impl std::fmt::Display for Detach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb)
    }
}

/// What the holder keeps of /dev/egmN while the GPU goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hold {
    Open,
    Mapped,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hold::Open => "open",
            Hold::Mapped => "open and mapped",
        })
    }
}

/// The kernel reports a detach-while-held test provokes on purpose: the release path touching
/// the freed EGM device (or anything else the driver does once its device is gone).
pub(super) fn known_detach(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    in_driver(report).then_some(findings::UNBIND_WHILE_OPEN)
}

/// 5.11: unbind the GPU while /dev/egmN is open (not mapped), then close it: the release
/// path must not touch what the unbind freed.
pub(super) fn unbind_while_open(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_unbind_while_open"));
    detach_while_held(ctx, UNBIND, Hold::Open)
}

/// 5.11: remove the GPU's PCI device while /dev/egmN is open, then close it.
pub(super) fn remove_while_open(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_remove_while_open"));
    detach_while_held(ctx, REMOVE, Hold::Open)
}

/// 5.11: remove the GPU's PCI device while /dev/egmN is open and mapped, then write through
/// the old mapping and close.
pub(super) fn remove_while_mapped(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_remove_while_mapped"));
    detach_while_held(ctx, REMOVE, Hold::Mapped)
}

/// 5.11: unbind while open and mapped (the last test everywhere: it leaves the GPUs unbound).
pub(super) fn unbind_while_mapped(ctx: &Context) -> Outcome {
    detach_while_held(ctx, UNBIND, Hold::Mapped)
}

/// Takes the region's GPUs away (`detach`) while a holder process has its node `hold`, then
/// has the holder use and close it. v2 lets the detach return at once and frees the EGM
/// device under the holder (review point); a driver that waits for the holder, or revokes the
/// mapping, passes.
pub(super) fn detach_while_held(ctx: &Context, detach: Detach, hold: Hold) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page as u64;
    let node = egm::node_path(region.pxm);
    let to_child = check!(Pipe::new().map_err(io_fail("pipe")));
    let to_parent = check!(Pipe::new().map_err(io_fail("pipe")));
    let first = marker(13, page);
    let second = marker(14, page + 8);
    let pxm = region.pxm;
    let map_len = m.page;
    let mapped = hold == Hold::Mapped;
    let mut holder = check!(egm::fork_child(|| {
        let Ok(file) = egm::open_node(pxm) else {
            return 10;
        };
        if !mapped {
            to_parent.send(b'R');
            // 'U': use the descriptor the driver's device is gone from: a new mapping of it
            // must not be granted ('M' granted, 'N' refused).
            if to_child.recv(Duration::from_secs(180)) == Some(b'U') {
                let granted = Mapping::raw(file.as_fd(), page, map_len, Sharing::Shared).is_ok();
                to_parent.send(if granted { b'M' } else { b'N' });
                let _ = to_child.recv(Duration::from_secs(180));
            }
            drop(file);
            return 0;
        }
        let Ok(map) = Mapping::raw(file.as_fd(), page, map_len, Sharing::Shared) else {
            return 11;
        };
        map.write_u64(0, first);
        to_parent.send(b'R');
        match to_child.recv(Duration::from_secs(180)) {
            Some(b'P') => {}
            Some(b'E') => return 0,
            _ => return 12,
        }
        map.write_u64(8, second);
        let back = map.read_u64(8);
        to_parent.send(if back == second { b'W' } else { b'X' });
        let _ = to_child.recv(Duration::from_secs(180));
        drop(map);
        drop(file);
        0
    })
    .map_err(io_fail("fork")));
    if to_parent.recv(Duration::from_secs(60)) != Some(b'R') {
        let end = holder.kill();
        return Outcome::fail(format!(
            "5.11: the holder could not open {hold} {node}: it {}",
            end.map_or("did not end".to_string(), |e| e.to_string())
        ));
    }
    if mapped {
        let seen = check!(vmm_peek(&dev, region.base + page));
        if seen != first {
            return Outcome::fail(format!(
                "5.11: the holder wrote {first:#x}, the VMM sees {seen:#x} at {:#x}",
                region.base + page
            ));
        }
    }
    let mark = egm::LogMark::now();
    let (last, others) = region.gpus.split_last().expect("a region has a GPU");
    for bdf in others {
        if let Err(why) = detach.apply(bdf) {
            return Outcome::fail(format!("5.11: {why}"));
        }
    }
    note(format!(
        "5.11: {detach} {last} while pid {} has {node} {hold} (review point [{}]); a kernel \
         report, oops or panic from here on is the observation",
        holder.pid(),
        findings::UNBIND_WHILE_OPEN.key
    ));
    let (tx, rx) = mpsc::channel();
    let bdf = last.clone();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(detach.apply(&bdf));
    });
    let mut observations = Vec::new();
    let (unbind, waited) = match rx.recv_timeout(UNBIND_PATIENCE) {
        Ok(result) => (result, false),
        Err(_) => {
            note(format!(
                "5.11: {detach} still running after {} s: letting the holder close",
                UNBIND_PATIENCE.as_secs()
            ));
            to_child.send(b'E');
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(result) => (result, true),
                Err(_) => {
                    return Outcome::fail(format!(
                        "5.11: {detach} {last} still blocked 30 s after the holder closed {node}"
                    ))
                }
            }
        }
    };
    let took = start.elapsed();
    if let Err(why) = unbind {
        return Outcome::fail(format!("5.11: {why}"));
    }
    let mut checks = Checks::new();
    checks.expect(egm::wait_for_path(&node, false, NODE_WAIT), || {
        format!("5.11: {node} still there after the {detach} of every GPU of the region")
    });
    let aux = egm::aux_device_dir(region.pxm);
    checks.expect(!egm::exists(&aux), || {
        format!("5.11: {aux} still there after the {detach}")
    });
    let mut mapping_live = false;
    if !waited {
        observations.push(format!(
            "{detach} returned in {} ms with {node} {hold}",
            took.as_millis()
        ));
    }
    if !waited && mapped {
        to_child.send(b'P');
        match to_parent.recv(Duration::from_secs(10)) {
            Some(b'W') => {
                let gpa = region.base + page + 8;
                let now = check!(vmm_peek(&dev, gpa));
                if now == second {
                    mapping_live = true;
                    observations.push(format!(
                        "the old mapping still reaches the carve-out: a write through it after \
                         the unbind landed (the VMM sees {second:#x} at {gpa:#x})"
                    ));
                } else {
                    checks.fail(format!(
                        "5.11: a write through the old mapping after the {detach} read back but \
                         the VMM sees {now:#x} at {gpa:#x}: it went to memory that is not the \
                         carve-out"
                    ));
                }
            }
            Some(_) => checks.fail(format!(
                "5.11: a write through the old mapping after the {detach} read back wrong"
            )),
            None => {
                let end = holder.wait_timeout(Duration::from_secs(2));
                observations.push(format!(
                    "touching the old mapping after the {detach}: the holder {}",
                    end.map_or("hung".to_string(), |e| e.to_string())
                ));
            }
        }
    }
    let mut mapping_granted = false;
    if !waited && !mapped {
        to_child.send(b'U');
        match to_parent.recv(Duration::from_secs(10)) {
            Some(b'M') => {
                mapping_granted = true;
                observations.push(format!(
                    "after the {detach}, mmap of the descriptor still open was granted: the \
                     device it maps is gone"
                ));
            }
            Some(_) => observations.push(format!(
                "after the {detach}, mmap of the descriptor still open was refused"
            )),
            None => {
                let end = holder.wait_timeout(Duration::from_secs(2));
                observations.push(format!(
                    "mmap of the descriptor after the {detach}: the holder {}",
                    end.map_or("hung".to_string(), |e| e.to_string())
                ));
            }
        }
    }
    if !waited {
        to_child.send(b'E');
    }
    let end = holder
        .wait_timeout(Duration::from_secs(20))
        .or_else(|| holder.kill());
    let abnormal_close = !waited && !matches!(end, Some(ChildEnd::Exited(0)));
    if abnormal_close {
        observations.push(format!(
            "closing the descriptor after the {detach}: the holder {}",
            end.map_or("did not end".to_string(), |e| e.to_string())
        ));
    }
    std::thread::sleep(Duration::from_millis(200));
    let trouble = egm::kernel_trouble(&mark.new_lines());
    note(format!(
        "5.11: the GPUs of egm{} are left {} (no rebind after a use-after-free)",
        region.pxm, detach.left
    ));
    if checks.failed() {
        let mut outcome = checks.outcome();
        if let Outcome::Fail(why) = &mut outcome {
            for line in observations.iter().chain(&trouble) {
                why.push('\n');
                why.push_str(line);
            }
        }
        return outcome;
    }
    if !trouble.is_empty() || mapping_live || mapping_granted {
        let mut why = format!(
            "5.11 {}: {}",
            findings::UNBIND_WHILE_OPEN,
            observations.join("; ")
        );
        for line in trouble.iter().take(20) {
            why.push_str("\nkernel: ");
            why.push_str(line);
        }
        return Outcome::xfail(why);
    }
    if waited {
        note(format!(
            "5.11: {detach} waited for {node}'s user to close ({} ms)",
            took.as_millis()
        ));
    } else {
        note(format!("5.11: {}", observations.join("; ")));
    }
    Outcome::Pass
}
