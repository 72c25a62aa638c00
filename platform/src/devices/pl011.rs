//! ARM PrimeCell UART (PL011) model: the guest's console.
//!
//! Register map (4 KiB window; every register is 32 bits wide at a 4-byte-aligned offset):
//!
//! | Offset        | Name       | Access | Model                                                  |
//! |---------------|------------|--------|--------------------------------------------------------|
//! | 0x000         | DR         | RW     | W: byte to the host; R: pops the RX FIFO (0 if empty)  |
//! | 0x004         | RSR/ECR    | RW     | R: 0 (no receive errors); W: clears errors (no-op)     |
//! | 0x018         | FR         | RO     | RXFE, RXFF, TXFE = 1; TXFF, BUSY, modem lines = 0      |
//! | 0x020         | ILPR       | RW     | stored (8 bits)                                        |
//! | 0x024         | IBRD       | RW     | stored (16 bits)                                       |
//! | 0x028         | FBRD       | RW     | stored (6 bits)                                        |
//! | 0x02C         | LCR_H      | RW     | stored (8 bits); FEN selects a 32- or 1-entry RX FIFO  |
//! | 0x030         | CR         | RW     | stored (reset 0x300); enables are not enforced         |
//! | 0x034         | IFLS       | RW     | stored (6 bits, reset 0x12); RX trigger level          |
//! | 0x038         | IMSC       | RW     | interrupt mask set/clear (11 bits)                     |
//! | 0x03C         | RIS        | RO     | raw interrupt status                                   |
//! | 0x040         | MIS        | RO     | RIS & IMSC                                             |
//! | 0x044         | ICR        | WO     | write 1 to clear RIS bits                              |
//! | 0x048         | DMACR      | RW     | stored (3 bits); there is no DMA                       |
//! | 0xFE0..0xFEC  | PeriphID   | RO     | 0x11, 0x10, 0x14, 0x00                                 |
//! | 0xFF0..0xFFC  | PCellID    | RO     | 0x0D, 0xF0, 0x05, 0xB1                                 |
//!
//! Access sizes: 1-, 2- and 4-byte accesses at a register's (aligned) offset are accepted for
//! every register. Linux's `amba-pl011` driver uses 16-bit `readw`/`writew` for all registers
//! of an AMBA-probed PL011 (only SBSA/`UPIO_MEM32` ports use 32-bit accesses) and its `pl011`
//! earlycon writes DR with `writeb`. A narrow read returns the low bytes of the register, a
//! narrow write is zero-extended. 8-byte accesses, unaligned offsets, offsets at or beyond
//! 0x1000, reserved offsets, writes to RO registers and reads of ICR are logged and ignored.
//!
//! Interrupts (only RXIS, TXIS and RTIS are ever raised; the line level is `MIS != 0`,
//! forwarded to the [`IrqLine`] whenever it changes):
//!
//! - RX: the model has no timing. Whenever a byte enters the FIFO, the guest reads DR, or
//!   writes LCR_H/IFLS, or unmasks RXIM/RTIM, the RX status is re-evaluated: with data in the
//!   FIFO, RTIS (receive timeout) is set, and RXIS is set while the level is at or above the
//!   IFLS trigger (and cleared below it); with the FIFO empty both are cleared. ICR clears them
//!   until the next such event. Keeping RT asserted while data waits is what makes Linux read
//!   single keystrokes, and re-raising it on unmask means data left behind by Linux's startup
//!   ICR + drain is never stranded.
//! - TX: output is synchronous, so the TX FIFO is always empty. TXIS is set by every DR write
//!   and whenever TXIM goes from masked to unmasked; only ICR clears it. Linux writes until
//!   TXFF (never set here), masks TXIM when it runs out, and, when it unmasks TXIM with data
//!   pending, is guaranteed an interrupt: console output can't stall on a lost TX interrupt.
//!
//! RX input: host bytes queue behind the 32-entry hardware FIFO in a host-side backlog of up
//! to 64 KiB and move into the FIFO as the guest reads DR; beyond that they are dropped. The
//! FIFO is the first `depth` bytes of one queue, so turning FEN off and on loses nothing.
//!
//! Deliberate simplifications: CR's UARTEN/TXE/RXE are not enforced (firmware and earlycon
//! may write DR before enabling the UART, as QEMU allows), loopback (LBE) is not modelled, and
//! there are no receive errors, breaks, modem-line changes or DMA.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use super::{le_value, put_le_value, IrqLine, MmioDevice, WarnLimiter};

const NAME: &str = "pl011";

