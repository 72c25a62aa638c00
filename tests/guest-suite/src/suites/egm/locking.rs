//! Spec section 4, no locking (v2 02/15, 03/15, 12/15, 15/15): GPUs probing in parallel, and
//! the retired-pages ioctl racing memory-failure handling.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use gracevm_contract::findings::{self, Finding};
use gracevm_contract::kernel_log::{self, Report as KernelReport};

use crate::egm::{self, Pipe, RetiredPage};
use crate::kconfig;
use crate::ktap::note;
use crate::mapping::{Mapping, Sharing};
use crate::outcome::{check, Checks, Outcome};
use crate::registry::Context;

use super::machine::*;

/// Review finding [no-locking] (v2 02/15, 03/15): the region list and each region's GPU list
/// are changed by GPU probes and removes with no lock. Every GPU of the platform is unbound
/// and bound again from its own thread, all at once, for [`RACE_ROUNDS`] rounds (after one
/// unbind and bind of each on its own, which must work); afterwards every region must be
/// whole (node, one link per GPU). With DEBUG=1 list corruption, KASAN
/// and lockdep watch the lists while it runs.
pub(super) fn parallel_probe(ctx: &Context) -> Outcome {
    // A race that hits corrupts the driver's lists for every test after it.
    check!(exclusive(ctx, "egm_parallel_probe"));
    let m = check!(machine(ctx, false, false));
    let gpus: Vec<String> = m.regions.iter().flat_map(|r| r.gpus.clone()).collect();
    if gpus.len() < 2 {
        return Outcome::skip(format!(
            "{} GPU(s) with an EGM region: racing probes needs two or more (scenarios \
             gpu-pair, egm-no-locking-probes)",
            gpus.len()
        ));
    }
    for region in &m.regions {
        check!(bring_up(&m, region));
    }
    // Each GPU unbound and bound again on its own first: a driver that cannot re-probe even
    // then has a bug of its own, not a race; and what the racing rounds break is measured
    // against one that re-probed fine.
    for bdf in &gpus {
        if let Err(why) = rebind(bdf) {
            return Outcome::fail(format!(
                "unbind and bind of {bdf} alone, before any race: {why}"
            ));
        }
    }
    let mut checks = Checks::new();
    let start = Instant::now();
    for round in 0..RACE_ROUNDS {
        let workers: Vec<_> = gpus
            .iter()
            .cloned()
            .map(|bdf| {
                std::thread::spawn(move || {
                    egm::unbind_gpu(&bdf)?;
                    egm::bind_gpu(&bdf).map(|_| ())
                })
            })
            .collect();
        let mut failed = Vec::new();
        for worker in workers {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => failed.push(why),
                Err(_) => checks.fail(format!("round {round}: a probe thread panicked")),
            }
        }
        if checks.failed() {
            return checks.outcome();
        }
        if !failed.is_empty() {
            // The same GPUs probed one at a time: if that works, the failure belonged to the
            // probes running together.
            let alone: Vec<String> = gpus.iter().filter_map(|bdf| rebind(bdf).err()).collect();
            if alone.is_empty() {
                return Outcome::xfail(format!(
                    "{}: in round {round} of parallel unbind+bind a probe failed, and the same \
                     GPUs probe fine one at a time: {}",
                    findings::NO_LOCKING,
                    failed.join("; ")
                ));
            }
            // They re-probed alone before the race and no longer do: the racing probes left
            // the driver's lists broken (a stale entry, a duplicate device).
            return Outcome::xfail(format!(
                "{}: in round {round} of parallel unbind+bind a probe failed ({}); the same GPUs \
                 re-probed one at a time before the race and no longer do after it: {}",
                findings::NO_LOCKING,
                failed.join("; "),
                alone.join("; ")
            ));
        }
    }
    for region in &m.regions {
        expect_bound_region(&mut checks, region, "after the racing probes");
    }
    if !checks.failed() {
        note(format!(
            "[{}]: {RACE_ROUNDS} rounds of {} GPUs unbound and bound in parallel in {} ms; every \
             region whole",
            findings::NO_LOCKING.key,
            gpus.len(),
            start.elapsed().as_millis()
        ));
    }
    checks.outcome()
}

/// Unbinds `bdf` and binds it again.
fn rebind(bdf: &str) -> Result<(), String> {
    egm::unbind_gpu(bdf).and_then(|_| egm::bind_gpu(bdf).map(|_| ()))
}

