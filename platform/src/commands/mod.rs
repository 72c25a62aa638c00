//! One module per `gracevm` subcommand, and what several of them share.

pub mod firmware;
pub mod initramfs;
pub mod merge;
pub mod run;
pub mod test;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use gracevm::guest::Mode;
use gracevm::harness::report::ScenarioResult;
use gracevm::machine::{RunReport, Watch};

use crate::resolve::Resolved;

pub fn create_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output directory {}", out.display()))
}

/// results.json as read back from a nested run or a shard.
#[derive(serde::Deserialize)]
pub struct SummaryIn {
    pub scenarios: Vec<ScenarioResult>,
}

/// How one guest is booted under this host's KVM (only aarch64 hosts boot it: elsewhere
/// nothing reads it).
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
pub struct DirectBoot<'a> {
    pub mode: &'a Mode,
    pub console: gracevm::devices::SharedConsole,
    /// Feed this terminal's input to the guest's console.
    pub interactive: bool,
    pub timeout: Option<Duration>,
    pub watch: Arc<Watch>,
    /// When gracevm began to prepare this guest (see `MachineSpec::started`).
    pub started: Instant,
}

/// Boot one guest under this host's KVM.
#[cfg(target_arch = "aarch64")]
pub fn boot_direct(g: &Resolved, b: DirectBoot<'_>) -> Result<RunReport> {
    use gracevm::{guest, machine, vmm};
    let spec = machine::MachineSpec {
        platform: g.platform.clone(),
        kernel: g.kernel.clone(),
        initrd: guest::initrd(&g.initrd, &g.platform, b.mode, g.modules.as_ref())?,
        cmdline: guest::vmm_cmdline(&g.args.append),
        console: b.console,
        interactive: b.interactive,
        // Only the suite waits for a fill running beside the boot; a shell or a command may
        // open /dev/egm before it ends.
        eager_fill: g.args.eager_fill || !matches!(b.mode, Mode::Test(_)),
        timeout: b.timeout,
        watch: b.watch,
        started: b.started,
    };
    vmm::run(spec)
}

#[cfg(not(target_arch = "aarch64"))]
pub fn boot_direct(_: &Resolved, _: DirectBoot<'_>) -> Result<RunReport> {
    anyhow::bail!("direct boots need an aarch64 host")
}
