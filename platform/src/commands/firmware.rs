//! `gracevm firmware`: what the guest's firmware would hand the kernel, as files.

use std::path::Path;

use anyhow::Result;

use crate::cli::Usage;
use crate::commands::create_out;
use crate::resolve::load_platform;

pub fn write(platform: Option<&Path>, cpus: Option<u32>, out: &Path) -> Result<i32> {
    let mut p = load_platform(platform)?;
    if let Some(c) = cpus {
        p.vcpus = c;
    }
    let p = p.resolve().map_err(|e| Usage(format!("platform: {e}")))?;
    create_out(out)?;
    let boot = firmware::BootParams {
        cmdline: gracevm::guest::cmdline(""),
        ..firmware::BootParams::example(p.vcpus)
    };
    for f in firmware::write_dir(&p, &boot, out)? {
        println!("{}", f.display());
    }
    Ok(0)
}
