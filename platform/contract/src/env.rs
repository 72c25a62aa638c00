//! `/gracevm/env`: what the VMM tells the guest, written by the VMM ([`Env::write`]) into its
//! own initrd archive, sourced by the guest's `/init` with the shell, and read by the in-guest
//! suite ([`Vars::parse`], then the typed parsers of each value). Both sides use this module,
//! so the format is written down once.
//!
//! The file is `KEY=VALUE` lines; a value may be a shell word in single quotes (`'\''` for an
//! embedded quote). Typed values:
//!
//! | key | value |
//! |---|---|
//! | `GRACEVM_CARVEOUTS` | [`Carveout`]s `pxm:base:size:seed`, space separated |
//! | `GRACEVM_EGM_RETIRED_PAGES` | [`RetiredTable`]s `pxm:table:addr,addr,...` |
//! | `GRACEVM_EGM_TABLE_ROOM` | [`TableRoom`]s `pxm:bytes` |
//! | `GRACEVM_GPUS` | [`Gpu`]s `bdf=..;id=vvvv:dddd;style=..;readiness=..;mem=base+size;props=name:value,...` |
//!
//! The parsers take guest or user text: they return errors, never panic.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use crate::gpu::{Readiness, Style};

/// Where the VMM puts the file in the guest.
pub const PATH: &str = "/gracevm/env";

/// The keys.
pub mod key {
    /// `shell`, `run` or `test`.
    pub const MODE: &str = "GRACEVM_MODE";
    /// The scenario's test globs (space separated).
    pub const TESTS: &str = "GRACEVM_TESTS";
    /// Features the kernel must have (space separated), and why.
    pub const EXPECT: &str = "GRACEVM_EXPECT";
    pub const EXPECT_WHY: &str = "GRACEVM_EXPECT_WHY";
    /// The run's `--tests` globs.
    pub const TESTS_SELECTED: &str = "GRACEVM_TESTS_SELECTED";
    /// The command of `run` mode.
    pub const CMD: &str = "GRACEVM_CMD";
    /// The module tree's kernel release and the modules /init loads from it, in order.
    pub const MODULES_RELEASE: &str = "GRACEVM_MODULES_RELEASE";
    pub const MODPROBE: &str = "GRACEVM_MODPROBE";
    /// The test device's base (its BOOT register is the boot timer).
    pub const BOOT_TIMER: &str = "GRACEVM_BOOT_TIMER";
    pub const TESTDEV: &str = "GRACEVM_TESTDEV";
    /// `address magic`: what /init writes to end the run when its kernel cannot power off.
    pub const POWER_OFF: &str = "GRACEVM_POWER_OFF";
    pub const CPUS: &str = "GRACEVM_CPUS";
    pub const SYSTEM_RAM: &str = "GRACEVM_SYSTEM_RAM";
    /// `acpi` or `dt`.
    pub const BOOT_MODE: &str = "GRACEVM_BOOT_MODE";
    /// The NUMA nodes of the sockets' RAM, in Linux's list syntax.
    pub const NUMA_NODES: &str = "GRACEVM_NUMA_NODES";
    pub const CARVEOUTS: &str = "GRACEVM_CARVEOUTS";
    pub const EGM_RETIRED_PAGES: &str = "GRACEVM_EGM_RETIRED_PAGES";
    pub const EGM_TABLE_ROOM: &str = "GRACEVM_EGM_TABLE_ROOM";
    pub const GPUS: &str = "GRACEVM_GPUS";
}

/// What the guest's /init does once userspace is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// An interactive shell on the console.
    Shell,
    /// Run a command, then power off.
    Run(String),
    /// Run the in-guest KTAP suite, then power off.
    Test(TestRequest),
}

/// What a test run asks of the suite beyond the platform.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestRequest {
    /// Features the kernel under test must have: the suite fails, rather than skips, the tests
    /// of a feature listed here when the kernel lacks it.
    pub expect: Vec<String>,
    /// Why (shown in the failures): "--expect egm", or what the build saw in the tree.
    pub why: String,
    /// Only the tests matching these globs (`--tests`; empty: all).
    pub tests: Vec<String>,
}

