//! MMIO device models and the bus that routes guest accesses to them.
//!
//! Everything here is plain Rust with no KVM dependency, so it builds and is unit-tested on any
//! host. The aarch64 KVM glue turns `KVM_EXIT_MMIO` exits into [`MmioBus::read`] /
//! [`MmioBus::write`] calls and implements [`IrqLine`] with `KVM_IRQ_LINE`.
//!
//! Guest input is untrusted: a device never panics on an access. Accesses it does not
//! understand (bad offset, bad size, write to a read-only register) are logged through a
//! [`WarnLimiter`] and ignored; such reads return zeroes.

pub mod pci;
pub mod pl011;
pub mod testdev;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A device on the MMIO bus. `offset` is relative to the device's base; `data.len()` is the
/// access size (1, 2, 4 or 8). Guest input: must never panic; bad accesses are logged
/// (log::warn!, rate-limited is fine) and ignored; reads of bad accesses leave `data`
/// zero-filled.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Where the guest's console text goes. The UART's bytes and the test device's PRINT lines
/// are kept apart, so a suite line never lands inside a kernel message the UART is halfway
/// through (the kernel writes a message a byte per trap, on any CPU).
pub trait ConsoleOut: Send {
    /// Bytes the UART transmitted, as they come.
    fn uart(&mut self, bytes: &[u8]);
    /// One or more whole lines the guest printed through the test device.
    fn lines(&mut self, text: &[u8]);
}

/// The console both devices write to.
pub type SharedConsole = Arc<Mutex<dyn ConsoleOut>>;

/// The UART's side of a [`SharedConsole`], as the writer [`pl011::Pl011`] takes.
pub struct UartOut(pub SharedConsole);

impl std::io::Write for UartOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).uart(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A level-triggered interrupt line into the interrupt controller (KVM_IRQ_LINE in the VMM,
/// a recorder in tests).
pub trait IrqLine: Send + Sync {
    fn set_level(&self, high: bool);
}

/// Why [`MmioBus::insert`] refused a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("MMIO range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    #[error("MMIO range at {base:#x} with length {len:#x} runs past the end of the address space")]
    Overflow { base: u64, len: u64 },
    #[error(
        "MMIO range [{base:#x}, +{len:#x}) overlaps the device at [{existing_base:#x}, +{existing_len:#x})"
    )]
    Overlap {
        base: u64,
        len: u64,
        existing_base: u64,
        existing_len: u64,
    },
}

/// One device's window on the bus: `[base, base + len)`.
struct BusRange {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

impl BusRange {
    /// Last address covered (inclusive), so a window may end at the top of the address space.
    fn last(&self) -> u64 {
        // Cannot overflow: `insert` checked it.
        self.base + (self.len - 1)
    }
}

/// The guest-physical MMIO address space: non-overlapping device windows sorted by base.
///
/// Shared by the vCPU threads as `Arc<MmioBus>`; each device sits behind its own mutex.
#[derive(Default)]
pub struct MmioBus {
    ranges: Vec<BusRange>,
}

impl fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.ranges
                    .iter()
                    .map(|r| format!("[{:#x}, +{:#x})", r.base, r.len)),
            )
            .finish()
    }
}

impl MmioBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Errors (thiserror) on zero length, overflow, or overlap with an existing device.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn MmioDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let last = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        let idx = self.ranges.partition_point(|r| r.base < base);
        let prev = idx.checked_sub(1).and_then(|i| self.ranges.get(i));
        let next = self.ranges.get(idx);
        let clash = prev
            .filter(|p| p.last() >= base)
            .or(next.filter(|n| n.base <= last));
        if let Some(existing) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                existing_base: existing.base,
                existing_len: existing.len,
            });
        }
        self.ranges.insert(idx, BusRange { base, len, dev });
        Ok(())
    }

    /// Dispatch; returns false when no device covers the WHOLE access [addr, addr+len)
    /// (accesses straddling a device's end are refused, not truncated). Reads fill `data`
    /// with 0 when refused.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// See [`MmioBus::read`].
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.dev).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// The device covering all of `[addr, addr + len)` and the access's offset in it.
    fn find(&self, addr: u64, len: usize) -> Option<(&BusRange, u64)> {
        let len = u64::try_from(len).ok().filter(|&l| l != 0)?;
        let last = addr.checked_add(len - 1)?;
        let idx = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(idx.checked_sub(1)?)?;
        (last <= range.last()).then(|| (range, addr - range.base))
    }
}

