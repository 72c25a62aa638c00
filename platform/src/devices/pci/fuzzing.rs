//! Byte-stream drivers for the PCI models: the bodies of the cargo-fuzz targets in
//! `platform/fuzz/` (`ecam`, `gpu_bar0`), also run by the deterministic unit tests.
//!
//! A stream is a sequence of [`RECORD_LEN`]-byte records `[op, addr (4 bytes LE), size_sel,
//! data (8 bytes)]` (a trailing partial record is ignored). `size_sel & 15` picks the access
//! size from [`SIZES`] (mostly legal sizes, some illegal ones); `op` picks the operation (see
//! [`EcamHarness`] and [`Bar0Harness`]). Each driver panics only when an invariant breaks,
//! which is what the fuzzer looks for.

use std::sync::Arc;
use std::time::Duration;

use super::bridge::ECAM_BUS_SIZE;
use super::config::{
    CAPABILITIES_POINTER, COMMAND_WRITABLE, DEVICE_ID, STATUS, STATUS_CAP_LIST, VENDOR_ID,
};
use super::gpu::{
    BAR0_SIZE, C2C_LINK_STATUS, GB200_DEVICE_ID, GH200_DEVICE_ID, HBM_TRAINING_STATUS,
    NVIDIA_VENDOR_ID,
};
use super::{
    GpuConfig, GpuFunction, ManualClock, PciFunction, PciHost, PciRoot, PciWindows, Readiness,
};
use crate::devices::MmioBus;

/// Length of one record.
pub const RECORD_LEN: usize = 14;
/// Access sizes a record can pick (`size_sel & 15`).
pub const SIZES: [usize; 16] = [1, 2, 4, 4, 4, 8, 1, 2, 4, 0, 3, 5, 16, 4, 2, 1];

/// One decoded record.
#[derive(Debug, Clone, Copy)]
struct Record {
    op: u8,
    addr: u32,
    size: usize,
    /// The record's 8 data bytes, twice (a 16-byte access takes all of it).
    data: [u8; 16],
}

fn records(bytes: &[u8]) -> impl Iterator<Item = Record> + '_ {
    bytes.chunks_exact(RECORD_LEN).map(|r| {
        let mut data = [0u8; 16];
        data[..8].copy_from_slice(&r[6..14]);
        data[8..].copy_from_slice(&r[6..14]);
        Record {
            op: r[0],
            addr: u32::from_le_bytes([r[1], r[2], r[3], r[4]]),
            size: SIZES[usize::from(r[5] & 15)],
            data,
        }
    })
}

/// What a run reached, so tests can check a stream did more than bounce off.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    pub steps: u64,
    /// Accesses the MMIO bus delivered to a BAR window (or, for `gpu_bar0`, legal BAR0 reads).
    pub bar_hits: u64,
    /// Bytes of 0xFF read from a readiness register.
    pub ready_bytes: u64,
}

/// Two GPU functions behind a host bridge on an [`MmioBus`], driven through the bus.
///
/// `op & 7`: 0/1 ECAM read/write, 2/3 32-bit window read/write, 4/5 64-bit window read/write,
/// 6 advance the clock by `addr & 0xFFFF` ms, 7 with `op & 0x20` what an OS does to set a
/// function up (place device `(addr >> 16) & 1`'s BAR0 at 32-bit window base +
/// `(addr & 0x1F) << 24` and set COMMAND to memory | bus master, through ECAM), and without it
/// an access at a window's end (`op & 0x10` = write). `op & 8` makes the address structured:
/// ECAM accesses go to device `(addr >> 16) & 3` (0 and 1 exist), register `addr & 0xFFF`;
/// window accesses go to device `addr >> 31`'s current BAR0 address plus, with `op & 0x40`,
/// a readiness register (or a neighbour), else `addr & 0xFF_FFFF`.
/// Otherwise `addr` is an offset into the window.
pub struct EcamHarness {
    host: PciHost,
    bus: MmioBus,
    clock: Arc<ManualClock>,
    windows: PciWindows,
    stats: RunStats,
}

impl Default for EcamHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl EcamHarness {
    /// The windows of the platform's memory map (platform-boot.md).
    pub const WINDOWS: PciWindows = PciWindows {
        ecam_base: 0x3F00_0000,
        ecam_size: 16 * ECAM_BUS_SIZE,
        mmio32: (0x1000_0000, 0x2F00_0000),
        mmio64: (0xC0_0000_0000, 0x40_0000_0000),
    };
    /// Device 0: GB200 (DVSEC, ready after 1 s); device 1: GH200 (ready).
    const DEVICE_IDS: [u16; 2] = [GB200_DEVICE_ID, GH200_DEVICE_ID];

