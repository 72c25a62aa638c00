//! Platform descriptions as a user (or a scenario file) writes them: arbitrary text through the
//! TOML parser and validation, and every description that validates through the firmware
//! builders (memory map, ACPI tables, EFI memory map, DTB). A bad description must give an
//! error, never a panic, and nothing may be built from one that does not validate.
#![no_main]

use firmware::{BootParams, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(platform) = Platform::from_toml(text, "fuzz") else {
        return;
    };
    // Keep each run cheap: the builders are linear in the description, but a huge retired-pages
    // list or many GPUs is still valid input.
    let platform = platform
        .resolve()
        .expect("a description that parsed resolves");
    assert!(platform.map().carve_outs.len() <= firmware::layout::MAX_SOCKETS);
    let boot = BootParams {
        cmdline: "console=ttyAMA0".into(),
        initrd: Some((0x4800_0000, 0x4800_1000)),
        mpidrs: (0..u64::from(platform.vcpus)).collect(),
        rng_seed: [0; 32],
    };
    let _ = firmware::build(&platform, &boot);
});
