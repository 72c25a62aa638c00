//! The running kernel's configuration, from /proc/config.gz (`CONFIG_IKCONFIG_PROC`).
//!
//! Tests that need a kernel feature call [`kernel_has`] or [`require_kernel`] and SKIP on
//! kernels without it. The file is gzip; busybox `zcat` decompresses it.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::outcome::Outcome;

pub const CONFIG_GZ: &str = "/proc/config.gz";

/// Parsed `.config` text: option name (with `CONFIG_`) to value; `# CONFIG_X is not set` is `n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    options: BTreeMap<String, String>,
}

/// Why the configuration is unavailable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The kernel has no /proc/config.gz.
    Absent,
    /// /proc/config.gz exists but could not be read or decompressed.
    Unreadable(String),
}

impl KernelConfig {
    pub fn parse(text: &str) -> KernelConfig {
        let mut options = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line
                .strip_prefix("# ")
                .and_then(|rest| rest.strip_suffix(" is not set"))
            {
                if name.starts_with("CONFIG_") {
                    options.insert(name.to_string(), "n".to_string());
                }
            } else if let Some((name, value)) = line.split_once('=') {
                if name.starts_with("CONFIG_") {
                    let value = value.trim_matches('"');
                    options.insert(name.to_string(), value.to_string());
                }
            }
        }
        KernelConfig { options }
    }

    /// The value of `option` (with or without `CONFIG_`); `n` when `is not set`, `None` when
    /// the option does not appear at all (unknown to this kernel or hidden by dependencies).
    pub fn value(&self, option: &str) -> Option<&str> {
        self.options.get(&full_name(option)).map(String::as_str)
    }

    /// Whether `option` is built in or a module.
    pub fn has(&self, option: &str) -> bool {
        matches!(self.value(option), Some("y" | "m"))
    }

    pub fn len(&self) -> usize {
        self.options.len()
    }

    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }
}

/// `CONFIG_`-prefixed option name.
pub fn full_name(option: &str) -> String {
    if option.starts_with("CONFIG_") {
        option.to_string()
    } else {
        format!("CONFIG_{option}")
    }
}

/// Reads and decompresses /proc/config.gz (no caching; see [`kernel_config`]).
pub fn load() -> Result<KernelConfig, Unavailable> {
    if !std::path::Path::new(CONFIG_GZ).exists() {
        return Err(Unavailable::Absent);
    }
    let decompressors: [&[&str]; 3] = [
        &["zcat", CONFIG_GZ],
        &["/bin/busybox", "zcat", CONFIG_GZ],
        &["gzip", "-dc", CONFIG_GZ],
    ];
    let mut errors = Vec::new();
    for argv in decompressors {
        let output = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match output {
            Ok(output) if output.status.success() && !output.stdout.is_empty() => {
                let config = KernelConfig::parse(&String::from_utf8_lossy(&output.stdout));
                if config.is_empty() {
                    return Err(Unavailable::Unreadable(format!(
                        "{} gave no CONFIG_ lines",
                        argv.join(" ")
                    )));
                }
                return Ok(config);
            }
            Ok(output) => errors.push(format!(
                "{}: {}: {}",
                argv.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => errors.push(format!("{}: {e}", argv[0])),
        }
    }
    Err(Unavailable::Unreadable(format!(
        "cannot decompress {CONFIG_GZ}: {}",
        errors.join("; ")
    )))
}

/// The running kernel's configuration, read once per process.
pub fn kernel_config() -> Result<&'static KernelConfig, Unavailable> {
    static CONFIG: OnceLock<Result<KernelConfig, Unavailable>> = OnceLock::new();
    CONFIG.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether the running kernel has `option` (`y` or `m`); `None` when its configuration is
/// unavailable.
pub fn kernel_has(option: &str) -> Option<bool> {
    kernel_config().ok().map(|config| config.has(option))
}

/// `Ok` when the running kernel has `option`, otherwise the `Skip` a test should report.
pub fn require_kernel(option: &str) -> Result<(), Outcome> {
    match kernel_has(option) {
        Some(true) => Ok(()),
        Some(false) => Err(Outcome::skip(format!(
            "kernel built without {}",
            full_name(option)
        ))),
        None => Err(Outcome::skip(format!(
            "kernel config unavailable ({CONFIG_GZ}), cannot tell whether {} is set",
            full_name(option)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_CC_VERSION_TEXT=\"aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0\"
CONFIG_DEVMEM=y
# CONFIG_STRICT_DEVMEM is not set
CONFIG_VFIO_PCI=m
CONFIG_NR_CPUS=16
";

    #[test]
    fn test_parse_values_and_not_set() {
        let config = KernelConfig::parse(CONFIG);
        assert_eq!(config.len(), 5);
        assert_eq!(config.value("DEVMEM"), Some("y"));
        assert_eq!(config.value("CONFIG_STRICT_DEVMEM"), Some("n"));
        assert_eq!(config.value("NR_CPUS"), Some("16"));
        assert_eq!(
            config.value("CC_VERSION_TEXT"),
            Some("aarch64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0")
        );
        assert_eq!(config.value("NVGRACE_EGM"), None);
    }

    #[test]
    fn test_has_builtin_and_module_true_else_false() {
        let config = KernelConfig::parse(CONFIG);
        assert!(config.has("DEVMEM"));
        assert!(config.has("CONFIG_VFIO_PCI"));
        assert!(!config.has("STRICT_DEVMEM"));
        assert!(!config.has("NVGRACE_EGM"));
        assert!(!config.has("NR_CPUS"));
    }

    #[test]
    fn test_parse_comment_lines_ignored() {
        let config = KernelConfig::parse("# General setup\n# FOO is not set\n");
        assert!(config.is_empty());
    }
}
