//! The run as a KCIDB report (the Linux kernel CI reporting schema, v5): one checkout (the
//! tree and commit, or the series with its mails' Message-IDs), one build (architecture,
//! config fragments, debug flavour, duration) and one test per KTAP test of every scenario.
//!
//! What was built comes from the `gracevm-build.json` the kernel build writes
//! (`--build-info`); without it the checkout and build say only what the run knows (the
//! kernel Image's checksum).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::harness::ktap::{TestResult, Verdict};
use crate::harness::report::Summary;

/// Our name in every KCIDB id (`origin:...`).
pub const ORIGIN: &str = "gracevm";
/// KCIDB caps a log excerpt at 16 KiB.
const EXCERPT_MAX: usize = 16 * 1024;

/// What `guest-kernel/build.sh` wrote about the kernel under test.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct BuildInfo {
    pub tree_name: String,
    pub git_commit_hash: String,
    pub git_repository_branch: String,
    pub patchset_hash: String,
    pub patchset_files: Vec<String>,
    pub message_ids: Vec<String>,
    pub architecture: String,
    pub compiler: String,
    pub config_fragments: Vec<String>,
    pub debug: bool,
    pub release: String,
    pub start_time: String,
    pub duration: f64,
    pub status: String,
}

impl BuildInfo {
    pub fn load(path: &Path) -> Result<BuildInfo> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the build record {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a gracevm build record", path.display()))
    }
}

/// KCIDB's test status for one of ours. An expected failure (a known review finding) is a
/// failure of the code under test: FAIL, marked expected in `misc`. A test that ran out of
/// time or could not finish is an ERROR: the code's status is unknown.
fn status(t: &TestResult) -> &'static str {
    match t.result {
        Verdict::Pass => "PASS",
        Verdict::Skip => "SKIP",
        Verdict::Xfail => "FAIL",
        Verdict::Fail => {
            let reason = t.reason.as_deref().unwrap_or("");
            if reason.starts_with("TIMEOUT") {
                "ERROR"
            } else {
                "FAIL"
            }
        }
    }
}

/// A KCIDB path component: `[a-zA-Z0-9_-]+`.
fn path_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// At most `max` bytes of `s`, cut on a char boundary.
fn excerpt(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].replace('\0', "")
}

/// A Message-ID header's value without its angle brackets (KCIDB wants the address form).
fn bare_message_id(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_string()
}

/// The report. `run_id` makes test ids unique per run; `kernel_sum` names a checkout that has
/// no build record; `start_time` is the run's (RFC 3339).
pub fn report(
    summary: &Summary,
    build: Option<&BuildInfo>,
    run_id: &str,
    kernel_sum: &str,
    start_time: &str,
) -> Value {
    let b = build.cloned().unwrap_or_default();
    let source = if !b.patchset_hash.is_empty() {
        format!("{}-{}", short(&b.git_commit_hash), short(&b.patchset_hash))
    } else if !b.git_commit_hash.is_empty() {
        short(&b.git_commit_hash).to_string()
    } else {
        format!("image-{}", short(kernel_sum))
    };
    let checkout_id = format!("{ORIGIN}:{source}");
    let flavour = if b.debug { "debug" } else { "plain" };
    let build_id = format!("{checkout_id}:{flavour}");
    let mut tests = Vec::new();
    for s in &summary.scenarios {
        for (i, t) in s.tests.iter().enumerate() {
            let ids = TestIds {
                run_id,
                build_id: &build_id,
                scenario: &s.name,
                number: i + 1,
            };
            tests.push(test_object(&ids, t, start_time));
        }
    }
    json!({
        "version": { "major": 5, "minor": 3 },
        "checkouts": [checkout_object(&b, &checkout_id, kernel_sum)],
        "builds": [build_object(&b, build.is_some(), &build_id, &checkout_id)],
        "tests": tests,
    })
}

