//! gracevm's test device, as both sides see it: a 4 KiB page of 32-bit registers (4-byte
//! accesses only) through which the guest reports its boot to the VMM and asks what the VMM
//! sees in guest memory.
//!
//! | Offset | Register            | Access | Meaning                                              |
//! |--------|---------------------|--------|------------------------------------------------------|
//! | 0x000  | BOOT                | RW     | W [`BOOT_MAGIC`]: boot time recorded (first write);  |
//! |        |                     |        | R: 1 once recorded, else 0                           |
//! | 0x004  | ID                  | RO     | [`DEVICE_ID`]                                        |
//! | 0x008  | ADDR_LO / ADDR_HI   | RW     | guest physical address of a probe (8-byte aligned)   |
//! | 0x010  | LEN_LO / LEN_HI     | RW     | probe length in bytes (multiple of 8); PRINT length  |
//! | 0x018  | VAL_LO / VAL_HI     | RW     | CHECK_VALUE operand; PEEK result                     |
//! | 0x020  | CMD                 | WO     | a [`Cmd`]                                            |
//! | 0x024  | STATUS              | RO     | a [`Status`] code; [`STATUS_NONE`] before any command|
//! | 0x028  | WHERE_LO / WHERE_HI | RO     | offset from ADDR of the first mismatch               |
//! | 0x030  | POWER               | WO     | [`POWER_OFF_MAGIC`]: end the run as a power-off      |
//!
//! POWER is for a guest whose kernel can no longer shut down (an oops left a task holding a
//! device lock, and device shutdown would wait on it forever): /init writes it instead.
//!
//! A command runs while the CMD write traps, so STATUS is final when the write returns.
//!
//! The boot pattern: a carve-out can hold [`pattern_word`] in every u64 until the guest writes
//! it, so a test tells "never written" from "zeroed" anywhere in it. Filling costs seconds per
//! GiB under nested emulation, so a test run fills only when the guest asks ([`Cmd::Fill`]),
//! on a VMM thread beside the guest; a run with a shell or a command fills before the guest
//! starts. Until a fill is asked for, the carve-outs hold zeroes (fresh memory) and
//! CHECK_PATTERN and AWAIT_FILL answer [`STATUS_UNFILLED`]. While it runs, every command that
//! reads a region answers [`STATUS_BUSY`] at once (an MMIO access held for seconds would stall
//! the guest's CPU; a malformed or outside request is still answered), and a guest that is
//! about to let anything write there (opening /dev/egm zeroes a region) first repeats
//! [`Cmd::AwaitFill`] until it answers [`STATUS_OK`].
//!
//! [`Cmd::Print`] is the suite's output channel: under nested emulation every byte written to
//! the UART is a trap to the VMM (about 0.7 ms each), so a scenario's 17 KB of KTAP cost more
//! than ten seconds. The suite writes a line into a locked page of its own and hands the VMM
//! its guest physical address: one trap per line. PRINT is never BUSY.

/// Size of the register page.
pub const WINDOW_LEN: u64 = 0x1000;
/// The only access size the device decodes.
pub const ACCESS_SIZE: usize = 4;

pub const BOOT: u64 = 0x000;
pub const ID: u64 = 0x004;
pub const ADDR: u64 = 0x008;
pub const LEN: u64 = 0x010;
pub const VAL: u64 = 0x018;
pub const CMD: u64 = 0x020;
pub const STATUS: u64 = 0x024;
pub const WHERE: u64 = 0x028;
/// The last probe register (WHERE_HI).
pub const LAST: u64 = 0x02C;
pub const POWER: u64 = 0x030;

/// Written to BOOT by the guest's /init when it reaches userspace ("grtb").
pub const BOOT_MAGIC: u32 = 0x7472_6762;
/// Written to POWER: the guest asks the VMM to end the run as if it had powered off ("off!").
pub const POWER_OFF_MAGIC: u32 = 0x2166_666f;
/// Value of the ID register ("gvrm").
pub const DEVICE_ID: u32 = 0x6772_766d;

/// Probe commands written to CMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// VAL = the u64 at ADDR.
    Peek = 1,
    /// Every u64 in [ADDR, ADDR+LEN) still holds its region's boot pattern.
    CheckPattern = 2,
    /// Every u64 in [ADDR, ADDR+LEN) equals VAL.
    CheckValue = 3,
    /// [`STATUS_OK`] once every probed region holds its boot pattern (no operands); BUSY while
    /// the fill runs; [`STATUS_UNFILLED`] when no fill was asked for.
    AwaitFill = 4,
    /// LEN bytes (1..=[`PRINT_MAX`], one or more whole lines) of guest RAM at ADDR are the
    /// suite's console output; [`STATUS_OUTSIDE`] if not backed by guest memory.
    Print = 5,
    /// Start the boot-pattern fill of the carve-outs (no operands); [`STATUS_OK`] at once,
    /// whether it starts now, runs already or is done. Ask before anything writes there.
    Fill = 6,
}

/// The most a PRINT passes at once (one page).
pub const PRINT_MAX: u64 = 4096;

impl Cmd {
    pub fn from_raw(raw: u32) -> Option<Cmd> {
        match raw {
            1 => Some(Cmd::Peek),
            2 => Some(Cmd::CheckPattern),
            3 => Some(Cmd::CheckValue),
            4 => Some(Cmd::AwaitFill),
            5 => Some(Cmd::Print),
            6 => Some(Cmd::Fill),
            _ => None,
        }
    }
}

pub const STATUS_OK: u32 = 0;
pub const STATUS_MISMATCH: u32 = 1;
pub const STATUS_OUTSIDE: u32 = 2;
pub const STATUS_BAD_REQUEST: u32 = 3;
/// The boot-pattern fill is still running: ask again a little later.
pub const STATUS_BUSY: u32 = 4;
/// No boot pattern: nothing asked for the fill ([`Cmd::Fill`]).
pub const STATUS_UNFILLED: u32 = 5;
pub const STATUS_NONE: u32 = 0xffff_ffff;

/// The boot-time fill of probed regions: the u64 at byte `offset` of a region with `seed`.
pub fn pattern_word(seed: u64, offset: u64) -> u64 {
    seed ^ offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_registers_in_window_and_commands_round_trip() {
        for r in [BOOT, ID, ADDR, LEN, VAL, CMD, STATUS, WHERE, LAST, POWER] {
            assert!(r < WINDOW_LEN && r % ACCESS_SIZE as u64 == 0);
        }
        for c in [
            Cmd::Peek,
            Cmd::CheckPattern,
            Cmd::CheckValue,
            Cmd::AwaitFill,
            Cmd::Print,
            Cmd::Fill,
        ] {
            assert_eq!(Cmd::from_raw(c as u32), Some(c));
        }
        assert_eq!(Cmd::from_raw(0), None);
        assert_eq!(pattern_word(0xff, 8), 0xf7);
    }
}
