//! The KVM machine (aarch64 hosts only): memory, vCPUs, vGIC, devices and the event loop.
//!
//! Everything guest-facing goes through `crate::devices`, which is plain Rust tested on any
//! host; this module is the thin KVM glue around it.

mod gic;
mod memory;
mod running;
mod stdin;
mod vcpu;

use std::cell::RefCell;
use std::fs::File;
use std::io::{Cursor, Read};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::loader::pe::PE;
use linux_loader::loader::KernelLoader;
use log::{debug, info, warn};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use firmware::layout::{self, MIB};
use firmware::{BootParams, MemoryMap, Resolved};

use crate::devices::pl011::Pl011;
use crate::devices::testdev::{FillState, ProbeRegion, TestDev};
use crate::devices::{lock, IrqLine, MmioBus, SharedConsole, UartOut};
use crate::guest_memory::{self, GuestProbe};
use crate::machine::{GuestEnd, MachineSpec, RunReport, Watch};
use crate::vcpu_exit::GuestEvent;
use crate::{board, guest};

use running::RunningVm;

/// A sender that also wakes the event loop.
#[derive(Clone)]
pub struct EventSender {
    tx: Sender<GuestEvent>,
    wake: Arc<EventFd>,
}

impl EventSender {
    pub fn send(&self, ev: GuestEvent) -> Result<(), std::sync::mpsc::SendError<GuestEvent>> {
        self.tx.send(ev)?;
        let _ = self.wake.write(1);
        Ok(())
    }
}

/// The PL011's interrupt wire: KVM_IRQ_LINE on an SPI of the in-kernel GIC.
struct SpiLine {
    vm: Arc<VmFd>,
    irq: u32,
}

impl IrqLine for SpiLine {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.irq, high) {
            warn!("KVM_IRQ_LINE {:#x} = {high}: {e}", self.irq);
        }
    }
}

fn spi_irq(spi: u32) -> u32 {
    (KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | (32 + spi)
}

/// Open /dev/kvm with an error that says what to do.
fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => anyhow!(
            "/dev/kvm does not exist: this host has no KVM (enable virtualization in firmware, \
             load the kvm module, or run gracevm on an x86_64 host where it nests in qemu)"
        ),
        libc::EACCES | libc::EPERM => {
            anyhow!("/dev/kvm is not accessible: add your user to the 'kvm' group or run as root")
        }
        _ => anyhow!("cannot open /dev/kvm: {e}"),
    })
}

/// Boot a guest and run it to its end.
pub fn run(spec: MachineSpec) -> Result<RunReport> {
    let started = spec.started;
    let platform = &spec.platform;
    let vm = Arc::new(create_vm(platform)?);
    let map = platform.map();
    let mem = memory::create(&vm, &memory_ranges(map))?;
    let when = if spec.eager_fill {
        guest_memory::FillWhen::Now
    } else {
        guest_memory::FillWhen::OnRequest
    };
    let (probe_regions, fill) = fill_observable(&mem, map, when)?;
    let vcpus = vcpu::create_all(&vm, platform.vcpus)?;
    let _gic = gic::Gic::create(&vm)?;
    load_guest(&mem, &spec, &vcpus)?;

    let (tx, rx) = channel();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?);
    let events = EventSender {
        tx,
        wake: wake.clone(),
    };
    let probe = GuestProbe {
        mem: mem.clone(),
        fill: fill.gate(),
    };
    let devices = Devices::create(&vm, map, spec.console, probe_regions, probe, started)?;
    let vmm_ready = started.elapsed();
    let running = RunningVm::start(vm, mem, vcpus, devices.bus.clone(), &events)?;
    info!(
        "guest started: {} vCPUs, {} MiB RAM, VMM ready in {:.1} ms",
        platform.vcpus,
        platform.boot_ram() / MIB,
        vmm_ready.as_secs_f64() * 1e3
    );
    let ends = EndWatch {
        interactive: spec.interactive,
        timeout: spec.timeout,
        watch: &spec.watch,
        power_off: &devices.power_off,
    };
    let end = event_loop(&wake, &rx, devices.uart.clone(), &ends)?;
    let asked = fill.gate().state() != FillState::Unasked;
    match fill.finish() {
        Some(took) => info!(
            "carve-out pattern fill took {:.1} ms",
            took.as_secs_f64() * 1e3
        ),
        None if !asked && !map.carve_outs.is_empty() => {
            info!("carve-out pattern fill: not asked for (no test of this run needed it)")
        }
        None => {}
    }
    // Every vCPU stopped before the boot time is read and the memory goes.
    drop(running);
    Ok(RunReport {
        end,
        boot_time: devices.boot_time(),
        vmm_ready,
        wall: started.elapsed(),
    })
}