/// Locks `m` even when a thread panicked while holding it (a poisoned mutex): what the VMM's
/// mutexes guard (device models, the console, the fill's handles) is left memory-safe by an
/// interrupted access, and a device keeps serving the guest rather than taking the VMM down.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Rate limiter for guest-triggered warnings, so a misbehaving guest cannot flood the host
/// log: the first [`WarnLimiter::BURST`] events are logged, then only the 2^n-th ones.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    seen: u64,
}

impl WarnLimiter {
    const BURST: u64 = 16;

    pub(crate) fn warn(&mut self, device: &str, what: fmt::Arguments<'_>) {
        self.seen = self.seen.saturating_add(1);
        if self.seen <= Self::BURST || self.seen.is_power_of_two() {
            log::warn!(
                "{device}: {what} (ignored; {} bad guest accesses so far)",
                self.seen
            );
        }
    }
}

/// The value of a little-endian access of up to 8 bytes (extra bytes are ignored).
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .rev()
        .fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

/// Fills `data` with the low `data.len()` bytes of `value`, little-endian (zeroes past 8).
pub(crate) fn put_le_value(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(i).copied().unwrap_or(0);
    }
}

/// Helpers shared by the device tests.
#[cfg(test)]
pub(crate) mod test_utils {
    use super::IrqLine;
    use std::io::{self, Write};
    use std::sync::{Arc, Mutex};

    /// An [`IrqLine`] that records every `set_level` call.
    #[derive(Default)]
    pub(crate) struct RecordingIrq {
        levels: Mutex<Vec<bool>>,
    }

    impl RecordingIrq {
        pub(crate) fn levels(&self) -> Vec<bool> {
            self.levels.lock().unwrap().clone()
        }

        /// The current level (false if never set).
        pub(crate) fn level(&self) -> bool {
            self.levels().last().copied().unwrap_or(false)
        }
    }

    impl IrqLine for RecordingIrq {
        fn set_level(&self, high: bool) {
            self.levels.lock().unwrap().push(high);
        }
    }

