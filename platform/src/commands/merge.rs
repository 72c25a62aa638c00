//! `gracevm merge`: the results of several runs (shards) joined into one report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use gracevm::harness::kcidb;
use gracevm::harness::report::Summary;

use crate::cli::{usage, Usage};
use crate::commands::{create_out, SummaryIn};

/// The scenarios of every run, in name order, as one summary.
pub fn merge(runs: &[PathBuf], out: &Path) -> Result<i32> {
    let mut scenarios = Vec::new();
    let mut reports = Vec::new();
    for dir in runs {
        scenarios.extend(read_results(dir)?.scenarios);
        if let Ok(text) = std::fs::read_to_string(dir.join("kcidb.json")) {
            reports.push(
                serde_json::from_str(&text)
                    .with_context(|| format!("reading {}/kcidb.json", dir.display()))?,
            );
        }
    }
    scenarios.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = scenarios.windows(2).find(|w| w[0].name == w[1].name) {
        return usage(format!(
            "scenario {} is in more than one run: shards of one matrix do not overlap",
            w[0].name
        ));
    }
    create_out(out)?;
    let summary = Summary::new(scenarios);
    summary.write(out)?;
    if !reports.is_empty() {
        kcidb::write(out, &kcidb::merge(&reports))?;
    }
    print!("{}", summary.ktap());
    eprintln!("{}", summary.closing_line());
    Ok(summary.exit_code)
}

/// A run's results.json.
fn read_results(dir: &Path) -> Result<SummaryIn> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Usage(format!(
            "{}: {e} (merge takes the output directories of gracevm test runs)",
            path.display()
        ))
    })?;
    Ok(serde_json::from_str(&text).map_err(|e| {
        Usage(format!(
            "{} is not a gracevm results.json: {e}",
            path.display()
        ))
    })?)
}