/// Size of the register window.
const WINDOW_LEN: u64 = 0x1000;

// Register offsets.
const DR: u64 = 0x000;
const RSR_ECR: u64 = 0x004;
const FR: u64 = 0x018;
const ILPR: u64 = 0x020;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02C;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03C;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const DMACR: u64 = 0x048;
const PERIPH_ID0: u64 = 0xFE0;
const PCELL_ID0: u64 = 0xFF0;

// Writable bits of each register.
const ILPR_MASK: u32 = 0xFF;
const IBRD_MASK: u32 = 0xFFFF;
const FBRD_MASK: u32 = 0x3F;
const LCR_H_MASK: u32 = 0xFF;
/// CTSEn, RTSEn, Out2, Out1, RTS, DTR, RXE, TXE, LBE, SIRLP, SIREN, UARTEN (bits 3-6 reserved).
const CR_MASK: u32 = 0xFF87;
const IFLS_MASK: u32 = 0x3F;
const INT_MASK: u32 = 0x7FF;
const DMACR_MASK: u32 = 0x7;

// FR bits.
const FR_RXFE: u32 = 1 << 4;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;

// Interrupt bits (RIS, MIS, IMSC, ICR).
const INT_RX: u32 = 1 << 4;
const INT_TX: u32 = 1 << 5;
const INT_RT: u32 = 1 << 6;

const LCR_H_FEN: u32 = 1 << 4;

const CR_RESET: u32 = 0x300;
const IFLS_RESET: u32 = 0x12;

const PERIPH_ID: [u8; 4] = [0x11, 0x10, 0x14, 0x00];
const PCELL_ID: [u8; 4] = [0x0D, 0xF0, 0x05, 0xB1];

/// Depth of the hardware RX FIFO (PL011 r1p5) when LCR_H.FEN is set; 1 otherwise.
const RX_FIFO_DEPTH: usize = 32;
/// Host-side bytes allowed to wait behind the FIFO.
const RX_BACKLOG_MAX: usize = 64 * 1024;
/// Most bytes held in total (FIFO plus backlog).
const RX_CAPACITY: usize = RX_FIFO_DEPTH + RX_BACKLOG_MAX;

/// Byte `rel / 4` of an ID register block, one byte per 32-bit register.
fn id_byte(id: &[u8; 4], rel: u64) -> Option<u32> {
    let idx = usize::try_from(rel / 4).ok()?;
    id.get(idx).map(|&b| u32::from(b))
}

/// The guest-programmable register state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Regs {
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    ris: u32,
    dmacr: u32,
}

impl Regs {
    const RESET: Self = Self {
        ilpr: 0,
        ibrd: 0,
        fbrd: 0,
        lcr_h: 0,
        cr: CR_RESET,
        ifls: IFLS_RESET,
        imsc: 0,
        ris: 0,
        dmacr: 0,
    };
}

/// ARM PrimeCell PL011 UART. See the module documentation for what is modelled.
pub struct Pl011 {
    regs: Regs,
    /// Received bytes: the first `rx_fifo_depth()` form the hardware FIFO, the rest is the
    /// host-side backlog.
    rx: VecDeque<u8>,
    irq: Arc<dyn IrqLine>,
    /// The level last sent to `irq`.
    irq_level: bool,
    out: Box<dyn Write + Send>,
    /// Whether an output error has been logged already.
    out_failed: bool,
    /// Whether host input is currently being dropped (logged once per episode).
    rx_dropping: bool,
    warn: WarnLimiter,
}

impl Pl011 {
    /// Size of the MMIO window the device decodes.
    pub const MMIO_LEN: u64 = WINDOW_LEN;

