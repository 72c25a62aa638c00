//! What gracevm's (absent) firmware hands the kernel, built from a platform description:
//! the DTB today; ACPI tables and the EFI hand-off in DT-less boots.
//!
//! Pure code: description in, bytes out. No KVM, no I/O, so every builder is tested on any host
//! and checked by independent parsers (`dtc`, `iasl`) in `tests/host`.

pub mod description;
pub mod fdt;
pub mod layout;

pub use description::{BootMode, Platform, Size};
pub use fdt::{build_dtb, BootParams};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("platform description {origin}: {msg}")]
    Description { origin: String, msg: String },
    #[error("device tree: {0}")]
    Fdt(String),
}
