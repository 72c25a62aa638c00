//! The GPU function's BAR0 (readiness registers) and config space, driven directly with a
//! manual clock: see `gracevm::devices::pci::fuzzing::Bar0Harness`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gracevm::devices::pci::fuzzing::fuzz_gpu_bar0(data);
});
