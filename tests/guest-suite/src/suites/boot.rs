//! Did the guest boot into the machine the VMM described: our init, all vCPUs, all RAM, and a
//! kernel configured for the rest of the suite.

use std::collections::BTreeSet;

use crate::kconfig::{self, Unavailable};
use crate::kmod::{self, InTree};
use crate::kmsg::{self, Kmsg};
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::procfs::{self, bytes};
use crate::registry::{Context, Test};

pub const TESTS: &[Test] = &[
    Test::new("userspace_reached", userspace_reached).during_fill(),
    Test::new("cpus_online", cpus_online).during_fill(),
    Test::new("ram_size", ram_size).during_fill(),
    Test::new("kernel_config", kernel_config).during_fill(),
    Test::new("kernel_modules", kernel_modules).during_fill(),
    Test::new("kernel_log_boot", kernel_log_boot).during_fill(),
];

/// PID 1 is the gracevm `/init` and `/` is still the initramfs.
fn userspace_reached(_ctx: &Context) -> Outcome {
    let mut checks = Checks::new();
    let cmdline = check!(procfs::read("/proc/1/cmdline"));
    let args = procfs::split_cmdline(&cmdline);
    // A binary init runs as argv[0] == "/init"; our shell-script init as "sh /init".
    checks.expect(args.contains(&"/init"), || {
        format!(
            "PID 1: expected /init (gracevm's init), observed /proc/1/cmdline {:?}",
            args.join(" ")
        )
    });
    let mounts = check!(procfs::read("/proc/mounts"));
    match procfs::root_fstype(&mounts) {
        Some(fstype) => checks.expect_eq("filesystem of / (initramfs)", "rootfs", fstype),
        None => checks.fail("/proc/mounts has no mount of /"),
    }
    checks.outcome()
}

/// Every vCPU the VMM created is present and online, and no more.
fn cpus_online(ctx: &Context) -> Outcome {
    let count = check!(ctx.env.require_u64("GRACEVM_CPUS"));
    let Ok(count) = u32::try_from(count) else {
        return Outcome::fail(format!("GRACEVM_CPUS={count} is out of range"));
    };
    if count == 0 {
        return Outcome::fail("GRACEVM_CPUS=0 is not a machine");
    }
    let expected: BTreeSet<u32> = (0..count).collect();
    let expected_list = procfs::format_cpu_list(&expected);
    let mut checks = Checks::new();
    for file in ["online", "present"] {
        let path = format!("/sys/devices/system/cpu/{file}");
        let raw = check!(procfs::read(&path));
        let raw = raw.trim();
        match procfs::parse_cpu_list(raw) {
            Ok(cpus) => checks.expect(cpus == expected, || {
                format!("{path}: expected {expected_list}, observed {raw}")
            }),
            Err(e) => checks.fail(format!("{path}: {e}")),
        }
    }
    let cpuinfo = check!(procfs::read("/proc/cpuinfo"));
    let processors = procfs::count_processors(&cpuinfo);
    checks.expect(processors == count as usize, || {
        format!("/proc/cpuinfo: expected {count} processor lines, observed {processors}")
    });
    if checks.failed() {
        if let Ok(config) = kconfig::kernel_config() {
            if let Some(limit) = config.value("NR_CPUS") {
                note(format!("kernel CONFIG_NR_CPUS={limit}"));
            }
        }
    }
    checks.outcome()
}

/// The kernel's System RAM is exactly the RAM the VMM's memory map gives it.
fn ram_size(ctx: &Context) -> Outcome {
    let expected = check!(ctx.env.require_u64("GRACEVM_SYSTEM_RAM"));
    let iomem = check!(procfs::read("/proc/iomem"));
    let entries = check!(procfs::parse_iomem(&iomem).map_err(Outcome::Fail));
    if !entries.is_empty() && entries.iter().all(|e| e.start == 0 && e.end == 0) {
        return Outcome::fail("/proc/iomem shows only zero addresses: the suite is not root");
    }
    let ram = procfs::top_level(&entries, "System RAM");
    let total: u64 = ram.iter().map(|entry| entry.size()).sum();
    let ranges = ram
        .iter()
        .map(|e| format!("{:#x}-{:#x}", e.start, e.end))
        .collect::<Vec<_>>()
        .join(", ");
    let meminfo = check!(procfs::read("/proc/meminfo"));
    let Some(mem_total_kib) = procfs::meminfo_kib(&meminfo, "MemTotal") else {
        return Outcome::fail("/proc/meminfo has no MemTotal");
    };
    let mem_total = mem_total_kib.saturating_mul(1024);
    let summary = format!(
        "System RAM {} in {} top-level range(s) [{ranges}]; MemTotal {}",
        bytes(total),
        ram.len(),
        bytes(mem_total)
    );
    let mut checks = Checks::new();
    checks.expect(total == expected, || {
        format!(
            "System RAM in /proc/iomem: expected {}, observed {}",
            bytes(expected),
            bytes(total)
        )
    });
    checks.expect(mem_total <= expected, || {
        format!(
            "MemTotal in /proc/meminfo: expected at most {}, observed {}",
            bytes(expected),
            bytes(mem_total)
        )
    });
    if checks.failed() {
        checks.fail(summary);
    } else {
        note(summary);
    }
    checks.outcome()
}

/// What the guest infrastructure itself needs from the kernel (init, devmem boot timer,
/// MMIO tests through /dev/mem).
const REQUIRED: &[(&str, bool)] = &[
    ("BLK_DEV_INITRD", true),
    ("DEVTMPFS", true),
    ("TMPFS", true),
    ("PROC_FS", true),
    ("SYSFS", true),
    ("SERIAL_AMBA_PL011_CONSOLE", true),
    ("DEVMEM", true),
    ("STRICT_DEVMEM", false),
];

