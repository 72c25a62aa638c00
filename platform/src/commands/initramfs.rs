//! `gracevm initramfs`: the guest's base archive (/init, busybox, the in-guest suite).

use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::Usage;

pub fn write(init: &Path, busybox: &Path, suite: &Path, out: &Path) -> Result<i32> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).map_err(|e| Usage(format!("{what} {}: {e}", p.display())))
    };
    let data = gracevm::initramfs::guest_base(
        &read(init, "init")?,
        &read(busybox, "busybox")?,
        &read(suite, "suite")?,
    )?;
    // Written whole, then renamed: a failed run leaves no half archive behind.
    let tmp = out.with_extension("cpio.partial");
    std::fs::write(&tmp, &data)
        .and_then(|_| std::fs::rename(&tmp, out))
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(0)
}
