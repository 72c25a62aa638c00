//! What gracevm tells the guest: the kernel command line and its own initrd archive with
//! `/gracevm/env` (mode, command, the expectations the in-guest suite checks).

use std::path::Path;

use anyhow::{Context, Result};

use firmware::layout;
use firmware::{Platform, Resolved};

use gracevm_contract::env::{BootMode, Carveout, Env, Gpu, ModuleLoad, RetiredTable, TableRoom};
use gracevm_contract::properties;

use crate::initramfs::Archive;
use crate::modules::Modules;

// The modes and the test request are part of the env file's contract.
pub use gracevm_contract::env::{Mode, TestRequest};

/// Kernel command line: a quiet console (every console byte is a trapped MMIO write, slow when
/// nested), reboot at once on panic so a panic ends the run, vfio without an IOMMU (the GPU
/// function is bound to vfio like on a real host), the EFI memory map in the kernel log (the
/// suite compares it with /proc/iomem; `quiet` keeps it off the console) while warnings and
/// worse still reach the console (`loglevel=5`: a WARNING or lockdep report is kept whole in
/// console.log, the suite's diagnostics carry only its first lines), then the user's additions.
pub fn cmdline(extra: &str) -> String {
    with_extra(
        "console=ttyAMA0 quiet loglevel=5 panic=-1 rdinit=/init vfio.enable_unsafe_noiommu_mode=1 efi=debug".into(),
        extra,
    )
}

/// The command line gracevm's own VMM boots: [`cmdline`] with the boot-timer register's
/// address, which the kernel hands to /init as an environment variable (an unknown NAME=value
/// word), so that /init marks userspace as its first act, before it reads a file. A plain qemu
/// boot (the benchmark's reference) has no such register and gets [`cmdline`] alone.
pub fn vmm_cmdline(extra: &str) -> String {
    with_extra(
        format!(
            "{} {}={:#x}",
            cmdline(""),
            gracevm_contract::env::key::BOOT_TIMER,
            layout::TESTDEV_BASE
        ),
        extra,
    )
}

