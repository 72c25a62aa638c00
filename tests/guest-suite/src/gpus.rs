//! The GPUs the VMM describes (`GRACEVM_GPUS`) and what the nvgrace-gpu driver should make of
//! each, by the driver's rules (drivers/vfio/pci/nvgrace-gpu/main.c, spec nvgrace-gpu.md)
//! applied to the facts the VMM states.
//!
//! `GRACEVM_GPUS` ([`gracevm_contract::env::Gpu`], with its format) holds one entry per GPU:
//! where it is, its style (`blackwell`: all memory is usemem; `hopper`: a 1 GiB resmem tail
//! is split off), its readiness ([`gracevm_contract::gpu::Readiness`]), the aperture that
//! really backs its memory, and exactly the `nvidia,*` properties of its firmware node.

use std::fmt;

pub use gracevm_contract::env::Gpu;
pub use gracevm_contract::gpu::{Readiness, Style, POLL_TIMEOUT_MS};
use gracevm_contract::properties;

use crate::env::GuestEnv;
use crate::outcome::Outcome;

/// The env key.
pub use gracevm_contract::env::key::GPUS;
/// The driver's name (`struct pci_driver.name`).
pub const DRIVER: &str = "nvgrace_gpu_vfio_pci";
/// Its Kconfig option.
pub const KCONFIG: &str = "NVGRACE_GPU_VFIO_PCI";
/// The EGM series' option (trees carrying "Add virtualization support for EGM").
pub const EGM_KCONFIG: &str = "NVGRACE_EGM";

// The `nvidia,*` property names (without the prefix, as /gracevm/env carries them): the
// contract with the VMM's firmware.
pub use gracevm_contract::properties::short::{
    EGM_BASE_PA as PROP_EGM_BASE, EGM_PXM as PROP_EGM_PXM,
    EGM_RETIRED_PAGES_DATA_BASE as PROP_EGM_RETIRED, EGM_SIZE as PROP_EGM_SIZE,
    GPU_MEM_BASE_PA as PROP_MEM_BASE, GPU_MEM_SIZE as PROP_MEM_SIZE,
};

/// Hopper's resmem tail (`SZ_1G`).
pub const RESMEM_SIZE: u64 = 1 << 30;
/// Hopper's usemem granule (`MEMBLK_SIZE`, `SZ_512M`).
pub const MEMBLK_SIZE: u64 = 512 << 20;
/// Slack for the readiness race: poll quantum, guest boot before its clock starts.
pub const READINESS_SLACK_MS: u64 = 5_000;

/// vfio region of usemem (BAR4) and resmem (BAR2).
pub const USEMEM_REGION: u32 = 4;
pub const RESMEM_REGION: u32 = 2;

/// One emulated BAR of the driver: GPU memory `[phys, phys + len)` as vfio region `index`,
/// reported with size `bar_size` (`len` rounded up to a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub index: u32,
    pub phys: u64,
    pub len: u64,
    pub bar_size: u64,
}

impl MemRegion {
    fn new(index: u32, phys: u64, len: u64) -> MemRegion {
        MemRegion {
            index,
            phys,
            len,
            bar_size: len.checked_next_power_of_two().unwrap_or(0),
        }
    }

    pub fn name(&self) -> &'static str {
        if self.index == RESMEM_REGION {
            "resmem"
        } else {
            "usemem"
        }
    }

    /// Config-space offset of its (64-bit) BAR: 0x10 + 4 * index.
    pub fn bar_register(&self) -> u64 {
        0x10 + 4 * u64::from(self.index)
    }
}

impl fmt::Display for MemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (region {}) [{:#x}, +{:#x}), BAR size {:#x}",
            self.name(),
            self.index,
            self.phys,
            self.len,
            self.bar_size
        )
    }
}

/// What the driver makes of the GPU memory properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuMemory {
    /// Property missing or size 0: plain vfio-pci ops, no emulated BAR2/BAR4. The text says
    /// which rule.
    Plain(String),
    /// Emulated BARs.
    Regions {
        usemem: MemRegion,
        resmem: Option<MemRegion>,
        rule: String,
    },
    /// `nvgrace_gpu_init_nvdev_struct` fails the probe with this errno.
    Invalid { errno: i32, rule: String },
}

