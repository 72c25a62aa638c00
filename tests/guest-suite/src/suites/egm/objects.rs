//! Spec section 2, the objects the drivers create (matrix 5.1, 5.2, 5.8): the auxiliary
//! device, `/dev/egm<pxm>` and its minor, sysfs `egm_size`, and a region shared by two GPUs
//! (one node, a BDF link each, unbind order).

use std::collections::BTreeSet;

use crate::egm::{self, EgmRegion, EGM_AUX_DRIVER, GPU_DRIVER};
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::registry::Context;

use super::machine::*;

/// 5.1: binding the GPU(s) creates `nvgrace_gpu_vfio_pci.egm.<pxm>` (bound to nvgrace_egm,
/// child of one of the region's GPUs) and `/dev/egm<pxm>`, a char device with mode 0600 whose
/// number is the class device's.
pub(super) fn device_created(ctx: &Context) -> Outcome {
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

pub(super) fn check_region_objects(checks: &mut Checks, region: &EgmRegion) -> Option<(u32, u32)> {
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
pub(super) fn minor_reserved(ctx: &Context) -> Outcome {
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
pub(super) fn size_sysfs(ctx: &Context) -> Outcome {
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

/// 5.8: two GPUs with the same egm-pxm make one `/dev/egm<pxm>` with one BDF link each;
/// unbinding one keeps the node (and drops its link), unbinding the other removes it — in
/// either order. The GPUs are rebound afterwards.
pub(super) fn shared_region(ctx: &Context) -> Outcome {
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