    /// A PL011 in its reset state, raising `irq` and sending transmitted bytes to `out`.
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            regs: Regs::RESET,
            rx: VecDeque::new(),
            irq,
            irq_level: false,
            out,
            out_failed: false,
            rx_dropping: false,
            warn: WarnLimiter::default(),
        }
    }

    /// Host stdin → guest: queues `bytes` for the guest to read. Bytes beyond the 32-entry RX
    /// FIFO wait in a 64 KiB backlog; beyond that they are dropped with a warning.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        let room = RX_CAPACITY.saturating_sub(self.rx.len());
        let (taken, dropped) = bytes.split_at(bytes.len().min(room));
        self.rx.extend(taken);
        if dropped.is_empty() {
            self.rx_dropping = false;
        } else if !self.rx_dropping {
            self.rx_dropping = true;
            log::warn!(
                "{NAME}: guest is not reading its console; dropping {} input bytes (and more \
                 until it catches up)",
                dropped.len()
            );
        }
        if !taken.is_empty() {
            self.update_rx_status();
            self.update_irq();
        }
    }

    /// Whether the backlog has room for more host input.
    pub fn wants_input(&self) -> bool {
        self.rx.len() < RX_CAPACITY
    }

    fn fifo_enabled(&self) -> bool {
        self.regs.lcr_h & LCR_H_FEN != 0
    }

    fn rx_fifo_depth(&self) -> usize {
        if self.fifo_enabled() {
            RX_FIFO_DEPTH
        } else {
            1
        }
    }

    /// Bytes in the hardware FIFO (as opposed to the backlog).
    fn rx_fifo_level(&self) -> usize {
        self.rx.len().min(self.rx_fifo_depth())
    }

    /// FIFO level at which RXIS is raised (IFLS.RXIFLSEL; reserved encodings act as 7/8).
    fn rx_trigger_level(&self) -> usize {
        if !self.fifo_enabled() {
            return 1;
        }
        let eighths = match (self.regs.ifls >> 3) & 0x7 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 6,
            _ => 7,
        };
        RX_FIFO_DEPTH * eighths / 8
    }

    /// Re-evaluates RXIS/RTIS after an RX event (see the module documentation).
    fn update_rx_status(&mut self) {
        let level = self.rx_fifo_level();
        if level == 0 {
            self.regs.ris &= !(INT_RX | INT_RT);
            return;
        }
        self.regs.ris |= INT_RT;
        if level >= self.rx_trigger_level() {
            self.regs.ris |= INT_RX;
        } else {
            self.regs.ris &= !INT_RX;
        }
    }

    fn mis(&self) -> u32 {
        self.regs.ris & self.regs.imsc
    }

    /// Forwards the interrupt line level to the interrupt controller when it changes.
    fn update_irq(&mut self) {
        let level = self.mis() != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }

    fn flags(&self) -> u32 {
        let level = self.rx_fifo_level();
        let mut fr = FR_TXFE;
        if level == 0 {
            fr |= FR_RXFE;
        }
        if level == self.rx_fifo_depth() {
            fr |= FR_RXFF;
        }
        fr
    }

    fn transmit(&mut self, byte: u8) {
        let res = self.out.write_all(&[byte]).and_then(|()| self.out.flush());
        if let Err(e) = res {
            if !self.out_failed {
                self.out_failed = true;
                log::error!("{NAME}: console output failed ({e}); further errors not logged");
            }
        }
        self.regs.ris |= INT_TX;
    }

    /// The value of the register at `offset`, with its read side effects, or `None` if there
    /// is nothing readable there.
    fn read_reg(&mut self, offset: u64) -> Option<u32> {
        let value = match offset {
            DR => {
                let byte = self.rx.pop_front();
                self.update_rx_status();
                byte.map_or(0, u32::from)
            }
            RSR_ECR => 0,
            FR => self.flags(),
            ILPR => self.regs.ilpr,
            IBRD => self.regs.ibrd,
            FBRD => self.regs.fbrd,
            LCR_H => self.regs.lcr_h,
            CR => self.regs.cr,
            IFLS => self.regs.ifls,
            IMSC => self.regs.imsc,
            RIS => self.regs.ris,
            MIS => self.mis(),
            DMACR => self.regs.dmacr,
            PERIPH_ID0..=0xFEC => id_byte(&PERIPH_ID, offset - PERIPH_ID0)?,
            PCELL_ID0..=0xFFC => id_byte(&PCELL_ID, offset - PCELL_ID0)?,
            _ => return None,
        };
        Some(value)
    }

    /// Writes `value` to the register at `offset`, or returns why it can't.
    fn write_reg(&mut self, offset: u64, value: u32) -> Result<(), &'static str> {
        match offset {
            DR => self.transmit(value as u8),
            RSR_ECR => {} // Clears receive errors; there never are any.
            ILPR => self.regs.ilpr = value & ILPR_MASK,
            IBRD => self.regs.ibrd = value & IBRD_MASK,
            FBRD => self.regs.fbrd = value & FBRD_MASK,
            LCR_H => {
                self.regs.lcr_h = value & LCR_H_MASK;
                self.update_rx_status();
            }
            CR => self.regs.cr = value & CR_MASK,
            IFLS => {
                self.regs.ifls = value & IFLS_MASK;
                self.update_rx_status();
            }
            IMSC => {
                let unmasked = value & INT_MASK & !self.regs.imsc;
                self.regs.imsc = value & INT_MASK;
                if unmasked & INT_TX != 0 {
                    self.regs.ris |= INT_TX;
                }
                if unmasked & (INT_RX | INT_RT) != 0 {
                    self.update_rx_status();
                }
            }
            ICR => self.regs.ris &= !(value & INT_MASK),
            DMACR => self.regs.dmacr = value & DMACR_MASK,
            FR | RIS | MIS | PERIPH_ID0..=0xFEC | PCELL_ID0..=0xFFC => {
                return Err("write to a read-only register")
            }
            _ => return Err("write to a reserved offset"),
        }
        Ok(())
    }

    /// Checks an access's offset and size; logs and returns false if it is refused.
    fn check_access(&mut self, op: &str, offset: u64, size: usize) -> bool {
        let problem = if offset >= WINDOW_LEN {
            "offset beyond the register window"
        } else if offset & 3 != 0 {
            "unaligned offset"
        } else if !matches!(size, 1 | 2 | 4) {
            "unsupported access size"
        } else {
            return true;
        };
        self.warn.warn(
            NAME,
            format_args!("{problem}: {size}-byte {op} at offset {offset:#x}"),
        );
        false
    }
}

