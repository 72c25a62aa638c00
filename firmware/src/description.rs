//! The platform description: what machine gracevm models, as a user writes it in TOML.
//!
//! ```toml
//! vcpus = 2
//! boot = "acpi"              # the default, like real Grace; or "dt"
//!
//! [[socket]]
//! ram = "1G"                 # RAM listed in the memory map
//! pxm = 0                    # ACPI proximity domain (default: the socket's index)
//! [socket.egm]               # optional: the socket's hypervisor-invisible carve-out
//! size = "1G"                # 1 GiB aligned, like `base`
//! base = "0x8000000000"      # default: layout::egm_default_base(socket)
//! pxm = 4                    # default: 4 + socket index, as on real Grace
//! retired_pages = ["0x8000001000"]   # inside the carve-out, 4 KiB aligned, at most 4096
//! # retired_pages_count = 512        # or: this many pages spread through the carve-out
//! # retired_pages_table = "isolated" # the table alone in the last page of memory the kernel
//! #                                  # must ioremap, nothing mapped after it (default
//! #                                  # "firmware": a 64 KiB slot in the firmware region)
//!
//! [[gpu]]
//! model = "gb200"            # gh200-120gb, gh200-480gb, gh200, gb200, gb300; or device_id = 0x2941
//! socket = 0
//! mem_size = "1G"            # nvidia,gpu-mem-size; the base is placed by the layout
//! pxm = 8                    # Generic Initiator domain (default: 8 + GPU index)
//! readiness = "ready"        # or "never", or { delay_ms = 3000 }
//! # fault knobs for test scenarios:
//! omit_properties = ["nvidia,egm-pxm"]
//! zero_properties = ["nvidia,gpu-mem-size"]
//! retired_pages_base = "0x0"
//! ```
//!
//! A scenario file may also say which of the suite's tests apply to it, as globs at the top:
//! `tests = ["kernel_*", "egm_retired_table_limits"]` (default: all of them).
//!
//! A key left out takes its default: vCPUs 1, boot `acpi`, one 1 GiB socket without a carve-out,
//! no GPUs. [`Platform::default`] (used when no description is given) is the Grace-like machine:
//! one socket with 1 GiB of RAM, a 1 GiB EGM carve-out (PXM 4) and one GB200 with 1 GiB.
//! Unknown keys are errors. [`Platform::from_toml`] parses and validates; nothing builds from a
//! description that does not validate.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::layout::{self, GuestRange, MemoryMap, GIB, KIB, MIB};
use crate::resolved::Resolved;
use crate::Error;

/// How the kernel learns about the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// The firmware-less EFI hand-off with ACPI tables, as on real Grace.
    #[default]
    Acpi,
    /// A device tree with every device in it.
    Dt,
}

impl fmt::Display for BootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootMode::Dt => "dt",
            BootMode::Acpi => "acpi",
        })
    }
}

/// A byte count written as an integer or as a string with a binary suffix ("512M", "4G") or
/// in hex ("0x40000000").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            return u64::from_str_radix(&hex.replace('_', ""), 16)
                .map(Size)
                .map_err(|_| format!("'{s}' is not a hex number"));
        }
        let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, ""),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("'{s}' is not a size (examples: 4096, 512M, 4G, 0x1000)"))?;
        let mult = match unit.trim_end_matches(['i', 'B']) {
            "" => 1,
            "K" | "k" => KIB,
            "M" | "m" => MIB,
            "G" | "g" => GIB,
            "T" | "t" => 1 << 40,
            _ => {
                return Err(format!(
                    "'{s}': unknown size unit '{unit}' (use K, M, G or T)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("'{s}' does not fit in 64 bits"))
    }
}

/// An integer or a string holding one ("0x...", decimal, or with a size suffix).
fn de_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Str(s) => s
            .parse::<Size>()
            .map(|s| s.0)
            .map_err(serde::de::Error::custom),
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_u64(d).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, m) in [("T", 1u64 << 40), ("G", GIB), ("M", MIB), ("K", KIB)] {
            if n >= m && n % m == 0 {
                return write!(f, "{}{unit}", n / m);
            }
        }
        write!(f, "{n}")
    }
}

