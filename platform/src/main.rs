//! gracevm: a minimal aarch64 VMM modelling an NVIDIA Grace platform with EGM carve-outs, for
//! testing the nvgrace-gpu and EGM kernel drivers without the hardware.

mod bench;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use log::info;

use firmware::{Platform, Size};

use gracevm::exit::{self, Status};
use gracevm::guest::{Mode, TestRequest};
use gracevm::harness::kcidb;
use gracevm::harness::{
    self,
    report::{evaluate, ScenarioResult, Summary},
};
use gracevm::machine::{GuestEnd, RunReport, Watch};
use gracevm::modules::{self, ModuleTree, Modules};
use gracevm::nested::{Level1, Level1End, NestedRun, Stage};
#[cfg(target_arch = "aarch64")]
use gracevm::vmm;
use gracevm_contract::protocol;

#[derive(Parser)]
#[command(
    name = "gracevm",
    version,
    about = "A Grace-like aarch64 VMM for testing the nvgrace-gpu and EGM drivers"
)]
struct Cli {
    /// More log output (-v info is the default; -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    Test {
        #[command(flatten)]
        guest: GuestArgs,
        /// Output directory: results.ktap, results.json, and per scenario its console.log.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// Run this named scenario (a description NAME.toml in --scenarios-dir), or every one
        /// matching a glob (`egm-retired-*`); repeatable. Without any, one scenario from
        /// --platform (or the built-in default) is run.
        #[arg(long = "scenario", value_name = "NAME")]
        scenarios: Vec<String>,
        /// Run every scenario in --scenarios-dir.
        #[arg(long)]
        all_scenarios: bool,
        /// Where named scenarios live.
        #[arg(long, env = "GRACEVM_SCENARIOS", default_value = "tests/scenarios")]
        scenarios_dir: PathBuf,
        /// Name of the single scenario run from --platform.
        #[arg(long, default_value = "default")]
        name: String,
        /// Scenarios run at once inside the level-1 machine (nested route); default: this
        /// host's cores.
        #[arg(long, env = "GRACEVM_PARALLEL", value_name = "N")]
        parallel: Option<usize>,
        /// Run shard K of N: every N-th scenario in name order, starting at the K-th (1-based),
        /// so N jobs together run each scenario once; `gracevm merge` joins their results.
        #[arg(long, env = "GRACEVM_SHARD", value_name = "K/N")]
        shard: Option<String>,
        /// Set by the nested route for the gracevm it runs inside level 1: each scenario's
        /// results go to out/<name>, and the outer gracevm writes the run's report.
        #[arg(long, hide = true)]
        nested_job: bool,
    },
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

