//! The EGM driver under test (`nvgrace-egm`, RFC v2 series) as the guest suite sees it, and
//! what the platform says it should see (spec: /work/shared/spec/egm-driver.md).
//!
//! - Platform facts from `/gracevm/env`: the GPU functions (`GRACEVM_GPUS`, parsed by
//!   [`crate::gpus`]: BDF, style, readiness and exactly the `nvidia,*` properties of their
//!   firmware node) and the retired-pages tables ([`RETIRED_PAGES`]).
//! - What nvgrace-gpu and nvgrace-egm (v2) make of those properties ([`expect_gpu`],
//!   [`plan_regions`], [`expected_retired_pages`]): which GPU binds, which `/dev/egm<pxm>`
//!   appears and what its retired-pages list holds.
//! - The kernel interfaces: GPU bind/unbind through `driver_override` ([`try_bind`], on
//!   [`crate::pci::PciDevice`]), the sysfs objects of the spec's section 2, `/dev/egm<pxm>`
//!   ([`open_node`]; mapped with [`crate::mapping::Mapping::raw`]) and the `EGM_RETIRED_PAGES_LIST`
//!   ioctl ([`retired_pages_call`]).
//! - Process helpers ([`fork_child`], [`Pipe`]) for accesses that may end in SIGBUS or worse:
//!   they run in a forked child so the test process survives to report.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use gracevm_contract::env::TableRoom;
use gracevm_contract::properties;

use crate::env::{Carveout, GuestEnv, ENV_PATH};
pub use crate::gpus::{DriverRules, Gpu, GpuMemory, Readiness};
use crate::kconfig;
use crate::outcome::Outcome;
use crate::pci::{PciDevice, PCI_DEVICES, PCI_DRIVERS};

/// Env key: the retired-pages table of each carve-out, `pxm:table:addr,addr,…` entries
/// separated by whitespace (`pxm` of the carve-out as in `GRACEVM_CARVEOUTS`, `table` the
/// guest physical address of its table, then the retired addresses in table order; the list
/// may be empty: `4:0x40100000:`).
pub use gracevm_contract::env::key::EGM_RETIRED_PAGES as RETIRED_PAGES;

/// The nvgrace-gpu PCI driver (the EGM auxiliary device's parent).
pub const GPU_DRIVER: &str = crate::gpus::DRIVER;
/// The nvgrace-egm module (`KBUILD_MODNAME`, also when built in).
pub const EGM_MODULE: &str = "nvgrace_egm";
/// The EGM auxiliary driver as sysfs names it: the auxiliary bus prefixes the module name
/// (`/sys/bus/auxiliary/drivers/nvgrace_egm.nvgrace_egm`).
pub const EGM_AUX_DRIVER: &str = "nvgrace_egm.nvgrace_egm";
pub const AUX_DEVICES: &str = "/sys/bus/auxiliary/devices";
pub const EGM_CLASS: &str = "/sys/class/egm";
pub const HARD_OFFLINE_PAGE: &str = "/sys/devices/system/memory/hard_offline_page";
/// Present for a loaded (not built-in) nvgrace-egm module.
pub const MODULE_REFCNT: &str = "/sys/module/nvgrace_egm/refcnt";

/// What nvgrace-gpu logs when `nvidia,egm-retired-pages-data-base` is 0.
pub const RETIRED_NOT_SETUP: &str = "Retired pages region is not setup";

/// Property names as `GRACEVM_GPUS` spells them (without `nvidia,`).
pub const GPU_MEM_BASE_PA: &str = crate::gpus::PROP_MEM_BASE;
pub const GPU_MEM_SIZE: &str = crate::gpus::PROP_MEM_SIZE;
pub const EGM_PXM: &str = crate::gpus::PROP_EGM_PXM;
pub const EGM_BASE_PA: &str = crate::gpus::PROP_EGM_BASE;
pub const EGM_SIZE: &str = crate::gpus::PROP_EGM_SIZE;
pub const EGM_RETIRED_PAGES_DATA_BASE: &str = crate::gpus::PROP_EGM_RETIRED;

/// `_IO(type, nr)`: no direction, no size.
pub const fn io(ty: u8, nr: u8) -> u32 {
    ((ty as u32) << 8) | nr as u32
}
/// `EGM_RETIRED_PAGES_LIST` = `_IO('E', 100)`.
pub const EGM_RETIRED_PAGES_LIST: u32 = 0x4564;
const _: () = assert!(io(b'E', 100) == EGM_RETIRED_PAGES_LIST);
/// A command the driver does not know (the next number of the same type).
pub const EGM_UNKNOWN_CMD: u32 = io(b'E', 101);
/// File offset bits the v2 driver discards (`EGM_OFFSET_SHIFT`).
pub const OFFSET_SHIFT: u32 = 40;

/// `struct egm_retired_pages_list` without its flexible array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetiredPagesHeader {
    pub argsz: u32,
    /// Out.
    pub count: u32,
}

/// `struct egm_retired_pages_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetiredPage {
    /// Byte offset of the retired page from the EGM base (= file offset).
    pub offset: u64,
    /// The kernel's PAGE_SIZE.
    pub size: u64,
}

/// Bytes of the header (`minsz` in the driver).
pub const HEADER_SIZE: u32 = std::mem::size_of::<RetiredPagesHeader>() as u32;
/// Bytes of one entry.
pub const ENTRY_SIZE: u32 = std::mem::size_of::<RetiredPage>() as u32;
const _: () = assert!(HEADER_SIZE == 8);
const _: () = assert!(ENTRY_SIZE == 16);
const _: () = assert!(std::mem::align_of::<RetiredPage>() == 8);

/// `argsz` for a buffer with room for `entries` entries.
pub fn list_argsz(entries: usize) -> u32 {
    HEADER_SIZE + ENTRY_SIZE * entries as u32
}

/// Entries the v2 driver accepts in a retired-pages table: it maps one page and rejects
/// `count > PAGE_SIZE / 8` (512 on 4 KiB pages).
pub fn table_limit(page_size: usize) -> usize {
    page_size / 8
}

/// `nvgrace_gpu_vfio_pci.egm.<pxm>`.
pub fn aux_device_name(pxm: u64) -> String {
    format!("{GPU_DRIVER}.egm.{pxm}")
}

pub fn aux_device_dir(pxm: u64) -> String {
    format!("{AUX_DEVICES}/{}", aux_device_name(pxm))
}

/// `/dev/egm<pxm>`.
pub fn node_path(pxm: u64) -> String {
    format!("/dev/egm{pxm}")
}

/// `/sys/class/egm/egm<pxm>`.
pub fn class_dir(pxm: u64) -> String {
    format!("{EGM_CLASS}/egm{pxm}")
}

pub fn exists(path: &str) -> bool {
    Path::new(path).symlink_metadata().is_ok()
}

