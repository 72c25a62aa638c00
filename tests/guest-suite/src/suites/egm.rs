//! The EGM driver (`nvgrace-egm`, RFC v2 series): the test matrix of section 5 of
//! /work/shared/spec/egm-driver.md, one test (or a few) per item; messages say `5.N`.
//!
//! Every test first asks whether the kernel has the driver ([`egm::require_egm_kernel`]): a
//! kernel without it (the default Debian 7.3 build) reports each test as SKIP with the reason,
//! never as a pass. Then the platform: the GPUs (`GRACEVM_GPUS`, with exactly the properties
//! their firmware node carries), the carve-outs (`GRACEVM_CARVEOUTS`) and the retired-pages
//! tables (`GRACEVM_EGM_RETIRED_PAGES`); a test whose scenario is not on this platform SKIPs
//! saying which scenario it needs. Memory is checked from both sides: the guest through
//! `/dev/egm<pxm>`, the VMM through the test device's probe (PEEK, CHECK_PATTERN, CHECK_VALUE).
//!
//! Expected results are the v2 behaviour of the spec. Where v2 deviates from the intended
//! contract (the spec's review points) a test reports XFAIL naming the review point when it
//! observes the deviation, and PASS when it observes the intended behaviour, so a fix shows.
//!
//! Only a region whose `nvidia,egm-base-pa`/`nvidia,egm-size` are exactly a carve-out is ever
//! opened: opening zeroes the whole region, so a wrong base would wipe guest memory.
//!
//! Order matters: tests that change binding state run last — the shared-region unbind order
//! (rebinds afterwards), rmmod (modules only), and finally unbind-while-mapped, which leaves
//! the kernel in the state the review point describes (use-after-free) and the GPUs unbound.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::devmem::{self, Access};
use crate::egm::{
    self, ChildEnd, EgmRegion, Gpu, GpuExpect, Pipe, Readiness, RetiredPage, RetiredTable,
    EGM_AUX_DRIVER, EGM_MODULE, EGM_RETIRED_PAGES_LIST, EGM_UNKNOWN_CMD, GPU_DRIVER,
};
use crate::mapping::{Mapping, Sharing};
use gracevm_contract::findings::{self, Finding};
use gracevm_contract::kernel_log::{self, Report as KernelReport};

use crate::env::Carveout;
use crate::faults;
use crate::kconfig;
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::pci::PciDevice;
use crate::procfs::bytes;
use crate::registry::{Context, Test};
use crate::testdev::{Status, TestDev};

pub const TESTS: &[Test] = &[
    Test::new("egm_device_created", device_created).with_timeout(Duration::from_secs(120)),
    Test::new("egm_minor_reserved", minor_reserved).with_timeout(Duration::from_secs(120)),
    Test::new("egm_size_sysfs", size_sysfs).with_timeout(Duration::from_secs(120)),
    Test::new("egm_open_zeroes", open_zeroes).with_timeout(Duration::from_secs(300)),
    Test::new("egm_mmap_whole", mmap_whole).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_bounds", mmap_bounds).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_offset_alias", mmap_offset_alias).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_private", mmap_private).with_timeout(Duration::from_secs(180)),
    Test::new("egm_mmap_no_grow", mmap_no_grow).with_timeout(Duration::from_secs(180)),
    Test::new("egm_retired_pages_ioctl", retired_pages_ioctl)
        .with_timeout(Duration::from_secs(180)),
    Test::new("egm_retired_pages_protocol", retired_pages_protocol)
        .with_timeout(Duration::from_secs(180)),
    Test::new("egm_retired_table_limits", retired_table_limits)
        .with_timeout(Duration::from_secs(180))
        .with_known(known_retired),
    // After the mmap and ioctl tests: on a driver that lets a second open through (v1), using
    // that descriptor oopses, and what the dead task holds stalls the tests after it.
    Test::new("egm_open_exclusive", open_exclusive)
        .with_timeout(Duration::from_secs(300))
        .with_known(known_multi_open),
    Test::new("egm_missing_properties", missing_properties).with_timeout(Duration::from_secs(300)),
    Test::new("egm_poison", poison).with_timeout(Duration::from_secs(240)),
    Test::new("egm_poison_race", poison_race)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_no_locking),
    Test::new("egm_shared_region", shared_region).with_timeout(Duration::from_secs(300)),
    Test::new("egm_parallel_probe", parallel_probe)
        .with_timeout(Duration::from_secs(300))
        .with_known(known_no_locking),
    Test::new("egm_rmmod_while_open", rmmod_while_open)
        .with_timeout(Duration::from_secs(180))
        .with_known(known_module_exit),
    Test::new("egm_rmmod_orders", rmmod_orders).with_timeout(Duration::from_secs(180)),
    Test::new("egm_probe_fault_sweep", probe_fault_sweep)
        .with_timeout(Duration::from_secs(900))
        .with_known(known_probe_fault),
    Test::new("egm_unbind_while_open", unbind_while_open)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
    Test::new("egm_remove_while_open", remove_while_open)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
    Test::new("egm_remove_while_mapped", remove_while_mapped)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
    Test::new("egm_unbind_while_mapped", unbind_while_mapped)
        .with_timeout(Duration::from_secs(240))
        .with_known(known_detach),
];

/// Length of one VMM CHECK request: the vCPU waits in the MMIO exit while the VMM compares.
const VMM_CHUNK: u64 = 64 << 20;
/// How long a node may take to appear or go after a (un)bind returned.
const NODE_WAIT: Duration = Duration::from_secs(2);
/// An unbind slower than this is taken as waiting for the device's user.
const UNBIND_PATIENCE: Duration = Duration::from_secs(15);
/// v2 reserves minors 0..MAX_EGM_NODES-1.
const V2_RESERVED_MINORS: u32 = 4;

/// A word no boot pattern and no zeroing produces: `EGM`, a tag and the offset it is written at.
fn marker(tag: u64, offset: u64) -> u64 {
    0x4547_4d00_0000_0000 | (tag << 40) | (offset & 0xff_ffff_ffff)
}

/// The platform as the EGM tests see it.
#[derive(Debug)]
struct Machine {
    gpus: Vec<Gpu>,
    regions: Vec<EgmRegion>,
    tables: Option<Vec<RetiredTable>>,
    /// The kernel's page size.
    page: usize,
}

/// The EGM gate, then the platform facts. `need_carveouts`: SKIP without a carve-out.
fn machine(ctx: &Context, strict: bool, need_carveouts: bool) -> Result<Machine, Outcome> {
    egm::require_egm_kernel(&ctx.env, strict)?;
    let carveouts: Vec<Carveout> = match ctx.env.carveouts() {
        Ok(carveouts) => carveouts,
        Err(Outcome::Skip(_)) if !need_carveouts => Vec::new(),
        Err(other) => return Err(other),
    };
    let gpus = crate::gpus::gpus(&ctx.env)?;
    let tables = egm::retired_tables(&ctx.env)?;
    let regions = egm::plan_regions(&gpus, &carveouts);
    Ok(Machine {
        gpus,
        regions,
        tables,
        page: devmem::page_size(),
    })
}

impl Machine {
    fn limit(&self) -> usize {
        egm::table_limit(self.page)
    }

    fn retired(&self, region: &EgmRegion) -> Result<Vec<u64>, String> {
        egm::expected_retired_pages(region, self.tables.as_deref())
    }

    /// Why a region gets no node: its table is known to exceed what v2 accepts.
    fn rejected_table(&self, region: &EgmRegion) -> Option<usize> {
        self.retired(region)
            .ok()
            .map(|pages| pages.len())
            .filter(|&n| n > self.limit())
    }

    fn expectations(&self) -> String {
        self.gpus
            .iter()
            .map(|g| format!("{}: {}", g.bdf, egm::expect_gpu(g)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn no_region_skip(&self) -> Outcome {
        Outcome::skip(format!(
            "no GPU of this platform should create an EGM device ({})",
            self.expectations()
        ))
    }

    /// The first region that is exactly a carve-out (safe to open).
    fn openable(&self) -> Result<EgmRegion, Outcome> {
        if self.regions.is_empty() {
            return Err(self.no_region_skip());
        }
        self.regions
            .iter()
            .find(|r| r.carveout.is_some())
            .cloned()
            .ok_or_else(|| {
                Outcome::skip(format!(
                    "no EGM region is exactly a carve-out ({}): opening one would zero memory \
                     the VMM did not set aside",
                    self.regions
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })
    }
}

/// Binds the region's GPUs and waits for its node: `Fail` when a GPU does not bind or the node
/// does not appear, `Skip` when the table is one v2 rejects.
fn bring_up(m: &Machine, region: &EgmRegion) -> Result<(), Outcome> {
    for bdf in &region.gpus {
        let bound = egm::bind_gpu(bdf).map_err(|why| Outcome::fail(format!("5.1: {why}")))?;
        if !bound.already {
            note(format!(
                "bound {bdf} to {GPU_DRIVER} in {} ms",
                bound.took.as_millis()
            ));
        }
    }
    let node = egm::node_path(region.pxm);
    if egm::wait_for_path(&node, true, NODE_WAIT) {
        return Ok(());
    }
    if let Some(n) = m.rejected_table(region) {
        return Err(Outcome::skip(format!(
            "{node} absent: the region's retired-pages table has {n} entries, more than the {} \
             v2 accepts (egm_retired_table_limits covers it)",
            m.limit()
        )));
    }
    Err(Outcome::fail(format!(
        "5.1: {node} absent after binding {} to {GPU_DRIVER}",
        region.gpus.join(" ")
    )))
}

/// Gate, platform, an openable region, its GPUs bound and its node there.
fn ready(ctx: &Context) -> Result<(Machine, EgmRegion), Outcome> {
    let m = machine(ctx, false, true)?;
    let region = m.openable()?;
    bring_up(&m, &region)?;
    Ok((m, region))
}

/// Gate, platform, and every region that is exactly a carve-out (and has a table the driver
/// accepts) with its GPUs bound and its node there: the tests whose behaviour must hold for
/// every region, not only the first.
fn ready_all(ctx: &Context) -> Result<(Machine, Vec<EgmRegion>), Outcome> {
    let m = machine(ctx, false, true)?;
    m.openable()?;
    let regions: Vec<EgmRegion> = m
        .regions
        .iter()
        .filter(|r| r.carveout.is_some() && m.rejected_table(r).is_none())
        .cloned()
        .collect();
    for region in &regions {
        bring_up(&m, region)?;
    }
    Ok((m, regions))
}

fn open(region: &EgmRegion) -> Result<File, Outcome> {
    egm::open_node(region.pxm)
        .map_err(|e| Outcome::fail(format!("open {}: {e}", egm::node_path(region.pxm))))
}

fn io_fail(what: &str) -> impl Fn(std::io::Error) -> Outcome + '_ {
    move |e| Outcome::fail(format!("{what}: {e}"))
}

/// The VMM's view of the u64 at `gpa`.
fn vmm_peek(dev: &TestDev, gpa: u64) -> Result<u64, Outcome> {
    dev.peek(gpa)
        .map_err(|why| Outcome::fail(format!("VMM probe: {why}")))
}

/// Runs a CHECK command over `[base, base + len)` in chunks; the offset of the first mismatch.
fn vmm_check(
    dev: &TestDev,
    base: u64,
    len: u64,
    run: impl Fn(&TestDev, u64, u64) -> Result<Status, String>,
) -> Result<Option<u64>, Outcome> {
    let mut offset = 0;
    while offset < len {
        let chunk = VMM_CHUNK.min(len - offset);
        match run(dev, base + offset, chunk) {
            Ok(Status::Ok) => {}
            Ok(Status::Mismatch { at }) => return Ok(Some(offset + at)),
            Ok(status) => {
                return Err(Outcome::fail(format!(
                    "VMM probe of [{:#x}, +{chunk:#x}): {status}",
                    base + offset
                )))
            }
            Err(why) => return Err(Outcome::fail(format!("VMM probe: {why}"))),
        }
        offset += chunk;
    }
    Ok(None)
}

fn vmm_all_value(dev: &TestDev, base: u64, len: u64, value: u64) -> Result<Option<u64>, Outcome> {
    vmm_check(dev, base, len, |dev, addr, n| {
        dev.check_value(addr, n, value)
    })
}

fn vmm_boot_pattern(dev: &TestDev, base: u64, len: u64) -> Result<Option<u64>, Outcome> {
    vmm_check(dev, base, len, |dev, addr, n| dev.check_pattern(addr, n))
}

fn testdev(ctx: &Context) -> Result<TestDev, Outcome> {
    TestDev::from_env(&ctx.env)
}

/// Writes `value` through `map` at `offset` and checks the VMM sees it at `base + offset`.
fn expect_landed(
    checks: &mut Checks,
    dev: &TestDev,
    what: &str,
    map: &Mapping,
    offset: usize,
    gpa: u64,
    value: u64,
) -> Result<(), Outcome> {
    map.write_u64(offset, value);
    let back = map.read_u64(offset);
    checks.expect(back == value, || {
        format!("{what}: wrote {value:#x}, read back {back:#x}")
    });
    let seen = vmm_peek(dev, gpa)?;
    checks.expect(seen == value, || {
        format!("{what}: wrote {value:#x}, the VMM sees {seen:#x} at {gpa:#x}")
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5.1, 5.2: the objects
// ---------------------------------------------------------------------------------------------

/// 5.1: binding the GPU(s) creates `nvgrace_gpu_vfio_pci.egm.<pxm>` (bound to nvgrace_egm,
/// child of one of the region's GPUs) and `/dev/egm<pxm>`, a char device with mode 0600 whose
/// number is the class device's.
fn device_created(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, true, false));
    if m.regions.is_empty() {
        return m.no_region_skip();
    }
    let mut checks = Checks::new();
    let mut looked = 0;
    let mut devices = std::collections::BTreeMap::new();
    for region in &m.regions {
        let mut bound = true;
        for bdf in &region.gpus {
            match egm::bind_gpu(bdf) {
                Ok(result) if !result.already => note(format!(
                    "bound {bdf} to {GPU_DRIVER} in {} ms",
                    result.took.as_millis()
                )),
                Ok(_) => {}
                Err(why) => {
                    checks.fail(format!("5.1: {why}"));
                    bound = false;
                }
            }
        }
        if !bound {
            continue;
        }
        if let Some(n) = m.rejected_table(region) {
            note(format!(
                "egm{}: retired-pages table of {n} entries, rejected by v2 \
                 (egm_retired_table_limits)",
                region.pxm
            ));
            continue;
        }
        looked += 1;
        if let Some(dev) = check_region_objects(&mut checks, region) {
            if let Some(other) = devices.insert(dev, region.pxm) {
                checks.fail(format!(
                    "5.1: egm{other} and egm{} share device number {}:{}",
                    region.pxm, dev.0, dev.1
                ));
            }
        }
    }
    // Nothing in the class beyond the regions the platform has.
    let planned: BTreeSet<String> = m.regions.iter().map(|r| format!("egm{}", r.pxm)).collect();
    if let Ok(entries) = std::fs::read_dir(egm::EGM_CLASS) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            checks.expect(planned.contains(&name), || {
                format!(
                    "5.1: {}/{name} is no region of this platform ({:?})",
                    egm::EGM_CLASS,
                    planned
                )
            });
        }
    }
    if looked == 0 && !checks.failed() {
        return Outcome::skip(
            "every EGM region has a retired-pages table v2 rejects (egm_retired_table_limits)",
        );
    }
    checks.outcome()
}

fn check_region_objects(checks: &mut Checks, region: &EgmRegion) -> Option<(u32, u32)> {
    let aux = egm::aux_device_dir(region.pxm);
    if !egm::exists(&aux) {
        checks.fail(format!(
            "5.1: {aux} absent after binding {}",
            region.gpus.join(" ")
        ));
        return None;
    }
    let driver = egm::aux_driver(region.pxm);
    checks.expect(driver.as_deref() == Some(EGM_AUX_DRIVER), || {
        format!(
            "5.1: {aux}: expected bound to {EGM_AUX_DRIVER}, observed {}",
            driver.as_deref().unwrap_or("no driver")
        )
    });
    let parent = std::fs::canonicalize(&aux).ok().and_then(|path| {
        path.parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
    });
    checks.expect(
        parent
            .as_ref()
            .is_some_and(|p| region.gpus.iter().any(|g| g == p)),
        || {
            format!(
                "5.1: {aux}: parent {} is none of the region's GPUs {}",
                parent.as_deref().unwrap_or("(unknown)"),
                region.gpus.join(" ")
            )
        },
    );
    let node = egm::node_path(region.pxm);
    if !egm::wait_for_path(&node, true, NODE_WAIT) {
        checks.fail(format!("5.1: {node} absent ({aux} is there)"));
        return None;
    }
    let info = match egm::node_info(&node) {
        Ok(info) => info,
        Err(why) => {
            checks.fail(format!("5.1: {why}"));
            return None;
        }
    };
    // 0600 is also devtmpfs's default when a driver sets no mode: this fails only for a
    // driver that widens it.
    checks.expect(info.is_char && info.mode == 0o600, || {
        format!("5.1: {node}: expected crw------- (0600), observed {info}")
    });
    // Exactly one BDF link per GPU of the region (links are made when a GPU probes with
    // nvgrace-egm loaded), and nothing for GPUs of other regions.
    let class = egm::class_dir(region.pxm);
    let links: BTreeSet<String> = std::fs::read_dir(&class)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("0000:"))
                .collect()
        })
        .unwrap_or_default();
    let wanted: BTreeSet<String> = region.gpus.iter().cloned().collect();
    checks.expect(links == wanted, || {
        format!(
            "5.1: {class}: BDF links {:?}, expected one per GPU of the region {:?}",
            links, wanted
        )
    });
    for bdf in &region.gpus {
        checks.expect(bdf_link(region.pxm, bdf), || {
            format!("5.1: {class}/{bdf} does not lead to the GPU")
        });
    }
    note(format!(
        "{node}: {info}; {} under {} bound to {}",
        egm::aux_device_name(region.pxm),
        parent.as_deref().unwrap_or("?"),
        driver.as_deref().unwrap_or("nothing")
    ));
    Some((info.major, info.minor))
}

