//! The suites, in the order they run. Add a module with `pub const TESTS: &[Test]` and list
//! it in [`all`].

use crate::registry::Test;

pub mod boot;
pub mod egm;
pub mod gpu;
pub mod platform;
pub mod selftest;

/// Every test of the guest suite.
pub fn all() -> Vec<Test> {
    [boot::TESTS, platform::TESTS, gpu::TESTS, egm::TESTS].concat()
}

/// The harness self-tests (`--selftest`).
pub fn selftests() -> Vec<Test> {
    selftest::TESTS.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn test_all_names_unique_and_ktap_safe() {
        let tests = [all(), selftests()].concat();
        let names: BTreeSet<_> = tests.iter().map(|test| test.name).collect();
        assert_eq!(names.len(), tests.len(), "duplicate test names");
        for name in names {
            assert!(
                name.chars()
                    .all(|c| c == '_' || c.is_ascii_lowercase() || c.is_ascii_digit()),
                "{name}"
            );
        }
    }
}
