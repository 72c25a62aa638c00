//! The Grace GPU function and the nvgrace-gpu vfio variant driver (issue 4): enumeration,
//! driver_override-only binding, BAR0 readiness (a GPU that never gets ready fails its probe
//! with ETIME after 30 s), the emulated BAR2/BAR4 regions through the VFIO uAPI, and GPU
//! memory written through a region mapping as the VMM sees it.
//!
//! Expectations come from `GRACEVM_GPUS` ([`crate::gpus`]): the suite applies the driver's
//! rules to the facts the VMM states (style, readiness, properties) and says which rule it
//! applied. The tests run in order and share state: `gpu_bind` leaves the GPUs bound for the
//! region and mapping tests (which bind a GPU themselves when run alone).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::devmem::{self, Access};
use crate::gpus::{
    self, DriverRules, Gpu, GpuMemory, MemRegion, ProbeExpectation, Readiness, DRIVER, EGM_KCONFIG,
    KCONFIG,
};
use crate::kconfig;
use crate::ktap::note;
use crate::mapping::Mapping;
use crate::outcome::{check, Checks, Outcome};
use crate::pci::{self, PciDevice};
use crate::procfs;
use crate::registry::{Context, Test};
use crate::testdev::{Status, TestDev};
use crate::vfio::{self, Device, NoIommuDevice, RegionInfo, SparseArea};

pub const TESTS: &[Test] = &[
    Test::new("gpu_enumerated", gpu_enumerated).no_carveouts(),
    Test::new("gpu_no_autobind", gpu_no_autobind).no_carveouts(),
    // A never-ready GPU's probe alone takes 30 s.
    Test::new("gpu_bind", gpu_bind)
        .no_carveouts()
        .with_timeout(Duration::from_secs(120)),
    Test::new("gpu_probe_timeout", gpu_probe_timeout)
        .no_carveouts()
        .with_timeout(Duration::from_secs(90)),
    Test::new("gpu_vfio_regions", gpu_vfio_regions)
        .no_carveouts()
        .with_timeout(Duration::from_secs(90)),
    Test::new("gpu_usemem_mmap", gpu_usemem_mmap)
        .no_carveouts()
        .with_timeout(Duration::from_secs(90)),
];

/// PCI class of a 3D controller (base 0x03, sub-class 0x02), `class >> 8`.
const CLASS_3D_CONTROLLER: u64 = 0x0302;
/// The driver's probe polls for 30 s; a timed-out probe returns after at least this long.
const MIN_TIMEOUT_PROBE: Duration = Duration::from_secs(29);
/// How many kernel messages about a GPU a diagnosis quotes.
const LOG_LINES: usize = 6;
/// Emulated 64-bit BARs read with these flag bits: 64-bit (0x4) and prefetchable (0x8).
const BAR_FLAGS_64_PREFETCH: u64 = 0xC;
/// The window the mapping test maps on its own, at a non-zero region offset.
const WINDOW: u64 = 2 << 20;

/// `Skip` unless the kernel registered the driver. A kernel that has it as a module that is
/// not loaded fails: the module tree was not given or the load failed (kernel_modules says
/// which), and skipping would hide the whole GPU suite.
fn require_driver() -> Result<(), Outcome> {
    if pci::driver_registered(DRIVER) {
        return Ok(());
    }
    let option = kconfig::full_name(KCONFIG);
    Err(match kconfig::kernel_config() {
        Ok(config) => match config.value(KCONFIG) {
            Some("m") => Outcome::fail(format!(
                "{option}=m but {DRIVER} is not registered: the module is not loaded \
                 (see kernel_modules; gracevm needs the kernel's module tree, --modules)"
            )),
            Some("y") => Outcome::skip(format!("{option}=y but no {}/{DRIVER}", pci::PCI_DRIVERS)),
            _ => Outcome::skip(format!("kernel built without {option}")),
        },
        Err(_) => Outcome::skip(format!(
            "{DRIVER} is not registered and the kernel config is unavailable (no {option}?)"
        )),
    })
}

/// Guest uptime in ms (0 when /proc/uptime is unreadable).
fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64)
}

/// Whether the kernel carries the EGM series (its probe also checks the EGM properties).
fn egm_series() -> bool {
    kconfig::kernel_has(EGM_KCONFIG) == Some(true)
}

/// What the probe of `g` should do if started now.
fn expectation(g: &Gpu) -> ProbeExpectation {
    g.probe_expectation(uptime_ms(), egm_series())
}

