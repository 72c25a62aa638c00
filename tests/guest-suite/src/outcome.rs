//! What a test reports, and small helpers for writing test bodies.

use std::fmt::Display;

/// The result of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// The test ran and found a problem; the text says expected vs observed (may be multi-line).
    Fail(String),
    /// The test could not run here (missing expectation, kernel option, device); never a pass.
    Skip(String),
    /// A known failure: reported as `not ok ... # TODO reason` and not counted as a failure.
    XFail(String),
}

impl Outcome {
    pub fn fail(why: impl Into<String>) -> Outcome {
        Outcome::Fail(why.into())
    }

    pub fn skip(why: impl Into<String>) -> Outcome {
        Outcome::Skip(why.into())
    }

    pub fn xfail(why: impl Into<String>) -> Outcome {
        Outcome::XFail(why.into())
    }

    /// Whether this outcome makes the suite fail.
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Fail(_))
    }
}

/// Unwraps a `Result<T, Outcome>`, or returns the `Outcome` from the enclosing test function.
///
/// Test functions return `Outcome`, so `?` does not apply; helpers return
/// `Result<T, Outcome>` and tests take their value with `check!(helper())`.
macro_rules! check {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err(outcome) => return outcome,
        }
    };
}
pub(crate) use check;

/// Collects every failed expectation of a test, so one run reports all mismatches.
#[derive(Debug, Default)]
pub struct Checks {
    failures: Vec<String>,
}

impl Checks {
    pub fn new() -> Checks {
        Checks::default()
    }

    /// Records a failure `what: expected E, observed O` unless `expected == observed`.
    pub fn expect_eq<T: PartialEq + Display>(&mut self, what: &str, expected: T, observed: T) {
        if expected != observed {
            self.failures
                .push(format!("{what}: expected {expected}, observed {observed}"));
        }
    }

    /// Records the failure `why()` unless `ok`.
    pub fn expect(&mut self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(why());
        }
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        self.failures.push(why.into());
    }

    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }

    /// `Pass` when nothing failed, otherwise `Fail` with one line per failed expectation.
    pub fn outcome(self) -> Outcome {
        if self.failures.is_empty() {
            Outcome::Pass
        } else {
            Outcome::Fail(self.failures.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_checks_all_equal_passes() {
        let mut checks = Checks::new();
        checks.expect_eq("cpus", 2, 2);
        checks.expect(true, || unreachable!());
        assert_eq!(checks.outcome(), Outcome::Pass);
    }

    #[test]
    fn test_checks_two_mismatches_reports_both() {
        let mut checks = Checks::new();
        checks.expect_eq("online", "0-1", "0");
        checks.expect_eq("present", "0-1", "0-1");
        checks.expect(false, || {
            "cpuinfo: expected 2 processors, observed 1".into()
        });
        assert_eq!(
            checks.outcome(),
            Outcome::Fail(
                "online: expected 0-1, observed 0\n\
                 cpuinfo: expected 2 processors, observed 1"
                    .into()
            )
        );
    }

    fn helper(ok: bool) -> Result<u32, Outcome> {
        if ok {
            Ok(7)
        } else {
            Err(Outcome::skip("no GRACEVM_CPUS"))
        }
    }

    fn uses_check(ok: bool) -> Outcome {
        let value = check!(helper(ok));
        Outcome::fail(format!("got {value}"))
    }

    #[test]
    fn test_check_macro_err_returns_outcome() {
        assert_eq!(uses_check(false), Outcome::skip("no GRACEVM_CPUS"));
        assert_eq!(uses_check(true), Outcome::fail("got 7"));
    }
}