/// The checkout: what tree, commit and series were tested.
fn checkout_object(b: &BuildInfo, checkout_id: &str, kernel_sum: &str) -> Value {
    let mut checkout = Map::new();
    checkout.insert("id".into(), json!(checkout_id));
    checkout.insert("origin".into(), json!(ORIGIN));
    if !b.tree_name.is_empty() {
        checkout.insert("tree_name".into(), json!(path_part(&b.tree_name)));
    }
    if b.git_commit_hash.len() == 40 {
        checkout.insert("git_commit_hash".into(), json!(b.git_commit_hash));
    }
    if !b.git_repository_branch.is_empty() {
        checkout.insert(
            "git_repository_branch".into(),
            json!(b.git_repository_branch),
        );
    }
    if !b.patchset_hash.is_empty() {
        checkout.insert("patchset_hash".into(), json!(b.patchset_hash));
        let files: Vec<Value> = b
            .patchset_files
            .iter()
            .map(|f| json!({ "name": f, "url": format!("file:///patches/{f}") }))
            .collect();
        checkout.insert("patchset_files".into(), json!(files));
    }
    if let Some(first) = b.message_ids.first() {
        checkout.insert("message_id".into(), json!(bare_message_id(first)));
    }
    checkout.insert("valid".into(), json!(true));
    checkout.insert(
        "misc".into(),
        json!({
            "message_ids": b.message_ids.iter().map(|m| bare_message_id(m)).collect::<Vec<_>>(),
            "kernel_image_sha256": kernel_sum,
        }),
    );
    Value::Object(checkout)
}

/// The build; `recorded`: the build left a record (a ready Image has none).
fn build_object(b: &BuildInfo, recorded: bool, build_id: &str, checkout_id: &str) -> Value {
    let mut build_obj = Map::new();
    build_obj.insert("id".into(), json!(build_id));
    build_obj.insert("checkout_id".into(), json!(checkout_id));
    build_obj.insert("origin".into(), json!(ORIGIN));
    build_obj.insert("architecture".into(), json!("arm64"));
    if !b.compiler.is_empty() {
        build_obj.insert("compiler".into(), json!(b.compiler));
    }
    let config_name = if b.config_fragments.is_empty() {
        "unknown (a ready Image)".to_string()
    } else {
        format!("allnoconfig+{}", b.config_fragments.join("+"))
    };
    build_obj.insert("config_name".into(), json!(config_name));
    if recorded {
        build_obj.insert("duration".into(), json!(b.duration));
        if !b.start_time.is_empty() {
            build_obj.insert("start_time".into(), json!(b.start_time));
        }
    }
    // The run had a kernel to boot: the build passed.
    build_obj.insert("status".into(), json!("PASS"));
    build_obj.insert(
        "misc".into(),
        json!({ "debug": b.debug, "release": b.release }),
    );
    Value::Object(build_obj)
}

/// Where one test sits: the run, the build, its scenario and its number there (1-based).
struct TestIds<'a> {
    run_id: &'a str,
    build_id: &'a str,
    scenario: &'a str,
    number: usize,
}

fn test_object(ids: &TestIds<'_>, t: &TestResult, start_time: &str) -> Value {
    let (scenario, name) = (path_part(ids.scenario), path_part(&t.name));
    let mut obj = Map::new();
    obj.insert(
        "id".into(),
        json!(format!("{ORIGIN}:{}:{scenario}.{name}", ids.run_id)),
    );
    obj.insert("build_id".into(), json!(ids.build_id));
    obj.insert("origin".into(), json!(ORIGIN));
    obj.insert("path".into(), json!(format!("gracevm.{scenario}.{name}")));
    obj.insert("status".into(), json!(status(t)));
    obj.insert("start_time".into(), json!(start_time));
    if let Some(ms) = t.duration_ms {
        obj.insert("duration".into(), json!(ms as f64 / 1e3));
    }
    let mut log = t.reason.clone().unwrap_or_default();
    for d in &t.diagnostics {
        log.push('\n');
        log.push_str(d);
    }
    if !log.trim().is_empty() {
        obj.insert(
            "log_excerpt".into(),
            json!(excerpt(log.trim(), EXCERPT_MAX)),
        );
    }
    if let Some(reason) = &t.reason {
        obj.insert("comment".into(), json!(excerpt(reason, 1024)));
    }
    obj.insert(
        "misc".into(),
        json!({
            "scenario": ids.scenario,
            "number": ids.number,
            "expected_failure": t.result == Verdict::Xfail,
            "console_log": format!("{}/console.log", ids.scenario),
        }),
    );
    Value::Object(obj)
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(16)]
}

/// Several runs' reports as one (shards of one matrix): checkouts and builds once each (by
/// id), every test.
pub fn merge(reports: &[Value]) -> Value {
    let mut merged = json!({
        "version": { "major": 5, "minor": 3 },
        "checkouts": [], "builds": [], "tests": [],
    });
    for key in ["checkouts", "builds", "tests"] {
        let mut seen = std::collections::BTreeSet::new();
        let mut items = Vec::new();
        for r in reports {
            for item in r[key].as_array().into_iter().flatten() {
                let id = item["id"].as_str().unwrap_or_default().to_string();
                if key == "tests" || seen.insert(id) {
                    items.push(item.clone());
                }
            }
        }
        merged[key] = Value::Array(items);
    }
    merged
}