#[derive(Args, Clone)]
struct GuestArgs {
    /// The guest kernel: an arm64 Image.
    #[arg(long, env = "GRACEVM_KERNEL")]
    kernel: Option<PathBuf>,
    /// The guest's base initramfs (newc cpio); gracevm appends its own archive to it.
    #[arg(long, env = "GRACEVM_INITRD")]
    initrd: Option<PathBuf>,
    /// The kernel's modules: the INSTALL_MOD_PATH of `make modules_install` (or its
    /// lib/modules/<release>, or a cpio archive of it); appended to the initrd.
    #[arg(long, env = "GRACEVM_MODULES")]
    modules: Option<PathBuf>,
    /// Modules the guest's /init loads from --modules, in order (those the tree lacks, e.g.
    /// built in, are left out).
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        default_values_t = modules::DEFAULT_LOAD.iter().map(|m| m.to_string())
    )]
    modprobe: Vec<String>,
    /// Platform description (TOML); the built-in default when absent.
    #[arg(long)]
    platform: Option<PathBuf>,
    /// vCPUs (overrides the description).
    #[arg(long, alias = "smp")]
    cpus: Option<u32>,
    /// RAM of socket 0, e.g. 512M or 2G (overrides the description).
    #[arg(long, alias = "mem")]
    memory: Option<Size>,
    /// Extra kernel command-line arguments.
    #[arg(long, default_value = "")]
    append: String,
    /// Kill the guest after this many seconds (default: 300 for test, none for run).
    #[arg(long)]
    timeout: Option<u64>,
    /// Run guests directly under this host's KVM, or nested in qemu-system-aarch64.
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    route: Route,
    /// Features the kernel under test must have (`egm`): their tests fail instead of skipping
    /// when the kernel lacks them. `make test` sets it when the tree carries the EGM driver.
    #[arg(
        long,
        env = "GRACEVM_EXPECT",
        value_name = "FEATURE,...",
        value_delimiter = ','
    )]
    expect: Vec<String>,
    /// Why the features are expected (shown in the failures).
    #[arg(long, env = "GRACEVM_EXPECT_WHY", hide = true)]
    expect_why: Option<String>,
    /// The kernel build's record (`gracevm-build.json`, which `make` passes): what the KCIDB
    /// report (kcidb.json) says was checked out and built.
    #[arg(long, env = "GRACEVM_BUILD_INFO")]
    build_info: Option<PathBuf>,
    /// Run only the guest tests matching these globs (`egm_*,kernel_log_boot`); a scenario's
    /// own `tests` list still applies.
    #[arg(
        long,
        env = "GRACEVM_TESTS",
        value_name = "GLOB,...",
        value_delimiter = ','
    )]
    tests: Vec<String>,
    #[command(flatten)]
    level1: Level1Args,
}

#[derive(Args, Clone)]
struct Level1Args {
    /// Nested route: the level-1 kernel (an arm64 Image with KVM).
    #[arg(long, env = "GRACEVM_L1_KERNEL")]
    level1_kernel: Option<PathBuf>,
    /// Nested route: a static aarch64 busybox.
    #[arg(long, env = "GRACEVM_BUSYBOX")]
    level1_busybox: Option<PathBuf>,
    /// Nested route: gracevm built for aarch64.
    #[arg(long, env = "GRACEVM_L1_VMM")]
    level1_vmm: Option<PathBuf>,
    /// Nested route: the qemu binary.
    #[arg(long, env = "GRACEVM_QEMU", default_value = "qemu-system-aarch64")]
    qemu: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Route {
    /// Direct on an aarch64 host with /dev/kvm, nested everywhere else.
    Auto,
    Direct,
    Nested,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let watch = Arc::new(Watch::default());
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The handler only raises the flag; every wait loop polls it.
        if let Err(e) = signal_hook::flag::register(sig, watch.interrupted.clone()) {
            log::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let code = match dispatch(cli.command, watch) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gracevm: {e:#}");
            e.downcast_ref::<Usage>()
                .map_or(Status::VmmError.code(), |_| exit::USAGE)
        }
    };
    std::process::exit(code);
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 | 1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("GRACEVM_LOG")
        .format(|f, r| match r.level() {
            log::Level::Info => writeln!(f, "[gracevm] {}", r.args()),
            l => writeln!(f, "[gracevm] {}: {}", l.as_str().to_lowercase(), r.args()),
        })
        .init();
}

/// A user error: nothing ran. Exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(Usage(msg.into()).into())
}

