//! The Grace GPU's PCI function, as much of it as the upstream nvgrace-gpu vfio driver needs.
//!
//! Configuration space ([`super::config`]): vendor 0x10de, the model's device id, class 0x0302
//! (3D controller), subsystem 0x10de / device id, a PCI Express endpoint capability, and one
//! BAR. With [`GpuConfig::blackwell_dvsec`] the extended space holds the NVIDIA vendor DVSEC
//! the driver uses to detect the MIG hardware-bug fix:
//!
//! | Offset | Field                                                    |
//! |--------|----------------------------------------------------------|
//! | 0x100  | extended cap header: id 0x0023 (DVSEC), version 1, last   |
//! | 0x104  | DVSEC header 1: vendor 0x10de, revision 0, length 0x10   |
//! | 0x108  | DVSEC header 2: DVSEC id 3                               |
//! | 0x10A  | 16-bit capability word: bit 0 = 1 ("no MIG bug")         |
//!
//! Without it (Hopper style) 0x100 reads 0: no extended capabilities. There are no
//! interrupts (interrupt pin 0) and no FLR.
//!
//! BAR0: a 16 MiB 32-bit non-prefetchable memory BAR holding the two readiness registers the
//! driver polls at probe:
//!
//! | BAR0 offset | Register                | Value                              |
//! |-------------|-------------------------|------------------------------------|
//! | 0x1498      | C2C link status         | 0xFF once ready, 0 before          |
//! | 0x200BC     | HBM training status     | 0xFF once ready, 0 before          |
//! | other       | -                       | 0; writes ignored (logged, debug)  |
//!
//! "Ready" follows [`Readiness`], measured on an injectable [`Clock`] from the function's
//! creation. Accesses of 1, 2, 4 or 8 bytes at naturally aligned offsets are served (a narrow
//! read returns the addressed bytes of the 32-bit registers); other sizes and unaligned offsets
//! are logged and ignored (reads 0). The GPU memory (nvgrace-gpu's BAR2/BAR4) is no BAR here:
//! the driver emulates those itself from the firmware-described memory aperture.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::{Bar, BarKind, ConfigSpace, FunctionIdentity};
use super::PciFunction;
use crate::devices::WarnLimiter;

const NAME: &str = "gpu";

/// NVIDIA's PCI vendor id.
pub const NVIDIA_VENDOR_ID: u16 = 0x10DE;
/// Device ids the nvgrace-gpu driver binds to.
pub const GH200_120GB_DEVICE_ID: u16 = 0x2342;
pub const GH200_480GB_DEVICE_ID: u16 = 0x2345;
pub const GH200_DEVICE_ID: u16 = 0x2348;
pub const GB200_DEVICE_ID: u16 = 0x2941;
pub const GB300_DEVICE_ID: u16 = 0x31C2;
/// Class code: display controller (0x03), 3D controller (0x02), prog-if 0.
pub const GPU_CLASS_CODE: u32 = 0x03_02_00;

/// Size of BAR0 (the driver needs at least 0x200C0 bytes).
pub const BAR0_SIZE: u64 = 16 << 20;
// The readiness registers and the readiness model are shared with the platform description
// and the in-guest suite.
pub use gracevm_contract::gpu::{Readiness, C2C_LINK_STATUS, HBM_TRAINING_STATUS, STATUS_READY};

/// Offset of the NVIDIA DVSEC when present (the only extended capability).
pub const NVIDIA_DVSEC_OFFSET: u16 = 0x100;
/// DVSEC id of NVIDIA's GPU capability DVSEC.
pub const NVIDIA_DVSEC_ID: u16 = 3;
/// DVSEC+0xA bit 0: MIG works with cached resmem (the Blackwell hardware-bug fix).
pub const DVSEC_MIG_BUG_FIXED: u16 = 1 << 0;