/// The kernel messages that mention `bdf`, without level and timestamp.
pub fn messages_about(log: &str, bdf: &str) -> Vec<String> {
    log.lines()
        .map(procfs::log_message)
        .filter(|message| message.contains(bdf))
        .map(str::to_string)
        .collect()
}

/// The errno of the last logged failed probe of `bdf` by the driver (the driver core's
/// `probe with driver nvgrace_gpu_vfio_pci failed with error -N`).
pub fn probe_failure_errno(log: &str, bdf: &str) -> Option<i32> {
    let marker = format!("probe with driver {DRIVER} failed with error -");
    messages_about(log, bdf).iter().rev().find_map(|message| {
        let rest = &message[message.find(&marker)? + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// The last kernel messages about `bdf`, as lines to quote in a diagnosis.
fn recent_messages(bdf: &str) -> String {
    match procfs::kernel_log() {
        Ok(log) => {
            let messages = messages_about(&log, bdf);
            if messages.is_empty() {
                return format!("(no kernel message mentions {bdf})");
            }
            let skip = messages.len().saturating_sub(LOG_LINES);
            format!("kernel log:\n  {}", messages[skip..].join("\n  "))
        }
        Err(why) => format!("(cannot read the kernel log: {why})"),
    }
}

/// The vfio group node of a bound device, checked to exist.
fn group_node(dev: &PciDevice) -> Result<(u32, String), String> {
    let Some(group) = dev.iommu_group() else {
        let param = "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode";
        let mode = std::fs::read_to_string(param)
            .map_or_else(|e| format!("unreadable: {e}"), |t| t.trim().to_string());
        return Err(format!(
            "{} has no iommu_group link ({param}: {mode})",
            dev.dir().display()
        ));
    };
    let node = vfio::Group::noiommu_path(group);
    if Path::new(&node).exists() {
        Ok((group, node))
    } else {
        Err(format!(
            "{} is in IOMMU group {group} but {node} is missing",
            dev.bdf
        ))
    }
}

fn driver_text(driver: &Option<String>) -> String {
    driver.clone().unwrap_or_else(|| "no driver".to_string())
}

/// Each GPU is enumerated at its BDF as an NVIDIA 3D controller with the expected ids.
fn gpu_enumerated(ctx: &Context) -> Outcome {
    let gpus = check!(gpus::gpus(&ctx.env));
    let mut checks = Checks::new();
    for g in &gpus {
        let dev = PciDevice::new(&g.bdf);
        if !dev.exists() {
            checks.fail(format!(
                "{g}: {} absent: not enumerated",
                dev.dir().display()
            ));
            continue;
        }
        for (attr, expected) in [
            ("vendor", u64::from(g.vendor)),
            ("device", u64::from(g.device)),
        ] {
            match dev.hex_attr(attr) {
                Ok(value) => checks.expect(value == expected, || {
                    format!("{g}: {attr} reads {value:#06x}, expected {expected:#06x}")
                }),
                Err(why) => checks.fail(why),
            }
        }
        match dev.hex_attr("class") {
            Ok(class) => checks.expect(class >> 8 == CLASS_3D_CONTROLLER, || {
                format!("{g}: class {class:#08x}, expected 0x0302xx (3D controller)")
            }),
            Err(why) => checks.fail(why),
        }
        note(format!(
            "{g}: enumerated, memory aperture [{:#x}, +{:#x}), readiness {}",
            g.mem_base, g.mem_size, g.readiness
        ));
    }
    checks.outcome()
}

/// No driver binds a GPU at boot: the driver's ids are driver_override-only.
fn gpu_no_autobind(ctx: &Context) -> Outcome {
    let gpus = check!(gpus::gpus(&ctx.env));
    let mut checks = Checks::new();
    for g in &gpus {
        let dev = PciDevice::new(&g.bdf);
        if !dev.exists() {
            checks.fail(format!("{g}: not enumerated"));
            continue;
        }
        if let Some(driver) = dev.driver() {
            checks.fail(format!(
                "{g}: bound to {driver} at boot; the driver's ids are driver_override-only \
                 (or the suite ran twice in this boot)"
            ));
        }
        match dev.driver_override() {
            Ok(None) => {}
            Ok(Some(name)) => checks.fail(format!("{g}: driver_override already {name:?}")),
            Err(why) => checks.fail(why),
        }
    }
    checks.outcome()
}

/// Binds `g` through driver_override and drivers_probe; checks the result against the
/// readiness and memory rules.
fn bind_one(g: &Gpu, checks: &mut Checks) {
    let dev = PciDevice::new(&g.bdf);
    if !dev.exists() {
        checks.fail(format!("{g}: not enumerated"));
        return;
    }
    match dev.driver() {
        Some(driver) if driver == DRIVER => {
            match expectation(g) {
                ProbeExpectation::Fails { why, .. } => checks.fail(format!(
                    "{g}: already bound to {DRIVER}, expected the probe to fail: {why}"
                )),
                _ => note(format!("{g}: already bound to {DRIVER}")),
            }
            if let Err(why) = group_node(&dev) {
                checks.fail(format!("{g}: {why}"));
            }
            return;
        }
        Some(other) => {
            checks.fail(format!("{g}: bound to {other}, cannot bind {DRIVER}"));
            return;
        }
        None => {}
    }
    let expected = expectation(g);
    let started = Instant::now();
    let write = match dev.bind_with_override(DRIVER) {
        Ok(write) => write,
        Err(why) => {
            checks.fail(format!("{g}: {why}"));
            return;
        }
    };
    let elapsed = started.elapsed();
    let driver = dev.driver();
    let bound = driver.as_deref() == Some(DRIVER);
    let write_text = match &write {
        Ok(()) => "the drivers_probe write succeeded".to_string(),
        Err(e) => format!("the drivers_probe write failed: {e}"),
    };
    let took = format!("{:.1} s", elapsed.as_secs_f64());
    match &expected {
        ProbeExpectation::Binds(why) => {
            if !bound {
                checks.fail(format!(
                    "{g}: expected bound to {DRIVER} ({why}), observed {} after {took}; \
                     {write_text}\n{}",
                    driver_text(&driver),
                    recent_messages(&g.bdf)
                ));
                return;
            }
            match group_node(&dev) {
                Ok((_, node)) => note(format!("{g}: bound in {took} ({why}), {node}")),
                Err(why) => checks.fail(format!("{g}: bound but {why}")),
            }
        }
        ProbeExpectation::Fails { errno, why } => {
            if bound {
                checks.fail(format!(
                    "{g}: bound to {DRIVER}, expected the probe to fail: {why}"
                ));
                return;
            }
            let log = procfs::kernel_log().unwrap_or_default();
            let logged = probe_failure_errno(&log, &g.bdf);
            note(format!(
                "{g}: not bound after {took} as expected ({why}); {write_text}\n{}",
                recent_messages(&g.bdf)
            ));
            if let Some(errno) = errno {
                checks.expect(logged == Some(*errno), || {
                    format!(
                        "{g}: expected the kernel to log the probe failing with error -{errno}, \
                         found {}",
                        logged.map_or("no such message".into(), |e| format!("error -{e}"))
                    )
                });
                if *errno == libc::ETIME {
                    checks.expect(elapsed >= MIN_TIMEOUT_PROBE, || {
                        format!(
                            "{g}: the probe gave up after {took}, before the driver's 30 s of \
                             polling"
                        )
                    });
                }
            }
        }
        ProbeExpectation::Either(why) => note(format!(
            "{g}: {} after {took}; either is right: {why}",
            driver_text(&driver)
        )),
    }
}

/// Binding with driver_override: every GPU whose rules say it binds is bound to the driver
/// with a no-IOMMU group node; the others (readiness=never, bad Hopper sizes) are not, and
/// the kernel says why. The GPUs stay bound for the next tests.
fn gpu_bind(ctx: &Context) -> Outcome {
    let gpus = check!(gpus::gpus(&ctx.env));
    check!(require_driver());
    let mut checks = Checks::new();
    for g in &gpus {
        bind_one(g, &mut checks);
    }
    checks.outcome()
}

/// A never-ready GPU's probe times out: the kernel logs it failing with ETIME (-62) after the
/// driver's 30 s of polling, and the GPU stays unbound.
fn gpu_probe_timeout(ctx: &Context) -> Outcome {
    let gpus = check!(gpus::gpus(&ctx.env));
    let never: Vec<&Gpu> = gpus
        .iter()
        .filter(|g| g.readiness == Readiness::Never)
        .collect();
    if never.is_empty() {
        return Outcome::skip("no GPU with readiness=never");
    }
    check!(require_driver());
    let mut checks = Checks::new();
    for g in never {
        let dev = PciDevice::new(&g.bdf);
        if let Some(driver) = dev.driver() {
            checks.fail(format!(
                "{g}: bound to {driver} although it never gets ready"
            ));
            continue;
        }
        let mut log = procfs::kernel_log().unwrap_or_default();
        if probe_failure_errno(&log, &g.bdf).is_none() {
            note(format!(
                "{g}: no failed probe logged yet: binding now (30 s)"
            ));
            let started = Instant::now();
            if let Err(why) = dev.bind_with_override(DRIVER) {
                checks.fail(format!("{g}: {why}"));
                continue;
            }
            let elapsed = started.elapsed();
            checks.expect(elapsed >= MIN_TIMEOUT_PROBE, || {
                format!(
                    "{g}: the probe returned after {:.1} s, before the driver's 30 s of polling",
                    elapsed.as_secs_f64()
                )
            });
            if let Some(driver) = dev.driver() {
                checks.fail(format!(
                    "{g}: bound to {driver} although it never gets ready"
                ));
            }
            log = procfs::kernel_log().unwrap_or_default();
        }
        match probe_failure_errno(&log, &g.bdf) {
            Some(errno) if errno == libc::ETIME => {
                note(format!("{g}: probe failed with error -{errno} (ETIME)"));
            }
            other => checks.fail(format!(
                "{g}: expected the kernel to log the probe failing with error -{} (ETIME), \
                 found {}\n{}",
                libc::ETIME,
                other.map_or("no such message".into(), |e| format!("error -{e}")),
                recent_messages(&g.bdf)
            )),
        }
    }
    checks.outcome()
}

/// The GPUs a region test can use: `Ok(None)` (with a note) for GPUs whose rules say the
/// probe fails; binds a GPU that gpu_bind did not (test run alone).
fn bound_gpu(g: &Gpu) -> Result<Option<PciDevice>, String> {
    let dev = PciDevice::new(&g.bdf);
    match dev.driver() {
        Some(driver) if driver == DRIVER => return Ok(Some(dev)),
        Some(other) => return Err(format!("{g}: bound to {other}, not {DRIVER}")),
        None => {}
    }
    match expectation(g) {
        ProbeExpectation::Fails { why, .. } => {
            note(format!("{g}: not bound and not expected to bind ({why})"));
            return Ok(None);
        }
        ProbeExpectation::Either(why) => {
            note(format!("{g}: not bound, which its rules allow ({why})"));
            return Ok(None);
        }
        ProbeExpectation::Binds(_) => {}
    }
    note(format!(
        "{g}: not bound (gpu_bind did not run?): binding now"
    ));
    let write = dev.bind_with_override(DRIVER)?;
    if dev.driver().as_deref() == Some(DRIVER) {
        Ok(Some(dev))
    } else {
        Err(format!(
            "{g}: binding failed ({write:?})\n{}",
            recent_messages(&g.bdf)
        ))
    }
}

/// Opens the bound GPU through its no-IOMMU group.
fn open_vfio(g: &Gpu, dev: &PciDevice) -> Result<NoIommuDevice, String> {
    let (group, _) = group_node(dev).map_err(|why| format!("{g}: {why}"))?;
    NoIommuDevice::open(group, &g.bdf).map_err(|e| format!("{g}: {e}"))
}

/// Reads the u64 at config-space offset `reg` through the device fd.
fn config_u64(device: &Device, config: &RegionInfo, reg: u64) -> Result<u64, String> {
    let mut buf = [0u8; 8];
    device.read_at(config.offset + reg, &mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

fn config_write_u64(
    device: &Device,
    config: &RegionInfo,
    reg: u64,
    value: u64,
) -> Result<(), String> {
    device.write_at(config.offset + reg, &value.to_le_bytes())?;
    Ok(())
}

/// An emulated BAR in config space: reads the 64-bit prefetchable flags, and sizing it
/// (writing all ones) gives the region's power-of-two size. The original value is restored.
fn check_emulated_bar(
    g: &Gpu,
    device: &Device,
    config: &RegionInfo,
    region: &MemRegion,
    checks: &mut Checks,
) -> Result<(), String> {
    let reg = region.bar_register();
    let what = format!(
        "{g}: config {reg:#x} (BAR{} of {})",
        region.index,
        region.name()
    );
    let original = config_u64(device, config, reg)?;
    let low = original & (region.bar_size.max(16) - 1);
    checks.expect(low == BAR_FLAGS_64_PREFETCH, || {
        format!("{what} reads {original:#x}: expected the 64-bit prefetchable flags 0xc in the bits below the BAR size {:#x}", region.bar_size)
    });
    config_write_u64(device, config, reg, u64::MAX)?;
    let sized = config_u64(device, config, reg)?;
    config_write_u64(device, config, reg, original & !BAR_FLAGS_64_PREFETCH)?;
    let expected = !(region.bar_size.wrapping_sub(1)) | BAR_FLAGS_64_PREFETCH;
    checks.expect(sized == expected, || {
        format!(
            "{what} after writing all ones reads {sized:#x}, expected {expected:#x} (size {:#x})",
            region.bar_size
        )
    });
    let restored = config_u64(device, config, reg)?;
    checks.expect(restored == original, || {
        format!("{what}: restored {original:#x}, reads {restored:#x}")
    });
    Ok(())
}

/// One emulated region's REGION_INFO: power-of-two size covering the memory, mmap-able, one
/// sparse area `{0, len}`.
fn check_emulated_region(
    g: &Gpu,
    device: &Device,
    region: &MemRegion,
    checks: &mut Checks,
) -> Result<(), String> {
    let info = device.region_info(region.index)?;
    let what = format!("{g}: region {} ({})", region.index, region.name());
    checks.expect(info.size == region.bar_size, || {
        format!(
            "{what}: size {:#x}, expected {:#x} (the {:#x} bytes of {} rounded up to a power of two)",
            info.size,
            region.bar_size,
            region.len,
            region.name()
        )
    });
    checks.expect(
        info.size.is_power_of_two() && info.size >= region.len,
        || {
            format!(
                "{what}: size {:#x} is not a power of two >= {:#x}",
                info.size, region.len
            )
        },
    );
    let wanted = vfio::REGION_FLAG_READ | vfio::REGION_FLAG_WRITE | vfio::REGION_FLAG_MMAP;
    checks.expect(info.flags & wanted == wanted, || {
        format!(
            "{what}: flags {}, expected READ|WRITE|MMAP",
            info.flags_text()
        )
    });
    let expected_offset = u64::from(region.index) << vfio::PCI_OFFSET_SHIFT;
    checks.expect(info.offset == expected_offset, || {
        format!(
            "{what}: offset {:#x}, expected {expected_offset:#x}",
            info.offset
        )
    });
    let expected_area = vec![SparseArea {
        offset: 0,
        size: region.len,
    }];
    match info.sparse_areas() {
        Some(Ok(areas)) => checks.expect(areas == expected_area, || {
            format!(
                "{what}: sparse mmap areas {}, expected one {{offset 0, size {:#x}}}",
                areas_text(&areas),
                region.len
            )
        }),
        Some(Err(why)) => checks.fail(format!("{what}: {why}")),
        None => checks.fail(format!(
            "{what}: no SPARSE_MMAP capability (flags {}, {} capabilities)",
            info.flags_text(),
            info.caps.len()
        )),
    }
    note(format!(
        "{what}: size {:#x}, flags {}, sparse area {{0, {:#x}}} expected",
        info.size,
        info.flags_text(),
        region.len
    ));
    Ok(())
}

fn areas_text(areas: &[SparseArea]) -> String {
    let parts: Vec<String> = areas
        .iter()
        .map(|a| format!("{{{:#x}, {:#x}}}", a.offset, a.size))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// A region the driver must not emulate: size 0 (no such BAR on the GPU).
fn check_absent_region(
    g: &Gpu,
    device: &Device,
    index: u32,
    rule: &str,
    checks: &mut Checks,
) -> Result<(), String> {
    let info = device.region_info(index)?;
    checks.expect(info.size == 0, || {
        format!(
            "{g}: region {index}: size {:#x} flags {}, expected size 0 ({rule})",
            info.size,
            info.flags_text()
        )
    });
    Ok(())
}

/// The regions of one bound GPU, by the rule its facts imply.
fn check_regions(g: &Gpu, session: &NoIommuDevice, checks: &mut Checks) -> Result<(), String> {
    let device = &session.device;
    let info = device.info()?;
    checks.expect(info.flags & vfio::DEVICE_FLAGS_PCI != 0, || {
        format!(
            "{g}: device flags {:#x} lack VFIO_DEVICE_FLAGS_PCI",
            info.flags
        )
    });
    checks.expect(info.num_regions >= vfio::PCI_NUM_REGIONS, || {
        format!(
            "{g}: {} regions, expected at least {}",
            info.num_regions,
            vfio::PCI_NUM_REGIONS
        )
    });
    let config = device.region_info(vfio::PCI_CONFIG_REGION_INDEX)?;
    match g.memory() {
        GpuMemory::Plain(rule) => {
            note(format!("{g}: rule applied: {rule}: regions 2 and 4 absent"));
            check_absent_region(g, device, gpus::USEMEM_REGION, &rule, checks)?;
            check_absent_region(g, device, gpus::RESMEM_REGION, &rule, checks)?;
            for reg in [0x18, 0x20] {
                let mut buf = [0u8; 4];
                device.read_at(config.offset + reg, &mut buf)?;
                let value = u32::from_le_bytes(buf);
                checks.expect(value == 0, || {
                    format!("{g}: config {reg:#x} reads {value:#x}, expected 0 (no emulated BAR: {rule})")
                });
            }
        }
        GpuMemory::Regions {
            usemem,
            resmem,
            rule,
        } => {
            note(format!("{g}: rule applied: {rule}"));
            check_emulated_region(g, device, &usemem, checks)?;
            check_emulated_bar(g, device, &config, &usemem, checks)?;
            match resmem {
                Some(resmem) => {
                    check_emulated_region(g, device, &resmem, checks)?;
                    check_emulated_bar(g, device, &config, &resmem, checks)?;
                }
                None => check_absent_region(
                    g,
                    device,
                    gpus::RESMEM_REGION,
                    "blackwell: no resmem",
                    checks,
                )?,
            }
        }
        GpuMemory::Invalid { rule, .. } => {
            checks.fail(format!("{g}: bound although {rule}"));
        }
    }
    Ok(())
}

/// Through the VFIO uAPI (container, no-IOMMU group, device fd): REGION_INFO of regions 4
/// and 2 and the emulated BARs in config space follow the driver's rules for each bound GPU:
/// Blackwell all usemem in region 4, Hopper usemem in 4 and a 1 GiB resmem in 2, missing or
/// zero memory properties no emulated region at all.
fn gpu_vfio_regions(ctx: &Context) -> Outcome {
    let gpus = check!(gpus::gpus(&ctx.env));
    check!(require_driver());
    let mut checks = Checks::new();
    let mut tested = 0;
    for g in &gpus {
        let dev = match bound_gpu(g) {
            Ok(Some(dev)) => dev,
            Ok(None) => continue,
            Err(why) => {
                checks.fail(why);
                continue;
            }
        };
        let session = match open_vfio(g, &dev) {
            Ok(session) => session,
            Err(why) => {
                checks.fail(why);
                continue;
            }
        };
        tested += 1;
        if let Err(why) = check_regions(g, &session, &mut checks) {
            checks.fail(format!("{g}: {why}"));
        }
    }
    if tested == 0 && !checks.failed() {
        return Outcome::skip("no GPU is bound or expected to bind");
    }
    checks.outcome()
}

/// The u64 the mapping test writes at `offset` of region `index`: "GPU", the region and the
/// offset (never 0, unlike fresh GPU memory).
pub fn marker(index: u32, offset: u64) -> u64 {
    0x4750_5500_0000_0000 | (u64::from(index) << 40) | (offset & 0xff_ffff_ffff)
}

/// The offsets of a `len`-byte region the mapping test writes: start, middle (not page
/// aligned), last word.
pub fn probe_offsets(len: u64) -> Vec<u64> {
    let mut offsets = vec![0, ((len / 2) + 0x1238).min(len - 8) & !7, len - 8];
    offsets.dedup();
    offsets
}

/// Writes `value` at `offset` through `map` and checks the guest, the VMM (PEEK,
/// CHECK_VALUE) and the driver's read path all see it.
#[allow(clippy::too_many_arguments)]
fn write_and_compare(
    what: &str,
    map: &Mapping,
    map_offset: u64,
    region_offset: u64,
    region: &MemRegion,
    info: &RegionInfo,
    device: &Device,
    dev: &TestDev,
    checks: &mut Checks,
) {
    let gpa = region.phys + region_offset;
    let value = marker(region.index, region_offset);
    let at = format!("{what} offset {region_offset:#x} (GPA {gpa:#x})");
    let before = map.read_u64(map_offset as usize);
    let seen_before = dev.peek(gpa);
    checks.expect(before == 0 && seen_before == Ok(0), || {
        format!(
            "before the write at {at}: guest reads {before:#x}, VMM sees {}; GPU memory starts \
             zeroed",
            text_of(&seen_before)
        )
    });
    map.write_u64(map_offset as usize, value);
    let readback = map.read_u64(map_offset as usize);
    checks.expect(readback == value, || {
        format!("wrote {value:#x} at {at} through the mapping, read back {readback:#x}")
    });
    let seen = dev.peek(gpa);
    checks.expect(seen == Ok(value), || {
        format!("wrote {value:#x} at {at}; VMM PEEK sees {}", text_of(&seen))
    });
    match dev.check_value(gpa, 8, value) {
        Ok(status) => checks.expect(status == Status::Ok, || {
            format!("VMM CHECK_VALUE {value:#x} at {at}: {status}")
        }),
        Err(why) => checks.fail(why),
    }
    match device.read_u64(info, region_offset) {
        Ok(read) => checks.expect(read == value, || {
            format!("wrote {value:#x} at {at}; pread through the device fd returns {read:#x}")
        }),
        Err(e) => checks.fail(e.to_string()),
    }
}

fn text_of(result: &Result<u64, String>) -> String {
    match result {
        Ok(value) => format!("{value:#x}"),
        Err(why) => why.clone(),
    }
}

/// Maps one emulated region and checks writes through it land at gpu-mem-base-pa + offset.
fn mmap_region(
    g: &Gpu,
    session: &NoIommuDevice,
    region: &MemRegion,
    dev: &TestDev,
    checks: &mut Checks,
) -> Result<(), String> {
    let device = &session.device;
    let what = format!("{g} {}", region.name());
    let info = device.region_info(region.index)?;
    let len = match info.sparse_areas() {
        Some(Ok(areas)) if areas.len() == 1 && areas[0].offset == 0 => areas[0].size,
        other => {
            return Err(format!(
                "{what}: no single sparse area to map ({other:?}); see gpu_vfio_regions"
            ))
        }
    };
    if len != region.len {
        checks.fail(format!(
            "{what}: sparse area {len:#x} bytes, expected {:#x}",
            region.len
        ));
    }
    let len = len.min(region.len);
    let map_len = usize::try_from(len).map_err(|_| format!("{what}: {len:#x} bytes"))?;
    let map = device.map(&info, 0, map_len, Access::ReadWrite)?;
    let mut touched = Vec::new();
    for offset in probe_offsets(len) {
        write_and_compare(
            &what, &map, offset, offset, region, &info, device, dev, checks,
        );
        touched.push(offset);
    }
    // A window of its own at a non-zero region offset: the driver's page offset arithmetic.
    if len >= 4 * WINDOW {
        let start = (len / 4) & !(WINDOW - 1);
        let window = device.map(&info, start, WINDOW as usize, Access::ReadWrite)?;
        let inside = 0x1018;
        write_and_compare(
            &format!("{what} (2 MiB window at {start:#x})"),
            &window,
            inside,
            start + inside,
            region,
            &info,
            device,
            dev,
            checks,
        );
        let through_full = map.read_u64((start + inside) as usize);
        let value = marker(region.index, start + inside);
        checks.expect(through_full == value, || {
            format!(
                "{what}: wrote {value:#x} through the window at {start:#x}, the whole-region \
                 mapping reads {through_full:#x} at {:#x}",
                start + inside
            )
        });
        window.write_u64(inside as usize, 0);
        touched.push(start + inside);
    }
    // The driver refuses mappings past the memory it exposes.
    let page = devmem::page_size() as u64;
    match device.map(&info, len - page, 2 * page as usize, Access::Read) {
        Ok(_) => checks.fail(format!(
            "{what}: mmap of 2 pages from {:#x} crosses the end ({len:#x}) yet succeeded",
            len - page
        )),
        Err(e) => checks.expect(e.errno() == Some(libc::EINVAL), || {
            format!("{what}: mmap across the end: {e}, expected EINVAL")
        }),
    }
    if let Err(e) = device.map(&info, len - page, page as usize, Access::Read) {
        checks.fail(format!("{what}: mmap of the last page: {e}"));
    }
    // Restore the zeros and have the VMM confirm each touched page is all zero again.
    for &offset in &touched {
        map.write_u64(offset as usize, 0);
    }
    for &offset in &touched {
        let page_start = offset & !(page - 1);
        let page_len = page.min(len - page_start);
        let gpa = region.phys + page_start;
        match dev.check_value(gpa, page_len, 0) {
            Ok(Status::Ok) => {}
            Ok(status) => checks.fail(format!(
                "{what}: after restoring zeros, VMM CHECK_VALUE 0 over [{gpa:#x}, +{page_len:#x}): \
                 {status}"
            )),
            Err(why) => checks.fail(why),
        }
    }
    if checks.failed() {
        return Ok(());
    }
    note(format!(
        "{what}: wrote at offsets {} through the mapping, VMM saw each at {:#x} + offset; \
         zeros restored",
        touched
            .iter()
            .map(|o| format!("{o:#x}"))
            .collect::<Vec<_>>()
            .join(" "),
        region.phys
    ));
    Ok(())
}

/// GPU memory through a mapping of the emulated region: a u64 written at usemem offset O is
/// what the VMM sees at gpu-mem-base-pa + O (and the driver's pread), at the start, middle,
/// end and through a separate 2 MiB window; mappings past the end are refused (EINVAL);
/// zeros are restored and confirmed by the VMM. Hopper's resmem likewise.
fn gpu_usemem_mmap(ctx: &Context) -> Outcome {
    let gpus = check!(gpus::gpus(&ctx.env));
    check!(require_driver());
    let mut checks = Checks::new();
    let mut tested = 0;
    let mut skipped = Vec::new();
    let mut dev = None;
    for g in &gpus {
        let (usemem, resmem) = match g.memory() {
            GpuMemory::Regions { usemem, resmem, .. } => (usemem, resmem),
            GpuMemory::Plain(rule) | GpuMemory::Invalid { rule, .. } => {
                skipped.push(format!("{g}: no emulated region ({rule})"));
                continue;
            }
        };
        let regions: Vec<MemRegion> = [Some(usemem), resmem].into_iter().flatten().collect();
        let outside: Vec<String> = regions
            .iter()
            .filter(|r| !g.backed(r.phys, r.len))
            .map(|r| r.to_string())
            .collect();
        if !outside.is_empty() {
            skipped.push(format!(
                "{g}: the properties place {} outside the backing aperture [{:#x}, +{:#x}): \
                 not touched",
                outside.join(", "),
                g.mem_base,
                g.mem_size
            ));
            continue;
        }
        let pci = match bound_gpu(g) {
            Ok(Some(pci)) => pci,
            Ok(None) => continue,
            Err(why) => {
                checks.fail(why);
                continue;
            }
        };
        if dev.is_none() {
            dev = Some(check!(TestDev::from_env(&ctx.env)));
        }
        let Some(probe) = dev.as_ref() else {
            continue;
        };
        let session = match open_vfio(g, &pci) {
            Ok(session) => session,
            Err(why) => {
                checks.fail(why);
                continue;
            }
        };
        tested += 1;
        for region in &regions {
            if let Err(why) = mmap_region(g, &session, region, probe, &mut checks) {
                checks.fail(why);
            }
        }
    }
    if tested == 0 && !checks.failed() {
        return Outcome::skip(format!(
            "no bound GPU with an emulated region{}",
            if skipped.is_empty() {
                String::new()
            } else {
                format!(": {}", skipped.join("; "))
            }
        ));
    }
    for why in &skipped {
        note(why);
    }
    checks.outcome()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
<6>[    1.000000] pci 0000:00:01.0: [10de:2941] type 00 class 0x030200 PCIe Endpoint
<6>[    1.000100] pci 0000:00:02.0: [10de:2941] type 00 class 0x030200 PCIe Endpoint
<3>[   35.120000] nvgrace_gpu_vfio_pci 0000:00:01.0: probe with driver nvgrace_gpu_vfio_pci failed with error -62
<3>[   36.000000] nvgrace_gpu_vfio_pci 0000:00:02.0: probe with driver nvgrace_gpu_vfio_pci failed with error -22
";

    #[test]
    fn test_probe_failure_errno_per_bdf_last_wins() {
        assert_eq!(probe_failure_errno(LOG, "0000:00:01.0"), Some(62));
        assert_eq!(probe_failure_errno(LOG, "0000:00:02.0"), Some(22));
        assert_eq!(probe_failure_errno(LOG, "0000:00:03.0"), None);
        let again = format!(
            "{LOG}<3>[   90.0] nvgrace_gpu_vfio_pci 0000:00:01.0: probe with driver \
             nvgrace_gpu_vfio_pci failed with error -4\n"
        );
        assert_eq!(probe_failure_errno(&again, "0000:00:01.0"), Some(4));
    }

    #[test]
    fn test_messages_about_strip_prefixes() {
        let messages = messages_about(LOG, "0000:00:01.0");
        assert_eq!(messages.len(), 2);
        assert!(messages[0].starts_with("pci 0000:00:01.0: [10de:2941]"));
    }

    #[test]
    fn test_probe_offsets_start_middle_end_aligned() {
        assert_eq!(
            probe_offsets(1 << 30),
            vec![0, (1 << 29) + 0x1238, (1 << 30) - 8]
        );
        assert_eq!(probe_offsets(16), vec![0, 8]);
        for len in [8u64, 0x1000, 0x2000_0000, 3 << 29] {
            for offset in probe_offsets(len) {
                assert!(offset % 8 == 0 && offset + 8 <= len, "{len:#x} {offset:#x}");
            }
        }
    }

    #[test]
    fn test_marker_nonzero_distinct_per_region_and_offset() {
        assert_ne!(marker(4, 0), 0);
        assert_ne!(marker(4, 8), marker(4, 16));
        assert_ne!(marker(4, 8), marker(2, 8));
        assert_eq!(marker(4, 0x1238) >> 48, 0x4750);
    }
}