/// Features later suites depend on: reported, not required (those suites SKIP without them).
const FEATURES: &[&str] = &[
    "ACPI",
    "EFI",
    "NUMA",
    "PCI",
    "VFIO_PCI",
    "VFIO_NOIOMMU",
    "NVGRACE_GPU_VFIO_PCI",
    "NVGRACE_EGM",
    "KVM",
];

/// /proc/config.gz is readable and has what the guest side of gracevm relies on.
fn kernel_config(_ctx: &Context) -> Outcome {
    let config = match kconfig::kernel_config() {
        Ok(config) => config,
        Err(Unavailable::Absent) => {
            return Outcome::skip(format!(
                "{} absent (kernel without CONFIG_IKCONFIG_PROC)",
                kconfig::CONFIG_GZ
            ))
        }
        Err(Unavailable::Unreadable(why)) => return Outcome::fail(why),
    };
    let mut checks = Checks::new();
    for &(option, wanted) in REQUIRED {
        let has = config.has(option);
        let value = config.value(option).unwrap_or("(absent)");
        checks.expect(has == wanted, || {
            let want = if wanted { "y" } else { "not set" };
            format!(
                "{}: expected {want}, observed {value}",
                kconfig::full_name(option)
            )
        });
    }
    let features = FEATURES
        .iter()
        .map(|option| format!("{option}={}", config.value(option).unwrap_or("n")))
        .collect::<Vec<_>>()
        .join(" ");
    note(format!("kernel features: {features}"));
    checks.outcome()
}

/// The drivers under test that a kernel may build as modules.
const MODULAR_DRIVERS: &[(&str, &str)] = &[
    ("NVGRACE_GPU_VFIO_PCI", "nvgrace-gpu-vfio-pci"),
    ("NVGRACE_EGM", "nvgrace-egm"),
];

/// The modules gracevm asked /init to load (`GRACEVM_MODPROBE`, from the tree it appended) are
/// loaded: the tree is this kernel's, and each module the tree has is live. Without a tree, a
/// kernel that builds a driver under test as a module fails here, saying what to pass.
fn kernel_modules(ctx: &Context) -> Outcome {
    let Some(wanted) = ctx.env.get("GRACEVM_MODPROBE") else {
        let modular: Vec<&str> = match kconfig::kernel_config() {
            Ok(config) => MODULAR_DRIVERS
                .iter()
                .filter(|(option, _)| config.value(option) == Some("m"))
                .map(|&(_, module)| module)
                .filter(|module| !kmod::loaded(module))
                .collect(),
            Err(_) => Vec::new(),
        };
        if !modular.is_empty() {
            return Outcome::fail(format!(
                "the kernel builds {} as {} but gracevm was given no module tree: pass \
                 --modules (make: MODULES=, or `make kernel` installs it beside the build)",
                modular.join(", "),
                if modular.len() == 1 {
                    "a module"
                } else {
                    "modules"
                }
            ));
        }
        return Outcome::skip("no module tree given (gracevm --modules): nothing to load");
    };
    let Some(release) = kmod::release() else {
        return Outcome::fail("/proc/sys/kernel/osrelease is unreadable");
    };
    let tree = kmod::tree_dir(&release);
    if !std::path::Path::new(&tree).is_dir() {
        return Outcome::fail(format!(
            "{tree} absent: the module tree gracevm appended is for Linux {}, this kernel is {release}",
            ctx.env.get("GRACEVM_MODULES_RELEASE").unwrap_or("?")
        ));
    }
    let mut checks = Checks::new();
    let mut seen = Vec::new();
    for module in wanted.split_whitespace() {
        match kmod::in_tree(&tree, module) {
            InTree::Module => {
                checks.expect(kmod::loaded(module), || {
                    format!(
                        "{module}: in {tree}/modules.dep but not loaded (the console log's \
                         gracevm-init lines say why)"
                    )
                });
                seen.push(format!("{module} (module)"));
            }
            InTree::BuiltIn => seen.push(format!("{module} (built in)")),
            InTree::Absent => seen.push(format!("{module} (not in this kernel)")),
        }
    }
    if !checks.failed() {
        note(format!("Linux {release}: {}", seen.join(", ")));
    }
    checks.outcome()
}

/// The kernel log from boot up to here (module loads included) holds no report: no oops, BUG,
/// WARNING, KASAN/KFENCE/UBSAN, lockdep, list corruption, hung task or RCU stall. Later tests
/// are judged on their own windows by the runner.
fn kernel_log_boot(_ctx: &Context) -> Outcome {
    let mut log = match Kmsg::from_start() {
        Ok(log) => log,
        Err(e) => return Outcome::fail(format!("cannot read {}: {e}", kmsg::KMSG)),
    };
    let window = log.drain();
    if window.records == 0 {
        return Outcome::fail(format!("{} gave no records", kmsg::KMSG));
    }
    note(format!("{} kernel log records since boot", window.records));
    if window.lost {
        note("the log wrapped before it was read: the oldest boot records are gone");
    }
    if window.reports.is_empty() {
        return Outcome::Pass;
    }
    let mut lines = vec![format!(
        "{} kernel report(s) during boot or module load",
        window.reports.len()
    )];
    lines.extend(kmsg::diagnostics(&window.reports, 5, 15));
    Outcome::fail(lines.join("\n"))
}