    pub fn new() -> Self {
        let clock = Arc::new(ManualClock::new());
        let mut root = PciRoot::new(Self::WINDOWS).expect("valid windows");
        let gpus = [
            (GB200_DEVICE_ID, true, Readiness::DelayMs(1000)),
            (GH200_DEVICE_ID, false, Readiness::Ready),
        ];
        for (device, (device_id, blackwell_dvsec, readiness)) in gpus.into_iter().enumerate() {
            let cfg = GpuConfig {
                device_id,
                blackwell_dvsec,
                readiness,
            };
            root.add_function(device as u8, Box::new(GpuFunction::new(cfg, clock.clone())))
                .expect("free device");
        }
        let host = PciHost::new(root);
        let mut bus = MmioBus::new();
        for w in host.mmio_windows() {
            bus.insert(w.base, w.len, w.device)
                .expect("disjoint windows");
        }
        Self {
            host,
            bus,
            clock,
            windows: Self::WINDOWS,
            stats: RunStats::default(),
        }
    }

    /// Runs every record of `bytes`, checking invariants after each.
    pub fn run(&mut self, bytes: &[u8]) -> RunStats {
        for rec in records(bytes) {
            self.step(rec);
            self.check_invariants();
            self.stats.steps += 1;
        }
        self.stats
    }

    fn step(&mut self, rec: Record) {
        let structured = rec.op & 8 != 0;
        let w = self.windows;
        match rec.op & 7 {
            op @ (0 | 1) => {
                let offset = if structured {
                    u64::from((rec.addr >> 16) & 3) << 15 | u64::from(rec.addr & 0xFFF)
                } else {
                    u64::from(rec.addr) % w.ecam_size
                };
                self.access(w.ecam_base + offset, op == 1, rec, Target::Ecam(offset));
            }
            op @ 2..=5 => {
                let (base, _) = if op < 4 { w.mmio32 } else { w.mmio64 };
                let addr = if structured {
                    let device = (rec.addr >> 31) as u8;
                    let offset = if rec.op & 0x40 != 0 {
                        status_offset(rec.addr)
                    } else {
                        u64::from(rec.addr & 0xFF_FFFF)
                    };
                    self.bar0_address(device).wrapping_add(offset)
                } else {
                    base + u64::from(rec.addr)
                };
                // A structured address may land outside the BAR windows (the guest can
                // place a BAR anywhere, even over ECAM): then it is just some bus access.
                let in_window = [w.mmio32, w.mmio64]
                    .iter()
                    .any(|&(base, len)| addr.wrapping_sub(base) < len);
                let target = if in_window {
                    Target::Bar
                } else {
                    Target::Other
                };
                self.access(addr, op & 1 == 1, rec, target);
            }
            6 => self
                .clock
                .advance(Duration::from_millis(u64::from(rec.addr & 0xFFFF))),
            _ if rec.op & 0x20 != 0 => {
                let function = w.ecam_base + (u64::from((rec.addr >> 16) & 1) << 15);
                let bar0 = w.mmio32.0 + (u64::from(rec.addr & 0x1F) << 24);
                self.bus
                    .write(function + 0x10, &(bar0 as u32).to_le_bytes());
                self.bus.write(function + 0x04, &0x6u16.to_le_bytes());
            }
            _ => {
                let (base, len) = match rec.addr % 3 {
                    0 => (w.ecam_base, w.ecam_size),
                    1 => w.mmio32,
                    _ => w.mmio64,
                };
                let addr = base + len - u64::from((rec.addr >> 8) & 0xF);
                self.access(addr, rec.op & 0x10 != 0, rec, Target::Other);
            }
        }
    }

