//! What a run is given and what it ends with, shared by the KVM machine and the harness.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use firmware::Resolved;

use crate::devices::SharedConsole;
use crate::exit::Status;
use crate::vcpu_exit::GuestEvent;

/// Flags raised outside the VMM's event loop that end a run.
#[derive(Default)]
pub struct Watch {
    /// SIGINT/SIGTERM reached gracevm (shared with the signal handler, which raises it).
    pub interrupted: Arc<AtomicBool>,
    /// The console showed a kernel panic.
    pub panicked: AtomicBool,
}

/// Everything the KVM machine needs to boot one guest.
pub struct MachineSpec {
    /// The platform, resolved once: description and memory map.
    pub platform: Resolved,
    pub kernel: PathBuf,
    /// The whole initrd: the base initramfs with gracevm's own archive appended.
    pub initrd: Vec<u8>,
    pub cmdline: String,
    /// Where the guest's console output goes (the UART's bytes, the suite's PRINT lines).
    pub console: SharedConsole,
    /// Feed host stdin to the UART.
    pub interactive: bool,
    /// Fill the carve-outs before the guest starts, rather than beside its boot (which only
    /// a guest that waits for the fill, the suite, may have).
    pub eager_fill: bool,
    pub timeout: Option<Duration>,
    pub watch: Arc<Watch>,
    /// When gracevm began to prepare this guest (process start for `run`): the boot time and
    /// the VMM start count from here, as a qemu boot counts from qemu's launch.
    pub started: Instant,
}

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// PSCI SYSTEM_OFF.
    PowerOff,
    /// PSCI SYSTEM_RESET that no panic preceded (gracevm does not reboot guests).
    Reset,
    /// PSCI SYSTEM_CRASH / KVM crash event.
    Crash,
    /// A kernel panic seen on the console.
    Panic,
    /// The guest did something no machine can serve (an MMIO access without a syndrome, a
    /// hypervisor call nobody answers): a crash of the guest, not of gracevm.
    Fault(String),
    Timeout,
    /// Ctrl-C, SIGTERM or the console escape.
    Interrupted,
    VmmFailure(String),
}

impl GuestEnd {
    pub fn describe(&self) -> String {
        match self {
            GuestEnd::PowerOff => "guest powered off (PSCI SYSTEM_OFF)".into(),
            GuestEnd::Reset => {
                "guest asked for a reset (PSCI SYSTEM_RESET); gracevm ends the run".into()
            }
            GuestEnd::Crash => "guest crashed (PSCI/KVM crash event)".into(),
            GuestEnd::Panic => "guest kernel panic".into(),
            GuestEnd::Fault(m) => format!("guest fault: {m}"),
            GuestEnd::Timeout => "guest timed out".into(),
            GuestEnd::Interrupted => "run interrupted".into(),
            GuestEnd::VmmFailure(m) => format!("VMM failure: {m}"),
        }
    }

    /// The exit status this end stands for by itself (a reset, which a panic did not precede,
    /// is not a failure of the run; test mode fails it through its poweroff check).
    pub fn status(&self) -> Status {
        match self {
            GuestEnd::PowerOff | GuestEnd::Reset => Status::Pass,
            GuestEnd::Panic | GuestEnd::Crash | GuestEnd::Fault(_) => Status::Panic,
            GuestEnd::Timeout => Status::Timeout,
            GuestEnd::Interrupted => Status::Interrupted,
            GuestEnd::VmmFailure(_) => Status::VmmError,
        }
    }

    /// Short machine-readable name for results.json.
    pub fn key(&self) -> &'static str {
        match self {
            GuestEnd::PowerOff => "poweroff",
            GuestEnd::Reset => "reset",
            GuestEnd::Crash => "crash",
            GuestEnd::Panic => "panic",
            GuestEnd::Fault(_) => "guest-fault",
            GuestEnd::Timeout => "timeout",
            GuestEnd::Interrupted => "interrupted",
            GuestEnd::VmmFailure(_) => "vmm-failure",
        }
    }
}

impl From<GuestEvent> for GuestEnd {
    fn from(ev: GuestEvent) -> Self {
        match ev {
            GuestEvent::PowerOff => GuestEnd::PowerOff,
            GuestEvent::Reset => GuestEnd::Reset,
            GuestEvent::Crash => GuestEnd::Crash,
            GuestEvent::Fault(m) => GuestEnd::Fault(m),
            GuestEvent::VcpuFailed(m) => GuestEnd::VmmFailure(m),
        }
    }
}

/// Measurements of one run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub end: GuestEnd,
    /// VMM start to the guest's write to the boot-timer register.
    pub boot_time: Option<Duration>,
    /// VMM start to the first vCPU launch.
    pub vmm_ready: Duration,
    pub wall: Duration,
}
