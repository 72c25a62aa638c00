//! The guest side of gracevm's test device (platform/src/devices/testdev.rs): a 4 KiB page of
//! 32-bit registers through which a test asks the VMM what *it* sees in guest memory, so a
//! test checks both sides ("the guest wrote X at offset O and it landed at carve-out offset
//! O").
//!
//! The register map, the commands and their status codes are documented once, in
//! [`gracevm_contract::testdev`]; this is their use from the guest.
//!
//! Only 4-byte accesses are decoded. A command runs while the CMD write traps, so STATUS is
//! final when the write returns; while the VMM still fills the carve-outs it is BUSY, and
//! [`TestDev::command`] asks again. A VM without probe regions ignores probe writes and reads
//! them as 0 (which would look like STATUS ok): every command first reads ADDR back to make
//! sure the probe is live.

use std::fmt;
use std::time::{Duration, Instant};

use gracevm_contract::testdev;

use crate::devmem::{self, Access};
use crate::env::{GuestEnv, ENV_PATH, TESTDEV};
use crate::mapping::Mapping;
use crate::outcome::Outcome;

/// Size of the register page.
pub const PAGE_LEN: usize = testdev::WINDOW_LEN as usize;
/// How long a command keeps asking while the VMM fills the carve-outs (four 1 GiB regions
/// under nested emulation on a loaded host take tens of seconds).
const FILL_PATIENCE: Duration = Duration::from_secs(180);

// The register map and commands are the contract with the VMM (gracevm-contract).
pub use gracevm_contract::testdev::{Cmd, DEVICE_ID};

const BOOT: usize = testdev::BOOT as usize;
const ID: usize = testdev::ID as usize;
const ADDR: usize = testdev::ADDR as usize;
const LEN: usize = testdev::LEN as usize;
const VAL: usize = testdev::VAL as usize;
const CMD: usize = testdev::CMD as usize;
const STATUS: usize = testdev::STATUS as usize;
const WHERE: usize = testdev::WHERE as usize;

/// What the VMM answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The first differing u64 is `at` bytes from ADDR.
    Mismatch {
        at: u64,
    },
    /// The range is not inside one probe region (or not backed).
    Outside,
    /// Unaligned address, bad length or unknown command.
    BadRequest,
    /// No boot pattern to compare: nothing asked the VMM for the fill.
    Unfilled,
    /// No command has run yet.
    None,
    Unknown(u32),
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("OK"),
            Status::Mismatch { at } => write!(f, "MISMATCH at +{at:#x}"),
            Status::Outside => f.write_str("OUTSIDE"),
            Status::BadRequest => f.write_str("BAD_REQUEST"),
            Status::Unfilled => {
                f.write_str("UNFILLED (no boot pattern: the fill was not asked for)")
            }
            Status::None => f.write_str("NONE (no command ran)"),
            Status::Unknown(raw) => write!(f, "unknown status {raw:#x}"),
        }
    }
}

impl Status {
    /// A STATUS register value (`at`: the WHERE register, read only for a mismatch).
    fn from_raw(raw: u32, at: impl FnOnce() -> u64) -> Status {
        match raw {
            testdev::STATUS_OK => Status::Ok,
            testdev::STATUS_MISMATCH => Status::Mismatch { at: at() },
            testdev::STATUS_OUTSIDE => Status::Outside,
            testdev::STATUS_BAD_REQUEST => Status::BadRequest,
            testdev::STATUS_UNFILLED => Status::Unfilled,
            testdev::STATUS_NONE => Status::None,
            raw => Status::Unknown(raw),
        }
    }
}

/// The suite's output through PRINT: a locked page of its own that each line is copied into,
/// its guest physical address handed to the VMM. One trap per line instead of one per byte
/// on the UART.
#[derive(Debug)]
pub struct Printer {
    dev: TestDev,
    page: Mapping,
    gpa: u64,
}

/// Why there is no [`Printer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrinterError {
    /// This guest cannot hand the VMM a physical address (no locked page, no
    /// /proc/self/pagemap in its kernel): nothing the VMM did.
    NoAddress(String),
    /// The VMM did not take the first line (one without PRINT answers BAD_REQUEST).
    Refused(String),
}

