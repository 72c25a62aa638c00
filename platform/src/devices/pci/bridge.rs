//! The PCIe host bridge: an ECAM window onto bus 0 and two BAR windows (32-bit and 64-bit
//! MMIO) whose accesses go to whichever function's BAR the guest placed there.
//!
//! ECAM decoding: `offset = bus << 20 | device << 15 | function << 12 | register`, with 1-, 2-
//! and 4-byte naturally aligned accesses. Only bus 0, function 0 of each populated device
//! exists; every other bus/device/function reads all-ones and ignores writes (that is how an
//! OS enumerates). Accesses of another size, unaligned ones, and offsets past the window are
//! logged and ignored (reads 0).
//!
//! BAR routing: an access at address `A` in either BAR window goes to the first function
//! (lowest device number, then lowest BAR index) whose COMMAND.memory bit is set and one of
//! whose BARs contains all of `[A, A + len)`, at offset `A - BAR address`. If none does, it
//! is logged and ignored (reads 0). Guests assign BAR addresses themselves, so nothing is
//! registered per BAR: the routing follows every config write.

use std::sync::{Arc, Mutex, MutexGuard};

use super::config::NUM_BARS;
use super::PciFunction;
use crate::devices::{lock, MmioDevice, WarnLimiter};

const NAME: &str = "pci";

/// ECAM space of one bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Device numbers per bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Most buses an ECAM window can cover.
const MAX_BUSES: u64 = 256;

/// Where the host bridge's windows sit in guest-physical space (from the memory map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciWindows {
    /// ECAM base: 1 MiB aligned.
    pub ecam_base: u64,
    /// ECAM size: 1 MiB per bus, 1 to 256 buses (bus 0 is the only populated one).
    pub ecam_size: u64,
    /// Non-prefetchable 32-bit MMIO window `(base, size)`: below 4 GiB.
    pub mmio32: (u64, u64),
    /// 64-bit prefetchable MMIO window `(base, size)`.
    pub mmio64: (u64, u64),
}

impl PciWindows {
    /// Number of buses the ECAM window covers (`bus-range = <0 (buses - 1)>`).
    pub fn buses(&self) -> u64 {
        self.ecam_size / ECAM_BUS_SIZE
    }
}

/// Why the host bridge refused a configuration (a VMM bug, never guest input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    #[error(
        "ECAM window at {base:#x} of {size:#x} bytes is not 1 MiB aligned with 1 to 256 buses"
    )]
    BadEcam { base: u64, size: u64 },
    #[error("{name} window at {base:#x} of {size:#x} bytes is empty, overflows or is misplaced")]
    BadWindow {
        name: &'static str,
        base: u64,
        size: u64,
    },
    #[error("the {0} and {1} windows overlap")]
    Overlap(&'static str, &'static str),
    #[error("device number {0} is not 0..=31")]
    BadDevice(u8),
    #[error("device {0} on bus 0 is already populated")]
    DeviceInUse(u8),
}

/// What an ECAM access addresses.
enum EcamTarget {
    /// Refused (bad size, alignment or offset): already logged.
    Bad,
    /// A bus/device/function that does not exist.
    Absent,
    Function {
        device: usize,
        reg: u64,
    },
}

