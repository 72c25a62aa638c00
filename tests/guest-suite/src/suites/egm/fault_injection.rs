//! Spec section 4, probe error paths (v2 02/15 double free, 03/15 use-after-free): fault
//! injection fails the probe's allocations one at a time.

use gracevm_contract::findings::{self, Finding};
use gracevm_contract::kernel_log::{self, Report as KernelReport};

use crate::egm;
use crate::faults;
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::pci::PciDevice;
use crate::registry::Context;

use super::machine::*;

/// Review findings [aux-add-double-free] (v2 02/15) and [shared-region-uaf] (v2 03/15): error
/// paths of the GPU probe that only a failed allocation reaches. With fault injection (DEBUG=1
/// kernels), the region's last GPU is probed again and again with its n-th allocation failing,
/// n = 1, 2, ... until a probe makes no n-th allocation, the other GPUs bound: with one GPU
/// that walks the creation of the region's auxiliary device, with two its joining the region. Every failed probe must leave nothing behind and every region must come back whole;
/// KASAN reports the double free and the use-after-free of the error paths as they happen.
pub(super) fn probe_fault_sweep(ctx: &Context) -> Outcome {
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
pub(super) const MAX_FAULTS: u32 = 2000;

/// The error paths' reports that are the review findings: a double free in the probe
/// (auxiliary_device_add failing), a use-after-free of the region entry (the second GPU failing
/// to join it). Anything else the sweep provokes fails.
pub(super) fn known_probe_fault(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
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
