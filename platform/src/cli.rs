//! The command line: every subcommand and flag, as clap parses them.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use firmware::Size;
use gracevm::modules;

#[derive(Parser)]
#[command(
    name = "gracevm",
    version,
    about = "A Grace-like aarch64 VMM for testing the nvgrace-gpu and EGM drivers"
)]
pub struct Cli {
    /// More log output (-v info is the default; -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Boot a guest with its console on this terminal: a shell, or --cmd then power off.
    Run {
        #[command(flatten)]
        guest: GuestArgs,
        /// Run this shell command in the guest instead of a shell, then power off.
        #[arg(long)]
        cmd: Option<String>,
        /// Keep the console log (and a run report) in this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Boot a guest, run the in-guest test suite, print KTAP; exit status is the worst result.
    Test(TestArgs),
    /// Write the guest's base initramfs (gracevm's /init, busybox, the in-guest suite).
    Initramfs {
        #[arg(long)]
        init: PathBuf,
        /// A static aarch64 busybox.
        #[arg(long)]
        busybox: PathBuf,
        /// The static aarch64 gracevm-suite.
        #[arg(long)]
        suite: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Join the results of several runs (shards) into one report: results.json, results.ktap,
    /// junit.xml, kcidb.json; the exit status is the worst of them.
    Merge {
        /// Output directories of the runs to join.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write what the guest's firmware would hand the kernel: the DTB and each ACPI table.
    Firmware {
        /// Platform description (TOML); the built-in default when absent.
        #[arg(long)]
        platform: Option<PathBuf>,
        /// vCPUs (overrides the description).
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot-to-userspace time of gracevm next to qemu-system-aarch64 TCG on the same images.
    Bench {
        #[command(flatten)]
        guest: GuestArgs,
        /// Boots per VMM (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[arg(long, default_value = "out/bench")]
        out: PathBuf,
    },
}

#[derive(Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Output directory: results.ktap, results.json, and per scenario its console.log.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Run this named scenario (a description NAME.toml in --scenarios-dir), or every one
    /// matching a glob (`egm-retired-*`); repeatable. Without any, one scenario from
    /// --platform (or the built-in default) is run.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Run every scenario in --scenarios-dir.
    #[arg(long)]
    pub all_scenarios: bool,
    /// Where named scenarios live.
    #[arg(long, env = "GRACEVM_SCENARIOS", default_value = "tests/scenarios")]
    pub scenarios_dir: PathBuf,
    /// Name of the single scenario run from --platform.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Scenarios run at once inside the level-1 machine (nested route); default: this
    /// host's cores.
    #[arg(long, env = "GRACEVM_PARALLEL", value_name = "N")]
    pub parallel: Option<usize>,
    /// Run shard K of N: every N-th scenario in name order, starting at the K-th (1-based),
    /// so N jobs together run each scenario once; `gracevm merge` joins their results.
    #[arg(long, env = "GRACEVM_SHARD", value_name = "K/N")]
    pub shard: Option<String>,
    /// Set by the nested route for the gracevm it runs inside level 1: each scenario's
    /// results go to out/<name>, and the outer gracevm writes the run's report.
    #[arg(long, hide = true)]
    pub nested_job: bool,
}

#[derive(Args, Clone)]
pub struct GuestArgs {
    /// The guest kernel: an arm64 Image.
    #[arg(long, env = "GRACEVM_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// The guest's base initramfs (newc cpio); gracevm appends its own archive to it.
    #[arg(long, env = "GRACEVM_INITRD")]
    pub initrd: Option<PathBuf>,
    /// The kernel's modules: the INSTALL_MOD_PATH of `make modules_install` (or its
    /// lib/modules/<release>, or a cpio archive of it); appended to the initrd.
    #[arg(long, env = "GRACEVM_MODULES")]
    pub modules: Option<PathBuf>,
    /// Modules the guest's /init loads from --modules, in order (those the tree lacks, e.g.
    /// built in, are left out).
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        default_values_t = modules::DEFAULT_LOAD.iter().map(|m| m.to_string())
    )]
    pub modprobe: Vec<String>,
    /// Set by the nested route for the gracevm it runs inside level 1: the outer gracevm has
    /// checked the module tree against the kernel (the check reads the whole kernel).
    #[arg(long, hide = true)]
    pub modules_checked: bool,
    /// Platform description (TOML); the built-in default when absent.
    #[arg(long)]
    pub platform: Option<PathBuf>,
    /// vCPUs (overrides the description).
    #[arg(long, alias = "smp")]
    pub cpus: Option<u32>,
    /// RAM of socket 0, e.g. 512M or 2G (overrides the description).
    #[arg(long, alias = "mem")]
    pub memory: Option<Size>,
    /// Extra kernel command-line arguments.
    #[arg(long, default_value = "")]
    pub append: String,
    /// Fill the carve-outs with their boot pattern before the first vCPU runs rather than
    /// beside the boot: the before-state `make bench` times.
    #[arg(long, hide = true)]
    pub eager_fill: bool,
    /// Kill the guest after this many seconds (default: 300 for test, none for run).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Run guests directly under this host's KVM, or nested in qemu-system-aarch64.
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub route: Route,
    /// Features the kernel under test must have (`egm`): their tests fail instead of skipping
    /// when the kernel lacks them. `make test` sets it when the tree carries the EGM driver.
    #[arg(
        long,
        env = "GRACEVM_EXPECT",
        value_name = "FEATURE,...",
        value_delimiter = ','
    )]
    pub expect: Vec<String>,
    /// Why the features are expected (shown in the failures).
    #[arg(long, env = "GRACEVM_EXPECT_WHY", hide = true)]
    pub expect_why: Option<String>,
    /// The kernel build's record (`gracevm-build.json`, which `make` passes): what the KCIDB
    /// report (kcidb.json) says was checked out and built.
    #[arg(long, env = "GRACEVM_BUILD_INFO")]
    pub build_info: Option<PathBuf>,
    /// Run only the guest tests matching these globs (`egm_*,kernel_log_boot`); a scenario's
    /// own `tests` list still applies.
    #[arg(
        long,
        env = "GRACEVM_TESTS",
        value_name = "GLOB,...",
        value_delimiter = ','
    )]
    pub tests: Vec<String>,
    #[command(flatten)]
    pub level1: Level1Args,
}

#[derive(Args, Clone)]
pub struct Level1Args {
    /// Nested route: the level-1 kernel (an arm64 Image with KVM).
    #[arg(long, env = "GRACEVM_L1_KERNEL")]
    pub level1_kernel: Option<PathBuf>,
    /// Nested route: a static aarch64 busybox.
    #[arg(long, env = "GRACEVM_BUSYBOX")]
    pub level1_busybox: Option<PathBuf>,
    /// Nested route: gracevm built for aarch64.
    #[arg(long, env = "GRACEVM_L1_VMM")]
    pub level1_vmm: Option<PathBuf>,
    /// Nested route: the qemu binary.
    #[arg(long, env = "GRACEVM_QEMU", default_value = "qemu-system-aarch64")]
    pub qemu: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Route {
    /// Direct on an aarch64 host with /dev/kvm, nested everywhere else.
    Auto,
    Direct,
    Nested,
}

/// A user error: nothing ran. Exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

pub fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(Usage(msg.into()).into())
}