/// Polls until `path` exists (`present`) or is gone (`!present`); whether it got there.
pub fn wait_for_path(path: &str, present: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if exists(path) == present {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Platform facts from the env
// ---------------------------------------------------------------------------------------------

/// One carve-out's retired-pages table, as the VMM wrote it (`GRACEVM_EGM_RETIRED_PAGES`).
pub use gracevm_contract::env::RetiredTable;

/// Parses `GRACEVM_EGM_RETIRED_PAGES` (see [`RETIRED_PAGES`]).
pub fn parse_retired_pages(text: &str) -> Result<Vec<RetiredTable>, String> {
    RetiredTable::parse_list(text)
}

/// `GRACEVM_EGM_RETIRED_PAGES`: `None` when the env lacks the key, `Fail` when malformed.
pub fn retired_tables(env: &GuestEnv) -> Result<Option<Vec<RetiredTable>>, Outcome> {
    match env.get(RETIRED_PAGES) {
        None => Ok(None),
        Some(text) => parse_retired_pages(text)
            .map(Some)
            .map_err(|why| Outcome::fail(format!("{RETIRED_PAGES} in {ENV_PATH}: {why}"))),
    }
}

/// `GRACEVM_EGM_TABLE_ROOM`: per carve-out PXM, the bytes the firmware gave its retired-pages
/// table. A table longer than its room was cut short by the firmware.
pub use gracevm_contract::env::key::EGM_TABLE_ROOM as TABLE_ROOM;

/// How many entries the table of carve-out `pxm` has room for (`None`: not said).
pub fn table_room_entries(env: &GuestEnv, pxm: u32) -> Option<usize> {
    TableRoom::parse_list(env.get(TABLE_ROOM)?)
        .ok()?
        .into_iter()
        .find(|room| room.pxm == pxm)
        .map(|room| room.entries())
}

// ---------------------------------------------------------------------------------------------
// What the v2 drivers make of the properties
// ---------------------------------------------------------------------------------------------

/// The EGM properties of a GPU that gets an EGM region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgmProps {
    pub pxm: u64,
    pub base: u64,
    pub size: u64,
    pub retired_base: u64,
}

/// What binding a GPU to nvgrace-gpu does, by the spec's section 1 (v2 probe order: GPU memory
/// properties, readiness, usemem split, then `egm-pxm`, `egm-size`, `egm-base-pa`,
/// `egm-retired-pages-data-base`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuExpect {
    /// Readiness never comes: the probe fails after its 30 s poll (not an EGM case).
    NeverReady,
    /// GPU memory properties missing or size 0: binds with plain vfio-pci ops, EGM never
    /// considered.
    PlainVfio(String),
    /// No `nvidia,egm-pxm`: EGM silently skipped, the GPU binds.
    NoEgm,
    /// The probe fails; `log` is what nvgrace-gpu prints about it, if anything.
    ProbeFails {
        why: String,
        log: Option<&'static str>,
    },
    /// Binds and gets (or joins) the EGM region of `pxm`.
    Egm(EgmProps),
}

impl fmt::Display for GpuExpect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuExpect::NeverReady => f.write_str("never ready: probe times out"),
            GpuExpect::PlainVfio(why) => write!(f, "binds with plain vfio-pci ops ({why})"),
            GpuExpect::NoEgm => write!(f, "binds, no EGM (no {})", properties::EGM_PXM),
            GpuExpect::ProbeFails { why, .. } => write!(f, "probe fails ({why})"),
            GpuExpect::Egm(p) => write!(
                f,
                "binds with EGM pxm {} [{:#x}, +{:#x}) table {:#x}",
                p.pxm, p.base, p.size, p.retired_base
            ),
        }
    }
}

/// What the v2 drivers do with `gpu` (spec section 1, after nvgrace-gpu's own memory rules).
pub fn expect_gpu(gpu: &Gpu) -> GpuExpect {
    if gpu.readiness == Readiness::Never {
        return GpuExpect::NeverReady;
    }
    match gpu.memory() {
        GpuMemory::Plain(rule) => return GpuExpect::PlainVfio(rule),
        GpuMemory::Invalid { rule, .. } => {
            return GpuExpect::ProbeFails {
                why: rule,
                log: None,
            }
        }
        GpuMemory::Regions { .. } => {}
    }
    let missing = |name: &str| format!("no {}", properties::full_name(name));
    let Some(pxm) = gpu.prop(EGM_PXM) else {
        return GpuExpect::NoEgm;
    };
    let fails = |why: String| GpuExpect::ProbeFails { why, log: None };
    let Some(size) = gpu.prop(EGM_SIZE) else {
        return fails(missing(EGM_SIZE));
    };
    let Some(base) = gpu.prop(EGM_BASE_PA) else {
        return fails(missing(EGM_BASE_PA));
    };
    let Some(retired_base) = gpu.prop(EGM_RETIRED_PAGES_DATA_BASE) else {
        return fails(missing(EGM_RETIRED_PAGES_DATA_BASE));
    };
    if retired_base == 0 {
        return GpuExpect::ProbeFails {
            why: format!("{} is 0", properties::EGM_RETIRED_PAGES_DATA_BASE),
            log: Some(RETIRED_NOT_SETUP),
        };
    }
    GpuExpect::Egm(EgmProps {
        pxm,
        base,
        size,
        retired_base,
    })
}

/// Whether `gpu`'s properties are the full, non-zero set (nothing for section 1's table).
pub fn has_all_properties(gpu: &Gpu) -> bool {
    [
        GPU_MEM_BASE_PA,
        GPU_MEM_SIZE,
        EGM_PXM,
        EGM_BASE_PA,
        EGM_SIZE,
        EGM_RETIRED_PAGES_DATA_BASE,
    ]
    .iter()
    .all(|name| gpu.prop(name).is_some_and(|v| v != 0 || *name == EGM_PXM))
}

/// One EGM region (one `/dev/egm<pxm>`) the drivers should create: the properties of the
/// first GPU (in env order) with its PXM, as v2 keeps the first probe's values (read through
/// `Deref`: `region.base`), and who shares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgmRegion {
    pub props: EgmProps,
    /// BDFs of the GPUs sharing the region, in env order.
    pub gpus: Vec<String>,
    /// The carve-out with exactly this base and size: only then is the region safe to open
    /// (the driver zeroes `[base, base + size)` on open).
    pub carveout: Option<Carveout>,
}

impl std::ops::Deref for EgmRegion {
    type Target = EgmProps;

    fn deref(&self) -> &EgmProps {
        &self.props
    }
}

impl fmt::Display for EgmRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "egm{} [{:#x}, +{:#x}) GPUs {}",
            self.pxm,
            self.base,
            self.size,
            self.gpus.join(" ")
        )
    }
}

/// The EGM regions `gpus` should create, in order of first appearance.
pub fn plan_regions(gpus: &[Gpu], carveouts: &[Carveout]) -> Vec<EgmRegion> {
    let mut regions: Vec<EgmRegion> = Vec::new();
    for gpu in gpus {
        let GpuExpect::Egm(props) = expect_gpu(gpu) else {
            continue;
        };
        match regions.iter_mut().find(|r| r.pxm == props.pxm) {
            Some(region) => region.gpus.push(gpu.bdf.clone()),
            None => regions.push(EgmRegion {
                props,
                gpus: vec![gpu.bdf.clone()],
                carveout: carveouts
                    .iter()
                    .find(|c| c.base == props.base && c.size == props.size)
                    .copied(),
            }),
        }
    }
    regions
}