fn dispatch(cmd: Command, watch: Arc<Watch>) -> Result<i32> {
    match cmd {
        Command::Run { guest, cmd, out } => {
            let g = Resolved::new(&guest)?;
            let mode = cmd.map_or(Mode::Shell, Mode::Run);
            if let Some(out) = &out {
                create_out(out)?;
            }
            run(&g, mode, out.as_deref(), watch)
        }
        Command::Test {
            guest,
            out,
            scenarios,
            all_scenarios,
            scenarios_dir,
            name,
            parallel,
            shard,
            nested_job,
        } => {
            let shard = match shard {
                Some(text) => Some((parse_shard(&text).map_err(Usage)?, text)),
                None => None,
            };
            let mut runs = scenario_list(&guest, &scenarios, all_scenarios, &scenarios_dir, &name)?;
            if let Some(((k, n), shard)) = shard {
                runs = runs
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % n == k - 1)
                    .map(|(_, r)| r)
                    .collect();
                if runs.is_empty() {
                    return usage(format!(
                        "--shard {shard}: no scenario falls in this shard (fewer scenarios than shards)"
                    ));
                }
                info!("shard {k}/{n}: {} scenario(s)", runs.len());
            }
            create_out(&out)?;
            let parallel = match parallel {
                Some(0) => return usage("--parallel 0: at least one scenario must run"),
                Some(n) => n,
                None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            test(&runs, &out, parallel, !nested_job, watch)
        }
        Command::Merge { runs, out } => merge(&runs, &out),
        Command::Initramfs {
            init,
            busybox,
            suite,
            out,
        } => {
            let read = |p: &Path, what: &str| {
                std::fs::read(p).map_err(|e| Usage(format!("{what} {}: {e}", p.display())))
            };
            let data = gracevm::initramfs::guest_base(
                &read(&init, "init")?,
                &read(&busybox, "busybox")?,
                &read(&suite, "suite")?,
            )?;
            // Written whole, then renamed: a failed run leaves no half archive behind.
            let tmp = out.with_extension("cpio.partial");
            std::fs::write(&tmp, &data)
                .and_then(|_| std::fs::rename(&tmp, &out))
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(0)
        }
        Command::Firmware {
            platform,
            cpus,
            out,
        } => {
            let mut p = load_platform(platform.as_deref())?;
            if let Some(c) = cpus {
                p.vcpus = c;
            }
            p.validate().map_err(|e| Usage(format!("platform: {e}")))?;
            create_out(&out)?;
            let boot = firmware::BootParams {
                cmdline: gracevm::guest::cmdline(""),
                ..firmware::BootParams::example(p.vcpus)
            };
            for f in firmware::write_dir(&p, &boot, &out)? {
                println!("{}", f.display());
            }
            Ok(0)
        }
        Command::Bench { guest, runs, out } => {
            let g = Resolved::new(&guest)?;
            create_out(&out)?;
            bench::run(&g, runs.max(1), &out, watch)
        }
    }
}

fn create_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output directory {}", out.display()))
}

/// The guest arguments checked and resolved: nothing boots until all of this holds.
pub(crate) struct Resolved {
    pub args: GuestArgs,
    pub platform: Platform,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub modules: Option<Modules>,
    pub nested: bool,
}

impl Resolved {
    fn new(a: &GuestArgs) -> Result<Self> {
        if let Some(f) = a
            .expect
            .iter()
            .find(|f| !f.trim().is_empty() && !TestRequest::KNOWN.contains(&f.trim()))
        {
            return usage(format!(
                "--expect {f}: unknown feature (known: {})",
                TestRequest::KNOWN.join(", ")
            ));
        }
        let platform = platform_for(a)?;
        let kernel = existing(
            a.kernel.as_deref(),
            "kernel",
            "--kernel PATH (or GRACEVM_KERNEL); `make kernel` builds the default one",
        )?;
        let initrd = existing(
            a.initrd.as_deref(),
            "initrd",
            "--initrd PATH (or GRACEVM_INITRD); `make initramfs` builds the default one",
        )?;
        let modules = match &a.modules {
            Some(path) => {
                let tree = ModuleTree::load(path).map_err(|e| Usage(e.to_string()))?;
                tree.check_kernel(path, &kernel)
                    .map_err(|e| Usage(e.to_string()))?;
                info!(
                    "modules: {} for Linux {} from {}",
                    tree.count,
                    tree.release,
                    path.display()
                );
                Some(Modules {
                    tree,
                    load: a.modprobe.clone(),
                })
            }
            None => None,
        };
        let nested = match a.route {
            Route::Direct => {
                if !direct_possible() {
                    return usage(format!(
                        "--route direct needs an aarch64 host with /dev/kvm; this is {} {}: use --route nested",
                        std::env::consts::ARCH,
                        if Path::new("/dev/kvm").exists() { "(its /dev/kvm runs only its own architecture)" } else { "without /dev/kvm" }
                    ));
                }
                false
            }
            Route::Nested => true,
            Route::Auto => !direct_possible(),
        };
        Ok(Resolved {
            args: a.clone(),
            platform,
            kernel,
            initrd,
            modules,
            nested,
        })
    }