/// A guest physical address: an integer or a string ("0x8000000000", "512G").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Addr(pub u64);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_u64(d).map(Addr)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// One CPU socket: its DRAM visible to the host kernel, and optionally its EGM carve-out.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Socket {
    /// RAM listed in the memory map for this socket.
    pub ram: Size,
    /// ACPI proximity domain of the RAM and of the socket's vCPUs; default: the socket index.
    #[serde(default)]
    pub pxm: Option<u32>,
    /// The hypervisor-invisible part of this socket's DRAM, handed out by the EGM driver.
    #[serde(default)]
    pub egm: Option<EgmRegion>,
}

/// A socket's EGM carve-out: memory that is in no memory map, 1 GiB aligned.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgmRegion {
    /// Guest physical base; default: [`layout::egm_default_base`] of the socket.
    #[serde(default)]
    pub base: Option<Addr>,
    pub size: Size,
    /// `nvidia,egm-pxm`; default: 4 + socket index (so /dev/egm4 for socket 0).
    #[serde(default)]
    pub pxm: Option<u32>,
    /// Physical addresses of retired pages, written to the retired-pages table.
    #[serde(default)]
    pub retired_pages: Vec<Addr>,
    /// Instead of listing them: this many retired pages spread evenly through the carve-out
    /// (for table-size scenarios such as 511/512/513 entries).
    #[serde(default)]
    pub retired_pages_count: Option<usize>,
    /// Where the firmware puts the retired-pages table.
    #[serde(default)]
    pub retired_pages_table: TablePlacement,
}

/// Where the retired-pages table lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TablePlacement {
    /// A 64 KiB slot in the firmware region (ACPI-reclaim RAM, linear-mapped by the kernel),
    /// room for the 4096 entries real firmware reserves.
    #[default]
    Firmware,
    /// Alone in the last 4 KiB page of a block outside every memory map, with an unbacked
    /// hole after it: the kernel must ioremap the table, and a read past that page faults
    /// (the retired-pages off-by-one shows). The page holds the count and 511 entries; a
    /// longer table keeps its count, and the entries that do not fit are not there.
    Isolated,
}

/// The GPU models the nvgrace-gpu driver knows, by PCI device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum GpuModel {
    #[serde(rename = "gh200-120gb")]
    Gh200_120gb,
    #[serde(rename = "gh200-480gb")]
    Gh200_480gb,
    #[serde(rename = "gh200")]
    Gh200,
    #[serde(rename = "gb200")]
    Gb200,
    #[serde(rename = "gb300")]
    Gb300,
}

impl GpuModel {
    pub fn device_id(self) -> u16 {
        match self {
            GpuModel::Gh200_120gb => 0x2342,
            GpuModel::Gh200_480gb => 0x2345,
            GpuModel::Gh200 => 0x2348,
            GpuModel::Gb200 => 0x2941,
            GpuModel::Gb300 => 0x31C2,
        }
    }
}

/// When the GPU's BAR0 readiness registers (C2C link, HBM training) read 0xFF: the model
/// the VMM's GPU device and the suite share.
pub use gracevm_contract::gpu::Readiness;

/// `readiness = "ready" | "never" | { delay_ms = N }`.
fn de_readiness<'de, D: Deserializer<'de>>(d: D) -> Result<Readiness, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Delay {
        delay_ms: u64,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Word(String),
        Delay(Delay),
    }
    let bad = || {
        serde::de::Error::custom(
            "readiness must be \"ready\", \"never\" or { delay_ms = <milliseconds> }",
        )
    };
    match Raw::deserialize(d).map_err(|_: D::Error| bad())? {
        Raw::Word(w) if w == "ready" => Ok(Readiness::Ready),
        Raw::Word(w) if w == "never" => Ok(Readiness::Never),
        Raw::Word(_) => Err(bad()),
        Raw::Delay(Delay { delay_ms }) => Ok(Readiness::DelayMs(delay_ms)),
    }
}