/// What binding the GPU should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeExpectation {
    Binds(String),
    /// The probe fails; with the errno when the rule names one.
    Fails {
        errno: Option<i32>,
        why: String,
    },
    /// Too close to call (a readiness delay near the driver's 30 s).
    Either(String),
}

impl ProbeExpectation {
    pub fn why(&self) -> &str {
        match self {
            ProbeExpectation::Binds(why)
            | ProbeExpectation::Fails { why, .. }
            | ProbeExpectation::Either(why) => why,
        }
    }
}

/// What the nvgrace-gpu driver (and the EGM series) make of a GPU the VMM describes.
pub trait DriverRules {
    /// The driver's GPU memory rules (`nvgrace_gpu_fetch_memory_property`,
    /// `nvgrace_gpu_init_nvdev_struct`) applied to the properties and the style.
    fn memory(&self) -> GpuMemory;

    /// Whether a probe started `uptime_ms` after the guest kernel started should bind.
    /// `egm_series`: the kernel carries the EGM series (which fails probes on missing EGM
    /// properties).
    fn probe_expectation(&self, uptime_ms: u64, egm_series: bool) -> ProbeExpectation;
}

impl DriverRules for Gpu {
    /// The driver's GPU memory rules (`nvgrace_gpu_fetch_memory_property`,
    /// `nvgrace_gpu_init_nvdev_struct`) applied to the properties and the style.
    fn memory(&self) -> GpuMemory {
        let (base, size) = match (self.prop(PROP_MEM_BASE), self.prop(PROP_MEM_SIZE)) {
            (None, _) => {
                return GpuMemory::Plain(format!(
                    "no {}: plain vfio-pci ops",
                    properties::GPU_MEM_BASE_PA
                ))
            }
            (_, None) => {
                return GpuMemory::Plain(format!(
                    "no {}: plain vfio-pci ops",
                    properties::GPU_MEM_SIZE
                ))
            }
            (Some(_), Some(0)) => {
                return GpuMemory::Plain(format!(
                    "{} is 0 (C2C link down): plain vfio-pci ops",
                    properties::GPU_MEM_SIZE
                ))
            }
            (Some(base), Some(size)) => (base, size),
        };
        match self.style {
            Style::Blackwell => GpuMemory::Regions {
                usemem: MemRegion::new(USEMEM_REGION, base, size),
                resmem: None,
                rule: format!("blackwell: all of gpu-mem-size {size:#x} is usemem, region 4 only"),
            },
            Style::Hopper => {
                let Some(after_resmem) = size.checked_sub(RESMEM_SIZE) else {
                    return GpuMemory::Invalid {
                        errno: libc::EOVERFLOW,
                        rule: format!(
                            "hopper: gpu-mem-size {size:#x} is smaller than the 1 GiB resmem"
                        ),
                    };
                };
                let usemem = after_resmem / MEMBLK_SIZE * MEMBLK_SIZE;
                if usemem == 0 {
                    return GpuMemory::Invalid {
                        errno: libc::EINVAL,
                        rule: format!(
                            "hopper: round_down(gpu-mem-size {size:#x} - 1 GiB, 512 MiB) is 0"
                        ),
                    };
                }
                let Some(resmem_phys) = base.checked_add(usemem) else {
                    return GpuMemory::Invalid {
                        errno: libc::EOVERFLOW,
                        rule: format!("hopper: {base:#x} + usemem {usemem:#x} overflows"),
                    };
                };
                GpuMemory::Regions {
                    usemem: MemRegion::new(USEMEM_REGION, base, usemem),
                    resmem: Some(MemRegion::new(RESMEM_REGION, resmem_phys, size - usemem)),
                    rule: format!(
                        "hopper: usemem = round_down({size:#x} - 1 GiB, 512 MiB) = {usemem:#x} \
                         (region 4), resmem = the remaining {:#x} (region 2)",
                        size - usemem
                    ),
                }
            }
        }
    }