impl TestRequest {
    /// Features `--expect` knows.
    pub const KNOWN: &'static [&'static str] = &["egm"];
}

/// Which firmware interface the VMM booted the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// EFI hand-off (system table + memory map in `/chosen`) with ACPI tables.
    Acpi,
    /// A full device tree, no EFI.
    Dt,
}

impl BootMode {
    /// `acpi` or `dt`, in any case, around whitespace.
    pub fn parse(text: &str) -> Option<BootMode> {
        match text.trim().to_ascii_lowercase().as_str() {
            "acpi" => Some(BootMode::Acpi),
            "dt" => Some(BootMode::Dt),
            _ => None,
        }
    }
}

impl fmt::Display for BootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootMode::Acpi => "acpi",
            BootMode::Dt => "dt",
        })
    }
}

/// The module tree appended to the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleLoad {
    /// Its kernel release.
    pub release: String,
    /// The modules /init loads from it, in order.
    pub modprobe: Vec<String>,
}

/// The whole file, typed: what the VMM writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub mode: Mode,
    /// The scenario's `tests` globs.
    pub tests: Vec<String>,
    pub modules: Option<ModuleLoad>,
    /// Guest physical base of the test device.
    pub testdev: u64,
    pub cpus: u32,
    pub system_ram: u64,
    pub boot_mode: BootMode,
    /// Linux's list syntax ("0", "0-1,6-7").
    pub numa_nodes: String,
    pub carveouts: Vec<Carveout>,
    pub retired_pages: Vec<RetiredTable>,
    pub table_room: Vec<TableRoom>,
    pub gpus: Vec<Gpu>,
}

impl Env {
    /// The file's text.
    pub fn write(&self) -> String {
        let mut w = Writer::default();
        w.word(key::MODE, self.mode_word());
        if !self.tests.is_empty() {
            w.quoted(key::TESTS, &self.tests.join(" "));
        }
        match &self.mode {
            Mode::Test(request) => {
                if !request.expect.is_empty() {
                    w.quoted(key::EXPECT, &request.expect.join(" "));
                    w.quoted(key::EXPECT_WHY, &request.why);
                }
                if !request.tests.is_empty() {
                    w.quoted(key::TESTS_SELECTED, &request.tests.join(" "));
                }
            }
            Mode::Run(cmd) => w.quoted(key::CMD, cmd),
            Mode::Shell => {}
        }
        if let Some(m) = &self.modules {
            w.quoted(key::MODULES_RELEASE, &m.release);
            w.quoted(key::MODPROBE, &m.modprobe.join(" "));
        }
        self.write_machine(&mut w);
        w.0
    }