    fn access(&mut self, addr: u64, write: bool, rec: Record, target: Target) {
        let size = rec.size;
        if write {
            let hit = self.bus.write(addr, &rec.data[..size]);
            if hit && target == Target::Bar {
                self.stats.bar_hits += 1;
            }
            return;
        }
        let mut data = [0xA5u8; 16];
        let data = &mut data[..size];
        let hit = self.bus.read(addr, data);
        if !hit {
            assert!(
                data.iter().all(|&b| b == 0),
                "refused read at {addr:#x}/{size}"
            );
            return;
        }
        match target {
            Target::Ecam(offset) => {
                let legal = matches!(size, 1 | 2 | 4) && offset % size as u64 == 0;
                let device = (offset >> 15) & 0x1F;
                let function = (offset >> 12) & 7;
                let absent = offset >= ECAM_BUS_SIZE || function != 0 || device >= 2;
                if !legal {
                    assert!(data.iter().all(|&b| b == 0), "bad ECAM read {offset:#x}");
                } else if absent {
                    assert!(data.iter().all(|&b| b == 0xFF), "absent {offset:#x}");
                }
            }
            Target::Bar => {
                self.stats.bar_hits += 1;
                self.check_bar_bytes(addr, data);
            }
            Target::Other => {}
        }
    }

    /// BAR reads return 0, or 0xFF in a readiness register's low byte.
    fn check_bar_bytes(&mut self, addr: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if b == 0 {
                continue;
            }
            assert_eq!(b, 0xFF, "BAR byte at {addr:#x}+{i}");
            let at = addr + i as u64;
            let hit_status = (0..2).any(|d| {
                let base = self.bar0_address(d);
                matches!(at.wrapping_sub(base), C2C_LINK_STATUS | HBM_TRAINING_STATUS)
            });
            assert!(hit_status, "0xFF outside a status register at {at:#x}");
            self.stats.ready_bytes += 1;
        }
    }

    /// Device `device`'s current BAR0 address (whatever the guest programmed).
    fn bar0_address(&self, device: u8) -> u64 {
        self.host
            .lock()
            .function(device)
            .and_then(|f| f.config().bar_range(0))
            .map_or(0, |(base, _)| base)
    }

    fn check_invariants(&self) {
        let root = self.host.lock();
        for (device, &device_id) in Self::DEVICE_IDS.iter().enumerate() {
            let f = root.function(device as u8).expect("populated");
            check_gpu_config(f, device_id);
        }
    }
}

/// Which part of the platform an access was aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ecam(u64),
    Bar,
    /// Window edges, or a BAR placed outside the BAR windows.
    Other,
}

/// Read-only identity and writable-bit discipline of a GPU function's header.
fn check_gpu_config(f: &dyn PciFunction, device_id: u16) {
    let cs = f.config();
    assert_eq!(cs.get16(VENDOR_ID), NVIDIA_VENDOR_ID);
    assert_eq!(cs.get16(DEVICE_ID), device_id);
    assert_eq!(cs.get16(STATUS), STATUS_CAP_LIST);
    assert_eq!(cs.get8(CAPABILITIES_POINTER), 0x40);
    assert_eq!(cs.command() & !COMMAND_WRITABLE, 0);
    let (bar0, size) = cs.bar_range(0).expect("BAR0");
    assert_eq!(size, BAR0_SIZE);
    assert_eq!(bar0 % BAR0_SIZE, 0);
    assert_eq!(bar0 >> 32, 0);
}

/// A BAR0 offset at or near a readiness register: `addr & 3` picks C2C, HBM, or the
/// register below either, `(addr >> 2) & 7` is added (so unaligned and wide accesses happen).
fn status_offset(addr: u32) -> u64 {
    let regs = [
        C2C_LINK_STATUS,
        HBM_TRAINING_STATUS,
        C2C_LINK_STATUS - 4,
        HBM_TRAINING_STATUS - 4,
    ];
    regs[(addr & 3) as usize] + u64::from((addr >> 2) & 7)
}

/// Runs [`EcamHarness`] over `bytes` (the `ecam` fuzz target).
pub fn fuzz_ecam(bytes: &[u8]) -> RunStats {
    EcamHarness::new().run(bytes)
}

/// A GB200 function's BAR0 driven directly.
///
/// `op & 3`: 0 read, 1 write, 2 advance the clock by `addr & 0xFFFF` ms, 3 a config access
/// (`op & 4` = write) at register `addr & 0xFFF`. For BAR accesses the BAR index is 0 unless
/// `op & 0x20` (then `(op >> 2) & 7`); `op & 0x40` aims at the readiness registers (`addr & 3`
/// picks one of them or a neighbour, plus `(addr >> 2) & 7`); `op & 0x80` puts `addr` in the
/// offset's upper half too.
pub struct Bar0Harness {
    gpu: GpuFunction,
    clock: Arc<ManualClock>,
    was_ready: bool,
    stats: RunStats,
}