/// A source of monotonic time, injectable so tests and fuzzing need no sleeps.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (tests, fuzzing).
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    elapsed_ns: AtomicU64,
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ManualClock {
    /// A clock standing at an arbitrary instant.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
            elapsed_ns: AtomicU64::new(0),
        }
    }

    /// Moves the clock forward by `by` (saturating at about 584 years).
    pub fn advance(&self, by: Duration) {
        let ns = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update with a closure that always returns Some cannot fail.
        let _ = self
            .elapsed_ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(ns))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        let elapsed = Duration::from_nanos(self.elapsed_ns.load(Ordering::SeqCst));
        // At most ~584 years past `base`: far inside `Instant`'s range, so this never falls
        // back in practice.
        self.base.checked_add(elapsed).unwrap_or(self.base)
    }
}

/// How to build a [`GpuFunction`] (the model's description is parsed elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    /// PCI device id, e.g. [`GH200_DEVICE_ID`] or [`GB200_DEVICE_ID`].
    pub device_id: u16,
    /// Expose the NVIDIA DVSEC with the MIG-bug-fixed bit (Blackwell); Hopper has none.
    pub blackwell_dvsec: bool,
    pub readiness: Readiness,
}

/// The GPU's PCI function. See the module documentation.
pub struct GpuFunction {
    config: ConfigSpace,
    readiness: Readiness,
    clock: Arc<dyn Clock>,
    created: Instant,
    warn: WarnLimiter,
}

impl std::fmt::Debug for GpuFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuFunction")
            .field("config", &self.config)
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

impl GpuFunction {
    /// A GPU function created now (by `clock`), its BAR0 unassigned and decoding off.
    pub fn new(cfg: GpuConfig, clock: Arc<dyn Clock>) -> Self {
        let mut config = ConfigSpace::new(FunctionIdentity {
            vendor_id: NVIDIA_VENDOR_ID,
            device_id: cfg.device_id,
            revision_id: 0,
            class_code: GPU_CLASS_CODE,
            subsystem_vendor_id: NVIDIA_VENDOR_ID,
            subsystem_id: cfg.device_id,
        });
        let bar0 = Bar {
            size: BAR0_SIZE,
            kind: BarKind::Memory32,
            prefetchable: false,
        };
        config
            .add_bar(0, bar0)
            .expect("BAR0 is valid in an empty header");
        if cfg.blackwell_dvsec {
            let offset = config
                .add_dvsec(
                    NVIDIA_VENDOR_ID,
                    0,
                    NVIDIA_DVSEC_ID,
                    // The capability word, then padding to a 0x10-byte DVSEC.
                    &[DVSEC_MIG_BUG_FIXED.to_le_bytes(), [0; 2], [0; 2]].concat(),
                )
                .expect("the DVSEC fits in an empty extended space");
            debug_assert_eq!(offset, NVIDIA_DVSEC_OFFSET);
        }
        let created = clock.now();
        Self {
            config,
            readiness: cfg.readiness,
            clock,
            created,
            warn: WarnLimiter::default(),
        }
    }

    /// Whether the readiness registers read [`STATUS_READY`] now.
    pub fn is_ready(&self) -> bool {
        let elapsed = self.clock.now().saturating_duration_since(self.created);
        self.readiness.is_ready_after(elapsed)
    }

    /// The 32-bit BAR0 register at the 4-byte-aligned `offset`.
    fn bar0_reg(&self, offset: u64) -> u32 {
        match offset {
            C2C_LINK_STATUS | HBM_TRAINING_STATUS if self.is_ready() => STATUS_READY,
            _ => 0,
        }
    }

    /// Checks a BAR access; logs and returns false if it is refused.
    fn check(&mut self, op: &str, bar: usize, offset: u64, size: usize) -> bool {
        let problem = if bar != 0 {
            "access to a BAR the GPU does not implement"
        } else if !matches!(size, 1 | 2 | 4 | 8) {
            "unsupported access size"
        } else if offset % size as u64 != 0 {
            "unaligned offset"
        } else if offset >= BAR0_SIZE {
            "offset beyond BAR0"
        } else {
            return true;
        };
        self.warn.warn(
            NAME,
            format_args!("{problem}: {size}-byte {op} at BAR{bar} offset {offset:#x}"),
        );
        false
    }
}