    fn mode_word(&self) -> &'static str {
        match self.mode {
            Mode::Shell => "shell",
            Mode::Run(_) => "run",
            Mode::Test(_) => "test",
        }
    }

    fn write_machine(&self, w: &mut Writer) {
        w.word(key::BOOT_TIMER, &format!("{:#x}", self.testdev));
        w.word(key::TESTDEV, &format!("{:#x}", self.testdev));
        let power = self.testdev + crate::testdev::POWER;
        let magic = crate::testdev::POWER_OFF_MAGIC;
        w.quoted(key::POWER_OFF, &format!("{power:#x} {magic:#x}"));
        w.word(key::CPUS, &self.cpus.to_string());
        w.word(key::SYSTEM_RAM, &self.system_ram.to_string());
        w.word(key::BOOT_MODE, &self.boot_mode.to_string());
        w.word(key::NUMA_NODES, &self.numa_nodes);
        w.quoted(key::CARVEOUTS, &join(&self.carveouts, Carveout::entry));
        w.quoted(
            key::EGM_RETIRED_PAGES,
            &join(&self.retired_pages, RetiredTable::entry),
        );
        w.quoted(
            key::EGM_TABLE_ROOM,
            &join(&self.table_room, TableRoom::entry),
        );
        w.quoted(key::GPUS, &join(&self.gpus, Gpu::entry));
    }

    /// Reads back what [`Env::write`] wrote (the suite reads keys one at a time instead, so a
    /// missing or bad key affects only the tests that need it).
    pub fn read(vars: &Vars) -> Result<Env, String> {
        let need = |k: &str| vars.get(k).ok_or_else(|| format!("no {k}"));
        let number = |k: &str| {
            let text = need(k)?;
            parse_u64(text).ok_or_else(|| format!("{k}={text:?} is not a number"))
        };
        let words = |k: &str| -> Vec<String> {
            vars.get(k)
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        let mode = match need(key::MODE)? {
            "shell" => Mode::Shell,
            "run" => Mode::Run(need(key::CMD)?.to_string()),
            "test" => Mode::Test(TestRequest {
                expect: words(key::EXPECT),
                why: vars.get(key::EXPECT_WHY).unwrap_or_default().to_string(),
                tests: words(key::TESTS_SELECTED),
            }),
            other => return Err(format!("{}={other:?} is no mode", key::MODE)),
        };
        let modules = vars.get(key::MODULES_RELEASE).map(|release| ModuleLoad {
            release: release.to_string(),
            modprobe: words(key::MODPROBE),
        });
        let boot = need(key::BOOT_MODE)?;
        Ok(Env {
            mode,
            tests: words(key::TESTS),
            modules,
            testdev: number(key::TESTDEV)?,
            cpus: u32::try_from(number(key::CPUS)?).map_err(|e| format!("{}: {e}", key::CPUS))?,
            system_ram: number(key::SYSTEM_RAM)?,
            boot_mode: BootMode::parse(boot).ok_or_else(|| format!("boot mode {boot:?}"))?,
            numa_nodes: need(key::NUMA_NODES)?.to_string(),
            carveouts: Carveout::parse_list(need(key::CARVEOUTS)?)?,
            retired_pages: RetiredTable::parse_list(need(key::EGM_RETIRED_PAGES)?)?,
            table_room: TableRoom::parse_list(need(key::EGM_TABLE_ROOM)?)?,
            gpus: Gpu::parse_list(need(key::GPUS)?)?,
        })
    }
}

fn join<T>(items: &[T], entry: fn(&T) -> String) -> String {
    items.iter().map(entry).collect::<Vec<_>>().join(" ")
}

/// Builds the file: one `KEY=VALUE` line per value.
#[derive(Default)]
struct Writer(String);

impl Writer {
    /// A value that is one shell word as it is.
    fn word(&mut self, key: &str, value: &str) {
        let _ = writeln!(self.0, "{key}={value}");
    }

    /// Any value, single-quoted.
    fn quoted(&mut self, key: &str, value: &str) {
        let _ = writeln!(self.0, "{key}={}", shell_quote(value));
    }
}

/// Quote `s` as one POSIX shell word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Parses a decimal or `0x`-prefixed hexadecimal number, allowing surrounding whitespace.
pub fn parse_u64(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// The file's variables, unquoted as the shell would.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Vars {
    vars: BTreeMap<String, String>,
    /// Lines that were not understood, as `line N: why`.
    pub warnings: Vec<String>,
}

impl Vars {
    /// Parses the file. Blank lines, `#` comments and an `export ` prefix are accepted; a
    /// quoted value may span lines; a later key overrides an earlier one. Malformed lines are
    /// skipped with a warning.
    pub fn parse(text: &str) -> Vars {
        let mut out = Vars::default();
        let mut lines = text.lines().enumerate();
        while let Some((index, line)) = lines.next() {
            let line_no = index + 1;
            let body = line.trim_end_matches('\r').trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let body = body.strip_prefix("export ").unwrap_or(body).trim_start();
            let Some((key, raw)) = body.split_once('=') else {
                out.warnings
                    .push(format!("line {line_no}: no '=' in {body:?}"));
                continue;
            };
            if !is_valid_key(key) {
                out.warnings
                    .push(format!("line {line_no}: invalid key {key:?}"));
                continue;
            }
            let mut raw = raw.to_string();
            let value = loop {
                match unquote(&raw) {
                    Some(value) => break Some(value),
                    None => match lines.next() {
                        Some((_, more)) => {
                            raw.push('\n');
                            raw.push_str(more.trim_end_matches('\r'));
                        }
                        None => {
                            out.warnings
                                .push(format!("line {line_no}: unterminated quote in {key}"));
                            break None;
                        }
                    },
                }
            };
            if let Some(value) = value {
                out.vars.insert(key.to_string(), value);
            }
        }
        out
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }
}

fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Removes one level of shell quoting: `'...'` literal, `"..."` with `\"`, `\\`, `\$`, `` \` ``
/// escapes, and `\x` outside quotes. `None`: a quote or trailing backslash is still open (the
/// value continues on the next line).
fn unquote(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => out.push(c),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        c @ ('"' | '\\' | '$' | '`') => out.push(c),
                        c => {
                            out.push('\\');
                            out.push(c);
                        }
                    },
                    c => out.push(c),
                }
            },
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    Some(out)
}

/// Splits a list value into its entries (whitespace separated; `extra` separates too).
fn entries(text: &str, extra: Option<char>) -> impl Iterator<Item = &str> {
    text.split(move |c: char| c.is_whitespace() || Some(c) == extra)
        .filter(|entry| !entry.is_empty())
}

/// An EGM carve-out the VMM placed: guest physical `[base, base + size)`, in no memory map,
/// filled at boot with `seed ^ offset` in every u64 (see [`crate::testdev::pattern_word`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carveout {
    /// `nvidia,egm-pxm`, the proximity domain the EGM driver names `/dev/egm<pxm>` after.
    pub pxm: u32,
    pub base: u64,
    pub size: u64,
    pub seed: u64,
}

impl Carveout {
    /// Exclusive end (cannot overflow when parsed: checked).
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }

    /// The boot-time fill: the u64 at byte `offset` from `base`.
    pub fn pattern_word(&self, offset: u64) -> u64 {
        crate::testdev::pattern_word(self.seed, offset)
    }

    /// Whether `[start, end)` (exclusive end) shares a byte with the carve-out.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end() && self.base < end
    }

    /// The env entry: `pxm:base:size:seed`.
    pub fn entry(&self) -> String {
        format!(
            "{}:{:#x}:{:#x}:{:#x}",
            self.pxm, self.base, self.size, self.seed
        )
    }

    /// Parses entries `pxm:base:size:seed` separated by whitespace (or commas); each number
    /// decimal or `0x` hex. Empty text is no carve-out. Every entry must be 8-byte aligned,
    /// non-empty and below 2^64.
    pub fn parse_list(text: &str) -> Result<Vec<Carveout>, String> {
        entries(text, Some(',')).map(Carveout::parse).collect()
    }

    fn parse(entry: &str) -> Result<Carveout, String> {
        let fields: Vec<&str> = entry.split(':').collect();
        let [pxm, base, size, seed] = fields[..] else {
            return Err(format!(
                "carve-out {entry:?}: expected pxm:base:size:seed, found {} field(s)",
                fields.len()
            ));
        };
        let number = |what: &str, text: &str| {
            parse_u64(text)
                .ok_or_else(|| format!("carve-out {entry:?}: {what} {text:?} is not a number"))
        };
        let pxm = number("pxm", pxm)?;
        let pxm = u32::try_from(pxm)
            .map_err(|_| format!("carve-out {entry:?}: pxm {pxm} is out of range"))?;
        let carveout = Carveout {
            pxm,
            base: number("base", base)?,
            size: number("size", size)?,
            seed: number("seed", seed)?,
        };
        if carveout.size == 0 {
            return Err(format!("carve-out {entry:?}: size is 0"));
        }
        if carveout.base % 8 != 0 || carveout.size % 8 != 0 {
            return Err(format!(
                "carve-out {entry:?}: base and size must be multiples of 8"
            ));
        }
        if carveout.base.checked_add(carveout.size).is_none() {
            return Err(format!("carve-out {entry:?}: ends beyond 2^64"));
        }
        Ok(carveout)
    }
}

impl fmt::Display for Carveout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "carve-out pxm {} [{:#x}-{:#x}]",
            self.pxm,
            self.base,
            self.end().saturating_sub(1)
        )
    }
}

