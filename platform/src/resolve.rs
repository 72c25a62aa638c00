//! What the command line names, checked and resolved before anything boots: the kernel,
//! initrd and module tree, the platform description, the route, and the scenarios to test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use log::info;

use firmware::{Platform, Resolved as ResolvedPlatform};
use gracevm::guest::TestRequest;
use gracevm::modules::{ModuleTree, Modules};
use gracevm::nested::{self, InnerGuest, Level1, Stage};
use gracevm_contract::protocol;

use crate::cli::{usage, GuestArgs, Route, Usage};

/// The guest arguments checked and resolved: nothing boots until all of this holds.
pub(crate) struct Resolved {
    pub args: GuestArgs,
    /// The platform resolved once (description and memory map), for everything downstream.
    pub platform: ResolvedPlatform,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub modules: Option<Modules>,
    pub nested: bool,
}

impl Resolved {
    pub fn new(a: &GuestArgs) -> Result<Self> {
        check_expect(&a.expect)?;
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
            Some(path) => Some(load_modules(path, &kernel, a)?),
            None => None,
        };
        Ok(Resolved {
            args: a.clone(),
            platform,
            kernel,
            initrd,
            modules,
            nested: nested_route(a.route)?,
        })
    }

    /// The same guest on another description (a scenario): what the files resolved to (kernel,
    /// initrd, the packed module tree) is kept, not read again.
    fn with_platform(&self, args: GuestArgs, platform: ResolvedPlatform) -> Resolved {
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
    pub fn request(&self) -> TestRequest {
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

    pub fn timeout(&self, default: Option<u64>) -> Option<Duration> {
        self.args.timeout.or(default).map(Duration::from_secs)
    }

    /// What a test run of this guest may take: the timeout, stretched for platforms with more
    /// than 2 GiB of EGM carve-outs (opening a region zeroes it, and the suite opens each one
    /// several times), by their size over 2 GiB.
    pub fn test_timeout(&self, default: u64) -> Option<Duration> {
        let carved: u64 = self
            .platform
            .map()
            .carve_outs
            .iter()
            .map(|c| c.range.size)
            .sum();
        let factor = (carved as f64 / (2u64 << 30) as f64).max(1.0);
        self.timeout(Some(default)).map(|t| t.mul_f64(factor))
    }

    pub fn level1(&self) -> Result<Level1> {
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

    /// This guest for the gracevm inside level 1 (the nested route).
    pub fn inner(&self, timeout: Option<Duration>) -> InnerGuest<'_> {
        InnerGuest {
            kernel: &self.kernel,
            initrd: &self.initrd,
            modules: self.modules.as_ref(),
            platform_file: self.args.platform.as_deref(),
            vcpus: self.platform.vcpus,
            boot_ram: self.platform.boot_ram(),
            append: &self.args.append,
            eager_fill: self.args.eager_fill,
            request: self.request(),
            timeout,
        }
    }

    /// The argv of the same guest for the gracevm inside level 1, with files staged.
    pub fn inner_args(
        &self,
        stage: &Stage,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Vec<String>> {
        self.inner(timeout).args(stage, name)
    }

    /// Memory for the level-1 machine that runs this guest.
    pub fn level1_memory_mib(&self) -> u64 {
        nested::level1_memory_mib(self.platform.map())
    }
}

fn check_expect(expect: &[String]) -> Result<()> {
    if let Some(f) = expect
        .iter()
        .find(|f| !f.trim().is_empty() && !TestRequest::KNOWN.contains(&f.trim()))
    {
        return usage(format!(
            "--expect {f}: unknown feature (known: {})",
            TestRequest::KNOWN.join(", ")
        ));
    }
    Ok(())
}

/// The module tree at `path`, checked against the kernel it is for (unless the outer gracevm
/// of a nested run did).
fn load_modules(path: &Path, kernel: &Path, a: &GuestArgs) -> Result<Modules> {
    let tree = ModuleTree::load(path).map_err(|e| Usage(e.to_string()))?;
    if !a.modules_checked {
        tree.check_kernel(path, kernel)
            .map_err(|e| Usage(e.to_string()))?;
    }
    info!(
        "modules: {} for Linux {} from {}",
        tree.count,
        tree.release,
        path.display()
    );
    Ok(Modules {
        tree,
        load: a.modprobe.clone(),
    })
}

/// Whether guests run nested in qemu (true) or directly under this host's KVM.
fn nested_route(route: Route) -> Result<bool> {
    Ok(match route {
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
    })
}

/// The guest's platform: its description (or the default) with the command line's overrides,
/// resolved.
fn platform_for(a: &GuestArgs) -> Result<ResolvedPlatform> {
    let mut platform = load_platform(a.platform.as_deref())?;
    if let Some(c) = a.cpus {
        platform.vcpus = c;
    }
    if let Some(m) = a.memory {
        platform.sockets[0].ram = m;
    }
    Ok(platform
        .resolve()
        .map_err(|e| Usage(format!("platform: {e}")))?)
}

/// A platform description from a file, or the built-in Grace-like default.
pub fn load_platform(path: Option<&Path>) -> Result<Platform> {
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
pub(crate) struct ScenarioRun {
    pub name: String,
    pub guest: Resolved,
}

/// The scenarios a `test` runs: those named (or matching a glob) in `dir`, every one there with
/// `all`, or else the single guest of the command line under the name `single`.
pub fn scenario_list(
    guest: &GuestArgs,
    requested: &[String],
    all: bool,
    dir: &Path,
    single: &str,
) -> Result<Vec<ScenarioRun>> {
    let names = scenario_names(requested, all, dir)?;
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

/// The scenario names asked for, each once, in the order asked (globs expanded in name order).
fn scenario_names(requested: &[String], all: bool, dir: &Path) -> Result<Vec<String>> {
    let is_glob = |n: &str| n.contains(['*', '?']);
    let mut names: Vec<String> = Vec::new();
    if all {
        names.extend(listed_scenarios(dir)?);
    }
    // `--scenario 'egm-retired-*'`: every scenario whose name matches, in name order.
    for name in requested {
        if !is_glob(name) {
            names.push(name.clone());
            continue;
        }
        let matching: Vec<String> = listed_scenarios(dir)?
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
    Ok(names)
}

/// Every scenario in `dir`, by name, sorted.
fn listed_scenarios(dir: &Path) -> Result<Vec<String>> {
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
