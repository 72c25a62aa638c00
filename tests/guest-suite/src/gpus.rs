//! The GPUs the VMM describes (`GRACEVM_GPUS`) and what the nvgrace-gpu driver should make of
//! each, by the driver's rules (drivers/vfio/pci/nvgrace-gpu/main.c, spec nvgrace-gpu.md)
//! applied to the facts the VMM states.
//!
//! `GRACEVM_GPUS` holds one entry per GPU, separated by whitespace; fields separated by `;`:
//! `bdf=0000:00:01.0;id=10de:2941;style=blackwell;readiness=ready;
//! mem=0xd000000000+0x40000000;props=gpu-mem-base-pa:0xd000000000,gpu-mem-size:0x40000000,...`
//!
//! - `style`: `blackwell` (NVIDIA DVSEC with the MIG-fix bit: all memory is usemem) or
//!   `hopper` (no DVSEC: a 1 GiB resmem tail is split off).
//! - `readiness`: `ready`, `never`, or `delay:MS` (ready MS ms after the VM started).
//! - `mem`: the aperture that really backs the GPU memory (`base+size`).
//! - `props`: exactly the `nvidia,*` properties of the GPU's firmware node (names without the
//!   prefix); missing ones are absent.

use std::collections::BTreeMap;
use std::fmt;

use crate::env::{parse_u64, GuestEnv, ENV_PATH};
use crate::outcome::Outcome;

/// The env key.
pub const GPUS: &str = "GRACEVM_GPUS";
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
/// The driver polls readiness once a second for 30 s (`POLL_TIMEOUT_MS`).
pub const POLL_TIMEOUT_MS: u64 = 30_000;
/// Slack for the readiness race: poll quantum, guest boot before its clock starts.
pub const READINESS_SLACK_MS: u64 = 5_000;

/// vfio region of usemem (BAR4) and resmem (BAR2).
pub const USEMEM_REGION: u32 = 4;
pub const RESMEM_REGION: u32 = 2;

/// How the GPU detects the MIG hardware bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// NVIDIA DVSEC (id 3) with bit 0 at +0xA: no bug, all memory is usemem.
    Blackwell,
    /// No DVSEC: a 1 GiB resmem tail is split off.
    Hopper,
}

impl fmt::Display for Style {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Style::Blackwell => "blackwell",
            Style::Hopper => "hopper",
        })
    }
}

/// When BAR0's status registers read 0xFF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// This many ms after the VM started.
    DelayMs(u64),
    Never,
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Ready => f.write_str("ready"),
            Readiness::DelayMs(ms) => write!(f, "delay:{ms}"),
            Readiness::Never => f.write_str("never"),
        }
    }
}

/// One GPU of `GRACEVM_GPUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub bdf: String,
    pub vendor: u16,
    pub device: u16,
    pub style: Style,
    pub readiness: Readiness,
    /// The aperture backing the GPU memory: `[mem_base, mem_base + mem_size)`.
    pub mem_base: u64,
    pub mem_size: u64,
    /// The firmware node's properties, without `nvidia,`.
    pub props: BTreeMap<String, u64>,
}

impl fmt::Display for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GPU {} ({:04x}:{:04x}, {})",
            self.bdf, self.vendor, self.device, self.style
        )
    }
}

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

impl Gpu {
    pub fn prop(&self, name: &str) -> Option<u64> {
        self.props.get(name).copied()
    }