/// Review finding [no-locking] (v2 12/15, 15/15): memory-failure handling adds to the
/// retired-pages hash while the ioctl walks it, with no lock. One thread lists the retired
/// pages in a loop while [`POISON_RACE_PAGES`] pages are poisoned one after another; every
/// listing must be whole (no duplicate, nothing outside the region) and the final list must
/// hold every poisoned page once. With DEBUG=1, KASAN and lockdep watch the hash.
pub(super) fn poison_race(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, true));
    if !egm::exists(egm::HARD_OFFLINE_PAGE) || kconfig::kernel_has("MEMORY_FAILURE") != Some(true) {
        return Outcome::skip(format!(
            "no {} or no CONFIG_MEMORY_FAILURE: cannot poison pages",
            egm::HARD_OFFLINE_PAGE
        ));
    }
    let (region, file, before) = check!(open_listed(&m, "[no-locking]"));
    let page = m.page as u64;
    // Pages in the last quarter of the region, clear of the ones already retired.
    let mut offsets = Vec::new();
    let mut offset = (region.size / 4 * 3) & !(page - 1);
    while offsets.len() < POISON_RACE_PAGES && offset + page <= region.size {
        if !before.iter().any(|p| p.offset / page == offset / page) {
            offsets.push(offset);
        }
        offset += 7 * page;
    }
    // v2 records a poisoned page when memory-failure handling finds a mapping of it: a holder
    // maps the whole region (asking for early kill, and ignoring the SIGBUS that follows),
    // forked before any thread starts here.
    let Ok(region_len) = usize::try_from(region.size) else {
        return Outcome::fail("region size beyond usize");
    };
    let holder_ready = check!(Pipe::new().map_err(io_fail("pipe")));
    let holder_stop = check!(Pipe::new().map_err(io_fail("pipe")));
    let fd = file.as_fd();
    let mut holder = check!(egm::fork_child(|| {
        if egm::set_mce_kill_early().is_err() || egm::ignore_sigbus().is_err() {
            return 9;
        }
        let Ok(_map) = Mapping::raw(fd, 0, region_len, Sharing::Shared) else {
            return 10;
        };
        holder_ready.send(b'R');
        let _ = holder_stop.recv(Duration::from_secs(200));
        0
    })
    .map_err(io_fail("fork")));
    if holder_ready.recv(Duration::from_secs(60)) != Some(b'R') {
        let end = holder.kill();
        return Outcome::fail(format!(
            "the holder could not map the region: it {}",
            end.map_or("did not end".to_string(), |e| e.to_string())
        ));
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Poisoning starts once the lister has listed once, so the two overlap.
    let started = std::sync::Barrier::new(2);
    let mut checks = Checks::new();
    let (listings, torn, between) = std::thread::scope(|scope| {
        let lister = scope.spawn(|| {
            let (mut listings, mut torn, mut between) = (0usize, Vec::new(), 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let listing = egm::list_retired_pages(file.as_fd());
                if listings == 0 {
                    started.wait();
                }
                match listing {
                    Ok(list) => {
                        if list.len() > before.len() && list.len() < before.len() + offsets.len() {
                            between += 1;
                        }
                        let mut seen = BTreeSet::new();
                        let whole = list
                            .iter()
                            .all(|p| p.offset < region.size && seen.insert(p.offset));
                        if !whole && torn.len() < 3 {
                            torn.push(format!("a listing of {} entries", list.len()));
                        }
                    }
                    // A list that grew between sizing and listing is no tear.
                    Err(why) if why.contains("grew between") => {}
                    Err(why) if torn.len() < 3 => torn.push(why),
                    Err(_) => {}
                }
                listings += 1;
            }
            (listings, torn, between)
        });
        started.wait();
        for &offset in &offsets {
            let phys = region.base + offset;
            if let Err(e) = egm::write_sysfs(egm::HARD_OFFLINE_PAGE, &format!("{phys:#x}")) {
                checks.fail(format!("poisoning {phys:#x}: {e}"));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        lister
            .join()
            .unwrap_or((0, vec!["the lister panicked".into()], 0))
    });
    holder_stop.send(b'E');
    if holder.wait_timeout(Duration::from_secs(20)).is_none() {
        holder.kill();
    }
    for why in torn {
        checks.fail(format!(
            "[{}]: while pages were poisoned, {why} was torn (duplicate or out-of-region entry)",
            findings::NO_LOCKING.key
        ));
    }
    if between == 0 {
        note(format!(
            "[{}]: no listing caught the list mid-growth ({listings} listings): the race was not \
             exercised this time",
            findings::NO_LOCKING.key
        ));
    }
    let mut expected = before.clone();
    expected.extend(
        offsets
            .iter()
            .map(|&offset| RetiredPage { offset, size: page }),
    );
    expected.sort();
    match egm::list_retired_pages(file.as_fd()) {
        Ok(after) => {
            let diff = egm::compare_lists(&expected, &after);
            checks.expect(diff.is_empty(), || {
                format!("after poisoning {} pages: {diff}", offsets.len())
            });
        }
        Err(why) => checks.fail(why),
    }
    if !checks.failed() {
        note(format!(
            "[{}]: {} pages poisoned while {listings} listings ran; every listing whole, all {} \
             entries there once",
            findings::NO_LOCKING.key,
            offsets.len(),
            expected.len()
        ));
    }
    checks.outcome()
}

/// Pages [`poison_race`] poisons.
pub(super) const POISON_RACE_PAGES: usize = 24;

/// Rounds of parallel unbind+bind in [`parallel_probe`].
pub(super) const RACE_ROUNDS: usize = 10;

/// Any report while probes race is the unlocked lists (list corruption, use-after-free of a
/// region entry, lockdep).
pub(super) fn known_no_locking(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    use kernel_log::Kind;
    let in_driver = in_driver(report);
    // A WARNING counts too: two racing probes registering the same auxiliary device is the
    // kernel's "sysfs: cannot create duplicate filename" (its header names the device).
    let racy = matches!(
        report.kind,
        Kind::ListCorruption
            | Kind::Kasan
            | Kind::Kfence
            | Kind::Lockdep
            | Kind::Oops
            | Kind::Bug
            | Kind::Warning
    );
    // Sleeping in atomic context (the memory-failure hook allocates with GFP_NOFS) is a bug of
    // its own, not the missing locking: it fails by itself.
    let atomic_sleep = report
        .header()
        .contains("sleeping function called from invalid context");
    (in_driver && racy && !atomic_sleep).then_some(findings::NO_LOCKING)
}
