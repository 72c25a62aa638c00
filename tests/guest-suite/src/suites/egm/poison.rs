//! Spec section 3, memory failure (patch 15; matrix 5.10): a poisoned EGM page signals the
//! mapping process and joins the retired-pages list.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use crate::egm::{self, ChildEnd, Pipe, RetiredPage};
use crate::kconfig;
use crate::ktap::note;
use crate::mapping::{Mapping, Sharing};
use crate::outcome::{check, Checks, Outcome};
use crate::registry::Context;

use super::machine::*;

/// Who writes the poisoned address to hard_offline_page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Injector {
    /// The test, while the mapping process waits (it asked for early kill, as QEMU does):
    /// memory_failure signals it asynchronously (BUS_MCEERR_AO).
    Other,
    /// The mapping process itself: it is `current`, signalled on the way back from the write
    /// (BUS_MCEERR_AR).
    Itself,
}

impl std::fmt::Display for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Injector::Other => "written by another process, the mapping one opted into early kill",
            Injector::Itself => "written by the mapping process itself",
        })
    }
}

/// What one injection did.
#[derive(Debug)]
pub(super) struct Injection {
    /// The write's result (`None`: the writer was killed before it could say).
    write: Option<std::io::Result<()>>,
    child: Option<ChildEnd>,
}

/// Child exit codes for a refused write: `WRITE_FAILED + errno` (errno below 100; clear of
/// the SIGBUS handler's codes).
pub(super) const WRITE_FAILED: i32 = 100;

/// A child maps `[0, offset + page)` and keeps touching `offset`; `phys` is written to
/// hard_offline_page by `injector`; the child's end is what the kernel did to it.
pub(super) fn inject(
    file: &File,
    offset: u64,
    page: usize,
    phys: u64,
    injector: Injector,
) -> Result<Injection, Outcome> {
    let ready = Pipe::new().map_err(io_fail("pipe"))?;
    let fd = file.as_fd();
    let Ok(len) = usize::try_from(offset + page as u64) else {
        return Err(Outcome::fail("offset beyond usize"));
    };
    let at = offset as usize;
    let value = format!("{phys:#x}");
    let mut child = egm::fork_child(|| {
        if injector == Injector::Other && egm::set_mce_kill_early().is_err() {
            return 9;
        }
        let Ok(map) = Mapping::raw(fd, 0, len, Sharing::Shared) else {
            return 10;
        };
        if egm::catch_sigbus(map.addr() + at).is_err() {
            return 8;
        }
        map.write_u64(at, marker(12, at as u64));
        if injector == Injector::Itself {
            if let Err(e) = egm::write_sysfs(egm::HARD_OFFLINE_PAGE, &value) {
                return WRITE_FAILED + e.raw_os_error().unwrap_or(0).clamp(0, 99);
            }
        }
        if !ready.send(b'R') {
            return 11;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let _ = map.read_u64(at);
            std::thread::sleep(Duration::from_millis(1));
        }
        12
    })
    .map_err(io_fail("fork"))?;
    let write = match injector {
        Injector::Other => {
            if ready.recv(Duration::from_secs(30)) != Some(b'R') {
                let end = child.kill();
                return Err(Outcome::fail(format!(
                    "5.10: the child could not map the region: it {}",
                    end.map_or("did not end".to_string(), |e| e.to_string())
                )));
            }
            Some(egm::write_sysfs(egm::HARD_OFFLINE_PAGE, &value))
        }
        Injector::Itself => None,
    };
    let end = child.wait_timeout(Duration::from_secs(15));
    if end.is_none() {
        child.kill();
    }
    let write = match (write, end) {
        (Some(write), _) => Some(write),
        (None, Some(ChildEnd::Exited(code)))
            if (WRITE_FAILED..WRITE_FAILED + 100).contains(&code) =>
        {
            Some(Err(std::io::Error::from_raw_os_error(code - WRITE_FAILED)))
        }
        (None, Some(ChildEnd::Exited(12))) | (None, None) => Some(Ok(())),
        (None, _) => None,
    };
    Ok(Injection { write, child: end })
}

