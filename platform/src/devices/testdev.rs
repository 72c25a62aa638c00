//! gracevm's test device: a 4 KiB page through which the guest reports to the VMM.
//!
//! Like Firecracker's boot timer, the guest's init writes a magic value when it reaches
//! userspace and the VMM records (and logs) the time since it started the VM: a boot-time
//! measurement without parsing the console.
//!
//! The register map, the commands and their status codes are the contract with the in-guest
//! suite and are documented once, in [`gracevm_contract::testdev`]: BOOT, ID, the probe
//! registers (ADDR, LEN, VAL, CMD, STATUS, WHERE) and POWER.
//!
//! The probe registers let the in-guest suite ask the VMM what *it* sees in guest memory, so a
//! test checks both sides: "the guest wrote X at offset O and it landed at carve-out offset O".
//! Only the observable regions the VMM registered (carve-outs, GPU memory) can be probed.
//! Once the guest asks for the fill (FILL), each carve-out holds [`pattern_word`]`(seed,
//! offset)` in every u64 until the guest writes it; while the VMM fills, a command that reads a
//! region answers [`STATUS_BUSY`].
//!
//! Every other access (other sizes, unaligned or reserved offsets, offsets at or beyond 0x1000,
//! writes to ID, wrong or repeated BOOT writes) is logged and ignored; such reads return 0.
//! PRINT hands the VMM a line of the suite's output in guest RAM: it goes to the console as
//! whole lines ([`super::ConsoleOut::lines`]), one trap instead of one per byte.
//!
//! To add a register: a `Reg` variant, its offset in `Reg::decode`, and its behaviour in
//! `read_reg` / `write_reg`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{le_value, lock, put_le_value, MmioDevice, SharedConsole, WarnLimiter};

const NAME: &str = "testdev";

// The register map, commands, status codes and boot pattern are the contract with the
// in-guest suite: one definition, in gracevm-contract.
pub use gracevm_contract::testdev::{
    pattern_word, Cmd, BOOT_MAGIC, DEVICE_ID, STATUS_BAD_REQUEST, STATUS_BUSY, STATUS_MISMATCH,
    STATUS_NONE, STATUS_OK, STATUS_OUTSIDE, STATUS_UNFILLED,
};
use gracevm_contract::testdev::{
    ACCESS_SIZE, ADDR as PROBE_FIRST, BOOT, ID, LAST as PROBE_LAST, POWER, POWER_OFF_MAGIC,
    PRINT_MAX, WINDOW_LEN,
};

/// A guest memory range the VMM lets the guest probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeRegion {
    pub base: u64,
    pub size: u64,
    pub seed: u64,
}

/// Where the boot-pattern fill of the probed regions stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillState {
    /// Nothing asked for it: the regions hold what the guest wrote over fresh (zero) memory.
    Unasked,
    Running,
    /// Finished (or abandoned because the run ended).
    Done,
}

/// The VMM could not read a checked range (not one mapping of guest memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable;

/// What every u64 of a checked range should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The same value everywhere (CHECK_VALUE).
    Value(u64),
    /// The boot pattern of a region with this seed, the range starting `offset` bytes into the
    /// region (CHECK_PATTERN).
    Pattern { seed: u64, offset: u64 },
}

impl Want {
    /// The same expectation for the part of the range starting `bytes` further on.
    pub fn advanced(self, bytes: u64) -> Self {
        match self {
            Want::Value(_) => self,
            Want::Pattern { seed, offset } => Want::Pattern {
                seed,
                offset: offset + bytes,
            },
        }
    }

    /// The index of the first of `words` words, `read(i)` each, that is not as wanted. Each
    /// expectation is its own loop with the expected word inlined: a 1 GiB region is 128 Mi
    /// words, and under nested emulation every instruction per word costs about a second.
    pub fn scan(self, words: usize, read: impl Fn(usize) -> u64) -> Option<usize> {
        match self {
            Want::Value(v) => scan(words, read, |_| v),
            Want::Pattern { seed, offset } => {
                scan(words, read, |i| pattern_word(seed, offset + 8 * i as u64))
            }
        }
    }
}

/// Eight words at a time without a branch per word; the block that differs is searched again
/// word by word.
fn scan(words: usize, read: impl Fn(usize) -> u64, want: impl Fn(usize) -> u64) -> Option<usize> {
    const BLOCK: usize = 8;
    let mut i = 0;
    while i < words {
        let end = (i + BLOCK).min(words);
        let differs = (i..end).fold(0, |acc, j| acc | (read(j) ^ want(j)));
        if differs != 0 {
            return (i..end).find(|&j| read(j) != want(j));
        }
        i = end;
    }
    None
}

