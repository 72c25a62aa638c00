//! `gracevm bench`: boot-to-userspace of gracevm (boot-timer register, written by the guest's
//! init) and, in the same run, of qemu-system-aarch64 TCG booting the same Image and initramfs
//! directly (time until init's marker line). Medians over several boots.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::Resolved;
use gracevm::exit::Status;
use gracevm::machine::Watch;
use gracevm::nested::{Level1End, NestedRun, Stage};

/// The line the guest's /init prints when booted without gracevm's archive (as by plain qemu).
const MARKER: &str = "gracevm-init: userspace reached";

#[derive(Debug, Deserialize)]
struct RunReportIn {
    end: String,
    boot_ms: Option<f64>,
    vmm_ready_ms: f64,
    wall_ms: f64,
    max_rss_kib: u64,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

pub fn run(g: &Resolved, runs: u32, out: &Path, watch: Arc<Watch>) -> Result<i32> {
    let timeout = Duration::from_secs(g.args.timeout.unwrap_or(120));
    eprintln!(
        "[gracevm] bench: {runs} gracevm boots ({}), then {runs} qemu TCG boots",
        if g.nested {
            "nested in qemu TCG"
        } else {
            "direct KVM"
        }
    );
    let started = Instant::now();
    let reports = gracevm_boots(g, runs, out, timeout, watch.clone())?;
    let gracevm_wall = started.elapsed();
    for (i, r) in reports.iter().enumerate() {
        if r.end != "poweroff" || r.boot_ms.is_none() {
            bail!(
                "gracevm boot {} did not reach userspace cleanly (ended: {}); see {}/run{}",
                i + 1,
                r.end,
                out.display(),
                i + 1
            );
        }
    }
    let mut qemu = Vec::new();
    for i in 0..runs {
        qemu.push(qemu_boot(g, timeout, &watch).with_context(|| format!("qemu boot {}", i + 1))?);
    }

    let boot = median(reports.iter().filter_map(|r| r.boot_ms).collect()).unwrap_or(0.0);
    let ready = median(reports.iter().map(|r| r.vmm_ready_ms).collect()).unwrap_or(0.0);
    let wall = median(reports.iter().map(|r| r.wall_ms).collect()).unwrap_or(0.0);
    let rss = reports.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
    let q = median(qemu.clone()).unwrap_or(0.0);
    let json = serde_json::json!({
        "runs": runs,
        "route": if g.nested { "nested" } else { "direct" },
        "gracevm": {
            "boot_to_userspace_ms": boot, "vmm_start_ms": ready, "guest_wall_ms": wall,
            "max_rss_kib": rss,
            "all_boots_ms": reports.iter().filter_map(|r| r.boot_ms).collect::<Vec<_>>(),
            "total_wall_incl_level1_ms": gracevm_wall.as_secs_f64() * 1e3,
        },
        "qemu_tcg": { "boot_to_userspace_ms": q, "all_boots_ms": qemu },
        "ratio_gracevm_over_qemu": if q > 0.0 { boot / q } else { 0.0 },
    });
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    println!(
        "boot to userspace (median of {runs}, {} vCPUs, {} RAM)",
        g.platform.vcpus,
        firmware::Size(g.platform.boot_ram())
    );
    println!(
        "  gracevm ({:>6}):        {boot:8.1} ms   (boot-timer register)",
        if g.nested { "nested" } else { "KVM" }
    );
    println!("  qemu-system-aarch64 TCG: {q:8.1} ms   (init marker on the console)");
    println!(
        "  ratio gracevm / qemu:    {:8.2}",
        if q > 0.0 { boot / q } else { 0.0 }
    );
    println!("  gracevm VMM start:       {ready:8.1} ms   (process start to first vCPU run)");
    println!("  gracevm max RSS:         {rss:8} KiB");
    if g.nested {
        println!(
            "  level-1 + {runs} boots wall: {:8.1} s",
            gracevm_wall.as_secs_f64()
        );
    }
    Ok(Status::Pass.code())
}

/// Boot gracevm `runs` times in run mode with `true` as the command; read each run-report.json.
fn gracevm_boots(
    g: &Resolved,
    runs: u32,
    out: &Path,
    timeout: Duration,
    watch: Arc<Watch>,
) -> Result<Vec<RunReportIn>> {
    let dirs: Vec<String> = (1..=runs).map(|i| format!("run{i}")).collect();
    for d in &dirs {
        std::fs::create_dir_all(out.join(d))?;
        let _ = std::fs::remove_file(out.join(d).join("run-report.json"));
    }
    if g.nested {
        let stage = Stage::new()?;
        let base = g.inner_args(&stage, "bench", Some(timeout))?;
        let jobs = dirs
            .iter()
            .map(|d| {
                let mut j = vec!["run".to_string()];
                j.extend(base.iter().cloned());
                j.extend([
                    "--cmd".into(),
                    "true".into(),
                    "--out".into(),
                    format!("/out/{d}"),
                ]);
                j
            })
            .collect();
        let l1 = g.level1()?;
        let end = NestedRun {
            parallel: 1,
            level1: &l1,
            stage: &stage,
            jobs,
            out: Some(out),
            interactive: false,
            memory_mib: g.level1_memory_mib(),
            timeout: Some(timeout * runs),
            watch,
        }
        .run()?;
        if !matches!(end, Level1End::Done(_)) {
            bail!("the level-1 machine did not finish the benchmark: {end:?}");
        }
    } else {
        let me = std::env::current_exe().context("locating the gracevm binary")?;
        for d in &dirs {
            let status = Command::new(&me)
                .args(["run", "--route", "direct", "--cmd", "true"])
                .arg("--kernel")
                .arg(&g.kernel)
                .arg("--initrd")
                .arg(&g.initrd)
                .arg("--cpus")
                .arg(g.platform.vcpus.to_string())
                .arg("--memory")
                .arg(g.platform.boot_ram().to_string())
                .arg("--timeout")
                .arg(timeout.as_secs().to_string())
                .arg("--out")
                .arg(out.join(d))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("gracevm run for the benchmark failed: {status}");
            }
        }
    }
    dirs.iter()
        .map(|d| {
            let p = out.join(d).join("run-report.json");
            let text =
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            Ok(serde_json::from_str(&text)?)
        })
        .collect()
}

