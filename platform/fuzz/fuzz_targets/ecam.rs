//! The PCIe host bridge with two GPU functions, driven through the MMIO bus (ECAM and both
//! BAR windows) by records of (op, address, size, data): see
//! `gracevm::devices::pci::fuzzing::EcamHarness`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gracevm::devices::pci::fuzzing::fuzz_ecam(data);
});
