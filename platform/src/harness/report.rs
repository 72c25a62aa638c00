//! Turning runs into results: host-observed checks plus the guest's KTAP, the exit status,
//! the KTAP document on stdout and `results.json` in the output directory.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::exit::Status;
use crate::harness::ktap::{self, GuestKtap, TestResult, Verdict};
use crate::machine::{GuestEnd, RunReport};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
    pub xfail: usize,
}

impl Counts {
    pub fn of(tests: &[TestResult]) -> Self {
        let mut c = Counts::default();
        for t in tests {
            match t.result {
                Verdict::Pass => c.pass += 1,
                Verdict::Fail => c.fail += 1,
                Verdict::Skip => c.skip += 1,
                Verdict::Xfail => c.xfail += 1,
            }
        }
        c
    }

    fn add(&mut self, o: &Counts) {
        self.pass += o.pass;
        self.fail += o.fail;
        self.skip += o.skip;
        self.xfail += o.xfail;
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub name: String,
    pub status: Status,
    pub end: String,
    pub end_detail: String,
    pub counts: Counts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<f64>,
    pub vmm_ready_ms: f64,
    pub wall_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic: Option<String>,
    pub tests: Vec<TestResult>,
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Judge one run: what the host saw (boot timer, how the guest ended) around what the guest said.
pub fn evaluate(
    name: &str,
    run: &RunReport,
    guest: &GuestKtap,
    panic: Option<String>,
    running: Option<&str>,
) -> ScenarioResult {
    let mut tests = Vec::new();
    tests.push(match run.boot_time {
        Some(t) => TestResult::pass(
            "boot_userspace_reached",
            Some(format!("boot timer {:.0} ms", ms(t))),
        ),
        None => TestResult::fail(
            "boot_userspace_reached",
            "the guest never wrote the boot-timer register".into(),
        ),
    });
    if guest.seen_header {
        tests.extend(guest.results.iter().cloned());
        // A panic ends the guest in the middle of a test: that test fails, by name.
        if let (Some(line), Some(name)) = (&panic, running) {
            if !guest.results.iter().any(|r| r.name == name) {
                tests.push(TestResult::fail(
                    name,
                    format!("the kernel panicked while this test ran: {line}"),
                ));
            }
        }
        let planned = guest.plan.unwrap_or(0);
        if guest.plan.is_none() || guest.results.len() < planned {
            tests.push(TestResult::fail(
                "guest_suite_complete",
                format!("plan {planned}, {} results reported", guest.results.len()),
            ));
        }
    } else {
        tests.push(TestResult::fail(
            "guest_suite_complete",
            "no KTAP from the guest suite".into(),
        ));
    }
    tests.push(match &run.end {
        GuestEnd::PowerOff => TestResult::pass("psci_poweroff_clean", None),
        other => TestResult::fail("psci_poweroff_clean", other.describe()),
    });

    let counts = Counts::of(&tests);
    let mut status = if counts.fail > 0 {
        Status::Fail
    } else {
        Status::Pass
    };
    status = status.max(run.end.status());
    ScenarioResult {
        name: name.into(),
        status,
        end: run.end.key().into(),
        end_detail: run.end.describe(),
        counts,
        boot_ms: run.boot_time.map(ms),
        vmm_ready_ms: ms(run.vmm_ready),
        wall_ms: ms(run.wall),
        panic,
        tests,
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub status: Status,
    pub exit_code: i32,
    pub counts: Counts,
    pub scenarios: Vec<ScenarioResult>,
}

impl Summary {
    pub fn new(scenarios: Vec<ScenarioResult>) -> Self {
        let mut counts = Counts::default();
        let mut status = Status::Pass;
        for s in &scenarios {
            counts.add(&s.counts);
            status = status.max(s.status);
        }
        Summary {
            status,
            exit_code: status.code(),
            counts,
            scenarios,
        }
    }

    /// The plain closing line CI systems read (an expected failure counts as skipped).
    pub fn closing_line(&self) -> String {
        let c = &self.counts;
        format!(
            "summary: {} passed, {} failed, {} skipped",
            c.pass,
            c.fail,
            c.skip + c.xfail
        )
    }

    /// The KTAP document: one top-level test per scenario, its checks as subtests.
    pub fn ktap(&self) -> String {
        let mut out = format!("KTAP version 1\n1..{}\n", self.scenarios.len());
        for (i, s) in self.scenarios.iter().enumerate() {
            out += &format!("    KTAP version 1\n    1..{}\n", s.tests.len());
            for (j, t) in s.tests.iter().enumerate() {
                for d in &t.diagnostics {
                    out += &format!("    # {d}\n");
                }
                out += &format!("    {}\n", ktap::format_result(j + 1, t));
            }
            let c = &s.counts;
            out += &format!(
                "# {}: {} ({} pass, {} fail, {} skip, {} xfail)\n",
                s.name, s.end_detail, c.pass, c.fail, c.skip, c.xfail
            );
            let ok = matches!(s.status, Status::Pass);
            out += &format!(
                "{} {} {}\n",
                if ok { "ok" } else { "not ok" },
                i + 1,
                s.name
            );
        }
        let c = &self.counts;
        out += &format!(
            "# {} passed, {} failed, {} skipped, {} xfail\n",
            c.pass, c.fail, c.skip, c.xfail
        );
        out
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("results serialise");
        std::fs::write(dir.join("results.json"), json + "\n")
            .with_context(|| format!("writing {}/results.json", dir.display()))?;
        std::fs::write(dir.join("results.ktap"), self.ktap())
            .with_context(|| format!("writing {}/results.ktap", dir.display()))?;
        std::fs::write(dir.join("junit.xml"), self.junit())
            .with_context(|| format!("writing {}/junit.xml", dir.display()))?;
        Ok(())
    }

    /// JUnit XML for CI systems: a testsuite per scenario. XFAIL (a known deviation) is
    /// reported as skipped with its reason, so it neither fails the build nor passes silently.
    pub fn junit(&self) -> String {
        use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
        let mut report = Report::new("gracevm");
        for s in &self.scenarios {
            let mut suite = TestSuite::new(s.name.as_str());
            suite.set_time(std::time::Duration::from_secs_f64(s.wall_ms.max(0.0) / 1e3));
            for t in &s.tests {
                let reason = t.reason.as_deref().unwrap_or("");
                let status = match t.result {
                    Verdict::Pass => TestCaseStatus::success(),
                    Verdict::Fail => {
                        let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
                        st.set_message(reason);
                        st
                    }
                    Verdict::Skip => {
                        let mut st = TestCaseStatus::skipped();
                        st.set_message(reason);
                        st
                    }
                    Verdict::Xfail => {
                        let mut st = TestCaseStatus::skipped();
                        st.set_message(format!("expected failure: {reason}"));
                        st
                    }
                };
                let mut case = TestCase::new(t.name.as_str(), status);
                case.set_classname(s.name.as_str());
                if let Some(ms) = t.duration_ms {
                    case.set_time(std::time::Duration::from_millis(ms));
                }
                // Diagnostics (a kernel report's first lines among them) go with every result
                // that has any.
                if !t.diagnostics.is_empty() {
                    case.set_system_out(t.diagnostics.join("\n"));
                }
                suite.add_test_case(case);
            }
            report.add_test_suite(suite);
        }
        report
            .to_string()
            .unwrap_or_else(|e| format!("<!-- JUnit report could not be written: {e} -->\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run(end: GuestEnd, boot: bool) -> RunReport {
        RunReport {
            end,
            boot_time: boot.then(|| Duration::from_millis(800)),
            vmm_ready: Duration::from_millis(5),
            wall: Duration::from_secs(2),
        }
    }

    fn guest(text: &str) -> GuestKtap {
        ktap::parse(&text.lines().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn test_evaluate_all_pass_is_pass() {
        let s = evaluate(
            "d",
            &run(GuestEnd::PowerOff, true),
            &guest("KTAP version 1\n1..1\nok 1 a"),
            None,
            None,
        );
        assert_eq!(s.status, Status::Pass);
        assert_eq!(
            s.counts,
            Counts {
                pass: 3,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn test_evaluate_skip_still_passes_and_fail_fails() {
        let s = evaluate(
            "d",
            &run(GuestEnd::PowerOff, true),
            &guest("KTAP version 1\n1..1\nok 1 a # SKIP no"),
            None,
            None,
        );
        assert_eq!(s.status, Status::Pass);
        let s = evaluate(
            "d",
            &run(GuestEnd::PowerOff, true),
            &guest("KTAP version 1\n1..1\nnot ok 1 a"),
            None,
            None,
        );
        assert_eq!(s.status, Status::Fail);
    }

    #[test]
    fn test_evaluate_panic_fails_the_running_test_by_name() {
        let s = evaluate(
            "d",
            &run(GuestEnd::Panic, true),
            &guest("KTAP version 1\n1..3\nok 1 a"),
            Some("Kernel panic - not syncing: Fatal exception".into()),
            Some("egm_b"),
        );
        assert_eq!(s.status, Status::Panic);
        let b = s.tests.iter().find(|t| t.name == "egm_b").unwrap();
        assert_eq!(b.result, Verdict::Fail);
        assert!(b.reason.as_deref().unwrap().contains("Fatal exception"));
    }

    #[test]
    fn test_evaluate_missing_ktap_or_results_fail() {
        let s = evaluate(
            "d",
            &run(GuestEnd::PowerOff, true),
            &guest("nothing"),
            None,
            None,
        );
        assert_eq!(s.status, Status::Fail);
        let s = evaluate(
            "d",
            &run(GuestEnd::PowerOff, true),
            &guest("KTAP version 1\n1..3\nok 1 a"),
            None,
            None,
        );
        assert_eq!(s.status, Status::Fail);
        let s = evaluate(
            "d",
            &run(GuestEnd::PowerOff, false),
            &guest("KTAP version 1\n1..1\nok 1 a"),
            None,
            None,
        );
        assert_eq!(s.status, Status::Fail);
    }

    #[test]
    fn test_evaluate_end_states_map_to_distinct_statuses() {
        let g = guest("KTAP version 1\n1..1\nok 1 a");
        assert_eq!(
            evaluate("d", &run(GuestEnd::Panic, true), &g, None, None).status,
            Status::Panic
        );
        assert_eq!(
            evaluate("d", &run(GuestEnd::Timeout, true), &g, None, None).status,
            Status::Timeout
        );
        assert_eq!(
            evaluate(
                "d",
                &run(GuestEnd::VmmFailure("x".into()), true),
                &g,
                None,
                None
            )
            .status,
            Status::VmmError
        );
        assert_eq!(
            evaluate("d", &run(GuestEnd::Reset, true), &g, None, None).status,
            Status::Fail
        );
    }

    #[test]
    fn test_junit_counts_and_escaping() {
        let g = guest("KTAP version 1\n1..3\n# got <1> & \"2\"\nnot ok 1 a\nok 2 b # SKIP no driver\nnot ok 3 c # TODO review point");
        let sum = Summary::new(vec![evaluate(
            "s<1>",
            &run(GuestEnd::PowerOff, true),
            &g,
            None,
            None,
        )]);
        let x = sum.junit();
        for part in [
            "name=\"s&lt;1&gt;\"",
            "tests=\"5\"",
            "failures=\"1\"",
            "skipped=\"2\"",
            "got &lt;1&gt; &amp; &quot;2&quot;",
            "<skipped message=\"no driver\"/>",
            "expected failure: review point",
        ] {
            assert!(x.contains(part), "{part} missing in {x}");
        }
    }

    #[test]
    fn test_summary_worst_status_and_ktap_shape() {
        let g = guest("KTAP version 1\n1..1\nok 1 a");
        let a = evaluate("a", &run(GuestEnd::PowerOff, true), &g, None, None);
        let b = evaluate("b", &run(GuestEnd::Timeout, true), &g, None, None);
        let sum = Summary::new(vec![a, b]);
        assert_eq!(sum.exit_code, Status::Timeout.code());
        let doc = sum.ktap();
        assert!(doc.starts_with("KTAP version 1\n1..2\n"));
        assert!(
            doc.contains("\nok 1 a\n") && doc.contains("\nnot ok 2 b\n"),
            "{doc}"
        );
        // The guest's own result is re-numbered inside the scenario.
        assert!(doc.contains("    ok 2 a\n"), "{doc}");
    }
}