/// The VM, with the guest physical address size the platform needs.
fn create_vm(platform: &Resolved) -> Result<VmFd> {
    let kvm = open_kvm()?;
    let limit = kvm.get_host_ipa_limit();
    let vm_type = if limit > 0 {
        platform
            .validate_ipa(limit as u32)
            .map_err(|e| anyhow!("{e}"))?;
        u64::from(platform.required_ipa_bits().max(40))
    } else {
        // KVM without KVM_CAP_ARM_VM_IPA_SIZE: the fixed 40-bit default.
        platform.validate_ipa(40).map_err(|e| anyhow!("{e}"))?;
        0
    };
    kvm.create_vm_with_type(vm_type)
        .context("KVM_CREATE_VM failed")
}

/// Every range of the memory map gets its own memslot: RAM per socket, each EGM carve-out
/// (and an isolated retired-pages table's block), each GPU memory aperture.
fn memory_ranges(map: &MemoryMap) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = map
        .ram
        .iter()
        .map(|r| (r.range.base, r.range.size))
        .collect();
    ranges.extend(map.carve_outs.iter().map(|c| (c.range.base, c.range.size)));
    ranges.extend(
        map.carve_outs
            .iter()
            .filter_map(|c| c.table_block)
            .map(|b| (b.base, b.size)),
    );
    ranges.extend(map.gpus.iter().map(|g| (g.memory.base, g.memory.size)));
    ranges.sort_unstable();
    ranges
}

/// Load the kernel, the initrd and the firmware, and point the boot vCPU at the kernel.
/// Kernel at RAM + 2 MiB, DTB in the top 2 MiB of socket 0 RAM, initrd just below it.
fn load_guest(mem: &memory::GuestMemory, spec: &MachineSpec, vcpus: &[VcpuFd]) -> Result<()> {
    let (entry, kernel_end) = load_kernel(mem, spec)?;
    let ram = spec.platform.boot_ram();
    let dtb_addr = layout::dtb_addr(ram);
    let initrd_len = spec.initrd.len() as u64;
    let initrd_start = (dtb_addr - initrd_len) & !0xfff;
    if initrd_len >= dtb_addr || initrd_start < kernel_end {
        bail!(
            "{} MiB of RAM is too small for this kernel ({} MiB) and initrd ({} MiB)",
            ram / MIB,
            (kernel_end - entry).div_ceil(MIB),
            initrd_len.div_ceil(MIB)
        );
    }
    mem.write_slice(&spec.initrd, GuestAddress(initrd_start))
        .context("writing the initrd")?;
    let mpidrs = vcpus.iter().map(vcpu::mpidr).collect::<Result<Vec<_>>>()?;
    let boot = BootParams {
        cmdline: spec.cmdline.clone(),
        initrd: Some((initrd_start, initrd_start + initrd_len)),
        mpidrs,
        rng_seed: rng_seed()?,
    };
    write_firmware(mem, &spec.platform, &boot, dtb_addr)?;
    vcpu::set_boot_regs(&vcpus[0], entry, dtb_addr)
}