    /// The same guest on another description (a scenario): what the files resolved to (kernel,
    /// initrd, the packed module tree) is kept, not read again.
    fn with_platform(&self, args: GuestArgs, platform: Platform) -> Resolved {
        Resolved {
            args,
            platform,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            modules: self.modules.clone(),
            nested: self.nested,
        }
    }

    /// What the run asks of the suite (`--expect`, `--tests`).
    fn request(&self) -> TestRequest {
        let words = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|f| f.trim().to_string())
                .filter(|f| !f.is_empty())
                .collect()
        };
        let expect = words(&self.args.expect);
        let why = self
            .args
            .expect_why
            .clone()
            .unwrap_or_else(|| format!("--expect {}", expect.join(",")));
        TestRequest {
            expect,
            why,
            tests: words(&self.args.tests),
        }
    }

    fn timeout(&self, default: Option<u64>) -> Option<Duration> {
        self.args.timeout.or(default).map(Duration::from_secs)
    }

    fn level1(&self) -> Result<Level1> {
        let l = &self.args.level1;
        let need = |p: &Option<PathBuf>, what: &str, how: &str| {
            p.clone().ok_or_else(|| {
                Usage(format!(
                    "this host ({}) has no aarch64 KVM, so gracevm nests in qemu-system-aarch64 and needs {what}: {how}",
                    std::env::consts::ARCH
                ))
            })
        };
        Ok(Level1 {
            qemu: l.qemu.clone(),
            kernel: need(
                &l.level1_kernel,
                "a level-1 kernel",
                "--level1-kernel or GRACEVM_L1_KERNEL",
            )?,
            busybox: need(
                &l.level1_busybox,
                "an aarch64 busybox",
                "--level1-busybox or GRACEVM_BUSYBOX",
            )?,
            vmm: need(
                &l.level1_vmm,
                "gracevm built for aarch64",
                "--level1-vmm or GRACEVM_L1_VMM",
            )?,
        })
    }

    /// The argv of the same guest for the gracevm inside level 1, with files staged.
    fn inner_args(
        &self,
        stage: &Stage,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Vec<String>> {
        let mut v = vec!["--route".into(), "direct".into()];
        v.extend(["--kernel".into(), stage.add("kernel", &self.kernel)?]);
        v.extend(["--initrd".into(), stage.add("initrd", &self.initrd)?]);
        if let Some(m) = &self.modules {
            v.extend([
                "--modules".into(),
                stage.write("modules.cpio", &m.tree.archive)?,
            ]);
            v.extend(["--modprobe".into(), m.load.join(",")]);
        }
        if let Some(p) = &self.args.platform {
            v.extend(["--platform".into(), stage.add(&format!("{name}.toml"), p)?]);
        }
        v.extend(["--cpus".into(), self.platform.vcpus.to_string()]);
        v.extend(["--memory".into(), self.platform.boot_ram().to_string()]);
        if !self.args.append.is_empty() {
            v.extend(["--append".into(), self.args.append.clone()]);
        }
        let request = self.request();
        if !request.expect.is_empty() {
            v.extend(["--expect".into(), request.expect.join(",")]);
            v.extend(["--expect-why".into(), request.why]);
        }
        if !request.tests.is_empty() {
            v.extend(["--tests".into(), request.tests.join(",")]);
        }
        if let Some(t) = timeout {
            v.extend(["--timeout".into(), t.as_secs().to_string()]);
        }
        Ok(v)
    }

    /// Memory for the level-1 machine: the guest's RAM plus room for its own kernel and files.
    fn level1_memory_mib(&self) -> u64 {
        let map = self.platform.memory_map();
        let guest: u64 = map.ram.iter().map(|r| r.range.size).sum::<u64>()
            + map.carve_outs.iter().map(|c| c.range.size).sum::<u64>()
            + map.gpus.iter().map(|g| g.memory.size).sum::<u64>();
        guest.div_ceil(1 << 20) + 768
    }
}

