//! The nested route: on hosts that are not aarch64 with KVM, gracevm boots a small level-1
//! Linux with KVM in qemu-system-aarch64 (TCG, EL2 emulated) and runs itself there.
//!
//! The host stages the guest's files in a directory that qemu shares over virtio-9p (`stage`),
//! with one shell-quoted gracevm argv per line in `stage/jobs`; the output directory is shared
//! as `out`. The level-1 /init runs each job with the aarch64 gracevm, writes `status.N`, and
//! powers off. One level-1 boot serves any number of jobs.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use log::{debug, info};
use vmm_sys_util::tempdir::TempDir;

use crate::initramfs::{shell_quote, Archive};
use crate::machine::Watch;

mod job;
pub use job::{level1_memory_for, level1_memory_mib, run_status, InnerGuest, INNER_OUT};

const LEVEL1_INIT: &str = include_str!("level1-init.sh");

/// What the nested route runs on.
#[derive(Clone, Debug)]
pub struct Level1 {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    /// gracevm built for aarch64 (static).
    pub vmm: PathBuf,
}

impl Level1 {
    /// Check every piece exists before anything starts, with one message naming what is missing.
    pub fn check(&self) -> Result<()> {
        let mut missing = Vec::new();
        for (what, p, hint) in [
            (
                "level-1 kernel",
                &self.kernel,
                "--level1-kernel or GRACEVM_L1_KERNEL (`make kernel` builds one)",
            ),
            (
                "busybox for aarch64",
                &self.busybox,
                "--level1-busybox or GRACEVM_BUSYBOX (Debian's busybox-static:arm64)",
            ),
            (
                "aarch64 gracevm",
                &self.vmm,
                "--level1-vmm or GRACEVM_L1_VMM (`make` cross-builds it)",
            ),
        ] {
            if !p.is_file() {
                missing.push(format!("{what} not found at '{}': set {hint}", p.display()));
            }
        }
        if which(&self.qemu).is_none() {
            missing.push(format!(
                "'{}' not found: install Debian's qemu-system-arm (or set GRACEVM_QEMU)",
                self.qemu.display()
            ));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            bail!(
                "this host has no aarch64 KVM, so gracevm nests in qemu-system-aarch64, but:\n  {}",
                missing.join("\n  ")
            )
        }
    }

    fn initramfs(&self) -> Result<Vec<u8>> {
        let read = |p: &Path| fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut a = Archive::default();
        for d in ["/bin", "/dev", "/proc", "/sys", "/tmp", "/stage", "/out"] {
            a.dir(d)?;
        }
        a.char_dev("/dev/console", 0o600, 5, 1)?;
        a.file("/init", 0o755, LEVEL1_INIT.as_bytes())?;
        a.file("/bin/busybox", 0o755, &read(&self.busybox)?)?;
        a.file("/bin/gracevm", 0o755, &read(&self.vmm)?)?;
        Ok(a.finish()?)
    }
}