/// The arm64 Image at RAM + 2 MiB: its entry and the end of what it occupies (BSS included).
/// The file is read once, whole: the loader seeks and reads it in pieces, and each piece is a
/// round trip when the file lies on a share.
fn load_kernel(mem: &memory::GuestMemory, spec: &MachineSpec) -> Result<(u64, u64)> {
    let image = std::fs::read(&spec.kernel)
        .with_context(|| format!("reading kernel {}", spec.kernel.display()))?;
    let image_size = arm64_image_size(&image)?;
    let loaded = PE::load(
        mem,
        Some(GuestAddress(layout::RAM_BASE + layout::KERNEL_OFFSET)),
        &mut Cursor::new(&image),
        None,
    )
    .map_err(|e| anyhow!("loading {} as an arm64 Image: {e}", spec.kernel.display()))?;
    let entry = loaded.kernel_load.0;
    Ok((entry, (entry + image_size).max(loaded.kernel_end)))
}

fn rng_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("reading /dev/urandom")?;
    Ok(seed)
}

/// The firmware blob, isolated retired-pages tables and the DTB, where the layout puts them.
fn write_firmware(
    mem: &memory::GuestMemory,
    platform: &Resolved,
    boot: &BootParams,
    dtb_addr: u64,
) -> Result<()> {
    let fw = firmware::build(platform, boot)?;
    mem.write_slice(&fw.blob, GuestAddress(layout::FIRMWARE_BASE))
        .context("writing the firmware blob")?;
    for (addr, table) in &fw.isolated_tables {
        mem.write_slice(table, GuestAddress(*addr))
            .with_context(|| format!("writing the retired-pages table at {addr:#x}"))?;
    }
    mem.write_slice(&fw.dtb, GuestAddress(dtb_addr))
        .context("writing the DTB")?;
    info!(
        "{} boot: {} ACPI tables, DTB {} bytes{}",
        fw.boot,
        fw.acpi_tables.len(),
        fw.dtb.len(),
        if fw.extra_cmdline.is_empty() {
            String::new()
        } else {
            format!(", cmdline + '{}'", fw.extra_cmdline)
        }
    );
    Ok(())
}

/// The guest's devices and the MMIO bus the vCPUs reach them through.
struct Devices {
    uart: Arc<Mutex<Pl011>>,
    testdev: Arc<Mutex<TestDev>>,
    bus: Arc<MmioBus>,
    /// Raised by the test device when /init asks it to end the run.
    power_off: Arc<AtomicBool>,
}

impl Devices {
    fn create(
        vm: &Arc<VmFd>,
        map: &MemoryMap,
        console: SharedConsole,
        probe_regions: Vec<ProbeRegion>,
        probe: GuestProbe,
        started: Instant,
    ) -> Result<Self> {
        let uart = Arc::new(Mutex::new(Pl011::new(
            Arc::new(SpiLine {
                vm: vm.clone(),
                irq: spi_irq(layout::UART_SPI),
            }),
            Box::new(UartOut(console.clone())),
        )));
        let testdev = Arc::new(Mutex::new(
            TestDev::new(started)
                .with_probe(probe_regions, Box::new(probe))
                .with_console(console),
        ));
        let mut bus = MmioBus::new();
        bus.insert(layout::UART_BASE, layout::UART_SIZE, uart.clone())?;
        bus.insert(layout::TESTDEV_BASE, layout::TESTDEV_SIZE, testdev.clone())?;
        if let Some(host) = board::pci_host(map)? {
            for w in host.mmio_windows() {
                bus.insert(w.base, w.len, w.device)?;
            }
        }
        let power_off = lock(&testdev).power_off_flag();
        Ok(Devices {
            uart,
            testdev,
            bus: Arc::new(bus),
            power_off,
        })
    }

    /// VMM start to the guest's write to the boot-timer register.
    fn boot_time(&self) -> Option<Duration> {
        lock(&self.testdev).boot_time()
    }
}