impl fmt::Display for PrinterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrinterError::NoAddress(why) => write!(f, "no physical address to print from: {why}"),
            PrinterError::Refused(why) => write!(f, "the VMM refused PRINT: {why}"),
        }
    }
}

impl Printer {
    /// A printer through `dev`, once its first line went through.
    pub fn new(dev: TestDev) -> Result<Printer, PrinterError> {
        let len = testdev::PRINT_MAX as usize;
        let page = Mapping::locked(len)
            .map_err(|e| PrinterError::NoAddress(format!("locked page: {e}")))?;
        page.write_bytes(0, &[0]);
        let gpa = crate::procfs::physical_address(page.addr()).map_err(PrinterError::NoAddress)?;
        let printer = Printer { dev, page, gpa };
        printer
            .print(b"# suite output through the test device (PRINT)\n")
            .map_err(PrinterError::Refused)?;
        Ok(printer)
    }

    /// Prints `text` (whole lines, at most [`testdev::PRINT_MAX`] bytes).
    pub fn print(&self, text: &[u8]) -> Result<(), String> {
        if text.is_empty() || text.len() > self.page.len() {
            return Err(format!("{} bytes do not fit one PRINT", text.len()));
        }
        self.page.write_bytes(0, text);
        // The VMM reads the page when the CMD write traps: the copy must be done by then.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        match self.dev.print(self.gpa, text.len() as u64) {
            Status::Ok => Ok(()),
            status => Err(format!(
                "PRINT of {} bytes at {:#x}: {status}",
                text.len(),
                self.gpa
            )),
        }
    }
}

/// 32-bit register access (the /dev/mem page, or a model in unit tests).
pub trait Registers {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);
}

impl Registers for Mapping {
    fn read32(&self, offset: usize) -> u32 {
        self.read_u32(offset)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.write_u32(offset, value)
    }
}

/// The test device.
#[derive(Debug)]
pub struct TestDev<R = Mapping> {
    regs: R,
    base: u64,
}

impl TestDev<Mapping> {
    /// The first 16 bytes of the register page in one load-pair instruction (see
    /// [`Mapping::read_pair`]): the VMM must treat it as a guest fault.
    pub fn read_pair(&self, offset: usize) -> (u64, u64) {
        self.regs.read_pair(offset)
    }

    /// Maps the device page at guest physical `base` and checks its ID.
    pub fn open(base: u64) -> Result<TestDev, String> {
        let regs = devmem::map(base, PAGE_LEN, Access::ReadWrite)?;
        TestDev::with_registers(regs, base)
    }

    /// The device at `GRACEVM_TESTDEV`: `Skip` when the key is missing, `Fail` when malformed
    /// or when no test device answers there.
    pub fn from_env(env: &GuestEnv) -> Result<TestDev, Outcome> {
        let base = env.require_u64(TESTDEV)?;
        TestDev::open(base)
            .map_err(|why| Outcome::fail(format!("{TESTDEV}={base:#x} in {ENV_PATH}: {why}")))
    }
}

impl<R: Registers> TestDev<R> {
    /// A device behind `regs` at `base`, after checking its ID register.
    pub fn with_registers(regs: R, base: u64) -> Result<TestDev<R>, String> {
        let id = regs.read32(ID);
        if id != DEVICE_ID {
            return Err(format!(
                "no gracevm test device at {base:#x}: ID reads {id:#x}, expected {DEVICE_ID:#x}"
            ));
        }
        Ok(TestDev { regs, base })
    }

    /// Guest physical address of the register page.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Whether the VMM recorded the boot time (BOOT reads 1 after /init's boot-timer write).
    pub fn boot_recorded(&self) -> bool {
        self.regs.read32(BOOT) == 1
    }

    fn write64(&self, offset: usize, value: u64) {
        self.regs.write32(offset, value as u32);
        self.regs.write32(offset + 4, (value >> 32) as u32);
    }

    fn read64(&self, offset: usize) -> u64 {
        u64::from(self.regs.read32(offset)) | (u64::from(self.regs.read32(offset + 4)) << 32)
    }

