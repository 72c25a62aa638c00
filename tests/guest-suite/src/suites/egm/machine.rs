//! What every EGM test starts from: the EGM gate and the platform facts ([`Machine`]), the
//! region's GPUs bound and its node there ([`ready`]), and the VMM's side of a check through
//! the test device ([`vmm_peek`], [`expect_landed`], ...).

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use gracevm_contract::kernel_log::Report as KernelReport;

use crate::devmem;
use crate::egm::{self, EgmRegion, Gpu, RetiredPage, RetiredTable, GPU_DRIVER};
use crate::env::Carveout;
use crate::ktap::note;
use crate::mapping::Mapping;
use crate::outcome::{Checks, Outcome};
use crate::registry::Context;
use crate::testdev::{Status, TestDev};

/// Length of one VMM CHECK request: the vCPU waits in the MMIO exit while the VMM compares.
pub(super) const VMM_CHUNK: u64 = 64 << 20;
/// How long a node may take to appear or go after a (un)bind returned.
pub(super) const NODE_WAIT: Duration = Duration::from_secs(2);
/// An unbind slower than this is taken as waiting for the device's user.
pub(super) const UNBIND_PATIENCE: Duration = Duration::from_secs(15);
/// v2 reserves minors 0..MAX_EGM_NODES-1.
pub(super) const V2_RESERVED_MINORS: u32 = 4;

/// A word no boot pattern and no zeroing produces: `EGM`, a tag and the offset it is written at.
pub(super) fn marker(tag: u64, offset: u64) -> u64 {
    0x4547_4d00_0000_0000 | (tag << 40) | (offset & 0xff_ffff_ffff)
}

/// The platform as the EGM tests see it.
#[derive(Debug)]
pub(super) struct Machine {
    pub(super) gpus: Vec<Gpu>,
    pub(super) regions: Vec<EgmRegion>,
    pub(super) tables: Option<Vec<RetiredTable>>,
    /// The kernel's page size.
    pub(super) page: usize,
}