/// Fill each carve-out with its boot pattern (so a test can tell "never written" from
/// "zeroed" from "written by the guest"), `when` told, and list every range the guest may
/// probe.
fn fill_observable(
    mem: &memory::GuestMemory,
    map: &MemoryMap,
    when: guest_memory::FillWhen,
) -> Result<(Vec<ProbeRegion>, guest_memory::PatternFill)> {
    let mut regions: Vec<ProbeRegion> = map
        .carve_outs
        .iter()
        .map(|c| ProbeRegion {
            base: c.range.base,
            size: c.range.size,
            seed: guest::carveout_seed(c.pxm),
        })
        .collect();
    let fill = guest_memory::PatternFill::start(mem, &regions, when)
        .context("filling the carve-outs with their boot pattern")?;
    // GPU memory starts zeroed, as fresh RAM does; it is probed with PEEK/CHECK_VALUE.
    regions.extend(map.gpus.iter().map(|g| ProbeRegion {
        base: g.memory.base,
        size: g.memory.size,
        seed: 0,
    }));
    Ok((regions, fill))
}

/// `image_size` from the arm64 Image header: the memory the kernel occupies including BSS.
fn arm64_image_size(image: &[u8]) -> Result<u64> {
    let hdr = image
        .get(..64)
        .context("the kernel file is shorter than an arm64 Image header")?;
    if &hdr[56..60] != b"ARM\x64" {
        bail!("not an arm64 Image (no 'ARM\\x64' magic at offset 56); pass arch/arm64/boot/Image");
    }
    Ok(u64::from_le_bytes(hdr[16..24].try_into().expect("8 bytes")))
}

/// Watches the wake eventfd: vCPU and console events end the run.
struct Watcher<'a> {
    wake: &'a EventFd,
    rx: &'a Receiver<GuestEvent>,
    end: Rc<RefCell<Option<GuestEnd>>>,
}

impl MutEventSubscriber for Watcher<'_> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
        while let Ok(ev) = self.rx.try_recv() {
            debug!("guest event {ev:?}");
            self.end.borrow_mut().get_or_insert(GuestEnd::from(ev));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.wake, EventSet::IN)) {
            warn!("cannot watch the wake eventfd: {e}");
        }
    }
}

/// What else ends a run, besides the vCPUs' events.
struct EndWatch<'a> {
    /// Host stdin feeds the UART (and its escape ends the run).
    interactive: bool,
    timeout: Option<Duration>,
    watch: &'a Watch,
    /// The test device's power-off request.
    power_off: &'a AtomicBool,
}

fn event_loop(
    wake: &EventFd,
    rx: &Receiver<GuestEvent>,
    uart: Arc<Mutex<Pl011>>,
    ends: &EndWatch<'_>,
) -> Result<GuestEnd> {
    let deadline = ends.timeout.map(|t| Instant::now() + t);
    let mut manager: EventManager<Box<dyn MutEventSubscriber + '_>> =
        EventManager::new().context("creating the event manager")?;
    let end = Rc::new(RefCell::new(None));
    manager.add_subscriber(Box::new(Watcher {
        wake,
        rx,
        end: end.clone(),
    }));
    let input = if ends.interactive {
        let s = stdin::Stdin::new(uart)?;
        let quit = s.quit_flag();
        manager.add_subscriber(Box::new(s));
        Some(quit)
    } else {
        None
    };
    loop {
        // Short waits keep timeouts and Ctrl-C responsive without more fds.
        manager.run_with_timeout(100).context("event loop")?;
        // A panic on the console outranks the reset `panic=-1` makes right after it, and
        // ends the run even when the kernel is left spinning.
        if ends.watch.panicked.load(Ordering::Acquire) {
            return Ok(GuestEnd::Panic);
        }
        if let Some(end) = end.borrow_mut().take() {
            return Ok(end);
        }
        // The guest's kernel could not shut down (an oops left a lock held): /init asked the
        // test device instead.
        if ends.power_off.load(Ordering::Acquire) {
            return Ok(GuestEnd::PowerOff);
        }
        if input.as_ref().is_some_and(|q| q.load(Ordering::Acquire)) {
            return Ok(GuestEnd::Interrupted);
        }
        if ends.watch.interrupted.load(Ordering::Acquire) {
            return Ok(GuestEnd::Interrupted);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(GuestEnd::Timeout);
        }
    }
}
