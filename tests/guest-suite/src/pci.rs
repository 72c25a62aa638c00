//! A PCI function as sysfs shows it (`/sys/bus/pci/devices/<BDF>`): identity, the bound
//! driver, `driver_override` binding, its IOMMU group.

use std::io::Write;
use std::path::{Path, PathBuf};

pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
pub const PCI_DRIVERS: &str = "/sys/bus/pci/drivers";
/// Writing a BDF here makes the PCI core try to bind a driver to it.
pub const DRIVERS_PROBE: &str = "/sys/bus/pci/drivers_probe";

/// Writes `text` to a sysfs attribute in one `write` (no create, no truncate).
pub fn write_attr(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(text.as_bytes())
}

/// Whether a PCI driver called `name` is registered.
pub fn driver_registered(name: &str) -> bool {
    Path::new(PCI_DRIVERS).join(name).is_dir()
}

/// One PCI function by its BDF (`0000:00:01.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    pub bdf: String,
}

impl PciDevice {
    pub fn new(bdf: &str) -> PciDevice {
        PciDevice {
            bdf: bdf.to_string(),
        }
    }

    /// `/sys/bus/pci/devices/<BDF>`.
    pub fn dir(&self) -> PathBuf {
        Path::new(PCI_DEVICES).join(&self.bdf)
    }

    pub fn exists(&self) -> bool {
        self.dir().exists()
    }

    /// An attribute's text, trimmed.
    pub fn attr(&self, name: &str) -> Result<String, String> {
        let path = self.dir().join(name);
        std::fs::read_to_string(&path)
            .map(|text| text.trim().to_string())
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    /// A hex attribute (`vendor`, `device`, `class`: `0x10de`).
    pub fn hex_attr(&self, name: &str) -> Result<u64, String> {
        let text = self.attr(name)?;
        crate::env::parse_u64(&text)
            .ok_or_else(|| format!("{}/{name}: {text:?} is not a number", self.dir().display()))
    }

    /// The bound driver's name (the `driver` link's target), `None` when unbound.
    pub fn driver(&self) -> Option<String> {
        let target = std::fs::read_link(self.dir().join("driver")).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// `driver_override`: `None` when unset (the kernel shows `(null)`).
    pub fn driver_override(&self) -> Result<Option<String>, String> {
        let text = self.attr("driver_override")?;
        Ok((!text.is_empty() && text != "(null)").then_some(text))
    }

    pub fn set_driver_override(&self, driver: &str) -> Result<(), String> {
        let path = self.dir().join("driver_override");
        write_attr(&path, driver).map_err(|e| format!("echo {driver} > {}: {e}", path.display()))
    }

    /// Asks the PCI core to bind a driver (`echo <BDF> > drivers_probe`); returns what the
    /// write returned (a failed probe may or may not show here).
    pub fn probe(&self) -> std::io::Result<()> {
        write_attr(Path::new(DRIVERS_PROBE), &self.bdf)
    }

    /// Binds `driver` through `driver_override` and `drivers_probe`. The result is the
    /// probe write's; whether the driver is bound is [`PciDevice::driver`]'s to say.
    pub fn bind_with_override(&self, driver: &str) -> Result<std::io::Result<()>, String> {
        self.set_driver_override(driver)?;
        Ok(self.probe())
    }

    /// The number of its IOMMU group (`iommu_group` -> `.../iommu_groups/N`), `None` when it
    /// has none.
    pub fn iommu_group(&self) -> Option<u32> {
        let target = std::fs::read_link(self.dir().join("iommu_group")).ok()?;
        target.file_name()?.to_str()?.parse().ok()
    }
}

/// Whether `text` is a PCI address `dddd:bb:dd.f` (as the env names GPUs).
pub use gracevm_contract::env::is_bdf;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_is_bdf_accepts_domain_bus_device_function() {
        assert!(is_bdf("0000:00:01.0"));
        assert!(is_bdf("0001:ff:1f.7"));
        for bad in [
            "00:01.0",
            "0000:00:01",
            "0000:00:20.0",
            "0000:00:01.8",
            "0000-00:01.0",
            "000g:00:01.0",
            "0000:00:01.0 ",
        ] {
            assert!(!is_bdf(bad), "{bad}");
        }
    }

    #[test]
    fn test_missing_device_reads_error_not_panic() {
        let dev = PciDevice::new("ffff:ff:1f.7");
        assert!(!dev.exists());
        assert_eq!(dev.driver(), None);
        assert_eq!(dev.iommu_group(), None);
        assert!(dev.hex_attr("vendor").unwrap_err().contains("ffff:ff:1f.7"));
    }
}
