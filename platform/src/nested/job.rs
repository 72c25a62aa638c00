//! The argv of each job the gracevm inside level 1 runs: the same guest, with its files staged
//! in the share and the outer run's choices passed on.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::exit::Status;
use crate::guest::TestRequest;
use crate::modules::Modules;
use crate::nested::{Level1End, Stage};

/// Where the inner gracevm writes what the outer one keeps (the `out` share).
pub const INNER_OUT: &str = "/out";

/// The guest as the outer gracevm resolved it: what the inner one is told to boot.
pub struct InnerGuest<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub modules: Option<&'a Modules>,
    /// The description file, when there is one (the inner gracevm reads it again).
    pub platform_file: Option<&'a Path>,
    pub vcpus: u32,
    /// RAM of socket 0, in bytes.
    pub boot_ram: u64,
    pub append: &'a str,
    pub eager_fill: bool,
    pub request: TestRequest,
    pub timeout: Option<Duration>,
}

impl InnerGuest<'_> {
    /// Guest arguments common to every command, with files staged under `name` where they
    /// differ between scenarios (the description).
    pub fn args(&self, stage: &Stage, name: &str) -> Result<Vec<String>> {
        let mut v = vec!["--route".into(), "direct".into()];
        v.extend(["--kernel".into(), stage.add("kernel", self.kernel)?]);
        v.extend(["--initrd".into(), stage.add("initrd", self.initrd)?]);
        if let Some(m) = self.modules {
            v.extend([
                "--modules".into(),
                stage.add_data("modules.cpio", &m.tree.archive)?,
            ]);
            v.extend(["--modprobe".into(), m.load.join(",")]);
            v.push("--modules-checked".into());
        }
        if let Some(p) = self.platform_file {
            v.extend(["--platform".into(), stage.add(&format!("{name}.toml"), p)?]);
        }
        v.extend(["--cpus".into(), self.vcpus.to_string()]);
        v.extend(["--memory".into(), self.boot_ram.to_string()]);
        if !self.append.is_empty() {
            v.extend(["--append".into(), self.append.to_string()]);
        }
        if self.eager_fill {
            v.push("--eager-fill".into());
        }
        let request = &self.request;
        if !request.expect.is_empty() {
            v.extend(["--expect".into(), request.expect.join(",")]);
            v.extend(["--expect-why".into(), request.why.clone()]);
        }
        if !request.tests.is_empty() {
            v.extend(["--tests".into(), request.tests.join(",")]);
        }
        if let Some(t) = self.timeout {
            v.extend(["--timeout".into(), t.as_secs().to_string()]);
        }
        Ok(v)
    }

    /// `gracevm run` of this guest: a shell, or `cmd`; the report in the `out` share if kept.
    pub fn run_job(&self, stage: &Stage, cmd: Option<&str>, keep_out: bool) -> Result<Vec<String>> {
        let mut job = vec!["run".to_string()];
        job.extend(self.args(stage, "run")?);
        if let Some(cmd) = cmd {
            job.extend(["--cmd".into(), cmd.to_string()]);
        }
        if keep_out {
            job.extend(["--out".into(), INNER_OUT.into()]);
        }
        Ok(job)
    }

    /// `gracevm test` of this guest as scenario `name`: the inner gracevm writes out/<name>/
    /// itself (console.log, results.json) and leaves the run's report to the outer one.
    pub fn test_job(&self, stage: &Stage, name: &str) -> Result<Vec<String>> {
        let mut job = vec!["test".to_string()];
        job.extend(self.args(stage, name)?);
        job.extend([
            "--out".into(),
            INNER_OUT.into(),
            "--name".into(),
            name.to_string(),
            "--nested-job".into(),
        ]);
        Ok(job)
    }
}

/// Memory for the level-1 machine: the guest's memory (RAM, carve-outs, GPU memory) plus room
/// for level 1's own kernel and files.
pub fn level1_memory_mib(map: &firmware::MemoryMap) -> u64 {
    let guest: u64 = map.ram.iter().map(|r| r.range.size).sum::<u64>()
        + map.carve_outs.iter().map(|c| c.range.size).sum::<u64>()
        + map.gpus.iter().map(|g| g.memory.size).sum::<u64>();
    guest.div_ceil(1 << 20) + 768
}

/// Room for the `parallel` largest of several guests at once (at least 1 GiB).
pub fn level1_memory_for(mut need_mib: Vec<u64>, parallel: usize) -> u64 {
    need_mib.sort_unstable_by(|a, b| b.cmp(a));
    need_mib.iter().take(parallel.max(1)).sum::<u64>().max(1024)
}

/// The exit status of a single nested `run` job, from how level 1 ended.
pub fn run_status(end: Level1End) -> Result<i32> {
    Ok(match end {
        Level1End::Done(s) => s
            .first()
            .copied()
            .flatten()
            .unwrap_or(Status::VmmError.code()),
        Level1End::Timeout => Status::Timeout.code(),
        Level1End::Interrupted => Status::Interrupted.code(),
        Level1End::Failed(m) => anyhow::bail!("{m}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_level1_memory_for_takes_largest_parallel_guests() {
        assert_eq!(level1_memory_for(vec![100, 3000, 2000], 2), 5000);
        assert_eq!(level1_memory_for(vec![100], 4), 1024);
        assert_eq!(level1_memory_for(vec![], 0), 1024);
    }

    #[test]
    fn test_run_status_maps_level1_ends() {
        assert_eq!(run_status(Level1End::Done(vec![Some(3)])).unwrap(), 3);
        assert_eq!(run_status(Level1End::Done(vec![None])).unwrap(), 5);
        assert_eq!(run_status(Level1End::Timeout).unwrap(), 4);
        assert!(run_status(Level1End::Failed("x".into())).is_err());
    }
}