/// One plain qemu TCG boot of the same Image + initramfs; milliseconds until init's marker.
fn qemu_boot(g: &Resolved, timeout: Duration, watch: &Watch) -> Result<f64> {
    let mut cmd = Command::new(&g.args.level1.qemu);
    cmd.args([
        "-M",
        "virt,gic-version=3",
        "-cpu",
        "max,pauth-impdef=on",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
    .arg("-smp")
    .arg(g.platform.vcpus.to_string())
    .arg("-m")
    .arg(format!("{}M", g.platform.boot_ram() >> 20))
    .arg("-kernel")
    .arg(&g.kernel)
    .arg("-initrd")
    .arg(&g.initrd)
    .arg("-append")
    .arg(gracevm::guest::cmdline(&g.args.append))
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", g.args.level1.qemu.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(MARKER) {
                let _ = tx.send(start.elapsed());
            }
        }
    });
    let mut seen = None;
    let result = loop {
        if let Ok(t) = rx.try_recv() {
            seen = Some(t);
        }
        if let Ok(Some(_)) = child.try_wait() {
            break seen.or_else(|| rx.recv_timeout(Duration::from_millis(200)).ok());
        }
        if start.elapsed() > timeout || watch.interrupted.load(std::sync::atomic::Ordering::Acquire)
        {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    match result {
        Some(t) => Ok(t.as_secs_f64() * 1e3),
        None => bail!("qemu never printed '{MARKER}' (is the initramfs built from tests/guest?)"),
    }
}