impl MmioDevice for Pl011 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.check_access("read", offset, data.len()) {
            return;
        }
        match self.read_reg(offset) {
            Some(value) => put_le_value(data, u64::from(value)),
            None => self.warn.warn(
                NAME,
                format_args!("read of a reserved or write-only offset {offset:#x}"),
            ),
        }
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !self.check_access("write", offset, data.len()) {
            return;
        }
        // At most 4 bytes: the value fits.
        let value = le_value(data) as u32;
        if let Err(problem) = self.write_reg(offset, value) {
            self.warn.warn(
                NAME,
                format_args!("{problem}: {value:#x} at offset {offset:#x}"),
            );
        }
        self.update_irq();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::test_utils::{
        decode_ops, fuzz_stream, BrokenPipe, FuzzOp, RecordingIrq, SharedBuf,
    };

    /// Every offset that decodes to a register.
    const REGISTERS: [u64; 23] = [
        DR, RSR_ECR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR, 0xFE0,
        0xFE4, 0xFE8, 0xFEC, 0xFF0, 0xFF4, 0xFF8, 0xFFC, 0x1000,
    ];

    struct Fixture {
        uart: Pl011,
        irq: Arc<RecordingIrq>,
        out: SharedBuf,
    }

    fn fixture() -> Fixture {
        let irq = Arc::new(RecordingIrq::default());
        let out = SharedBuf::default();
        let uart = Pl011::new(irq.clone(), Box::new(out.clone()));
        Fixture { uart, irq, out }
    }

    /// A fixture configured the way Linux runs it: FIFOs on, 1/2 trigger.
    fn linux_fixture() -> Fixture {
        let mut f = fixture();
        f.uart.write(LCR_H, &(LCR_H_FEN | 0x60).to_le_bytes());
        f.uart.write(CR, &0x301u32.to_le_bytes());
        f
    }

    fn read32(uart: &mut Pl011, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        uart.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(uart: &mut Pl011, offset: u64, value: u32) {
        uart.write(offset, &value.to_le_bytes());
    }

    /// Everything observable about the device, without side effects.
    #[derive(Debug, PartialEq)]
    struct Snapshot {
        regs: Regs,
        rx: Vec<u8>,
        irq_level: bool,
        out: Vec<u8>,
        irq_calls: Vec<bool>,
    }

    fn snapshot(f: &Fixture) -> Snapshot {
        Snapshot {
            regs: f.uart.regs.clone(),
            rx: f.uart.rx.iter().copied().collect(),
            irq_level: f.uart.irq_level,
            out: f.out.contents(),
            irq_calls: f.irq.levels(),
        }
    }

    /// A device with state in every register, data in the FIFO and backlog, and IRQ high.
    fn busy_fixture() -> Fixture {
        let mut f = linux_fixture();
        write32(&mut f.uart, ILPR, 0x5A);
        write32(&mut f.uart, IBRD, 0x1234);
        write32(&mut f.uart, FBRD, 0x2A);
        write32(&mut f.uart, DMACR, 0x5);
        write32(&mut f.uart, IMSC, INT_RX | INT_RT | INT_TX);
        write32(&mut f.uart, DR, u32::from(b'x'));
        f.uart.enqueue_input(&[7u8; 40]);
        f
    }

    #[test]
    fn test_reset_values_match_trm() {
        // Arrange
        let mut f = fixture();
        // Act
        let regs: Vec<u32> = [
            RSR_ECR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, DMACR,
        ]
        .iter()
        .map(|&o| read32(&mut f.uart, o))
        .collect();
        // Assert
        assert_eq!(regs, [0, 0, 0, 0, 0, 0x300, 0x12, 0, 0, 0, 0]);
        assert!(f.irq.levels().is_empty());
    }

    #[test]
    fn test_tx_dr_write_emits_byte_and_raises_txis() {
        // Arrange
        let mut f = linux_fixture();
        // Act
        for &b in b"hi\n" {
            write32(&mut f.uart, DR, u32::from(b) | 0xFFFF_FF00);
        }
        // Assert
        assert_eq!(f.out.contents(), b"hi\n");
        assert_eq!(read32(&mut f.uart, RIS), INT_TX);
        assert!(f.irq.levels().is_empty(), "TXIM is masked");
    }

    #[test]
    fn test_tx_narrow_dr_writes_emit_low_byte() {
        // Arrange
        let mut f = fixture();
        // Act
        f.uart.write(DR, b"a");
        f.uart.write(DR, &[b'b', 0xFF]);
        // Assert
        assert_eq!(f.out.contents(), b"ab");
    }

    #[test]
    fn test_tx_output_error_is_not_fatal() {
        // Arrange
        let irq = Arc::new(RecordingIrq::default());
        let mut uart = Pl011::new(irq.clone(), Box::new(BrokenPipe));
        write32(&mut uart, IMSC, INT_TX);
        // Act
        for _ in 0..3 {
            write32(&mut uart, DR, u32::from(b'z'));
        }
        // Assert
        assert!(uart.out_failed);
        assert_eq!(read32(&mut uart, MIS), INT_TX);
        assert_eq!(irq.levels(), [true]);
    }

    #[test]
    fn test_rx_fifo_reads_in_order_then_zero_when_empty() {
        // Arrange
        let mut f = linux_fixture();
        f.uart.enqueue_input(b"abc");
        // Act
        let bytes: Vec<u32> = (0..4).map(|_| read32(&mut f.uart, DR)).collect();
        // Assert
        assert_eq!(bytes, [97, 98, 99, 0]);
        assert_ne!(read32(&mut f.uart, FR) & FR_RXFE, 0);
    }

    #[test]
    fn test_rx_full_fifo_sets_rxff() {
        // Arrange
        let mut f = linux_fixture();
        f.uart.enqueue_input(&[1u8; RX_FIFO_DEPTH - 1]);
        let before = read32(&mut f.uart, FR);
        // Act
        f.uart.enqueue_input(&[2]);
        let after = read32(&mut f.uart, FR);
        // Assert
        assert_eq!(before & (FR_RXFF | FR_RXFE), 0);
        assert_eq!(after & (FR_RXFF | FR_RXFE), FR_RXFF);
    }

    #[test]
    fn test_rx_backlog_refills_fifo_in_order() {
        // Arrange
        let mut f = linux_fixture();
        let input: Vec<u8> = (0..100u8).collect();
        f.uart.enqueue_input(&input);
        // Act
        let mut got = Vec::new();
        while read32(&mut f.uart, FR) & FR_RXFE == 0 {
            // The FIFO stays full while the backlog has data.
            assert!(got.len() > 100 - RX_FIFO_DEPTH || read32(&mut f.uart, FR) & FR_RXFF != 0);
            got.push(read32(&mut f.uart, DR) as u8);
        }
        // Assert
        assert_eq!(got, input);
    }

    #[test]
    fn test_rx_backlog_full_drops_input_and_stops_wanting_it() {
        // Arrange
        let mut f = linux_fixture();
        f.uart.enqueue_input(&vec![b'a'; RX_CAPACITY - 1]);
        assert!(f.uart.wants_input());
        // Act
        f.uart.enqueue_input(b"bc");
        // Assert
        assert!(!f.uart.wants_input());
        assert_eq!(f.uart.rx.len(), RX_CAPACITY);
        assert_eq!(f.uart.rx.back(), Some(&b'b'));
        read32(&mut f.uart, DR);
        assert!(f.uart.wants_input());
    }

    #[test]
    fn test_rx_fifo_disabled_holds_one_byte_and_keeps_the_rest() {
        // Arrange
        let mut f = fixture();
        f.uart.enqueue_input(b"xy");
        // Act
        let fr_char_mode = read32(&mut f.uart, FR);
        write32(&mut f.uart, LCR_H, LCR_H_FEN);
        let fr_fifo_mode = read32(&mut f.uart, FR);
        // Assert
        assert_eq!(fr_char_mode & (FR_RXFF | FR_RXFE), FR_RXFF);
        assert_eq!(fr_fifo_mode & (FR_RXFF | FR_RXFE), 0);
        assert_eq!(read32(&mut f.uart, DR), u32::from(b'x'));
        assert_eq!(read32(&mut f.uart, DR), u32::from(b'y'));
    }

    #[test]
    fn test_fr_idle_reports_tx_empty_rx_empty_not_busy() {
        // Arrange
        let mut f = linux_fixture();
        // Act
        let fr = read32(&mut f.uart, FR);
        // Assert
        assert_eq!(fr, FR_TXFE | FR_RXFE);
    }

    #[test]
    fn test_fr_narrow_reads_return_low_bytes() {
        // Arrange
        let mut f = linux_fixture();
        let mut half = [0xFFu8; 2];
        let mut byte = [0xFFu8; 1];
        // Act
        f.uart.read(FR, &mut half);
        f.uart.read(FR, &mut byte);
        // Assert
        assert_eq!(u16::from_le_bytes(half), (FR_TXFE | FR_RXFE) as u16);
        assert_eq!(byte[0], (FR_TXFE | FR_RXFE) as u8);
    }

    #[test]
    fn test_registers_16bit_access_round_trips_masked_values() {
        // Arrange
        let mut f = fixture();
        let cases = [
            (ILPR, 0xFFFF, 0xFF),
            (IBRD, 0xFFFF, 0xFFFF),
            (FBRD, 0xFFFF, 0x3F),
            (LCR_H, 0xFFFF, 0xFF),
            (CR, 0xFFFF, 0xFF87),
            (IFLS, 0xFFFF, 0x3F),
            (DMACR, 0xFFFF, 0x7),
        ];
        for (offset, written, expected) in cases {
            // Act
            f.uart.write(offset, &(written as u16).to_le_bytes());
            let mut data = [0u8; 2];
            f.uart.read(offset, &mut data);
            // Assert
            assert_eq!(u16::from_le_bytes(data), expected, "offset {offset:#x}");
        }
    }

    #[test]
    fn test_irq_rx_masked_keeps_line_low() {
        // Arrange
        let mut f = linux_fixture();
        // Act
        f.uart.enqueue_input(b"k");
        // Assert
        assert_eq!(read32(&mut f.uart, RIS), INT_RT);
        assert_eq!(read32(&mut f.uart, MIS), 0);
        assert!(f.irq.levels().is_empty());
    }

    #[test]
    fn test_irq_rx_single_byte_raises_rt_and_drain_lowers_line() {
        // Arrange
        let mut f = linux_fixture();
        write32(&mut f.uart, IMSC, INT_RX | INT_RT);
        // Act
        f.uart.enqueue_input(b"k");
        let mis_with_data = read32(&mut f.uart, MIS);
        read32(&mut f.uart, DR);
        // Assert
        assert_eq!(mis_with_data, INT_RT);
        assert_eq!(read32(&mut f.uart, RIS), 0);
        assert_eq!(f.irq.levels(), [true, false]);
    }

    #[test]
    fn test_irq_rxis_follows_trigger_level() {
        // Arrange: trigger at 1/2 of 32 = 16.
        let mut f = linux_fixture();
        write32(&mut f.uart, IFLS, 0x12);
        write32(&mut f.uart, IMSC, INT_RX);
        // Act / Assert
        f.uart.enqueue_input(&[0u8; 15]);
        assert_eq!(read32(&mut f.uart, RIS) & INT_RX, 0);
        assert!(f.irq.levels().is_empty());
        f.uart.enqueue_input(&[0u8; 1]);
        assert_eq!(read32(&mut f.uart, RIS) & INT_RX, INT_RX);
        assert_eq!(f.irq.levels(), [true]);
        read32(&mut f.uart, DR);
        assert_eq!(read32(&mut f.uart, RIS), INT_RT);
        assert_eq!(f.irq.levels(), [true, false]);
        // Lowering the trigger re-raises RXIS.
        write32(&mut f.uart, IFLS, 0);
        assert_eq!(read32(&mut f.uart, MIS), INT_RX);
        assert_eq!(f.irq.levels(), [true, false, true]);
    }

    #[test]
    fn test_irq_tx_unmask_raises_txis_even_after_icr() {
        // Arrange
        let mut f = linux_fixture();
        write32(&mut f.uart, DR, u32::from(b'a'));
        write32(&mut f.uart, ICR, INT_TX);
        assert_eq!(read32(&mut f.uart, RIS), 0);
        // Act
        write32(&mut f.uart, IMSC, INT_TX);
        // Assert
        assert_eq!(read32(&mut f.uart, MIS), INT_TX);
        assert_eq!(f.irq.levels(), [true]);
    }

    #[test]
    fn test_irq_tx_mask_lowers_line_and_keeps_ris() {
        // Arrange
        let mut f = linux_fixture();
        write32(&mut f.uart, IMSC, INT_TX);
        // Act
        write32(&mut f.uart, IMSC, 0);
        // Assert
        assert_eq!(read32(&mut f.uart, RIS), INT_TX);
        assert_eq!(read32(&mut f.uart, MIS), 0);
        assert_eq!(f.irq.levels(), [true, false]);
    }

    #[test]
    fn test_icr_clears_written_bits_only_and_lowers_line() {
        // Arrange
        let mut f = linux_fixture();
        write32(&mut f.uart, IMSC, INT_RX | INT_RT | INT_TX);
        f.uart.enqueue_input(&[0u8; 20]);
        assert_eq!(read32(&mut f.uart, RIS), INT_RX | INT_RT | INT_TX);
        // Act / Assert
        write32(&mut f.uart, ICR, INT_TX);
        assert_eq!(read32(&mut f.uart, RIS), INT_RX | INT_RT);
        write32(&mut f.uart, ICR, INT_RX | INT_RT);
        assert_eq!(read32(&mut f.uart, RIS), 0);
        assert_eq!(f.irq.levels(), [true, false]);
    }

    #[test]
    fn test_icr_cleared_rt_is_reraised_on_unmask_with_data_waiting() {
        // Arrange: Linux's pl011_enable_interrupts: ICR RX bits, drain up to 2 * fifosize,
        // then unmask RXIM | RTIM.
        let mut f = linux_fixture();
        f.uart.enqueue_input(&[b'q'; 100]);
        write32(&mut f.uart, ICR, INT_RX | INT_RT);
        for _ in 0..64 {
            read32(&mut f.uart, DR);
        }
        write32(&mut f.uart, ICR, INT_RX | INT_RT);
        // Act
        write32(&mut f.uart, IMSC, INT_RX | INT_RT);
        // Assert: the 36 bytes left behind are announced.
        assert_ne!(read32(&mut f.uart, MIS) & INT_RT, 0);
        assert_eq!(f.irq.levels(), [true]);
    }

    #[test]
    fn test_mis_is_ris_and_imsc() {
        // Arrange
        let mut f = linux_fixture();
        f.uart.enqueue_input(&[0u8; 20]);
        write32(&mut f.uart, DR, 0);
        // Act
        write32(&mut f.uart, IMSC, INT_RT | (1 << 10));
        // Assert
        assert_eq!(read32(&mut f.uart, RIS), INT_RX | INT_RT | INT_TX);
        assert_eq!(read32(&mut f.uart, IMSC), INT_RT | (1 << 10));
        assert_eq!(read32(&mut f.uart, MIS), INT_RT);
    }

    /// Emulates Linux's interrupt-driven TX (`pl011_int` + `pl011_tx_chars(from_irq)`) with the
    /// driver's 16-entry view of the FIFO: every byte must come out and the line must settle.
    #[test]
    fn test_linux_irq_driven_tx_sends_everything_and_settles() {
        // Arrange
        let mut f = linux_fixture();
        let message: Vec<u8> = (0..200).map(|i| b'a' + (i % 26) as u8).collect();
        let mut pending: VecDeque<u8> = message.iter().copied().collect();
        let mut im = 0;
        // start_tx with TXFF pretend-full: enable TXIM and wait for the interrupt.
        im |= INT_TX;
        write32(&mut f.uart, IMSC, im);
        // Act
        let mut interrupts = 0;
        while f.irq.level() {
            interrupts += 1;
            assert!(interrupts < 1000, "interrupt storm");
            let mut status = read32(&mut f.uart, RIS) & im;
            let mut passes = 0;
            while status != 0 && passes < 256 {
                write32(&mut f.uart, ICR, status & !(INT_TX | INT_RT | INT_RX));
                if status & INT_TX != 0 {
                    for _ in 0..8 {
                        match pending.pop_front() {
                            Some(b) => write32(&mut f.uart, DR, u32::from(b)),
                            None => break,
                        }
                    }
                    if pending.is_empty() {
                        im &= !INT_TX;
                        write32(&mut f.uart, IMSC, im);
                    }
                }
                passes += 1;
                status = read32(&mut f.uart, RIS) & im;
            }
        }
        // Assert
        assert_eq!(f.out.contents(), message);
        assert!(!f.irq.level());
    }

    #[test]
    fn test_id_registers_match_pl011() {
        // Arrange
        let mut f = fixture();
        // Act
        let periph: Vec<u32> = (0..4)
            .map(|i| read32(&mut f.uart, PERIPH_ID0 + 4 * i))
            .collect();
        let cell: Vec<u32> = (0..4)
            .map(|i| read32(&mut f.uart, PCELL_ID0 + 4 * i))
            .collect();
        // Assert
        assert_eq!(periph, [0x11, 0x10, 0x14, 0x00]);
        assert_eq!(cell, [0x0D, 0xF0, 0x05, 0xB1]);
    }

    #[test]
    fn test_bad_offsets_change_nothing() {
        // Arrange
        let mut f = busy_fixture();
        let before = snapshot(&f);
        let bad_writes = [
            0x001, 0x002, 0x003, 0x008, 0x014, 0x01C, 0x04C, 0x100, 0xFDC, 0x019, // reserved
            FR, RIS, MIS, 0xFE0, 0xFE4, 0xFE8, 0xFEC, 0xFF0, 0xFF4, 0xFF8, 0xFFC, // read-only
        ];
        let bad_reads = [0x001, 0x003, 0x008, 0x04C, 0x100, 0xFDC, ICR];
        // Act / Assert
        for offset in bad_writes {
            f.uart.write(offset, &u32::MAX.to_le_bytes());
            assert_eq!(snapshot(&f), before, "write at {offset:#x}");
        }
        for offset in bad_reads {
            let mut data = [0xFFu8; 4];
            f.uart.read(offset, &mut data);
            assert_eq!(data, [0; 4], "read at {offset:#x}");
            assert_eq!(snapshot(&f), before, "read at {offset:#x}");
        }
    }

    #[test]
    fn test_bad_sizes_change_nothing() {
        // Arrange
        let mut f = busy_fixture();
        let before = snapshot(&f);
        // Act / Assert
        for offset in REGISTERS {
            for size in [0usize, 3, 8, 16] {
                f.uart.write(offset, &vec![0xFF; size]);
                assert_eq!(snapshot(&f), before, "{size}-byte write at {offset:#x}");
                let mut data = vec![0xFFu8; size];
                f.uart.read(offset, &mut data);
                assert!(
                    data.iter().all(|&b| b == 0),
                    "{size}-byte read at {offset:#x}"
                );
                assert_eq!(snapshot(&f), before, "{size}-byte read at {offset:#x}");
            }
        }
    }

    #[test]
    fn test_offsets_beyond_window_change_nothing() {
        // Arrange
        let mut f = busy_fixture();
        let before = snapshot(&f);
        // Act / Assert
        for offset in [
            0x1000,
            0x1004,
            0x1000 + ICR,
            0x10_0000,
            u64::MAX - 3,
            u64::MAX,
        ] {
            f.uart.write(offset, &u32::MAX.to_le_bytes());
            let mut data = [0xFFu8; 4];
            f.uart.read(offset, &mut data);
            assert_eq!(data, [0; 4], "offset {offset:#x}");
            assert_eq!(snapshot(&f), before, "offset {offset:#x}");
        }
    }

    #[test]
    fn test_fuzz_byte_stream_never_panics_and_keeps_invariants() {
        // Arrange
        let mut f = fixture();
        let stream = fuzz_stream(0x9E11_0C0A_5EED, 100_000, &REGISTERS);
        let ops = decode_ops(&stream);
        assert!(ops.len() >= 100_000);
        // Act / Assert
        for op in ops {
            match op {
                FuzzOp::Read { offset, size } => {
                    let mut data = vec![0xA5; size];
                    f.uart.read(offset, &mut data);
                }
                FuzzOp::Write { offset, data } => f.uart.write(offset, data),
                FuzzOp::Host(bytes) => f.uart.enqueue_input(bytes),
            }
            assert_eq!(f.irq.level(), f.uart.mis() != 0);
            assert_eq!(f.uart.irq_level, f.uart.mis() != 0);
            assert!(f.uart.rx.len() <= RX_CAPACITY);
            assert_eq!(f.uart.regs.ris & !(INT_RX | INT_TX | INT_RT), 0);
            assert_eq!(f.uart.regs.imsc & !INT_MASK, 0);
        }
        // The stream reached real state changes.
        assert!(f.out.contents().len() > 1000);
        assert!(f.irq.levels().len() > 100);
    }
}