/// The root complex: bus 0 with its functions. Share it through a [`PciHost`].
pub struct PciRoot {
    windows: PciWindows,
    devices: Vec<Option<Box<dyn PciFunction>>>,
    warn: WarnLimiter,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("windows", &self.windows)
            .field("devices", &self.devices().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PciRoot {
    /// An empty bus 0 behind `windows`, which must be sane and disjoint.
    pub fn new(windows: PciWindows) -> Result<Self, PciError> {
        let PciWindows {
            ecam_base,
            ecam_size,
            mmio32,
            mmio64,
        } = windows;
        let ecam_ok = ecam_base % ECAM_BUS_SIZE == 0
            && ecam_size % ECAM_BUS_SIZE == 0
            && (1..=MAX_BUSES).contains(&(ecam_size / ECAM_BUS_SIZE))
            && ecam_base.checked_add(ecam_size - 1).is_some();
        if !ecam_ok {
            return Err(PciError::BadEcam {
                base: ecam_base,
                size: ecam_size,
            });
        }
        let ranges = [
            ("ECAM", ecam_base, ecam_size),
            ("32-bit MMIO", mmio32.0, mmio32.1),
            ("64-bit MMIO", mmio64.0, mmio64.1),
        ];
        for &(name, base, size) in &ranges[1..] {
            let last = size
                .checked_sub(1)
                .and_then(|s| base.checked_add(s))
                .filter(|&last| name != "32-bit MMIO" || last <= u64::from(u32::MAX));
            if last.is_none() {
                return Err(PciError::BadWindow { name, base, size });
            }
        }
        for (i, &(a, a_base, a_size)) in ranges.iter().enumerate() {
            for &(b, b_base, b_size) in &ranges[i + 1..] {
                // Sizes are non-zero and the ends do not overflow (checked above).
                if a_base <= b_base + (b_size - 1) && b_base <= a_base + (a_size - 1) {
                    return Err(PciError::Overlap(a, b));
                }
            }
        }
        Ok(Self {
            windows,
            devices: (0..DEVICES_PER_BUS).map(|_| None).collect(),
            warn: WarnLimiter::default(),
        })
    }

    /// The windows this root decodes.
    pub fn windows(&self) -> PciWindows {
        self.windows
    }

    /// Puts `function` at bus 0, device `device`, function 0 (devfn `device << 3`).
    pub fn add_function(
        &mut self,
        device: u8,
        function: Box<dyn PciFunction>,
    ) -> Result<(), PciError> {
        let slot = self
            .devices
            .get_mut(usize::from(device))
            .ok_or(PciError::BadDevice(device))?;
        if slot.is_some() {
            return Err(PciError::DeviceInUse(device));
        }
        *slot = Some(function);
        Ok(())
    }

    /// The populated device numbers on bus 0, ascending.
    pub fn devices(&self) -> impl Iterator<Item = u8> + '_ {
        (0..DEVICES_PER_BUS).filter(|&d| self.function(d).is_some())
    }

    /// The function at bus 0, device `device`, if any.
    pub fn function(&self, device: u8) -> Option<&dyn PciFunction> {
        self.devices.get(usize::from(device))?.as_deref()
    }

    /// The function at bus 0, device `device`, if any, mutably.
    pub fn function_mut(&mut self, device: u8) -> Option<&mut (dyn PciFunction + 'static)> {
        self.devices.get_mut(usize::from(device))?.as_deref_mut()
    }

    /// A guest read at `offset` in the ECAM window.
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match self.ecam_target("read", offset, data.len()) {
            EcamTarget::Bad => {}
            EcamTarget::Absent => data.fill(0xFF),
            EcamTarget::Function { device, reg } => {
                if let Some(f) = self.devices[device].as_deref_mut() {
                    f.config_read(reg, data);
                }
            }
        }
    }