/// The firmware properties of a GPU function, in the order they are emitted (all u64): the
/// contract with the in-guest suite.
pub use gracevm_contract::properties::{
    ALL as GPU_PROPERTIES, EGM_BASE_PA, EGM_PXM, EGM_RETIRED_PAGES_DATA_BASE, EGM_SIZE,
    GPU_MEM_BASE_PA, GPU_MEM_SIZE,
};

/// PCI vendor id of every modelled GPU.
pub const NVIDIA_VENDOR_ID: u16 = 0x10de;

/// One GPU function, attached to a socket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Model; default `gb200` unless `device_id` is given.
    #[serde(default)]
    pub model: Option<GpuModel>,
    /// PCI device id, instead of `model`.
    #[serde(default, deserialize_with = "de_device_id")]
    pub device_id: Option<u16>,
    /// Index of the [[socket]] the GPU hangs off; its EGM carve-out is this socket's.
    #[serde(default)]
    pub socket: usize,
    /// GPU memory (`nvidia,gpu-mem-size`); the aperture is placed by the layout.
    pub mem_size: Size,
    /// Generic Initiator proximity domain; default: 8 + GPU index.
    #[serde(default)]
    pub pxm: Option<u32>,
    /// Consumed by the VMM's GPU model.
    #[serde(default, deserialize_with = "de_readiness")]
    pub readiness: Readiness,
    /// Fault knob: properties left out of the GPU's firmware node.
    #[serde(default)]
    pub omit_properties: Vec<String>,
    /// Fault knob: properties emitted with the value 0.
    #[serde(default)]
    pub zero_properties: Vec<String>,
    /// Fault knob: `nvidia,egm-retired-pages-data-base` set to this instead of the table.
    #[serde(default)]
    pub retired_pages_base: Option<Addr>,
}

fn de_device_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let id = de_u64(d)?;
    u16::try_from(id).map(Some).map_err(|_| {
        serde::de::Error::custom(format!("device_id = {id:#x} is not a 16-bit PCI device id"))
    })
}

impl Gpu {
    /// A GPU of `model` with `mem_size` bytes on `socket`, everything else default.
    pub fn new(model: GpuModel, socket: usize, mem_size: u64) -> Self {
        Gpu {
            model: Some(model),
            device_id: None,
            socket,
            mem_size: Size(mem_size),
            pxm: None,
            readiness: Readiness::Ready,
            omit_properties: Vec::new(),
            zero_properties: Vec::new(),
            retired_pages_base: None,
        }
    }

    /// PCI device id: `device_id` if given, else the model's, else GB200's.
    pub fn pci_device_id(&self) -> u16 {
        match (self.device_id, self.model) {
            (Some(id), _) => id,
            (None, Some(m)) => m.device_id(),
            (None, None) => GpuModel::Gb200.device_id(),
        }
    }
}

/// A whole machine description.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub boot: BootMode,
    #[serde(rename = "socket", default = "default_sockets")]
    pub sockets: Vec<Socket>,
    #[serde(rename = "gpu", default)]
    pub gpus: Vec<Gpu>,
    /// A scenario may run only the suite's tests matching these globs (`["kernel_*",
    /// "egm_retired_table_limits"]`): the rest have nothing to say about its platform, or
    /// cannot run after what it provokes. Empty: every test.
    #[serde(default)]
    pub tests: Vec<String>,
}

fn default_vcpus() -> u32 {
    1
}

fn default_sockets() -> Vec<Socket> {
    vec![Socket {
        ram: Size(GIB),
        pxm: None,
        egm: None,
    }]
}

