//! Lines the in-guest suite prints besides KTAP, which the host reads off the console.

/// Printed before each test starts (not a KTAP line), so the host can name the test that was
/// running when a kernel panic ended the guest.
pub const RUNNING: &str = "gracevm-suite: running ";

/// The test name in a [`RUNNING`] line (`None` for any other line). A name is what KTAP
/// allows: lowercase letters, digits and `_`, at most 64 of them.
pub fn running_test(line: &str) -> Option<&str> {
    let name = line.trim_end().strip_prefix(RUNNING)?;
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b == b'_' || b.is_ascii_lowercase() || b.is_ascii_digit());
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_running_test_accepts_names_only() {
        assert_eq!(
            running_test("gracevm-suite: running egm_poison\r"),
            Some("egm_poison")
        );
        assert_eq!(running_test("gracevm-suite: running "), None);
        assert_eq!(running_test("gracevm-suite: running a b"), None);
        assert_eq!(running_test("x gracevm-suite: running a"), None);
        assert_eq!(running_test("gracevm-suite: running é"), None);
    }
}