impl Default for Bar0Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Bar0Harness {
    pub fn new() -> Self {
        let clock = Arc::new(ManualClock::new());
        let cfg = GpuConfig {
            device_id: GB200_DEVICE_ID,
            blackwell_dvsec: true,
            readiness: Readiness::DelayMs(500),
        };
        Self {
            gpu: GpuFunction::new(cfg, clock.clone()),
            clock,
            was_ready: false,
            stats: RunStats::default(),
        }
    }

    /// Runs every record of `bytes`, checking invariants after each.
    pub fn run(&mut self, bytes: &[u8]) -> RunStats {
        for rec in records(bytes) {
            self.step(rec);
            let ready = self.gpu.is_ready();
            assert!(ready || !self.was_ready, "readiness went back");
            self.was_ready = ready;
            check_gpu_config(&self.gpu, GB200_DEVICE_ID);
            self.stats.steps += 1;
        }
        self.stats
    }

    fn step(&mut self, rec: Record) {
        let size = rec.size;
        match rec.op & 3 {
            2 => self
                .clock
                .advance(Duration::from_millis(u64::from(rec.addr & 0xFFFF))),
            3 => {
                let reg = u64::from(rec.addr & 0xFFF);
                if rec.op & 4 != 0 {
                    self.gpu.config_write(reg, &rec.data[..size]);
                } else {
                    let mut data = [0u8; 16];
                    self.gpu.config_read(reg, &mut data[..size]);
                }
            }
            op => {
                let bar = if rec.op & 0x20 != 0 {
                    usize::from((rec.op >> 2) & 7)
                } else {
                    0
                };
                let mut offset = if rec.op & 0x40 != 0 {
                    status_offset(rec.addr)
                } else {
                    u64::from(rec.addr)
                };
                if rec.op & 0x80 != 0 {
                    offset |= u64::from(rec.addr) << 32;
                }
                if op == 1 {
                    self.gpu.bar_write(bar, offset, &rec.data[..size]);
                    return;
                }
                let mut data = [0xA5u8; 16];
                let data = &mut data[..size];
                self.gpu.bar_read(bar, offset, data);
                let legal = bar == 0
                    && matches!(size, 1 | 2 | 4 | 8)
                    && offset % size as u64 == 0
                    && offset < BAR0_SIZE;
                for (i, &b) in data.iter().enumerate() {
                    let at = offset.wrapping_add(i as u64);
                    let status = matches!(at, C2C_LINK_STATUS | HBM_TRAINING_STATUS);
                    let expected = if legal && status && self.gpu.is_ready() {
                        0xFF
                    } else {
                        0
                    };
                    assert_eq!(b, expected, "BAR{bar} byte at {offset:#x}+{i}");
                    if b == 0xFF {
                        self.stats.ready_bytes += 1;
                    }
                }
                if legal {
                    self.stats.bar_hits += 1;
                }
            }
        }
    }
}

