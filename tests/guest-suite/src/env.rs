//! The expectations the VMM hands the guest in `/gracevm/env`.
//!
//! The VMM appends a second initramfs archive holding `/gracevm/env`: `KEY=VALUE` lines whose
//! values may be shell words (single quotes, `'\''` for an embedded quote). `/init` sources the
//! file with the shell; the suite parses it here with the same quoting rules, so both agree.

use std::collections::BTreeMap;
use std::io::ErrorKind;

use crate::outcome::Outcome;

/// Where the VMM puts the file.
pub const ENV_PATH: &str = "/gracevm/env";
/// Overrides [`ENV_PATH`] (for running the suite by hand or on a host).
pub const ENV_PATH_OVERRIDE: &str = "GRACEVM_ENV_FILE";

/// Env keys the platform tests read.
pub const BOOT_MODE: &str = "GRACEVM_BOOT_MODE";
pub const CARVEOUTS: &str = "GRACEVM_CARVEOUTS";
pub const NUMA_NODES: &str = "GRACEVM_NUMA_NODES";
pub const SYSTEM_RAM: &str = "GRACEVM_SYSTEM_RAM";
pub const TESTDEV: &str = "GRACEVM_TESTDEV";
pub const CPUS: &str = "GRACEVM_CPUS";

/// The parsed `/gracevm/env`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestEnv {
    /// Whether an env file was found at all (a guest booted without gracevm has none).
    pub present: bool,
    vars: BTreeMap<String, String>,
    /// Lines that were not understood, as `line N: why`.
    pub warnings: Vec<String>,
}

impl GuestEnv {
    /// Reads the env file; a missing file gives an empty, not-`present` env.
    pub fn load() -> GuestEnv {
        let path = std::env::var(ENV_PATH_OVERRIDE).unwrap_or_else(|_| ENV_PATH.to_string());
        match std::fs::read(&path) {
            Ok(bytes) => GuestEnv::parse(&String::from_utf8_lossy(&bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => GuestEnv::default(),
            Err(e) => GuestEnv {
                present: true,
                warnings: vec![format!("cannot read {path}: {e}")],
                ..GuestEnv::default()
            },
        }
    }

    /// Parses env-file text. Blank lines, `#` comments and an `export ` prefix are accepted;
    /// a quoted value may span lines. Malformed lines are skipped with a warning.
    pub fn parse(text: &str) -> GuestEnv {
        let mut env = GuestEnv {
            present: true,
            ..GuestEnv::default()
        };
        let mut lines = text.lines().enumerate();
        while let Some((index, line)) = lines.next() {
            let line_no = index + 1;
            let body = line.trim_end_matches('\r').trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let body = body.strip_prefix("export ").unwrap_or(body).trim_start();
            let Some((key, raw)) = body.split_once('=') else {
                env.warnings
                    .push(format!("line {line_no}: no '=' in {body:?}"));
                continue;
            };
            if !is_valid_key(key) {
                env.warnings
                    .push(format!("line {line_no}: invalid key {key:?}"));
                continue;
            }
            let mut raw = raw.to_string();
            let value = loop {
                match unquote(&raw) {
                    Ok(value) => break Some(value),
                    Err(Unquote::Unterminated) => match lines.next() {
                        Some((_, more)) => {
                            raw.push('\n');
                            raw.push_str(more.trim_end_matches('\r'));
                        }
                        None => {
                            env.warnings
                                .push(format!("line {line_no}: unterminated quote in {key}"));
                            break None;
                        }
                    },
                }
            };
            if let Some(value) = value {
                env.vars.insert(key.to_string(), value);
            }
        }
        env
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// Why the kernel under test must have `feature` (`GRACEVM_EXPECT` lists it; the reason is
    /// `GRACEVM_EXPECT_WHY`), or `None` when nobody said so.
    pub fn expects(&self, feature: &str) -> Option<String> {
        let listed = self
            .get("GRACEVM_EXPECT")?
            .split([' ', ','])
            .any(|f| f == feature);
        listed.then(|| {
            self.get("GRACEVM_EXPECT_WHY")
                .unwrap_or("--expect")
                .to_string()
        })
    }

    /// The value of `key`, or a `Skip` saying why the expectation is unavailable.
    pub fn require(&self, key: &str) -> Result<&str, Outcome> {
        if !self.present {
            return Err(Outcome::skip(format!(
                "no {ENV_PATH}: not booted by gracevm, so no {key} expectation"
            )));
        }
        self.get(key)
            .ok_or_else(|| Outcome::skip(format!("{key} not set in {ENV_PATH}")))
    }

    /// `GRACEVM_BOOT_MODE`: `Skip` when missing, `Fail` when neither `acpi` nor `dt`.
    pub fn boot_mode(&self) -> Result<BootMode, Outcome> {
        let text = self.require(BOOT_MODE)?;
        match text.trim().to_ascii_lowercase().as_str() {
            "acpi" => Ok(BootMode::Acpi),
            "dt" => Ok(BootMode::Dt),
            _ => Err(Outcome::fail(format!(
                "{BOOT_MODE}={text:?} in {ENV_PATH} is neither acpi nor dt"
            ))),
        }
    }

    /// The EGM carve-outs (`GRACEVM_CARVEOUTS`): `Skip` when the key is missing or empty (no
    /// carve-out to test), `Fail` when malformed.
    pub fn carveouts(&self) -> Result<Vec<Carveout>, Outcome> {
        let text = self.require(CARVEOUTS)?;
        let carveouts = parse_carveouts(text)
            .map_err(|why| Outcome::fail(format!("{CARVEOUTS} in {ENV_PATH}: {why}")))?;
        if carveouts.is_empty() {
            return Err(Outcome::skip(
                "platform has no EGM carve-out (GRACEVM_CARVEOUTS is empty)",
            ));
        }
        Ok(carveouts)
    }

    /// An integer expectation (decimal or `0x` hex): `Skip` when missing, `Fail` when
    /// malformed (the VMM wrote something wrong).
    pub fn require_u64(&self, key: &str) -> Result<u64, Outcome> {
        let text = self.require(key)?;
        parse_u64(text)
            .ok_or_else(|| Outcome::fail(format!("{key}={text:?} in {ENV_PATH} is not a number")))
    }
}

/// Which firmware interface the VMM booted the guest with (`GRACEVM_BOOT_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// EFI hand-off (system table + memory map in `/chosen`) with ACPI tables.
    Acpi,
    /// A full device tree, no EFI.
    Dt,
}

impl std::fmt::Display for BootMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootMode::Acpi => "acpi",
            BootMode::Dt => "dt",
        })
    }
}

