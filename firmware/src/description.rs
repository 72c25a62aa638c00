//! The platform description: what machine gracevm models, as a user writes it in TOML.
//!
//! ```toml
//! vcpus = 2
//! boot = "dt"
//!
//! [[socket]]
//! ram = "1G"
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use crate::layout::{self, GIB, KIB, MIB};
use crate::Error;

/// How the kernel learns about the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// A device tree with every device in it.
    #[default]
    Dt,
    /// The firmware-less EFI hand-off with ACPI tables, as on real Grace.
    Acpi,
}

impl fmt::Display for BootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootMode::Dt => "dt",
            BootMode::Acpi => "acpi",
        })
    }
}

/// A byte count written as an integer or as a string with a binary suffix ("512M", "4G").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
            Some(i) => s.split_at(i),
            None => (s, ""),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("'{s}' is not a size (examples: 4096, 512M, 4G)"))?;
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

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
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

/// One CPU socket: its DRAM visible to the host kernel.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Socket {
    /// RAM listed in the memory map for this socket.
    pub ram: Size,
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
}

fn default_vcpus() -> u32 {
    1
}

fn default_sockets() -> Vec<Socket> {
    vec![Socket { ram: Size(GIB) }]
}

impl Default for Platform {
    fn default() -> Self {
        Platform {
            vcpus: default_vcpus(),
            boot: BootMode::default(),
            sockets: default_sockets(),
        }
    }
}

impl Platform {
    /// Parse and validate a TOML description; `origin` names it in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, Error> {
        let p: Platform = toml::from_str(text).map_err(|e| Error::Description {
            origin: origin.to_string(),
            msg: e.to_string(),
        })?;
        p.validate().map_err(|msg| Error::Description {
            origin: origin.to_string(),
            msg,
        })?;
        Ok(p)
    }

    /// Check what the TOML grammar cannot: counts, sizes, what fits in the memory map.
    pub fn validate(&self) -> Result<(), String> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(format!(
                "vcpus = {}: must be between 1 and {} (the GIC redistributor space)",
                self.vcpus,
                layout::MAX_VCPUS
            ));
        }
        if self.sockets.len() != 1 {
            return Err(format!(
                "{} sockets described: this version of gracevm models exactly one [[socket]]",
                self.sockets.len()
            ));
        }
        let ram = self.sockets[0].ram;
        if ram.0 < layout::MIN_RAM || ram.0 % (2 * MIB) != 0 {
            return Err(format!(
                "socket 0 ram = {ram}: must be a multiple of 2M and at least {}",
                Size(layout::MIN_RAM)
            ));
        }
        Ok(())
    }

    /// RAM of socket 0, the socket that holds the boot images.
    pub fn boot_ram(&self) -> u64 {
        self.sockets[0].ram.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_size_suffixes_parse() {
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert_eq!("512M".parse::<Size>().unwrap(), Size(512 * MIB));
        assert_eq!("4GiB".parse::<Size>().unwrap(), Size(4 * GIB));
        assert_eq!("2g".parse::<Size>().unwrap(), Size(2 * GIB));
        assert!("12X".parse::<Size>().is_err());
        assert!("M".parse::<Size>().is_err());
        assert!("99999999999T".parse::<Size>().is_err());
    }

    #[test]
    fn test_size_display_round_trips() {
        for s in ["512M", "4G", "3K", "1T", "1000"] {
            assert_eq!(s.parse::<Size>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn test_description_defaults_valid() {
        let p = Platform::from_toml("", "empty").unwrap();
        assert_eq!(p, Platform::default());
    }

    #[test]
    fn test_description_unknown_key_rejected_with_name() {
        let e = Platform::from_toml("vcpu = 2", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.toml") && e.contains("vcpu"), "{e}");
    }

    #[test]
    fn test_description_bad_values_rejected() {
        for (text, needle) in [
            ("vcpus = 0", "vcpus = 0"),
            ("vcpus = 1000", "vcpus = 1000"),
            ("[[socket]]\nram = \"1M\"", "ram = 1M"),
            ("[[socket]]\nram = \"65M\"", "multiple of 2M"),
            ("boot = \"uefi\"", "uefi"),
        ] {
            let e = Platform::from_toml(text, "t").unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
