//! Kernel fault injection from the suite: fail the n-th allocation of this thread
//! (`/proc/thread-self/fail-nth`, CONFIG_FAULT_INJECTION + CONFIG_FAILSLAB, which DEBUG=1
//! kernels have), to walk a probe's error paths one at a time.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use crate::outcome::Outcome;

const FAIL_NTH: &str = "/proc/thread-self/fail-nth";
const DEBUGFS: &str = "/sys/kernel/debug";
const FAILSLAB: &str = "/sys/kernel/debug/failslab";

/// Readies failslab for fail-nth: GFP_KERNEL allocations become injectable (by default only
/// atomic ones are), and injected failures are not logged with a stack trace each.
pub fn prepare() -> Result<(), Outcome> {
    if !Path::new(FAIL_NTH).exists() {
        return Err(Outcome::skip(format!(
            "no {FAIL_NTH}: the kernel has no fault injection (CONFIG_FAULT_INJECTION, \
             CONFIG_FAILSLAB; DEBUG=1 kernels have them)"
        )));
    }
    if !Path::new(FAILSLAB).exists() {
        // debugfs may just not be mounted.
        let _ = std::process::Command::new("mount")
            .args(["-t", "debugfs", "debugfs", DEBUGFS])
            .status();
    }
    if !Path::new(FAILSLAB).exists() {
        return Err(Outcome::skip(format!(
            "no {FAILSLAB}: slab fault injection needs CONFIG_FAILSLAB and \
             CONFIG_FAULT_INJECTION_DEBUG_FS"
        )));
    }
    for (file, value) in [("ignore-gfp-wait", "N"), ("verbose", "0")] {
        write(&format!("{FAILSLAB}/{file}"), value)
            .map_err(|e| Outcome::fail(format!("{FAILSLAB}/{file}: {e}")))?;
    }
    Ok(())
}

fn write(path: &str, value: &str) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// Runs `act` with this thread's `n`-th injectable allocation failing; whether the fault was
/// reached (false: `act` made fewer than `n` injectable calls). The file is opened before the
/// count is armed and read through the same descriptor: opening it again would itself
/// allocate, and use up the count.
pub fn with_nth_failure<T>(n: u32, act: impl FnOnce() -> T) -> Result<(T, bool), String> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(FAIL_NTH)
        .map_err(|e| format!("{FAIL_NTH}: {e}"))?;
    file.write_all_at(n.to_string().as_bytes(), 0)
        .map_err(|e| format!("{FAIL_NTH}: {e}"))?;
    let result = act();
    let mut buf = [0u8; 16];
    let read = file.read_at(&mut buf, 0);
    // Disarm before anything else can fail.
    let disarm = file.write_all_at(b"0", 0);
    let len = read.map_err(|e| format!("{FAIL_NTH}: {e}"))?;
    disarm.map_err(|e| format!("{FAIL_NTH}: {e}"))?;
    let left = String::from_utf8_lossy(&buf[..len])
        .trim()
        .parse::<u32>()
        .unwrap_or(0);
    Ok((result, left == 0))
}
