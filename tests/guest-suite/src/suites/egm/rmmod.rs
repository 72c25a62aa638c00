//! Spec section 4 and matrix 5.11, module lifetime: `rmmod nvgrace_egm` while a node is open
//! (v1's module exit order), and unloading with devices bound in both orders.

use gracevm_contract::findings::{self, Finding};
use gracevm_contract::kernel_log::Report as KernelReport;

use crate::egm::{self, EgmRegion, EGM_MODULE, GPU_DRIVER};
use crate::kconfig;
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::pci::PciDevice;
use crate::registry::Context;

use super::machine::*;

/// 5.11: with an fd open `rmmod nvgrace_egm` is refused; after close it removes every node.
/// Only for a modular build: the default build has it built in.
pub(super) fn rmmod_while_open(ctx: &Context) -> Outcome {
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
pub(super) fn reload(checks: &mut Checks, m: &Machine) {
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

/// 5.11: unload the modules in the other order with devices bound: nvgrace-gpu first (its
/// GPUs go, and their auxiliary devices with them), then nvgrace-egm; load both again
/// (nvgrace-egm first), rebind, and every region is whole. (`egm_rmmod_while_open` unloads
/// nvgrace-egm first with the devices bound: v1 destroyed its class before unregistering its
/// driver there.)
pub(super) fn rmmod_orders(ctx: &Context) -> Outcome {
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

/// A report while nvgrace-egm is unloaded with its devices bound: v1's module exit, which
/// destroyed the class first (fixed in v2: a regression fails by name).
pub(super) fn known_module_exit(_ctx: &Context, report: &KernelReport) -> Option<Finding> {
    (in_driver(report) || report.in_code("class")).then_some(findings::V1_MODULE_EXIT)
}