    /// A guest write at `offset` in the ECAM window.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        match self.ecam_target("write", offset, data.len()) {
            EcamTarget::Bad => {}
            EcamTarget::Absent => {
                log::trace!("{NAME}: ignored config write to absent function at {offset:#x}")
            }
            EcamTarget::Function { device, reg } => {
                if let Some(f) = self.devices[device].as_deref_mut() {
                    f.config_write(reg, data);
                }
            }
        }
    }

    /// A guest read at guest-physical `addr` in a BAR window.
    pub fn bar_read(&mut self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        match self.route(addr, data.len()) {
            Some((device, bar, offset)) => {
                if let Some(f) = self.devices[device].as_deref_mut() {
                    f.bar_read(bar, offset, data);
                }
            }
            None => self.unrouted("read", addr, data.len()),
        }
    }

    /// A guest write at guest-physical `addr` in a BAR window.
    pub fn bar_write(&mut self, addr: u64, data: &[u8]) {
        match self.route(addr, data.len()) {
            Some((device, bar, offset)) => {
                if let Some(f) = self.devices[device].as_deref_mut() {
                    f.bar_write(bar, offset, data);
                }
            }
            None => self.unrouted("write", addr, data.len()),
        }
    }

    /// The function, BAR and offset that decode `[addr, addr + len)`, if any.
    fn route(&self, addr: u64, len: usize) -> Option<(usize, usize, u64)> {
        let len = u64::try_from(len).ok()?;
        self.devices.iter().enumerate().find_map(|(device, f)| {
            let config = f.as_deref()?.config();
            if !config.memory_enabled() {
                return None;
            }
            (0..NUM_BARS).find_map(|bar| {
                let (base, size) = config.bar_range(bar)?;
                let offset = addr.checked_sub(base)?;
                (offset < size && len <= size - offset).then_some((device, bar, offset))
            })
        })
    }

    fn unrouted(&mut self, op: &str, addr: u64, size: usize) {
        self.warn.warn(
            NAME,
            format_args!("{size}-byte {op} at {addr:#x} hits no enabled BAR"),
        );
    }

    /// Decodes an ECAM access; logs refused ones.
    fn ecam_target(&mut self, op: &str, offset: u64, size: usize) -> EcamTarget {
        let problem = if !matches!(size, 1 | 2 | 4) {
            "unsupported config access size"
        } else if offset % size as u64 != 0 {
            "unaligned config access"
        } else if offset >= self.windows.ecam_size {
            "offset beyond the ECAM window"
        } else {
            let bus = offset >> 20;
            let device = ((offset >> 15) & 0x1F) as usize;
            let function = (offset >> 12) & 0x7;
            let present = self.devices.get(device).is_some_and(Option::is_some);
            return if bus == 0 && function == 0 && present {
                EcamTarget::Function {
                    device,
                    reg: offset & 0xFFF,
                }
            } else {
                EcamTarget::Absent
            };
        };
        self.warn.warn(
            NAME,
            format_args!("{problem}: {size}-byte {op} at ECAM offset {offset:#x}"),
        );
        EcamTarget::Bad
    }
}

/// One of the host bridge's windows, ready for [`crate::devices::MmioBus::insert`].
pub struct PciMmioWindow {
    pub base: u64,
    pub len: u64,
    pub device: Arc<Mutex<dyn MmioDevice>>,
}

/// The shared root complex: the VMM keeps one (to reach the functions) and puts its three
/// [`PciHost::mmio_windows`] on the MMIO bus.
///
/// ```
/// use std::sync::Arc;
/// use gracevm::devices::MmioBus;
/// use gracevm::devices::pci::{
///     GpuConfig, GpuFunction, PciHost, PciRoot, PciWindows, Readiness, SystemClock,
/// };
///
/// let windows = PciWindows {
///     ecam_base: 0x3F00_0000,
///     ecam_size: 16 << 20,
///     mmio32: (0x1000_0000, 0x2F00_0000),
///     mmio64: (0xC0_0000_0000, 0x40_0000_0000),
/// };
/// let mut root = PciRoot::new(windows)?;
/// let gpu = GpuConfig { device_id: 0x2941, blackwell_dvsec: true, readiness: Readiness::Ready };
/// root.add_function(1, Box::new(GpuFunction::new(gpu, Arc::new(SystemClock))))?;
/// let host = PciHost::new(root);
/// let mut bus = MmioBus::new();
/// for w in host.mmio_windows() {
///     bus.insert(w.base, w.len, w.device)?;
/// }
/// let mut id = [0u8; 4];
/// assert!(bus.read(0x3F00_0000 + (1 << 15), &mut id));
/// assert_eq!(u32::from_le_bytes(id), 0x2941_10DE);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct PciHost {
    root: Arc<Mutex<PciRoot>>,
}

impl std::fmt::Debug for PciHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PciHost").field(&*self.lock()).finish()
    }
}

impl PciHost {
    pub fn new(root: PciRoot) -> Self {
        Self {
            root: Arc::new(Mutex::new(root)),
        }
    }