/// 5.1, review point: v2 reserves minors 0..3 (MAX_EGM_NODES) but uses the PXM (4..7 on
/// Grace) as the minor. XFAIL when a node's minor is outside 0..3.
fn minor_reserved(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, false));
    if m.regions.is_empty() {
        return m.no_region_skip();
    }
    let mut outside = Vec::new();
    let mut inside = Vec::new();
    let mut last_err = None;
    for region in &m.regions {
        if let Err(outcome) = bring_up(&m, region) {
            last_err = Some(outcome);
            continue;
        }
        let node = egm::node_path(region.pxm);
        match egm::node_info(&node) {
            Ok(info) if info.minor >= V2_RESERVED_MINORS => outside.push(format!(
                "{node} has minor {} (pxm {})",
                info.minor, region.pxm
            )),
            Ok(info) => inside.push(format!("{node} minor {}", info.minor)),
            Err(why) => return Outcome::fail(format!("5.1: {why}")),
        }
    }
    if outside.is_empty() && inside.is_empty() {
        return last_err.unwrap_or_else(|| Outcome::skip("no /dev/egm node to look at"));
    }
    if !outside.is_empty() {
        return Outcome::xfail(format!(
            "5.1 review point: minor numbers for PXM 4..7 outside the reserved 0..3: {}\n\
             v2 reserves {V2_RESERVED_MINORS} minors (MAX_EGM_NODES) and uses the PXM as the \
             minor; the reservation itself is not visible from userspace, so a fix that widens \
             it but keeps minor = PXM still shows here",
            outside.join(", ")
        ));
    }
    note(format!(
        "minors inside the reserved range: {}",
        inside.join(", ")
    ));
    Outcome::Pass
}

/// 5.2: `/sys/class/egm/egm<pxm>/egm_size` (and the same attribute under the auxiliary
/// device) reads `0x<size>\n`, the platform's EGM size.
fn size_sysfs(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, false));
    if m.regions.is_empty() {
        return m.no_region_skip();
    }
    let mut checks = Checks::new();
    let mut looked = 0;
    let mut last_err = None;
    for region in &m.regions {
        if let Err(outcome) = bring_up(&m, region) {
            last_err = Some(outcome);
            continue;
        }
        looked += 1;
        // The region's own nvidia,egm-size (regions of one platform may differ in size).
        let expected = format!("{:#x}\n", region.size);
        let path = format!("{}/egm_size", egm::class_dir(region.pxm));
        match std::fs::read_to_string(&path) {
            Ok(text) => checks.expect(text == expected, || {
                format!("5.2: {path}: expected {expected:?}, observed {text:?}")
            }),
            Err(e) => checks.fail(format!("5.2: cannot read {path}: {e}")),
        }
        // The class device hangs off the region's auxiliary device.
        let class = std::fs::canonicalize(egm::class_dir(region.pxm)).ok();
        let aux = std::fs::canonicalize(egm::aux_device_dir(region.pxm)).ok();
        let parent = class
            .as_deref()
            .and_then(|c| c.parent())
            .and_then(|p| p.parent());
        checks.expect(aux.is_some() && parent == aux.as_deref(), || {
            format!(
                "5.2: {} is not a child of {}",
                egm::class_dir(region.pxm),
                egm::aux_device_dir(region.pxm)
            )
        });
        note(format!("egm{}: egm_size {expected:?}", region.pxm));
    }
    if looked == 0 {
        return last_err.unwrap_or_else(|| Outcome::skip("no /dev/egm node to look at"));
    }
    checks.outcome()
}

// ---------------------------------------------------------------------------------------------
// 5.3, 5.4: open
// ---------------------------------------------------------------------------------------------

/// Dirties three words of the carve-out through /dev/mem (when the boot pattern is gone
/// already) and checks the VMM sees them.
fn dirty_through_devmem(dev: &TestDev, region: &EgmRegion) -> Result<(), Outcome> {
    for offset in [0, region.size / 2, region.size - 8] {
        let gpa = region.base + offset;
        let map = devmem::map(gpa, 8, Access::ReadWrite)
            .map_err(|why| Outcome::fail(format!("5.3: {why}")))?;
        let value = marker(3, offset);
        map.write_u64(0, value);
        let seen = vmm_peek(dev, gpa)?;
        if seen != value {
            return Err(Outcome::fail(format!(
                "5.3: wrote {value:#x} at {gpa:#x} through /dev/mem, the VMM sees {seen:#x}"
            )));
        }
    }
    Ok(())
}

/// 5.3: the VMM's boot pattern is intact before the first open (nobody touched the carve-out),
/// and the open zeroes the whole region (VMM CHECK_VALUE 0).
fn open_zeroes(ctx: &Context) -> Outcome {
    let (_m, regions) = check!(ready_all(ctx));
    let dev = check!(testdev(ctx));
    let mut checks = Checks::new();
    for (i, region) in regions.iter().enumerate() {
        let Some(carveout) = region.carveout else {
            continue;
        };
        match check!(vmm_boot_pattern(&dev, region.base, region.size)) {
            None => note(format!(
                "5.3: before the first open of egm{} the VMM sees the boot pattern over all {}",
                region.pxm,
                bytes(region.size)
            )),
            Some(at) if i == 0 => {
                let seen = check!(vmm_peek(&dev, region.base + at));
                note(format!(
                    "5.3: the carve-out no longer holds its boot pattern at +{at:#x} ({seen:#x}, \
                     pattern {:#x}): {} was opened before (a re-run?); dirtying it through \
                     /dev/mem",
                    carveout.pattern_word(at),
                    egm::node_path(region.pxm)
                ));
                check!(dirty_through_devmem(&dev, region));
            }
            // Opening an earlier region wrote into this one.
            Some(at) => {
                checks.fail(format!(
                    "5.3: egm{} lost its boot pattern at +{at:#x} before it was ever opened: \
                     opening another region wrote into it",
                    region.pxm
                ));
                check!(dirty_through_devmem(&dev, region));
            }
        }
        let start = Instant::now();
        let file = check!(open(region));
        let took = start.elapsed();
        match check!(vmm_all_value(&dev, region.base, region.size, 0)) {
            None => note(format!(
                "5.3: open of egm{} took {} ms; the VMM sees all {} zero",
                region.pxm,
                took.as_millis(),
                bytes(region.size)
            )),
            Some(at) => {
                let seen = check!(vmm_peek(&dev, region.base + at));
                checks.fail(format!(
                    "5.3: after the first open of egm{} the VMM sees {seen:#x} at +{at:#x}: \
                     expected the whole region zeroed",
                    region.pxm
                ));
            }
        }
        drop(file);
    }
    checks.outcome()
}