    /// Whether a probe started `uptime_ms` after the guest kernel started should bind.
    /// `egm_series`: the kernel carries the EGM series (which fails probes on missing EGM
    /// properties).
    fn probe_expectation(&self, uptime_ms: u64, egm_series: bool) -> ProbeExpectation {
        let memory = self.memory();
        let egm = match memory {
            GpuMemory::Regions { .. } if egm_series => egm_failure(self),
            _ => None,
        };
        let readiness = match self.readiness {
            Readiness::Ready => Ok("ready".to_string()),
            Readiness::Never => Err(
                "readiness=never: BAR0 status never reads 0xFF, the probe polls 30 s then \
                 fails with ETIME"
                    .to_string(),
            ),
            Readiness::DelayMs(ms) => {
                // The VM started before the guest kernel: its clock is ahead of our uptime.
                if ms + READINESS_SLACK_MS <= uptime_ms + POLL_TIMEOUT_MS {
                    Ok(format!(
                        "delay:{ms}: ready within the probe's 30 s (uptime {uptime_ms} ms)"
                    ))
                } else if ms > uptime_ms + POLL_TIMEOUT_MS + 2 * READINESS_SLACK_MS {
                    Err(format!(
                        "delay:{ms}: not ready within the probe's 30 s (uptime {uptime_ms} ms), \
                         ETIME"
                    ))
                } else {
                    return ProbeExpectation::Either(format!(
                        "delay:{ms} ends within a few seconds of the probe's 30 s deadline \
                         (uptime {uptime_ms} ms)"
                    ));
                }
            }
        };
        match (readiness, memory, egm) {
            (Err(why), _, Some(egm)) => ProbeExpectation::Fails {
                errno: None,
                why: format!("{why}; also {egm}"),
            },
            (Err(why), _, None) => ProbeExpectation::Fails {
                errno: Some(libc::ETIME),
                why,
            },
            (Ok(ready), GpuMemory::Invalid { errno, rule }, _) => ProbeExpectation::Fails {
                errno: Some(errno),
                why: format!("{ready}; {rule}"),
            },
            (Ok(ready), _, Some(egm)) => ProbeExpectation::Fails {
                errno: None,
                why: format!("{ready}; {egm}"),
            },
            (Ok(ready), GpuMemory::Plain(rule), None) => {
                ProbeExpectation::Binds(format!("{ready}; {rule}"))
            }
            (Ok(ready), GpuMemory::Regions { rule, .. }, None) => {
                ProbeExpectation::Binds(format!("{ready}; {rule}"))
            }
        }
    }
}

/// The EGM series' extra probe failures (spec egm-driver.md section 1), considered only when
/// the GPU has valid memory properties and an `egm-pxm`.
fn egm_failure(gpu: &Gpu) -> Option<String> {
    gpu.prop(PROP_EGM_PXM)?;
    for name in [PROP_EGM_SIZE, PROP_EGM_BASE, PROP_EGM_RETIRED] {
        if gpu.prop(name).is_none() {
            return Some(format!(
                "EGM series: {} missing",
                properties::full_name(name)
            ));
        }
    }
    (gpu.prop(PROP_EGM_RETIRED) == Some(0)).then(|| {
        format!(
            "EGM series: {} is 0",
            properties::EGM_RETIRED_PAGES_DATA_BASE
        )
    })
}

/// Parses `GRACEVM_GPUS` (empty text: no GPU).
pub fn parse_gpus(text: &str) -> Result<Vec<Gpu>, String> {
    Gpu::parse_list(text)
}

/// The GPUs of the env: `Skip` when the key is missing or names no GPU, `Fail` when malformed.
pub fn gpus(env: &GuestEnv) -> Result<Vec<Gpu>, Outcome> {
    let gpus = env.require_parsed(GPUS, Gpu::parse_list)?;
    if gpus.is_empty() {
        return Err(Outcome::skip("platform has no GPU"));
    }
    Ok(gpus)
}