/// Writes `dir/kcidb.json`.
pub fn write(dir: &Path, report: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(report).expect("KCIDB report serialises");
    std::fs::write(dir.join("kcidb.json"), text + "\n")
        .with_context(|| format!("writing {}/kcidb.json", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::report::evaluate;
    use crate::machine::{GuestEnd, RunReport};
    use std::time::Duration;

    fn summary() -> Summary {
        let run = RunReport {
            end: GuestEnd::PowerOff,
            boot_time: Some(Duration::from_millis(900)),
            vmm_ready: Duration::from_millis(100),
            wall: Duration::from_secs(10),
        };
        let lines: Vec<String> = "KTAP version 1\n1..4\nok 1 a\n# kernel KASAN: BUG: KASAN: x\nnot ok 2 b # TODO [unbind-while-open] known\nok 3 c # SKIP why\nnot ok 4 d # TIMEOUT 30 seconds"
            .lines()
            .map(String::from)
            .collect();
        let guest = crate::harness::ktap::parse(&lines);
        Summary::new(vec![evaluate("egm-x", &run, &guest, None, None)])
    }

    #[test]
    fn test_report_maps_statuses_and_names_the_series() {
        let build = BuildInfo {
            tree_name: "linux-source-7.3".into(),
            git_commit_hash: "a".repeat(40),
            patchset_hash: "f".repeat(64),
            patchset_files: vec!["0001.patch".into()],
            message_ids: vec!["<1-2@x.org>".into()],
            config_fragments: vec!["base.config".into(), "debug.config".into()],
            debug: true,
            duration: 29.0,
            ..BuildInfo::default()
        };
        let r = report(
            &summary(),
            Some(&build),
            "run1",
            "00",
            "2026-11-29T00:00:00Z",
        );
        assert_eq!(r["checkouts"][0]["message_id"], "1-2@x.org");
        assert!(r["builds"][0]["id"].as_str().unwrap().ends_with(":debug"));
        let statuses: Vec<(&str, &str)> = r["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["path"].as_str().unwrap(), t["status"].as_str().unwrap()))
            .collect();
        assert!(statuses.contains(&("gracevm.egm-x.a", "PASS")));
        assert!(statuses.contains(&("gracevm.egm-x.b", "FAIL")));
        assert!(statuses.contains(&("gracevm.egm-x.c", "SKIP")));
        assert!(statuses.contains(&("gracevm.egm-x.d", "ERROR")));
        let b = &r["tests"].as_array().unwrap()[2];
        assert_eq!(b["misc"]["expected_failure"], true);
        assert!(b["log_excerpt"].as_str().unwrap().contains("BUG: KASAN"));
    }

    #[test]
    fn test_report_without_build_record_uses_the_image() {
        let r = report(&summary(), None, "run1", "abcdef0123456789ff", "t");
        assert_eq!(r["checkouts"][0]["id"], "gracevm:image-abcdef0123456789");
        assert_eq!(r["builds"][0]["config_name"], "unknown (a ready Image)");
    }

    /// With GRACEVM_KCIDB_SAMPLE=FILE, writes a sample report there (for schema checks).
    #[test]
    fn test_report_sample_for_schema_check() {
        let Some(path) = std::env::var_os("GRACEVM_KCIDB_SAMPLE") else {
            return;
        };
        let build = BuildInfo {
            tree_name: "linux-source-7.3".into(),
            git_commit_hash: "a".repeat(40),
            patchset_hash: "f".repeat(64),
            patchset_files: vec!["0001.patch".into()],
            message_ids: vec!["<1-2@x.org>".into()],
            config_fragments: vec!["base.config".into()],
            start_time: "2026-11-29T00:00:00Z".into(),
            ..BuildInfo::default()
        };
        let r = report(
            &summary(),
            Some(&build),
            "run1",
            "00",
            "2026-11-29T00:00:00Z",
        );
        std::fs::write(path, serde_json::to_string(&r).unwrap()).unwrap();
    }

    #[test]
    fn test_merge_keeps_one_checkout_and_every_test() {
        let a = report(&summary(), None, "run1", "00", "t");
        let b = report(&summary(), None, "run2", "00", "t");
        let m = merge(&[a.clone(), b]);
        assert_eq!(m["checkouts"].as_array().unwrap().len(), 1);
        assert_eq!(
            m["tests"].as_array().unwrap().len(),
            2 * a["tests"].as_array().unwrap().len()
        );
    }

    #[test]
    fn test_excerpt_cuts_on_char_boundary() {
        assert_eq!(excerpt("€€", 4), "€");
        assert_eq!(path_part("egm.x/y"), "egm_x_y");
    }
}