/// 5.4: a second open is EBUSY; dup and fork share the open; a close with a mapping alive
/// keeps it busy until munmap; the next open succeeds and zeroes again.
fn open_exclusive(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let node = egm::node_path(region.pxm);
    let page = m.page;
    let mut checks = Checks::new();
    let first = check!(open(&region));
    let second = egm::open_node(region.pxm);
    checks.expect(egm::errno(&second) == Some(libc::EBUSY), || {
        format!(
            "5.4: second concurrent open of {node}: expected EBUSY, observed {}",
            egm::result_name(&second)
        )
    });
    if let Ok(second) = &second {
        // A driver that lets a second open through must still serve it: use it (in a child,
        // which an oops kills rather than the test) and say what happened.
        checks.fail(format!(
            "5.4 [{}]: the second open succeeded; using it: {}",
            findings::V1_MULTI_OPEN.key,
            use_second_open(second.as_fd(), page)
        ));
    }
    drop(second);
    let dup = check!(first.try_clone().map_err(io_fail("5.4: dup")));
    let via_dup = egm::retired_pages_call(dup.as_fd(), EGM_RETIRED_PAGES_LIST, 8, 0);
    checks.expect(via_dup.is_ok(), || {
        format!(
            "5.4: EGM_RETIRED_PAGES_LIST through a dup: {}",
            egm::result_name(&via_dup)
        )
    });
    // A forked child shares the open file: it can use it, and cannot open again.
    let pxm = region.pxm;
    let inherited = first.as_fd();
    let mut child = check!(egm::fork_child(|| {
        let mut code = 0;
        match egm::open_node(pxm) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(_) => code |= 1,
            Ok(_) => code |= 2,
        }
        if egm::retired_pages_call(inherited, EGM_RETIRED_PAGES_LIST, 8, 0).is_err() {
            code |= 4;
        }
        code
    })
    .map_err(io_fail("fork")));
    match child.wait_timeout(Duration::from_secs(30)) {
        Some(ChildEnd::Exited(0)) => {}
        Some(ChildEnd::Exited(code)) => {
            checks.expect(code & 3 == 0, || {
                format!(
                    "5.4: a forked child's open of {node}: expected EBUSY, observed {}",
                    if code & 2 != 0 {
                        "success"
                    } else {
                        "another error"
                    }
                )
            });
            checks.expect(code & 4 == 0, || {
                "5.4: a forked child cannot use the inherited descriptor".into()
            });
        }
        other => checks.fail(format!("5.4: forked child: {other:?}")),
    }
    // Close with a mapping alive: the file stays open.
    let map = check!(
        Mapping::raw(first.as_fd(), page as u64, page, Sharing::Shared)
            .map_err(io_fail("5.4: mmap of one page"))
    );
    let value = marker(4, page as u64 + 8);
    check!(expect_landed(
        &mut checks,
        &dev,
        "5.4: write through the mapping",
        &map,
        8,
        region.base + page as u64 + 8,
        value
    ));
    drop(dup);
    drop(first);
    let while_mapped = egm::open_node(region.pxm);
    checks.expect(egm::errno(&while_mapped) == Some(libc::EBUSY), || {
        format!(
            "5.4: open after close with a mapping alive: expected EBUSY, observed {}",
            egm::result_name(&while_mapped)
        )
    });
    drop(while_mapped);
    drop(map);
    let again = egm::open_node(region.pxm);
    match &again {
        Ok(_) => {
            let gpa = region.base + page as u64 + 8;
            let seen = check!(vmm_peek(&dev, gpa));
            checks.expect(seen == 0, || {
                format!(
                    "5.4: reopen after close + munmap: the VMM still sees {seen:#x} at {gpa:#x} \
                     (expected zeroed again)"
                )
            });
            if let Some(at) = check!(vmm_all_value(&dev, region.base, region.size, 0)) {
                checks.fail(format!(
                    "5.4: reopen after close + munmap: the VMM sees non-zero at +{at:#x}"
                ));
            }
        }
        Err(e) => checks.fail(format!(
            "5.4: open after close + munmap: expected success, observed {e}"
        )),
    }
    drop(again);
    checks.outcome()
}

