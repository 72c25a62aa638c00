//! Tests of the harness itself (`gracevm-suite --selftest`): one test per kind of result,
//! including a panic and a hang, to show each is reported and the rest still run.

use std::time::Duration;

use crate::ktap::note;
use crate::outcome::{check, Outcome};
use crate::registry::{Context, Test};

pub const TESTS: &[Test] = &[
    Test::new("selftest_pass", pass),
    Test::new("selftest_fail", fail),
    Test::new("selftest_skip_missing_key", skip_missing_key),
    Test::new("selftest_xfail", xfail),
    Test::new("selftest_panic", panic),
    Test::new("selftest_timeout", hang).with_timeout(Duration::from_secs(1)),
    Test::new("selftest_after_timeout", pass),
];

fn pass(_ctx: &Context) -> Outcome {
    note("a note from a passing test");
    Outcome::Pass
}

fn fail(_ctx: &Context) -> Outcome {
    Outcome::fail("answer: expected 42, observed 41\nsecond line")
}

fn skip_missing_key(ctx: &Context) -> Outcome {
    check!(ctx.env.require("GRACEVM_SELFTEST_NO_SUCH_KEY"));
    Outcome::fail("GRACEVM_SELFTEST_NO_SUCH_KEY unexpectedly set")
}

fn xfail(_ctx: &Context) -> Outcome {
    Outcome::xfail("known failure")
}

fn panic(_ctx: &Context) -> Outcome {
    let values: Vec<u32> = Vec::new();
    Outcome::fail(format!("unreachable {}", values[3]))
}

fn hang(_ctx: &Context) -> Outcome {
    std::thread::sleep(Duration::from_secs(3600));
    Outcome::Pass
}