/// The VMM's view of guest memory, for probes.
pub trait MemoryProbe: Send {
    /// Read guest-physical `gpa..gpa+buf.len()` from the VMM's backing; false if unmapped.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;

    /// The offset from `gpa` of the first u64 of `[gpa, gpa + len)` that is not what `want`
    /// says. `gpa` and `len` are multiples of 8. This default copies through
    /// [`MemoryProbe::read`]; the VMM compares on its mapping.
    fn first_mismatch(&self, gpa: u64, len: u64, want: Want) -> Result<Option<u64>, Unreadable> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            if !self.read(gpa + done, &mut buf[..n]) {
                return Err(Unreadable);
            }
            let found = want
                .advanced(done)
                .scan(n / 8, |i| word(&buf[8 * i..8 * i + 8]));
            if let Some(i) = found {
                return Ok(Some(done + 8 * i as u64));
            }
            done += n as u64;
        }
        Ok(None)
    }

    /// Where the boot-pattern fill stands.
    fn fill_state(&self) -> FillState;

    /// The guest asked for the fill (FILL): start it unless it started already.
    fn request_fill(&self);
}

/// A decoded register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Boot,
    Id,
    Power,
    /// One of the 32-bit halves at 0x008..=0x02C (index = (offset - 8) / 4).
    Probe(usize),
}

impl Reg {
    fn decode(offset: u64) -> Option<Self> {
        match offset {
            BOOT => Some(Self::Boot),
            ID => Some(Self::Id),
            POWER => Some(Self::Power),
            PROBE_FIRST..=PROBE_LAST if offset % 4 == 0 => {
                Some(Self::Probe(((offset - PROBE_FIRST) / 4) as usize))
            }
            _ => None,
        }
    }
}

/// The little-endian u64 in 8 bytes.
fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
}

/// Probe state: ADDR, LEN, VAL (lo/hi each), CMD (write-only), STATUS, WHERE lo/hi.
struct Probe {
    regs: [u32; 10],
    regions: Vec<ProbeRegion>,
    memory: Box<dyn MemoryProbe>,
    /// Where PRINT's text goes; without one PRINT is a bad request (the suite then writes to
    /// the UART).
    console: Option<SharedConsole>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("regs", &self.regs)
            .field("regions", &self.regions)
            .finish()
    }
}

const R_ADDR: usize = 0;
const R_LEN: usize = 2;
const R_VAL: usize = 4;
const R_CMD: usize = 6;
const R_STATUS: usize = 7;
const R_WHERE: usize = 8;

impl Probe {
    fn get64(&self, r: usize) -> u64 {
        u64::from(self.regs[r]) | (u64::from(self.regs[r + 1]) << 32)
    }

    fn set64(&mut self, r: usize, v: u64) {
        self.regs[r] = v as u32;
        self.regs[r + 1] = (v >> 32) as u32;
    }

    /// Run a command; returns STATUS.
    fn run(&mut self, raw: u32) -> u32 {
        let Some(cmd) = Cmd::from_raw(raw) else {
            return STATUS_BAD_REQUEST;
        };
        let fill = self.memory.fill_state();
        let addr = self.get64(R_ADDR);
        let len = match cmd {
            // PRINT does not touch the regions the fill writes.
            Cmd::Print => return self.print(),
            Cmd::Fill => {
                self.memory.request_fill();
                return STATUS_OK;
            }
            Cmd::AwaitFill => {
                return match fill {
                    FillState::Unasked => STATUS_UNFILLED,
                    FillState::Running => STATUS_BUSY,
                    FillState::Done => STATUS_OK,
                }
            }
            Cmd::Peek => 8,
            Cmd::CheckPattern | Cmd::CheckValue => self.get64(R_LEN),
        };
        if addr % 8 != 0 || len == 0 || len % 8 != 0 {
            return STATUS_BAD_REQUEST;
        }
        let Some(end) = addr.checked_add(len) else {
            return STATUS_BAD_REQUEST;
        };
        let Some(region) = self
            .regions
            .iter()
            .copied()
            .find(|r| addr >= r.base && end <= r.base + r.size)
        else {
            return STATUS_OUTSIDE;
        };
        // A well-formed request that reads a region waits for a running fill; a pattern
        // nothing asked for is not there to compare.
        match (fill, cmd) {
            (FillState::Running, _) => return STATUS_BUSY,
            (FillState::Unasked, Cmd::CheckPattern) => return STATUS_UNFILLED,
            _ => {}
        }
        let value = self.get64(R_VAL);
        let want = match cmd {
            Cmd::Peek => {
                let mut bytes = [0u8; 8];
                if !self.memory.read(addr, &mut bytes) {
                    return STATUS_OUTSIDE;
                }
                self.set64(R_VAL, word(&bytes));
                return STATUS_OK;
            }
            Cmd::CheckPattern => Want::Pattern {
                seed: region.seed,
                offset: addr - region.base,
            },
            _ => Want::Value(value),
        };
        match self.memory.first_mismatch(addr, len, want) {
            Err(Unreadable) => STATUS_OUTSIDE,
            Ok(None) => STATUS_OK,
            Ok(Some(at)) => {
                self.set64(R_WHERE, at);
                STATUS_MISMATCH
            }
        }
    }

