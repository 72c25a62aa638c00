//! The guest's memory as the VMM maps it, apart from KVM: the carve-outs' boot pattern (filled
//! when asked) and the test device's view of it ([`GuestProbe`]). No VM is needed, so all of it
//! is tested on any host.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use log::{info, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::lock;
use crate::devices::testdev::{
    pattern_word, FillState, MemoryProbe, ProbeRegion, Unreadable, Want,
};

pub type GuestMemory = GuestMemoryMmap<()>;

const UNASKED: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;

/// The fill, given the flag that stops it; how long it took, or None if it was stopped.
type FillJob = Box<dyn FnOnce(&AtomicBool) -> Option<Duration> + Send>;

/// The fill as the test device sees it: its state, and the guest's request to start it.
pub struct FillGate {
    state: AtomicU8,
    stop: AtomicBool,
    /// The fill not yet started (taken by the first request).
    job: Mutex<Option<FillJob>>,
    /// The running fill; it returns how long it took, or None if it was stopped.
    thread: Mutex<Option<JoinHandle<Option<Duration>>>>,
}

impl std::fmt::Debug for FillGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillGate")
            .field("state", &self.state())
            .finish()
    }
}

impl FillGate {
    pub fn state(&self) -> FillState {
        match self.state.load(Ordering::Acquire) {
            UNASKED => FillState::Unasked,
            RUNNING => FillState::Running,
            _ => FillState::Done,
        }
    }

    /// Start the fill on a thread of its own unless it started already (the guest's FILL).
    pub fn request(self: &Arc<Self>) {
        let Some(job) = lock(&self.job).take() else {
            return;
        };
        self.state.store(RUNNING, Ordering::Release);
        info!("carve-out pattern fill asked for by the guest");
        let gate = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pattern-fill".into())
            .spawn(move || {
                let took = job(&gate.stop);
                gate.state.store(DONE, Ordering::Release);
                took
            });
        match spawned {
            Ok(t) => *lock(&self.thread) = Some(t),
            Err(e) => {
                // The guest then sees a finished fill whose checks fail: the log says why.
                warn!("cannot start the carve-out fill thread: {e}");
                self.state.store(DONE, Ordering::Release);
            }
        }
    }
}

/// The boot pattern of the carve-outs. Filling a 1 GiB carve-out takes seconds when the VMM
/// itself runs under emulation, so a test run fills only when the guest asks for it (the test
/// device's FILL, sent by a suite with a test that needs the pattern), on a thread of its own;
/// the guest polls for it (AWAIT_FILL) before anything may write there. A run with a shell or
/// a command fills before the guest starts. Dropping it stops the thread and joins it.
pub struct PatternFill {
    gate: Arc<FillGate>,
    /// How long a fill made before `start` returned took.
    took: Option<Duration>,
}

/// When [`PatternFill::start`] fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillWhen {
    /// Before returning.
    Now,
    /// When the guest asks ([`FillGate::request`]).
    OnRequest,
}

impl PatternFill {
    /// Fill each region of `regions` with [`pattern_word`]`(region.seed, offset)` in every
    /// u64 (what CHECK_PATTERN compares), `when` told.
    pub fn start(mem: &GuestMemory, regions: &[ProbeRegion], when: FillWhen) -> Result<Self> {
        for r in regions {
            if r.base % 8 != 0 || r.size % 8 != 0 {
                bail!("fill of {:#x}+{:#x} is not 8-byte aligned", r.base, r.size);
            }
            mem.get_slice(GuestAddress(r.base), r.size as usize)
                .with_context(|| {
                    format!("{:#x}+{:#x} is not one guest memory region", r.base, r.size)
                })?;
        }
        let gate = Arc::new(FillGate {
            state: AtomicU8::new(UNASKED),
            stop: AtomicBool::new(false),
            job: Mutex::new(None),
            thread: Mutex::new(None),
        });
        let job = {
            let (mem, regions) = (mem.clone(), regions.to_vec());
            move |stop: &AtomicBool| {
                let started = Instant::now();
                for r in regions {
                    fill_words(&mem, r, stop);
                }
                (!stop.load(Ordering::Relaxed)).then(|| started.elapsed())
            }
        };
        let mut fill = Self { gate, took: None };
        match when {
            FillWhen::Now => {
                fill.took = job(&fill.gate.stop);
                fill.gate.state.store(DONE, Ordering::Release);
            }
            FillWhen::OnRequest => *lock(&fill.gate.job) = Some(Box::new(job)),
        }
        Ok(fill)
    }

    pub fn gate(&self) -> Arc<FillGate> {
        self.gate.clone()
    }

    /// Stop the fill if it still runs; how long it took if it ran to its end (None also when
    /// nothing asked for it).
    pub fn finish(mut self) -> Option<Duration> {
        self.stop()
    }

    fn stop(&mut self) -> Option<Duration> {
        self.gate.stop.store(true, Ordering::Relaxed);
        // A fill asked for from now on has nothing to do.
        lock(&self.gate.job).take();
        if let Some(t) = lock(&self.gate.thread).take() {
            self.took = t.join().ok().flatten();
        }
        // A guest still polling must not wait for a fill that will never end.
        if self.gate.state() == FillState::Running {
            self.gate.state.store(DONE, Ordering::Release);
        }
        self.took
    }
}