    /// A `Write` sink whose contents the test can inspect.
    #[derive(Clone, Default)]
    pub(crate) struct SharedBuf(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl SharedBuf {
        pub(crate) fn contents(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A `Write` sink that always fails.
    pub(crate) struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    /// Deterministic PRNG (SplitMix64) for the fuzz-style tests.
    pub(crate) struct SplitMix64(pub(crate) u64);

    impl SplitMix64 {
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    /// One step decoded from a fuzz byte stream.
    #[derive(Debug)]
    pub(crate) enum FuzzOp<'a> {
        Read {
            offset: u64,
            size: usize,
        },
        Write {
            offset: u64,
            data: &'a [u8],
        },
        /// Host-side input (for devices that take any); others ignore it.
        Host(&'a [u8]),
    }

    /// Access sizes a fuzz step can pick: the legal ones plus a few illegal ones.
    const FUZZ_SIZES: [usize; 8] = [1, 2, 4, 8, 0, 3, 4, 16];

    /// Decodes a byte stream into device operations, the way a cargo-fuzz target would:
    /// `[kind, offset_lo, offset_hi, size_sel, payload...]` per step, where `kind & 3` picks
    /// read/write/host input and `kind & 0x80` moves the offset far above the device.
    pub(crate) fn decode_ops(mut bytes: &[u8]) -> Vec<FuzzOp<'_>> {
        let mut ops = Vec::new();
        while let [kind, lo, hi, size_sel, rest @ ..] = bytes {
            let mut offset = u64::from(u16::from_le_bytes([*lo, *hi]));
            if kind & 0x80 != 0 {
                offset |= u64::from(*kind) << 56;
            }
            let size = FUZZ_SIZES[usize::from(*size_sel) % FUZZ_SIZES.len()];
            let payload_len = match kind & 3 {
                0 => 0,
                1 => size,
                _ => usize::from(*size_sel),
            }
            .min(rest.len());
            let (payload, tail) = rest.split_at(payload_len);
            ops.push(match kind & 3 {
                0 => FuzzOp::Read { offset, size },
                1 => FuzzOp::Write {
                    offset,
                    data: payload,
                },
                _ => FuzzOp::Host(payload),
            });
            bytes = tail;
        }
        ops
    }

    /// A pseudo-random fuzz byte stream of about `steps` steps whose offsets mostly hit
    /// `interesting` (the device's registers), so the stream exercises real state changes.
    pub(crate) fn fuzz_stream(seed: u64, steps: usize, interesting: &[u64]) -> Vec<u8> {
        let mut rng = SplitMix64(seed);
        let mut out = Vec::new();
        for _ in 0..steps {
            let kind = match rng.below(100) {
                0..=44 => 0u8,
                45..=94 => 1,
                95..=97 => 2,
                _ => 0x80 | (rng.below(0x80) as u8 & !3) | (rng.below(2) as u8),
            };
            let offset = if rng.below(10) < 9 && !interesting.is_empty() {
                let base = interesting[rng.below(interesting.len() as u64) as usize];
                // Mostly aligned, sometimes one to three bytes off.
                base + if rng.below(20) == 0 { rng.below(4) } else { 0 }
            } else {
                rng.below(0x1_0000)
            };
            let size_sel = match rng.below(10) {
                0..=5 => 2u8, // 4 bytes
                _ => rng.below(256) as u8,
            };
            out.extend_from_slice(&[kind, offset as u8, (offset >> 8) as u8, size_sel]);
            let payload_len = match kind & 3 {
                0 => 0,
                1 => FUZZ_SIZES[usize::from(size_sel) % FUZZ_SIZES.len()],
                _ => usize::from(size_sel),
            };
            out.extend((0..payload_len).map(|_| rng.next_u64() as u8));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that records its accesses and answers reads with a fixed byte.
    #[derive(Default)]
    struct Probe {
        accesses: Vec<(char, u64, usize)>,
    }

    impl MmioDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.accesses.push(('r', offset, data.len()));
            data.fill(0xAB);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.accesses.push(('w', offset, data.len()));
        }
    }

    /// A device that panics on every access (to poison its mutex).
    struct Panicker;

    impl MmioDevice for Panicker {
        fn read(&mut self, _: u64, _: &mut [u8]) {
            panic!("device bug");
        }

        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn test_bus_insert_zero_length_errors() {
        // Arrange
        let mut bus = MmioBus::new();
        // Act
        let res = bus.insert(0x1000, 0, probe());
        // Assert
        assert_eq!(res, Err(BusError::ZeroLength { base: 0x1000 }));
    }

    #[test]
    fn test_bus_insert_overflow_errors() {
        // Arrange
        let mut bus = MmioBus::new();
        // Act
        let res = bus.insert(u64::MAX - 0xFFF, 0x1001, probe());
        // Assert
        assert_eq!(
            res,
            Err(BusError::Overflow {
                base: u64::MAX - 0xFFF,
                len: 0x1001
            })
        );
    }

    #[test]
    fn test_bus_insert_top_of_address_space_succeeds() {
        // Arrange
        let mut bus = MmioBus::new();
        let dev = probe();
        bus.insert(u64::MAX - 0xFFF, 0x1000, dev.clone()).unwrap();
        let mut data = [0u8; 8];
        // Act
        let hit = bus.read(u64::MAX - 7, &mut data);
        let miss = bus.read(u64::MAX - 6, &mut data);
        // Assert
        assert!(hit);
        assert!(!miss);
        assert_eq!(dev.lock().unwrap().accesses, [('r', 0xFF8, 8)]);
    }

    #[test]
    fn test_bus_insert_overlap_errors() {
        // Arrange
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, probe()).unwrap();
        bus.insert(0x3000, 0x1000, probe()).unwrap();
        // Act / Assert: overlaps with the start, the end, inside, and covering.
        for (base, len) in [
            (0x0800, 0x0801),
            (0x1FFF, 0x1),
            (0x1800, 0x10),
            (0x0, 0x10000),
            (0x2FFF, 0x2),
        ] {
            let res = bus.insert(base, len, probe());
            assert!(
                matches!(res, Err(BusError::Overlap { .. })),
                "{base:#x}+{len:#x}: {res:?}"
            );
        }
    }

    #[test]
    fn test_bus_insert_adjacent_succeeds_and_stays_sorted() {
        // Arrange
        let mut bus = MmioBus::new();
        // Act
        bus.insert(0x3000, 0x1000, probe()).unwrap();
        bus.insert(0x1000, 0x1000, probe()).unwrap();
        bus.insert(0x2000, 0x1000, probe()).unwrap();
        bus.insert(0x0FFF, 0x1, probe()).unwrap();
        // Assert
        let bases: Vec<u64> = bus.ranges.iter().map(|r| r.base).collect();
        assert_eq!(bases, [0x0FFF, 0x1000, 0x2000, 0x3000]);
    }

    #[test]
    fn test_bus_dispatch_in_range_passes_relative_offset() {
        // Arrange
        let mut bus = MmioBus::new();
        let a = probe();
        let b = probe();
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        bus.insert(0x2000, 0x1000, b.clone()).unwrap();
        let mut data = [0u8; 4];
        // Act
        let read_hit = bus.read(0x2010, &mut data);
        let write_hit = bus.write(0x1FFC, &[1, 2, 3, 4]);
        // Assert
        assert!(read_hit && write_hit);
        assert_eq!(data, [0xAB; 4]);
        assert_eq!(a.lock().unwrap().accesses, [('w', 0xFFC, 4)]);
        assert_eq!(b.lock().unwrap().accesses, [('r', 0x10, 4)]);
    }

    #[test]
    fn test_bus_access_straddling_end_is_refused_and_zeroed() {
        // Arrange
        let mut bus = MmioBus::new();
        let a = probe();
        let b = probe();
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        bus.insert(0x2000, 0x1000, b.clone()).unwrap();
        let mut data = [0xFFu8; 4];
        // Act
        let read_hit = bus.read(0x1FFE, &mut data);
        let write_hit = bus.write(0x1FFE, &[1, 2, 3, 4]);
        // Assert
        assert!(!read_hit && !write_hit);
        assert_eq!(data, [0; 4]);
        assert!(a.lock().unwrap().accesses.is_empty());
        assert!(b.lock().unwrap().accesses.is_empty());
    }

    #[test]
    fn test_bus_access_unmapped_or_empty_is_refused() {
        // Arrange
        let mut bus = MmioBus::new();
        let a = probe();
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        let mut data = [0xFFu8; 8];
        // Act / Assert
        assert!(!bus.read(0x0, &mut data));
        assert_eq!(data, [0; 8]);
        assert!(!bus.read(0x0FFF, &mut data[..2]));
        assert!(!bus.write(0x2000, &[0]));
        assert!(!bus.write(u64::MAX, &[0, 0]));
        assert!(!bus.read(0x1000, &mut []));
        assert!(!bus.write(0x1000, &[]));
        assert!(a.lock().unwrap().accesses.is_empty());
    }

    #[test]
    fn test_bus_poisoned_device_keeps_working() {
        // Arrange
        let mut bus = MmioBus::new();
        let dev: Arc<Mutex<dyn MmioDevice>> = Arc::new(Mutex::new(Panicker));
        bus.insert(0x1000, 0x1000, dev.clone()).unwrap();
        let bus = Arc::new(bus);
        let bus2 = bus.clone();
        let panicked = std::thread::spawn(move || {
            let mut data = [0u8; 4];
            bus2.read(0x1000, &mut data);
        })
        .join();
        assert!(panicked.is_err());
        assert!(dev.is_poisoned());
        // Act
        let hit = bus.write(0x1000, &[0; 4]);
        // Assert
        assert!(hit);
    }

    #[test]
    fn test_le_value_round_trip_matches_little_endian() {
        // Arrange
        let mut data = [0u8; 4];
        // Act
        put_le_value(&mut data, 0x1122_3344_5566);
        // Assert
        assert_eq!(data, [0x66, 0x55, 0x44, 0x33]);
        assert_eq!(le_value(&data), 0x3344_5566);
        assert_eq!(le_value(&[]), 0);
    }
}