/// mmap and the retired-pages ioctl through a descriptor the driver should never have handed
/// out, in a child: what became of the child.
fn use_second_open(fd: std::os::fd::BorrowedFd<'_>, page: usize) -> String {
    let child = egm::fork_child(|| {
        let mut code = 0;
        if egm::retired_pages_call(fd, EGM_RETIRED_PAGES_LIST, 8, 0).is_err() {
            code |= 1;
        }
        match Mapping::raw(fd, 0, page, Sharing::Shared) {
            Ok(map) => {
                map.write_u64(0, marker(9, 0));
            }
            Err(_) => code |= 2,
        }
        code
    });
    match child {
        Err(e) => format!("fork failed: {e}"),
        Ok(mut child) => match child.wait_timeout(Duration::from_secs(30)) {
            Some(ChildEnd::Exited(0)) => "ioctl and mmap worked".into(),
            Some(ChildEnd::Exited(code)) => format!(
                "ioctl {}, mmap {}",
                if code & 1 != 0 { "failed" } else { "worked" },
                if code & 2 != 0 { "failed" } else { "worked" }
            ),
            Some(end) => format!(
                "the process using it {end} (a kernel oops dereferencing the descriptor's missing \
                 state; see the kernel report)"
            ),
            None => "the process using it hung for 30 s".into(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// 5.5: mmap
// ---------------------------------------------------------------------------------------------

/// 5.5: `mmap(len = size)` works, and words written through it land at the same offsets of
/// the carve-out as the VMM sees it; untouched memory reads 0 (zeroed by the open).
fn mmap_whole(ctx: &Context) -> Outcome {
    let (m, regions) = check!(ready_all(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page as u64;
    let mut checks = Checks::new();
    for region in &regions {
        let file = check!(open(region));
        let Ok(size) = usize::try_from(region.size) else {
            return Outcome::fail("region size beyond usize");
        };
        let map = check!(Mapping::raw(file.as_fd(), 0, size, Sharing::Shared)
            .map_err(io_fail("5.5: mmap(len = egm size)")));
        // The region's PXM in every marker: a node wired to another region shows.
        let tag = 0x50 | (region.pxm & 0xf);
        let offsets = [0, page + 8, region.size / 2 + 0x18, region.size - 8];
        for offset in offsets {
            check!(expect_landed(
                &mut checks,
                &dev,
                &format!("5.5: egm{} offset {offset:#x}", region.pxm),
                &map,
                offset as usize,
                region.base + offset,
                marker(tag, offset)
            ));
        }
        let untouched = 2 * page;
        let seen = map.read_u64(untouched as usize);
        checks.expect(seen == 0, || {
            format!(
                "5.5: egm{}: untouched offset {untouched:#x} reads {seen:#x} through the \
                 mapping, expected 0",
                region.pxm
            )
        });
        if let Some(at) = check!(vmm_all_value(&dev, region.base + untouched, page, 0)) {
            checks.fail(format!(
                "5.5: egm{}: the VMM sees non-zero at +{:#x}, a page nothing wrote",
                region.pxm,
                untouched + at
            ));
        }
        if !checks.failed() {
            note(format!(
                "5.5: egm{}: {} mapped; writes at {} seen by the VMM at the same offsets",
                region.pxm,
                bytes(region.size),
                offsets
                    .iter()
                    .map(|o| format!("{o:#x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    checks.outcome()
}

/// 5.5: bounds. `size + page` and `(size - page, 2 pages)` and `(size, 1 page)` and
/// `((1 << 40) + size, 1 page)` are EINVAL; `(size - page, 1 page)` works and lands at the
/// region's last page; an offset that overflows is EOVERFLOW; an impossible length fails.
fn mmap_bounds(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let size = region.size;
    let file = check!(open(&region));
    let fd = file.as_fd();
    let mut checks = Checks::new();
    let mut refused =
        |what: &str, offset: u64, len: usize, want: &[i32]| {
            let result = Mapping::raw(fd, offset, len, Sharing::Shared);
            let ok = egm::errno(&result).is_some_and(|e| want.contains(&e));
            checks.expect(ok, || {
                let extra = if result.is_ok()
                    && offset.checked_add(len as u64).is_some_and(|end| end > size)
                {
                    format!(
                        " (the mapping reaches beyond the region: [{}])",
                        findings::V1_MMAP_BOUNDS.key
                    )
                } else {
                    String::new()
                };
                format!(
                "5.5: {what} (offset {offset:#x}, len {len:#x}): expected {}, observed {}{extra}",
                want.iter().map(|&e| egm::errno_name(e)).collect::<Vec<_>>().join(" or "),
                egm::result_name(&result)
            )
            });
            // A wrongly granted mapping is dropped untouched.
        };
    let Ok(size_len) = usize::try_from(size) else {
        return Outcome::fail("region size beyond usize");
    };
    refused("len = size + page", 0, size_len + page, &[libc::EINVAL]);
    refused(
        "two pages from size - page",
        size - page as u64,
        2 * page,
        &[libc::EINVAL],
    );
    refused("one page at offset size", size, page, &[libc::EINVAL]);
    refused(
        "one page at (1 << 40) + size",
        (1 << egm::OFFSET_SHIFT) + size,
        page,
        &[libc::EINVAL],
    );
    // Bits from 40 up are discarded, bit 39 is not: a driver masking the offset lower
    // would map what 0 maps.
    refused(
        "one page at offset 1 << 39 (past the region)",
        1 << (egm::OFFSET_SHIFT - 1),
        page,
        &[libc::EINVAL],
    );
    // The mm core refuses these before the driver's mmap runs (do_mmap: file_mmap_ok gives
    // EOVERFLOW for an offset whose end wraps, a length beyond TASK_SIZE is ENOMEM): checked
    // so a broken kernel shows, but not counted as driver checks.
    let mut core = Vec::new();
    for (what, offset, len, want) in [
        (
            "offset overflowing the address space",
            !(page as u64 - 1),
            page,
            libc::EOVERFLOW,
        ),
        (
            "length overflowing the address space",
            0,
            !(page - 1),
            libc::ENOMEM,
        ),
    ] {
        let result = Mapping::raw(fd, offset, len, Sharing::Shared);
        core.push(format!("{what}: {}", egm::result_name(&result)));
        if result.is_ok() {
            checks.fail(format!(
                "5.5 (mm core): {what} was mapped; expected {}",
                egm::errno_name(want)
            ));
        }
    }
    note(format!(
        "5.5 refused by the mm core before the driver: {}",
        core.join("; ")
    ));
    match Mapping::raw(fd, size - page as u64, page, Sharing::Shared) {
        Ok(last) => check!(expect_landed(
            &mut checks,
            &dev,
            "5.5: (size - page, 1 page)",
            &last,
            page - 8,
            region.base + size - 8,
            marker(6, size - 8)
        )),
        Err(e) => checks.fail(format!(
            "5.5: one page at size - page: expected success, observed {e}"
        )),
    }
    checks.outcome()
}

/// 5.5: offset bits from 40 up are discarded: `1 << 40` maps what 0 maps, `(1 << 40) + x`
/// what `x` maps (writes through one are read through the other and seen by the VMM).
fn mmap_offset_alias(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let file = check!(open(&region));
    let fd = file.as_fd();
    let alias = 1u64 << egm::OFFSET_SHIFT;
    let mut checks = Checks::new();
    let low = check!(Mapping::raw(fd, 0, 2 * page, Sharing::Shared)
        .map_err(io_fail("5.5: mmap of 2 pages at 0")));
    let high = match Mapping::raw(fd, alias, 2 * page, Sharing::Shared) {
        Ok(map) => map,
        Err(e) => {
            return Outcome::fail(format!(
                "5.5: mmap of 2 pages at offset 1 << 40: expected success (aliases 0), \
                 observed {e}"
            ))
        }
    };
    let x = marker(7, 8);
    low.write_u64(8, x);
    let through_high = high.read_u64(8);
    checks.expect(through_high == x, || {
        format!("5.5: wrote {x:#x} at 0 + 8, offset (1 << 40) + 8 reads {through_high:#x}")
    });
    let y = marker(8, page as u64 + 16);
    high.write_u64(page + 16, y);
    let through_low = low.read_u64(page + 16);
    checks.expect(through_low == y, || {
        format!(
            "5.5: wrote {y:#x} at (1 << 40) + page + 16, offset page + 16 reads {through_low:#x}"
        )
    });
    for (gpa, value) in [(region.base + 8, x), (region.base + page as u64 + 16, y)] {
        let seen = check!(vmm_peek(&dev, gpa));
        checks.expect(seen == value, || {
            format!("5.5: the VMM sees {seen:#x} at {gpa:#x}, expected {value:#x}")
        });
    }
    let far = (3 << egm::OFFSET_SHIFT) | page as u64;
    match Mapping::raw(fd, far, page, Sharing::Shared) {
        Ok(map) => {
            let seen = map.read_u64(16);
            checks.expect(seen == y, || {
                format!("5.5: offset (3 << 40) | page + 16 reads {seen:#x}, expected {y:#x}")
            });
        }
        Err(e) => checks.fail(format!(
            "5.5: mmap at (3 << 40) | page: expected success (aliases page), observed {e}"
        )),
    }
    let top = alias + region.size - page as u64;
    match Mapping::raw(fd, top, page, Sharing::Shared) {
        Ok(map) => check!(expect_landed(
            &mut checks,
            &dev,
            "5.5: ((1 << 40) + size - page, 1 page)",
            &map,
            0,
            region.base + region.size - page as u64,
            marker(9, region.size - page as u64)
        )),
        Err(e) => checks.fail(format!(
            "5.5: one page at (1 << 40) + size - page: expected success, observed {e}"
        )),
    }
    checks.outcome()
}

/// 5.5, review point: v2 accepts MAP_PRIVATE, and writes then go to private COW pages, not to
/// the EGM region. XFAIL when a private mapping is granted and its write does not reach the
/// carve-out; PASS when MAP_PRIVATE is refused.
fn mmap_private(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let file = check!(open(&region));
    let map = match Mapping::raw(file.as_fd(), page as u64, page, Sharing::Private) {
        Ok(map) => map,
        Err(e) => {
            note(format!("5.5: MAP_PRIVATE refused: {e}"));
            return Outcome::Pass;
        }
    };
    let gpa = region.base + page as u64;
    let before = map.read_u64(0);
    let value = marker(10, page as u64);
    map.write_u64(0, value);
    let back = map.read_u64(0);
    let seen = check!(vmm_peek(&dev, gpa));
    if seen == value {
        return Outcome::fail(format!(
            "5.5: a MAP_PRIVATE write of {value:#x} reached the carve-out (the VMM sees it at \
             {gpa:#x}): private mappings must not write the region"
        ));
    }
    Outcome::xfail(format!(
        "5.5 review point: MAP_PRIVATE accepted (writes go to COW pages, not EGM): the \
         mapping read {before:#x}, then read back {back:#x} after writing {value:#x}; the VMM \
         still sees {seen:#x} at {gpa:#x}"
    ))
}

/// 5.5: the mapping cannot grow (VM_DONTEXPAND/VM_PFNMAP): mremap to two pages fails in place
/// and with MREMAP_MAYMOVE, and the mapping still works afterwards.
fn mmap_no_grow(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page;
    let file = check!(open(&region));
    let mut map = check!(Mapping::raw(file.as_fd(), 0, page, Sharing::Shared)
        .map_err(io_fail("5.5: mmap of one page")));
    let mut checks = Checks::new();
    for may_move in [false, true] {
        let what = if may_move {
            "with MREMAP_MAYMOVE"
        } else {
            "in place"
        };
        let result = map.remap(2 * page, may_move);
        checks.expect(result.is_err(), || {
            format!("5.5: mremap growth {what} to 2 pages succeeded: the mapping is expandable")
        });
        if let Err(e) = &result {
            note(format!("5.5: mremap growth {what}: {e}"));
        }
        if result.is_ok() {
            // Back to one page so the rest of the test looks at the original mapping.
            let _ = map.remap(page, false);
        }
    }
    check!(expect_landed(
        &mut checks,
        &dev,
        "5.5: write after the refused mremap",
        &map,
        0x20,
        region.base + 0x20,
        marker(11, 0x20)
    ));
    checks.outcome()
}

// ---------------------------------------------------------------------------------------------
// 5.6, 5.7: the retired-pages list
// ---------------------------------------------------------------------------------------------

/// 5.6: the list the ioctl reports is the scenario's retired pages (0, 3, many): offsets from
/// the EGM base, size PAGE_SIZE, compared as sets.
fn retired_pages_ioctl(ctx: &Context) -> Outcome {
    let (m, regions) = check!(ready_all(ctx));
    let mut checks = Checks::new();
    let mut looked = 0;
    for region in &regions {
        let pages = match m.retired(region) {
            Ok(pages) => pages,
            Err(why) => {
                note(format!("egm{}: {why}", region.pxm));
                continue;
            }
        };
        looked += 1;
        let file = check!(open(region));
        let reported = match egm::list_retired_pages(file.as_fd()) {
            Ok(list) => list,
            Err(why) => {
                checks.fail(format!("5.6: egm{}: {why}", region.pxm));
                continue;
            }
        };
        // Each region's own table: a list that belongs to another region shows here.
        let expected = egm::expected_list(&pages, region.base, m.page);
        let diff = egm::compare_lists(&expected, &reported);
        if !diff.is_empty() {
            checks.fail(format!(
                "5.6: egm{}: EGM_RETIRED_PAGES_LIST: expected {} entries, reported {}: {diff}",
                region.pxm,
                expected.len(),
                reported.len()
            ));
            continue;
        }
        note(format!(
            "5.6: egm{}: {} retired page(s) reported as expected{}",
            region.pxm,
            reported.len(),
            if reported.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    reported
                        .iter()
                        .take(4)
                        .map(|p| format!("{:#x}", p.offset))
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        ));
    }
    if looked == 0 {
        return Outcome::skip("no region's retired pages are known (GRACEVM_EGM_RETIRED_PAGES)");
    }
    checks.outcome()
}

/// 5.6: the protocol. argsz 8 answers the needed size with count 0; an exact or larger buffer
/// gets the entries; one entry too small answers the needed size with count 0; argsz 4 (and 0)
/// is EINVAL; a bad pointer is EFAULT even for an unknown command; an unknown command is
/// EINVAL (not ENOTTY).
fn retired_pages_protocol(ctx: &Context) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let file = check!(open(&region));
    let fd = file.as_fd();
    let mut checks = Checks::new();
    let call =
        |argsz: u32, room: usize| egm::retired_pages_call(fd, EGM_RETIRED_PAGES_LIST, argsz, room);
    let sizing = match call(egm::HEADER_SIZE, 0) {
        Ok(reply) => reply,
        Err(e) => return Outcome::fail(format!("5.6: EGM_RETIRED_PAGES_LIST with argsz 8: {e}")),
    };
    // v2 answers "too small" with 0; -ENOSPC is what review asked for: both carry the size.
    checks.expect(sizing.ret == 0 || sizing.ret == -libc::ENOSPC, || {
        format!(
            "5.6: return value with argsz 8: expected 0 (v2) or -ENOSPC, observed {}",
            sizing.ret
        )
    });
    let answers_zero = sizing.ret == 0;
    let needed = sizing.header.argsz;
    if needed < egm::HEADER_SIZE || (needed - egm::HEADER_SIZE) % egm::ENTRY_SIZE != 0 {
        return Outcome::fail(format!(
            "5.6: argsz 8 answered argsz {needed}: not 8 + 16 * n"
        ));
    }
    let n = ((needed - egm::HEADER_SIZE) / egm::ENTRY_SIZE) as usize;
    checks.expect_eq("5.6: count with argsz 8", 0, sizing.header.count);
    if let Ok(pages) = m.retired(&region) {
        checks.expect_eq(
            "5.6: needed argsz (8 + 16 * retired pages)",
            egm::list_argsz(pages.len()),
            needed,
        );
    }
    match call(needed, n) {
        Ok(full) => {
            checks.expect(full.ret == 0 || full.ret == n as i32, || {
                format!(
                    "5.6: exact buffer: return value {} (expected 0 or {n})",
                    full.ret
                )
            });
            checks.expect_eq(
                "5.6: count with an exact buffer",
                n as u32,
                full.header.count,
            );
            checks.expect(full.entries.iter().all(|e| e.size == m.page as u64), || {
                format!(
                    "5.6: entry sizes are not PAGE_SIZE {:#x}: {:?}",
                    m.page, full.entries
                )
            });
        }
        Err(e) => checks.fail(format!("5.6: exact buffer of {needed} bytes: {e}")),
    }
    match call(egm::list_argsz(n + 1), n + 1) {
        Ok(larger) => checks.expect_eq(
            "5.6: count with a larger buffer",
            n as u32,
            larger.header.count,
        ),
        Err(e) => checks.fail(format!("5.6: buffer one entry larger than needed: {e}")),
    }
    if n > 0 {
        match call(egm::list_argsz(n - 1), n) {
            Ok(small) => {
                checks.expect(small.ret == sizing.ret, || {
                    format!(
                        "5.6: return value, buffer one entry short: {} (argsz 8 gave {})",
                        small.ret, sizing.ret
                    )
                });
                checks.expect_eq(
                    "5.6: argsz answered to a buffer one entry short",
                    needed,
                    small.header.argsz,
                );
                checks.expect_eq("5.6: count, buffer one entry short", 0, small.header.count);
            }
            Err(e) => checks.fail(format!("5.6: buffer one entry short: {e}")),
        }
    } else {
        note("5.6: no retired pages: the one-entry-short case does not apply");
    }
    for argsz in [4, 0] {
        let result = call(argsz, 1);
        checks.expect(egm::errno(&result) == Some(libc::EINVAL), || {
            format!(
                "5.6: argsz {argsz}: expected EINVAL, observed {}",
                egm::result_name(&result)
            )
        });
    }
    let unknown = egm::retired_pages_call(fd, EGM_UNKNOWN_CMD, egm::HEADER_SIZE, 0);
    checks.expect(egm::errno(&unknown) == Some(libc::EINVAL), || {
        format!(
            "5.6: unknown command {EGM_UNKNOWN_CMD:#x}: expected EINVAL (not ENOTTY), observed {}",
            egm::result_name(&unknown)
        )
    });
    let no_access = check!(Mapping::inaccessible(m.page).map_err(io_fail("mmap PROT_NONE")));
    for (cmd, what) in [
        (EGM_RETIRED_PAGES_LIST, "EGM_RETIRED_PAGES_LIST"),
        (EGM_UNKNOWN_CMD, "an unknown command"),
    ] {
        let result = egm::raw_ioctl(fd, cmd, no_access.addr());
        checks.expect(egm::errno(&result) == Some(libc::EFAULT), || {
            format!(
                "5.6: {what} on an unreadable pointer: expected EFAULT, observed {}",
                egm::result_name(&result)
            )
        });
    }
    if !checks.failed() {
        note(format!(
            "5.6: protocol as specified with {n} retired page(s)"
        ));
    }
    if !checks.failed() && answers_zero {
        return Outcome::xfail(format!(
            "5.6 {}: a buffer too small for the list is answered with 0",
            findings::TOO_SMALL_BUFFER
        ));
    }
    checks.outcome()
}

/// 5.7: the table sizes around v2's one-page limit (4 KiB kernel: 511, 512, 513 entries).
/// Up to the limit: a node and the full list (at exactly 512 v2 reads one entry past its
/// one-page mapping — XFAIL only when that shows in the list). Beyond: the auxiliary probe
/// fails, no node, the GPU stays bound.
fn retired_table_limits(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, true));
    if m.regions.is_empty() {
        return m.no_region_skip();
    }
    let mut unknown = Vec::new();
    let mut chosen = None;
    for region in &m.regions {
        match m.retired(region) {
            Ok(pages) => {
                chosen = Some((region.clone(), pages));
                break;
            }
            Err(why) => unknown.push(why),
        }
    }
    let Some((region, pages)) = chosen else {
        return Outcome::skip(unknown.join("; "));
    };
    let n = pages.len();
    let limit = m.limit();
    // Entries the firmware could write: a table longer than its room (an isolated table is
    // one page) is cut short, and only refusing it is right.
    let room = region
        .carveout
        .and_then(|c| egm::table_room_entries(&ctx.env, c.pxm))
        .unwrap_or(usize::MAX);
    let fits = n <= room;
    if n + 1 < limit {
        return Outcome::skip(format!(
            "this scenario's retired-pages table has {n} entries; the limits need {}, {limit} \
             or more than {limit} ({} KiB pages)",
            limit - 1,
            m.page / 1024
        ));
    }
    let mut checks = Checks::new();
    for bdf in &region.gpus {
        if let Err(why) = egm::bind_gpu(bdf) {
            checks.fail(format!(
                "5.7: {why} (the GPU must stay bound whatever the table)"
            ));
        }
    }
    if checks.failed() {
        return checks.outcome();
    }
    let node = egm::node_path(region.pxm);
    let aux = egm::aux_device_dir(region.pxm);
    // Up to `limit - 1` entries must be accepted; more than `limit`, and a table cut short,
    // must be refused; at exactly `limit` either (v2 accepts it, a fixed driver refuses it:
    // the count takes the first 8 bytes of the page).
    let refused = !egm::wait_for_path(&node, true, NODE_WAIT);
    if refused && n < limit {
        return Outcome::fail(format!(
            "5.7: {node} absent with a {n}-entry table (the page holds the count and {} \
             entries)",
            limit - 1
        ));
    }
    if !refused && !fits {
        return Outcome::fail(format!(
            "5.7 [{}]: {node} exists with a {n}-entry table whose firmware page holds only {room} \
             entries: the driver read entries past the table's page",
            findings::RETIRED_OFF_BY_ONE.key
        ));
    }
    if !refused && n > limit {
        return Outcome::fail(format!(
            "5.7 [{}]: {node} exists with a {n}-entry table: v2 maps one page and refuses more \
             than {limit} entries",
            findings::V1_RETIRED_UNCHECKED.key
        ));
    }
    if refused {
        checks.expect(egm::exists(&aux), || {
            format!("5.7: {aux} absent: nvgrace-gpu should still create the auxiliary device")
        });
        let driver = egm::aux_driver(region.pxm);
        checks.expect(driver.is_none(), || {
            format!(
                "5.7: {aux} is bound to {} with a {n}-entry table: expected its probe to fail \
                 (v2 maps one page, at most {limit} entries)",
                driver.as_deref().unwrap_or("?")
            )
        });
        let class = egm::class_dir(region.pxm);
        checks.expect(!egm::exists(&class), || format!("5.7: {class} exists"));
        for bdf in &region.gpus {
            let bound = egm::pci_driver(bdf);
            checks.expect(bound.as_deref() == Some(GPU_DRIVER), || {
                format!(
                    "5.7: {bdf} is bound to {} after the EGM probe failed, expected {GPU_DRIVER}",
                    bound.as_deref().unwrap_or("nothing")
                )
            });
        }
        if !checks.failed() {
            note(format!(
                "5.7: {n} entries (room for {}, limit {limit}): aux probe failed, no {node}, \
                 GPU(s) still bound",
                if fits {
                    n.to_string()
                } else {
                    room.to_string()
                }
            ));
        }
        return checks.outcome();
    }
    let file = check!(open(&region));
    let reported = match egm::list_retired_pages(file.as_fd()) {
        Ok(list) => list,
        Err(why) => return Outcome::fail(format!("5.7: {why}")),
    };
    let expected = egm::expected_list(&pages, region.base, m.page);
    let diff = egm::compare_lists(&expected, &reported);
    if diff.is_empty() {
        if n == limit {
            note(format!(
                "5.7: {n} entries reported correctly; the off-by-one read past the one-page \
                 mapping (review point) is not observable here: the table lies in linear-mapped \
                 RAM, so entry {} is read from the next page, which holds it",
                n - 1
            ));
        } else {
            note(format!("5.7: {n} entries reported correctly"));
        }
        return Outcome::Pass;
    }
    let last = RetiredPage {
        offset: pages[n - 1].wrapping_sub(region.base),
        size: m.page as u64,
    };
    if n == limit
        && diff.missing == [last]
        && diff.unexpected.len() <= 1
        && diff.duplicates.is_empty()
    {
        return Outcome::xfail(format!(
            "5.7 review point: off-by-one at {limit} retired entries: entry {} (offset {:#x}) \
             lies past the one page v2 maps and came back wrong: {diff}",
            n - 1,
            last.offset
        ));
    }
    Outcome::fail(format!(
        "5.7: {n}-entry table: expected {} entries, reported {}: {diff}",
        expected.len(),
        reported.len()
    ))
}

// ---------------------------------------------------------------------------------------------
// 5.9: missing and zero properties
// ---------------------------------------------------------------------------------------------

fn props_text(gpu: &Gpu) -> String {
    if gpu.props.is_empty() {
        return "(none)".into();
    }
    gpu.props
        .iter()
        .map(|(name, value)| format!("{name}={value:#x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 5.9: each GPU does what section 1's table says for the properties its node carries:
/// gpu-mem missing or 0 → binds with plain vfio-pci ops, no EGM; egm-pxm missing → binds, no
/// EGM; egm-size/egm-base-pa/retired-pages base missing → probe fails; retired-pages base 0 →
/// probe fails with "Retired pages region is not setup".
fn missing_properties(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, false));
    let faulty: Vec<&Gpu> = m
        .gpus
        .iter()
        .filter(|g| g.readiness != Readiness::Never && !egm::has_all_properties(g))
        .collect();
    if faulty.is_empty() {
        return Outcome::skip(
            "no GPU of this scenario lacks an nvidia,* property or has one at 0 (needs \
             omit_properties/zero_properties, or a socket without a carve-out)",
        );
    }
    let region_pxms: BTreeSet<u64> = m.regions.iter().map(|r| r.pxm).collect();
    let mut checks = Checks::new();
    for gpu in &m.gpus {
        let expect = egm::expect_gpu(gpu);
        note(format!(
            "5.9: {}: {}; expected: {expect}",
            gpu.bdf,
            props_text(gpu)
        ));
        if expect == GpuExpect::NeverReady {
            continue;
        }
        // A fresh probe: the GPU suite bound these GPUs before, and a bound GPU is not probed
        // again.
        if let Err(why) = egm::unbind_gpu(&gpu.bdf) {
            checks.fail(format!("5.9: {why}"));
            continue;
        }
        let mark = egm::LogMark::now();
        let result = match egm::try_bind(&gpu.bdf) {
            Ok(result) => result,
            Err(why) => {
                checks.fail(format!("5.9: {why}"));
                continue;
            }
        };
        let said = || {
            let lines: Vec<String> = mark
                .new_lines()
                .into_iter()
                .filter(|l| l.contains(&gpu.bdf))
                .collect();
            if lines.is_empty() {
                String::new()
            } else {
                format!(" (kernel: {})", lines.join(" | "))
            }
        };
        let children = egm::aux_children(&gpu.bdf);
        match &expect {
            GpuExpect::PlainVfio(_) | GpuExpect::NoEgm => {
                checks.expect(result.bound, || {
                    format!(
                        "5.9: {}: expected it to bind ({expect}), it did not{}",
                        gpu.bdf,
                        said()
                    )
                });
                checks.expect(children.is_empty(), || {
                    format!(
                        "5.9: {}: expected no EGM device ({expect}), found {}",
                        gpu.bdf,
                        children.join(" ")
                    )
                });
            }
            GpuExpect::ProbeFails { why, log } => {
                checks.expect(!result.bound, || {
                    format!(
                        "5.9: {}: expected its probe to fail ({why}), it bound",
                        gpu.bdf
                    )
                });
                checks.expect(children.is_empty(), || {
                    format!(
                        "5.9: {}: EGM device {} left behind",
                        gpu.bdf,
                        children.join(" ")
                    )
                });
                if let Some(message) = log {
                    let lines = mark.new_lines();
                    checks.expect(
                        lines
                            .iter()
                            .any(|l| l.contains(message) && l.contains(&gpu.bdf)),
                        || {
                            format!(
                                "5.9: {}: no kernel message {message:?} after its probe",
                                gpu.bdf
                            )
                        },
                    );
                }
            }
            GpuExpect::Egm(props) => {
                checks.expect(result.bound, || {
                    format!(
                        "5.9: {}: expected it to bind with EGM, it did not{}",
                        gpu.bdf,
                        said()
                    )
                });
                let aux = egm::aux_device_dir(props.pxm);
                checks.expect(egm::exists(&aux), || {
                    format!("5.9: {}: bound but {aux} is absent", gpu.bdf)
                });
            }
            GpuExpect::NeverReady => {}
        }
    }
    for gpu in &faulty {
        let Some(pxm) = gpu.prop(egm::EGM_PXM) else {
            continue;
        };
        if region_pxms.contains(&pxm) {
            continue;
        }
        let aux = egm::aux_device_dir(pxm);
        let node = egm::node_path(pxm);
        checks.expect(!egm::exists(&aux) && !egm::exists(&node), || {
            format!(
                "5.9: no GPU should create EGM pxm {pxm}, yet {} exists",
                if egm::exists(&aux) {
                    aux.clone()
                } else {
                    node.clone()
                }
            )
        });
    }
    checks.outcome()
}

// ---------------------------------------------------------------------------------------------
// 5.10: poison
// ---------------------------------------------------------------------------------------------

/// Who writes the poisoned address to hard_offline_page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injector {
    /// The test, while the mapping process waits (it asked for early kill, as QEMU does):
    /// memory_failure signals it asynchronously (BUS_MCEERR_AO).
    Other,
    /// The mapping process itself: it is `current`, signalled on the way back from the write
    /// (BUS_MCEERR_AR).
    Itself,
}

impl std::fmt::Display for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Injector::Other => "written by another process, the mapping one opted into early kill",
            Injector::Itself => "written by the mapping process itself",
        })
    }
}

/// What one injection did.
#[derive(Debug)]
struct Injection {
    /// The write's result (`None`: the writer was killed before it could say).
    write: Option<std::io::Result<()>>,
    child: Option<ChildEnd>,
}

/// Child exit codes for a refused write: `WRITE_FAILED + errno` (errno below 100; clear of
/// the SIGBUS handler's codes).
const WRITE_FAILED: i32 = 100;

/// A child maps `[0, offset + page)` and keeps touching `offset`; `phys` is written to
/// hard_offline_page by `injector`; the child's end is what the kernel did to it.
fn inject(
    file: &File,
    offset: u64,
    page: usize,
    phys: u64,
    injector: Injector,
) -> Result<Injection, Outcome> {
    let ready = Pipe::new().map_err(io_fail("pipe"))?;
    let fd = file.as_fd();
    let Ok(len) = usize::try_from(offset + page as u64) else {
        return Err(Outcome::fail("offset beyond usize"));
    };
    let at = offset as usize;
    let value = format!("{phys:#x}");
    let mut child = egm::fork_child(|| {
        if injector == Injector::Other && egm::set_mce_kill_early().is_err() {
            return 9;
        }
        let Ok(map) = Mapping::raw(fd, 0, len, Sharing::Shared) else {
            return 10;
        };
        if egm::catch_sigbus(map.addr() + at).is_err() {
            return 8;
        }
        map.write_u64(at, marker(12, at as u64));
        if injector == Injector::Itself {
            if let Err(e) = egm::write_sysfs(egm::HARD_OFFLINE_PAGE, &value) {
                return WRITE_FAILED + e.raw_os_error().unwrap_or(0).clamp(0, 99);
            }
        }
        if !ready.send(b'R') {
            return 11;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let _ = map.read_u64(at);
            std::thread::sleep(Duration::from_millis(1));
        }
        12
    })
    .map_err(io_fail("fork"))?;
    let write = match injector {
        Injector::Other => {
            if ready.recv(Duration::from_secs(30)) != Some(b'R') {
                let end = child.kill();
                return Err(Outcome::fail(format!(
                    "5.10: the child could not map the region: it {}",
                    end.map_or("did not end".to_string(), |e| e.to_string())
                )));
            }
            Some(egm::write_sysfs(egm::HARD_OFFLINE_PAGE, &value))
        }
        Injector::Itself => None,
    };
    let end = child.wait_timeout(Duration::from_secs(15));
    if end.is_none() {
        child.kill();
    }
    let write = match (write, end) {
        (Some(write), _) => Some(write),
        (None, Some(ChildEnd::Exited(code)))
            if (WRITE_FAILED..WRITE_FAILED + 100).contains(&code) =>
        {
            Some(Err(std::io::Error::from_raw_os_error(code - WRITE_FAILED)))
        }
        (None, Some(ChildEnd::Exited(12))) | (None, None) => Some(Ok(())),
        (None, _) => None,
    };
    Ok(Injection { write, child: end })
}

/// 5.10: writing an EGM page's physical address to hard_offline_page while a process has the
/// region mapped and touches it kills that process with SIGBUS and adds the page's offset to
/// the retired list, once. Twice: written by another process while the mapping one asked for
/// early kill (as QEMU does; without it memory_failure leaves other processes alone), then by
/// the mapping process itself; the second adds no duplicate. Needs CONFIG_MEMORY_FAILURE and
/// hard_offline_page (drivers/base/memory.c, built only with CONFIG_MEMORY_HOTPLUG).
fn poison(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, true));
    match kconfig::kernel_has("MEMORY_FAILURE") {
        Some(true) => {}
        Some(false) => return Outcome::skip("kernel built without CONFIG_MEMORY_FAILURE"),
        None => {
            return Outcome::skip("kernel config unavailable: cannot tell CONFIG_MEMORY_FAILURE")
        }
    }
    if !egm::exists(egm::HARD_OFFLINE_PAGE) {
        return Outcome::skip(format!(
            "no {} (drivers/base/memory.c is built only with CONFIG_MEMORY_HOTPLUG)",
            egm::HARD_OFFLINE_PAGE
        ));
    }
    let region = check!(m.openable());
    check!(bring_up(&m, &region));
    let page = m.page as u64;
    let file = check!(open(&region));
    let before = match egm::list_retired_pages(file.as_fd()) {
        Ok(list) => list,
        Err(why) => return Outcome::fail(format!("5.10: {why}")),
    };
    let mut offset = (region.size / 2) & !(page - 1);
    while before.iter().any(|p| p.offset / page == offset / page) {
        offset += page;
    }
    let phys = region.base + offset;
    let mark = egm::LogMark::now();
    let mut checks = Checks::new();
    let mut expected = before.clone();
    expected.push(RetiredPage { offset, size: page });
    expected.sort();
    for (round, injector) in [("first", Injector::Other), ("second", Injector::Itself)] {
        let injection = check!(inject(&file, offset, m.page, phys, injector));
        if let Some(Err(e)) = &injection.write {
            checks.fail(format!(
                "5.10: {round} injection ({injector}): writing {phys:#x} to {}: {e}",
                egm::HARD_OFFLINE_PAGE
            ));
        }
        let wanted = egm::SigbusReport {
            code: match injector {
                Injector::Other => libc::BUS_MCEERR_AO,
                Injector::Itself => libc::BUS_MCEERR_AR,
            },
            addr_ok: true,
        };
        let got = match injection.child {
            Some(ChildEnd::Exited(code)) => egm::sigbus_report(code),
            _ => None,
        };
        checks.expect(got == Some(wanted), || {
            let what = match (got, injection.child) {
                (Some(report), _) => report.to_string(),
                (None, None) => "was still running after 15 s".to_string(),
                (None, Some(ChildEnd::Exited(8))) => "could not install its SIGBUS handler".into(),
                (None, Some(ChildEnd::Exited(9))) => "could not set PR_MCE_KILL_EARLY".into(),
                (None, Some(ChildEnd::Exited(10))) => "could not map the region".into(),
                (None, Some(other)) => other.to_string(),
            };
            format!(
                "5.10: {round} injection at {phys:#x} ({injector}): expected the mapping \
                 process to get SIGBUS ({wanted}), it {what}"
            )
        });
        match egm::list_retired_pages(file.as_fd()) {
            Ok(after) => {
                let diff = egm::compare_lists(&expected, &after);
                checks.expect(diff.is_empty(), || {
                    format!(
                        "5.10: after the {round} injection at offset {offset:#x}: {} entries \
                         before, {} after: {diff}",
                        before.len(),
                        after.len()
                    )
                });
            }
            Err(why) => checks.fail(format!("5.10: {why}")),
        }
    }
    let log = mark.new_lines();
    for line in log
        .iter()
        .filter(|l| l.contains("emory failure") || l.contains("SIGBUS"))
        .take(6)
    {
        note(format!("kernel: {}", crate::procfs::log_message(line)));
    }
    for line in egm::kernel_trouble(&log).iter().take(10) {
        note(format!("kernel trouble while handling the poison: {line}"));
    }
    if !checks.failed() {
        note(format!(
            "5.10: poisoned {phys:#x} (offset {offset:#x}) twice, from another process and from \
             the mapping one: SIGBUS each time, the list grew from {} to {} entries once",
            before.len(),
            expected.len()
        ));
    }
    checks.outcome()
}

// ---------------------------------------------------------------------------------------------
// 5.8: a region shared by two GPUs
// ---------------------------------------------------------------------------------------------

/// Whether `/sys/class/egm/egm<pxm>/<bdf>` is a link to that PCI function.
fn bdf_link(pxm: u64, bdf: &str) -> bool {
    egm::link_target_name(&format!("{}/{bdf}", egm::class_dir(pxm))).as_deref() == Some(bdf)
}

fn expect_bound_region(checks: &mut Checks, region: &EgmRegion, when: &str) {
    let node = egm::node_path(region.pxm);
    checks.expect(egm::wait_for_path(&node, true, NODE_WAIT), || {
        format!("5.8: {when}: {node} absent")
    });
    for bdf in &region.gpus {
        checks.expect(bdf_link(region.pxm, bdf), || {
            format!(
                "5.8: {when}: no {bdf} link in {}",
                egm::class_dir(region.pxm)
            )
        });
    }
}

/// 5.8: two GPUs with the same egm-pxm make one `/dev/egm<pxm>` with one BDF link each;
/// unbinding one keeps the node (and drops its link), unbinding the other removes it — in
/// either order. The GPUs are rebound afterwards.
fn shared_region(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, false));
    let Some(region) = m.regions.iter().find(|r| r.gpus.len() >= 2).cloned() else {
        return Outcome::skip(
            "no two GPUs share an egm-pxm on this platform (scenario tests/scenarios/gpu-pair.toml)",
        );
    };
    check!(bring_up(&m, &region));
    let mut checks = Checks::new();
    let nodes = std::fs::read_dir("/dev")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("egm"))
                .count()
        })
        .unwrap_or(0);
    checks.expect(nodes == 1 || m.regions.len() > 1, || {
        format!("5.8: {nodes} /dev/egm* nodes for one shared region")
    });
    expect_bound_region(&mut checks, &region, "both bound");
    let node = egm::node_path(region.pxm);
    let class = egm::class_dir(region.pxm);
    let aux = egm::aux_device_dir(region.pxm);
    let orders = [
        region.gpus.clone(),
        region.gpus.iter().rev().cloned().collect::<Vec<_>>(),
    ];
    for (round, order) in orders.iter().enumerate() {
        let label = if round == 0 {
            "env order"
        } else {
            "reverse order"
        };
        for (i, bdf) in order.iter().enumerate() {
            if let Err(why) = egm::unbind_gpu(bdf) {
                return Outcome::fail(format!("5.8: {why}"));
            }
            let still: &[String] = &order[i + 1..];
            if still.is_empty() {
                checks.expect(egm::wait_for_path(&node, false, NODE_WAIT), || {
                    format!("5.8 ({label}): {node} still there after unbinding the last GPU {bdf}")
                });
                checks.expect(!egm::exists(&aux), || {
                    format!("5.8 ({label}): {aux} still there after the last GPU went")
                });
                checks.expect(!egm::exists(&class), || {
                    format!("5.8 ({label}): {class} still there after the last GPU went")
                });
            } else {
                checks.expect(egm::exists(&node), || {
                    format!(
                        "5.8 ({label}): {node} gone after unbinding {bdf} while {} still bound",
                        still.join(" ")
                    )
                });
                checks.expect(!bdf_link(region.pxm, bdf), || {
                    format!("5.8 ({label}): {class}/{bdf} link left after unbinding {bdf}")
                });
                for other in still {
                    checks.expect(bdf_link(region.pxm, other), || {
                        format!("5.8 ({label}): {class}/{other} link lost after unbinding {bdf}")
                    });
                }
            }
        }
        for bdf in &region.gpus {
            if let Err(why) = egm::bind_gpu(bdf) {
                checks.fail(format!("5.8 ({label}): rebinding: {why}"));
            }
        }
        expect_bound_region(&mut checks, &region, &format!("rebound after {label}"));
    }
    if !checks.failed() {
        note(format!(
            "5.8: {} shared by {}: node kept until the last GPU went, in both orders",
            node,
            region.gpus.join(" ")
        ));
    }
    checks.outcome()
}