impl Default for Platform {
    /// The Grace-like default: one socket (1 GiB RAM, PXM 0) with a 1 GiB EGM carve-out
    /// (PXM 4), one GB200 with 1 GiB of GPU memory, ACPI boot.
    fn default() -> Self {
        let mut p = Platform::minimal();
        p.sockets[0].egm = Some(EgmRegion {
            base: None,
            size: Size(GIB),
            pxm: None,
            retired_pages: Vec::new(),
            retired_pages_count: None,
            retired_pages_table: TablePlacement::default(),
        });
        p.gpus.push(Gpu::new(GpuModel::Gb200, 0, GIB));
        p
    }
}

/// How messages name socket `i`.
fn socket_name(i: usize) -> String {
    format!("socket {i}")
}

impl Platform {
    /// One socket with 1 GiB of RAM, no carve-out, no GPU, ACPI boot: what boots on a VMM that
    /// backs no carve-out and models no GPU.
    pub fn minimal() -> Self {
        Platform {
            vcpus: default_vcpus(),
            boot: BootMode::default(),
            sockets: default_sockets(),
            gpus: Vec::new(),
            tests: Vec::new(),
        }
    }

    /// Parse and validate a TOML description; `origin` names it in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, Error> {
        let mut p: Platform = toml::from_str(text).map_err(|e| Error::Description {
            origin: origin.to_string(),
            msg: e.to_string(),
        })?;
        p.expand_retired_pages().map_err(|msg| Error::Description {
            origin: origin.to_string(),
            msg,
        })?;
        p.validate().map_err(|msg| Error::Description {
            origin: origin.to_string(),
            msg,
        })?;
        Ok(p)
    }

    /// Turn each `retired_pages_count = N` into N page addresses spread evenly through the
    /// carve-out (the first page is left alone), so validation sees the real list.
    fn expand_retired_pages(&mut self) -> Result<(), String> {
        for (i, socket) in self.sockets.iter_mut().enumerate() {
            let Some(egm) = socket.egm.as_mut() else {
                continue;
            };
            let Some(count) = egm.retired_pages_count else {
                continue;
            };
            if !egm.retired_pages.is_empty() {
                return Err(format!(
                    "socket {i} egm: give retired_pages or retired_pages_count, not both"
                ));
            }
            let pages = egm.size.0 / (4 * KIB);
            if count as u64 >= pages {
                return Err(format!(
                    "socket {i} egm retired_pages_count = {count}: the carve-out has only {pages} pages"
                ));
            }
            let base = egm.base.map_or(layout::egm_default_base(i), |a| a.0);
            let stride = (egm.size.0 / (count as u64 + 1)) & !(4 * KIB - 1);
            egm.retired_pages = (1..=count as u64)
                .map(|k| Addr(base + k * stride))
                .collect();
        }
        Ok(())
    }

    /// RAM of socket 0, the socket that holds the boot images.
    pub fn boot_ram(&self) -> u64 {
        self.sockets[0].ram.0
    }

    /// What the guest's /proc/iomem shows as "System RAM" in total, in both boot modes: all
    /// sockets' RAM. The firmware region at the start of socket 0 is included: in ACPI mode it
    /// is EFI ACPI-reclaim memory with the WB attribute, which arm64 Linux adds to memblock
    /// and only memblock_reserve()s (efi-init.c reserve_regions); in DT mode it is a
    /// /reserved-memory node without `no-map` (both checked with Linux 7.3 under qemu: one
    /// "System RAM" range covering all of RAM). Carve-outs and GPU memory are never included.
    pub fn system_ram(&self) -> u64 {
        self.sockets.iter().map(|s| s.ram.0).sum()
    }

    /// Check what the TOML grammar cannot: counts, sizes, alignment, what fits in the memory
    /// map, proximity domains, retired pages, fault knobs.
    pub fn validate(&self) -> Result<(), String> {
        self.resolve().map(|_| ())
    }

    /// Validate the description and place everything it describes: the one place the memory
    /// map is computed. Nothing is built from a description that does not resolve.
    pub fn resolve(&self) -> Result<Resolved, String> {
        self.validate_parts()?;
        let map = MemoryMap::new(self);
        validate_no_overlap(&map)?;
        let top = map.top();
        if top > layout::MAX_IPA {
            let beyond: Vec<String> = map
                .named_ranges()
                .into_iter()
                .filter(|(_, r)| r.end() > layout::MAX_IPA)
                .map(|(name, r)| format!("{name} {r}"))
                .collect();
            return Err(format!(
                "{} ends beyond the {}-bit guest physical address space (the most any host \
                 KVM offers)",
                beyond.join(", "),
                layout::MAX_IPA_BITS
            ));
        }
        validate_pxms(&map)?;
        Ok(Resolved::new(self.clone(), map))
    }

    /// What can be checked before anything is placed: counts, each socket, each GPU.
    fn validate_parts(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(format!(
                "vcpus = {}: must be between 1 and {} (the GIC redistributor space)",
                self.vcpus,
                layout::MAX_VCPUS
            ));
        }
        if self.sockets.is_empty() || self.sockets.len() > layout::MAX_SOCKETS {
            return Err(format!(
                "{} sockets described: give 1 to {} [[socket]] tables",
                self.sockets.len(),
                layout::MAX_SOCKETS
            ));
        }
        if self.gpus.len() > layout::MAX_GPUS {
            return Err(format!(
                "{} GPUs described: at most {} [[gpu]] tables",
                self.gpus.len(),
                layout::MAX_GPUS
            ));
        }
        for (i, s) in self.sockets.iter().enumerate() {
            self.validate_socket(i, s)?;
        }
        for (i, g) in self.gpus.iter().enumerate() {
            self.validate_gpu(i, g)?;
        }
        Ok(())
    }

    fn validate_socket(&self, i: usize, s: &Socket) -> Result<(), String> {
        let name = socket_name(i);
        let ram = s.ram;
        if ram.0 == 0 {
            return Err(format!("{name} ram = 0: a socket needs RAM"));
        }
        let min = if i == 0 { layout::MIN_RAM } else { 2 * MIB };
        if ram.0 < min || ram.0 % (2 * MIB) != 0 {
            return Err(format!(
                "{name} ram = {ram}: must be a multiple of 2M and at least {}",
                Size(min)
            ));
        }
        let Some(egm) = &s.egm else { return Ok(()) };
        if egm.size.0 == 0 {
            return Err(format!(
                "{name} egm size = 0: give the carve-out a size (or leave out [socket.egm])"
            ));
        }
        let base = egm.base.map_or(layout::egm_default_base(i), |a| a.0);
        if base % GIB != 0 || egm.size.0 % GIB != 0 {
            return Err(format!(
                "{name} EGM carve-out base {base:#x} size {}: both must be multiples of 1G, so \
                 the carve-out shares no memory section with RAM",
                egm.size
            ));
        }
        if egm.retired_pages.len() > layout::RETIRED_PAGES_MAX {
            return Err(format!(
                "{name} egm retired_pages: {} entries, but the retired-pages table holds at \
                 most {}",
                egm.retired_pages.len(),
                layout::RETIRED_PAGES_MAX
            ));
        }
        let range = GuestRange::new(base, egm.size.0);
        for (k, page) in egm.retired_pages.iter().enumerate() {
            if !range.contains(page.0) {
                return Err(format!(
                    "{name} egm retired_pages[{k}] = {page}: outside the carve-out {range}"
                ));
            }
            if page.0 % (4 * KIB) != 0 {
                return Err(format!(
                    "{name} egm retired_pages[{k}] = {page}: not 4K aligned"
                ));
            }
        }
        Ok(())
    }

    fn validate_gpu(&self, i: usize, g: &Gpu) -> Result<(), String> {
        let name = format!("gpu {i}");
        if g.socket >= self.sockets.len() {
            return Err(format!(
                "{name}: socket = {}, but only {} [[socket]] tables are described",
                g.socket,
                self.sockets.len()
            ));
        }
        if g.retired_pages_base.is_some() && self.sockets[g.socket].egm.is_none() {
            return Err(format!(
                "{name}: retired_pages_base is given but socket {} has no [socket.egm], so the \
                 GPU has no EGM properties",
                g.socket
            ));
        }
        if g.device_id.is_some() && g.model.is_some() {
            return Err(format!("{name}: give either model or device_id, not both"));
        }
        if g.mem_size.0 == 0 {
            return Err(format!(
                "{name} mem_size = 0: give the GPU memory a size (to present a size of 0 to \
                 the driver, use zero_properties = [\"{GPU_MEM_SIZE}\"])"
            ));
        }
        if g.mem_size.0 % (2 * MIB) != 0 {
            return Err(format!(
                "{name} mem_size = {}: must be a multiple of 2M",
                g.mem_size
            ));
        }
        for (knob, names) in [
            ("omit_properties", &g.omit_properties),
            ("zero_properties", &g.zero_properties),
        ] {
            for p in names {
                if !GPU_PROPERTIES.contains(&p.as_str()) {
                    return Err(format!(
                        "{name} {knob}: unknown property \"{p}\" (known: {})",
                        GPU_PROPERTIES.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

fn validate_no_overlap(map: &MemoryMap) -> Result<(), String> {
    let mut ranges = map.named_ranges();
    ranges.sort_by_key(|(_, r)| (r.base, r.end()));
    for w in ranges.windows(2) {
        let ((a, ra), (b, rb)) = (&w[0], &w[1]);
        if ra.overlaps(rb) {
            return Err(format!("{a} {ra} overlaps {b} {rb}"));
        }
    }
    Ok(())
}

fn validate_pxms(map: &MemoryMap) -> Result<(), String> {
    let mut owners: BTreeMap<u32, String> = BTreeMap::new();
    let mut claim = |pxm: u32, who: String| match owners.get(&pxm) {
        Some(first) => Err(format!(
            "pxm {pxm} is given to both {first} and {who}: every socket, EGM carve-out and GPU \
             needs its own proximity domain"
        )),
        None => {
            owners.insert(pxm, who);
            Ok(())
        }
    };
    for r in &map.ram {
        claim(r.pxm, format!("socket {}", r.socket))?;
    }
    for c in &map.carve_outs {
        claim(c.pxm, format!("socket {} EGM carve-out", c.socket))?;
    }
    for g in &map.gpus {
        claim(g.pxm, format!("gpu {}", g.index))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Platform::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn test_size_suffixes_parse() {
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert_eq!("512M".parse::<Size>().unwrap(), Size(512 * MIB));
        assert_eq!("4GiB".parse::<Size>().unwrap(), Size(4 * GIB));
        assert_eq!("2g".parse::<Size>().unwrap(), Size(2 * GIB));
        assert_eq!("0x4000_0000".parse::<Size>().unwrap(), Size(GIB));
        assert!("12X".parse::<Size>().is_err());
        assert!("M".parse::<Size>().is_err());
        assert!("0xg".parse::<Size>().is_err());
        assert!("99999999999T".parse::<Size>().is_err());
    }

    #[test]
    fn test_size_display_round_trips() {
        for s in ["512M", "4G", "3K", "1T", "1000"] {
            assert_eq!(s.parse::<Size>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn test_description_empty_is_minimal() {
        let p = Platform::from_toml("", "empty").unwrap();
        assert_eq!(p, Platform::minimal());
        assert_eq!(p.boot, BootMode::Acpi);
    }

    #[test]
    fn test_description_default_valid_and_grace_like() {
        let p = Platform::default();
        p.validate().unwrap();
        let map = p.resolve().unwrap().map().clone();
        assert_eq!(map.carve_outs.len(), 1);
        assert_eq!(map.carve_outs[0].pxm, 4);
        assert_eq!(map.carve_outs[0].range.size, GIB);
        assert_eq!(map.gpus[0].device_id, 0x2941);
        assert!(
            p.resolve().unwrap().required_ipa_bits() <= 40,
            "{}",
            p.resolve().unwrap().required_ipa_bits()
        );
    }

    #[test]
    fn test_description_full_example_parses() {
        let text = &format!(
            r#"
            vcpus = 4
            boot = "dt"
            [[socket]]
            ram = "2G"
            [socket.egm]
            size = "1G"
            base = "0x8000000000"
            retired_pages = ["0x8000001000", 0x8000002000]
            [[socket]]
            ram = "1G"
            pxm = 1
            [socket.egm]
            size = "2G"
            [[gpu]]
            model = "gb200"
            mem_size = "1G"
            [[gpu]]
            device_id = 0x2342
            socket = 0
            mem_size = "2G"
            readiness = {{ delay_ms = 1500 }}
            omit_properties = [{EGM_PXM:?}]
            [[gpu]]
            model = "gh200"
            socket = 1
            mem_size = "1G"
            readiness = "never"
            retired_pages_base = 0
        "#
        );
        let p = Platform::from_toml(text, "t").unwrap();
        assert_eq!(p.boot, BootMode::Dt);
        assert_eq!(p.gpus[1].pci_device_id(), 0x2342);
        assert_eq!(p.gpus[1].readiness, Readiness::DelayMs(1500));
        assert_eq!(p.gpus[2].readiness, Readiness::Never);
        assert_eq!(p.gpus[2].retired_pages_base, Some(Addr(0)));
        let map = p.resolve().unwrap().map().clone();
        assert_eq!(map.carve_outs[1].pxm, 5);
        assert_eq!(
            map.carve_outs[0].retired_pages,
            [0x80_0000_1000, 0x80_0000_2000]
        );
        assert_eq!(p.system_ram(), 3 * GIB);
    }

    #[test]
    fn test_description_unknown_key_rejected_with_name() {
        let e = err("vcpu = 2");
        assert!(e.contains("t.toml") && e.contains("vcpu"), "{e}");
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nbse = 0");
        assert!(e.contains("bse"), "{e}");
        let e = err("[[gpu]]\nmem_size = \"1G\"\nmodle = \"gb200\"");
        assert!(e.contains("modle"), "{e}");
    }

    #[test]
    fn test_description_overlap_rejected() {
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nbase = \"0x40000000\"");
        assert!(e.contains("overlaps"), "{e}");
        assert!(
            e.contains("socket 0 RAM 0x40000000..0x80000000")
                && e.contains("socket 0 EGM carve-out 0x40000000..0x80000000"),
            "{e}"
        );
    }

    #[test]
    fn test_description_misaligned_carve_out_rejected() {
        let e =
            err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nbase = \"0x8000200000\"");
        assert!(
            e.contains("multiples of 1G") && e.contains("0x8000200000"),
            "{e}"
        );
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"512M\"");
        assert!(e.contains("multiples of 1G") && e.contains("512M"), "{e}");
    }

    #[test]
    fn test_description_zero_sizes_rejected() {
        let e = err("[[socket]]\nram = 0");
        assert!(e.contains("socket 0 ram = 0"), "{e}");
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = 0");
        assert!(e.contains("socket 0 egm size = 0"), "{e}");
        let e = err("[[gpu]]\nmem_size = 0");
        assert!(e.contains("gpu 0 mem_size = 0"), "{e}");
    }

    #[test]
    fn test_description_ipa_limit_reported() {
        let p = Platform::default();
        p.resolve().unwrap().validate_ipa(40).unwrap();
        let e = p.resolve().unwrap().validate_ipa(39).unwrap_err();
        assert!(
            e.contains("40-bit") && e.contains("supports 39 bits") && e.contains("EGM"),
            "{e}"
        );
        let e =
            err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"2G\"\nbase = \"0xffffc0000000\"");
        assert!(e.contains("48-bit"), "{e}");
    }

    #[test]
    fn test_description_duplicate_pxm_rejected() {
        let e = err("[[socket]]\nram = \"1G\"\npxm = 4\n[socket.egm]\nsize = \"1G\"");
        assert!(
            e.contains("pxm 4") && e.contains("socket 0 and socket 0 EGM carve-out"),
            "{e}"
        );
        let e = err("[[gpu]]\nmem_size = \"1G\"\npxm = 0");
        assert!(e.contains("pxm 0") && e.contains("gpu 0"), "{e}");
    }

    #[test]
    fn test_description_retired_pages_count_expands_inside_carve_out() {
        let p = Platform::from_toml(
            "[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nretired_pages_count = 513",
            "t",
        )
        .unwrap();
        let map = p.resolve().unwrap().map().clone();
        let c = &map.carve_outs[0];
        assert_eq!(c.retired_pages.len(), 513);
        let mut seen = std::collections::BTreeSet::new();
        for &a in &c.retired_pages {
            assert!(
                c.range.contains(a) && a != c.range.base && a % (4 * KIB) == 0,
                "{a:#x}"
            );
            assert!(seen.insert(a), "duplicate {a:#x}");
        }
        let e = err(
            "[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nretired_pages_count = 4097",
        );
        assert!(e.contains("4097 entries"), "{e}");
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nretired_pages_count = 1\nretired_pages = [\"0x8000001000\"]");
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn test_description_too_many_retired_pages_rejected() {
        let pages: Vec<String> = (0..4097u64)
            .map(|i| format!("{:#x}", 0x80_0000_0000u64 + i * 4096))
            .collect();
        let text = format!(
            "[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nretired_pages = {pages:?}"
        );
        let e = err(&text);
        assert!(
            e.contains("4097 entries") && e.contains("at most 4096"),
            "{e}"
        );
        // Exactly 4096 is fine.
        let text = text.replace(&format!(", {:?}", pages[4096]), "");
        Platform::from_toml(&text, "t").unwrap();
    }

    #[test]
    fn test_description_retired_page_outside_carve_out_rejected() {
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nretired_pages = [\"0x8040000000\"]");
        assert!(
            e.contains("retired_pages[0] = 0x8040000000")
                && e.contains("outside the carve-out 0x8000000000..0x8040000000"),
            "{e}"
        );
        let e = err("[[socket]]\nram = \"1G\"\n[socket.egm]\nsize = \"1G\"\nretired_pages = [\"0x8000000800\"]");
        assert!(e.contains("not 4K aligned"), "{e}");
    }

    #[test]
    fn test_description_bad_values_rejected() {
        for (text, needle) in [
            ("vcpus = 0", "vcpus = 0"),
            ("vcpus = 1000", "vcpus = 1000"),
            ("[[socket]]\nram = \"1M\"", "ram = 1M"),
            ("[[socket]]\nram = \"65M\"", "multiple of 2M"),
            ("boot = \"uefi\"", "uefi"),
            (
                "[[gpu]]\nmem_size = \"1G\"\nsocket = 1",
                "only 1 [[socket]]",
            ),
            ("[[gpu]]\nmem_size = \"1G\"\nmodel = \"h100\"", "h100"),
            (
                "[[gpu]]\nmem_size = \"1G\"\nmodel = \"gb200\"\ndevice_id = 1",
                "not both",
            ),
            ("[[gpu]]\nmem_size = \"1G\"\ndevice_id = 0x12345", "16-bit"),
            (
                "[[gpu]]\nmem_size = \"1G\"\nreadiness = \"soon\"",
                "readiness must be",
            ),
            (
                "[[gpu]]\nmem_size = \"1G\"\nreadiness = { delay = 3 }",
                "readiness must be",
            ),
            (
                "[[gpu]]\nmem_size = \"1G\"\nomit_properties = [\"nvidia,egm\"]",
                "unknown property \"nvidia,egm\"",
            ),
            ("[[gpu]]\nmem_size = \"3M\"", "multiple of 2M"),
        ] {
            let e = err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn test_description_socket_and_gpu_counts_bounded() {
        let five = "[[socket]]\nram = \"1G\"\n".repeat(5);
        assert!(err(&five).contains("5 sockets"));
        let nine = "[[gpu]]\nmem_size = \"1G\"\n".repeat(9);
        assert!(err(&nine).contains("9 GPUs"));
    }
}