/// An EGM carve-out the VMM placed (one entry of `GRACEVM_CARVEOUTS`): guest physical
/// `[base, base + size)`, in no memory map, filled at boot with `seed ^ offset` in every u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carveout {
    /// `nvidia,egm-pxm`, the proximity domain the EGM driver names `/dev/egm<pxm>` after.
    pub pxm: u32,
    pub base: u64,
    pub size: u64,
    pub seed: u64,
}

impl Carveout {
    /// Exclusive end (cannot overflow: checked when parsed).
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// The boot-time fill: the u64 at byte `offset` from `base`.
    pub fn pattern_word(&self, offset: u64) -> u64 {
        gracevm_contract::testdev::pattern_word(self.seed, offset)
    }

    /// Whether `[start, end)` (exclusive end) shares a byte with the carve-out.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end() && self.base < end
    }
}

impl std::fmt::Display for Carveout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "carve-out pxm {} [{:#x}-{:#x}]",
            self.pxm,
            self.base,
            self.end() - 1
        )
    }
}

/// Parses `GRACEVM_CARVEOUTS`: entries `pxm:base:size:seed` separated by whitespace (or
/// commas); each number decimal or `0x` hex. Empty text is no carve-out. Every entry must be
/// 8-byte aligned, non-empty and below 2^64.
pub fn parse_carveouts(text: &str) -> Result<Vec<Carveout>, String> {
    let mut carveouts = Vec::new();
    for entry in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|entry| !entry.is_empty())
    {
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
        carveouts.push(carveout);
    }
    Ok(carveouts)
}