// ---------------------------------------------------------------------------------------------
// 5.11: rmmod and unbind while in use
// ---------------------------------------------------------------------------------------------

/// 5.11: with an fd open `rmmod nvgrace_egm` is refused; after close it removes every node.
/// Only for a modular build: the default build has it built in.
fn rmmod_while_open(ctx: &Context) -> Outcome {
    check!(egm::require_egm_kernel(&ctx.env, false));
    if let Ok(config) = kconfig::kernel_config() {
        if config.value("NVGRACE_EGM") == Some("y") {
            return Outcome::skip("nvgrace-egm is built in (CONFIG_NVGRACE_EGM=y): no rmmod");
        }
    }
    if !egm::exists(egm::MODULE_REFCNT) {
        return Outcome::skip(format!(
            "nvgrace-egm is built in or not a loaded module (no {})",
            egm::MODULE_REFCNT
        ));
    }
    let (m, region) = check!(ready(ctx));
    let node = egm::node_path(region.pxm);
    let mut checks = Checks::new();
    let file = check!(open(&region));
    let busy = egm::delete_module(EGM_MODULE);
    let refused = egm::errno(&busy).is_some_and(|e| e == libc::EWOULDBLOCK || e == libc::EBUSY);
    checks.expect(refused, || {
        format!(
            "5.11: rmmod {EGM_MODULE} with {node} open: expected refused (EWOULDBLOCK/EBUSY), \
             observed {}",
            egm::result_name(&busy)
        )
    });
    if busy.is_ok() {
        // The module is gone under an open file: nothing more to look at safely.
        return checks.outcome();
    }
    checks.expect(egm::exists(&node), || {
        format!("5.11: {node} gone after a refused rmmod")
    });
    drop(file);
    let removed = egm::delete_module(EGM_MODULE);
    checks.expect(removed.is_ok(), || {
        format!(
            "5.11: rmmod {EGM_MODULE} after close: {}",
            egm::result_name(&removed)
        )
    });
    if removed.is_ok() {
        for region in &m.regions {
            let node = egm::node_path(region.pxm);
            checks.expect(egm::wait_for_path(&node, false, NODE_WAIT), || {
                format!("5.11: {node} still there after rmmod")
            });
        }
        checks.expect(!egm::exists(egm::EGM_CLASS), || {
            format!("5.11: {} still there after rmmod", egm::EGM_CLASS)
        });
        if !checks.failed() {
            note(format!(
                "5.11: rmmod {EGM_MODULE} with {node} open: {}, node kept; after close: removed, \
                 with every /dev/egmN and {}",
                egm::result_name(&busy),
                egm::EGM_CLASS
            ));
        }
        reload(&mut checks, &m);
    }
    checks.outcome()
}