impl PciFunction for GpuFunction {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.check("read", bar, offset, data.len()) {
            return;
        }
        // Aligned and within BAR0, so no byte index overflows.
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let reg = self.bar0_reg(at & !3);
            *byte = (reg >> (8 * (at & 3))) as u8;
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.check("write", bar, offset, data.len()) {
            log::debug!(
                "{NAME}: ignored {}-byte write to read-only BAR0 offset {offset:#x}",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{
        CAPABILITIES_POINTER, CAP_ID_PCIE, EXT_CAP_ID_DVSEC, EXT_CAP_START, REVISION_ID,
    };
    use super::*;
    use crate::devices::test_utils::SplitMix64;

    fn gpu(device_id: u16, blackwell_dvsec: bool, readiness: Readiness) -> GpuFunction {
        let cfg = GpuConfig {
            device_id,
            blackwell_dvsec,
            readiness,
        };
        GpuFunction::new(cfg, Arc::new(SystemClock))
    }

    fn gpu_on(clock: &Arc<ManualClock>, readiness: Readiness) -> GpuFunction {
        let cfg = GpuConfig {
            device_id: GB200_DEVICE_ID,
            blackwell_dvsec: true,
            readiness,
        };
        GpuFunction::new(cfg, clock.clone())
    }

    fn bar_read32(g: &mut GpuFunction, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        g.bar_read(0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn cfg_read(g: &mut GpuFunction, offset: u16, size: usize) -> u32 {
        let mut data = vec![0u8; size];
        g.config_read(u64::from(offset), &mut data);
        data.iter()
            .rev()
            .fold(0, |acc, &b| (acc << 8) | u32::from(b))
    }

    #[test]
    fn test_gpu_config_identity_matches_driver_table() {
        for id in [
            GH200_120GB_DEVICE_ID,
            GH200_480GB_DEVICE_ID,
            GH200_DEVICE_ID,
            GB200_DEVICE_ID,
            GB300_DEVICE_ID,
        ] {
            // Arrange
            let mut g = gpu(id, false, Readiness::Ready);
            // Act
            let ids = cfg_read(&mut g, 0, 4);
            let class = cfg_read(&mut g, REVISION_ID, 4) >> 8;
            let header = cfg_read(&mut g, 0x0E, 1);
            // Assert
            assert_eq!(ids, u32::from(id) << 16 | 0x10DE);
            assert_eq!(class, 0x03_02_00);
            assert_eq!(header, 0);
        }
    }

    #[test]
    fn test_gpu_bar0_sizing_is_16mib_32bit_non_prefetchable() {
        // Arrange
        let mut g = gpu(GH200_DEVICE_ID, false, Readiness::Ready);
        // Act
        g.config_write(0x10, &u32::MAX.to_le_bytes());
        let mask = cfg_read(&mut g, 0x10, 4);
        let others: Vec<u32> = (1..6).map(|i| cfg_read(&mut g, 0x10 + 4 * i, 4)).collect();
        // Assert
        assert_eq!(mask, 0xFF00_0000);
        assert_eq!(others, [0; 5]);
    }

    #[test]
    fn test_gpu_pcie_capability_found_from_0x34() {
        // Arrange
        let mut g = gpu(GH200_DEVICE_ID, false, Readiness::Ready);
        // Act
        let first = cfg_read(&mut g, CAPABILITIES_POINTER, 1) as u16;
        let id = cfg_read(&mut g, first, 1);
        let next = cfg_read(&mut g, first + 1, 1);
        // Assert
        assert_eq!(cfg_read(&mut g, 0x06, 2) & 0x10, 0x10, "CAP_LIST");
        assert_eq!(id, u32::from(CAP_ID_PCIE));
        assert_eq!(next, 0);
    }

    #[test]
    fn test_gpu_blackwell_dvsec_walk_finds_id3_with_bit0() {
        // Arrange
        let mut g = gpu(GB200_DEVICE_ID, true, Readiness::Ready);
        // Act: walk the extended list through config reads, as Linux does.
        let mut ptr = EXT_CAP_START;
        let mut found = None;
        for _ in 0..16 {
            let header = cfg_read(&mut g, ptr, 4);
            if header & 0xFFFF == u32::from(EXT_CAP_ID_DVSEC) {
                let vendor = cfg_read(&mut g, ptr + 4, 2);
                let id = cfg_read(&mut g, ptr + 8, 2);
                if vendor == 0x10DE && id == 3 {
                    found = Some(ptr);
                    break;
                }
            }
            ptr = (header >> 20) as u16;
            if ptr == 0 {
                break;
            }
        }
        // Assert
        let dvsec = found.expect("NVIDIA DVSEC id 3");
        assert_eq!(dvsec, NVIDIA_DVSEC_OFFSET);
        assert_eq!(cfg_read(&mut g, dvsec + 4, 4) >> 20, 0x10, "DVSEC length");
        assert_eq!(
            cfg_read(&mut g, dvsec, 4) >> 20,
            0,
            "last extended capability"
        );
        assert_eq!(cfg_read(&mut g, dvsec + 0xA, 2) & 1, 1);
    }

    #[test]
    fn test_gpu_hopper_has_no_extended_capabilities() {
        // Arrange
        let mut g = gpu(GH200_DEVICE_ID, false, Readiness::Ready);
        // Act
        let header = cfg_read(&mut g, EXT_CAP_START, 4);
        // Assert
        assert_eq!(header, 0);
        assert_eq!(g.config().find_extended_capability(EXT_CAP_ID_DVSEC), None);
    }

    #[test]
    fn test_gpu_readiness_ready_reads_ff() {
        // Arrange
        let mut g = gpu(GB200_DEVICE_ID, true, Readiness::Ready);
        // Act / Assert
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0xFF);
        assert_eq!(bar_read32(&mut g, HBM_TRAINING_STATUS), 0xFF);
        assert_eq!(bar_read32(&mut g, 0x1494), 0);
        assert_eq!(bar_read32(&mut g, 0x200B8), 0);
    }

    #[test]
    fn test_gpu_readiness_after_ms_flips_at_deadline() {
        // Arrange
        let clock = Arc::new(ManualClock::new());
        let mut g = gpu_on(&clock, Readiness::DelayMs(1500));
        // Act / Assert
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0);
        assert_eq!(bar_read32(&mut g, HBM_TRAINING_STATUS), 0);
        clock.advance(Duration::from_millis(1499));
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0xFF);
        assert_eq!(bar_read32(&mut g, HBM_TRAINING_STATUS), 0xFF);
    }

    #[test]
    fn test_gpu_readiness_counts_from_creation() {
        // Arrange
        let clock = Arc::new(ManualClock::new());
        clock.advance(Duration::from_secs(10));
        let mut g = gpu_on(&clock, Readiness::DelayMs(100));
        // Act / Assert
        assert!(!g.is_ready());
        clock.advance(Duration::from_millis(100));
        assert!(g.is_ready());
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0xFF);
    }

