//! The PL011 UART driven by records `[op, offset (2 bytes LE), size_sel, data (8 bytes)]`.
//!
//! `op & 3`: 0 read, 1 write, 2 host input (`size_sel & 15` bytes of data, repeated),
//! 3 read back the interrupt registers. `op & 0x80` moves the offset far past the window.
//! Invariants: refused reads return zeroes; the interrupt line only ever toggles; before any
//! read of MIS the line already equals `MIS != 0`; MIS equals RIS & IMSC.
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use gracevm::devices::pl011::Pl011;
use gracevm::devices::{IrqLine, MmioDevice};
use libfuzzer_sys::fuzz_target;

const RECORD_LEN: usize = 12;
const SIZES: [usize; 16] = [1, 2, 4, 4, 4, 8, 1, 2, 4, 0, 3, 5, 16, 4, 2, 1];
const RIS: u64 = 0x03C;
const IMSC: u64 = 0x038;
const MIS: u64 = 0x040;

/// Records every level change and checks that levels alternate.
#[derive(Default)]
struct Line {
    levels: Mutex<Vec<bool>>,
}

impl Line {
    fn level(&self) -> bool {
        self.levels.lock().unwrap().last().copied().unwrap_or(false)
    }
}

impl IrqLine for Line {
    fn set_level(&self, high: bool) {
        let mut levels = self.levels.lock().unwrap();
        let previous = levels.last().copied().unwrap_or(false);
        assert_ne!(previous, high, "set_level without a change");
        levels.push(high);
    }
}

fn read32(uart: &mut Pl011, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    uart.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fuzz_target!(|bytes: &[u8]| {
    let line = Arc::new(Line::default());
    let mut uart = Pl011::new(line.clone(), Box::new(io::sink()));
    for r in bytes.chunks_exact(RECORD_LEN) {
        let mut offset = u64::from(u16::from_le_bytes([r[1], r[2]]));
        if r[0] & 0x80 != 0 {
            offset |= u64::from(r[0]) << 56;
        }
        let size = SIZES[usize::from(r[3] & 15)];
        let mut data = [0u8; 16];
        data[..8].copy_from_slice(&r[4..12]);
        data[8..].copy_from_slice(&r[4..12]);
        match r[0] & 3 {
            0 => {
                let buf = &mut data[..size];
                buf.fill(0xA5);
                uart.read(offset, buf);
                let legal =
                    matches!(size, 1 | 2 | 4) && offset % 4 == 0 && offset < Pl011::MMIO_LEN;
                if !legal {
                    assert!(
                        buf.iter().all(|&b| b == 0),
                        "refused read {offset:#x}/{size}"
                    );
                }
            }
            1 => uart.write(offset, &data[..size]),
            2 => uart.enqueue_input(&data[..usize::from(r[3] & 15)]),
            _ => {
                let level = line.level();
                let mis = read32(&mut uart, MIS);
                assert_eq!(level, mis != 0, "line level vs MIS {mis:#x}");
                let ris = read32(&mut uart, RIS);
                let imsc = read32(&mut uart, IMSC);
                assert_eq!(mis, ris & imsc);
            }
        }
    }
});
