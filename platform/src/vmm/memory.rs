//! Guest RAM: anonymous host mappings, one KVM memslot each.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::devices::testdev::ProbeRegion;

pub type GuestMemory = GuestMemoryMmap<()>;

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

/// Whether the fill has finished (or was abandoned because the run ended).
#[derive(Debug, Default)]
pub struct FillGate {
    done: AtomicBool,
    stop: AtomicBool,
}

impl FillGate {
    /// Whether the fill is over.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn open(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// The boot pattern of the carve-outs. Filling a 1 GiB carve-out takes seconds when the VMM
/// itself runs under emulation, so test runs fill on a thread of their own beside the guest's
/// boot; the guest polls for it (the test device's AwaitFill) before anything may write there.
/// Dropping it stops the thread and joins it.
pub struct PatternFill {
    gate: Arc<FillGate>,
    /// The background fill; it returns how long the fill took, or None if it was stopped.
    thread: Option<JoinHandle<Option<Duration>>>,
    /// How long a fill made before `start` returned took.
    took: Option<Duration>,
}

impl PatternFill {
    /// Start filling each region of `regions` with `word(region.seed, offset)` in every u64;
    /// `background` false fills before returning.
    pub fn start<W>(
        mem: &GuestMemory,
        regions: &[ProbeRegion],
        word: W,
        background: bool,
    ) -> Result<Self>
    where
        W: Fn(u64, u64) -> u64 + Copy + Send + 'static,
    {
        for r in regions {
            if r.base % 8 != 0 || r.size % 8 != 0 {
                bail!("fill of {:#x}+{:#x} is not 8-byte aligned", r.base, r.size);
            }
            mem.get_slice(GuestAddress(r.base), r.size as usize)
                .with_context(|| {
                    format!("{:#x}+{:#x} is not one guest memory region", r.base, r.size)
                })?;
        }
        let gate = Arc::new(FillGate::default());
        let job = {
            let (gate, mem, regions) = (gate.clone(), mem.clone(), regions.to_vec());
            move || {
                let started = Instant::now();
                for r in regions {
                    fill_words(&mem, r, word, &gate.stop);
                }
                gate.open();
                (!gate.stop.load(Ordering::Relaxed)).then(|| started.elapsed())
            }
        };
        let mut fill = Self {
            gate,
            thread: None,
            took: None,
        };
        if background {
            let t = std::thread::Builder::new()
                .name("pattern-fill".into())
                .spawn(job)
                .context("spawning the carve-out fill thread")?;
            fill.thread = Some(t);
        } else {
            fill.took = job();
        }
        Ok(fill)
    }

    pub fn gate(&self) -> Arc<FillGate> {
        self.gate.clone()
    }

    /// Stop the fill if it still runs; how long it took if it had finished.
    pub fn finish(mut self) -> Option<Duration> {
        self.stop()
    }

    fn stop(&mut self) -> Option<Duration> {
        self.gate.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            self.took = t.join().ok().flatten();
        }
        // A guest still polling must not wait for a fill that will never end.
        self.gate.open();
        self.took
    }
}

impl Drop for PatternFill {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Write `word(seed, offset)` into every u64 of one region: each 64 KiB computed in a byte
/// buffer (plain, vectorisable code) and copied in with vm-memory's byte copy, a `memcpy`
/// (its copy of a u64 slice is a volatile store per word, which under emulation costs several
/// times more). Stops between chunks when asked.
fn fill_words<W: Fn(u64, u64) -> u64>(
    mem: &GuestMemory,
    r: ProbeRegion,
    word: W,
    stop: &AtomicBool,
) {
    const CHUNK: u64 = 64 << 10;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < r.size && !stop.load(Ordering::Relaxed) {
        let n = CHUNK.min(r.size - off) as usize;
        for (i, w) in buf[..n].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&word(r.seed, off + 8 * i as u64).to_le_bytes());
        }
        // Checked at start: the whole region lies in one memory region, so every chunk does.
        if let Ok(slice) = mem.get_slice(GuestAddress(r.base + off), n) {
            slice.copy_from(&buf[..n]);
        }
        off += CHUNK;
    }
}