    /// The root, locked (for the VMM's own look-ups; keep the guard short-lived).
    pub fn lock(&self) -> MutexGuard<'_, PciRoot> {
        lock(&self.root)
    }

    /// The ECAM window, then the 32-bit and the 64-bit BAR windows.
    pub fn mmio_windows(&self) -> [PciMmioWindow; 3] {
        let w = self.lock().windows();
        let bar_window = |(base, len): (u64, u64)| PciMmioWindow {
            base,
            len,
            device: Arc::new(Mutex::new(BarWindow {
                base,
                len,
                root: self.root.clone(),
            })),
        };
        [
            PciMmioWindow {
                base: w.ecam_base,
                len: w.ecam_size,
                device: Arc::new(Mutex::new(EcamWindow {
                    root: self.root.clone(),
                })),
            },
            bar_window(w.mmio32),
            bar_window(w.mmio64),
        ]
    }
}

/// The ECAM window as an MMIO device (offsets relative to the ECAM base).
pub struct EcamWindow {
    root: Arc<Mutex<PciRoot>>,
}

impl MmioDevice for EcamWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.root).ecam_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.root).ecam_write(offset, data);
    }
}

/// A BAR window as an MMIO device (offsets relative to the window's base).
pub struct BarWindow {
    base: u64,
    len: u64,
    root: Arc<Mutex<PciRoot>>,
}

impl BarWindow {
    /// The guest-physical address of `offset`, if it lies in the window.
    fn addr(&self, offset: u64) -> Option<u64> {
        if offset < self.len {
            self.base.checked_add(offset)
        } else {
            None
        }
    }
}

