//! Exit statuses: the worst result of a run wins.

/// gracevm's exit statuses, ordered by severity.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Everything passed (skips allowed).
    Pass,
    /// At least one test failed.
    Fail,
    /// The guest kernel panicked (or crashed).
    Panic,
    /// The guest did not finish in time and was killed.
    Timeout,
    /// gracevm itself could not run the guest (KVM, qemu, level-1 failure).
    VmmError,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

impl Status {
    pub fn code(self) -> i32 {
        match self {
            Status::Pass => 0,
            Status::Fail => 1,
            Status::Panic => 3,
            Status::Timeout => 4,
            Status::VmmError => 5,
            Status::Interrupted => 130,
        }
    }

    /// Every status, in severity order.
    pub const ALL: [Status; 6] = [
        Status::Pass,
        Status::Fail,
        Status::Panic,
        Status::Timeout,
        Status::VmmError,
        Status::Interrupted,
    ];

    pub fn from_code(code: i32) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// Bad user input (a wrong description, a missing kernel): nothing ran. Same as clap's.
pub const USAGE: i32 = 2;

/// Make a panic of gracevm (outside a vCPU thread, which reports its own to the event loop)
/// end the process with [`Status::VmmError`] after the usual message: an unwinding debug build
/// would otherwise exit with 101 and a release build (`panic = "abort"`) die of SIGABRT, two
/// statuses for one failure, on either route.
pub fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(Status::VmmError.code());
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_status_codes_distinct_and_round_trip() {
        let all = Status::ALL;
        for s in all {
            assert_eq!(Status::from_code(s.code()), Some(s));
            assert_ne!(s.code(), USAGE);
        }
    }

    #[test]
    fn test_status_worst_is_max() {
        assert_eq!(Status::Fail.max(Status::Timeout), Status::Timeout);
        assert_eq!(Status::Panic.max(Status::Fail), Status::Panic);
        assert_eq!(Status::Pass.max(Status::Pass), Status::Pass);
    }
}
