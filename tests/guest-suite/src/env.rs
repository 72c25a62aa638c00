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

    /// An integer expectation (decimal or `0x` hex): `Skip` when missing, `Fail` when
    /// malformed (the VMM wrote something wrong).
    pub fn require_u64(&self, key: &str) -> Result<u64, Outcome> {
        let text = self.require(key)?;
        parse_u64(text)
            .ok_or_else(|| Outcome::fail(format!("{key}={text:?} in {ENV_PATH} is not a number")))
    }
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
    fn test_require_u64_malformed_fails_hex_accepted() {
        let env = GuestEnv::parse("A=abc\nB=0x20000000\nC=' 12 '\n");
        assert!(matches!(env.require_u64("A"), Err(Outcome::Fail(_))));
        assert_eq!(env.require_u64("B"), Ok(0x2000_0000));
        assert_eq!(env.require_u64("C"), Ok(12));
    }
}
