//! Spec section 1, how the driver finds EGM (matrix 5.9): missing and zero `nvidia,*`
//! properties, GPU by GPU.

use std::collections::BTreeSet;

use crate::egm::{self, Gpu, GpuExpect, Readiness};
use crate::ktap::note;
use crate::outcome::{check, Checks, Outcome};
use crate::registry::Context;

use super::machine::*;

pub(super) fn props_text(gpu: &Gpu) -> String {
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
pub(super) fn missing_properties(ctx: &Context) -> Outcome {
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
