//! The expectations the VMM hands the guest in `/gracevm/env`.
//!
//! The file's format, its keys and its typed values are the contract's
//! ([`gracevm_contract::env`]): `/init` sources the file with the shell, the suite parses it
//! with the contract's parser (the same quoting rules) and turns what is missing into SKIP
//! and what is malformed into FAIL here.

use std::io::ErrorKind;

use gracevm_contract::env::{key, Vars};
pub use gracevm_contract::env::{parse_u64, BootMode, Carveout, PATH as ENV_PATH};

use crate::outcome::Outcome;

/// Overrides [`ENV_PATH`] (for running the suite by hand or on a host).
pub const ENV_PATH_OVERRIDE: &str = "GRACEVM_ENV_FILE";

/// Env keys the platform tests read.
pub use key::{BOOT_MODE, CARVEOUTS, CPUS, NUMA_NODES, SYSTEM_RAM, TESTDEV};

/// The parsed `/gracevm/env`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GuestEnv {
    /// Whether an env file was found at all (a guest booted without gracevm has none).
    pub present: bool,
    vars: Vars,
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

    /// Parses env-file text ([`Vars::parse`]): malformed lines are skipped with a warning.
    pub fn parse(text: &str) -> GuestEnv {
        let mut vars = Vars::parse(text);
        GuestEnv {
            present: true,
            warnings: std::mem::take(&mut vars.warnings),
            vars,
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key)
    }

    /// Why the kernel under test must have `feature` (`GRACEVM_EXPECT` lists it; the reason is
    /// `GRACEVM_EXPECT_WHY`), or `None` when nobody said so.
    pub fn expects(&self, feature: &str) -> Option<String> {
        let listed = self
            .get(key::EXPECT)?
            .split([' ', ','])
            .any(|f| f == feature);
        listed.then(|| self.get(key::EXPECT_WHY).unwrap_or("--expect").to_string())
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

    /// The value of `key` parsed by `parse`: `Skip` when missing, `Fail` (naming the key)
    /// when malformed.
    pub fn require_parsed<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, Outcome> {
        parse(self.require(key)?)
            .map_err(|why| Outcome::fail(format!("{key} in {ENV_PATH}: {why}")))
    }

    /// `GRACEVM_BOOT_MODE`: `Skip` when missing, `Fail` when neither `acpi` nor `dt`.
    pub fn boot_mode(&self) -> Result<BootMode, Outcome> {
        let text = self.require(BOOT_MODE)?;
        BootMode::parse(text).ok_or_else(|| {
            Outcome::fail(format!(
                "{BOOT_MODE}={text:?} in {ENV_PATH} is neither acpi nor dt"
            ))
        })
    }

    /// The EGM carve-outs (`GRACEVM_CARVEOUTS`): `Skip` when the key is missing or empty (no
    /// carve-out to test), `Fail` when malformed.
    pub fn carveouts(&self) -> Result<Vec<Carveout>, Outcome> {
        let carveouts = self.require_parsed(CARVEOUTS, Carveout::parse_list)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    // The file's syntax and the values' formats are tested with the contract; here: what is
    // missing skips and what is malformed fails.

    #[test]
    fn test_parse_keeps_values_and_warnings() {
        let env = GuestEnv::parse("GRACEVM_CMD='echo '\\''hi'\\'''\ngarbage\n");
        assert!(env.present);
        assert_eq!(env.get("GRACEVM_CMD"), Some("echo 'hi'"));
        assert_eq!(env.warnings.len(), 1, "{:?}", env.warnings);
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