/// The retired physical addresses the driver reads for `region`, or why they are unknown.
pub fn expected_retired_pages(
    region: &EgmRegion,
    tables: Option<&[RetiredTable]>,
) -> Result<Vec<u64>, String> {
    let Some(tables) = tables else {
        return Err(format!(
            "env lacks {RETIRED_PAGES} (wanted: 'pxm:table:addr,addr,... ...', one entry per \
             carve-out)"
        ));
    };
    let Some(carveout) = region.carveout else {
        return Err(format!(
            "egm{} [{:#x}, +{:#x}) is no carve-out: its retired pages are unknown",
            region.pxm, region.base, region.size
        ));
    };
    let Some(table) = tables.iter().find(|t| t.pxm == carveout.pxm) else {
        return Err(format!(
            "{RETIRED_PAGES} has no entry for the carve-out of pxm {}",
            carveout.pxm
        ));
    };
    if table.table != region.retired_base {
        return Err(format!(
            "{} is {:#x}, not the carve-out's table at {:#x}: \
             what the driver reads there is unknown",
            properties::EGM_RETIRED_PAGES_DATA_BASE,
            region.retired_base,
            table.table
        ));
    }
    Ok(table.pages.clone())
}

/// The list the driver should report for retired physical addresses `pages` of a region at
/// `base`: offset = address - base, size = kernel page size, as a sorted set.
pub fn expected_list(pages: &[u64], base: u64, page_size: usize) -> Vec<RetiredPage> {
    let mut list: Vec<RetiredPage> = pages
        .iter()
        .map(|&addr| RetiredPage {
            offset: addr.wrapping_sub(base),
            size: page_size as u64,
        })
        .collect();
    list.sort();
    list.dedup();
    list
}

/// How a reported list differs from the expected one (both compared as sets).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListDiff {
    pub missing: Vec<RetiredPage>,
    pub unexpected: Vec<RetiredPage>,
    /// Entries reported more than once.
    pub duplicates: Vec<RetiredPage>,
}

impl ListDiff {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.duplicates.is_empty()
    }
}