/// The EGM gate, then the platform facts. `need_carveouts`: SKIP without a carve-out.
pub(super) fn machine(
    ctx: &Context,
    strict: bool,
    need_carveouts: bool,
) -> Result<Machine, Outcome> {
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
    pub(super) fn limit(&self) -> usize {
        egm::table_limit(self.page)
    }

    pub(super) fn retired(&self, region: &EgmRegion) -> Result<Vec<u64>, String> {
        egm::expected_retired_pages(region, self.tables.as_deref())
    }

    /// Why a region gets no node: its table is known to exceed what v2 accepts.
    pub(super) fn rejected_table(&self, region: &EgmRegion) -> Option<usize> {
        self.retired(region)
            .ok()
            .map(|pages| pages.len())
            .filter(|&n| n > self.limit())
    }

    pub(super) fn expectations(&self) -> String {
        self.gpus
            .iter()
            .map(|g| format!("{}: {}", g.bdf, egm::expect_gpu(g)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub(super) fn no_region_skip(&self) -> Outcome {
        Outcome::skip(format!(
            "no GPU of this platform should create an EGM device ({})",
            self.expectations()
        ))
    }

    /// The first region that is exactly a carve-out (safe to open).
    pub(super) fn openable(&self) -> Result<EgmRegion, Outcome> {
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
pub(super) fn bring_up(m: &Machine, region: &EgmRegion) -> Result<(), Outcome> {
    let mut all_bound_before = true;
    for bdf in &region.gpus {
        let bound = egm::bind_gpu(bdf).map_err(|why| Outcome::fail(format!("5.1: {why}")))?;
        if !bound.already {
            all_bound_before = false;
            note(format!(
                "bound {bdf} to {GPU_DRIVER} in {} ms",
                bound.took.as_millis()
            ));
        }
    }
    let node = egm::node_path(region.pxm);
    // A table the driver refuses, on GPUs an earlier test bound: the probe is long over and
    // the node is not coming (every test of a 513-entry scenario waited 2 s for it). Whether
    // the driver wrongly took the table anyway is egm_retired_table_limits' question.
    let settled = all_bound_before && m.rejected_table(region).is_some();
    let wait = if settled { Duration::ZERO } else { NODE_WAIT };
    if egm::wait_for_path(&node, true, wait) {
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
pub(super) fn ready(ctx: &Context) -> Result<(Machine, EgmRegion), Outcome> {
    let m = machine(ctx, false, true)?;
    let region = m.openable()?;
    bring_up(&m, &region)?;
    Ok((m, region))
}

/// Gate, platform, and every region that is exactly a carve-out (and has a table the driver
/// accepts) with its GPUs bound and its node there: the tests whose behaviour must hold for
/// every region, not only the first.
pub(super) fn ready_all(ctx: &Context) -> Result<(Machine, Vec<EgmRegion>), Outcome> {
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

/// The first region that is exactly a carve-out, its GPUs bound, opened, and the retired pages
/// it lists now (`label` prefixes a listing failure).
pub(super) fn open_listed(
    m: &Machine,
    label: &str,
) -> Result<(EgmRegion, File, Vec<RetiredPage>), Outcome> {
    let region = m.openable()?;
    bring_up(m, &region)?;
    let file = open(&region)?;
    let before = egm::list_retired_pages(file.as_fd())
        .map_err(|why| Outcome::fail(format!("{label}: {why}")))?;
    Ok((region, file, before))
}

pub(super) fn open(region: &EgmRegion) -> Result<File, Outcome> {
    egm::open_node(region.pxm)
        .map_err(|e| Outcome::fail(format!("open {}: {e}", egm::node_path(region.pxm))))
}

pub(super) fn io_fail(what: &str) -> impl Fn(std::io::Error) -> Outcome + '_ {
    move |e| Outcome::fail(format!("{what}: {e}"))
}

/// The VMM's view of the u64 at `gpa`.
pub(super) fn vmm_peek(dev: &TestDev, gpa: u64) -> Result<u64, Outcome> {
    dev.peek(gpa)
        .map_err(|why| Outcome::fail(format!("VMM probe: {why}")))
}

/// Runs a CHECK command over `[base, base + len)` in chunks; the offset of the first mismatch.
pub(super) fn vmm_check(
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

pub(super) fn vmm_all_value(
    dev: &TestDev,
    base: u64,
    len: u64,
    value: u64,
) -> Result<Option<u64>, Outcome> {
    vmm_check(dev, base, len, |dev, addr, n| {
        dev.check_value(addr, n, value)
    })
}

pub(super) fn vmm_boot_pattern(dev: &TestDev, base: u64, len: u64) -> Result<Option<u64>, Outcome> {
    vmm_check(dev, base, len, |dev, addr, n| dev.check_pattern(addr, n))
}

pub(super) fn testdev(ctx: &Context) -> Result<TestDev, Outcome> {
    TestDev::from_env(&ctx.env)
}

/// Writes `value` through `map` at `offset` and checks the VMM sees it at `base + offset`.
pub(super) fn expect_landed(
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

/// Whether a kernel report's header or call trace is in the drivers under test.
pub(super) fn in_driver(report: &KernelReport) -> bool {
    report.in_code("nvgrace") || report.in_code("egm")
}

/// Tests that take the GPUs away for good run only in a scenario that names them (its
/// `tests` list): anywhere else they would leave nothing for the tests after them.
pub(super) fn exclusive(ctx: &Context, name: &str) -> Result<(), Outcome> {
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

pub(super) fn expect_bound_region(checks: &mut Checks, region: &EgmRegion, when: &str) {
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

/// Whether `/sys/class/egm/egm<pxm>/<bdf>` is a link to that PCI function.
pub(super) fn bdf_link(pxm: u64, bdf: &str) -> bool {
    egm::link_target_name(&format!("{}/{bdf}", egm::class_dir(pxm))).as_deref() == Some(bdf)
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
}