/// Runs [`Bar0Harness`] over `bytes` (the `gpu_bar0` fuzz target).
pub fn fuzz_gpu_bar0(bytes: &[u8]) -> RunStats {
    Bar0Harness::new().run(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_utils::SplitMix64;

    /// One record: `[op, addr, size_sel, data]`.
    fn record(op: u8, addr: u32, size_sel: u8, data: u64) -> Vec<u8> {
        let mut r = vec![op];
        r.extend_from_slice(&addr.to_le_bytes());
        r.push(size_sel);
        r.extend_from_slice(&data.to_le_bytes());
        r
    }

    /// `size_sel` for 4-byte accesses.
    const S4: u8 = 2;

    /// A stream that does what Linux does: size and place both BAR0s, enable decoding, then
    /// poll the readiness registers; plus pseudo-random records. Every `n`th step follows
    /// the script.
    fn stream(seed: u64, steps: usize, ecam: bool) -> Vec<u8> {
        let mut rng = SplitMix64(seed);
        let mut out = Vec::with_capacity(steps * RECORD_LEN);
        for step in 0..steps {
            let rec = match (ecam, step % 8, rng.below(4)) {
                // ECAM: program device d's BAR0 inside the 32-bit window, enable memory.
                (true, 0, d @ 0..=1) => {
                    let d = d as u32;
                    let bar = 0x1000_0000 + (rng.below(0x20) << 24) as u32;
                    record(8 | 1, (d << 16) | 0x10, S4, u64::from(bar))
                }
                (true, 1, d @ 0..=1) => {
                    record(8 | 1, ((d as u32) << 16) | 0x4, S4, rng.below(8) * 2)
                }
                // ECAM: poll readiness through device d's BAR0.
                (true, 2..=4, d) => {
                    let status = [C2C_LINK_STATUS, HBM_TRAINING_STATUS][(d & 1) as usize];
                    let addr = ((d as u32 >> 1) << 31) | status as u32;
                    record(8 | 2, addr, [S4, 0, 1, 5][rng.below(4) as usize], 0)
                }
                (false, 0..=3, _) => {
                    let op = 0x40 | rng.below(4) as u8;
                    record(op, rng.below(32) as u32, S4, rng.next_u64())
                }
                _ => {
                    let mut r = record(
                        rng.next_u64() as u8,
                        rng.next_u64() as u32,
                        rng.next_u64() as u8,
                        rng.next_u64(),
                    );
                    // Keep clock steps small and mostly hit device 0/1 registers.
                    if r[0] & 7 == 6 {
                        r[2] = 0;
                        r[1] &= 0x1F;
                    }
                    r
                }
            };
            out.extend_from_slice(&rec);
        }
        out
    }

    #[test]
    fn test_fuzz_ecam_stream_keeps_invariants() {
        // Arrange
        let bytes = stream(0xECA_0000_5EED, 100_000, true);
        // Act
        let stats = fuzz_ecam(&bytes);
        // Assert
        assert_eq!(stats.steps, 100_000);
        assert!(stats.bar_hits > 1000, "{stats:?}");
        assert!(stats.ready_bytes > 1000, "{stats:?}");
    }

    #[test]
    fn test_fuzz_gpu_bar0_stream_keeps_invariants() {
        // Arrange
        let bytes = stream(0xBA50_5EED, 100_000, false);
        // Act
        let mut harness = Bar0Harness::new();
        let stats = harness.run(&bytes);
        // Assert
        assert_eq!(stats.steps, 100_000);
        assert!(harness.was_ready);
        assert!(stats.ready_bytes > 1000, "{stats:?}");
    }

    #[test]
    fn test_fuzz_truncated_and_empty_streams_are_fine() {
        // Arrange / Act / Assert
        assert_eq!(fuzz_ecam(&[]).steps, 0);
        assert_eq!(fuzz_ecam(&[0xFF; RECORD_LEN - 1]).steps, 0);
        assert_eq!(fuzz_gpu_bar0(&[0xFF; RECORD_LEN * 3 + 5]).steps, 3);
    }

    #[test]
    fn test_fuzz_ecam_setup_op_enables_both_gpus() {
        // Arrange: set up device 0 at window + 3 * 16 MiB and device 1 at window + 0, then
        // read HBM status on both (device 0 only after its 1 s).
        let mut bytes = record(0x20 | 7, 3, S4, 0);
        bytes.extend(record(0x20 | 7, 1 << 16, S4, 0));
        bytes.extend(record(0x40 | 8 | 2, 1, S4, 0));
        bytes.extend(record(0x40 | 8 | 2, 1 | (1 << 31), S4, 0));
        bytes.extend(record(6, 1000, S4, 0));
        bytes.extend(record(0x40 | 8 | 2, 1, S4, 0));
        // Act
        let stats = fuzz_ecam(&bytes);
        // Assert
        assert_eq!(stats.bar_hits, 3);
        assert_eq!(stats.ready_bytes, 2);
    }

    #[test]
    fn test_fuzz_ecam_script_reaches_ready_registers() {
        // Arrange: size BAR0 of device 1, place it, enable memory, read C2C status.
        let mut bytes = record(8 | 1, (1 << 16) | 0x10, S4, 0xFFFF_FFFF);
        bytes.extend(record(8, (1 << 16) | 0x10, S4, 0));
        bytes.extend(record(8 | 1, (1 << 16) | 0x10, S4, 0x2000_0000));
        bytes.extend(record(8 | 1, (1 << 16) | 0x4, S4, 0x2));
        bytes.extend(record(8 | 2, C2C_LINK_STATUS as u32 | (1 << 31), S4, 0));
        // Act
        let stats = fuzz_ecam(&bytes);
        // Assert
        assert_eq!(stats.bar_hits, 1);
        assert_eq!(stats.ready_bytes, 1);
    }
}
