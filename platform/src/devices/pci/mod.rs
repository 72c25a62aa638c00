//! PCI Express: a host bridge with bus 0 ([`bridge`]), a reusable type-0 configuration space
//! ([`config`]) and the Grace GPU function ([`gpu`]).
//!
//! Wiring (the VMM's side):
//!
//! 1. Build a [`PciRoot`] from the memory map's [`PciWindows`] (ECAM, 32-bit and 64-bit MMIO).
//! 2. [`PciRoot::add_function`] each function at bus 0, device N, function 0, e.g. a
//!    [`GpuFunction`] per GPU (GB200 has two per socket: two devices).
//! 3. Wrap it in a [`PciHost`] and insert its three [`PciHost::mmio_windows`] into the
//!    [`MmioBus`](super::MmioBus). Nothing is registered per BAR: the guest assigns BAR
//!    addresses through config space and the BAR windows route each access to whichever
//!    function's BAR decodes it at that moment.
//! 4. Describe the host bridge in DT (`pci-host-ecam-generic`) / ACPI (MCFG + `PNP0A08`) with
//!    the same windows, and each function at devfn `device << 3`.
//!
//! Functions raise no interrupts (interrupt pin 0), so no INTx routing is needed for them.
//! The GPU's memory aperture is not a BAR: the VMM maps it as its own memslot.
//!
//! Guest input never panics the models: bad config or BAR accesses are logged through a
//! `WarnLimiter` and ignored. [`fuzzing`] drives them from byte streams
//! (the cargo-fuzz targets in `platform/fuzz/` and the 100k-step unit tests).

pub mod bridge;
pub mod config;
pub mod fuzzing;
pub mod gpu;

pub use bridge::{PciError, PciHost, PciMmioWindow, PciRoot, PciWindows};
pub use config::{Bar, BarKind, ConfigError, ConfigSpace, FunctionIdentity};
pub use gpu::{Clock, GpuConfig, GpuFunction, ManualClock, Readiness, SystemClock};

/// A PCI function on bus 0: its configuration space and its BARs.
///
/// The host bridge calls `config_*` for ECAM accesses addressed to the function (`reg` is the
/// register offset, 0..0x1000) and `bar_*` for accesses that fall inside BAR `bar` while
/// COMMAND.memory is set (`offset` is relative to the BAR's start, and the whole access lies
/// within the BAR). All of them carry guest input: they must never panic.
pub trait PciFunction: Send {
    fn config(&self) -> &ConfigSpace;

    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// A config read; override to add side effects.
    fn config_read(&mut self, reg: u64, data: &mut [u8]) {
        self.config_mut().read(reg, data);
    }

    /// A config write; override to add side effects (the default applies writable bits).
    fn config_write(&mut self, reg: u64, data: &[u8]) {
        self.config_mut().write(reg, data);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}
