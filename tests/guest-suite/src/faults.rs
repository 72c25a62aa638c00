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
/// reached (false: `act` made fewer than `n` injectable calls).
pub fn with_nth_failure<T>(n: u32, act: impl FnOnce() -> T) -> Result<(T, bool), String> {
    write(FAIL_NTH, &n.to_string()).map_err(|e| format!("{FAIL_NTH}: {e}"))?;
    let result = act();
    let left = std::fs::read_to_string(FAIL_NTH)
        .map_err(|e| format!("{FAIL_NTH}: {e}"))?
        .trim()
        .parse::<u32>()
        .unwrap_or(0);
    write(FAIL_NTH, "0").map_err(|e| format!("{FAIL_NTH}: {e}"))?;
    Ok((result, left == 0))
}
