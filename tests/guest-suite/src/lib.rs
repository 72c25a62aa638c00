//! The in-guest test suite of gracevm, as a library: the `gracevm-suite` binary is its CLI.
//!
//! Tests live in [`suites`]; each is a function from [`registry::Context`] to
//! [`outcome::Outcome`], run in its own process by [`runner`], reported as KTAP by [`ktap`].
//! Later suites use [`kconfig::kernel_has`] / [`kconfig::require_kernel`] to SKIP on kernels
//! without a feature and [`env::GuestEnv`] for the VMM's expectations. [`devmem`] maps guest
//! physical memory and [`testdev`] asks the VMM what it sees there.

pub mod devmem;
pub mod egm;
pub mod env;
pub mod faults;
pub mod firmware;
pub mod gpus;
pub mod kconfig;
pub mod kmod;
pub mod kmsg;
pub mod ktap;
pub mod mapping;
pub mod outcome;
pub mod pci;
pub mod procfs;
pub mod registry;
pub mod runner;
pub mod suites;
pub mod testdev;
pub mod vfio;