    /// PRINT: LEN bytes of guest memory at ADDR to the console, whatever the fill is doing.
    fn print(&mut self) -> u32 {
        let (addr, len) = (self.get64(R_ADDR), self.get64(R_LEN));
        let Some(console) = &self.console else {
            return STATUS_BAD_REQUEST;
        };
        if len == 0 || len > PRINT_MAX {
            return STATUS_BAD_REQUEST;
        }
        let mut text = vec![0u8; len as usize];
        if !self.memory.read(addr, &mut text) {
            return STATUS_OUTSIDE;
        }
        lock(console).lines(&text);
        STATUS_OK
    }
}

/// The guest→VMM test/boot-timer device.
#[derive(Debug)]
pub struct TestDev {
    start: Instant,
    boot_time: Option<Duration>,
    /// Set when the guest writes POWER_OFF_MAGIC to POWER; the VMM's event loop watches it.
    power_off: Arc<AtomicBool>,
    probe: Option<Probe>,
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
            power_off: Arc::default(),
            probe: None,
            warn: WarnLimiter::default(),
        }
    }

    /// Raised when the guest asks for a power-off through POWER.
    pub fn power_off_flag(&self) -> Arc<AtomicBool> {
        self.power_off.clone()
    }

    /// Enable the probe registers over `regions`, read through `memory`.
    pub fn with_probe(mut self, regions: Vec<ProbeRegion>, memory: Box<dyn MemoryProbe>) -> Self {
        let mut regs = [0; 10];
        regs[R_STATUS] = STATUS_NONE;
        self.probe = Some(Probe {
            regs,
            regions,
            memory,
            console: None,
        });
        self
    }

    /// Let the guest print through PRINT to `console` (needs [`TestDev::with_probe`] first).
    pub fn with_console(mut self, console: SharedConsole) -> Self {
        if let Some(probe) = &mut self.probe {
            probe.console = Some(console);
        }
        self
    }

    /// Time from `start` to the guest's first [`BOOT_MAGIC`] write, if it has happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    fn read_reg(&self, reg: Reg) -> u32 {
        match reg {
            Reg::Boot => u32::from(self.boot_time.is_some()),
            Reg::Id => DEVICE_ID,
            Reg::Power => 0,
            Reg::Probe(R_CMD) => 0,
            Reg::Probe(i) => self.probe.as_ref().map_or(0, |p| p.regs[i]),
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
            Reg::Power if value != POWER_OFF_MAGIC => {
                Err("POWER write of a value other than POWER_OFF_MAGIC")
            }
            Reg::Power => {
                log::info!("guest asked the test device to power off (its kernel cannot)");
                self.power_off.store(true, Ordering::Release);
                Ok(())
            }
            Reg::Probe(i) => {
                let Some(probe) = self.probe.as_mut() else {
                    return Err("probe register written but this VM has no probe regions");
                };
                match i {
                    R_CMD => {
                        probe.regs[R_STATUS] = probe.run(value);
                        Ok(())
                    }
                    R_STATUS | R_WHERE | 9 => Err("write to a read-only probe register"),
                    _ => {
                        probe.regs[i] = value;
                        Ok(())
                    }
                }
            }
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

    const CMD: u64 = 0x020;
    const STATUS: u64 = 0x024;

    /// Guest memory of one region at 0x1_0000 (64 KiB) filled with the boot pattern.
    struct FakeMemory(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    const REGION: ProbeRegion = ProbeRegion {
        base: 0x1_0000,
        size: 0x1_0000,
        seed: 0xabcd_0000_0000_0004,
    };

    impl MemoryProbe for FakeMemory {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let mem = self.0.lock().unwrap();
            let Some(off) = gpa.checked_sub(REGION.base) else {
                return false;
            };
            let Some(src) = mem.get(off as usize..off as usize + buf.len()) else {
                return false;
            };
            buf.copy_from_slice(src);
            true
        }

        fn fill_state(&self) -> FillState {
            FillState::Done
        }

        fn request_fill(&self) {}
    }

    fn probed() -> (TestDev, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
        let mem: Vec<u8> = (0..REGION.size / 8)
            .flat_map(|i| pattern_word(REGION.seed, i * 8).to_le_bytes())
            .collect();
        let mem = std::sync::Arc::new(std::sync::Mutex::new(mem));
        let dev =
            started_a_second_ago().with_probe(vec![REGION], Box::new(FakeMemory(mem.clone())));
        (dev, mem)
    }

    fn probe(dev: &mut TestDev, cmd: Cmd, addr: u64, len: u64, val: u64) -> u32 {
        write32(dev, 0x08, addr as u32);
        write32(dev, 0x0C, (addr >> 32) as u32);
        write32(dev, 0x10, len as u32);
        write32(dev, 0x14, (len >> 32) as u32);
        write32(dev, 0x18, val as u32);
        write32(dev, 0x1C, (val >> 32) as u32);
        write32(dev, CMD, cmd as u32);
        read32(dev, STATUS)
    }

    /// Memory whose fill starts when asked and ends when the test says.
    struct LazyMemory(FakeMemory, Arc<std::sync::Mutex<FillState>>);

    impl MemoryProbe for LazyMemory {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            self.0.read(gpa, buf)
        }

        fn fill_state(&self) -> FillState {
            *self.1.lock().unwrap()
        }

        fn request_fill(&self) {
            let mut state = self.1.lock().unwrap();
            if *state == FillState::Unasked {
                *state = FillState::Running;
            }
        }
    }

    #[test]
    fn test_probe_fill_only_when_asked_and_busy_until_done() {
        let (_, mem) = probed();
        let state = Arc::new(std::sync::Mutex::new(FillState::Unasked));
        let lazy = LazyMemory(FakeMemory(mem), state.clone());
        let mut dev = started_a_second_ago().with_probe(vec![REGION], Box::new(lazy));
        let (base, size) = (REGION.base, REGION.size);
        // Nothing asked: no pattern to compare or wait for, but memory reads as it is.
        assert_eq!(probe(&mut dev, Cmd::AwaitFill, 0, 0, 0), STATUS_UNFILLED);
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, base, size, 0),
            STATUS_UNFILLED
        );
        assert_eq!(probe(&mut dev, Cmd::Peek, base, 0, 0), STATUS_OK);
        assert_eq!(probe(&mut dev, Cmd::Fill, 0, 0, 0), STATUS_OK);
        assert_eq!(*state.lock().unwrap(), FillState::Running);
        assert_eq!(probe(&mut dev, Cmd::AwaitFill, 0, 0, 0), STATUS_BUSY);
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, base, size, 0),
            STATUS_BUSY,
            "no check reads a region being filled"
        );
        assert_eq!(probe(&mut dev, Cmd::Peek, base, 0, 0), STATUS_BUSY);
        // What needs no memory is answered while the fill runs.
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, base + 4, 8, 0),
            STATUS_BAD_REQUEST
        );
        assert_eq!(probe(&mut dev, Cmd::CheckPattern, 0, 8, 0), STATUS_OUTSIDE);
        // A second FILL does not restart anything.
        assert_eq!(probe(&mut dev, Cmd::Fill, 0, 0, 0), STATUS_OK);
        *state.lock().unwrap() = FillState::Done;
        assert_eq!(probe(&mut dev, Cmd::AwaitFill, 0, 0, 0), STATUS_OK);
        assert_eq!(probe(&mut dev, Cmd::CheckPattern, base, size, 0), STATUS_OK);
    }

    #[test]
    fn test_probe_status_none_before_any_command() {
        let (mut dev, _) = probed();
        assert_eq!(read32(&mut dev, STATUS), STATUS_NONE);
    }

    #[test]
    fn test_probe_pattern_intact_is_ok() {
        let (mut dev, _) = probed();
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, REGION.base, REGION.size, 0),
            STATUS_OK
        );
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, REGION.base + 0x800, 0x100, 0),
            STATUS_OK
        );
    }

    #[test]
    fn test_probe_guest_write_seen_by_peek_and_mismatch_located() {
        let (mut dev, mem) = probed();
        mem.lock().unwrap()[0x208..0x210].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(
            probe(&mut dev, Cmd::Peek, REGION.base + 0x208, 0, 0),
            STATUS_OK
        );
        assert_eq!(read32(&mut dev, 0x18), 0x5566_7788);
        assert_eq!(read32(&mut dev, 0x1C), 0x1122_3344);
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, REGION.base + 0x200, 0x100, 0),
            STATUS_MISMATCH
        );
        assert_eq!(read32(&mut dev, 0x28), 0x8);
    }

    #[test]
    fn test_probe_check_value_zeroed_region() {
        let (mut dev, mem) = probed();
        mem.lock().unwrap().fill(0);
        assert_eq!(
            probe(&mut dev, Cmd::CheckValue, REGION.base, REGION.size, 0),
            STATUS_OK
        );
        assert_eq!(
            probe(&mut dev, Cmd::CheckValue, REGION.base, REGION.size, 1),
            STATUS_MISMATCH
        );
    }

    #[test]
    fn test_probe_outside_regions_and_bad_requests_refused() {
        let (mut dev, _) = probed();
        assert_eq!(probe(&mut dev, Cmd::Peek, 0x0, 0, 0), STATUS_OUTSIDE);
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, REGION.base, REGION.size + 8, 0),
            STATUS_OUTSIDE
        );
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, REGION.base + 4, 8, 0),
            STATUS_BAD_REQUEST
        );
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, REGION.base, 0, 0),
            STATUS_BAD_REQUEST
        );
        assert_eq!(
            probe(&mut dev, Cmd::CheckPattern, u64::MAX - 7, 16, 0),
            STATUS_BAD_REQUEST
        );
        write32(&mut dev, CMD, 99);
        assert_eq!(read32(&mut dev, STATUS), STATUS_BAD_REQUEST);
    }

    #[test]
    fn test_probe_without_regions_ignores_writes() {
        let mut dev = started_a_second_ago();
        write32(&mut dev, CMD, Cmd::Peek as u32);
        assert_eq!(read32(&mut dev, STATUS), 0);
    }

    /// A console recording what each side wrote.
    #[derive(Default)]
    struct Recorder {
        uart: Vec<u8>,
        lines: Vec<Vec<u8>>,
    }

    impl crate::devices::ConsoleOut for Recorder {
        fn uart(&mut self, bytes: &[u8]) {
            self.uart.extend_from_slice(bytes);
        }

        fn lines(&mut self, text: &[u8]) {
            self.lines.push(text.to_vec());
        }
    }

    #[test]
    fn test_print_passes_guest_text_to_the_console_even_while_filling() {
        let (_, mem) = probed();
        mem.lock().unwrap()[0x100..0x10c].copy_from_slice(b"ok 1 first\n\0");
        let busy = LazyMemory(
            FakeMemory(mem),
            Arc::new(std::sync::Mutex::new(FillState::Running)),
        );
        let console = Arc::new(std::sync::Mutex::new(Recorder::default()));
        let mut dev = started_a_second_ago()
            .with_probe(vec![REGION], Box::new(busy))
            .with_console(console.clone());
        assert_eq!(
            probe(&mut dev, Cmd::Print, REGION.base + 0x100, 11, 0),
            STATUS_OK
        );
        assert_eq!(console.lock().unwrap().lines, [b"ok 1 first\n".to_vec()]);
        assert!(console.lock().unwrap().uart.is_empty());
    }

    #[test]
    fn test_print_bad_lengths_unbacked_memory_and_no_console_refused() {
        let (dev, _) = probed();
        let console = Arc::new(std::sync::Mutex::new(Recorder::default()));
        let mut dev = dev.with_console(console.clone());
        for len in [0, PRINT_MAX + 1, u64::MAX] {
            assert_eq!(
                probe(&mut dev, Cmd::Print, REGION.base, len, 0),
                STATUS_BAD_REQUEST,
                "length {len}"
            );
        }
        assert_eq!(probe(&mut dev, Cmd::Print, 0x0, 8, 0), STATUS_OUTSIDE);
        assert_eq!(
            probe(&mut dev, Cmd::Print, REGION.base + REGION.size - 4, 8, 0),
            STATUS_OUTSIDE
        );
        assert!(console.lock().unwrap().lines.is_empty());
        let (mut silent, _) = probed();
        assert_eq!(
            probe(&mut silent, Cmd::Print, REGION.base, 8, 0),
            STATUS_BAD_REQUEST
        );
    }

    #[test]
    fn test_power_register_raises_flag_only_on_magic() {
        let mut dev = TestDev::new(Instant::now());
        let flag = dev.power_off_flag();
        write32(&mut dev, POWER, 0x1234);
        assert!(!flag.load(Ordering::Acquire));
        assert_eq!(read32(&mut dev, POWER), 0);
        write32(&mut dev, POWER, POWER_OFF_MAGIC);
        assert!(flag.load(Ordering::Acquire));
    }
}