/// After an rmmod: load nvgrace-egm again (the auxiliary devices are still there, so it binds
/// them at once and the nodes come back, without BDF links: those are made when a GPU probes),
/// then reprobe the GPUs so every region is as the next test expects it.
fn reload(checks: &mut Checks, m: &Machine) {
    let loaded = std::process::Command::new("modprobe")
        .arg(EGM_MODULE)
        .output();
    let ok = matches!(&loaded, Ok(out) if out.status.success());
    checks.expect(ok, || {
        format!(
            "5.11: modprobe {EGM_MODULE} after rmmod: {}",
            match &loaded {
                Ok(out) => format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => e.to_string(),
            }
        )
    });
    if !ok {
        return;
    }
    let bound: Vec<&EgmRegion> = m
        .regions
        .iter()
        .filter(|r| {
            r.gpus
                .iter()
                .all(|bdf| PciDevice::new(bdf).driver().as_deref() == Some(GPU_DRIVER))
        })
        .filter(|r| m.rejected_table(r).is_none())
        .collect();
    for region in &bound {
        let node = egm::node_path(region.pxm);
        checks.expect(egm::wait_for_path(&node, true, NODE_WAIT), || {
            format!("5.11: {node} not back after modprobe {EGM_MODULE}")
        });
    }
    let links: usize = bound
        .iter()
        .flat_map(|r| r.gpus.iter().map(move |bdf| bdf_link(r.pxm, bdf)))
        .filter(|&linked| linked)
        .count();
    note(format!(
        "5.11: modprobe {EGM_MODULE} again: {} node(s) back, {links} BDF link(s) before the GPUs \
         reprobe",
        bound.len()
    ));
    for region in &bound {
        for bdf in &region.gpus {
            if let Err(why) = egm::unbind_gpu(bdf) {
                checks.fail(format!("5.11: reprobing {bdf}: {why}"));
                return;
            }
        }
        for bdf in &region.gpus {
            if let Err(why) = egm::bind_gpu(bdf) {
                checks.fail(format!("5.11: reprobing {bdf}: {why}"));
                return;
            }
        }
        expect_bound_region(checks, region, "reprobed after the reload");
    }
}

/// Review finding [no-locking] (v2 02/15, 03/15): the region list and each region's GPU list
/// are changed by GPU probes and removes with no lock. Every GPU of the platform is unbound
/// and bound again from its own thread, all at once, for [`RACE_ROUNDS`] rounds; afterwards
/// every region must be whole (node, one link per GPU). With DEBUG=1 list corruption, KASAN
/// and lockdep watch the lists while it runs.
fn parallel_probe(ctx: &Context) -> Outcome {
    // A race that hits corrupts the driver's lists for every test after it.
    check!(exclusive(ctx, "egm_parallel_probe"));
    let m = check!(machine(ctx, false, false));
    let gpus: Vec<String> = m.regions.iter().flat_map(|r| r.gpus.clone()).collect();
    if gpus.len() < 2 {
        return Outcome::skip(format!(
            "{} GPU(s) with an EGM region: racing probes needs two or more (scenarios \
             gpu-pair, egm-no-locking-probes)",
            gpus.len()
        ));
    }
    for region in &m.regions {
        check!(bring_up(&m, region));
    }
    let mut checks = Checks::new();
    let start = Instant::now();
    for round in 0..RACE_ROUNDS {
        let workers: Vec<_> = gpus
            .iter()
            .cloned()
            .map(|bdf| {
                std::thread::spawn(move || {
                    egm::unbind_gpu(&bdf)?;
                    egm::bind_gpu(&bdf).map(|_| ())
                })
            })
            .collect();
        let mut failed = Vec::new();
        for worker in workers {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => failed.push(why),
                Err(_) => checks.fail(format!("round {round}: a probe thread panicked")),
            }
        }
        if checks.failed() {
            return checks.outcome();
        }
        if !failed.is_empty() {
            // The same GPUs probed one at a time: if that works, the failure belonged to the
            // probes running together.
            let mut alone = Vec::new();
            for bdf in &gpus {
                if let Err(why) = egm::unbind_gpu(bdf).and_then(|_| egm::bind_gpu(bdf).map(|_| ()))
                {
                    alone.push(why);
                }
            }
            if alone.is_empty() {
                return Outcome::xfail(format!(
                    "{}: in round {round} of parallel unbind+bind a probe failed, and the same \
                     GPUs probe fine one at a time: {}",
                    findings::NO_LOCKING,
                    failed.join("; ")
                ));
            }
            return Outcome::fail(format!(
                "round {round}: {}; probed one at a time afterwards: {}",
                failed.join("; "),
                alone.join("; ")
            ));
        }
    }
    for region in &m.regions {
        expect_bound_region(&mut checks, region, "after the racing probes");
    }
    if !checks.failed() {
        note(format!(
            "[{}]: {RACE_ROUNDS} rounds of {} GPUs unbound and bound in parallel in {} ms; every \
             region whole",
            findings::NO_LOCKING.key,
            gpus.len(),
            start.elapsed().as_millis()
        ));
    }
    checks.outcome()
}

