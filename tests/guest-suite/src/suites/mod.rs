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

    #[test]
    fn test_fill_asked_for_exactly_by_tests_that_touch_the_carveouts() {
        let fill = |name: &str| {
            all()
                .into_iter()
                .find(|t| t.name == name)
                .map(|t| t.needs_fill())
        };
        // The boot pattern's own checks, and a test that writes the regions (open zeroes).
        for name in [
            "carveout_pattern",
            "carveout_write_seen_by_vmm",
            "egm_open_zeroes",
        ] {
            assert_eq!(fill(name), Some(true), "{name}");
        }
        for name in [
            "egm_mmap_whole",
            "egm_retired_table_limits",
            "egm_remove_while_open",
        ] {
            assert_eq!(fill(name), Some(true), "{name}");
        }
        // Binding GPUs, reading sysfs: a scenario of only these is never filled.
        for name in [
            "kernel_config",
            "gpu_bind",
            "egm_device_created",
            "egm_parallel_probe",
        ] {
            assert_eq!(fill(name), Some(false), "{name}");
        }
        // A test that may run during the fill needs none: one flag says it, not both.
        for t in all() {
            assert!(!(t.during_fill && t.no_carveouts), "{}: both flags", t.name);
        }
    }
}
