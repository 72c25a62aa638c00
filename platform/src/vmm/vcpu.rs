//! vCPU creation, boot registers and the run loop of one vCPU thread.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_EXIT_ARM_NISV, KVM_REG_ARM64,
    KVM_REG_ARM64_SYSREG, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use log::{debug, warn};

use crate::devices::MmioBus;
use crate::vcpu_exit::{
    classify, Exit, Next, EXIT_ARM_NISV, SYSTEM_EVENT_CRASH, SYSTEM_EVENT_RESET,
    SYSTEM_EVENT_SHUTDOWN,
};
use crate::vmm::EventSender;

/// Offsets in `struct kvm_regs` (arch/arm64/include/uapi/asm/kvm.h): x0..x30, sp, pc, pstate.
const CORE_X0: u64 = 0;
const CORE_PC: u64 = 32 * 8;
const CORE_PSTATE: u64 = 33 * 8;
/// EL1h with D, A, I and F masked: where the arm64 boot protocol wants the kernel entered.
const PSTATE_EL1H_DAIF: u64 = 0x3c5;

fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4)
}

/// MPIDR_EL1 is op0=3, op1=0, CRn=0, CRm=0, op2=5.
fn mpidr_reg() -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM64_SYSREG) | (3 << 14) | 5
}

/// Create and initialise `count` vCPUs; all but the first start powered off and are brought up
/// by the guest with PSCI CPU_ON (handled inside KVM).
pub fn create_all(vm: &VmFd, count: u32) -> Result<Vec<VcpuFd>> {
    let mut kvi = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut kvi)
        .context("KVM_ARM_PREFERRED_TARGET failed")?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    let mut vcpus = Vec::with_capacity(count as usize);
    for id in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .with_context(|| format!("creating vCPU {id}"))?;
        let mut init = kvi;
        if id > 0 {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.vcpu_init(&init)
            .with_context(|| format!("KVM_ARM_VCPU_INIT on vCPU {id}"))?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

pub fn mpidr(vcpu: &VcpuFd) -> Result<u64> {
    let mut buf = [0u8; 8];
    vcpu.get_one_reg(mpidr_reg(), &mut buf)
        .context("reading MPIDR_EL1")?;
    Ok(u64::from_le_bytes(buf))
}

/// Point the boot vCPU at the kernel with the DTB in X0 (X1..X3 are zero after init).
pub fn set_boot_regs(vcpu: &VcpuFd, entry: u64, dtb: u64) -> Result<()> {
    let set = |off: u64, val: u64| {
        vcpu.set_one_reg(core_reg(off), &val.to_le_bytes())
            .map(|_| ())
            .with_context(|| format!("setting core register at offset {off}"))
    };
    set(CORE_PSTATE, PSTATE_EL1H_DAIF)?;
    set(CORE_PC, entry)?;
    set(CORE_X0, dtb)
}

/// Run one vCPU until the guest ends the machine, its run fails, or the VMM asks it to stop.
/// The end is sent to the event loop; a stop request is not (the loop asked for it).
pub fn run_loop(
    id: u32,
    vcpu: &mut VcpuFd,
    bus: &MmioBus,
    stop: &AtomicBool,
    events: &EventSender,
) {
    let mut unhandled = 0u64;
    while !stop.load(Ordering::Acquire) {
        let exit = match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.read(addr, data) {
                    unhandled += 1;
                    note_unhandled(id, "read", addr, data.len(), unhandled);
                }
                continue;
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !bus.write(addr, data) {
                    unhandled += 1;
                    note_unhandled(id, "write", addr, data.len(), unhandled);
                }
                continue;
            }
            Ok(other) => exit_of(other),
            Err(e) => Exit::Error(e.errno()),
        };
        match classify(id, &exit) {
            Next::Continue => {
                // A kick set immediate_exit so a stop cannot slip in before KVM_RUN; the
                // loop's condition decides now, and the next KVM_RUN must really run.
                if exit == Exit::Error(libc::EINTR) || exit == Exit::Intr {
                    vcpu.set_kvm_immediate_exit(0);
                }
                if let Exit::SystemEvent(kind) = exit {
                    debug!("vCPU {id}: ignoring system event {kind}");
                }
            }
            Next::End(ev) => {
                let _ = events.send(ev);
                return;
            }
        }
    }
}

/// kvm-ioctls' exit as the run decides on it (see [`crate::vcpu_exit`]).
fn exit_of(exit: VcpuExit<'_>) -> Exit {
    match exit {
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent(kind),
        VcpuExit::Intr => Exit::Intr,
        VcpuExit::Hypercall(h) => Exit::Hypercall(h.nr),
        VcpuExit::Unsupported(reason) => Exit::Other {
            name: format!("Unsupported({reason})"),
            reason: Some(reason),
        },
        other => Exit::Other {
            name: format!("{other:?}"),
            reason: None,
        },
    }
}

// The host-neutral classification names KVM's constants by value.
const _: () = assert!(
    SYSTEM_EVENT_SHUTDOWN == KVM_SYSTEM_EVENT_SHUTDOWN
        && SYSTEM_EVENT_RESET == KVM_SYSTEM_EVENT_RESET
        && SYSTEM_EVENT_CRASH == KVM_SYSTEM_EVENT_CRASH
        && EXIT_ARM_NISV == KVM_EXIT_ARM_NISV
);

/// A guest touching an address with no device is logged and otherwise ignored (reads see 0);
/// the log is thinned out so a misbehaving guest cannot flood it.
fn note_unhandled(id: u32, what: &str, addr: u64, len: usize, count: u64) {
    if count <= 10 || count.is_power_of_two() {
        warn!("vCPU {id}: guest MMIO {what} of {len} bytes at {addr:#x} hits no device (#{count})");
    }
}
