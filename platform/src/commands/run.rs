//! `gracevm run`: a guest with its console on this terminal.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};

use gracevm::guest::Mode;
use gracevm::harness;
use gracevm::machine::{RunReport, Watch};
use gracevm::nested::{self, NestedRun, Stage};

use crate::commands::{boot_direct, DirectBoot};
use crate::resolve::Resolved;

/// `started`: when the gracevm process started (the boot time counts from there).
pub fn run(
    g: &Resolved,
    mode: Mode,
    out: Option<&Path>,
    watch: Arc<Watch>,
    started: Instant,
) -> Result<i32> {
    if g.nested {
        return run_nested(g, &mode, out, watch);
    }
    let log = match out {
        Some(o) => {
            Some(std::fs::File::create(o.join("console.log")).context("creating console.log")?)
        }
        None => None,
    };
    let sink = harness::console::ConsoleSink::new(log, true, None, watch.clone());
    let boot = DirectBoot {
        mode: &mode,
        console: Arc::new(Mutex::new(sink)),
        interactive: true,
        timeout: g.timeout(None),
        watch,
        started,
    };
    let report = boot_direct(g, boot)?;
    let _ = std::io::stdout().flush();
    eprintln!("\r\n[gracevm] {}", report.end.describe());
    if let Some(o) = out {
        write_run_report(o, &report)?;
    }
    Ok(report.end.status().code())
}

/// The same run by the gracevm inside level 1, on this terminal.
fn run_nested(g: &Resolved, mode: &Mode, out: Option<&Path>, watch: Arc<Watch>) -> Result<i32> {
    let timeout = g.timeout(None);
    let stage = Stage::new()?;
    let cmd = match mode {
        Mode::Run(cmd) => Some(cmd.as_str()),
        _ => None,
    };
    let job = g.inner(timeout).run_job(&stage, cmd, out.is_some())?;
    let l1 = g.level1()?;
    let end = NestedRun {
        parallel: 1,
        level1: &l1,
        stage: &stage,
        jobs: vec![job],
        out,
        interactive: true,
        memory_mib: g.level1_memory_mib(),
        timeout,
        watch,
    }
    .run()?;
    nested::run_status(end)
}

/// `run-report.json`: what `bench` reads back from nested runs.
fn write_run_report(out: &Path, r: &RunReport) -> Result<()> {
    let json = serde_json::json!({
        "end": r.end.key(),
        "boot_ms": r.boot_time.map(|t| t.as_secs_f64() * 1e3),
        "vmm_ready_ms": r.vmm_ready.as_secs_f64() * 1e3,
        "wall_ms": r.wall.as_secs_f64() * 1e3,
        "max_rss_kib": max_rss_kib(),
    });
    std::fs::write(out.join("run-report.json"), json.to_string() + "\n")
        .context("writing run-report.json")
}

/// Peak resident memory of this process (the VMM, guest memory it touched included).
pub fn max_rss_kib() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointed-to, properly sized buffer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so the struct is initialised (it was zeroed before, too).
    let ru = unsafe { ru.assume_init() };
    u64::try_from(ru.ru_maxrss).unwrap_or(0)
}
