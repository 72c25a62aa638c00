//! gracevm as a library: the device models (fuzzable without a VM), the harness, the nested
//! route, and (on aarch64) the KVM machine. The `gracevm` binary is the CLI over it.

pub mod board;
pub mod devices;
pub mod escape;
pub mod exit;
pub mod guest;
pub mod guest_memory;
pub mod harness;
pub mod initramfs;
pub mod machine;
pub mod modules;
pub mod nested;
pub mod vcpu_exit;
#[cfg(target_arch = "aarch64")]
pub mod vmm;
