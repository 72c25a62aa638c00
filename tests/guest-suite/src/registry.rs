//! The test registry: every test is a named function from [`Context`] to [`Outcome`].
//!
//! A suite is a module under `suites/` exposing `pub const TESTS: &[Test]`; `suites::all()`
//! lists the suites in the order their tests run.

use std::time::Duration;

use gracevm_contract::findings::Finding;
use gracevm_contract::kernel_log::Report;

use crate::env::GuestEnv;
use crate::outcome::Outcome;

/// What a test may look at besides the guest itself.
#[derive(Debug)]
pub struct Context {
    /// The VMM's expectations (`/gracevm/env`).
    pub env: GuestEnv,
}

impl Context {
    pub fn load() -> Context {
        Context {
            env: GuestEnv::load(),
        }
    }
}

/// A test body.
pub type TestFn = fn(&Context) -> Outcome;

/// Which review finding a kernel report seen during the test reproduces, if any: the runner
/// then reports XFAIL naming it rather than a bare failure.
pub type KnownFn = fn(&Context, &Report) -> Option<Finding>;

/// One registered test.
#[derive(Debug, Clone, Copy)]
pub struct Test {
    /// KTAP test name: lowercase words joined by `_`, unique across suites.
    pub name: &'static str,
    pub run: TestFn,
    /// After this long the test is killed and reported `not ok ... # TIMEOUT`.
    pub timeout: Duration,
    /// Kernel reports this test may provoke on purpose (a known review finding).
    pub known: Option<KnownFn>,
    /// Writes nothing to the carve-outs, and reads them only through the test device (which
    /// waits for the fill): it may run while the VMM still fills them.
    pub during_fill: bool,
    /// Needs nothing of the carve-outs, though it is not [`Test::during_fill`]: it compares no
    /// boot pattern and makes nothing write there (it binds GPUs or reads sysfs, which must
    /// not happen during a fill: a driver writing a region at probe would be overwritten).
    pub no_carveouts: bool,
}

impl Test {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    pub const fn new(name: &'static str, run: TestFn) -> Test {
        Test {
            name,
            run,
            timeout: Test::DEFAULT_TIMEOUT,
            known: None,
            during_fill: false,
            no_carveouts: false,
        }
    }

    pub const fn during_fill(self) -> Test {
        Test {
            during_fill: true,
            ..self
        }
    }

    pub const fn no_carveouts(self) -> Test {
        Test {
            no_carveouts: true,
            ..self
        }
    }

    /// Whether the VMM must fill the carve-outs with their boot pattern before this test: it
    /// compares the pattern, or something may write there (opening /dev/egm zeroes a region).
    /// A run without such a test asks for no fill (seconds per GiB under nested emulation).
    pub const fn needs_fill(&self) -> bool {
        !self.during_fill && !self.no_carveouts
    }

    pub const fn with_known(self, known: KnownFn) -> Test {
        Test {
            known: Some(known),
            ..self
        }
    }

    pub const fn with_timeout(self, timeout: Duration) -> Test {
        Test { timeout, ..self }
    }
}

/// The test called `name` among `tests`.
pub fn find<'a>(tests: &'a [Test], name: &str) -> Option<&'a Test> {
    tests.iter().find(|test| test.name == name)
}
