//! Guest RAM: anonymous host mappings, one KVM memslot each.

use anyhow::{bail, Context, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use log::debug;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use crate::guest_memory::GuestMemory;

/// Map `ranges` (guest address, size) and register each as a memslot of `vm`.
pub fn create(vm: &VmFd, ranges: &[(u64, u64)]) -> Result<GuestMemory> {
    let ranges: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|&(base, size)| (GuestAddress(base), size as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).context("mapping guest RAM")?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .context("guest RAM region has no host mapping")?;
        // Huge pages even where the host's THP policy is "madvise", and compacted for if need
        // be: KVM then maps 2 MiB blocks at stage 2, 512 times fewer faults (each an exit, and
        // dear when nested). Only advice: without it the guest runs, more slowly.
        // SAFETY: madvise only advises the kernel about `host..host+len`, a live mapping owned
        // by `mem`; it changes no memory.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) } != 0 {
            debug!(
                "madvise(MADV_HUGEPAGE) on guest memory at {:#x}: {}",
                region.start_addr().0,
                std::io::Error::last_os_error()
            );
        }
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is a live anonymous mapping owned by `mem`; the caller keeps
        // `mem` alive for as long as the VM exists (both are owned by the Machine, and the
        // process exits with them), so KVM never sees the mapping go away under the guest.
        let res = unsafe { vm.set_user_memory_region(r) };
        if let Err(e) = res {
            bail!(
                "KVM refused guest memory at {:#x} (+{:#x}): {e}",
                r.guest_phys_addr,
                r.memory_size
            );
        }
    }
    Ok(mem)
}
