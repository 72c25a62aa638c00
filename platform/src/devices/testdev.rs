//! gracevm's test device: a 4 KiB page through which the guest reports to the VMM.
//!
//! Like Firecracker's boot timer, the guest's init writes a magic value when it reaches
//! userspace and the VMM records (and logs) the time since it started the VM: a boot-time
//! measurement without parsing the console.
//!
//! Register map (32-bit registers, 4-byte accesses at 4-byte-aligned offsets only):
//!
//! | Offset | Name | Access | Description                                                     |
//! |--------|------|--------|-----------------------------------------------------------------|
//! | 0x000  | BOOT | RW     | W: [`BOOT_MAGIC`] records the boot time, first write only.      |
//! |        |      |        | R: 1 once the boot time is recorded, else 0.                    |
//! | 0x004  | ID   | RO     | [`DEVICE_ID`], so the guest can check the device is present.    |
//! | 0x008- |      |        | reserved (read as 0, writes ignored); room for later registers. |
//!
//! Every other access (other sizes, unaligned or reserved offsets, offsets at or beyond 0x1000,
//! writes to ID, wrong or repeated BOOT writes) is logged and ignored; such reads return 0.
//! To add a register: a `Reg` variant, its offset in `Reg::decode`, and its behaviour in
//! `read_reg` / `write_reg`.

use std::time::{Duration, Instant};

use super::{le_value, put_le_value, MmioDevice, WarnLimiter};

const NAME: &str = "testdev";

/// Written to BOOT by the guest when it has booted.
pub const BOOT_MAGIC: u32 = 0x7472_6762;
/// Value of the ID register.
pub const DEVICE_ID: u32 = 0x6772_766d;

/// Size of the register window.
const WINDOW_LEN: u64 = 0x1000;
/// The only access size the device decodes.
const ACCESS_SIZE: usize = 4;

const BOOT: u64 = 0x000;
const ID: u64 = 0x004;

/// A decoded register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Boot,
    Id,
}

impl Reg {
    fn decode(offset: u64) -> Option<Self> {
        match offset {
            BOOT => Some(Self::Boot),
            ID => Some(Self::Id),
            _ => None,
        }
    }
}

/// The guest→VMM test/boot-timer device.
#[derive(Debug)]
pub struct TestDev {
    start: Instant,
    boot_time: Option<Duration>,
    warn: WarnLimiter,
}

impl TestDev {
    /// Size of the MMIO window the device decodes.
    pub const MMIO_LEN: u64 = WINDOW_LEN;

    /// A test device measuring boot time from `start` (when the VMM started the VM).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            boot_time: None,
            warn: WarnLimiter::default(),
        }
    }

    /// Time from `start` to the guest's first [`BOOT_MAGIC`] write, if it has happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    fn read_reg(&self, reg: Reg) -> u32 {
        match reg {
            Reg::Boot => u32::from(self.boot_time.is_some()),
            Reg::Id => DEVICE_ID,
        }
    }

    /// Applies a write, or returns why it was ignored.
    fn write_reg(&mut self, reg: Reg, value: u32) -> Result<(), &'static str> {
        match reg {
            Reg::Boot if value != BOOT_MAGIC => Err("BOOT write of a value other than BOOT_MAGIC"),
            Reg::Boot if self.boot_time.is_some() => Err("repeated BOOT write"),
            Reg::Boot => {
                let elapsed = self.start.elapsed();
                self.boot_time = Some(elapsed);
                log::info!("guest booted in {:.3} ms", elapsed.as_secs_f64() * 1e3);
                Ok(())
            }
            Reg::Id => Err("write to the read-only ID register"),
        }
    }

    /// Decodes an access; logs and returns `None` if it is refused.
    fn decode(&mut self, op: &str, offset: u64, size: usize) -> Option<Reg> {
        let problem = if offset >= WINDOW_LEN {
            "offset beyond the register window"
        } else if size != ACCESS_SIZE {
            "unsupported access size"
        } else {
            match Reg::decode(offset) {
                Some(reg) => return Some(reg),
                None => "reserved or unaligned offset",
            }
        };
        self.warn.warn(
            NAME,
            format_args!("{problem}: {size}-byte {op} at offset {offset:#x}"),
        );
        None
    }
}