/// The guest's platform: its description (or the default) with the command line's overrides,
/// validated.
fn platform_for(a: &GuestArgs) -> Result<Platform> {
    let mut platform = load_platform(a.platform.as_deref())?;
    if let Some(c) = a.cpus {
        platform.vcpus = c;
    }
    if let Some(m) = a.memory {
        platform.sockets[0].ram = m;
    }
    platform
        .validate()
        .map_err(|e| Usage(format!("platform: {e}")))?;
    Ok(platform)
}

/// A platform description from a file, or the built-in Grace-like default.
fn load_platform(path: Option<&Path>) -> Result<Platform> {
    let Some(p) = path else {
        return Ok(Platform::default());
    };
    let text = std::fs::read_to_string(p).map_err(|e| {
        Usage(format!(
            "cannot read platform description {}: {e}",
            p.display()
        ))
    })?;
    Ok(Platform::from_toml(&text, &p.display().to_string()).map_err(|e| Usage(e.to_string()))?)
}

/// One scenario to test: a name and the guest resolved with its platform.
struct ScenarioRun {
    name: String,
    guest: Resolved,
}

fn scenario_list(
    guest: &GuestArgs,
    requested: &[String],
    all: bool,
    dir: &Path,
    single: &str,
) -> Result<Vec<ScenarioRun>> {
    let is_glob = |n: &str| n.contains(['*', '?']);
    let listed = || -> Result<Vec<String>> {
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Usage(format!(
                "cannot list scenarios in {}: {e} (set --scenarios-dir)",
                dir.display()
            ))
        })?;
        let mut found: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".toml")
                    .map(String::from)
            })
            .collect();
        found.sort();
        Ok(found)
    };
    let mut names: Vec<String> = Vec::new();
    if all {
        names.extend(listed()?);
    }
    // `--scenario 'egm-retired-*'`: every scenario whose name matches, in name order.
    for name in requested {
        if !is_glob(name) {
            names.push(name.clone());
            continue;
        }
        let matching: Vec<String> = listed()?
            .into_iter()
            .filter(|n| protocol::glob_match(name, n))
            .collect();
        if matching.is_empty() {
            return usage(format!("no scenario in {} matches '{name}'", dir.display()));
        }
        names.extend(matching);
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    if names.is_empty() {
        return Ok(vec![ScenarioRun {
            name: single.to_string(),
            guest: Resolved::new(guest)?,
        }]);
    }
    let mut scenarios = Vec::new();
    for name in names {
        let file = dir.join(format!("{name}.toml"));
        if !file.is_file() {
            return usage(format!(
                "no scenario '{name}': {} does not exist",
                file.display()
            ));
        }
        let mut a = guest.clone();
        a.platform = Some(file);
        let platform = platform_for(&a)?;
        scenarios.push((name, a, platform));
    }
    // The kernel, initrd and module tree are the same for every scenario: checked (and the
    // tree packed) once.
    let mut shared = guest.clone();
    shared.platform = None;
    let shared = Resolved::new(&shared)?;
    Ok(scenarios
        .into_iter()
        .map(|(name, a, platform)| ScenarioRun {
            name,
            guest: shared.with_platform(a, platform),
        })
        .collect())
}

fn existing(p: Option<&Path>, what: &str, how: &str) -> Result<PathBuf> {
    match p {
        None => usage(format!("no {what} given: pass {how}")),
        Some(p) if !p.is_file() => usage(format!(
            "{what} '{}' does not exist: pass {how}",
            p.display()
        )),
        Some(p) => Ok(p.to_path_buf()),
    }
}