impl Drop for PatternFill {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Write [`pattern_word`]`(seed, offset)` into every u64 of one region: each 64 KiB computed
/// in a byte buffer (plain, vectorisable code) and copied in with vm-memory's byte copy, a
/// `memcpy` (its copy of a u64 slice is a volatile store per word, which under emulation costs
/// several times more). Stops between chunks when asked.
fn fill_words(mem: &GuestMemory, r: ProbeRegion, stop: &AtomicBool) {
    const CHUNK: u64 = 64 << 10;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < r.size && !stop.load(Ordering::Relaxed) {
        let n = CHUNK.min(r.size - off) as usize;
        for (i, w) in buf[..n].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pattern_word(r.seed, off + 8 * i as u64).to_le_bytes());
        }
        // Checked at start: the whole region lies in one memory region, so every chunk does.
        if let Ok(slice) = mem.get_slice(GuestAddress(r.base + off), n) {
            slice.copy_from(&buf[..n]);
        }
        off += CHUNK;
    }
}

/// The test device's view of guest memory: the VMM's own mappings.
pub struct GuestProbe {
    pub mem: GuestMemory,
    pub fill: Arc<FillGate>,
}

impl MemoryProbe for GuestProbe {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.mem.read_slice(buf, GuestAddress(gpa)).is_ok()
    }

    /// Compared where it lies: a copy first would double the memory traffic, and a region
    /// check is the costliest thing the suite asks of the VMM.
    fn first_mismatch(&self, gpa: u64, len: u64, want: Want) -> Result<Option<u64>, Unreadable> {
        let n = usize::try_from(len).map_err(|_| Unreadable)?;
        // One mapping covers the whole range, or it is not read at all.
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), n)
            .map_err(|_| Unreadable)?;
        let guard = slice.ptr_guard();
        let words = guard.as_ptr().cast::<u64>();
        if !words.is_aligned() {
            return Err(Unreadable);
        }
        let found = want.scan(n / 8, |i| {
            // SAFETY: `words` points at `n` mapped bytes of guest memory, aligned for u64, which
            // stay mapped while `guard` lives, and i < n / 8. The read is volatile: vCPUs may
            // write there at any time.
            unsafe { words.add(i).read_volatile() }
        });
        Ok(found.map(|i| 8 * i as u64))
    }

    fn fill_state(&self) -> FillState {
        self.fill.state()
    }

    fn request_fill(&self) {
        self.fill.request();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same memory seen through `read` only, so the trait's buffered comparison runs.
    struct Copied<'a>(&'a GuestProbe);

    impl MemoryProbe for Copied<'_> {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            self.0.read(gpa, buf)
        }
        fn fill_state(&self) -> FillState {
            FillState::Done
        }
        fn request_fill(&self) {}
    }

    #[test]
    fn test_mapping_comparison_agrees_with_the_copied_one() {
        const BASE: u64 = 0x4000_0000;
        const SIZE: u64 = 0x3_0000;
        const SEED: u64 = 0x5eed_0000_0000_0002;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(BASE), SIZE as usize)])
            .expect("anonymous mapping");
        let region = ProbeRegion {
            base: BASE,
            size: SIZE,
            seed: SEED,
        };
        let fill = PatternFill::start(&mem, &[region], FillWhen::Now).expect("fill");
        let probe = GuestProbe {
            mem: mem.clone(),
            fill: fill.gate(),
        };
        let pattern = |offset| Want::Pattern { seed: SEED, offset };
        let both = |gpa, len, want| {
            let direct = probe.first_mismatch(gpa, len, want);
            assert_eq!(direct, Copied(&probe).first_mismatch(gpa, len, want));
            direct
        };
        assert_eq!(both(BASE, SIZE, pattern(0)), Ok(None));
        assert_eq!(both(BASE + 0x1008, 0x100, pattern(0x1008)), Ok(None));
        // Off by one word: every word differs, the first is reported.
        assert_eq!(both(BASE + 0x1008, 0x100, pattern(0x1000)), Ok(Some(0)));
        // One word changed past the first 64 KiB copy, inside a block of eight.
        let at = 0x1_2348;
        mem.write_obj(0u64, GuestAddress(BASE + at))
            .expect("in range");
        assert_eq!(both(BASE, SIZE, pattern(0)), Ok(Some(at)));
        assert_eq!(
            both(BASE + at + 8, SIZE - at - 8, pattern(at + 8)),
            Ok(None)
        );
        assert_eq!(both(BASE + at, 8, Want::Value(0)), Ok(None));
        assert_eq!(both(BASE + at - 8, 16, Want::Value(0)), Ok(Some(0)));
        // Past the mapping: not read.
        assert_eq!(
            both(BASE + SIZE - 8, 16, pattern(SIZE - 8)),
            Err(Unreadable)
        );
        assert_eq!(both(BASE - 8, 16, Want::Value(0)), Err(Unreadable));
    }
}