    /// The driver's GPU memory rules (`nvgrace_gpu_fetch_memory_property`,
    /// `nvgrace_gpu_init_nvdev_struct`) applied to the properties and the style.
    pub fn memory(&self) -> GpuMemory {
        let (base, size) = match (self.prop(PROP_MEM_BASE), self.prop(PROP_MEM_SIZE)) {
            (None, _) => {
                return GpuMemory::Plain(format!("no nvidia,{PROP_MEM_BASE}: plain vfio-pci ops"))
            }
            (_, None) => {
                return GpuMemory::Plain(format!("no nvidia,{PROP_MEM_SIZE}: plain vfio-pci ops"))
            }
            (Some(_), Some(0)) => {
                return GpuMemory::Plain(format!(
                    "nvidia,{PROP_MEM_SIZE} is 0 (C2C link down): plain vfio-pci ops"
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

    /// The EGM series' extra probe failures (spec egm-driver.md section 1), considered only
    /// when the GPU has valid memory properties and an `egm-pxm`.
    fn egm_failure(&self) -> Option<String> {
        self.prop(PROP_EGM_PXM)?;
        for name in [PROP_EGM_SIZE, PROP_EGM_BASE, PROP_EGM_RETIRED] {
            if self.prop(name).is_none() {
                return Some(format!("EGM series: nvidia,{name} missing"));
            }
        }
        (self.prop(PROP_EGM_RETIRED) == Some(0))
            .then(|| format!("EGM series: nvidia,{PROP_EGM_RETIRED} is 0"))
    }

    /// Whether a probe started `uptime_ms` after the guest kernel started should bind.
    /// `egm_series`: the kernel carries the EGM series (which fails probes on missing EGM
    /// properties).
    pub fn probe_expectation(&self, uptime_ms: u64, egm_series: bool) -> ProbeExpectation {
        let memory = self.memory();
        let egm = match memory {
            GpuMemory::Regions { .. } if egm_series => self.egm_failure(),
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

    /// Whether `[phys, phys + len)` lies inside the backing aperture.
    pub fn backed(&self, phys: u64, len: u64) -> bool {
        phys >= self.mem_base
            && phys
                .checked_add(len)
                .is_some_and(|end| end <= self.mem_base.saturating_add(self.mem_size))
    }
}

/// Parses `GRACEVM_GPUS` (empty text: no GPU).
pub fn parse_gpus(text: &str) -> Result<Vec<Gpu>, String> {
    text.split_whitespace().map(parse_gpu).collect()
}

fn parse_gpu(entry: &str) -> Result<Gpu, String> {
    let bad = |why: String| format!("GPU entry {entry:?}: {why}");
    let mut fields = BTreeMap::new();
    for field in entry.split(';').filter(|f| !f.is_empty()) {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| bad(format!("field {field:?} has no '='")))?;
        if fields.insert(key, value).is_some() {
            return Err(bad(format!("field {key} given twice")));
        }
    }
    let field = |key: &str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| bad(format!("no {key}=")))
    };
    let number = |what: &str, text: &str| {
        parse_u64(text).ok_or_else(|| bad(format!("{what} {text:?} is not a number")))
    };
    let bdf = field("bdf")?;
    if !crate::pci::is_bdf(bdf) {
        return Err(bad(format!("bdf {bdf:?} is not dddd:bb:dd.f")));
    }
    let id = field("id")?;
    let (vendor, device) = id
        .split_once(':')
        .and_then(|(v, d)| {
            Some((
                u16::from_str_radix(v, 16).ok()?,
                u16::from_str_radix(d, 16).ok()?,
            ))
        })
        .ok_or_else(|| bad(format!("id {id:?} is not vvvv:dddd")))?;
    let style = match field("style")? {
        "blackwell" => Style::Blackwell,
        "hopper" => Style::Hopper,
        other => {
            return Err(bad(format!(
                "style {other:?} is neither blackwell nor hopper"
            )))
        }
    };
    let readiness = match field("readiness")? {
        "ready" => Readiness::Ready,
        "never" => Readiness::Never,
        other => match other.strip_prefix("delay:") {
            Some(ms) => Readiness::DelayMs(number("readiness delay", ms)?),
            None => {
                return Err(bad(format!(
                    "readiness {other:?} is not ready|never|delay:MS"
                )))
            }
        },
    };
    let mem = field("mem")?;
    let (base, size) = mem
        .split_once('+')
        .ok_or_else(|| bad(format!("mem {mem:?} is not base+size")))?;
    let (mem_base, mem_size) = (number("mem base", base)?, number("mem size", size)?);
    if mem_base.checked_add(mem_size).is_none() {
        return Err(bad(format!("mem {mem} ends beyond 2^64")));
    }
    let mut props = BTreeMap::new();
    for prop in field("props")?.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = prop
            .split_once(':')
            .ok_or_else(|| bad(format!("property {prop:?} is not name:value")))?;
        let name = name.strip_prefix("nvidia,").unwrap_or(name);
        if props
            .insert(name.to_string(), number(name, value)?)
            .is_some()
        {
            return Err(bad(format!("property {name} given twice")));
        }
    }
    Ok(Gpu {
        bdf: bdf.to_string(),
        vendor,
        device,
        style,
        readiness,
        mem_base,
        mem_size,
        props,
    })
}

/// The GPUs of the env: `Skip` when the key is missing or names no GPU, `Fail` when malformed.
pub fn gpus(env: &GuestEnv) -> Result<Vec<Gpu>, Outcome> {
    let text = env.require(GPUS)?;
    let gpus =
        parse_gpus(text).map_err(|why| Outcome::fail(format!("{GPUS} in {ENV_PATH}: {why}")))?;
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
    fn test_parse_gpus_contract_example() {
        let g = gpu(GB200);
        assert_eq!(g.bdf, "0000:00:01.0");
        assert_eq!((g.vendor, g.device), (0x10de, 0x2941));
        assert_eq!(g.style, Style::Blackwell);
        assert_eq!(g.readiness, Readiness::Ready);
        assert_eq!((g.mem_base, g.mem_size), (0xd0_0000_0000, 0x4000_0000));
        assert_eq!(g.props.len(), 6);
        assert_eq!(g.prop(PROP_EGM_RETIRED), Some(0x4010_0000));
        assert_eq!(g.to_string(), "GPU 0000:00:01.0 (10de:2941, blackwell)");
    }

    #[test]
    fn test_parse_gpus_two_entries_delay_and_empty_props() {
        let text = format!(
            "{GB200}\n bdf=0000:00:02.0;id=10de:2342;style=hopper;readiness=delay:1500;\
             mem=0xe000000000+0x80000000;props="
        );
        let gpus = parse_gpus(&text).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].readiness, Readiness::DelayMs(1500));
        assert_eq!(gpus[1].style, Style::Hopper);
        assert!(gpus[1].props.is_empty());
        assert_eq!(parse_gpus("  ").unwrap(), vec![]);
    }

    #[test]
    fn test_parse_gpus_malformed_entries_error() {
        for (from, to) in [
            ("bdf=0000:00:01.0", "bdf=00:01.0"),
            ("id=10de:2941", "id=10de"),
            ("style=blackwell", "style=ampere"),
            ("readiness=ready", "readiness=soon"),
            ("readiness=ready", "readiness=delay:x"),
            ("mem=0xd000000000+0x40000000", "mem=0xd000000000"),
            ("mem=0xd000000000+0x40000000", "mem=0xffffffffffffffff+0x2"),
            ("gpu-mem-size:0x40000000", "gpu-mem-size"),
            ("gpu-mem-size:0x40000000", "gpu-mem-size:big"),
            ("egm-pxm:0x4", "gpu-mem-size:0x4"),
            (";props=", ";bdf=0000:00:02.0;props="),
        ] {
            assert!(GB200.contains(from), "{from}");
            let entry = GB200.replace(from, to);
            assert!(parse_gpus(&entry).is_err(), "{entry}");
        }
        assert!(parse_gpus(&GB200.replace(";props=", ";")).is_err());
        assert!(parse_gpus(&GB200.replace("bdf=", "bdf")).is_err());
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
            &hopper.to_entry(),
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
                "no nvidia,gpu-mem-base-pa",
            ),
            ("gpu-mem-size:0x40000000,", "", "no nvidia,gpu-mem-size"),
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
        let both = never.to_entry().replace("style=blackwell", "style=hopper");
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
        let no_pxm = with(&no_egm_size.to_entry(), "egm-pxm:0x4,", "");
        assert!(matches!(
            no_pxm.probe_expectation(0, true),
            ProbeExpectation::Binds(_)
        ));
    }

    #[test]
    fn test_backed_inside_aperture_only() {
        let g = gpu(GB200);
        assert!(g.backed(0xd0_0000_0000, 1 << 30));
        assert!(g.backed(0xd0_3fff_fff8, 8));
        assert!(!g.backed(0xd0_3fff_fff8, 16));
        assert!(!g.backed(0xcf_ffff_fff8, 8));
        assert!(!g.backed(u64::MAX, 8));
    }

    impl Gpu {
        /// Back to a `GRACEVM_GPUS` entry (tests only).
        fn to_entry(&self) -> String {
            let readiness = self.readiness.to_string();
            let props: Vec<String> = self
                .props
                .iter()
                .map(|(name, value)| format!("{name}:{value:#x}"))
                .collect();
            format!(
                "bdf={};id={:04x}:{:04x};style={};readiness={readiness};mem={:#x}+{:#x};props={}",
                self.bdf,
                self.vendor,
                self.device,
                self.style,
                self.mem_base,
                self.mem_size,
                props.join(",")
            )
        }
    }
}
