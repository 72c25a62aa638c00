//! Reading the guest suite's KTAP out of a console stream, and writing gracevm's own.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
    /// Expected failure (`not ok N name # TODO reason`): a known deviation, reported as such.
    Xfail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub result: Verdict,
    /// The SKIP/TODO reason, or a one-line summary of a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `# ` lines the test printed before its result line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<String>,
    /// How long the test ran, when the guest said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl TestResult {
    pub fn pass(name: &str, note: Option<String>) -> Self {
        TestResult {
            name: name.into(),
            result: Verdict::Pass,
            reason: note,
            diagnostics: vec![],
            duration_ms: None,
        }
    }

    pub fn fail(name: &str, why: String) -> Self {
        TestResult {
            name: name.into(),
            result: Verdict::Fail,
            reason: Some(why),
            diagnostics: vec![],
            duration_ms: None,
        }
    }
}

/// The top-level KTAP document a guest printed (nested subtests are not used by the suite).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestKtap {
    pub seen_header: bool,
    pub plan: Option<usize>,
    pub results: Vec<TestResult>,
}

/// Whether a console line may belong to KTAP (everything else is kernel or init chatter).
pub fn is_ktap_line(line: &str) -> bool {
    line.starts_with("KTAP version")
        || line.starts_with("1..")
        || line.starts_with("ok ")
        || line.starts_with("not ok ")
        || line.starts_with("# ")
        || line == "#"
}

/// Parse the console's KTAP lines. A second `KTAP version` header restarts the document
/// (a suite run twice counts once, the last time).
pub fn parse(lines: &[String]) -> GuestKtap {
    let mut doc = GuestKtap::default();
    let mut pending_diag = Vec::new();
    for raw in lines {
        let line = raw.trim_end();
        if line.starts_with("KTAP version") {
            doc = GuestKtap {
                seen_header: true,
                ..GuestKtap::default()
            };
            pending_diag.clear();
        } else if let Some(n) = line.strip_prefix("1..") {
            doc.plan = n.trim().parse().ok();
        } else if let Some(d) = line.strip_prefix("# ") {
            pending_diag.push(d.to_string());
        } else if let Some(r) = parse_result(line) {
            let mut r = r;
            r.diagnostics = std::mem::take(&mut pending_diag);
            doc.results.push(r);
        }
    }
    doc
}

fn parse_result(line: &str) -> Option<TestResult> {
    let (ok, rest) = if let Some(r) = line.strip_prefix("ok ") {
        (true, r)
    } else {
        (false, line.strip_prefix("not ok ")?)
    };
    let (num, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    num.parse::<u64>().ok()?;
    let (name, directive) = match rest.split_once(" # ") {
        Some((n, d)) => (n.trim(), Some(d.trim())),
        None => (rest.trim().trim_end_matches(" #"), None),
    };
    // The directive is guest text: split it on a char boundary only (`get`, not slicing).
    let keyword = |d: &str, word: &str| {
        d.get(..word.len())
            .is_some_and(|k| k.eq_ignore_ascii_case(word))
            .then(|| d[word.len()..].trim().to_string())
    };
    let (result, reason) = match directive {
        Some(d) if keyword(d, "SKIP").is_some() => (Verdict::Skip, keyword(d, "SKIP")),
        Some(d) if !ok && keyword(d, "TODO").is_some() => (Verdict::Xfail, keyword(d, "TODO")),
        Some(d) => (
            if ok { Verdict::Pass } else { Verdict::Fail },
            Some(d.to_string()),
        ),
        None => (if ok { Verdict::Pass } else { Verdict::Fail }, None),
    };
    Some(TestResult {
        name: name.to_string(),
        result,
        reason,
        diagnostics: vec![],
        duration_ms: None,
    })
}

/// One KTAP result line (without indentation).
pub fn format_result(n: usize, t: &TestResult) -> String {
    let status = match t.result {
        Verdict::Pass | Verdict::Skip => "ok",
        Verdict::Fail | Verdict::Xfail => "not ok",
    };
    let directive = match (t.result, &t.reason) {
        (Verdict::Skip, r) => format!(" # SKIP {}", r.as_deref().unwrap_or("")),
        (Verdict::Xfail, r) => format!(" # TODO {}", r.as_deref().unwrap_or("")),
        (_, Some(r)) => format!(" # {r}"),
        (_, None) => String::new(),
    };
    format!("{status} {n} {}{}", t.name, directive.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(String::from).collect()
    }

    #[test]
    fn test_parse_plain_document() {
        let doc = parse(&lines(
            "KTAP version 1\n1..4\nok 1 a\n# expected 2\n# got 3\nnot ok 2 b\nok 3 c # SKIP no driver\nnot ok 4 d # TODO review point 3",
        ));
        assert!(doc.seen_header);
        assert_eq!(doc.plan, Some(4));
        let v: Vec<_> = doc
            .results
            .iter()
            .map(|r| (r.name.as_str(), r.result))
            .collect();
        assert_eq!(
            v,
            [
                ("a", Verdict::Pass),
                ("b", Verdict::Fail),
                ("c", Verdict::Skip),
                ("d", Verdict::Xfail)
            ]
        );
        assert_eq!(doc.results[1].diagnostics, ["expected 2", "got 3"]);
        assert_eq!(doc.results[2].reason.as_deref(), Some("no driver"));
    }

    #[test]
    fn test_parse_ignores_kernel_chatter_and_garbage() {
        let doc = parse(&lines(
            "[    1.0] ok 5 fake\nok x y\nKTAP version 1\n1..1\nok 1 real",
        ));
        assert_eq!(doc.results.len(), 1);
        assert_eq!(doc.results[0].name, "real");
    }

    #[test]
    fn test_parse_multibyte_directives_do_not_panic() {
        let doc = parse(&lines(
            "ok 1 x # ab€\nnot ok 2 y # €€\nok 3 z # SKIP€\nnot ok 4 w # todo é",
        ));
        assert_eq!(doc.results.len(), 4);
        assert_eq!(doc.results[0].result, Verdict::Pass);
        assert_eq!(doc.results[2].result, Verdict::Skip);
        assert_eq!(doc.results[3].result, Verdict::Xfail);
    }

    #[test]
    fn test_parse_restarts_on_second_header() {
        let doc = parse(&lines(
            "KTAP version 1\n1..1\nnot ok 1 a\nKTAP version 1\n1..1\nok 1 a",
        ));
        assert_eq!(doc.results.len(), 1);
        assert_eq!(doc.results[0].result, Verdict::Pass);
    }

    #[test]
    fn test_format_round_trips_through_parse() {
        for t in [
            TestResult::pass("a", None),
            TestResult::fail("b", "boom".into()),
            TestResult {
                name: "c".into(),
                result: Verdict::Skip,
                reason: Some("why".into()),
                diagnostics: vec![],
                duration_ms: None,
            },
            TestResult {
                name: "d".into(),
                result: Verdict::Xfail,
                reason: Some("known".into()),
                diagnostics: vec![],
                duration_ms: None,
            },
        ] {
            let line = format_result(7, &t);
            assert_eq!(parse_result(&line).unwrap(), t, "{line}");
        }
    }
}
