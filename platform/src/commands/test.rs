//! `gracevm test`: boot each scenario, run the in-guest suite, report; the exit status is the
//! worst result.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use log::info;

use gracevm::guest::Mode;
use gracevm::harness::kcidb;
use gracevm::harness::{
    self,
    report::{evaluate, ScenarioResult, Summary},
};
use gracevm::machine::{GuestEnd, RunReport, Watch};
use gracevm::nested::{self, Level1End, NestedRun, Stage};

use crate::cli::{usage, TestArgs, Usage};
use crate::commands::{boot_direct, create_out, DirectBoot, SummaryIn};
use crate::resolve::{scenario_list, Resolved, ScenarioRun};

/// Default per-scenario timeout, in seconds.
const DEFAULT_TIMEOUT: u64 = 300;

/// `gracevm test` as the command line asks: its scenarios (this shard's), at most `parallel`
/// at once.
pub fn command(a: TestArgs, watch: Arc<Watch>) -> Result<i32> {
    let shard = match &a.shard {
        Some(text) => Some((parse_shard(text).map_err(Usage)?, text)),
        None => None,
    };
    let mut runs = scenario_list(
        &a.guest,
        &a.scenarios,
        a.all_scenarios,
        &a.scenarios_dir,
        &a.name,
    )?;
    if let Some(((k, n), text)) = shard {
        runs = runs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % n == k - 1)
            .map(|(_, r)| r)
            .collect();
        if runs.is_empty() {
            return usage(format!(
                "--shard {text}: no scenario falls in this shard (fewer scenarios than shards)"
            ));
        }
        info!("shard {k}/{n}: {} scenario(s)", runs.len());
    }
    create_out(&a.out)?;
    let parallel = match a.parallel {
        Some(0) => return usage("--parallel 0: at least one scenario must run"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    test(&runs, &a.out, parallel, !a.nested_job, watch)
}

fn test(
    runs: &[ScenarioRun],
    out: &Path,
    parallel: usize,
    run_report: bool,
    watch: Arc<Watch>,
) -> Result<i32> {
    let started = SystemTime::now();
    let scenarios = if runs.iter().any(|r| r.guest.nested) {
        test_nested(runs, out, parallel, watch)?
    } else {
        let mut v = Vec::new();
        for r in runs {
            let dir = out.join(&r.name);
            create_out(&dir)?;
            v.push(test_direct(&r.guest, &dir, &r.name, watch.clone())?);
        }
        v
    };
    let summary = Summary::new(scenarios);
    // The run's report (and the kernel checksum KCIDB names it by) once, by the outermost
    // gracevm: a nested job's would only be overwritten.
    if run_report {
        summary.write(out)?;
        write_kcidb(&runs[0].guest, &summary, out, started)?;
    }
    print!("{}", summary.ktap());
    let _ = std::io::stdout().flush();
    info!("results in {}", out.display());
    eprintln!("{}", summary.closing_line());
    Ok(summary.exit_code)
}

/// kcidb.json beside results.json: the build record (if given) and the kernel's checksum name
/// what was tested.
fn write_kcidb(g: &Resolved, summary: &Summary, out: &Path, started: SystemTime) -> Result<()> {
    use sha2::Digest;
    let build = match &g.args.build_info {
        Some(path) if path.is_file() => Some(kcidb::BuildInfo::load(path)?),
        _ => None,
    };
    let image = std::fs::read(&g.kernel)
        .with_context(|| format!("reading {} for its checksum", g.kernel.display()))?;
    let sum: String = sha2::Sha256::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let secs = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let run_id = format!("{secs}-{}", std::process::id());
    let start = humantime::format_rfc3339_seconds(started).to_string();
    let report = kcidb::report(summary, build.as_ref(), &run_id, &sum, &start);
    kcidb::write(out, &report)
}

fn test_direct(g: &Resolved, out: &Path, name: &str, watch: Arc<Watch>) -> Result<ScenarioResult> {
    let started = Instant::now();
    let log = std::fs::File::create(out.join("console.log")).context("creating console.log")?;
    let sink =
        harness::console::ConsoleSink::new(Some(log), false, Some(name.to_string()), watch.clone());
    let captured = sink.captured();
    info!(
        "{name}: booting {} ({} vCPUs, {} boot)",
        g.kernel.display(),
        g.platform.vcpus,
        g.platform.boot
    );
    let mode = Mode::Test(g.request());
    let boot = DirectBoot {
        mode: &mode,
        console: Arc::new(Mutex::new(sink)),
        interactive: false,
        timeout: g.test_timeout(DEFAULT_TIMEOUT),
        watch,
        started,
    };
    let report =
        boot_direct(g, boot).unwrap_or_else(|e| lost(GuestEnd::VmmFailure(format!("{e:#}"))));
    let cap = captured.lock().unwrap_or_else(|p| p.into_inner());
    let mut guest = harness::ktap::parse(&cap.ktap);
    for r in &mut guest.results {
        r.duration_ms = cap.durations.get(&r.name).copied();
    }
    let result = evaluate(
        name,
        &report,
        &guest,
        cap.panic.clone(),
        cap.running.as_deref(),
    );
    // The scenario's own results, as a nested outer gracevm reads them back.
    Summary::new(vec![result.clone()]).write(out)?;
    Ok(result)
}

/// A run that ended `why` before the guest told anything.
fn lost(why: GuestEnd) -> RunReport {
    RunReport {
        end: why,
        boot_time: None,
        vmm_ready: Duration::ZERO,
        wall: Duration::ZERO,
    }
}

/// Run every scenario in one level-1 boot, `parallel` at a time; each inner gracevm writes
/// into out/<name>.
fn test_nested(
    runs: &[ScenarioRun],
    out: &Path,
    parallel: usize,
    watch: Arc<Watch>,
) -> Result<Vec<ScenarioResult>> {
    let stage = Stage::new()?;
    let mut jobs = Vec::new();
    let mut total = Duration::ZERO;
    // Longest first: scenarios are taken in this order as slots free up, so a long one started
    // last would run alone at the end. Results are read back by name, in the order asked.
    let mut order: Vec<&ScenarioRun> = runs.iter().collect();
    order.sort_by_key(|r| std::cmp::Reverse(expected_cost(r)));
    for r in order {
        // The inner gracevm stretches it for the platform itself; level 1 must last that long.
        let timeout = r.guest.timeout(Some(DEFAULT_TIMEOUT));
        total += r.guest.test_timeout(DEFAULT_TIMEOUT).unwrap_or_default();
        let dir = out.join(&r.name);
        create_out(&dir)?;
        let _ = std::fs::remove_file(dir.join("results.json"));
        jobs.push(r.guest.inner(timeout).test_job(&stage, &r.name)?);
    }
    let first = &runs[0].guest;
    let l1 = first.level1()?;
    let need = runs.iter().map(|r| r.guest.level1_memory_mib()).collect();
    let end = NestedRun {
        level1: &l1,
        stage: &stage,
        jobs,
        out: Some(out),
        interactive: false,
        // Room for the `parallel` largest scenarios at once.
        memory_mib: nested::level1_memory_for(need, parallel),
        timeout: Some(total),
        watch,
        parallel,
    }
    .run()?;
    Ok(runs
        .iter()
        .map(|r| nested_result(out, &r.name, &end))
        .collect())
}

/// A scenario's expected share of a run's time, to start the longest first: the whole suite
/// (no `tests` list in the scenario) against a few named tests, and each GiB of carve-out
/// (filled, zeroed by the driver at each open, and compared) on top of the first.
fn expected_cost(r: &ScenarioRun) -> u64 {
    const WHOLE_SUITE: u64 = 50;
    let resolved = &r.guest.platform;
    let named = resolved.platform().tests.len() as u64;
    let tests = if named == 0 { WHOLE_SUITE } else { named };
    let carved: u64 = resolved.map().carve_outs.iter().map(|c| c.range.size).sum();
    tests * (1 + carved.div_ceil(1 << 30))
}

/// What the gracevm inside level 1 left for scenario `name`, or why it left nothing.
fn nested_result(out: &Path, name: &str, end: &Level1End) -> ScenarioResult {
    let inner: Option<ScenarioResult> =
        std::fs::read_to_string(out.join(name).join("results.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<SummaryIn>(&s).ok())
            .and_then(|mut s| s.scenarios.pop());
    let why = match (end, inner) {
        (_, Some(s)) => return s,
        (Level1End::Timeout, None) => GuestEnd::Timeout,
        (Level1End::Interrupted, None) => GuestEnd::Interrupted,
        (Level1End::Failed(m), None) => GuestEnd::VmmFailure(m.clone()),
        (Level1End::Done(_), None) => GuestEnd::VmmFailure(
            "the gracevm inside level 1 left no results.json (see level1-console.log)".into(),
        ),
    };
    evaluate(name, &lost(why), &Default::default(), None, None)
}

/// `K/N` with 1 <= K <= N.
fn parse_shard(text: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("--shard {text}: expected K/N with 1 <= K <= N (e.g. 2/4)");
    let (k, n) = text.split_once('/').ok_or_else(bad)?;
    let (k, n): (usize, usize) = (
        k.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if k == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_shard_accepts_k_of_n_only() {
        assert_eq!(parse_shard("1/1"), Ok((1, 1)));
        assert_eq!(parse_shard(" 2/4 "), Ok((2, 4)));
        for bad in ["0/2", "3/2", "2", "a/b", "1/0", "-1/2", ""] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }
}