/// Review findings [aux-add-double-free] (v2 02/15) and [shared-region-uaf] (v2 03/15): error
/// paths of the GPU probe that only a failed allocation reaches. With fault injection (DEBUG=1
/// kernels), the region's last GPU is probed again and again with its n-th allocation failing,
/// n = 1, 2, ... until a probe makes no n-th allocation, the other GPUs bound: with one GPU
/// that walks the creation of the region's auxiliary device, with two its joining the region. Every failed probe must leave nothing behind and every region must come back whole;
/// KASAN reports the double free and the use-after-free of the error paths as they happen.
fn probe_fault_sweep(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_probe_fault_sweep"));
    let m = check!(machine(ctx, false, true));
    let region = check!(m.openable());
    check!(faults::prepare());
    for bdf in &region.gpus {
        let node = PciDevice::new(bdf).attr("numa_node").unwrap_or_default();
        if node.trim() != "-1" {
            return Outcome::skip(format!(
                "{bdf} has NUMA node {}: the PCI core probes it from a worker on that node, \
                 where this thread's fault injection does not reach",
                node.trim()
            ));
        }
    }
    let mut checks = Checks::new();
    for bdf in &region.gpus {
        check!(egm::unbind_gpu(bdf).map_err(Outcome::fail));
    }
    let node = egm::node_path(region.pxm);
    let aux = egm::aux_device_dir(region.pxm);
    // The region's other GPUs bound first: the sweep then walks the last one's probe, which
    // creates the region (one GPU) or joins it (a shared region).
    let (last, others) = region.gpus.split_last().expect("a region has a GPU");
    for bdf in others {
        if let Err(why) = egm::bind_gpu(bdf) {
            return Outcome::fail(format!("{bdf} does not bind before the sweep: {why}"));
        }
    }
    let index = others.len();
    {
        let bdf = last;
        let mut failed_probes = 0;
        let mut leftovers = Vec::new();
        let mut n = 1;
        loop {
            if n > MAX_FAULTS {
                checks.fail(format!(
                    "{bdf}: the probe still reached its {MAX_FAULTS}th allocation: sweep cut short"
                ));
                break;
            }
            if let Err(why) = egm::unbind_gpu(bdf) {
                checks.fail(why);
                break;
            }
            let (bound, reached) = match faults::with_nth_failure(n, || egm::try_bind(bdf)) {
                Ok((result, reached)) => (result.map(|r| r.bound), reached),
                Err(why) => return Outcome::fail(why),
            };
            if !reached {
                break;
            }
            if !matches!(bound, Ok(true)) {
                failed_probes += 1;
                // A failed probe leaves nothing: the first GPU no region, a later one no link
                // (and the region the first GPU holds stays).
                let left = if index == 0 {
                    [(&aux, egm::exists(&aux)), (&node, egm::exists(&node))]
                        .iter()
                        .filter(|(_, there)| *there)
                        .map(|(what, _)| format!("{what} exists"))
                        .collect::<Vec<_>>()
                } else {
                    let mut v = Vec::new();
                    if !egm::exists(&node) {
                        v.push(format!("{node} is gone"));
                    }
                    if bdf_link(region.pxm, bdf) {
                        v.push(format!("a {bdf} link exists"));
                    }
                    v
                };
                if !left.is_empty() && leftovers.len() < 3 {
                    leftovers.push(format!("allocation {n} failed: {}", left.join(", ")));
                }
            }
            n += 1;
        }
        note(format!(
            "{bdf}: {} allocations failed one at a time, {failed_probes} probes failed",
            n - 1
        ));
        if n == 1 {
            checks.fail(format!(
                "{bdf}: binding it made no allocation fault injection could fail: the sweep \
                 examined nothing"
            ));
        } else if failed_probes == 0 {
            checks.fail(format!(
                "{bdf}: none of {} failed allocations failed the probe",
                n - 1
            ));
        }
        for left in leftovers {
            checks.fail(format!("{bdf}: after a failed probe: {left}"));
        }
        if let Err(why) = egm::bind_gpu(bdf) {
            checks.fail(format!("{bdf} does not bind after the sweep: {why}"));
        }
    }
    expect_bound_region(&mut checks, &region, "after the fault sweep");
    checks.outcome()
}

/// A bound on the sweep: the GPU probe makes a few hundred allocations at most.
const MAX_FAULTS: u32 = 2000;

/// The error paths' reports that are the review findings: a double free in the probe
/// (auxiliary_device_add failing), a use-after-free of the region entry (the second GPU failing
/// to join it). Anything else the sweep provokes fails.
fn known_probe_fault(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    let header = report.header();
    if !report.in_code("nvgrace") {
        return None;
    }
    if header.contains("double-free")
        || header.contains("invalid-free")
        || header.contains("invalid free")
    {
        Some(findings::AUX_ADD_DOUBLE_FREE)
    } else if header.contains("use-after-free") || report.kind == kernel_log::Kind::ListCorruption {
        Some(findings::SHARED_REGION_UAF)
    } else {
        None
    }
}

/// Review finding [no-locking] (v2 12/15, 15/15): memory-failure handling adds to the
/// retired-pages hash while the ioctl walks it, with no lock. One thread lists the retired
/// pages in a loop while [`POISON_RACE_PAGES`] pages are poisoned one after another; every
/// listing must be whole (no duplicate, nothing outside the region) and the final list must
/// hold every poisoned page once. With DEBUG=1, KASAN and lockdep watch the hash.
fn poison_race(ctx: &Context) -> Outcome {
    let m = check!(machine(ctx, false, true));
    if !egm::exists(egm::HARD_OFFLINE_PAGE) || kconfig::kernel_has("MEMORY_FAILURE") != Some(true) {
        return Outcome::skip(format!(
            "no {} or no CONFIG_MEMORY_FAILURE: cannot poison pages",
            egm::HARD_OFFLINE_PAGE
        ));
    }
    let region = check!(m.openable());
    check!(bring_up(&m, &region));
    let page = m.page as u64;
    let file = check!(open(&region));
    let before = match egm::list_retired_pages(file.as_fd()) {
        Ok(list) => list,
        Err(why) => return Outcome::fail(format!("[no-locking]: {why}")),
    };
    // Pages in the last quarter of the region, clear of the ones already retired.
    let mut offsets = Vec::new();
    let mut offset = (region.size / 4 * 3) & !(page - 1);
    while offsets.len() < POISON_RACE_PAGES && offset + page <= region.size {
        if !before.iter().any(|p| p.offset / page == offset / page) {
            offsets.push(offset);
        }
        offset += 7 * page;
    }
    // v2 records a poisoned page when memory-failure handling finds a mapping of it: a holder
    // maps the whole region (asking for early kill, and ignoring the SIGBUS that follows),
    // forked before any thread starts here.
    let Ok(region_len) = usize::try_from(region.size) else {
        return Outcome::fail("region size beyond usize");
    };
    let holder_ready = check!(Pipe::new().map_err(io_fail("pipe")));
    let holder_stop = check!(Pipe::new().map_err(io_fail("pipe")));
    let fd = file.as_fd();
    let mut holder = check!(egm::fork_child(|| {
        if egm::set_mce_kill_early().is_err() || egm::ignore_sigbus().is_err() {
            return 9;
        }
        let Ok(_map) = Mapping::raw(fd, 0, region_len, Sharing::Shared) else {
            return 10;
        };
        holder_ready.send(b'R');
        let _ = holder_stop.recv(Duration::from_secs(200));
        0
    })
    .map_err(io_fail("fork")));
    if holder_ready.recv(Duration::from_secs(60)) != Some(b'R') {
        let end = holder.kill();
        return Outcome::fail(format!(
            "the holder could not map the region: it {}",
            end.map_or("did not end".to_string(), |e| e.to_string())
        ));
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Poisoning starts once the lister has listed once, so the two overlap.
    let started = std::sync::Barrier::new(2);
    let mut checks = Checks::new();
    let (listings, torn, between) = std::thread::scope(|scope| {
        let lister = scope.spawn(|| {
            let (mut listings, mut torn, mut between) = (0usize, Vec::new(), 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let listing = egm::list_retired_pages(file.as_fd());
                if listings == 0 {
                    started.wait();
                }
                match listing {
                    Ok(list) => {
                        if list.len() > before.len() && list.len() < before.len() + offsets.len() {
                            between += 1;
                        }
                        let mut seen = BTreeSet::new();
                        let whole = list
                            .iter()
                            .all(|p| p.offset < region.size && seen.insert(p.offset));
                        if !whole && torn.len() < 3 {
                            torn.push(format!("a listing of {} entries", list.len()));
                        }
                    }
                    // A list that grew between sizing and listing is no tear.
                    Err(why) if why.contains("grew between") => {}
                    Err(why) if torn.len() < 3 => torn.push(why),
                    Err(_) => {}
                }
                listings += 1;
            }
            (listings, torn, between)
        });
        started.wait();
        for &offset in &offsets {
            let phys = region.base + offset;
            if let Err(e) = egm::write_sysfs(egm::HARD_OFFLINE_PAGE, &format!("{phys:#x}")) {
                checks.fail(format!("poisoning {phys:#x}: {e}"));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        lister
            .join()
            .unwrap_or((0, vec!["the lister panicked".into()], 0))
    });
    holder_stop.send(b'E');
    if holder.wait_timeout(Duration::from_secs(20)).is_none() {
        holder.kill();
    }
    for why in torn {
        checks.fail(format!(
            "[{}]: while pages were poisoned, {why} was torn (duplicate or out-of-region entry)",
            findings::NO_LOCKING.key
        ));
    }
    if between == 0 {
        note(format!(
            "[{}]: no listing caught the list mid-growth ({listings} listings): the race was not \
             exercised this time",
            findings::NO_LOCKING.key
        ));
    }
    let mut expected = before.clone();
    expected.extend(
        offsets
            .iter()
            .map(|&offset| RetiredPage { offset, size: page }),
    );
    expected.sort();
    match egm::list_retired_pages(file.as_fd()) {
        Ok(after) => {
            let diff = egm::compare_lists(&expected, &after);
            checks.expect(diff.is_empty(), || {
                format!("after poisoning {} pages: {diff}", offsets.len())
            });
        }
        Err(why) => checks.fail(why),
    }
    if !checks.failed() {
        note(format!(
            "[{}]: {} pages poisoned while {listings} listings ran; every listing whole, all {} \
             entries there once",
            findings::NO_LOCKING.key,
            offsets.len(),
            expected.len()
        ));
    }
    checks.outcome()
}

/// Pages [`poison_race`] poisons.
const POISON_RACE_PAGES: usize = 24;

/// Whether a kernel report's header or call trace is in the drivers under test.
fn in_driver(report: &KernelReport) -> bool {
    report.in_code("nvgrace") || report.in_code("egm")
}

/// Rounds of parallel unbind+bind in [`parallel_probe`].
const RACE_ROUNDS: usize = 10;

/// Any report while probes race is the unlocked lists (list corruption, use-after-free of a
/// region entry, lockdep).
fn known_no_locking(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    use kernel_log::Kind;
    let in_driver = in_driver(report);
    // A WARNING counts too: two racing probes registering the same auxiliary device is the
    // kernel's "sysfs: cannot create duplicate filename" (its header names the device).
    let racy = matches!(
        report.kind,
        Kind::ListCorruption
            | Kind::Kasan
            | Kind::Kfence
            | Kind::Lockdep
            | Kind::Oops
            | Kind::Bug
            | Kind::Warning
    );
    // Sleeping in atomic context (the memory-failure hook allocates with GFP_NOFS) is a bug of
    // its own, not the missing locking: it fails by itself.
    let atomic_sleep = report
        .header()
        .contains("sleeping function called from invalid context");
    (in_driver && racy && !atomic_sleep).then_some(findings::NO_LOCKING)
}

/// 5.11: unload the modules in the other order with devices bound: nvgrace-gpu first (its
/// GPUs go, and their auxiliary devices with them), then nvgrace-egm; load both again
/// (nvgrace-egm first), rebind, and every region is whole. (`egm_rmmod_while_open` unloads
/// nvgrace-egm first with the devices bound: v1 destroyed its class before unregistering its
/// driver there.)
fn rmmod_orders(ctx: &Context) -> Outcome {
    check!(egm::require_egm_kernel(&ctx.env, false));
    let gpu_module = GPU_DRIVER;
    for module in [EGM_MODULE, gpu_module] {
        if !egm::exists(&format!("/sys/module/{module}/refcnt")) {
            return Outcome::skip(format!("{module} is built in or not a loaded module"));
        }
    }
    let (m, _) = check!(ready(ctx));
    for region in &m.regions {
        check!(bring_up(&m, region));
    }
    let mut checks = Checks::new();
    if let Err(e) = egm::delete_module(gpu_module) {
        return Outcome::fail(format!(
            "5.11: rmmod {gpu_module} with its GPUs bound (nothing open): {e}"
        ));
    }
    for region in &m.regions {
        let node = egm::node_path(region.pxm);
        checks.expect(egm::wait_for_path(&node, false, NODE_WAIT), || {
            format!("5.11: {node} still there after rmmod {gpu_module}")
        });
        let aux = egm::aux_device_dir(region.pxm);
        checks.expect(!egm::exists(&aux), || {
            format!("5.11: {aux} still there after rmmod {gpu_module}")
        });
    }
    let removed = egm::delete_module(EGM_MODULE);
    checks.expect(removed.is_ok(), || {
        format!(
            "5.11: rmmod {EGM_MODULE} after {gpu_module}: {}",
            egm::result_name(&removed)
        )
    });
    for module in ["nvgrace-egm", "nvgrace-gpu-vfio-pci"] {
        let loaded = std::process::Command::new("modprobe").arg(module).output();
        if !matches!(&loaded, Ok(out) if out.status.success()) {
            checks.fail(format!("5.11: modprobe {module} again: {loaded:?}"));
            return checks.outcome();
        }
    }
    for region in &m.regions {
        for bdf in &region.gpus {
            if let Err(why) = egm::bind_gpu(bdf) {
                checks.fail(format!("5.11: rebinding {bdf}: {why}"));
            }
        }
        expect_bound_region(&mut checks, region, "after reloading both modules");
    }
    checks.outcome()
}

/// An oops in the driver while a second descriptor is used: v1's multi-open, whose second
/// open has no private data (fixed in v2: a regression fails by name).
fn known_multi_open(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    in_driver(report).then_some(findings::V1_MULTI_OPEN)
}

/// A report while nvgrace-egm is unloaded with its devices bound: v1's module exit, which
/// destroyed the class first (fixed in v2: a regression fails by name).
fn known_module_exit(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    (in_driver(report) || report.in_code("class")).then_some(findings::V1_MODULE_EXIT)
}

/// A kernel report while binding a GPU whose retired-pages table is longer than its page: the
/// driver read past the table's mapping (the v2 off-by-one at exactly one page's worth of
/// entries, v1's unchecked count beyond).
fn known_retired(ctx: &Context, report: &KernelReport) -> Option<Finding> {
    if !in_driver(report) {
        return None;
    }
    let tables = egm::retired_tables(&ctx.env).ok()??;
    let limit = egm::table_limit(devmem::page_size());
    tables.iter().find_map(|t| {
        let n = t.pages.len();
        let room = egm::table_room_entries(&ctx.env, t.pxm)?;
        match n {
            _ if n <= room => None,
            _ if n == limit => Some(findings::RETIRED_OFF_BY_ONE),
            _ if n > limit => Some(findings::V1_RETIRED_UNCHECKED),
            _ => None,
        }
    })
}

/// How the test takes the GPU away from the driver.
#[derive(Clone, Copy, Debug)]
struct Detach {
    verb: &'static str,
    apply: fn(&str) -> Result<Duration, String>,
    /// What the GPUs are afterwards.
    left: &'static str,
}

const UNBIND: Detach = Detach {
    verb: "unbinding",
    apply: egm::unbind_gpu,
    left: "unbound",
};
const REMOVE: Detach = Detach {
    verb: "removing",
    apply: egm::remove_pci_device,
    left: "removed from the PCI bus",
};

impl Detach {
    fn apply(self, bdf: &str) -> Result<(), String> {
        (self.apply)(bdf).map(|_| ())
    }
}

impl std::fmt::Display for Detach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb)
    }
}

