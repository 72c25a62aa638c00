//! Runs `gracevm-suite --selftest` on the build host and checks the KTAP it prints: every kind
//! of result, a panicking test and a hanging test reported, and the tests after them still run.

use std::process::Command;
use std::time::{Duration, Instant};

fn run_suite(args: &[&str]) -> (String, Option<i32>, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_gracevm-suite"))
        .args(args)
        .env("GRACEVM_ENV_FILE", "/nonexistent/gracevm/env")
        .output()
        .expect("run gracevm-suite");
    (
        String::from_utf8(output.stdout).expect("utf-8 KTAP"),
        output.status.code(),
        started.elapsed(),
    )
}

#[test]
fn test_selftest_every_result_kind_reported_in_ktap() {
    let (ktap, code, elapsed) = run_suite(&["--selftest"]);
    let lines: Vec<&str> = ktap.lines().collect();
    assert_eq!(&lines[..2], ["KTAP version 1", "1..7"], "{ktap}");
    let results: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|line| line.starts_with("ok ") || line.starts_with("not ok "))
        .collect();
    assert_eq!(
        results,
        [
            "ok 1 selftest_pass",
            "not ok 2 selftest_fail",
            "ok 3 selftest_skip_missing_key # SKIP no /gracevm/env: not booted by gracevm, \
             so no GRACEVM_SELFTEST_NO_SUCH_KEY expectation",
            "not ok 4 selftest_xfail # TODO known failure",
            "not ok 5 selftest_panic",
            "not ok 6 selftest_timeout # TIMEOUT 1 seconds",
            "ok 7 selftest_after_timeout",
        ],
        "{ktap}"
    );
    assert!(ktap.contains("# a note from a passing test\nok 1 selftest_pass\n"));
    assert!(ktap.contains("# answer: expected 42, observed 41\n# second line\nnot ok 2"));
    let panic_line = lines
        .iter()
        .find(|line| line.starts_with("# test panicked:"))
        .expect("panic diagnostic");
    assert!(panic_line.contains("index out of bounds"), "{panic_line}");
    assert!(lines
        .iter()
        .all(|line| !line.contains('\u{1e}') && (line.is_empty() || !line.starts_with(' '))));
    assert_eq!(
        lines.last(),
        Some(&"# Totals: pass:2 fail:3 xfail:1 xpass:0 skip:1 error:0")
    );
    assert_eq!(code, Some(1));
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn test_selftest_only_passing_tests_exit_zero() {
    let (ktap, code, _) = run_suite(&["--selftest", "selftest_pass", "selftest_xfail"]);
    assert!(ktap.starts_with("KTAP version 1\n1..2\n"), "{ktap}");
    assert_eq!(code, Some(0));
}

#[test]
fn test_unknown_test_name_exits_two() {
    let (_, code, _) = run_suite(&["no_such_test"]);
    assert_eq!(code, Some(2));
}

#[test]
fn test_list_prints_guest_test_names() {
    let (out, code, _) = run_suite(&["--list"]);
    let names: Vec<&str> = out.lines().collect();
    // Boot checks come first, in this order; the platform, GPU and EGM suites follow.
    assert_eq!(
        names[..4],
        [
            "userspace_reached",
            "cpus_online",
            "ram_size",
            "kernel_config"
        ]
    );
    for expected in [
        "acpi_in_use",
        "carveout_write_seen_by_vmm",
        "gpu_bind",
        "gpu_usemem_mmap",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from --list: {names:?}"
        );
    }
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate test names: {names:?}");
    assert!(
        names.iter().all(|n| !n.is_empty() && !n.contains(' ')),
        "{names:?}"
    );
    assert_eq!(code, Some(0));
}
