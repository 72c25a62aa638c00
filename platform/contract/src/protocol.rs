//! Lines the in-guest suite prints besides KTAP, which the host reads off the console.

/// Printed before each test starts (not a KTAP line), so the host can name the test that was
/// running when a kernel panic ended the guest.
pub const RUNNING: &str = "gracevm-suite: running ";

/// Printed after each test (not a KTAP line): `gracevm-suite: done NAME MILLISECONDS`.
pub const DONE: &str = "gracevm-suite: done ";

/// The test name and its duration in milliseconds in a [`DONE`] line.
pub fn done_test(line: &str) -> Option<(&str, u64)> {
    let rest = line.trim_end().strip_prefix(DONE)?;
    let (name, ms) = rest.split_once(' ')?;
    let name = running_test(&format!("{RUNNING}{name}"))?.len();
    Some((&rest[..name], ms.parse().ok()?))
}

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

/// Whether test `name` matches `pattern`: `*` any run of characters, `?` one, the rest
/// literally (test selections: `egm_*`, `kernel_log_boot`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with one backtrack point (the last `*`): linear in practice.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether `name` is selected by `patterns` (space or comma separated globs; empty: all).
pub fn selected(patterns: &str, name: &str) -> bool {
    let mut any = false;
    for pattern in patterns.split([' ', ',']).filter(|p| !p.is_empty()) {
        any = true;
        if glob_match(pattern, name) {
            return true;
        }
    }
    !any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_done_test_name_and_ms() {
        assert_eq!(
            done_test("gracevm-suite: done egm_poison 1234\r"),
            Some(("egm_poison", 1234))
        );
        assert_eq!(done_test("gracevm-suite: done egm_poison"), None);
        assert_eq!(done_test("gracevm-suite: done a-b 1"), None);
        assert_eq!(done_test("gracevm-suite: done x -1"), None);
    }

    #[test]
    fn test_glob_match_stars_and_literals() {
        assert!(glob_match("egm_*", "egm_poison"));
        assert!(glob_match("*", ""));
        assert!(glob_match("egm_*_open", "egm_rmmod_while_open"));
        assert!(glob_match("egm_?ize_sysfs", "egm_size_sysfs"));
        assert!(!glob_match("egm_*", "gpu_bind"));
        assert!(!glob_match("egm", "egm_poison"));
        assert!(glob_match("**a*", "bab"));
        assert!(!glob_match("a*b", "acbc"));
    }

    #[test]
    fn test_selected_empty_means_all() {
        assert!(selected("", "x"));
        assert!(selected(" , ", "x"));
        assert!(selected("gpu_*, egm_poison", "egm_poison"));
        assert!(!selected("gpu_*,egm_poison", "egm_open_zeroes"));
    }

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