fn with_extra(mut c: String, extra: &str) -> String {
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// The `/gracevm/env` file.
pub fn env_file(platform: &Resolved, mode: &Mode, modules: Option<&Modules>) -> String {
    let map = platform.map();
    Env {
        mode: mode.clone(),
        tests: platform.tests.clone(),
        modules: modules.map(|m| ModuleLoad {
            release: m.tree.release.clone(),
            modprobe: m.load.clone(),
        }),
        testdev: layout::TESTDEV_BASE,
        cpus: platform.vcpus,
        system_ram: platform.system_ram(),
        boot_mode: match platform.boot {
            firmware::BootMode::Acpi => BootMode::Acpi,
            firmware::BootMode::Dt => BootMode::Dt,
        },
        numa_nodes: memory_nodes(platform, map),
        carveouts: map.carve_outs.iter().map(carveout).collect(),
        retired_pages: map.carve_outs.iter().map(retired_table).collect(),
        table_room: map
            .carve_outs
            .iter()
            .map(|c| TableRoom {
                pxm: c.pxm,
                bytes: c.table_room(),
            })
            .collect(),
        gpus: map.gpus.iter().map(|g| gpu(platform, g)).collect(),
    }
    .write()
}

/// A carve-out and the seed of its boot pattern.
fn carveout(c: &firmware::CarveOut) -> Carveout {
    Carveout {
        pxm: c.pxm,
        base: c.range.base,
        size: c.range.size,
        seed: carveout_seed(c.pxm),
    }
}

/// A carve-out's retired-pages table and its entries in table order (what the EGM ioctl
/// should report).
fn retired_table(c: &firmware::CarveOut) -> RetiredTable {
    RetiredTable {
        pxm: c.pxm,
        table: c.retired_pages_table,
        pages: c.retired_pages.clone(),
    }
}

/// One GPU for the suite: where it is, what it is, and exactly the firmware properties its
/// node carries (fault knobs applied), so the suite can apply the driver's rules.
fn gpu(platform: &Resolved, g: &firmware::GpuFunction) -> Gpu {
    Gpu {
        bdf: format!("0000:00:{:02x}.{}", g.device, g.function),
        vendor: g.vendor_id,
        device: g.device_id,
        style: crate::board::gpu_style(g),
        readiness: g.readiness,
        mem_base: g.memory.base,
        mem_size: g.memory.size,
        props: firmware::gpu_properties(platform, g)
            .into_iter()
            .map(|(name, v)| (properties::short_name(name).to_string(), v))
            .collect(),
    }
}

/// The seed of a carve-out's boot pattern ("GRACE" and the PXM), see `testdev::pattern_word`.
pub fn carveout_seed(pxm: u32) -> u64 {
    0x4752_4143_4500_0000 | u64::from(pxm)
}

/// The NUMA nodes Linux gives the sockets' RAM. With ACPI it numbers proximity domains in the
/// order it parses SRAT: every GICC (CPU) entry, then Generic Initiators (GPUs), then memory
/// (RAM, then the carve-outs' hot-pluggable placeholders); the DT numbering follows the same
/// per-socket order. A socket without a CPU therefore gets a node after the GPUs'.
fn memory_nodes(platform: &Platform, map: &firmware::MemoryMap) -> String {
    let mut order: Vec<u32> = Vec::new();
    let mut see = |pxm: u32| {
        if !order.contains(&pxm) {
            order.push(pxm);
        }
    };
    if platform.boot == firmware::BootMode::Acpi {
        for cpu in 0..platform.vcpus {
            let s = layout::cpu_socket(cpu, platform.vcpus, map.ram.len());
            see(map.ram[s].pxm);
        }
        map.gpus.iter().for_each(|g| see(g.pxm));
    }
    map.ram.iter().for_each(|r| see(r.pxm));
    let mut nodes: Vec<usize> = map
        .ram
        .iter()
        .filter_map(|r| order.iter().position(|&p| p == r.pxm))
        .collect();
    nodes.sort_unstable();
    kernel_list(&nodes)
}

/// Linux's list syntax: "0", "0-3", "0-1,6-7".
fn kernel_list(ids: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            ids[i].to_string()
        } else {
            format!("{}-{}", ids[i], ids[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The user's initrd followed by gracevm's archive and the kernel's module tree.
pub fn initrd(
    base: &Path,
    platform: &Resolved,
    mode: &Mode,
    modules: Option<&Modules>,
) -> Result<Vec<u8>> {
    let mut data =
        std::fs::read(base).with_context(|| format!("reading initrd {}", base.display()))?;
    // Archives are concatenated on 4-byte boundaries.
    while data.len() % 4 != 0 {
        data.push(0);
    }
    let mut a = Archive::default();
    a.dir("/dev")?;
    a.char_dev("/dev/console", 0o600, 5, 1)?;
    a.dir("/gracevm")?;
    a.file(
        "/gracevm/env",
        0o644,
        env_file(platform, mode, modules).as_bytes(),
    )?;
    data.extend(a.finish()?);
    if let Some(m) = modules {
        data.extend(&m.tree.archive);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_env_file_carries_mode_and_expectations() {
        let p = Platform {
            vcpus: 3,
            ..Platform::default()
        }
        .resolve()
        .unwrap();
        let env = env_file(&p, &Mode::Run("echo 'hi'".into()), None);
        assert!(!env.contains("GRACEVM_MODPROBE"), "{env}");
        assert!(env.contains("GRACEVM_MODE=run\n"));
        assert!(env.contains(r"GRACEVM_CMD='echo '\''hi'\'''"), "{env}");
        assert!(env.contains("GRACEVM_CPUS=3\n"));
        assert!(env.contains(&format!("GRACEVM_SYSTEM_RAM={}\n", p.system_ram())));
        assert!(env.contains("GRACEVM_BOOT_TIMER=0x9010000\n"));
        assert!(env.contains("GRACEVM_NUMA_NODES=0\n"));
        // The default platform has one 1 GiB carve-out at PXM 4.
        assert!(
            env.contains("GRACEVM_CARVEOUTS='4:0x8000000000:0x40000000:0x4752414345000004'\n"),
            "{env}"
        );
        assert!(
            env.contains("GRACEVM_EGM_RETIRED_PAGES='4:0x40100000:'\n"),
            "{env}"
        );
        // ... and one GB200 at 00:01.0 with all six properties.
        let gpus = env
            .lines()
            .find(|l| l.starts_with("GRACEVM_GPUS="))
            .unwrap();
        assert!(
            gpus.contains("bdf=0000:00:01.0;id=10de:2941;style=blackwell;readiness=ready;"),
            "{gpus}"
        );
        for p in [
            "gpu-mem-base-pa:",
            "gpu-mem-size:0x40000000",
            "egm-pxm:0x4",
            "egm-base-pa:0x8000000000",
            "egm-size:0x40000000",
            "egm-retired-pages-data-base:",
        ] {
            assert!(gpus.contains(p), "{p} missing in {gpus}");
        }
    }

    #[test]
    fn test_modules_follow_the_env_archive() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix(
            std::env::temp_dir().join("gracevm-guest"),
        )
        .unwrap();
        let base = dir.as_path().join("base.cpio");
        std::fs::write(&base, b"070701base").unwrap();
        let mut tree = Archive::default();
        tree.dir("/lib/modules/7.3.4").unwrap();
        let m = Modules {
            tree: crate::modules::ModuleTree {
                release: "7.3.4".into(),
                archive: tree.finish().unwrap(),
                count: 0,
            },
            load: vec!["nvgrace-egm".into(), "nvgrace-gpu-vfio-pci".into()],
        };
        let p = Platform::default().resolve().unwrap();
        let env = env_file(&p, &Mode::Test(TestRequest::default()), Some(&m));
        assert!(env.contains("GRACEVM_MODULES_RELEASE='7.3.4'\n"), "{env}");
        assert!(
            env.contains("GRACEVM_MODPROBE='nvgrace-egm nvgrace-gpu-vfio-pci'\n"),
            "{env}"
        );
        let data = initrd(&base, &p, &Mode::Test(TestRequest::default()), Some(&m)).unwrap();
        assert!(data.starts_with(b"070701base\0\0"));
        assert!(data.ends_with(&m.tree.archive));
        let without = initrd(&base, &p, &Mode::Test(TestRequest::default()), None).unwrap();
        assert!(without.len() < data.len() && !without.ends_with(&m.tree.archive));
    }

    #[test]
    fn test_memory_nodes_follow_srat_parse_order() {
        let four = |vcpus: u32| {
            let mut text = format!("vcpus = {vcpus}\n");
            for _ in 0..4 {
                text += "[[socket]]\nram = \"256M\"\n";
            }
            for s in 0..4 {
                text += &format!("[[gpu]]\nsocket = {s}\nmem_size = \"1G\"\n");
            }
            let p = Platform::from_toml(&text, "t").unwrap();
            memory_nodes(&p, p.resolve().unwrap().map())
        };
        // A CPU on every socket: nodes 0-3. Two CPUs: sockets 2 and 3 come after the 4 GPUs.
        assert_eq!(four(4), "0-3");
        assert_eq!(four(2), "0-1,6-7");
        assert_eq!(kernel_list(&[0, 2, 3, 5]), "0,2-3,5");
        assert_eq!(kernel_list(&[]), "");
    }

    #[test]
    fn test_cmdline_appends_user_args() {
        assert!(cmdline("").starts_with("console=ttyAMA0 quiet loglevel=5 panic=-1 rdinit=/init"));
        assert!(cmdline("").contains(" vfio.enable_unsafe_noiommu_mode=1"));
        assert!(cmdline(" loglevel=7 ").ends_with(" efi=debug loglevel=7"));
    }

    #[test]
    fn test_vmm_cmdline_gives_init_the_boot_timer_before_user_args() {
        let c = vmm_cmdline("loglevel=7");
        assert!(c.starts_with(&cmdline("")));
        assert!(
            c.ends_with(" GRACEVM_BOOT_TIMER=0x9010000 loglevel=7"),
            "{c}"
        );
        // The reference boot has no test device: nothing for its /init to write to.
        assert!(!cmdline("").contains("GRACEVM_BOOT_TIMER"));
    }
}