fn direct_possible() -> bool {
    cfg!(target_arch = "aarch64") && Path::new("/dev/kvm").exists()
}

/// Boot one guest under this host's KVM.
#[cfg(target_arch = "aarch64")]
fn boot_direct(
    g: &Resolved,
    mode: &Mode,
    console: Box<dyn Write + Send>,
    interactive: bool,
    timeout: Option<Duration>,
    watch: Arc<Watch>,
) -> Result<RunReport> {
    use gracevm::{guest, machine};
    let spec = machine::MachineSpec {
        platform: g.platform.clone(),
        kernel: g.kernel.clone(),
        initrd: guest::initrd(&g.initrd, &g.platform, mode, g.modules.as_ref())?,
        cmdline: guest::cmdline(&g.args.append),
        console,
        interactive,
        timeout,
        watch,
    };
    vmm::run(spec)
}

#[cfg(not(target_arch = "aarch64"))]
fn boot_direct(
    _: &Resolved,
    _: &Mode,
    _: Box<dyn Write + Send>,
    _: bool,
    _: Option<Duration>,
    _: Arc<Watch>,
) -> Result<RunReport> {
    bail!("direct boots need an aarch64 host")
}

fn run(g: &Resolved, mode: Mode, out: Option<&Path>, watch: Arc<Watch>) -> Result<i32> {
    let timeout = g.timeout(None);
    if g.nested {
        let stage = Stage::new()?;
        let mut job = vec!["run".to_string()];
        job.extend(g.inner_args(&stage, "run", timeout)?);
        if let Mode::Run(cmd) = &mode {
            job.extend(["--cmd".into(), cmd.clone()]);
        }
        if out.is_some() {
            job.extend(["--out".into(), "/out".into()]);
        }
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
        return Ok(match end {
            Level1End::Done(s) => s[0].unwrap_or(Status::VmmError.code()),
            Level1End::Timeout => Status::Timeout.code(),
            Level1End::Interrupted => Status::Interrupted.code(),
            Level1End::Failed(m) => bail!("{m}"),
        });
    }
    let log = match out {
        Some(o) => {
            Some(std::fs::File::create(o.join("console.log")).context("creating console.log")?)
        }
        None => None,
    };
    let sink = harness::console::ConsoleSink::new(log, true, None, watch.clone());
    let report = boot_direct(g, &mode, Box::new(sink), true, timeout, watch)?;
    let _ = std::io::stdout().flush();
    eprintln!("\r\n[gracevm] {}", report.end.describe());
    if let Some(o) = out {
        write_run_report(o, &report)?;
    }
    Ok(report.end.status().code())
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

fn test(
    runs: &[ScenarioRun],
    out: &Path,
    parallel: usize,
    run_report: bool,
    watch: Arc<Watch>,
) -> Result<i32> {
    let started = std::time::SystemTime::now();
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
    let c = &summary.counts;
    info!("results in {}", out.display());
    // The plain closing line CI systems read.
    eprintln!(
        "summary: {} passed, {} failed, {} skipped",
        c.pass,
        c.fail,
        c.skip + c.xfail
    );
    Ok(summary.exit_code)
}

/// kcidb.json beside results.json: the build record (if given) and the kernel's checksum name
/// what was tested.
fn write_kcidb(
    g: &Resolved,
    summary: &Summary,
    out: &Path,
    started: std::time::SystemTime,
) -> Result<()> {
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
    let timeout = g.timeout(Some(300));
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
    let report = match boot_direct(
        g,
        &Mode::Test(g.request()),
        Box::new(sink),
        false,
        timeout,
        watch,
    ) {
        Ok(r) => r,
        Err(e) => RunReport {
            end: GuestEnd::VmmFailure(format!("{e:#}")),
            boot_time: None,
            vmm_ready: Duration::ZERO,
            wall: Duration::ZERO,
        },
    };
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
    for r in runs {
        let timeout = r.guest.timeout(Some(300));
        total += timeout.unwrap_or_default();
        let dir = out.join(&r.name);
        create_out(&dir)?;
        let _ = std::fs::remove_file(dir.join("results.json"));
        let mut job = vec!["test".to_string()];
        job.extend(r.guest.inner_args(&stage, &r.name, timeout)?);
        // The inner gracevm writes out/<name>/ itself (console.log, results.json).
        job.extend([
            "--out".into(),
            "/out".into(),
            "--name".into(),
            r.name.clone(),
            "--nested-job".into(),
        ]);
        jobs.push(job);
    }
    let first = &runs[0].guest;
    let l1 = first.level1()?;
    let end = NestedRun {
        level1: &l1,
        stage: &stage,
        jobs,
        out: Some(out),
        interactive: false,
        // Room for the `parallel` largest scenarios at once.
        memory_mib: {
            let mut need: Vec<u64> = runs.iter().map(|r| r.guest.level1_memory_mib()).collect();
            need.sort_unstable_by(|a, b| b.cmp(a));
            need.iter().take(parallel.max(1)).sum::<u64>().max(1024)
        },
        timeout: Some(total),
        watch,
        parallel,
    }
    .run()?;
    let lost = |name: &str, why: GuestEnd| {
        let r = RunReport {
            end: why,
            boot_time: None,
            vmm_ready: Duration::ZERO,
            wall: Duration::ZERO,
        };
        evaluate(name, &r, &Default::default(), None, None)
    };
    Ok(runs
        .iter()
        .map(|r| {
            let inner: Option<ScenarioResult> =
                std::fs::read_to_string(out.join(&r.name).join("results.json"))
                    .ok()
                    .and_then(|s| serde_json::from_str::<SummaryIn>(&s).ok())
                    .and_then(|mut s| s.scenarios.pop());
            match (&end, inner) {
                (_, Some(s)) => s,
                (Level1End::Timeout, None) => lost(&r.name, GuestEnd::Timeout),
                (Level1End::Interrupted, None) => lost(&r.name, GuestEnd::Interrupted),
                (Level1End::Failed(m), None) => lost(&r.name, GuestEnd::VmmFailure(m.clone())),
                (Level1End::Done(_), None) => lost(
                    &r.name,
                    GuestEnd::VmmFailure(
                        "the gracevm inside level 1 left no results.json (see level1-console.log)"
                            .into(),
                    ),
                ),
            }
        })
        .collect())
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

/// `gracevm merge`: the scenarios of every run, in name order, as one summary.
fn merge(runs: &[PathBuf], out: &Path) -> Result<i32> {
    let mut scenarios = Vec::new();
    let mut reports = Vec::new();
    for dir in runs {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Usage(format!(
                "{}: {e} (merge takes the output directories of gracevm test runs)",
                path.display()
            ))
        })?;
        let summary: SummaryIn = serde_json::from_str(&text).map_err(|e| {
            Usage(format!(
                "{} is not a gracevm results.json: {e}",
                path.display()
            ))
        })?;
        scenarios.extend(summary.scenarios);
        if let Ok(text) = std::fs::read_to_string(dir.join("kcidb.json")) {
            reports.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("reading {}/kcidb.json", dir.display()))?,
            );
        }
    }
    scenarios.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = scenarios.windows(2).find(|w| w[0].name == w[1].name) {
        return usage(format!(
            "scenario {} is in more than one run: shards of one matrix do not overlap",
            w[0].name
        ));
    }
    create_out(out)?;
    let summary = Summary::new(scenarios);
    summary.write(out)?;
    if !reports.is_empty() {
        kcidb::write(out, &kcidb::merge(&reports))?;
    }
    print!("{}", summary.ktap());
    let c = &summary.counts;
    eprintln!(
        "summary: {} passed, {} failed, {} skipped",
        c.pass,
        c.fail,
        c.skip + c.xfail
    );
    Ok(summary.exit_code)
}

/// results.json as read back from a nested run.
#[derive(serde::Deserialize)]
struct SummaryIn {
    scenarios: Vec<ScenarioResult>,
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