/// Parses a decimal or `0x`-prefixed hexadecimal number, allowing surrounding whitespace.
pub fn parse_u64(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn is_valid_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[derive(Debug, PartialEq, Eq)]
enum Unquote {
    /// A quote or trailing backslash is still open: the value continues on the next line.
    Unterminated,
}

/// Removes one level of shell quoting: `'...'` literal, `"..."` with `\"`, `\\`, `\$`, `` \` ``
/// escapes, and `\x` outside quotes.
fn unquote(raw: &str) -> Result<String, Unquote> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err(Unquote::Unterminated),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                        None => return Err(Unquote::Unterminated),
                    },
                    Some(c) => out.push(c),
                    None => return Err(Unquote::Unterminated),
                }
            },
            '\\' => match chars.next() {
                Some(c) => out.push(c),
                None => return Err(Unquote::Unterminated),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_plain_and_quoted_values_strips_one_level() {
        let env = GuestEnv::parse(
            "GRACEVM_MODE=test\n\
             GRACEVM_CPUS='4'\n\
             GRACEVM_SYSTEM_RAM=536870912\n\
             GRACEVM_CMD='echo hi; cat /proc/cpuinfo | head -3'\n",
        );
        assert!(env.present);
        assert_eq!(env.get("GRACEVM_MODE"), Some("test"));
        assert_eq!(env.get("GRACEVM_CPUS"), Some("4"));
        assert_eq!(env.get("GRACEVM_SYSTEM_RAM"), Some("536870912"));
        assert_eq!(
            env.get("GRACEVM_CMD"),
            Some("echo hi; cat /proc/cpuinfo | head -3")
        );
        assert!(env.warnings.is_empty());
    }

    #[test]
    fn test_parse_embedded_quote_shell_style_decodes() {
        let env = GuestEnv::parse("GRACEVM_CMD='echo '\\''hi there'\\'''\n");
        assert_eq!(env.get("GRACEVM_CMD"), Some("echo 'hi there'"));
    }

    #[test]
    fn test_parse_double_quotes_and_escapes_decode() {
        let env = GuestEnv::parse("A=\"x \\\"y\\\" \\$z\"\nB=a\\ b\n");
        assert_eq!(env.get("A"), Some("x \"y\" $z"));
        assert_eq!(env.get("B"), Some("a b"));
    }

    #[test]
    fn test_parse_multiline_quoted_value_joins_lines() {
        let env = GuestEnv::parse("GRACEVM_CMD='echo a\necho b'\nGRACEVM_MODE=run\n");
        assert_eq!(env.get("GRACEVM_CMD"), Some("echo a\necho b"));
        assert_eq!(env.get("GRACEVM_MODE"), Some("run"));
    }

    #[test]
    fn test_parse_comments_blanks_export_crlf_accepted() {
        let env = GuestEnv::parse("# made by gracevm\n\n  export GRACEVM_CPUS=2\r\nEMPTY=\n");
        assert_eq!(env.get("GRACEVM_CPUS"), Some("2"));
        assert_eq!(env.get("EMPTY"), Some(""));
        assert!(env.warnings.is_empty());
    }

    #[test]
    fn test_parse_malformed_lines_warn_and_skip() {
        let env = GuestEnv::parse("garbage\n1BAD=x\nGOOD=1\nOPEN='never closed\n");
        assert_eq!(env.get("GOOD"), Some("1"));
        assert_eq!(env.get("OPEN"), None);
        assert_eq!(env.warnings.len(), 3, "{:?}", env.warnings);
        assert!(env.warnings[0].starts_with("line 1:"));
        assert!(env.warnings[1].starts_with("line 2:"));
        assert!(env.warnings[2].starts_with("line 4:"));
    }

    #[test]
    fn test_parse_later_key_overrides_earlier() {
        let env = GuestEnv::parse("GRACEVM_CPUS=1\nGRACEVM_CPUS=3\n");
        assert_eq!(env.get("GRACEVM_CPUS"), Some("3"));
    }

    #[test]
    fn test_require_missing_key_skips_never_passes() {
        let env = GuestEnv::parse("GRACEVM_MODE=test\n");
        assert!(matches!(env.require("GRACEVM_CPUS"), Err(Outcome::Skip(_))));
        let absent = GuestEnv::default();
        assert!(matches!(
            absent.require_u64("GRACEVM_CPUS"),
            Err(Outcome::Skip(_))
        ));
    }

    #[test]
    fn test_parse_carveouts_two_entries_hex_and_decimal() {
        let carveouts = parse_carveouts(
            " 4:0x8000000000:0x40000000:0x6772616365000004\n5:0x9000000000:1073741824:7 ",
        )
        .unwrap();
        assert_eq!(
            carveouts,
            vec![
                Carveout {
                    pxm: 4,
                    base: 0x80_0000_0000,
                    size: 0x4000_0000,
                    seed: 0x6772_6163_6500_0004
                },
                Carveout {
                    pxm: 5,
                    base: 0x90_0000_0000,
                    size: 1 << 30,
                    seed: 7
                },
            ]
        );
        assert_eq!(carveouts[0].end(), 0x80_4000_0000);
        assert_eq!(carveouts[0].pattern_word(0x10), 0x6772_6163_6500_0014);
        assert!(parse_carveouts("a:1:8:0,b").unwrap_err().contains("pxm"));
        assert_eq!(parse_carveouts("  \n").unwrap(), vec![]);
        assert_eq!(
            parse_carveouts("4:0x0:0x8:0x0,5:0x8:0x8:0x1")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn test_parse_carveouts_malformed_entries_error() {
        for bad in [
            "4:0x8000000000:0x40000000",
            "4:0x8000000000:0x40000000:0x1:9",
            "4:0x8000000000:0:0x1",
            "4:0x8000000004:0x40000000:0x1",
            "4:0x8000000000:0x40000004:0x1",
            "4:0xffffffffffffff00:0x200:0x1",
            "4:0x8000000000:0x40000000:0x677261636500000004",
            "0x100000000:0x0:0x8:0x0",
            "4:0x80zz:0x8:0x0",
        ] {
            assert!(parse_carveouts(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_carveouts_empty_or_missing_skips_malformed_fails() {
        let empty = GuestEnv::parse("GRACEVM_CARVEOUTS=''\n");
        assert!(matches!(empty.carveouts(), Err(Outcome::Skip(why)) if why.contains("no EGM")));
        let missing = GuestEnv::parse("GRACEVM_MODE=test\n");
        assert!(matches!(missing.carveouts(), Err(Outcome::Skip(_))));
        let bad = GuestEnv::parse("GRACEVM_CARVEOUTS=4:0x1000\n");
        assert!(matches!(bad.carveouts(), Err(Outcome::Fail(_))));
        let good = GuestEnv::parse("GRACEVM_CARVEOUTS='4:0x8000000000:0x40000000:0x5'\n");
        assert_eq!(good.carveouts().unwrap().len(), 1);
    }

    #[test]
    fn test_carveout_overlaps_half_open_ranges() {
        let c = Carveout {
            pxm: 4,
            base: 0x1000,
            size: 0x1000,
            seed: 0,
        };
        assert!(c.overlaps(0x1fff, 0x3000));
        assert!(c.overlaps(0x0, 0x1001));
        assert!(c.overlaps(0x1800, 0x1808));
        assert!(!c.overlaps(0x2000, 0x3000));
        assert!(!c.overlaps(0x0, 0x1000));
    }

    #[test]
    fn test_boot_mode_values() {
        let mode = |text: &str| GuestEnv::parse(&format!("GRACEVM_BOOT_MODE={text}\n")).boot_mode();
        assert_eq!(mode("acpi"), Ok(BootMode::Acpi));
        assert_eq!(mode("DT"), Ok(BootMode::Dt));
        assert!(matches!(mode("uefi"), Err(Outcome::Fail(_))));
        assert!(matches!(
            GuestEnv::default().boot_mode(),
            Err(Outcome::Skip(_))
        ));
    }

    #[test]
    fn test_require_u64_malformed_fails_hex_accepted() {
        let env = GuestEnv::parse("A=abc\nB=0x20000000\nC=' 12 '\n");
        assert!(matches!(env.require_u64("A"), Err(Outcome::Fail(_))));
        assert_eq!(env.require_u64("B"), Ok(0x2000_0000));
        assert_eq!(env.require_u64("C"), Ok(12));
    }
}