/// 5.10: writing an EGM page's physical address to hard_offline_page while a process has the
/// region mapped and touches it kills that process with SIGBUS and adds the page's offset to
/// the retired list, once. Twice: written by another process while the mapping one asked for
/// early kill (as QEMU does; without it memory_failure leaves other processes alone), then by
/// the mapping process itself; the second adds no duplicate. Needs CONFIG_MEMORY_FAILURE and
/// hard_offline_page (drivers/base/memory.c, built only with CONFIG_MEMORY_HOTPLUG).
pub(super) fn poison(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, true));
    match kconfig::kernel_has("MEMORY_FAILURE") {
        Some(true) => {}
        Some(false) => return Outcome::skip("kernel built without CONFIG_MEMORY_FAILURE"),
        None => {
            return Outcome::skip("kernel config unavailable: cannot tell CONFIG_MEMORY_FAILURE")
        }
    }
    if !egm::exists(egm::HARD_OFFLINE_PAGE) {
        return Outcome::skip(format!(
            "no {} (drivers/base/memory.c is built only with CONFIG_MEMORY_HOTPLUG)",
            egm::HARD_OFFLINE_PAGE
        ));
    }
    let (region, file, before) = check!(open_listed(&m, "5.10"));
    let page = m.page as u64;
    let mut offset = (region.size / 2) & !(page - 1);
    while before.iter().any(|p| p.offset / page == offset / page) {
        offset += page;
    }
    let phys = region.base + offset;
    let mark = egm::LogMark::now();
    let mut checks = Checks::new();
    let mut expected = before.clone();
    expected.push(RetiredPage { offset, size: page });
    expected.sort();
    for (round, injector) in [("first", Injector::Other), ("second", Injector::Itself)] {
        let injection = check!(inject(&file, offset, m.page, phys, injector));
        if let Some(Err(e)) = &injection.write {
            checks.fail(format!(
                "5.10: {round} injection ({injector}): writing {phys:#x} to {}: {e}",
                egm::HARD_OFFLINE_PAGE
            ));
        }
        let wanted = egm::SigbusReport {
            code: match injector {
                Injector::Other => libc::BUS_MCEERR_AO,
                Injector::Itself => libc::BUS_MCEERR_AR,
            },
            addr_ok: true,
        };
        let got = match injection.child {
            Some(ChildEnd::Exited(code)) => egm::sigbus_report(code),
            _ => None,
        };
        checks.expect(got == Some(wanted), || {
            let what = match (got, injection.child) {
                (Some(report), _) => report.to_string(),
                (None, None) => "was still running after 15 s".to_string(),
                (None, Some(ChildEnd::Exited(8))) => "could not install its SIGBUS handler".into(),
                (None, Some(ChildEnd::Exited(9))) => "could not set PR_MCE_KILL_EARLY".into(),
                (None, Some(ChildEnd::Exited(10))) => "could not map the region".into(),
                (None, Some(other)) => other.to_string(),
            };
            format!(
                "5.10: {round} injection at {phys:#x} ({injector}): expected the mapping \
                 process to get SIGBUS ({wanted}), it {what}"
            )
        });
        match egm::list_retired_pages(file.as_fd()) {
            Ok(after) => {
                let diff = egm::compare_lists(&expected, &after);
                checks.expect(diff.is_empty(), || {
                    format!(
                        "5.10: after the {round} injection at offset {offset:#x}: {} entries \
                         before, {} after: {diff}",
                        before.len(),
                        after.len()
                    )
                });
            }
            Err(why) => checks.fail(format!("5.10: {why}")),
        }
    }
    let log = mark.new_lines();
    for line in log
        .iter()
        .filter(|l| l.contains("emory failure") || l.contains("SIGBUS"))
        .take(6)
    {
        note(format!("kernel: {}", crate::procfs::log_message(line)));
    }
    for line in egm::kernel_trouble(&log).iter().take(10) {
        note(format!("kernel trouble while handling the poison: {line}"));
    }
    if !checks.failed() {
        note(format!(
            "5.10: poisoned {phys:#x} (offset {offset:#x}) twice, from another process and from \
             the mapping one: SIGBUS each time, the list grew from {} to {} entries once",
            before.len(),
            expected.len()
        ));
    }
    checks.outcome()
}
