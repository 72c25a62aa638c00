//! KTAP version 1 output, one line at a time, flushed as written.
//!
//! The VMM parses the guest console as it streams, so every line goes out in a single
//! `write` and is flushed at once, or, once [`print_through`] set it up, in a single PRINT of
//! the test device (the runner's thread only: a test process writes to its pipe).
//! Diagnostics of a test come before its result line, as KUnit and kselftest print them.

use std::cell::RefCell;
use std::io::Write;
use std::time::Duration;

use crate::outcome::Outcome;
use crate::testdev::Printer;

thread_local! {
    /// The runner's thread prints every KTAP line; a test's own threads write to stdout.
    static PRINTER: RefCell<Option<Printer>> = const { RefCell::new(None) };
}

/// From now on every line this thread emits goes to the VMM through `printer`.
pub fn print_through(printer: Printer) {
    PRINTER.with(|p| *p.borrow_mut() = Some(printer));
}

pub const HEADER: &str = "KTAP version 1";

/// The test plan line.
pub fn plan(count: usize) -> String {
    format!("1..{count}")
}

/// The result line of test `number` (1-based).
pub fn result_line(number: usize, name: &str, outcome: &Outcome) -> String {
    let name = test_name(name);
    match outcome {
        Outcome::Pass => format!("ok {number} {name}"),
        Outcome::Fail(_) => format!("not ok {number} {name}"),
        Outcome::Skip(why) => format!("ok {number} {name} # SKIP {}", first_line(why)),
        Outcome::XFail(why) => format!("not ok {number} {name} # TODO {}", first_line(why)),
    }
}

/// The result line of a test that gave no result in time (kselftest's spelling).
pub fn timeout_line(number: usize, name: &str, limit: Duration) -> String {
    format!(
        "not ok {number} {} # TIMEOUT {} seconds",
        test_name(name),
        limit.as_secs()
    )
}

/// The diagnostic lines explaining an outcome: every line of a failure, and the lines of a
/// skip or expected-failure reason beyond the first (which goes in the result line).
pub fn outcome_diagnostics(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::Pass => Vec::new(),
        Outcome::Fail(why) => diagnostics(why),
        Outcome::Skip(why) | Outcome::XFail(why) => {
            why.lines().skip(1).flat_map(diagnostics).collect()
        }
    }
}

/// `text` as `# ` diagnostic lines; lines that already are diagnostics are kept as they are.
pub fn diagnostics(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.trim_end())
        .filter(|line| !line.is_empty())
        .map(|line| {
            if line == "#" || line.starts_with("# ") {
                line.to_string()
            } else {
                format!("# {line}")
            }
        })
        .collect()
}

/// kselftest's totals line.
pub fn totals_line(pass: usize, fail: usize, xfail: usize, skip: usize) -> String {
    format!("# Totals: pass:{pass} fail:{fail} xfail:{xfail} xpass:0 skip:{skip} error:0")
}

/// Writes one line through the test device, or to stdout in one `write` and flushed (a line
/// PRINT refuses, too long or not taken, goes there too). Errors are ignored: there is
/// nowhere else to report them, and the suite must go on.
pub fn emit(line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let printed = PRINTER.with(|p| p.borrow().as_ref().is_some_and(|p| p.print(&buf).is_ok()));
    if printed {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&buf);
    let _ = out.flush();
}

/// Emits `text` as diagnostic lines: for tests to explain what they saw.
pub fn note(text: impl AsRef<str>) {
    for line in diagnostics(text.as_ref()) {
        emit(&line);
    }
}

/// A test name as KTAP allows it: no `#` (starts a directive) and no whitespace.
fn test_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '#' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_result_line_each_outcome_ktap_spelling() {
        assert_eq!(
            result_line(1, "cpus_online", &Outcome::Pass),
            "ok 1 cpus_online"
        );
        assert_eq!(
            result_line(2, "ram_size", &Outcome::fail("x")),
            "not ok 2 ram_size"
        );
        assert_eq!(
            result_line(3, "kernel_config", &Outcome::skip("no /proc/config.gz")),
            "ok 3 kernel_config # SKIP no /proc/config.gz"
        );
        assert_eq!(
            result_line(4, "egm_mmap", &Outcome::xfail("EGM series not merged")),
            "not ok 4 egm_mmap # TODO EGM series not merged"
        );
    }

    #[test]
    fn test_result_line_hash_and_space_in_name_replaced() {
        assert_eq!(result_line(1, "a b#c", &Outcome::Pass), "ok 1 a_b_c");
    }

    #[test]
    fn test_timeout_line_kselftest_spelling() {
        assert_eq!(
            timeout_line(5, "slow", Duration::from_secs(30)),
            "not ok 5 slow # TIMEOUT 30 seconds"
        );
    }

    #[test]
    fn test_outcome_diagnostics_fail_every_line_prefixed() {
        let fail = Outcome::fail("online: expected 0-1, observed 0\n\nMemTotal: 1 kB\n");
        assert_eq!(
            outcome_diagnostics(&fail),
            vec!["# online: expected 0-1, observed 0", "# MemTotal: 1 kB"]
        );
        assert!(outcome_diagnostics(&Outcome::Pass).is_empty());
    }

    #[test]
    fn test_outcome_diagnostics_multiline_skip_rest_as_diagnostics() {
        let skip = Outcome::skip("no config\nsee CONFIG_IKCONFIG_PROC");
        assert_eq!(result_line(1, "t", &skip), "ok 1 t # SKIP no config");
        assert_eq!(
            outcome_diagnostics(&skip),
            vec!["# see CONFIG_IKCONFIG_PROC"]
        );
    }

    #[test]
    fn test_diagnostics_existing_prefix_not_doubled() {
        assert_eq!(
            diagnostics("# already\nplain\n#"),
            vec!["# already", "# plain", "#"]
        );
    }

    #[test]
    fn test_plan_and_totals_format() {
        assert_eq!(plan(4), "1..4");
        assert_eq!(
            totals_line(3, 1, 0, 2),
            "# Totals: pass:3 fail:1 xfail:0 xpass:0 skip:2 error:0"
        );
    }
}