impl MmioDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let mut root = lock(&self.root);
        match self.addr(offset) {
            Some(addr) => root.bar_read(addr, data),
            None => root.unrouted("read", self.base.wrapping_add(offset), data.len()),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = lock(&self.root);
        match self.addr(offset) {
            Some(addr) => root.bar_write(addr, data),
            None => root.unrouted("write", self.base.wrapping_add(offset), data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{Bar, BarKind, ConfigSpace, FunctionIdentity};
    use super::super::gpu::{
        GpuConfig, GpuFunction, ManualClock, Readiness, C2C_LINK_STATUS, HBM_TRAINING_STATUS,
    };
    use super::*;
    use crate::devices::MmioBus;

    const ECAM: u64 = 0x3F00_0000;
    const MMIO32: u64 = 0x1000_0000;
    const MMIO64: u64 = 0xC0_0000_0000;

    type AccessLog = Arc<Mutex<Vec<(char, usize, u64, usize)>>>;

    fn windows() -> PciWindows {
        PciWindows {
            ecam_base: ECAM,
            ecam_size: 16 << 20,
            mmio32: (MMIO32, 0x2F00_0000),
            mmio64: (MMIO64, 0x40_0000_0000),
        }
    }

    /// A function with a 64-bit prefetchable 1 GiB BAR2 that records its BAR accesses.
    struct Probe {
        config: ConfigSpace,
        log: AccessLog,
    }

    impl Probe {
        fn new(log: AccessLog) -> Self {
            let mut config = ConfigSpace::new(FunctionIdentity {
                vendor_id: 0x1AF4,
                device_id: 0x1234,
                revision_id: 0,
                class_code: 0xFF_00_00,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            });
            let bar = Bar {
                size: 1 << 30,
                kind: BarKind::Memory64,
                prefetchable: true,
            };
            config.add_bar(2, bar).unwrap();
            Self { config, log }
        }
    }

    impl PciFunction for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }

        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }

        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.log
                .lock()
                .unwrap()
                .push(('r', bar, offset, data.len()));
            data.fill(0x5A);
        }

        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .push(('w', bar, offset, data.len()));
        }
    }

    /// Device 0: GB200 GPU (ready after 1 s on `clock`); device 1: GH200 GPU (ready);
    /// device 3: a probe with a 64-bit BAR.
    struct Fixture {
        host: PciHost,
        bus: MmioBus,
        clock: Arc<ManualClock>,
        probe_log: AccessLog,
    }

    fn fixture() -> Fixture {
        let clock = Arc::new(ManualClock::new());
        let probe_log = AccessLog::default();
        let mut root = PciRoot::new(windows()).unwrap();
        for (device, device_id, dvsec, readiness) in [
            (0, 0x2941, true, Readiness::DelayMs(1000)),
            (1, 0x2348, false, Readiness::Ready),
        ] {
            let cfg = GpuConfig {
                device_id,
                blackwell_dvsec: dvsec,
                readiness,
            };
            root.add_function(device, Box::new(GpuFunction::new(cfg, clock.clone())))
                .unwrap();
        }
        root.add_function(3, Box::new(Probe::new(probe_log.clone())))
            .unwrap();
        let host = PciHost::new(root);
        let mut bus = MmioBus::new();
        for w in host.mmio_windows() {
            bus.insert(w.base, w.len, w.device).unwrap();
        }
        Fixture {
            host,
            bus,
            clock,
            probe_log,
        }
    }

    impl Fixture {
        fn read(&self, addr: u64, size: usize) -> u64 {
            let mut data = vec![0xA5; size];
            self.bus.read(addr, &mut data);
            data.iter()
                .rev()
                .fold(0, |acc, &b| (acc << 8) | u64::from(b))
        }

        fn write(&self, addr: u64, size: usize, value: u64) {
            let bytes = [value.to_le_bytes(), value.to_le_bytes()].concat();
            self.bus.write(addr, &bytes[..size]);
        }

        fn cfg_read(&self, device: u64, reg: u64, size: usize) -> u64 {
            self.read(ECAM + (device << 15) + reg, size)
        }

        fn cfg_write(&self, device: u64, reg: u64, size: usize, value: u64) {
            self.write(ECAM + (device << 15) + reg, size, value);
        }

        /// Places BAR0 of `device` at `addr` and sets COMMAND to `command`.
        fn place_bar0(&self, device: u64, addr: u32, command: u16) {
            self.cfg_write(device, 0x10, 4, u64::from(addr));
            self.cfg_write(device, 0x04, 2, u64::from(command));
        }

        fn config_bytes(&self) -> Vec<Vec<u8>> {
            let mut root = self.host.lock();
            [0u8, 1, 3]
                .iter()
                .map(|&d| {
                    let f = root.function_mut(d).unwrap();
                    (0..0x1000u64)
                        .step_by(4)
                        .flat_map(|reg| {
                            let mut data = [0u8; 4];
                            f.config_read(reg, &mut data);
                            data
                        })
                        .collect()
                })
                .collect()
        }
    }

    #[test]
    fn test_ecam_header_identity_reads_through_bus() {
        // Arrange
        let f = fixture();
        // Act / Assert
        assert_eq!(f.cfg_read(0, 0, 4), 0x2941_10DE);
        assert_eq!(f.cfg_read(1, 0, 4), 0x2348_10DE);
        assert_eq!(f.cfg_read(1, 0, 2), 0x10DE);
        assert_eq!(f.cfg_read(1, 2, 2), 0x2348);
        assert_eq!(f.cfg_read(1, 0, 1), 0xDE);
        assert_eq!(f.cfg_read(1, 0x0B, 1), 0x03);
        assert_eq!(f.cfg_read(1, 0x0A, 1), 0x02);
        assert_eq!(f.cfg_read(1, 0x0E, 1), 0x00);
        assert_eq!(f.cfg_read(3, 0, 4), 0x1234_1AF4);
    }

    #[test]
    fn test_ecam_unknown_function_reads_all_ones() {
        // Arrange
        let f = fixture();
        // Act / Assert
        for (offset, size) in [
            (2 << 15, 4),                        // empty device 2
            (31 << 15, 2),                       // empty device 31
            (1 << 12, 4),                        // device 0, function 1
            ((1 << 15) | (7 << 12), 1),          // device 1, function 7
            (1 << 20, 4),                        // bus 1, device 0
            ((15 << 20) | (1 << 15) | 0xFFC, 4), // bus 15
        ] {
            let all_ones = (1u64 << (8 * size)) - 1;
            assert_eq!(f.read(ECAM + offset, size), all_ones, "{offset:#x}");
        }
    }

    #[test]
    fn test_ecam_unknown_function_writes_are_ignored() {
        // Arrange
        let f = fixture();
        let before = f.config_bytes();
        // Act
        for offset in [
            2 << 15,
            1 << 12,
            (1 << 20) | 0x10,
            (1 << 20) | (1 << 15) | 0x4,
        ] {
            f.write(ECAM + offset, 4, 0xFFFF_FFFF);
        }
        // Assert
        assert_eq!(f.config_bytes(), before);
        assert_eq!(f.read(ECAM + (2 << 15), 4), 0xFFFF_FFFF);
    }

    #[test]
    fn test_ecam_bad_sizes_and_unaligned_change_nothing() {
        // Arrange
        let f = fixture();
        f.place_bar0(1, 0x2000_0000, 0x2);
        let before = f.config_bytes();
        // Act / Assert
        for (reg, size) in [
            (0x4, 8),
            (0x10, 8),
            (0x4, 3),
            (0x10, 0),
            (0x5, 2),
            (0x12, 4),
            (0x11, 4),
        ] {
            f.cfg_write(1, reg, size, u64::MAX);
            assert_eq!(f.config_bytes(), before, "{size}-byte write at {reg:#x}");
            assert_eq!(f.cfg_read(1, reg, size), 0, "{size}-byte read at {reg:#x}");
        }
        // Unknown functions too: a bad access reads 0, not all-ones.
        assert_eq!(f.read(ECAM + (2 << 15) + 1, 2), 0);
    }

    #[test]
    fn test_ecam_direct_offsets_beyond_window_are_ignored() {
        // Arrange
        let f = fixture();
        let before = f.config_bytes();
        let mut root = f.host.lock();
        // Act
        let mut data = [0xA5u8; 4];
        root.ecam_read(16 << 20, &mut data);
        root.ecam_write(16 << 20, &[0xFF; 4]);
        root.ecam_write(u64::MAX - 3, &[0xFF; 4]);
        drop(root);
        // Assert
        assert_eq!(data, [0; 4]);
        assert_eq!(f.config_bytes(), before);
    }

    #[test]
    fn test_bar_window_gated_by_command_memory() {
        // Arrange
        let f = fixture();
        f.place_bar0(1, 0x2000_0000, 0);
        let status = 0x2000_0000 + C2C_LINK_STATUS;
        // Act / Assert
        assert_eq!(f.read(status, 4), 0, "memory decode off");
        f.cfg_write(1, 0x4, 2, 0x2);
        assert_eq!(f.read(status, 4), 0xFF, "memory decode on");
        assert_eq!(f.read(0x2000_0000 + HBM_TRAINING_STATUS, 4), 0xFF);
        f.cfg_write(1, 0x4, 2, 0x4);
        assert_eq!(f.read(status, 4), 0, "memory decode off again");
    }

    #[test]
    fn test_bar_window_follows_reprogrammed_bar() {
        // Arrange
        let f = fixture();
        f.place_bar0(1, 0x2000_0000, 0x2);
        // Act
        f.cfg_write(1, 0x10, 4, 0x3100_0000);
        // Assert
        assert_eq!(f.read(0x2000_0000 + C2C_LINK_STATUS, 4), 0);
        assert_eq!(f.read(0x3100_0000 + C2C_LINK_STATUS, 4), 0xFF);
    }

    #[test]
    fn test_bar_window_two_gpus_decode_independently() {
        // Arrange
        let f = fixture();
        f.place_bar0(0, 0x1000_0000, 0x2);
        f.place_bar0(1, 0x1100_0000, 0x2);
        // Act / Assert: device 0 is not ready until 1 s has passed.
        assert_eq!(f.read(0x1000_0000 + C2C_LINK_STATUS, 4), 0);
        assert_eq!(f.read(0x1100_0000 + C2C_LINK_STATUS, 4), 0xFF);
        f.clock.advance(std::time::Duration::from_millis(1000));
        assert_eq!(f.read(0x1000_0000 + C2C_LINK_STATUS, 4), 0xFF);
    }

    #[test]
    fn test_bar_window_overlapping_bars_lowest_device_wins() {
        // Arrange
        let f = fixture();
        f.place_bar0(0, 0x1000_0000, 0x2);
        f.place_bar0(1, 0x1000_0000, 0x2);
        // Act / Assert: device 0 (not ready) answers, not device 1 (ready).
        assert_eq!(f.read(0x1000_0000 + C2C_LINK_STATUS, 4), 0);
        f.cfg_write(0, 0x4, 2, 0);
        assert_eq!(f.read(0x1000_0000 + C2C_LINK_STATUS, 4), 0xFF);
    }

    #[test]
    fn test_bar_window_routes_64bit_bar_with_relative_offset() {
        // Arrange
        let f = fixture();
        f.cfg_write(3, 0x18, 4, 0x4000_0000);
        f.cfg_write(3, 0x1C, 4, 0xC1);
        f.cfg_write(3, 0x4, 2, 0x2);
        // Act
        let value = f.read(0xC1_4000_0010, 8);
        f.write(0xC1_7FFF_FFFC, 4, 7);
        f.write(0xC1_7FFF_FFFC, 8, 7); // straddles the BAR's end: ignored
        f.write(0xC1_3FFF_FFFC, 4, 7); // just below the BAR: ignored
                                       // Assert
        assert_eq!(value, 0x5A5A_5A5A_5A5A_5A5A);
        assert_eq!(
            *f.probe_log.lock().unwrap(),
            [('r', 2, 0x10, 8), ('w', 2, 0x3FFF_FFFC, 4)]
        );
    }

    #[test]
    fn test_bar_window_unassigned_address_reads_zero() {
        // Arrange
        let f = fixture();
        f.place_bar0(1, 0x2000_0000, 0x2);
        // Act / Assert
        assert_eq!(f.read(0x3000_0000, 4), 0);
        assert_eq!(f.read(MMIO64, 8), 0);
        f.write(0x3000_0000, 4, 1);
        assert!(f.probe_log.lock().unwrap().is_empty());
    }

    #[test]
    fn test_bar_window_direct_offset_beyond_window_is_ignored() {
        // Arrange
        let f = fixture();
        let [_, mmio32, _] = f.host.mmio_windows();
        let mut window = mmio32.device.lock().unwrap();
        // Act
        let mut data = [0xA5u8; 4];
        window.read(0x2F00_0000, &mut data);
        window.write(u64::MAX, &[1]);
        // Assert
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn test_root_new_rejects_bad_windows() {
        // Arrange
        let good = windows();
        let cases = [
            PciWindows {
                ecam_base: ECAM + 0x1000,
                ..good
            },
            PciWindows {
                ecam_size: 0,
                ..good
            },
            PciWindows {
                ecam_size: 257 << 20,
                ..good
            },
            PciWindows {
                ecam_size: (1 << 20) + 1,
                ..good
            },
            PciWindows {
                mmio32: (MMIO32, 0),
                ..good
            },
            PciWindows {
                mmio32: (0xF000_0000, 0x2000_0000),
                ..good
            },
            PciWindows {
                mmio64: (u64::MAX, 2),
                ..good
            },
            PciWindows {
                mmio32: (0x3000_0000, 0x1000_0000),
                ..good
            },
            PciWindows {
                mmio64: (0x1000_0000, 0x1000),
                ..good
            },
        ];
        // Act / Assert
        assert!(PciRoot::new(good).is_ok());
        for w in cases {
            assert!(PciRoot::new(w).is_err(), "{w:x?}");
        }
        assert_eq!(
            PciRoot::new(PciWindows {
                mmio32: (0x3000_0000, 0x1000_0000),
                ..good
            })
            .unwrap_err(),
            PciError::Overlap("ECAM", "32-bit MMIO")
        );
    }

    #[test]
    fn test_root_add_function_rejects_bad_or_taken_device() {
        // Arrange
        let mut root = PciRoot::new(windows()).unwrap();
        let log = AccessLog::default();
        root.add_function(5, Box::new(Probe::new(log.clone())))
            .unwrap();
        // Act
        let taken = root.add_function(5, Box::new(Probe::new(log.clone())));
        let bad = root.add_function(32, Box::new(Probe::new(log)));
        // Assert
        assert_eq!(taken, Err(PciError::DeviceInUse(5)));
        assert_eq!(bad, Err(PciError::BadDevice(32)));
        assert_eq!(root.devices().collect::<Vec<_>>(), [5]);
        assert_eq!(windows().buses(), 16);
    }
}