/// What the holder keeps of /dev/egmN while the GPU goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hold {
    Open,
    Mapped,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hold::Open => "open",
            Hold::Mapped => "open and mapped",
        })
    }
}

/// The kernel reports a detach-while-held test provokes on purpose: the release path touching
/// the freed EGM device (or anything else the driver does once its device is gone).
fn known_detach(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    in_driver(report).then_some(findings::UNBIND_WHILE_OPEN)
}

/// Tests that take the GPUs away for good run only in a scenario that names them (its
/// `tests` list): anywhere else they would leave nothing for the tests after them.
fn exclusive(ctx: &Context, name: &str) -> Result<(), Outcome> {
    let named = ctx
        .env
        .get("GRACEVM_TESTS")
        .is_some_and(|t| t.split([' ', ',']).any(|n| n == name));
    if named {
        Ok(())
    } else {
        Err(Outcome::skip(format!(
            "{name} takes the GPUs away for good: it runs in the scenario named after it \
             (tests = [\"{name}\"])"
        )))
    }
}

/// 5.11: unbind the GPU while /dev/egmN is open (not mapped), then close it: the release
/// path must not touch what the unbind freed.
fn unbind_while_open(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_unbind_while_open"));
    detach_while_held(ctx, UNBIND, Hold::Open)
}

/// 5.11: remove the GPU's PCI device while /dev/egmN is open, then close it.
fn remove_while_open(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_remove_while_open"));
    detach_while_held(ctx, REMOVE, Hold::Open)
}

/// 5.11: remove the GPU's PCI device while /dev/egmN is open and mapped, then write through
/// the old mapping and close.
fn remove_while_mapped(ctx: &Context) -> Outcome {
    check!(exclusive(ctx, "egm_remove_while_mapped"));
    detach_while_held(ctx, REMOVE, Hold::Mapped)
}

/// 5.11: unbind while open and mapped (the last test everywhere: it leaves the GPUs unbound).
fn unbind_while_mapped(ctx: &Context) -> Outcome {
    detach_while_held(ctx, UNBIND, Hold::Mapped)
}

/// Takes the region's GPUs away (`detach`) while a holder process has its node `hold`, then
/// has the holder use and close it. v2 lets the detach return at once and frees the EGM
/// device under the holder (review point); a driver that waits for the holder, or revokes the
/// mapping, passes.
fn detach_while_held(ctx: &Context, detach: Detach, hold: Hold) -> Outcome {
    let (m, region) = check!(ready(ctx));
    let dev = check!(testdev(ctx));
    let page = m.page as u64;
    let node = egm::node_path(region.pxm);
    let to_child = check!(Pipe::new().map_err(io_fail("pipe")));
    let to_parent = check!(Pipe::new().map_err(io_fail("pipe")));
    let first = marker(13, page);
    let second = marker(14, page + 8);
    let pxm = region.pxm;
    let map_len = m.page;
    let mapped = hold == Hold::Mapped;
    let mut holder = check!(egm::fork_child(|| {
        let Ok(file) = egm::open_node(pxm) else {
            return 10;
        };
        if !mapped {
            to_parent.send(b'R');
            // 'U': use the descriptor the driver's device is gone from: a new mapping of it
            // must not be granted ('M' granted, 'N' refused).
            if to_child.recv(Duration::from_secs(180)) == Some(b'U') {
                let granted = Mapping::raw(file.as_fd(), page, map_len, Sharing::Shared).is_ok();
                to_parent.send(if granted { b'M' } else { b'N' });
                let _ = to_child.recv(Duration::from_secs(180));
            }
            drop(file);
            return 0;
        }
        let Ok(map) = Mapping::raw(file.as_fd(), page, map_len, Sharing::Shared) else {
            return 11;
        };
        map.write_u64(0, first);
        to_parent.send(b'R');
        match to_child.recv(Duration::from_secs(180)) {
            Some(b'P') => {}
            Some(b'E') => return 0,
            _ => return 12,
        }
        map.write_u64(8, second);
        let back = map.read_u64(8);
        to_parent.send(if back == second { b'W' } else { b'X' });
        let _ = to_child.recv(Duration::from_secs(180));
        drop(map);
        drop(file);
        0
    })
    .map_err(io_fail("fork")));
    if to_parent.recv(Duration::from_secs(60)) != Some(b'R') {
        let end = holder.kill();
        return Outcome::fail(format!(
            "5.11: the holder could not open {hold} {node}: it {}",
            end.map_or("did not end".to_string(), |e| e.to_string())
        ));
    }
    if mapped {
        let seen = check!(vmm_peek(&dev, region.base + page));
        if seen != first {
            return Outcome::fail(format!(
                "5.11: the holder wrote {first:#x}, the VMM sees {seen:#x} at {:#x}",
                region.base + page
            ));
        }
    }
    let mark = egm::LogMark::now();
    let (last, others) = region.gpus.split_last().expect("a region has a GPU");
    for bdf in others {
        if let Err(why) = detach.apply(bdf) {
            return Outcome::fail(format!("5.11: {why}"));
        }
    }
    note(format!(
        "5.11: {detach} {last} while pid {} has {node} {hold} (review point [{}]); a kernel \
         report, oops or panic from here on is the observation",
        holder.pid(),
        findings::UNBIND_WHILE_OPEN.key
    ));
    let (tx, rx) = mpsc::channel();
    let bdf = last.clone();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(detach.apply(&bdf));
    });
    let mut observations = Vec::new();
    let (unbind, waited) = match rx.recv_timeout(UNBIND_PATIENCE) {
        Ok(result) => (result, false),
        Err(_) => {
            note(format!(
                "5.11: {detach} still running after {} s: letting the holder close",
                UNBIND_PATIENCE.as_secs()
            ));
            to_child.send(b'E');
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(result) => (result, true),
                Err(_) => {
                    return Outcome::fail(format!(
                        "5.11: {detach} {last} still blocked 30 s after the holder closed {node}"
                    ))
                }
            }
        }
    };
    let took = start.elapsed();
    if let Err(why) = unbind {
        return Outcome::fail(format!("5.11: {why}"));
    }
    let mut checks = Checks::new();
    checks.expect(egm::wait_for_path(&node, false, NODE_WAIT), || {
        format!("5.11: {node} still there after the {detach} of every GPU of the region")
    });
    let aux = egm::aux_device_dir(region.pxm);
    checks.expect(!egm::exists(&aux), || {
        format!("5.11: {aux} still there after the {detach}")
    });
    let mut mapping_live = false;
    if !waited {
        observations.push(format!(
            "{detach} returned in {} ms with {node} {hold}",
            took.as_millis()
        ));
    }
    if !waited && mapped {
        to_child.send(b'P');
        match to_parent.recv(Duration::from_secs(10)) {
            Some(b'W') => {
                let gpa = region.base + page + 8;
                let now = check!(vmm_peek(&dev, gpa));
                if now == second {
                    mapping_live = true;
                    observations.push(format!(
                        "the old mapping still reaches the carve-out: a write through it after \
                         the unbind landed (the VMM sees {second:#x} at {gpa:#x})"
                    ));
                } else {
                    checks.fail(format!(
                        "5.11: a write through the old mapping after the {detach} read back but \
                         the VMM sees {now:#x} at {gpa:#x}: it went to memory that is not the \
                         carve-out"
                    ));
                }
            }
            Some(_) => checks.fail(format!(
                "5.11: a write through the old mapping after the {detach} read back wrong"
            )),
            None => {
                let end = holder.wait_timeout(Duration::from_secs(2));
                observations.push(format!(
                    "touching the old mapping after the {detach}: the holder {}",
                    end.map_or("hung".to_string(), |e| e.to_string())
                ));
            }
        }
    }
    let mut mapping_granted = false;
    if !waited && !mapped {
        to_child.send(b'U');
        match to_parent.recv(Duration::from_secs(10)) {
            Some(b'M') => {
                mapping_granted = true;
                observations.push(format!(
                    "after the {detach}, mmap of the descriptor still open was granted: the \
                     device it maps is gone"
                ));
            }
            Some(_) => observations.push(format!(
                "after the {detach}, mmap of the descriptor still open was refused"
            )),
            None => {
                let end = holder.wait_timeout(Duration::from_secs(2));
                observations.push(format!(
                    "mmap of the descriptor after the {detach}: the holder {}",
                    end.map_or("hung".to_string(), |e| e.to_string())
                ));
            }
        }
    }
    if !waited {
        to_child.send(b'E');
    }
    let end = holder
        .wait_timeout(Duration::from_secs(20))
        .or_else(|| holder.kill());
    let abnormal_close = !waited && !matches!(end, Some(ChildEnd::Exited(0)));
    if abnormal_close {
        observations.push(format!(
            "closing the descriptor after the {detach}: the holder {}",
            end.map_or("did not end".to_string(), |e| e.to_string())
        ));
    }
    std::thread::sleep(Duration::from_millis(200));
    let trouble = egm::kernel_trouble(&mark.new_lines());
    note(format!(
        "5.11: the GPUs of egm{} are left {} (no rebind after a use-after-free)",
        region.pxm, detach.left
    ));
    if checks.failed() {
        let mut outcome = checks.outcome();
        if let Outcome::Fail(why) = &mut outcome {
            for line in observations.iter().chain(&trouble) {
                why.push('\n');
                why.push_str(line);
            }
        }
        return outcome;
    }
    if !trouble.is_empty() || mapping_live || mapping_granted {
        let mut why = format!(
            "5.11 {}: {}",
            findings::UNBIND_WHILE_OPEN,
            observations.join("; ")
        );
        for line in trouble.iter().take(20) {
            why.push_str("\nkernel: ");
            why.push_str(line);
        }
        return Outcome::xfail(why);
    }
    if waited {
        note(format!(
            "5.11: {detach} waited for {node}'s user to close ({} ms)",
            took.as_millis()
        ));
    } else {
        note(format!("5.11: {}", observations.join("; ")));
    }
    Outcome::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_markers_distinct_from_zero_and_each_other() {
        let a = marker(1, 8);
        assert_ne!(a, 0);
        assert_ne!(a, marker(2, 8));
        assert_ne!(a, marker(1, 16));
        assert_eq!(marker(5, 0x4000_0000 - 8) & 0xff_ffff_ffff, 0x4000_0000 - 8);
    }

    #[test]
    fn test_tests_ordered_binding_changes_last() {
        let names: Vec<&str> = TESTS.iter().map(|t| t.name).collect();
        assert_eq!(names.first(), Some(&"egm_device_created"));
        assert_eq!(names.last(), Some(&"egm_unbind_while_mapped"));
        let at = |name: &str| names.iter().position(|n| *n == name).unwrap();
        assert!(at("egm_open_zeroes") < at("egm_open_exclusive"));
        assert!(at("egm_retired_pages_ioctl") < at("egm_poison"));
        assert!(at("egm_poison") < at("egm_shared_region"));
        assert!(at("egm_shared_region") < at("egm_rmmod_while_open"));
        assert!(names.iter().all(|n| n.starts_with("egm_")));
    }

    #[test]
    fn test_without_driver_every_test_skips() {
        // On a host (or a kernel without the driver) there is no /sys/class/egm: every test
        // must SKIP, never pass.
        if std::path::Path::new(egm::EGM_CLASS).exists() {
            return;
        }
        let ctx = Context {
            env: crate::env::GuestEnv::parse(
                "GRACEVM_CARVEOUTS='4:0x8000000000:0x40000000:0x4752414345000004'\n\
                 GRACEVM_GPUS='bdf=0000:00:01.0;id=10de:2941;props=gpu-mem-base-pa:0xd000000000,\
                 gpu-mem-size:0x40000000,egm-pxm:0x4,egm-base-pa:0x8000000000,\
                 egm-size:0x40000000,egm-retired-pages-data-base:0x40100000'\n",
            ),
        };
        for test in TESTS {
            let outcome = (test.run)(&ctx);
            assert!(
                matches!(outcome, Outcome::Skip(_)),
                "{}: {outcome:?}",
                test.name
            );
        }
    }
}
