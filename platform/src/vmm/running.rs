//! The running machine: the VM, its memory and its vCPU threads. Dropping it stops and joins
//! every thread, on every path out of a run (its end, an event-loop error, a spawn that failed
//! half way), before the memory KVM runs the guest in is unmapped.
//!
//! Stopping: a flag, then a real-time signal to each thread. The signal's handler sets KVM's
//! `immediate_exit` on the thread's own vCPU, so a thread that checked the flag just before
//! the stop still leaves its next KVM_RUN at once (EINTR) instead of running the guest on.
//!
//! A vCPU thread that panics reports it to the event loop, which ends the run as a VMM
//! failure; under `panic = "abort"` (release builds) the thread then parks instead of
//! aborting gracevm, so the run's results are still written.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuFd, VmFd};
use log::{error, warn};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::MmioBus;
use crate::vcpu_exit::{panic_message, GuestEvent};
use crate::vmm::memory::GuestMemory;
use crate::vmm::{vcpu, EventSender};

/// How long a stop waits for the vCPU threads before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(2);

thread_local! {
    /// This thread's vCPU `kvm_run` (KVM's mapping), for the kick handler; null whenever the
    /// thread does not own a live vCPU.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
    /// Where this vCPU thread reports a panic.
    static PANIC_REPORT: RefCell<Option<PanicReport>> = const { RefCell::new(None) };
}

struct PanicReport {
    id: u32,
    events: EventSender,
    /// Raised when the thread parks for good after its panic (it cannot be joined).
    parked: Arc<AtomicBool>,
}

struct VcpuThread {
    handle: JoinHandle<()>,
    parked: Arc<AtomicBool>,
}

/// The VM with its vCPUs running; see the module docs.
pub struct RunningVm {
    stop: Arc<AtomicBool>,
    threads: Vec<VcpuThread>,
    // Dropped after `Drop::drop` has joined the threads: nothing runs the guest any more.
    _vm: Arc<VmFd>,
    _memory: GuestMemory,
}

impl RunningVm {
    /// Start one thread per vCPU, each serving its MMIO exits from `bus` and reporting how the
    /// guest ends through `events`.
    pub fn start(
        vm: Arc<VmFd>,
        memory: GuestMemory,
        vcpus: Vec<VcpuFd>,
        bus: Arc<MmioBus>,
        events: &EventSender,
    ) -> Result<Self> {
        register_signal_handler(SIGRTMIN(), kick).context("installing the vCPU kick handler")?;
        report_vcpu_panics();
        let mut running = RunningVm {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::with_capacity(vcpus.len()),
            _vm: vm,
            _memory: memory,
        };
        for (id, fd) in vcpus.into_iter().enumerate() {
            // On an error `running` is dropped: the threads already started are stopped.
            running.spawn(id as u32, fd, bus.clone(), events.clone())?;
        }
        Ok(running)
    }

    fn spawn(&mut self, id: u32, fd: VcpuFd, bus: Arc<MmioBus>, events: EventSender) -> Result<()> {
        let stop = self.stop.clone();
        let parked = Arc::new(AtomicBool::new(false));
        let report = PanicReport {
            id,
            events: events.clone(),
            parked: parked.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_thread(id, fd, &bus, &stop, &events, report))
            .with_context(|| format!("spawning the thread of vCPU {id}"))?;
        self.threads.push(VcpuThread { handle, parked });
        Ok(())
    }

    /// Stop every vCPU thread and join those that end within [`STOP_GRACE`].
    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        let give_up = Instant::now() + STOP_GRACE;
        loop {
            let running: Vec<&VcpuThread> = self
                .threads
                .iter()
                .filter(|t| !t.handle.is_finished() && !t.parked.load(Ordering::Acquire))
                .collect();
            if running.is_empty() {
                break;
            }
            if Instant::now() > give_up {
                warn!(
                    "{} vCPU thread(s) did not stop; exiting anyway",
                    running.len()
                );
                return;
            }
            for t in running {
                let _ = t.handle.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in self.threads.drain(..) {
            // A thread parked after its panic never ends; the process takes it down.
            if t.handle.is_finished() {
                let _ = t.handle.join();
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The body of vCPU thread `id`.
fn vcpu_thread(
    id: u32,
    mut fd: VcpuFd,
    bus: &MmioBus,
    stop: &AtomicBool,
    events: &EventSender,
    report: PanicReport,
) {
    PANIC_REPORT.with(|r| r.replace(Some(report)));
    KVM_RUN.with(|r| r.set(fd.get_kvm_run()));
    // The panic hook has reported a panic already; catching it only keeps it from
    // reaching the thread's join.
    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
        vcpu::run_loop(id, &mut fd, bus, stop, events)
    }));
    // The kick handler must not reach the mapping once `fd` unmaps it.
    KVM_RUN.with(|r| r.set(ptr::null_mut()));
    PANIC_REPORT.with(|r| r.take());
}

/// The stop signal's handler: leave (or do not enter) KVM_RUN at once.
extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's own vCPU's kvm_run mapping, set by `vcpu_thread`
        // while it owns the VcpuFd and cleared before the fd (and the mapping) goes away; the
        // handler runs on that same thread, so the mapping is live. A volatile write of one
        // byte is what KVM reads at its next KVM_RUN.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// A panic in a vCPU thread is sent to the event loop as a VMM failure; other threads' panics
/// go to the hook installed before.
fn report_vcpu_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let Some(report) = PANIC_REPORT.try_with(|r| r.take()).ok().flatten() else {
                return previous(info);
            };
            let at = info
                .location()
                .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
            let msg = format!(
                "vCPU {} panicked{at}: {}",
                report.id,
                panic_message(info.payload())
            );
            error!("{msg}");
            let _ = report.events.send(GuestEvent::VcpuFailed(msg));
            if cfg!(panic = "abort") {
                // Returning would abort gracevm before the event loop ends the run and its
                // results are written: park for good instead.
                report.parked.store(true, Ordering::Release);
                loop {
                    std::thread::park();
                }
            }
        }));
    });
}
