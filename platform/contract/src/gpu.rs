//! The GPU function's readiness model and memory style: what the VMM's GPU device models,
//! what the platform description asks for, what `/gracevm/env` tells the suite, and what the
//! suite expects the nvgrace-gpu probe to make of it. Written once, here.

use std::fmt;
use std::time::Duration;

/// BAR0 offset of the C2C link status register the driver polls at probe.
pub const C2C_LINK_STATUS: u64 = 0x1498;
/// BAR0 offset of the HBM training status register the driver polls at probe.
pub const HBM_TRAINING_STATUS: u64 = 0x200BC;
/// What both status registers read once the GPU is ready (0 before).
pub const STATUS_READY: u32 = 0xFF;
/// The driver polls readiness once a second for 30 s (`POLL_TIMEOUT_MS`), then fails the
/// probe with ETIME.
pub const POLL_TIMEOUT_MS: u64 = 30_000;

/// PCI device ids of Blackwell parts, which carry the NVIDIA DVSEC with the "no MIG bug" bit.
pub const BLACKWELL_DEVICE_IDS: [u16; 2] = [0x2941, 0x31C2];

/// When the GPU's BAR0 readiness registers (C2C link, HBM training) start reading
/// [`STATUS_READY`]. Text form (description words, `/gracevm/env`): `ready`, `never`,
/// `delay:MS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readiness {
    /// From the start.
    #[default]
    Ready,
    /// This many milliseconds after the VM (the GPU function) started: a C2C link or HBM
    /// training delay.
    DelayMs(u64),
    /// Never: the probe polls [`POLL_TIMEOUT_MS`] and fails with ETIME.
    Never,
}

impl Readiness {
    /// Whether the registers read [`STATUS_READY`] `elapsed` after the function started.
    pub fn is_ready_after(self, elapsed: Duration) -> bool {
        match self {
            Readiness::Ready => true,
            Readiness::Never => false,
            Readiness::DelayMs(ms) => elapsed >= Duration::from_millis(ms),
        }
    }

    /// Parses the text form (`ready`, `never`, `delay:MS`); `None` for anything else.
    pub fn parse(text: &str) -> Option<Readiness> {
        match text {
            "ready" => Some(Readiness::Ready),
            "never" => Some(Readiness::Never),
            other => other
                .strip_prefix("delay:")
                .and_then(crate::env::parse_u64)
                .map(Readiness::DelayMs),
        }
    }
}

impl fmt::Display for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Readiness::Ready => f.write_str("ready"),
            Readiness::DelayMs(ms) => write!(f, "delay:{ms}"),
            Readiness::Never => f.write_str("never"),
        }
    }
}

/// How the GPU tells the driver about the MIG hardware bug, which decides how its memory is
/// split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// NVIDIA DVSEC (id 3) with bit 0 at +0xA: no bug, all memory is usemem.
    Blackwell,
    /// No DVSEC: a 1 GiB resmem tail is split off.
    Hopper,
}

impl Style {
    /// The style of the part with PCI device id `device_id`.
    pub fn of_device(device_id: u16) -> Style {
        if BLACKWELL_DEVICE_IDS.contains(&device_id) {
            Style::Blackwell
        } else {
            Style::Hopper
        }
    }

    /// Parses `blackwell` or `hopper`.
    pub fn parse(text: &str) -> Option<Style> {
        match text {
            "blackwell" => Some(Style::Blackwell),
            "hopper" => Some(Style::Hopper),
            _ => None,
        }
    }
}

impl fmt::Display for Style {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Style::Blackwell => "blackwell",
            Style::Hopper => "hopper",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_readiness_text_round_trips() {
        for r in [
            Readiness::Ready,
            Readiness::Never,
            Readiness::DelayMs(0),
            Readiness::DelayMs(1500),
            Readiness::DelayMs(u64::MAX),
        ] {
            assert_eq!(Readiness::parse(&r.to_string()), Some(r));
        }
        for bad in ["", "soon", "delay:", "delay:x", "Ready", "delay:-1"] {
            assert_eq!(Readiness::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_readiness_delay_flips_at_deadline() {
        let d = Readiness::DelayMs(1500);
        assert!(!d.is_ready_after(Duration::from_millis(1499)));
        assert!(d.is_ready_after(Duration::from_millis(1500)));
        assert!(Readiness::Ready.is_ready_after(Duration::ZERO));
        assert!(!Readiness::Never.is_ready_after(Duration::MAX));
    }

    #[test]
    fn test_style_of_device_and_text() {
        assert_eq!(Style::of_device(0x2941), Style::Blackwell);
        assert_eq!(Style::of_device(0x31C2), Style::Blackwell);
        assert_eq!(Style::of_device(0x2348), Style::Hopper);
        for s in [Style::Blackwell, Style::Hopper] {
            assert_eq!(Style::parse(&s.to_string()), Some(s));
        }
        assert_eq!(Style::parse("ampere"), None);
    }
}