    /// Runs `cmd` over `[addr, addr + len)` (`value`: CHECK_VALUE's operand). `Err` when the
    /// probe registers are not live (a VM without probe regions).
    pub fn command(&self, cmd: Cmd, addr: u64, len: u64, value: u64) -> Result<Status, String> {
        self.write64(ADDR, addr);
        self.write64(LEN, len);
        self.write64(VAL, value);
        let echoed = self.read64(ADDR);
        if echoed != addr {
            return Err(format!(
                "test device at {:#x} ignores its probe registers (ADDR reads {echoed:#x} \
                 after writing {addr:#x}): the VMM has no probe regions",
                self.base
            ));
        }
        // While the VMM still fills the carve-outs, every command answers BUSY at once.
        let patience = Instant::now();
        let status = loop {
            self.regs.write32(CMD, cmd as u32);
            let status = self.regs.read32(STATUS);
            if status != testdev::STATUS_BUSY {
                break status;
            }
            if patience.elapsed() > FILL_PATIENCE {
                return Err(format!(
                    "the VMM still fills the carve-outs after {} s",
                    FILL_PATIENCE.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Status::from_raw(status, || self.read64(WHERE)))
    }

    /// PRINT: `len` bytes of guest memory at `gpa` to the VMM's console. Six register
    /// accesses whatever the length (ADDR and LEN are rewritten each time: a test process may
    /// have used them since).
    pub fn print(&self, gpa: u64, len: u64) -> Status {
        self.write64(ADDR, gpa);
        self.write64(LEN, len);
        self.regs.write32(CMD, Cmd::Print as u32);
        Status::from_raw(self.regs.read32(STATUS), || self.read64(WHERE))
    }

    /// Asks the VMM to put the boot pattern in the carve-outs, on a thread of its own: it
    /// returns at once; [`TestDev::await_fill`] waits for the end.
    pub fn start_fill(&self) -> Result<(), String> {
        match self.command(Cmd::Fill, 0, 0, 0)? {
            Status::Ok => Ok(()),
            other => Err(format!("FILL answered {other}")),
        }
    }

    /// Returns once the VMM has put the boot pattern in every probed region (after
    /// [`TestDev::start_fill`]).
    pub fn await_fill(&self) -> Result<(), String> {
        match self.command(Cmd::AwaitFill, 0, 0, 0)? {
            Status::Ok => Ok(()),
            other => Err(format!("AWAIT_FILL answered {other}")),
        }
    }

    /// The u64 the VMM sees at guest physical `gpa` (8-byte aligned).
    pub fn peek(&self, gpa: u64) -> Result<u64, String> {
        match self.command(Cmd::Peek, gpa, 8, 0)? {
            Status::Ok => Ok(self.read64(VAL)),
            status => Err(format!("PEEK {gpa:#x}: {status}")),
        }
    }

    /// Whether `[gpa, gpa + len)` still holds its region's boot pattern, as the VMM sees it.
    pub fn check_pattern(&self, gpa: u64, len: u64) -> Result<Status, String> {
        self.command(Cmd::CheckPattern, gpa, len, 0)
    }

    /// Whether every u64 of `[gpa, gpa + len)` equals `value`, as the VMM sees it.
    pub fn check_value(&self, gpa: u64, len: u64, value: u64) -> Result<Status, String> {
        self.command(Cmd::CheckValue, gpa, len, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A model of the VMM device over one region of u64 words filled with `seed ^ offset`.
    struct Model {
        regs: RefCell<[u32; 12]>,
        probe: bool,
        region_base: u64,
        words: RefCell<Vec<u64>>,
        seed: u64,
    }

    impl Model {
        fn new(probe: bool) -> Model {
            let seed = 0x6772_6163_6500_0004;
            let mut regs = [0; 12];
            regs[STATUS / 4] = testdev::STATUS_NONE;
            Model {
                regs: RefCell::new(regs),
                probe,
                region_base: 0x80_0000_0000,
                words: RefCell::new(
                    (0..512u64)
                        .map(|i| testdev::pattern_word(seed, i * 8))
                        .collect(),
                ),
                seed,
            }
        }

        fn get64(&self, offset: usize) -> u64 {
            let regs = self.regs.borrow();
            u64::from(regs[offset / 4]) | (u64::from(regs[offset / 4 + 1]) << 32)
        }

        fn set64(&self, offset: usize, value: u64) {
            let mut regs = self.regs.borrow_mut();
            regs[offset / 4] = value as u32;
            regs[offset / 4 + 1] = (value >> 32) as u32;
        }

        fn run(&self, cmd: u32) -> u32 {
            let addr = self.get64(ADDR);
            let len = if cmd == 1 { 8 } else { self.get64(LEN) };
            if !(1..=3).contains(&cmd) || addr % 8 != 0 || len == 0 || len % 8 != 0 {
                return 3;
            }
            let size = self.words.borrow().len() as u64 * 8;
            if addr < self.region_base || addr + len > self.region_base + size {
                return 2;
            }
            let words = self.words.borrow();
            for at in (0..len).step_by(8) {
                let offset = addr - self.region_base + at;
                let got = words[(offset / 8) as usize];
                let want = match cmd {
                    1 => {
                        self.set64(VAL, got);
                        return 0;
                    }
                    2 => testdev::pattern_word(self.seed, offset),
                    _ => self.get64(VAL),
                };
                if got != want {
                    self.set64(WHERE, at);
                    return 1;
                }
            }
            0
        }
    }

    impl Registers for Model {
        fn read32(&self, offset: usize) -> u32 {
            match offset {
                ID => DEVICE_ID,
                CMD => 0,
                _ if !self.probe => 0,
                _ => self.regs.borrow()[offset / 4],
            }
        }

        fn write32(&self, offset: usize, value: u32) {
            if !self.probe {
                return;
            }
            match offset {
                CMD => {
                    let status = self.run(value);
                    self.regs.borrow_mut()[STATUS / 4] = status;
                }
                STATUS | WHERE => {}
                _ if offset + 4 == WHERE + 8 => {}
                _ => self.regs.borrow_mut()[offset / 4] = value,
            }
        }
    }

    #[test]
    fn test_check_pattern_intact_region_ok() {
        let dev = TestDev::with_registers(Model::new(true), 0x901_0000).unwrap();
        assert_eq!(dev.check_pattern(0x80_0000_0000, 4096), Ok(Status::Ok));
    }

    #[test]
    fn test_peek_and_mismatch_after_guest_write_reports_offset() {
        let model = Model::new(true);
        model.words.borrow_mut()[100] = 0x1234;
        let dev = TestDev::with_registers(model, 0x901_0000).unwrap();
        assert_eq!(dev.peek(0x80_0000_0000 + 800), Ok(0x1234));
        assert_eq!(
            dev.check_pattern(0x80_0000_0000 + 512, 1024),
            Ok(Status::Mismatch { at: 288 })
        );
        assert_eq!(
            dev.check_value(0x80_0000_0000 + 800, 8, 0x1234),
            Ok(Status::Ok)
        );
        assert_eq!(
            dev.check_value(0x80_0000_0000 + 792, 16, 0x1234),
            Ok(Status::Mismatch { at: 0 })
        );
    }

    #[test]
    fn test_outside_and_bad_requests_decoded() {
        let dev = TestDev::with_registers(Model::new(true), 0x901_0000).unwrap();
        assert_eq!(dev.check_pattern(0x4000_0000, 8), Ok(Status::Outside));
        assert_eq!(dev.check_pattern(0x80_0000_0004, 8), Ok(Status::BadRequest));
        assert_eq!(dev.check_pattern(0x80_0000_0000, 0), Ok(Status::BadRequest));
        assert!(dev.peek(0x4000_0000).unwrap_err().contains("OUTSIDE"));
    }

    #[test]
    fn test_device_without_probe_is_an_error_not_ok() {
        let dev = TestDev::with_registers(Model::new(false), 0x901_0000).unwrap();
        let err = dev.check_pattern(0x80_0000_0000, 8).unwrap_err();
        assert!(err.contains("no probe regions"), "{err}");
    }

    #[test]
    fn test_wrong_id_is_not_a_test_device() {
        #[derive(Debug)]
        struct Rtc;
        impl Registers for Rtc {
            fn read32(&self, _offset: usize) -> u32 {
                0x0014_1031
            }
            fn write32(&self, _offset: usize, _value: u32) {}
        }
        let err = TestDev::with_registers(Rtc, 0x901_0000).unwrap_err();
        assert!(err.contains("ID reads 0x141031"), "{err}");
    }
}