fn which(prog: &Path) -> Option<PathBuf> {
    if prog.components().count() > 1 {
        return prog.is_file().then(|| prog.to_path_buf());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// Files to place in the stage share, by name.
///
/// What the jobs boot (kernel, initrd, module archive, descriptions) goes in its `inputs/`
/// directory, which level 1's /init copies into its own memory once, before the first job:
/// every job reads these files, and a read over 9p waits on qemu's I/O thread, which competes
/// with the vCPUs for the host's cores (it took 20–570 ms per job to read them).
pub struct Stage {
    dir: TempDir,
}

/// The stage's subdirectory of job inputs, and where level 1 keeps its copy of it.
const INPUTS: &str = "inputs";

impl Stage {
    pub fn new() -> Result<Self> {
        let base = std::env::temp_dir().join("gracevm-stage");
        let dir = TempDir::new_with_prefix(base).context("creating a staging directory")?;
        fs::create_dir(dir.as_path().join(INPUTS)).context("creating a staging directory")?;
        Ok(Stage { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_path()
    }

    /// Put `src` in the inputs as `name` (a hard link when possible: kernels are large) and
    /// return its path in level 1. Staging the same name twice keeps the first. The copy
    /// fallback goes through a new file and a rename, so the user's file is never opened for
    /// writing (a copy onto an existing hard link of the source would truncate the source).
    pub fn add(&self, name: &str, src: &Path) -> Result<String> {
        let dst = self.path().join(INPUTS).join(name);
        let level1_path = format!("/{INPUTS}/{name}");
        if dst.exists() {
            return Ok(level1_path);
        }
        if fs::hard_link(src, &dst).is_ok() {
            return Ok(level1_path);
        }
        let tmp = self.path().join(format!(".{name}.partial"));
        fs::copy(src, &tmp)
            .and_then(|_| fs::rename(&tmp, &dst))
            .with_context(|| format!("copying {} into the stage directory", src.display()))?;
        Ok(level1_path)
    }

    /// Put `data` in the inputs as `name`, as [`Stage::add`] does a file (every scenario of a
    /// run stages the same module tree).
    pub fn add_data(&self, name: &str, data: &[u8]) -> Result<String> {
        self.write_once(&Path::new(INPUTS).join(name), data)?;
        Ok(format!("/{INPUTS}/{name}"))
    }

    /// Put `data` in the share itself as `name` (the jobs, level 1's initramfs), where level 1
    /// reads it in place. Staging the same name twice keeps the first.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<String> {
        self.write_once(Path::new(name), data)?;
        Ok(format!("/stage/{name}"))
    }

    /// Write `data` at `rel` in the stage unless something is there already.
    fn write_once(&self, rel: &Path, data: &[u8]) -> Result<()> {
        let dst = self.path().join(rel);
        if !dst.exists() {
            fs::write(&dst, data).with_context(|| format!("staging {}", rel.display()))?;
        }
        Ok(())
    }

    /// MiB the inputs take (level 1 holds a copy of them in its memory).
    pub fn inputs_mib(&self) -> u64 {
        let bytes: u64 = fs::read_dir(self.path().join(INPUTS))
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        bytes.div_ceil(1 << 20)
    }
}

/// How the level-1 machine ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Level1End {
    /// It powered off: each job's exit status (None: the job never finished).
    Done(Vec<Option<i32>>),
    Timeout,
    Interrupted,
    /// qemu failed or level-1 never ran the jobs.
    Failed(String),
}

pub struct NestedRun<'a> {
    pub level1: &'a Level1,
    pub stage: &'a Stage,
    pub jobs: Vec<Vec<String>>,
    /// Shared as /out; console of level 1 is logged here too.
    pub out: Option<&'a Path>,
    /// Inherit the terminal (qemu's Ctrl-A x escape works); otherwise the console is logged
    /// and only gracevm's own progress lines reach stderr.
    pub interactive: bool,
    pub memory_mib: u64,
    pub timeout: Option<Duration>,
    pub watch: Arc<Watch>,
    /// Jobs run at once inside level 1 (its vCPUs: at least two, at most eight).
    pub parallel: usize,
}

impl NestedRun<'_> {
    pub fn run(self) -> Result<Level1End> {
        self.level1.check()?;
        let parallel = self.stage_jobs()?;
        let vcpus = self.parallel.clamp(2, 8);
        let mut cmd = self.qemu_command(vcpus);
        debug!("level-1: {cmd:?}");
        info!(
            "starting the level-1 machine (qemu-system-aarch64, TCG, {vcpus} vCPUs) for {} job(s), {parallel} at a time",
            self.jobs.len()
        );
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.level1.qemu.display()))?;
        let log_dir = self.out.unwrap_or(self.stage.path());
        let relay = child.stdout.take().map(|out| {
            let log = log_dir.join("level1-console.log");
            std::thread::spawn(move || relay_console(out, &log, started))
        });

        let end = self.wait(&mut child, started);
        if let Some(r) = relay {
            let _ = r.join();
        }
        info!(
            "level-1 machine ended after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(end.unwrap_or_else(|| self.job_statuses(log_dir)))
    }

    /// Write the jobs, how many run at once (returned) and level 1's initramfs into the stage.
    fn stage_jobs(&self) -> Result<usize> {
        let jobs: String = self
            .jobs
            .iter()
            .map(|argv| {
                argv.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
                    + "\n"
            })
            .collect();
        self.stage.write("jobs", jobs.as_bytes())?;
        let parallel = self.parallel.clamp(1, self.jobs.len().max(1));
        self.stage
            .write("parallel", format!("{parallel}\n").as_bytes())?;
        self.stage.write("level1.cpio", &self.level1.initramfs()?)?;
        Ok(parallel)
    }

    /// The qemu command line of the level-1 machine.
    fn qemu_command(&self, vcpus: usize) -> Command {
        let stage = self.stage.path();
        let mut cmd = Command::new(&self.level1.qemu);
        cmd.args([
            "-M",
            "virt,virtualization=on,gic-version=3",
            // pauth-impdef: QEMU's cheap pointer-auth algorithm; the architected one dominates TCG time.
            "-cpu",
            "max,pauth-impdef=on",
            "-no-reboot",
            // No default NIC: it needs a ROM image and the guest has no use for it.
            "-nic",
            "none",
        ]);
        cmd.arg("-smp").arg(vcpus.to_string());
        // Room for the copy of the inputs that /init makes in memory, too.
        let memory_mib = self.memory_mib + self.stage.inputs_mib();
        cmd.arg("-m").arg(format!("{memory_mib}M"));
        cmd.arg("-kernel").arg(&self.level1.kernel);
        cmd.arg("-initrd").arg(stage.join("level1.cpio"));
        cmd.args([
            "-append",
            "console=ttyAMA0 quiet loglevel=1 panic=-1 rdinit=/init",
        ]);
        cmd.arg("-fsdev").arg(format!(
            "local,id=stage,path={},security_model=none",
            stage.display()
        ));
        cmd.args(["-device", "virtio-9p-device,fsdev=stage,mount_tag=stage"]);
        if let Some(out) = self.out {
            cmd.arg("-fsdev").arg(format!(
                "local,id=out,path={},security_model=none",
                out.display()
            ));
            cmd.args(["-device", "virtio-9p-device,fsdev=out,mount_tag=out"]);
        }
        if self.interactive {
            cmd.arg("-nographic");
        } else {
            cmd.args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
            cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; it makes the kernel kill qemu if gracevm dies, so no qemu outlives a run.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// After level 1 powered off by itself: each job's status, as its /init recorded it.
    fn job_statuses(&self, log_dir: &Path) -> Level1End {
        let statuses: Vec<Option<i32>> = (1..=self.jobs.len())
            .map(|n| {
                fs::read_to_string(self.stage.path().join(format!("status.{n}")))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            })
            .collect();
        if statuses.iter().all(Option::is_none) {
            Level1End::Failed(format!(
                "the level-1 machine ran no job (see {}/level1-console.log)",
                log_dir.display()
            ))
        } else {
            Level1End::Done(statuses)
        }
    }

    /// Wait for qemu, killing it at the deadline or on Ctrl-C. None: it exited by itself.
    fn wait(&self, child: &mut Child, started: Instant) -> Option<Level1End> {
        // Level 1 boots in seconds, but the allowance covers a slow, loaded CI host.
        let deadline = self.timeout.map(|t| started + t + Duration::from_secs(120));
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return None,
                Ok(Some(status)) => {
                    return Some(Level1End::Failed(format!(
                        "qemu-system-aarch64 exited with {status}"
                    )))
                }
                Ok(None) => {}
                Err(e) => return Some(Level1End::Failed(format!("waiting for qemu: {e}"))),
            }
            let end = if self.watch.interrupted.load(Ordering::Acquire) {
                Some(Level1End::Interrupted)
            } else if deadline.is_some_and(|d| Instant::now() > d) {
                Some(Level1End::Timeout)
            } else {
                None
            };
            if let Some(end) = end {
                let _ = child.kill();
                let _ = child.wait();
                return Some(end);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Log the level-1 console; pass gracevm's progress lines on to stderr.
fn relay_console(out: impl std::io::Read, log: &Path, started: Instant) {
    let mut file = fs::File::create(log).ok();
    let mut reader = BufReader::new(out);
    let mut line = Vec::new();
    while let Ok(n) = reader.read_until(b'\n', &mut line) {
        if n == 0 {
            break;
        }
        if let Some(f) = &mut file {
            let _ = f.write_all(&line);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.starts_with("[gracevm] level-1: up") {
            // The figure `make bench` reports as the level-1 boot.
            info!("level-1 booted in {:.1} s", started.elapsed().as_secs_f64());
        } else if text.starts_with("[gracevm]") || text.contains("Kernel panic") {
            eprintln!("{text}");
        }
        line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stage_add_twice_leaves_source_intact() {
        // Arrange: a "kernel" outside the stage directory.
        let src_dir = TempDir::new_with_prefix(std::env::temp_dir().join("gracevm-src")).unwrap();
        let src = src_dir.as_path().join("Image");
        fs::write(&src, b"ARM64 kernel bytes").unwrap();
        let stage = Stage::new().unwrap();
        // Act: two scenarios stage the same kernel.
        let a = stage.add("kernel", &src).unwrap();
        let b = stage.add("kernel", &src).unwrap();
        // Assert
        assert_eq!(a, "/inputs/kernel");
        assert_eq!(a, b);
        assert_eq!(fs::read(&src).unwrap(), b"ARM64 kernel bytes");
        assert_eq!(
            fs::read(stage.path().join("inputs/kernel")).unwrap(),
            b"ARM64 kernel bytes"
        );
        assert_eq!(stage.inputs_mib(), 1);
    }

    #[test]
    fn test_stage_write_and_jobs_quoting() {
        let stage = Stage::new().unwrap();
        assert_eq!(stage.write("jobs", b"x").unwrap(), "/stage/jobs");
        assert_eq!(stage.write("jobs", b"y").unwrap(), "/stage/jobs");
        assert_eq!(fs::read(stage.path().join("jobs")).unwrap(), b"x");
        assert_eq!(
            stage.add_data("modules.cpio", b"m").unwrap(),
            "/inputs/modules.cpio"
        );
        assert_eq!(stage.inputs_mib(), 1);
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