/// The default platform's GPU as platform/src/guest.rs writes it (a fixture for tests here and
/// in the EGM suite).
#[cfg(test)]
pub(crate) const DEFAULT_GPU_LINE: &str = "bdf=0000:00:01.0;id=10de:2941;style=blackwell;\
    readiness=ready;mem=0xd000000000+0x40000000;props=gpu-mem-base-pa:0xd000000000,\
    gpu-mem-size:0x40000000,egm-pxm:0x4,egm-base-pa:0x8000000000,egm-size:0x40000000,\
    egm-retired-pages-data-base:0x40100000";

#[cfg(test)]
mod tests {
    use super::*;

    const GB200: &str = DEFAULT_GPU_LINE;

    fn gpu(entry: &str) -> Gpu {
        parse_gpus(entry).unwrap().remove(0)
    }

    fn with(entry: &str, from: &str, to: &str) -> Gpu {
        assert!(entry.contains(from), "{from}");
        gpu(&entry.replace(from, to))
    }

    #[test]
    fn test_gpus_env_missing_skips_empty_skips_malformed_fails() {
        let env = |text: &str| GuestEnv::parse(text);
        assert!(matches!(
            gpus(&env("GRACEVM_MODE=test\n")),
            Err(Outcome::Skip(_))
        ));
        assert_eq!(
            gpus(&env("GRACEVM_GPUS=''\n")),
            Err(Outcome::skip("platform has no GPU"))
        );
        assert!(matches!(
            gpus(&env("GRACEVM_GPUS='bdf=1'\n")),
            Err(Outcome::Fail(_))
        ));
        let good = format!("GRACEVM_GPUS='{GB200}'\n");
        assert_eq!(gpus(&env(&good)).unwrap().len(), 1);
    }

    #[test]
    fn test_memory_blackwell_all_usemem_region4() {
        let GpuMemory::Regions { usemem, resmem, .. } = gpu(GB200).memory() else {
            panic!("expected emulated regions");
        };
        assert_eq!(
            usemem,
            MemRegion {
                index: 4,
                phys: 0xd0_0000_0000,
                len: 1 << 30,
                bar_size: 1 << 30
            }
        );
        assert_eq!(usemem.bar_register(), 0x20);
        assert_eq!(resmem, None);
        let odd = with(GB200, "gpu-mem-size:0x40000000", "gpu-mem-size:0x60000000");
        let GpuMemory::Regions { usemem, .. } = odd.memory() else {
            panic!("expected emulated regions");
        };
        assert_eq!((usemem.len, usemem.bar_size), (0x6000_0000, 0x8000_0000));
    }

    #[test]
    fn test_memory_hopper_splits_resmem_tail() {
        let hopper = with(
            &GB200.replace("style=blackwell", "style=hopper"),
            "gpu-mem-size:0x40000000",
            "gpu-mem-size:0x80000000",
        );
        let GpuMemory::Regions { usemem, resmem, .. } = hopper.memory() else {
            panic!("expected emulated regions");
        };
        assert_eq!(
            (usemem.phys, usemem.len, usemem.bar_size),
            (0xd0_0000_0000, 1 << 30, 1 << 30)
        );
        let resmem = resmem.unwrap();
        assert_eq!(
            resmem,
            MemRegion {
                index: 2,
                phys: 0xd0_4000_0000,
                len: 1 << 30,
                bar_size: 1 << 30
            }
        );
        assert_eq!(resmem.bar_register(), 0x18);
        // 2.25 GiB: usemem rounds down to 1 GiB, resmem takes the other 1.25 GiB.
        let odd = with(
            &hopper.entry(),
            "gpu-mem-size:0x80000000",
            "gpu-mem-size:0x90000000",
        );
        let GpuMemory::Regions { usemem, resmem, .. } = odd.memory() else {
            panic!("expected emulated regions");
        };
        assert_eq!(usemem.len, 1 << 30);
        assert_eq!(
            resmem.map(|r| (r.len, r.bar_size)),
            Some((0x5000_0000, 0x8000_0000))
        );
    }