impl fmt::Display for ListDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |pages: &[RetiredPage]| {
            let mut text: Vec<String> = pages
                .iter()
                .take(8)
                .map(|p| format!("{:#x}/{:#x}", p.offset, p.size))
                .collect();
            if pages.len() > 8 {
                text.push(format!("... ({} in all)", pages.len()));
            }
            text.join(" ")
        };
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing {}", list(&self.missing)));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected {}", list(&self.unexpected)));
        }
        if !self.duplicates.is_empty() {
            parts.push(format!("duplicated {}", list(&self.duplicates)));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Compares a reported list with the expected set (order unspecified).
pub fn compare_lists(expected: &[RetiredPage], reported: &[RetiredPage]) -> ListDiff {
    let mut sorted = reported.to_vec();
    sorted.sort();
    let mut duplicates: Vec<RetiredPage> = sorted
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    duplicates.dedup();
    sorted.dedup();
    ListDiff {
        missing: expected
            .iter()
            .filter(|e| sorted.binary_search(e).is_err())
            .copied()
            .collect(),
        unexpected: sorted
            .iter()
            .filter(|r| !expected.contains(r))
            .copied()
            .collect(),
        duplicates,
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel: is the driver there at all
// ---------------------------------------------------------------------------------------------

/// `Ok` when the running kernel has the EGM driver, otherwise the `Skip` every EGM test reports.
/// `strict`: a kernel configured with the driver but without its class is a `Fail` (for the
/// test that checks the driver came up).
pub fn require_egm_kernel(env: &GuestEnv, strict: bool) -> Result<(), Outcome> {
    match (egm_kernel(strict), env.expects("egm")) {
        (Err(Outcome::Skip(missing)), Some(why)) => Err(Outcome::fail(format!(
            "the kernel under test should carry the EGM driver ({why}), but: {missing}"
        ))),
        (result, _) => result,
    }
}

/// The EGM gate without expectations: `Skip` when the driver is absent.
fn egm_kernel(strict: bool) -> Result<(), Outcome> {
    let class = Path::new(EGM_CLASS).is_dir();
    match kconfig::kernel_config() {
        Ok(config) => match config.value("NVGRACE_EGM") {
            Some("y" | "m") if class => {}
            Some("m") => {
                return Err(Outcome::fail(format!(
                    "CONFIG_NVGRACE_EGM=m but the module is not loaded ({EGM_CLASS} absent): \
                     see kernel_modules; gracevm needs the kernel's module tree (--modules)"
                )))
            }
            Some("y") if strict => {
                return Err(Outcome::fail(format!(
                    "CONFIG_NVGRACE_EGM=y but {EGM_CLASS} is absent: nvgrace-egm did not \
                     register its class"
                )))
            }
            Some("y") => {
                return Err(Outcome::skip(format!(
                    "no nvgrace-egm driver/class: CONFIG_NVGRACE_EGM=y but {EGM_CLASS} is absent"
                )))
            }
            // The driver is there under another option name (a series revision renamed it):
            // what counts is the driver, so its tests run.
            _ if class => {}
            _ => {
                return Err(Outcome::skip(
                    "kernel has no CONFIG_NVGRACE_EGM (the EGM RFC v2 series is not applied)",
                ))
            }
        },
        Err(_) if class => {}
        Err(_) => {
            return Err(Outcome::skip(format!(
                "no nvgrace-egm driver/class ({EGM_CLASS} absent; kernel config unavailable)"
            )))
        }
    }
    if kconfig::kernel_has("NVGRACE_GPU_VFIO_PCI") == Some(false) {
        return Err(Outcome::skip(
            "kernel has no CONFIG_NVGRACE_GPU_VFIO_PCI (the EGM device's parent driver)",
        ));
    }
    if !Path::new(&format!("{PCI_DRIVERS}/{GPU_DRIVER}")).is_dir() {
        return Err(Outcome::skip(format!(
            "no {GPU_DRIVER} PCI driver ({PCI_DRIVERS}/{GPU_DRIVER} absent)"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sysfs: binding GPUs, looking at the driver's objects
// ---------------------------------------------------------------------------------------------

/// Writes `value` to a sysfs attribute in one write.
pub fn write_sysfs(path: &str, value: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// A sysfs attribute's text without the trailing newline; `Err` says why not.
pub fn read_sysfs(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|text| text.trim_end_matches('\n').to_string())
        .map_err(|e| format!("cannot read {path}: {e}"))
}

/// The last component of a symlink's target (`driver` links name the driver).
pub fn link_target_name(path: &str) -> Option<String> {
    std::fs::read_link(path)
        .ok()
        .and_then(|target| target.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The driver a PCI function is bound to.
pub fn pci_driver(bdf: &str) -> Option<String> {
    PciDevice::new(bdf).driver()
}

/// The driver the EGM auxiliary device of `pxm` is bound to.
pub fn aux_driver(pxm: u64) -> Option<String> {
    link_target_name(&format!("{}/driver", aux_device_dir(pxm)))
}

/// The EGM auxiliary devices that are children of PCI function `bdf`.
pub fn aux_children(bdf: &str) -> Vec<String> {
    let prefix = format!("{GPU_DRIVER}.egm.");
    std::fs::read_dir(format!("{PCI_DEVICES}/{bdf}"))
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// What a bind attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindResult {
    /// Bound to nvgrace-gpu afterwards.
    pub bound: bool,
    /// It was bound already (nothing written).
    pub already: bool,
    pub took: Duration,
}

/// Binds `bdf` to nvgrace-gpu with `driver_override` + `drivers_probe` (unbinding another
/// driver first). `Err` only when sysfs refuses a write; a failed probe is `bound: false`.
pub fn try_bind(bdf: &str) -> Result<BindResult, String> {
    let start = Instant::now();
    let device = PciDevice::new(bdf);
    if !device.exists() {
        return Err(format!(
            "no PCI function {bdf} ({PCI_DEVICES}/{bdf} absent)"
        ));
    }
    match device.driver() {
        Some(driver) if driver == GPU_DRIVER => {
            return Ok(BindResult {
                bound: true,
                already: true,
                took: start.elapsed(),
            })
        }
        Some(other) => write_sysfs(&format!("{PCI_DEVICES}/{bdf}/driver/unbind"), bdf)
            .map_err(|e| format!("unbinding {bdf} from {other}: {e}"))?,
        None => {}
    }
    // The probe write's own result does not say whether the driver bound: the link does.
    let _ = device.bind_with_override(GPU_DRIVER)?;
    Ok(BindResult {
        bound: device.driver().as_deref() == Some(GPU_DRIVER),
        already: false,
        took: start.elapsed(),
    })
}

/// Binds `bdf` to nvgrace-gpu; `Err` when it is not bound afterwards (with the kernel's
/// messages about it).
pub fn bind_gpu(bdf: &str) -> Result<BindResult, String> {
    let mark = LogMark::now();
    let result = try_bind(bdf)?;
    if result.bound {
        return Ok(result);
    }
    let lines: Vec<String> = mark
        .new_lines()
        .into_iter()
        .filter(|line| line.contains(bdf))
        .collect();
    Err(format!(
        "{bdf} is not bound to {GPU_DRIVER} after drivers_probe ({} ms){}",
        result.took.as_millis(),
        if lines.is_empty() {
            String::new()
        } else {
            format!(": kernel said: {}", lines.join(" | "))
        }
    ))
}

/// Unbinds `bdf` from its driver; how long the write took (0 when it was not bound).
pub fn unbind_gpu(bdf: &str) -> Result<Duration, String> {
    let start = Instant::now();
    if PciDevice::new(bdf).driver().is_none() {
        return Ok(Duration::ZERO);
    }
    write_sysfs(&format!("{PCI_DEVICES}/{bdf}/driver/unbind"), bdf)
        .map_err(|e| format!("unbinding {bdf}: {e}"))?;
    Ok(start.elapsed())
}

/// Removes the GPU's PCI device (`/sys/bus/pci/devices/<bdf>/remove`): its driver's remove
/// runs and the device is gone until a rescan.
pub fn remove_pci_device(bdf: &str) -> Result<Duration, String> {
    let start = Instant::now();
    write_sysfs(&format!("{PCI_DEVICES}/{bdf}/remove"), "1")
        .map_err(|e| format!("removing {bdf}: {e}"))?;
    Ok(start.elapsed())
}

/// A character device node as `stat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    pub is_char: bool,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} {}:{} uid {}",
            if self.is_char { 'c' } else { '?' },
            mode_string(self.mode),
            self.major,
            self.minor,
            self.uid
        )
    }
}

/// `rw-------` for 0o600.
pub fn mode_string(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

pub fn node_info(path: &str) -> Result<NodeInfo, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("stat {path}: {e}"))?;
    let rdev = meta.rdev() as libc::dev_t;
    Ok(NodeInfo {
        is_char: meta.file_type().is_char_device(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        major: libc::major(rdev),
        minor: libc::minor(rdev),
    })
}

/// Parses a sysfs `dev` attribute (`major:minor`).
pub fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// `/dev/egm<pxm>` opened read-write.
pub fn open_node(pxm: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(node_path(pxm))
}

/// The errno of an io result (`None` when it succeeded or carries none).
pub fn errno<T>(result: &std::io::Result<T>) -> Option<i32> {
    result.as_ref().err().and_then(std::io::Error::raw_os_error)
}

/// `EBUSY`-style name of an errno for messages.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIME => "ETIME",
        libc::EHWPOISON => "EHWPOISON",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// "ok" or the errno name of an io result.
pub fn result_name<T>(result: &std::io::Result<T>) -> String {
    match result {
        Ok(_) => "success".to_string(),
        Err(e) => match e.raw_os_error() {
            Some(n) => errno_name(n),
            None => e.to_string(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The ioctl
// ---------------------------------------------------------------------------------------------

/// The first u64 of a list buffer: the header in native layout.
pub fn encode_header(header: RetiredPagesHeader) -> u64 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&header.argsz.to_ne_bytes());
    bytes[4..].copy_from_slice(&header.count.to_ne_bytes());
    u64::from_ne_bytes(bytes)
}

/// Header and the first `min(count, room)` entries of a list buffer.
pub fn decode_list(words: &[u64]) -> (RetiredPagesHeader, Vec<RetiredPage>) {
    let bytes = words.first().copied().unwrap_or(0).to_ne_bytes();
    let header = RetiredPagesHeader {
        argsz: u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        count: u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    };
    let room = words.len().saturating_sub(1) / 2;
    let entries = (0..room.min(header.count as usize))
        .map(|i| RetiredPage {
            offset: words[1 + 2 * i],
            size: words[2 + 2 * i],
        })
        .collect();
    (header, entries)
}

/// What one ioctl call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListReply {
    /// The ioctl's return value.
    pub ret: i32,
    pub header: RetiredPagesHeader,
    pub entries: Vec<RetiredPage>,
}

/// Calls `cmd` on a buffer with room for `room` entries whose header says `argsz` (count
/// preset to a sentinel, so an untouched header shows). `Err` is the ioctl's errno.
pub fn retired_pages_call(
    fd: BorrowedFd<'_>,
    cmd: u32,
    argsz: u32,
    room: usize,
) -> std::io::Result<ListReply> {
    let mut words = vec![0u64; 1 + 2 * room];
    words[0] = encode_header(RetiredPagesHeader {
        argsz,
        count: 0xdead_beef,
    });
    // SAFETY: the buffer is 8 + 16 * room bytes, lives across the call, and the driver writes
    // at most argsz bytes of it; the caller keeps argsz within the buffer except on purpose in
    // tests of the too-small protocol, where argsz is smaller than the buffer.
    let mut ret = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, words.as_mut_ptr()) };
    if ret < 0 {
        let e = std::io::Error::last_os_error();
        // "Too small" as a reviewer asked for it (v2 returns 0): the header still answers the
        // size needed.
        if e.raw_os_error() != Some(libc::ENOSPC) {
            return Err(e);
        }
        ret = -libc::ENOSPC;
    }
    let (header, entries) = decode_list(&words);
    Ok(ListReply {
        ret,
        header,
        entries,
    })
}

/// Calls `cmd` with `arg` as the pointer argument as it is (for the bad-pointer case).
pub fn raw_ioctl(fd: BorrowedFd<'_>, cmd: u32, arg: usize) -> std::io::Result<i32> {
    // SAFETY: the kernel validates `arg` (copy_from_user); a bad pointer fails with EFAULT and
    // touches no memory of ours.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, arg) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The whole retired-pages list through the size-then-fill protocol.
pub fn list_retired_pages(fd: BorrowedFd<'_>) -> Result<Vec<RetiredPage>, String> {
    let probe = retired_pages_call(fd, EGM_RETIRED_PAGES_LIST, HEADER_SIZE, 0)
        .map_err(|e| format!("EGM_RETIRED_PAGES_LIST with argsz 8: {e}"))?;
    if probe.header.argsz < HEADER_SIZE || (probe.header.argsz - HEADER_SIZE) % ENTRY_SIZE != 0 {
        return Err(format!(
            "EGM_RETIRED_PAGES_LIST with argsz 8 answered argsz {}: not 8 + 16 * n",
            probe.header.argsz
        ));
    }
    let room = ((probe.header.argsz - HEADER_SIZE) / ENTRY_SIZE) as usize;
    // One spare entry: a page retired between the calls shows as a changed count.
    let full = retired_pages_call(fd, EGM_RETIRED_PAGES_LIST, list_argsz(room + 1), room + 1)
        .map_err(|e| format!("EGM_RETIRED_PAGES_LIST with room for {room}: {e}"))?;
    if full.header.count as usize != full.entries.len() {
        return Err(format!(
            "EGM_RETIRED_PAGES_LIST reported count {} with room for {}",
            full.header.count,
            room + 1
        ));
    }
    // The list outgrew the buffer between the two calls (pages retired meanwhile): the
    // driver answered "too small" (count 0, argsz the size it needs), not an empty list.
    if full.header.argsz > list_argsz(room + 1) {
        return Err(format!(
            "EGM_RETIRED_PAGES_LIST grew between sizing and listing (needs argsz {}, gave {})",
            full.header.argsz,
            list_argsz(room + 1)
        ));
    }
    Ok(full.entries)
}

/// `prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY)`: be signalled as soon as memory
/// this process maps is poisoned, not only when it touches it (QEMU does this at start-up;
/// memory_failure signals another process's mapping only when it asked for early kill).
pub fn set_mce_kill_early() -> std::io::Result<()> {
    const PR_MCE_KILL: libc::c_int = 33;
    const PR_MCE_KILL_SET: libc::c_ulong = 1;
    const PR_MCE_KILL_EARLY: libc::c_ulong = 1;
    // SAFETY: prctl with plain integer arguments; it changes a flag of this process only.
    let ret = unsafe { libc::prctl(PR_MCE_KILL, PR_MCE_KILL_SET, PR_MCE_KILL_EARLY, 0, 0) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The SIGBUS a process got for poisoned memory, as [`catch_sigbus`]'s handler reports it in
/// its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigbusReport {
    /// `si_code`: [`libc::BUS_MCEERR_AO`] (action optional, asynchronous),
    /// [`libc::BUS_MCEERR_AR`] (action required) or something else.
    pub code: i32,
    /// `si_addr` was the expected address.
    pub addr_ok: bool,
}

/// First exit code of the [`catch_sigbus`] handler.
pub const SIGBUS_EXIT_BASE: i32 = 60;

/// The handler's exit code for `report`.
pub fn sigbus_exit_code(report: SigbusReport) -> i32 {
    let kind = match report.code {
        libc::BUS_MCEERR_AO => 0,
        libc::BUS_MCEERR_AR => 1,
        _ => 2,
    };
    SIGBUS_EXIT_BASE + 2 * kind + i32::from(!report.addr_ok)
}

/// The report an exit code stands for (`None`: not the handler's).
pub fn sigbus_report(exit_code: i32) -> Option<SigbusReport> {
    let n = exit_code.checked_sub(SIGBUS_EXIT_BASE)?;
    let code = match n / 2 {
        0 => libc::BUS_MCEERR_AO,
        1 => libc::BUS_MCEERR_AR,
        2 => 0,
        _ => return None,
    };
    Some(SigbusReport {
        code,
        addr_ok: n % 2 == 0,
    })
}

impl fmt::Display for SigbusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = match self.code {
            libc::BUS_MCEERR_AO => "BUS_MCEERR_AO",
            libc::BUS_MCEERR_AR => "BUS_MCEERR_AR",
            _ => "a code other than BUS_MCEERR_AO/AR",
        };
        write!(
            f,
            "got SIGBUS {code} at {} address",
            if self.addr_ok {
                "the poisoned page's"
            } else {
                "another"
            }
        )
    }
}

/// The address [`catch_sigbus`]'s handler expects in `si_addr`.
static SIGBUS_EXPECTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; si_addr is the
    // fault-address member SIGBUS fills in.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let expected = SIGBUS_EXPECTED.load(std::sync::atomic::Ordering::Relaxed);
    let exit = sigbus_exit_code(SigbusReport {
        code,
        addr_ok: addr == expected,
    });
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(exit) }
}

/// Installs a SIGBUS handler that ends the process with [`sigbus_exit_code`] (expecting
/// `si_addr == expected`). Rust's own SIGBUS handler (stack-overflow detection) would return
/// from an asynchronous SIGBUS and let the process run on.
/// Ignores SIGBUS: a process that keeps a mapping only so memory-failure handling finds it
/// survives the "action optional" SIGBUS each poisoned page sends it.
pub fn ignore_sigbus() -> std::io::Result<()> {
    // SAFETY: installing SIG_IGN for SIGBUS touches no memory of ours; a SIGBUS a fault raises
    // (action required) is forced by the kernel regardless, so no access is silently lost.
    let previous = unsafe { libc::signal(libc::SIGBUS, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn catch_sigbus(expected: usize) -> std::io::Result<()> {
    SIGBUS_EXPECTED.store(expected, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid starting point; we set the handler, SA_SIGINFO
    // and an empty mask, and sigaction only reads it.
    let ret = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut())
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `delete_module(name, O_NONBLOCK)` (rmmod).
pub fn delete_module(name: &str) -> std::io::Result<()> {
    let name = std::ffi::CString::new(name).map_err(|_| ErrorKind::InvalidInput)?;
    // SAFETY: the name is a NUL-terminated string that lives across the call; the syscall
    // reads it and takes plain flags.
    let ret = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel log
// ---------------------------------------------------------------------------------------------

/// A point in the kernel log, to read what the kernel said after it.
#[derive(Debug, Clone, Default)]
pub struct LogMark {
    last: Option<String>,
    lines: usize,
}

impl LogMark {
    pub fn now() -> LogMark {
        let log = crate::procfs::kernel_log().unwrap_or_default();
        LogMark::at(&log)
    }

    /// The mark at the end of `log`.
    pub fn at(log: &str) -> LogMark {
        LogMark {
            last: log.lines().last().map(str::to_string),
            lines: log.lines().count(),
        }
    }

    /// The lines of the current log after the mark.
    pub fn new_lines(&self) -> Vec<String> {
        self.lines_after(&crate::procfs::kernel_log().unwrap_or_default())
    }

    /// The lines of `log` after the mark: after the last occurrence of the marked line (the
    /// ring buffer may have dropped old lines), else after as many lines as there were.
    pub fn lines_after(&self, log: &str) -> Vec<String> {
        let lines: Vec<&str> = log.lines().collect();
        let start = match &self.last {
            None => 0,
            Some(last) => match lines.iter().rposition(|l| l == last) {
                Some(at) => at + 1,
                None => self.lines.min(lines.len()),
            },
        };
        lines[start..].iter().map(|l| l.to_string()).collect()
    }
}

/// Kernel log lines that report a kernel bug: an oops, a KASAN report, a BUG or WARNING.
pub fn kernel_trouble(lines: &[String]) -> Vec<String> {
    const SIGNS: [&str; 9] = [
        "Unable to handle kernel",
        "Internal error:",
        "KASAN:",
        "BUG:",
        "WARNING:",
        "use-after-free",
        "Oops",
        "list_del corruption",
        "Kernel panic",
    ];
    lines
        .iter()
        .filter(|line| SIGNS.iter().any(|sign| line.contains(sign)))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

impl fmt::Display for ChildEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildEnd::Exited(code) => write!(f, "exited with status {code}"),
            ChildEnd::Signaled(sig) => write!(f, "was killed by {}", signal_name(*sig)),
        }
    }
}

pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGABRT => "SIGABRT".into(),
        other => format!("signal {other}"),
    }
}

/// A forked child running a closure; killed and reaped on drop if still running.
#[derive(Debug)]
pub struct Forked {
    pid: libc::pid_t,
    end: Option<ChildEnd>,
}

/// Forks a child that runs `body` and `_exit`s with its result. The test process must be
/// single-threaded (a test's process is). The child's stdout and stderr go to /dev/null before
/// `body` runs: they are the test's protocol pipe, which a panic message must not reach (the
/// redirection takes no lock, unlike replacing the panic hook).
pub fn fork_child(body: impl FnOnce() -> i32) -> std::io::Result<Forked> {
    // SAFETY: fork in a single-threaded process; the child runs only `body` and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: open/dup2/close on a NUL-terminated literal and plain descriptors; they
        // touch no memory of ours.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                libc::close(null);
            }
        }
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
        // SAFETY: _exit ends the child without running the parent's atexit handlers or
        // flushing the inherited stdio buffers.
        unsafe { libc::_exit(code) }
    }
    Ok(Forked { pid, end: None })
}

impl Forked {
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    fn try_reap(&mut self, block: bool) -> Option<ChildEnd> {
        if self.end.is_some() {
            return self.end;
        }
        let mut status = 0;
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: waits for our own child and writes only `status`.
        let ret = unsafe { libc::waitpid(self.pid, &mut status, flags) };
        if ret == self.pid {
            self.end = Some(if libc::WIFSIGNALED(status) {
                ChildEnd::Signaled(libc::WTERMSIG(status))
            } else {
                ChildEnd::Exited(libc::WEXITSTATUS(status))
            });
        }
        self.end
    }

    /// Waits up to `timeout` for the child to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ChildEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.try_reap(false) {
                return Some(end);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Option<ChildEnd> {
        if self.end.is_none() {
            // SAFETY: signals our own, not yet reaped child (its pid cannot be reused before
            // we reap it).
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
        self.try_reap(true)
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A pipe for one-byte messages between a test and its child.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> std::io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into `fds`, which we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    pub fn send(&self, byte: u8) -> bool {
        // SAFETY: writes one byte from a live local to our own descriptor.
        let n = unsafe { libc::write(self.write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
        n == 1
    }

    /// The next byte, or `None` after `timeout` (or at end of file).
    pub fn recv(&self, timeout: Duration) -> Option<u8> {
        let mut pollfd = libc::pollfd {
            fd: self.read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: polls one pollfd we own, for at most `millis`.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ready != 1 {
            return None;
        }
        let mut byte = 0u8;
        // SAFETY: reads at most one byte into a live local from our own descriptor.
        let n = unsafe { libc::read(self.read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
        (n == 1).then_some(byte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::gpus::DEFAULT_GPU_LINE as GPU_LINE;

    fn gpu(line: &str) -> Gpu {
        crate::gpus::parse_gpus(line).unwrap().remove(0)
    }

    fn with_props(props: &[(&str, u64)]) -> Gpu {
        let mut g = gpu(GPU_LINE);
        g.props = props.iter().map(|(n, v)| (n.to_string(), *v)).collect();
        g
    }

    fn full_props() -> Vec<(&'static str, u64)> {
        vec![
            (GPU_MEM_BASE_PA, 0xd0_0000_0000),
            (GPU_MEM_SIZE, 1 << 30),
            (EGM_PXM, 4),
            (EGM_BASE_PA, 0x80_0000_0000),
            (EGM_SIZE, 1 << 30),
            (EGM_RETIRED_PAGES_DATA_BASE, 0x4010_0000),
        ]
    }

    fn without(name: &str) -> Gpu {
        let props: Vec<_> = full_props()
            .into_iter()
            .filter(|(n, _)| *n != name)
            .collect();
        with_props(&props)
    }

    fn zeroed(name: &str) -> Gpu {
        let props: Vec<_> = full_props()
            .into_iter()
            .map(|(n, v)| (n, if n == name { 0 } else { v }))
            .collect();
        with_props(&props)
    }

    fn carveout() -> Carveout {
        Carveout {
            pxm: 4,
            base: 0x80_0000_0000,
            size: 1 << 30,
            seed: 0x4752_4143_4500_0004,
        }
    }

    #[test]
    fn test_guest_rs_line_parses_with_every_property() {
        let g = gpu(GPU_LINE);
        assert_eq!(g.bdf, "0000:00:01.0");
        assert_eq!(g.props.len(), 6);
        assert_eq!(g.prop(EGM_PXM), Some(4));
        assert_eq!(g.prop(EGM_BASE_PA), Some(0x80_0000_0000));
        assert_eq!(g.prop(EGM_RETIRED_PAGES_DATA_BASE), Some(0x4010_0000));
    }

    #[test]
    fn test_parse_retired_pages_entries_and_empty_list() {
        let tables =
            parse_retired_pages("4:0x40100000:0x8000001000,0x8000003000\n 5:0x40110000: ").unwrap();
        assert_eq!(
            tables,
            vec![
                RetiredTable {
                    pxm: 4,
                    table: 0x4010_0000,
                    pages: vec![0x80_0000_1000, 0x80_0000_3000]
                },
                RetiredTable {
                    pxm: 5,
                    table: 0x4011_0000,
                    pages: vec![]
                }
            ]
        );
        for bad in ["4:0x40100000", "x:0x1:", "4:zz:", "4:0x1:0x10,zz"] {
            assert!(parse_retired_pages(bad).is_err(), "{bad}");
        }
        let env = GuestEnv::parse("GRACEVM_MODE=test\n");
        assert_eq!(retired_tables(&env), Ok(None));
        let env = GuestEnv::parse("GRACEVM_EGM_RETIRED_PAGES=4\n");
        assert!(matches!(retired_tables(&env), Err(Outcome::Fail(_))));
    }

    #[test]
    fn test_expect_gpu_full_properties_get_egm() {
        assert_eq!(
            expect_gpu(&gpu(GPU_LINE)),
            GpuExpect::Egm(EgmProps {
                pxm: 4,
                base: 0x80_0000_0000,
                size: 1 << 30,
                retired_base: 0x4010_0000
            })
        );
        assert!(has_all_properties(&gpu(GPU_LINE)));
        // PXM 0 is a value, not a missing property.
        assert!(has_all_properties(&zeroed(EGM_PXM)));
        assert!(matches!(expect_gpu(&zeroed(EGM_PXM)), GpuExpect::Egm(p) if p.pxm == 0));
    }

    #[test]
    fn test_expect_gpu_section1_table() {
        assert!(matches!(
            expect_gpu(&without(GPU_MEM_BASE_PA)),
            GpuExpect::PlainVfio(_)
        ));
        assert!(matches!(
            expect_gpu(&without(GPU_MEM_SIZE)),
            GpuExpect::PlainVfio(_)
        ));
        assert!(matches!(
            expect_gpu(&zeroed(GPU_MEM_SIZE)),
            GpuExpect::PlainVfio(_)
        ));
        assert_eq!(expect_gpu(&without(EGM_PXM)), GpuExpect::NoEgm);
        for name in [EGM_SIZE, EGM_BASE_PA, EGM_RETIRED_PAGES_DATA_BASE] {
            assert!(
                matches!(
                    expect_gpu(&without(name)),
                    GpuExpect::ProbeFails { log: None, .. }
                ),
                "{name}"
            );
            assert!(!has_all_properties(&without(name)));
        }
        assert_eq!(
            expect_gpu(&zeroed(EGM_RETIRED_PAGES_DATA_BASE)),
            GpuExpect::ProbeFails {
                why: format!("{} is 0", properties::EGM_RETIRED_PAGES_DATA_BASE),
                log: Some(RETIRED_NOT_SETUP)
            }
        );
        // egm-pxm is read first: without it nothing else matters.
        let props: Vec<_> = full_props()
            .into_iter()
            .filter(|(n, _)| *n == GPU_MEM_BASE_PA || *n == GPU_MEM_SIZE)
            .collect();
        assert_eq!(expect_gpu(&with_props(&props)), GpuExpect::NoEgm);
        // A zero base or size is not checked by v2: the region is created.
        assert!(matches!(expect_gpu(&zeroed(EGM_SIZE)), GpuExpect::Egm(_)));
    }

    #[test]
    fn test_expect_gpu_readiness_and_hopper_sizes() {
        let mut never = gpu(GPU_LINE);
        never.readiness = Readiness::Never;
        assert_eq!(expect_gpu(&never), GpuExpect::NeverReady);
        let mut hopper = gpu(GPU_LINE);
        hopper.style = crate::gpus::Style::Hopper;
        assert!(matches!(expect_gpu(&hopper), GpuExpect::ProbeFails { .. }));
        hopper.set_prop(GPU_MEM_SIZE, 3 << 29);
        assert!(matches!(expect_gpu(&hopper), GpuExpect::Egm(_)));
        hopper.set_prop(GPU_MEM_SIZE, (1 << 30) + (256 << 20));
        assert!(matches!(expect_gpu(&hopper), GpuExpect::ProbeFails { .. }));
    }

    #[test]
    fn test_plan_regions_shared_pxm_one_region_first_gpu_wins() {
        let first = gpu(GPU_LINE);
        let mut second = gpu(&GPU_LINE.replace("00:01.0", "00:02.0"));
        second.set_prop(EGM_BASE_PA, 0x90_0000_0000);
        let mut other = gpu(&GPU_LINE.replace("00:01.0", "00:03.0"));
        other.set_prop(EGM_PXM, 5);
        let broken = without(EGM_SIZE);
        let regions = plan_regions(&[first, broken, second, other], &[carveout()]);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].pxm, 4);
        assert_eq!(regions[0].gpus, vec!["0000:00:01.0", "0000:00:02.0"]);
        assert_eq!(regions[0].base, 0x80_0000_0000);
        assert_eq!(regions[0].carveout, Some(carveout()));
        assert_eq!(regions[1].pxm, 5);
        assert_eq!(regions[1].gpus, vec!["0000:00:03.0"]);
        // Same base and size as the carve-out, so it is that carve-out too.
        assert_eq!(regions[1].carveout, Some(carveout()));
    }

    #[test]
    fn test_plan_regions_mismatched_base_is_not_a_carveout() {
        let regions = plan_regions(&[zeroed(EGM_BASE_PA)], &[carveout()]);
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].carveout, None);
    }

    #[test]
    fn test_expected_retired_pages_reasons() {
        let region = plan_regions(&[gpu(GPU_LINE)], &[carveout()]).remove(0);
        let table = |t: u64, pages: Vec<u64>| RetiredTable {
            pxm: 4,
            table: t,
            pages,
        };
        let err = expected_retired_pages(&region, None).unwrap_err();
        assert!(err.contains("env lacks GRACEVM_EGM_RETIRED_PAGES"), "{err}");
        let tables = [table(0x4010_0000, vec![0x80_0000_3000])];
        assert_eq!(
            expected_retired_pages(&region, Some(&tables)),
            Ok(vec![0x80_0000_3000])
        );
        let moved = [table(0x4020_0000, vec![])];
        let err = expected_retired_pages(&region, Some(&moved)).unwrap_err();
        assert!(err.contains("not the carve-out's table"), "{err}");
        let other = [RetiredTable {
            pxm: 5,
            table: 0x4010_0000,
            pages: vec![],
        }];
        assert!(expected_retired_pages(&region, Some(&other)).is_err());
        let loose = plan_regions(&[zeroed(EGM_BASE_PA)], &[carveout()]).remove(0);
        assert!(expected_retired_pages(&loose, Some(&tables)).is_err());
    }

    #[test]
    fn test_expected_list_offsets_sizes_sorted_set() {
        let list = expected_list(
            &[0x80_0000_3000, 0x80_0000_1000, 0x80_0000_3000],
            0x80_0000_0000,
            4096,
        );
        assert_eq!(
            list,
            vec![
                RetiredPage {
                    offset: 0x1000,
                    size: 4096
                },
                RetiredPage {
                    offset: 0x3000,
                    size: 4096
                }
            ]
        );
    }

    #[test]
    fn test_compare_lists_order_free_reports_differences() {
        let page = |offset| RetiredPage { offset, size: 4096 };
        let expected = vec![page(0x1000), page(0x3000)];
        assert!(compare_lists(&expected, &[page(0x3000), page(0x1000)]).is_empty());
        let diff = compare_lists(&expected, &[page(0x3000), page(0x5000), page(0x5000)]);
        assert_eq!(diff.missing, vec![page(0x1000)]);
        assert_eq!(diff.unexpected, vec![page(0x5000)]);
        assert_eq!(diff.duplicates, vec![page(0x5000)]);
        let text = diff.to_string();
        assert!(text.contains("missing 0x1000/0x1000"), "{text}");
        let wrong_size = compare_lists(
            &expected,
            &[
                page(0x1000),
                RetiredPage {
                    offset: 0x3000,
                    size: 65536,
                },
            ],
        );
        assert_eq!(wrong_size.missing, vec![page(0x3000)]);
    }

    #[test]
    fn test_ioctl_numbers_and_layout() {
        assert_eq!(EGM_RETIRED_PAGES_LIST, 0x4564);
        assert_eq!(EGM_UNKNOWN_CMD, 0x4565);
        assert_eq!(std::mem::size_of::<RetiredPagesHeader>(), 8);
        assert_eq!(std::mem::size_of::<RetiredPage>(), 16);
        assert_eq!(std::mem::offset_of!(RetiredPagesHeader, count), 4);
        assert_eq!(std::mem::offset_of!(RetiredPage, size), 8);
        assert_eq!(list_argsz(0), 8);
        assert_eq!(list_argsz(3), 56);
        assert_eq!(table_limit(4096), 512);
        assert_eq!(table_limit(65536), 8192);
    }

    #[test]
    fn test_header_encode_decode_round_trip_native_layout() {
        let header = RetiredPagesHeader {
            argsz: 56,
            count: 2,
        };
        let mut words = vec![encode_header(header), 0x1000, 4096, 0x3000, 4096, 7, 7];
        // The same bytes a C struct would have.
        let bytes = words[0].to_ne_bytes();
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()), 56);
        assert_eq!(u32::from_ne_bytes(bytes[4..].try_into().unwrap()), 2);
        let (decoded, entries) = decode_list(&words);
        assert_eq!(decoded, header);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].offset, 0x3000);
        // count larger than the room: only what fits.
        words[0] = encode_header(RetiredPagesHeader { argsz: 8, count: 9 });
        assert_eq!(decode_list(&words).1.len(), 3);
        assert_eq!(decode_list(&[]).1.len(), 0);
    }

    #[test]
    fn test_parse_dev_and_mode_string() {
        assert_eq!(parse_dev("240:4\n"), Some((240, 4)));
        assert_eq!(parse_dev("240"), None);
        assert_eq!(mode_string(0o600), "rw-------");
        assert_eq!(mode_string(0o755), "rwxr-xr-x");
        let rdev = libc::makedev(240, 4);
        assert_eq!((libc::major(rdev), libc::minor(rdev)), (240, 4));
    }

    #[test]
    fn test_names_and_paths() {
        assert_eq!(aux_device_name(4), "nvgrace_gpu_vfio_pci.egm.4");
        assert_eq!(
            aux_device_dir(5),
            "/sys/bus/auxiliary/devices/nvgrace_gpu_vfio_pci.egm.5"
        );
        assert_eq!(node_path(4), "/dev/egm4");
        assert_eq!(class_dir(7), "/sys/class/egm/egm7");
        assert_eq!(errno_name(libc::EBUSY), "EBUSY");
        assert_eq!(errno_name(4095), "errno 4095");
    }

    #[test]
    fn test_log_mark_lines_after_survives_rotation() {
        let before = "<6>[ 1.0] a\n<6>[ 2.0] b\n";
        let mark = LogMark::at(before);
        let after = "<6>[ 2.0] b\n<3>[ 3.0] nvgrace_gpu_vfio_pci 0000:00:01.0: Retired pages region is not setup\n";
        assert_eq!(mark.lines_after(after).len(), 1);
        assert!(mark.lines_after(after)[0].contains(RETIRED_NOT_SETUP));
        let rotated = "<6>[ 9.0] x\n<6>[ 9.5] y\n<6>[ 9.9] z\n";
        assert_eq!(mark.lines_after(rotated), vec!["<6>[ 9.9] z".to_string()]);
        assert_eq!(LogMark::default().lines_after("a\nb\n").len(), 2);
    }

    #[test]
    fn test_kernel_trouble_finds_oops_and_kasan() {
        let lines: Vec<String> = [
            "<6>[ 5.0] vfio-pci: unbound",
            "<0>[ 5.1] BUG: KASAN: slab-use-after-free in nvgrace_egm_release",
            "<1>[ 5.2] Unable to handle kernel paging request at virtual address 0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(kernel_trouble(&lines).len(), 2);
        assert!(kernel_trouble(&lines[..1]).is_empty());
    }

    #[test]
    fn test_fork_child_exit_code_and_signal_and_pipe() {
        let pipe = Pipe::new().unwrap();
        let mut child = fork_child(|| {
            pipe.send(b'R');
            7
        })
        .unwrap();
        assert_eq!(pipe.recv(Duration::from_secs(5)), Some(b'R'));
        assert_eq!(
            child.wait_timeout(Duration::from_secs(5)),
            Some(ChildEnd::Exited(7))
        );
        let mut sleeper = fork_child(|| {
            std::thread::sleep(Duration::from_secs(30));
            0
        })
        .unwrap();
        assert_eq!(sleeper.wait_timeout(Duration::from_millis(50)), None);
        assert_eq!(sleeper.kill(), Some(ChildEnd::Signaled(libc::SIGKILL)));
        assert_eq!(pipe.recv(Duration::from_millis(10)), None);
    }

    #[test]
    fn test_sigbus_exit_codes_round_trip() {
        for code in [libc::BUS_MCEERR_AO, libc::BUS_MCEERR_AR, 0] {
            for addr_ok in [true, false] {
                let report = SigbusReport { code, addr_ok };
                assert_eq!(sigbus_report(sigbus_exit_code(report)), Some(report));
            }
        }
        assert_eq!(
            sigbus_exit_code(SigbusReport {
                code: libc::BUS_MCEERR_AO,
                addr_ok: true
            }),
            60
        );
        assert_eq!(
            sigbus_exit_code(SigbusReport {
                code: libc::BUS_MCEERR_AR,
                addr_ok: true
            }),
            62
        );
        assert_eq!(sigbus_report(12), None);
        assert_eq!(sigbus_report(66), None);
    }

    #[test]
    fn test_catch_sigbus_reports_code_and_address() {
        let mut child = fork_child(|| {
            if catch_sigbus(0x1234_5000).is_err() {
                return 1;
            }
            // SAFETY: raise sends SIGBUS to ourselves; the handler _exits.
            unsafe {
                libc::raise(libc::SIGBUS);
            }
            2
        })
        .unwrap();
        // raise() carries SI_TKILL, no address: "other code, other address".
        assert_eq!(
            child.wait_timeout(Duration::from_secs(5)),
            Some(ChildEnd::Exited(sigbus_exit_code(SigbusReport {
                code: 0,
                addr_ok: false
            })))
        );
    }

    #[test]
    fn test_ioctl_on_plain_file_is_enotty_and_bad_pointer_errors() {
        let file = File::open("/proc/self/status").unwrap();
        use std::os::fd::AsFd;
        let reply = retired_pages_call(file.as_fd(), EGM_RETIRED_PAGES_LIST, 8, 0);
        assert_eq!(errno(&reply), Some(libc::ENOTTY));
        let page = crate::mapping::Mapping::inaccessible(crate::devmem::page_size()).unwrap();
        assert!(raw_ioctl(file.as_fd(), EGM_RETIRED_PAGES_LIST, page.addr()).is_err());
    }
}
