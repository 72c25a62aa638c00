//! The in-kernel vGICv3, created after the last vCPU as KVM requires.

use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};

use firmware::layout::{GIC_DIST_BASE, GIC_NR_IRQS, GIC_REDIST_BASE};

/// Keeps the device fd open for the life of the VM.
pub struct Gic {
    _fd: DeviceFd,
}

impl Gic {
    pub fn create(vm: &VmFd) -> Result<Self> {
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = vm.create_device(&mut dev).context(
            "KVM cannot create a GICv3 (KVM_CREATE_DEVICE); gracevm needs a host with a GICv3",
        )?;

        let dist: u64 = GIC_DIST_BASE;
        let redist: u64 = GIC_REDIST_BASE;
        set_attr(
            &fd,
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_DIST.into(),
            &dist,
        )
        .context("setting the GIC distributor address")?;
        set_attr(
            &fd,
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_REDIST.into(),
            &redist,
        )
        .context("setting the GIC redistributor address")?;
        let nr_irqs: u32 = GIC_NR_IRQS;
        set_attr(&fd, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &nr_irqs)
            .context("setting the number of GIC interrupts")?;
        let none: u64 = 0;
        set_attr(
            &fd,
            KVM_DEV_ARM_VGIC_GRP_CTRL,
            KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
            &none,
        )
        .context("initialising the vGIC")?;
        Ok(Gic { _fd: fd })
    }
}

fn set_attr<T>(fd: &DeviceFd, group: u32, attr: u64, value: &T) -> Result<(), kvm_ioctls::Error> {
    let a = kvm_device_attr {
        group,
        attr,
        // KVM reads the value through this pointer during the ioctl; `value` outlives it.
        addr: value as *const T as u64,
        flags: 0,
    };
    fd.set_device_attr(&a)
}