    #[test]
    fn test_memory_hopper_too_small_fails_probe() {
        let hopper = GB200.replace("style=blackwell", "style=hopper");
        assert!(matches!(
            gpu(&hopper).memory(),
            GpuMemory::Invalid { errno, .. } if errno == libc::EINVAL
        ));
        let tiny = with(
            &hopper,
            "gpu-mem-size:0x40000000",
            "gpu-mem-size:0x20000000",
        );
        assert!(matches!(
            tiny.memory(),
            GpuMemory::Invalid { errno, .. } if errno == libc::EOVERFLOW
        ));
    }

    #[test]
    fn test_memory_missing_or_zero_props_plain_vfio_pci() {
        for (from, to, rule) in [
            (
                "gpu-mem-base-pa:0xd000000000,",
                "",
                properties::GPU_MEM_BASE_PA,
            ),
            ("gpu-mem-size:0x40000000,", "", properties::GPU_MEM_SIZE),
            ("gpu-mem-size:0x40000000", "gpu-mem-size:0x0", "is 0"),
        ] {
            match with(GB200, from, to).memory() {
                GpuMemory::Plain(why) => assert!(why.contains(rule), "{why}"),
                other => panic!("{from}: {other:?}"),
            }
        }
    }

    #[test]
    fn test_probe_expectation_readiness_rules() {
        let ready = gpu(GB200);
        assert!(matches!(
            ready.probe_expectation(0, false),
            ProbeExpectation::Binds(_)
        ));
        let never = with(GB200, "readiness=ready", "readiness=never");
        assert!(matches!(
            never.probe_expectation(5_000, false),
            ProbeExpectation::Fails { errno: Some(e), .. } if e == libc::ETIME
        ));
        let delayed = with(GB200, "readiness=ready", "readiness=delay:20000");
        assert!(matches!(
            delayed.probe_expectation(3_000, false),
            ProbeExpectation::Binds(_)
        ));
        let late = with(GB200, "readiness=ready", "readiness=delay:90000");
        assert!(matches!(
            late.probe_expectation(3_000, false),
            ProbeExpectation::Fails { errno: Some(e), .. } if e == libc::ETIME
        ));
        let close = with(GB200, "readiness=ready", "readiness=delay:35000");
        assert!(matches!(
            close.probe_expectation(3_000, false),
            ProbeExpectation::Either(_)
        ));
        // Readiness comes first: a never-ready GPU with bad Hopper sizes still times out.
        let both = never.entry().replace("style=blackwell", "style=hopper");
        assert!(matches!(
            gpu(&both).probe_expectation(0, false),
            ProbeExpectation::Fails { errno: Some(e), .. } if e == libc::ETIME
        ));
    }

    #[test]
    fn test_probe_expectation_memory_and_egm_rules() {
        let hopper = gpu(&GB200.replace("style=blackwell", "style=hopper"));
        assert!(matches!(
            hopper.probe_expectation(0, false),
            ProbeExpectation::Fails { errno: Some(e), .. } if e == libc::EINVAL
        ));
        let no_base = with(GB200, "gpu-mem-base-pa:0xd000000000,", "");
        assert!(matches!(
            no_base.probe_expectation(0, true),
            ProbeExpectation::Binds(_)
        ));
        let no_egm_size = with(GB200, "egm-size:0x40000000,", "");
        assert!(matches!(
            no_egm_size.probe_expectation(0, false),
            ProbeExpectation::Binds(_)
        ));
        assert!(matches!(
            no_egm_size.probe_expectation(0, true),
            ProbeExpectation::Fails { errno: None, .. }
        ));
        let zero_table = with(
            GB200,
            "egm-retired-pages-data-base:0x40100000",
            "egm-retired-pages-data-base:0x0",
        );
        assert!(matches!(
            zero_table.probe_expectation(0, true),
            ProbeExpectation::Fails { errno: None, .. }
        ));
        let no_pxm = with(&no_egm_size.entry(), "egm-pxm:0x4,", "");
        assert!(matches!(
            no_pxm.probe_expectation(0, true),
            ProbeExpectation::Binds(_)
        ));
    }
}
