//! The contract between the gracevm VMM (host side) and the in-guest suite: facts both sides
//! must read the same way, kept once. Free of dependencies, so the static aarch64 suite builds
//! it as it is.
//!
//! - [`kernel_log`]: which kernel log lines are reports (oops, BUG, KASAN, lockdep, ...), and
//!   how a report is grouped; the suite judges each test's window of `/dev/kmsg` with it and
//!   the host reads the console with it.
//! - [`env`]: `/gracevm/env`, the file the VMM hands the guest: its keys, typed values, the
//!   one writer and the one parser.
//! - [`gpu`]: the GPU function's readiness model and memory style.
//! - [`findings`]: the bugs reviewers found in the EGM series, named once, so a test that
//!   reproduces one says which.
//! - [`properties`]: the GPU function's `nvidia,*` firmware property names.
//! - [`protocol`]: the suite's non-KTAP console lines the host reads.
//! - [`testdev`]: the test device's registers, commands, status codes and boot pattern.

pub mod env;
pub mod findings;
pub mod gpu;
pub mod kernel_log;
pub mod properties;
pub mod protocol;
pub mod testdev;