/// One carve-out's retired-pages table: where it is and its entries in table order (what the
/// EGM ioctl should report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredTable {
    /// The carve-out's PXM.
    pub pxm: u32,
    /// Guest physical address of the table.
    pub table: u64,
    /// Retired physical addresses, in table order.
    pub pages: Vec<u64>,
}

impl RetiredTable {
    /// The env entry: `pxm:table:addr,addr,...`.
    pub fn entry(&self) -> String {
        let pages: Vec<String> = self.pages.iter().map(|a| format!("{a:#x}")).collect();
        format!("{}:{:#x}:{}", self.pxm, self.table, pages.join(","))
    }

    /// Parses whitespace-separated entries.
    pub fn parse_list(text: &str) -> Result<Vec<RetiredTable>, String> {
        entries(text, None).map(RetiredTable::parse).collect()
    }

    fn parse(entry: &str) -> Result<RetiredTable, String> {
        let fields: Vec<&str> = entry.splitn(3, ':').collect();
        let [pxm, table, pages] = fields[..] else {
            return Err(format!("entry {entry:?}: expected pxm:table:addr,addr,..."));
        };
        let pxm = parse_u64(pxm)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| format!("entry {entry:?}: pxm {pxm:?} is not a number"))?;
        let table = parse_u64(table)
            .ok_or_else(|| format!("entry {entry:?}: table {table:?} is not a number"))?;
        let pages = pages
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                parse_u64(p).ok_or_else(|| format!("entry {entry:?}: page {p:?} is not a number"))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        Ok(RetiredTable { pxm, table, pages })
    }
}

/// The room the firmware gave a carve-out's retired-pages table, in bytes (a table longer than
/// its room is cut short: the driver must refuse it rather than read past the room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableRoom {
    pub pxm: u32,
    pub bytes: u64,
}

impl TableRoom {
    /// The env entry: `pxm:bytes`.
    pub fn entry(&self) -> String {
        format!("{}:{}", self.pxm, self.bytes)
    }

    /// How many entries fit after the count.
    pub fn entries(&self) -> usize {
        usize::try_from(self.bytes.saturating_sub(8) / 8).unwrap_or(usize::MAX)
    }

    /// Parses whitespace-separated entries (decimal numbers).
    pub fn parse_list(text: &str) -> Result<Vec<TableRoom>, String> {
        entries(text, None)
            .map(|entry| {
                entry
                    .split_once(':')
                    .and_then(|(p, b)| Some((p.parse().ok()?, b.parse().ok()?)))
                    .map(|(pxm, bytes)| TableRoom { pxm, bytes })
                    .ok_or_else(|| format!("room {entry:?}: expected pxm:bytes"))
            })
            .collect()
    }
}

/// One GPU function: where it is, what it is, and exactly the `nvidia,*` properties its
/// firmware node carries (fault knobs applied; names without `nvidia,`, in firmware order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// `dddd:bb:dd.f`.
    pub bdf: String,
    pub vendor: u16,
    pub device: u16,
    pub style: Style,
    pub readiness: Readiness,
    /// The aperture backing the GPU memory: `[mem_base, mem_base + mem_size)`.
    pub mem_base: u64,
    pub mem_size: u64,
    /// The firmware node's properties, without `nvidia,`.
    pub props: Vec<(String, u64)>,
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

impl Gpu {
    /// The property `name` (without `nvidia,`), if the node has it.
    pub fn prop(&self, name: &str) -> Option<u64> {
        self.props.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// Sets the property `name` (without `nvidia,`), adding it at the end if new.
    pub fn set_prop(&mut self, name: &str, value: u64) {
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some(prop) => prop.1 = value,
            None => self.props.push((name.to_string(), value)),
        }
    }

    /// Leaves the property `name` out.
    pub fn remove_prop(&mut self, name: &str) {
        self.props.retain(|(n, _)| n != name);
    }

    /// Whether `[phys, phys + len)` lies inside the backing aperture.
    pub fn backed(&self, phys: u64, len: u64) -> bool {
        phys >= self.mem_base
            && phys
                .checked_add(len)
                .is_some_and(|end| end <= self.mem_base.saturating_add(self.mem_size))
    }

