//! The platform's devices as the memory map describes them, assembled without KVM so the
//! wiring is tested on any host: the PCIe host bridge with one GPU function per `[[gpu]]`.

use std::sync::Arc;

use anyhow::Result;

use firmware::layout;
use firmware::MemoryMap;
use gracevm_contract::gpu::Style;

use crate::devices::pci::{GpuConfig, GpuFunction, PciHost, PciRoot, PciWindows, SystemClock};

/// How `g` tells the driver about the MIG bug: Blackwell parts carry the NVIDIA DVSEC with the
/// "no MIG bug" bit, Hopper ones none.
pub fn gpu_style(g: &firmware::GpuFunction) -> Style {
    Style::of_device(g.device_id)
}

/// How the GPU function of `g` behaves.
pub fn gpu_config(g: &firmware::GpuFunction) -> GpuConfig {
    GpuConfig {
        device_id: g.device_id,
        blackwell_dvsec: gpu_style(g) == Style::Blackwell,
        readiness: g.readiness,
    }
}

/// The host bridge, when the platform has GPUs (firmware describes PCI only then).
pub fn pci_host(map: &MemoryMap) -> Result<Option<PciHost>> {
    if map.gpus.is_empty() {
        return Ok(None);
    }
    let mut root = PciRoot::new(PciWindows {
        ecam_base: layout::PCI_ECAM_BASE,
        ecam_size: layout::PCI_ECAM_SIZE,
        mmio32: (layout::PCI_MMIO32_BASE, layout::PCI_MMIO32_SIZE),
        mmio64: (layout::PCI_MMIO64_BASE, layout::PCI_MMIO64_SIZE),
    })?;
    let clock = Arc::new(SystemClock);
    for g in &map.gpus {
        root.add_function(
            g.device,
            Box::new(GpuFunction::new(gpu_config(g), clock.clone())),
        )?;
    }
    Ok(Some(PciHost::new(root)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::MmioBus;
    use firmware::Platform;

    fn ecam_read32(bus: &MmioBus, device: u8, reg: u64) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(
            layout::PCI_ECAM_BASE + (u64::from(device) << 15) + reg,
            &mut d
        ));
        u32::from_le_bytes(d)
    }

    #[test]
    fn test_pci_host_default_platform_exposes_gb200_at_its_device() {
        let r = Platform::default().resolve().unwrap();
        let map = r.map();
        let host = pci_host(map).unwrap().expect("default platform has a GPU");
        let mut bus = MmioBus::new();
        for w in host.mmio_windows() {
            bus.insert(w.base, w.len, w.device).unwrap();
        }
        let g = &map.gpus[0];
        assert_eq!(ecam_read32(&bus, g.device, 0), 0x2941_10de);
        // An empty slot reads all-ones.
        assert_eq!(ecam_read32(&bus, g.device + 1, 0), 0xffff_ffff);
    }

    #[test]
    fn test_pci_host_absent_without_gpus() {
        assert!(pci_host(Platform::minimal().resolve().unwrap().map())
            .unwrap()
            .is_none());
    }

    #[test]
    fn test_gpu_config_blackwell_and_readiness_mapping() {
        let mut map = Platform::default().resolve().unwrap().map().clone();
        let g = &mut map.gpus[0];
        assert!(gpu_config(g).blackwell_dvsec);
        g.device_id = 0x2342;
        g.readiness = firmware::Readiness::DelayMs(5);
        let c = gpu_config(g);
        assert!(!c.blackwell_dvsec);
        assert_eq!(c.readiness, firmware::Readiness::DelayMs(5));
    }
}