    #[test]
    fn test_gpu_readiness_never_stays_zero() {
        // Arrange
        let clock = Arc::new(ManualClock::new());
        let mut g = gpu_on(&clock, Readiness::Never);
        // Act
        clock.advance(Duration::from_secs(3600));
        // Assert
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0);
        assert_eq!(bar_read32(&mut g, HBM_TRAINING_STATUS), 0);
    }

    #[test]
    fn test_gpu_bar0_narrow_and_wide_reads_return_register_bytes() {
        // Arrange
        let mut g = gpu(GB200_DEVICE_ID, true, Readiness::Ready);
        let mut byte = [0xAA; 1];
        let mut byte1 = [0xAA; 1];
        let mut half = [0xAA; 2];
        let mut wide = [0xAA; 8];
        let mut wide_hbm = [0xAA; 8];
        // Act
        g.bar_read(0, C2C_LINK_STATUS, &mut byte);
        g.bar_read(0, C2C_LINK_STATUS + 1, &mut byte1);
        g.bar_read(0, C2C_LINK_STATUS, &mut half);
        g.bar_read(0, C2C_LINK_STATUS, &mut wide);
        g.bar_read(0, HBM_TRAINING_STATUS - 4, &mut wide_hbm);
        // Assert
        assert_eq!(byte, [0xFF]);
        assert_eq!(byte1, [0]);
        assert_eq!(half, [0xFF, 0]);
        assert_eq!(u64::from_le_bytes(wide), 0xFF);
        assert_eq!(u64::from_le_bytes(wide_hbm), 0xFF << 32);
    }

    #[test]
    fn test_gpu_bar0_writes_change_nothing() {
        // Arrange
        let mut g = gpu(GB200_DEVICE_ID, true, Readiness::Ready);
        // Act
        g.bar_write(0, C2C_LINK_STATUS, &0u32.to_le_bytes());
        g.bar_write(0, 0x100, &u32::MAX.to_le_bytes());
        // Assert
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0xFF);
        assert_eq!(bar_read32(&mut g, 0x100), 0);
    }

    #[test]
    fn test_gpu_bar0_bad_accesses_read_zero() {
        // Arrange
        let mut g = gpu(GB200_DEVICE_ID, true, Readiness::Ready);
        // Act / Assert
        for (bar, offset, size) in [
            (0usize, C2C_LINK_STATUS, 3usize),
            (0, C2C_LINK_STATUS, 0),
            (0, C2C_LINK_STATUS, 16),
            (0, C2C_LINK_STATUS + 2, 4),
            (0, C2C_LINK_STATUS + 1, 2),
            (0, C2C_LINK_STATUS - 4, 8),
            (1, C2C_LINK_STATUS, 4),
            (2, 0, 4),
            (0, BAR0_SIZE, 4),
            (0, u64::MAX - 3, 4),
        ] {
            let mut data = vec![0xA5; size];
            g.bar_read(bar, offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "BAR{bar} {offset:#x}/{size}");
            g.bar_write(bar, offset, &data);
        }
        assert_eq!(bar_read32(&mut g, C2C_LINK_STATUS), 0xFF);
    }

    #[test]
    fn test_gpu_fuzz_bar0_stream_keeps_invariants() {
        // Arrange
        let clock = Arc::new(ManualClock::new());
        let mut g = gpu_on(&clock, Readiness::DelayMs(30_000));
        let mut rng = SplitMix64(0x6B0_BA50_5EED);
        let hot = [C2C_LINK_STATUS, HBM_TRAINING_STATUS, 0, 0x1490, 0x200B8];
        let mut was_ready = false;
        let mut ready_reads = 0;
        // Act / Assert
        for step in 0..100_000 {
            let offset = match rng.below(10) {
                0..=6 => hot[rng.below(hot.len() as u64) as usize] + rng.below(8),
                7..=8 => rng.below(BAR0_SIZE + 0x100),
                _ => rng.next_u64(),
            };
            let size = [1usize, 2, 4, 4, 8, 0, 3, 16][rng.below(8) as usize];
            let bar = if rng.below(50) == 0 { rng.below(7) } else { 0 } as usize;
            match rng.below(20) {
                0 => clock.advance(Duration::from_millis(rng.below(20))),
                1..=8 => {
                    let data: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
                    g.bar_write(bar, offset, &data);
                }
                _ => {
                    let mut data = vec![0xA5; size];
                    g.bar_read(bar, offset, &mut data);
                    for (i, &b) in data.iter().enumerate() {
                        let at = offset.wrapping_add(i as u64);
                        let status = matches!(at, C2C_LINK_STATUS | HBM_TRAINING_STATUS);
                        assert!(b == 0 || (b == 0xFF && status), "step {step}");
                        if b == 0xFF {
                            ready_reads += 1;
                        }
                    }
                }
            }
            let ready = g.is_ready();
            assert!(ready || !was_ready, "readiness went back at step {step}");
            was_ready = ready;
        }
        assert!(was_ready, "the stream advanced the clock past 30 s");
        assert!(ready_reads > 100);
    }
}