    /// The env entry.
    pub fn entry(&self) -> String {
        let props: Vec<String> = self
            .props
            .iter()
            .map(|(name, v)| format!("{name}:{v:#x}"))
            .collect();
        format!(
            "bdf={};id={:04x}:{:04x};style={};readiness={};mem={:#x}+{:#x};props={}",
            self.bdf,
            self.vendor,
            self.device,
            self.style,
            self.readiness,
            self.mem_base,
            self.mem_size,
            props.join(",")
        )
    }

    /// Parses whitespace-separated entries (empty text: no GPU).
    pub fn parse_list(text: &str) -> Result<Vec<Gpu>, String> {
        entries(text, None).map(Gpu::parse).collect()
    }

    fn parse(entry: &str) -> Result<Gpu, String> {
        let bad = |why: String| format!("GPU entry {entry:?}: {why}");
        let fields = gpu_fields(entry).map_err(bad)?;
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
        if !is_bdf(bdf) {
            return Err(bad(format!("bdf {bdf:?} is not dddd:bb:dd.f")));
        }
        let id = field("id")?;
        let (vendor, device) =
            parse_id(id).ok_or_else(|| bad(format!("id {id:?} is not vvvv:dddd")))?;
        let style = field("style")?;
        let style = Style::parse(style)
            .ok_or_else(|| bad(format!("style {style:?} is neither blackwell nor hopper")))?;
        let readiness = field("readiness")?;
        let readiness = Readiness::parse(readiness).ok_or_else(|| {
            bad(format!(
                "readiness {readiness:?} is not ready|never|delay:MS"
            ))
        })?;
        let mem = field("mem")?;
        let (base, size) = mem
            .split_once('+')
            .ok_or_else(|| bad(format!("mem {mem:?} is not base+size")))?;
        let (mem_base, mem_size) = (number("mem base", base)?, number("mem size", size)?);
        if mem_base.checked_add(mem_size).is_none() {
            return Err(bad(format!("mem {mem} ends beyond 2^64")));
        }
        let props = gpu_props(field("props")?).map_err(bad)?;
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
}

/// The `key=value` fields of a GPU entry, each at most once.
fn gpu_fields(entry: &str) -> Result<BTreeMap<&str, &str>, String> {
    let mut fields = BTreeMap::new();
    for field in entry.split(';').filter(|f| !f.is_empty()) {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("field {field:?} has no '='"))?;
        if fields.insert(key, value).is_some() {
            return Err(format!("field {key} given twice"));
        }
    }
    Ok(fields)
}

/// `name:value,...`, each name at most once (an `nvidia,` prefix is dropped).
fn gpu_props(text: &str) -> Result<Vec<(String, u64)>, String> {
    let mut props: Vec<(String, u64)> = Vec::new();
    for prop in text.split(',').filter(|p| !p.is_empty()) {
        let (name, value) = prop
            .split_once(':')
            .ok_or_else(|| format!("property {prop:?} is not name:value"))?;
        let name = crate::properties::short_name(name);
        let value = parse_u64(value).ok_or_else(|| format!("{name} {value:?} is not a number"))?;
        if props.iter().any(|(n, _)| n == name) {
            return Err(format!("property {name} given twice"));
        }
        props.push((name.to_string(), value));
    }
    Ok(props)
}

/// `vvvv:dddd`, hexadecimal.
fn parse_id(id: &str) -> Option<(u16, u16)> {
    let (v, d) = id.split_once(':')?;
    Some((
        u16::from_str_radix(v, 16).ok()?,
        u16::from_str_radix(d, 16).ok()?,
    ))
}

/// Whether `text` is a PCI address `dddd:bb:dd.f` (hexadecimal, device below 0x20, function
/// 0 to 7).
pub fn is_bdf(text: &str) -> bool {
    let bytes = text.as_bytes();
    let hex = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_hexdigit);
    bytes.len() == 12
        && bytes[4] == b':'
        && bytes[7] == b':'
        && bytes[10] == b'.'
        && hex(0..4)
        && hex(5..7)
        && hex(8..10)
        && u8::from_str_radix(&text[8..10], 16).is_ok_and(|device| device < 0x20)
        && matches!(bytes[11], b'0'..=b'7')
}

#[cfg(test)]
mod tests;
