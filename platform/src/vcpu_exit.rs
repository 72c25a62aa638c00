//! What a vCPU's return from KVM_RUN means for the run, decided without KVM's types so it is
//! tested on any host (`vmm::vcpu` turns kvm-ioctls' exits into [`Exit`]).
//!
//! Who is at fault decides the exit status: a guest that does what no machine can serve (an
//! MMIO access the hardware gave no syndrome for, a hypervisor call nobody answers) crashed,
//! like a guest kernel panic (status 3); KVM or gracevm failing is a VMM error (status 5).
//! Both routes and both build profiles report a guest fault the same way, since it never
//! panics gracevm.

/// Linux's `KVM_SYSTEM_EVENT_*` (include/uapi/linux/kvm.h); `vmm::vcpu` checks them against
/// kvm-bindings at compile time.
pub const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
pub const SYSTEM_EVENT_RESET: u32 = 2;
pub const SYSTEM_EVENT_CRASH: u32 = 3;
/// `KVM_EXIT_ARM_NISV`: a data abort without a valid syndrome, when userspace asked for it.
pub const EXIT_ARM_NISV: u32 = 28;

/// What ends a run, as reported by vCPU threads to the event loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// PSCI SYSTEM_OFF.
    PowerOff,
    /// PSCI SYSTEM_RESET.
    Reset,
    /// PSCI SYSTEM_CRASH / KVM crash event.
    Crash,
    /// The guest did something no machine can serve (see the module docs).
    Fault(String),
    /// KVM or gracevm failed: the run loop's error, or a vCPU thread's panic.
    VcpuFailed(String),
}

/// One return from KVM_RUN, with what decides the run (MMIO is served before this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// KVM_EXIT_SYSTEM_EVENT of this type.
    SystemEvent(u32),
    /// KVM_EXIT_INTR: a signal reached the thread (a kick, or nothing to act on).
    Intr,
    /// KVM_EXIT_HYPERCALL: an SMCCC call KVM handed to userspace.
    Hypercall(u64),
    /// Any other exit reason KVM reported, by its name and raw number when known.
    Other { name: String, reason: Option<u32> },
    /// KVM_RUN failed with this errno.
    Error(i32),
}

/// What the vCPU thread does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run the vCPU again.
    Continue,
    /// Report this and stop the thread.
    End(GuestEvent),
}

/// The decision for vCPU `id`'s `exit`.
pub fn classify(id: u32, exit: &Exit) -> Next {
    let end = Next::End;
    match exit {
        Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN) => end(GuestEvent::PowerOff),
        Exit::SystemEvent(SYSTEM_EVENT_RESET) => end(GuestEvent::Reset),
        Exit::SystemEvent(SYSTEM_EVENT_CRASH) => end(GuestEvent::Crash),
        // Others (suspend, wakeup) only come when asked for; gracevm asks for none.
        Exit::SystemEvent(_) | Exit::Intr => Next::Continue,
        Exit::Error(e) if *e == libc::EINTR || *e == libc::EAGAIN => Next::Continue,
        // arm64 KVM answers a data abort on a non-memslot address without a valid syndrome
        // (ISV=0: a load/store pair, a writeback, ...) with ENOSYS: the guest's access
        // cannot be emulated by anyone.
        Exit::Error(e) if *e == libc::ENOSYS => end(GuestEvent::Fault(format!(
            "vCPU {id}: MMIO access without a valid syndrome (KVM_RUN: ENOSYS): the guest used \
             an instruction no VMM can emulate on a device address"
        ))),
        Exit::Other {
            reason: Some(EXIT_ARM_NISV),
            ..
        } => end(GuestEvent::Fault(format!(
            "vCPU {id}: MMIO access without a valid syndrome (KVM_EXIT_ARM_NISV)"
        ))),
        Exit::Hypercall(nr) => end(GuestEvent::Fault(format!(
            "vCPU {id}: hypervisor call {nr:#x} that gracevm does not provide"
        ))),
        Exit::Error(e) => end(GuestEvent::VcpuFailed(format!(
            "vCPU {id}: KVM_RUN: {}",
            std::io::Error::from_raw_os_error(*e)
        ))),
        Exit::Other { name, .. } => end(GuestEvent::VcpuFailed(format!(
            "vCPU {id}: unexpected exit {name}"
        ))),
    }
}

/// A vCPU thread's panic payload as text.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Status;
    use crate::machine::GuestEnd;

    fn status_of(next: Next) -> Status {
        match next {
            Next::End(ev) => GuestEnd::from(ev).status(),
            Next::Continue => panic!("the run goes on"),
        }
    }

    #[test]
    fn test_classify_psci_events_end_the_run() {
        assert_eq!(
            classify(0, &Exit::SystemEvent(SYSTEM_EVENT_SHUTDOWN)),
            Next::End(GuestEvent::PowerOff)
        );
        assert_eq!(
            classify(0, &Exit::SystemEvent(SYSTEM_EVENT_RESET)),
            Next::End(GuestEvent::Reset)
        );
        assert_eq!(
            status_of(classify(1, &Exit::SystemEvent(SYSTEM_EVENT_CRASH))),
            Status::Panic
        );
    }

    #[test]
    fn test_classify_kicks_and_unknown_events_continue() {
        for e in [
            Exit::Intr,
            Exit::SystemEvent(99),
            Exit::Error(libc::EINTR),
            Exit::Error(libc::EAGAIN),
        ] {
            assert_eq!(classify(0, &e), Next::Continue, "{e:?}");
        }
    }

    #[test]
    fn test_classify_guest_faults_are_crashes_not_vmm_errors() {
        let nisv = Exit::Other {
            name: "Unsupported(28)".into(),
            reason: Some(EXIT_ARM_NISV),
        };
        for e in [
            Exit::Error(libc::ENOSYS),
            nisv,
            Exit::Hypercall(0x8400_0000),
        ] {
            let next = classify(2, &e);
            assert!(
                matches!(&next, Next::End(GuestEvent::Fault(m)) if m.starts_with("vCPU 2:")),
                "{e:?}: {next:?}"
            );
            assert_eq!(status_of(next), Status::Panic, "{e:?}");
        }
    }

    #[test]
    fn test_classify_kvm_failures_are_vmm_errors() {
        let other = Exit::Other {
            name: "FailEntry".into(),
            reason: None,
        };
        for e in [Exit::Error(libc::EFAULT), other] {
            assert_eq!(status_of(classify(0, &e)), Status::VmmError, "{e:?}");
        }
    }

    #[test]
    fn test_panic_message_reads_str_and_string_payloads() {
        assert_eq!(panic_message(&"boom"), "boom");
        assert_eq!(panic_message(&String::from("bang")), "bang");
        assert_eq!(panic_message(&5u8), "(no message)");
    }
}