impl MmioDevice for TestDev {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(reg) = self.decode("read", offset, data.len()) {
            put_le_value(data, u64::from(self.read_reg(reg)));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(reg) = self.decode("write", offset, data.len()) else {
            return;
        };
        // Exactly 4 bytes: the value fits.
        let value = le_value(data) as u32;
        if let Err(problem) = self.write_reg(reg, value) {
            self.warn.warn(
                NAME,
                format_args!("{problem}: {value:#x} at offset {offset:#x}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_utils::{decode_ops, fuzz_stream, FuzzOp};

    fn read32(dev: &mut TestDev, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        dev.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(dev: &mut TestDev, offset: u64, value: u32) {
        dev.write(offset, &value.to_le_bytes());
    }

    /// A device whose VM started a second ago.
    fn started_a_second_ago() -> TestDev {
        let start = Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        TestDev::new(start)
    }

    #[test]
    fn test_boot_not_written_reads_zero_and_no_time() {
        // Arrange
        let mut dev = started_a_second_ago();
        // Act
        let boot = read32(&mut dev, BOOT);
        // Assert
        assert_eq!(boot, 0);
        assert_eq!(dev.boot_time(), None);
    }

    #[test]
    fn test_boot_magic_written_records_elapsed_time() {
        // Arrange
        let mut dev = started_a_second_ago();
        let before = dev.start.elapsed();
        // Act
        write32(&mut dev, BOOT, BOOT_MAGIC);
        let after = dev.start.elapsed();
        // Assert
        let t = dev.boot_time().expect("boot time recorded");
        assert!(
            before <= t && t <= after,
            "{before:?} <= {t:?} <= {after:?}"
        );
        assert_eq!(read32(&mut dev, BOOT), 1);
    }

    #[test]
    fn test_boot_magic_written_twice_keeps_first_time() {
        // Arrange
        let mut dev = started_a_second_ago();
        write32(&mut dev, BOOT, BOOT_MAGIC);
        let first = dev.boot_time();
        std::thread::sleep(Duration::from_millis(2));
        // Act
        write32(&mut dev, BOOT, BOOT_MAGIC);
        // Assert
        assert_eq!(dev.boot_time(), first);
    }

    #[test]
    fn test_boot_wrong_value_is_ignored() {
        // Arrange
        let mut dev = started_a_second_ago();
        // Act
        for value in [0, 1, BOOT_MAGIC.swap_bytes(), DEVICE_ID, u32::MAX] {
            write32(&mut dev, BOOT, value);
        }
        // Assert
        assert_eq!(dev.boot_time(), None);
        assert_eq!(read32(&mut dev, BOOT), 0);
    }

    #[test]
    fn test_id_read_returns_device_id_and_ignores_writes() {
        // Arrange
        let mut dev = started_a_second_ago();
        // Act
        write32(&mut dev, ID, 0);
        let id = read32(&mut dev, ID);
        // Assert
        assert_eq!(id, 0x6772_766d);
        assert_eq!(dev.boot_time(), None);
    }

    #[test]
    fn test_bad_sizes_change_nothing() {
        // Arrange
        let mut dev = started_a_second_ago();
        // Act / Assert
        for size in [0usize, 1, 2, 3, 8, 16] {
            let mut magic = BOOT_MAGIC.to_le_bytes().to_vec();
            magic.resize(size, 0);
            dev.write(BOOT, &magic);
            assert_eq!(dev.boot_time(), None, "{size}-byte write");
            let mut data = vec![0xFF; size];
            dev.read(ID, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{size}-byte read");
        }
    }

    #[test]
    fn test_bad_offsets_change_nothing() {
        // Arrange
        let mut dev = started_a_second_ago();
        // Act / Assert
        for offset in [1, 2, 3, 5, 8, 0xC, 0xFFC, 0x1000, 0x1004, u64::MAX - 3] {
            write32(&mut dev, offset, BOOT_MAGIC);
            assert_eq!(dev.boot_time(), None, "write at {offset:#x}");
            assert_eq!(read32(&mut dev, offset), 0, "read at {offset:#x}");
        }
    }

    #[test]
    fn test_fuzz_byte_stream_never_panics() {
        // Arrange
        let mut dev = started_a_second_ago();
        let stream = fuzz_stream(0x07E5_7DE7, 100_000, &[BOOT, ID, 0x8, 0x1000]);
        // Act / Assert
        for op in decode_ops(&stream) {
            match op {
                FuzzOp::Read { offset, size } => {
                    let mut data = vec![0xA5; size];
                    dev.read(offset, &mut data);
                    if size != 4 {
                        assert!(data.iter().all(|&b| b == 0));
                    }
                }
                FuzzOp::Write { offset, data } => dev.write(offset, data),
                FuzzOp::Host(_) => {}
            }
        }
        // Writes of BOOT_MAGIC are astronomically unlikely; the state stays consistent.
        assert_eq!(read32(&mut dev, BOOT), u32::from(dev.boot_time().is_some()));
    }
}
