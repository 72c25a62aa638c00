//! Kernel reports in a log: oopses, BUG, WARNING, KASAN, KFENCE, UBSAN, lockdep, list
//! corruption, hung tasks, RCU stalls, soft lockups and panics.
//!
//! Input is text a guest produced (its `/dev/kmsg` records or its console), so everything here
//! takes any bytes-turned-text without panicking: lines may carry a console timestamp
//! (`[   12.345678] `) or a syslog level (`<4>`), be cut short, or be garbage.
//!
//! A report starts at a header line ([`classify`]) and takes the lines after it, up to the next
//! header or [`REPORT_LINES`]. One event often prints two headers close together (arm64's
//! "Unable to handle kernel paging request" then "Internal error: Oops", or "list_del
//! corruption" then "kernel BUG at lib/list_debug.c"): a header within [`ABSORB_LINES`] of the
//! previous one belongs to the same report.

use std::fmt;

/// At most this many lines are kept per report (the full text stays in the console log).
pub const REPORT_LINES: usize = 80;
/// A header this close to the previous report's header is part of the same event.
pub const ABSORB_LINES: usize = 6;
/// "Internal error: Oops" this close to an oops' first line is the same oops.
pub const OOPS_CONTINUATION_LINES: usize = 24;

/// What kind of kernel report a header line starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Panic,
    Oops,
    Kasan,
    Kfence,
    Ubsan,
    ListCorruption,
    Lockdep,
    Bug,
    SoftLockup,
    HungTask,
    RcuStall,
    Warning,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Panic => "kernel panic",
            Kind::Oops => "oops",
            Kind::Kasan => "KASAN",
            Kind::Kfence => "KFENCE",
            Kind::Ubsan => "UBSAN",
            Kind::ListCorruption => "list corruption",
            Kind::Lockdep => "lockdep",
            Kind::Bug => "BUG",
            Kind::SoftLockup => "soft lockup",
            Kind::HungTask => "hung task",
            Kind::RcuStall => "RCU stall",
            Kind::Warning => "WARNING",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One report: its kind, its header and the lines that followed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub kind: Kind,
    /// The header line and what followed, without timestamps; at most [`REPORT_LINES`].
    pub lines: Vec<String>,
}

impl Report {
    /// The header line.
    pub fn header(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }

    /// The first `n` lines, for a diagnostic.
    pub fn head(&self, n: usize) -> &[String] {
        &self.lines[..self.lines.len().min(n)]
    }

    /// Whether any line of the report contains `needle` (a function or file name).
    pub fn mentions(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    /// Whether the report has a call trace (a fragment of an oops interleaved with another
    /// CPU's has none: it cannot be attributed by itself).
    pub fn has_trace(&self) -> bool {
        self.lines
            .iter()
            .any(|l| l.starts_with("Call trace:") || l.starts_with("Call Trace:"))
    }

    /// Whether the report's header or its call trace names `needle`: the code that went wrong
    /// (not merely "Modules linked in", which lists every loaded module).
    pub fn in_code(&self, needle: &str) -> bool {
        if self.header().contains(needle) {
            return true;
        }
        let mut in_trace = false;
        for line in &self.lines[1.min(self.lines.len())..] {
            if line.starts_with("Call trace:") || line.starts_with("Call Trace:") {
                in_trace = true;
            } else if in_trace && (line.starts_with("---[") || line.starts_with("Code:")) {
                in_trace = false;
            } else if in_trace && line.contains(needle) {
                return true;
            }
        }
        false
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.header())
    }
}

/// `line` without a console timestamp (`[  1.234] `), a syslog level (`<3>`) or a kmsg record
/// prefix (`3,1234,567890,-;`), and without surrounding white space.
pub fn strip_prefix(line: &str) -> &str {
    let mut s = line.trim_start();
    if let Some(rest) = s.strip_prefix('<') {
        if let Some(end) = rest.find('>') {
            if end <= 4 && rest[..end].bytes().all(|b| b.is_ascii_digit()) {
                s = &rest[end + 1..];
            }
        }
    }
    // kmsg record: "prio,seq,usec,flags[,...];text"
    if let Some(semi) = s.find(';') {
        let head = &s[..semi];
        if semi > 0
            && head.split(',').count() >= 3
            && head
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b',' || b == b'-' || b == b'c' || b == b'+')
        {
            s = &s[semi + 1..];
        }
    }
    let t = s.trim_start();
    if let Some(rest) = t.strip_prefix('[') {
        if let Some(end) = rest.find(']') {
            let stamp = &rest[..end];
            // "[    1.234567]" or "[    1.234567][    T1]" (printk caller id).
            if !stamp.is_empty()
                && stamp
                    .trim()
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.')
            {
                let after = &rest[end + 1..];
                let after = match after.strip_prefix('[') {
                    Some(caller) => match caller.find(']') {
                        Some(e) if e <= 12 => &caller[e + 1..],
                        _ => after,
                    },
                    None => after,
                };
                return after.trim();
            }
        }
    }
    t.trim()
}

/// Where a printk console timestamp (`[   12.345678]`) starts in `line`, if it has one.
pub fn printk_stamp_at(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut from = 0;
    while let Some(rel) = line[from..].find('[') {
        let at = from + rel;
        let rest = &bytes[at + 1..];
        let inner = rest.iter().position(|&b| b == b']');
        if let Some(end) = inner {
            let stamp = &rest[..end];
            let trimmed: Vec<u8> = stamp.iter().copied().skip_while(|&b| b == b' ').collect();
            let dot = trimmed.iter().position(|&b| b == b'.');
            let ok = end >= 3
                && dot.is_some_and(|d| d > 0 && d + 1 < trimmed.len())
                && trimmed.iter().all(|&b| b.is_ascii_digit() || b == b'.');
            if ok {
                return Some(at);
            }
        }
        from = at + 1;
    }
    None
}

/// The kind of report `line` starts, if it is a report header.
pub fn classify(line: &str) -> Option<Kind> {
    // Judged on what a report keeps of its header (the first LINE_MAX bytes, trimmed), so a
    // kept header classifies as its line did.
    let s = head_of(strip_prefix(line)).trim_end();
    if s.starts_with("Kernel panic - not syncing") {
        return Some(Kind::Panic);
    }
    if s.starts_with("BUG: KASAN:") {
        return Some(Kind::Kasan);
    }
    if s.starts_with("BUG: KFENCE:") {
        return Some(Kind::Kfence);
    }
    if s.starts_with("UBSAN:") {
        return Some(Kind::Ubsan);
    }
    if s.starts_with("Unable to handle kernel ")
        || s.starts_with("Internal error: ")
        || s.starts_with("Oops:")
        || s.starts_with("Oops ")
        || s.starts_with("BUG: unable to handle")
        || s.starts_with("general protection fault")
    {
        return Some(Kind::Oops);
    }
    if s.contains("list_add corruption")
        || s.contains("list_del corruption")
        || s.contains("list_add_rcu corruption")
        || s.starts_with("list corruption")
    {
        return Some(Kind::ListCorruption);
    }
    if s.starts_with("watchdog: BUG: soft lockup") || s.starts_with("BUG: soft lockup") {
        return Some(Kind::SoftLockup);
    }
    if s.starts_with("kernel BUG at ") || s.starts_with("BUG: ") {
        return Some(Kind::Bug);
    }
    // SLUB debugging: "BUG kmalloc-64 (Not tainted): Redzone overwritten".
    if s.starts_with("BUG ") && s.contains("): ") {
        return Some(Kind::Bug);
    }
    if let Some(rest) = s.strip_prefix("WARNING: ") {
        let is_warn = rest.starts_with("CPU:") || rest.starts_with("at ");
        return Some(if is_warn {
            Kind::Warning
        } else {
            Kind::Lockdep
        });
    }
    // A driver registering a device name twice: the kernel refuses it with a stack dump but
    // no WARNING header.
    if s.starts_with("sysfs: cannot create duplicate filename")
        || s.starts_with("kobject_add_internal failed")
    {
        return Some(Kind::Warning);
    }
    if s.starts_with("INFO: task ") && s.contains("blocked for more than") {
        return Some(Kind::HungTask);
    }
    if (s.starts_with("rcu: ") || s.starts_with("INFO: rcu")) && s.contains("detected stall") {
        return Some(Kind::RcuStall);
    }
    None
}

/// Groups log lines into reports, as they stream.
#[derive(Debug, Default)]
pub struct Scanner {
    reports: Vec<Report>,
    /// Lines since the current report's header (`None` before the first header).
    since_header: Option<usize>,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// Takes one line (any text; a record's embedded newlines should be split by the caller).
    pub fn push(&mut self, line: &str) {
        let text = strip_prefix(line);
        if let Some(kind) = classify(line) {
            // arm64 prints "Internal error: Oops" after the abort's register dump (a dozen
            // lines) of the "Unable to handle kernel ..." that started the same oops.
            let continues_oops = text.starts_with("Internal error: ")
                && self.reports.last().is_some_and(|r| {
                    matches!(
                        r.kind,
                        Kind::Oops | Kind::Bug | Kind::ListCorruption | Kind::Kasan
                    )
                });
            let window = if continues_oops {
                OOPS_CONTINUATION_LINES
            } else {
                ABSORB_LINES
            };
            match (self.since_header, self.reports.last_mut()) {
                (Some(n), Some(current)) if n < window => {
                    // Same event: keep the more specific kind (a list corruption that then
                    // BUGs is a list corruption; an oops that then panics is a panic).
                    if kind == Kind::Panic || (current.kind == Kind::Oops && kind != Kind::Oops) {
                        current.kind = kind;
                    }
                    push_bounded(&mut current.lines, text);
                    self.since_header = Some(n + 1);
                    return;
                }
                _ => {}
            }
            self.reports.push(Report {
                kind,
                lines: vec![bounded(text)],
            });
            self.since_header = Some(0);
            return;
        }
        if let (Some(n), Some(current)) = (self.since_header, self.reports.last_mut()) {
            push_bounded(&mut current.lines, text);
            self.since_header = Some(n + 1);
        }
    }

    pub fn reports(&self) -> &[Report] {
        &self.reports
    }

    pub fn into_reports(self) -> Vec<Report> {
        self.reports
    }
}

/// Lines longer than this are cut (a record is at most about 1 KiB anyway).
const LINE_MAX: usize = 1024;

/// The first [`LINE_MAX`] bytes of `text` (cut on a char boundary).
fn head_of(text: &str) -> &str {
    if text.len() <= LINE_MAX {
        return text;
    }
    let mut end = LINE_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn bounded(text: &str) -> String {
    head_of(text).trim_end().to_string()
}

fn push_bounded(lines: &mut Vec<String>, text: &str) {
    if lines.len() < REPORT_LINES && !text.is_empty() {
        lines.push(bounded(text));
    }
}

/// The reports in `text` (lines separated by `\n`).
pub fn scan(text: &str) -> Vec<Report> {
    let mut scanner = Scanner::new();
    for line in text.lines() {
        scanner.push(line);
    }
    scanner.into_reports()
}

/// The message of one `/dev/kmsg` record (`prio,seq,usec,flags;message` followed by
/// ` KEY=value` dictionary lines), with the kernel's `\xNN` escapes of newlines undone, split
/// into lines. `None` for a record without the `;` separator.
pub fn kmsg_record_lines(record: &str) -> Option<Vec<String>> {
    let first = record.lines().next()?;
    let (_, message) = first.split_once(';')?;
    Some(
        unescape_kmsg(message)
            .split('\n')
            .map(str::to_string)
            .collect(),
    )
}

/// Undoes `/dev/kmsg`'s escaping of unprintable bytes (`\x0a` for a newline).
fn unescape_kmsg(message: &str) -> String {
    let bytes = message.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            let hex = bytes
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KASAN_UAF: &str = "\
[   42.100000] ==================================================================
[   42.100001] BUG: KASAN: slab-use-after-free in egm_release+0x2c/0x90 [nvgrace_egm]
[   42.100002] Read of size 8 at addr ffff000001234567 by task gracevm-suite/211
[   42.100003] Call trace:
[   42.100004]  egm_release+0x2c/0x90 [nvgrace_egm]
[   42.100005]  __fput+0xe0/0x2a0
[   42.100006] ==================================================================";

    #[test]
    fn test_classify_headers_by_kind() {
        let cases = [
            (
                "[ 1.0] BUG: KASAN: slab-out-of-bounds in f+0x1/0x2",
                Kind::Kasan,
            ),
            ("BUG: KFENCE: use-after-free read in f", Kind::Kfence),
            (
                "UBSAN: array-index-out-of-bounds in drivers/x.c:1:2",
                Kind::Ubsan,
            ),
            (
                "Unable to handle kernel NULL pointer dereference at virtual address 0",
                Kind::Oops,
            ),
            (
                "Internal error: Oops: 0000000096000005 [#1] SMP",
                Kind::Oops,
            ),
            ("kernel BUG at lib/list_debug.c:59!", Kind::Bug),
            (
                "BUG: sleeping function called from invalid context at x",
                Kind::Bug,
            ),
            (
                "BUG kmalloc-64 (Not tainted): Redzone overwritten",
                Kind::Bug,
            ),
            (
                "list_del corruption, ffff0000 ->next is LIST_POISON1",
                Kind::ListCorruption,
            ),
            (
                "WARNING: CPU: 1 PID: 9 at drivers/base/core.c:1 f+0x1/0x2",
                Kind::Warning,
            ),
            (
                "WARNING: possible circular locking dependency detected",
                Kind::Lockdep,
            ),
            ("WARNING: suspicious RCU usage", Kind::Lockdep),
            (
                "INFO: task sh:77 blocked for more than 30 seconds.",
                Kind::HungTask,
            ),
            (
                "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
                Kind::RcuStall,
            ),
            (
                "watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
                Kind::SoftLockup,
            ),
            ("Kernel panic - not syncing: Fatal exception", Kind::Panic),
            (
                "sysfs: cannot create duplicate filename '/devices/x/nvgrace_gpu_vfio_pci.egm.4'",
                Kind::Warning,
            ),
            (
                "<4>[    3.5][    T1] WARNING: CPU: 0 PID: 1 at x",
                Kind::Warning,
            ),
            ("4,120,3500000,-;BUG: KASAN: double-free in f", Kind::Kasan),
        ];
        for (line, kind) in cases {
            assert_eq!(classify(line), Some(kind), "{line}");
        }
    }

    #[test]
    fn test_classify_ordinary_lines_are_not_reports() {
        for line in [
            "",
            "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x000f0510]",
            "Kernel command line: console=ttyAMA0 quiet panic=-1",
            "ok 3 egm_poison",
            "# kernel: BUG-free",
            "nvgrace_gpu_vfio_pci 0000:00:01.0: enabling device (0000 -> 0002)",
            "Memory failure: 0x8000001: recovery action for reserved kernel page: Ignored",
            "[ 1.0] warning: something lower case",
        ] {
            assert_eq!(classify(line), None, "{line}");
        }
    }

    #[test]
    fn test_scan_groups_report_lines_until_next_header() {
        let reports = scan(&format!("boot\n{KASAN_UAF}\nafter\n"));
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!(r.kind, Kind::Kasan);
        assert!(r
            .header()
            .starts_with("BUG: KASAN: slab-use-after-free in egm_release"));
        assert!(r.mentions("__fput"));
        assert!(r.lines.iter().all(|l| !l.starts_with('[')));
    }

    #[test]
    fn test_in_code_ignores_module_list() {
        let r = Report {
            kind: Kind::Oops,
            lines: vec![
                "Unable to handle kernel NULL pointer dereference".into(),
                "Modules linked in: nvgrace_egm".into(),
                "Call trace:".into(),
                " kfree+0x1/0x2".into(),
            ],
        };
        assert!(r.mentions("nvgrace"));
        assert!(!r.in_code("nvgrace"));
        assert!(r.in_code("kfree"));
    }

    #[test]
    fn test_scan_absorbs_second_header_of_one_oops() {
        let text = "Unable to handle kernel paging request at virtual address ffff80008000a000\n\
                    Mem abort info:\n\
                    Internal error: Oops: 0000000096000007 [#1] SMP\n\
                    Modules linked in: nvgrace_egm\n\
                    Call trace:\n";
        let reports = scan(text);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].kind, Kind::Oops);
        assert_eq!(reports[0].lines.len(), 5);
    }

    #[test]
    fn test_scan_absorbs_internal_error_after_register_dump() {
        let mut text =
            String::from("Unable to handle kernel paging request at virtual address 07b0\n");
        for i in 0..11 {
            text.push_str(&format!("  abort info {i}\n"));
        }
        text.push_str(
            "Internal error: Oops: 0000000096000004 [#1]  SMP\nCall trace:\n nvgrace_x+0x1\n",
        );
        let reports = scan(&text);
        assert_eq!(reports.len(), 1);
        assert!(reports[0].in_code("nvgrace"));
    }

    #[test]
    fn test_scan_list_corruption_keeps_kind_through_bug() {
        let text = "list_del corruption. prev->next should be ffff, but was dead\n\
                    kernel BUG at lib/list_debug.c:62!\n\
                    Internal error: Oops - BUG: 00000000f2000800 [#1] SMP\n";
        let reports = scan(text);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].kind, Kind::ListCorruption);
    }

    #[test]
    fn test_scan_separate_events_are_separate_reports() {
        let mut text = String::from("WARNING: CPU: 0 PID: 1 at a.c:1 f\n");
        for i in 0..10 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str("BUG: KASAN: double-free in g\n");
        let reports = scan(&text);
        assert_eq!(
            reports.iter().map(|r| r.kind).collect::<Vec<_>>(),
            [Kind::Warning, Kind::Kasan]
        );
    }

    #[test]
    fn test_scan_bounds_lines_and_line_length() {
        let mut text = String::from("BUG: KASAN: wild-memory-access\n");
        for _ in 0..1000 {
            text.push_str(&"€".repeat(600));
            text.push('\n');
        }
        let reports = scan(&text);
        assert_eq!(reports[0].lines.len(), REPORT_LINES);
        assert!(reports[0].lines.iter().all(|l| l.len() <= LINE_MAX));
    }

    #[test]
    fn test_header_cut_after_a_space_still_classifies() {
        // Found by fuzzing: a SLUB-style header whose "): " ends exactly at the cut; the kept
        // header lost the trailing space and no longer classified as the line had.
        let line = format!("BUG {}): {}", "x".repeat(LINE_MAX - 7), "y".repeat(40));
        assert_eq!(classify(&line), None, "judged on the kept, trimmed part");
        let line = format!("BUG {}): {}", "x".repeat(LINE_MAX - 8), "y".repeat(40));
        assert_eq!(classify(&line), Some(Kind::Bug));
        for r in scan(&line) {
            assert_eq!(classify(r.header()), Some(r.kind));
        }
    }

    #[test]
    fn test_kmsg_record_unescapes_and_splits() {
        let lines = kmsg_record_lines("3,77,123456,-;first\\x0asecond\n SUBSYSTEM=pci\n").unwrap();
        assert_eq!(lines, ["first", "second"]);
        assert_eq!(kmsg_record_lines("no separator"), None);
        // Truncated escapes and odd bytes are kept as they are.
        assert_eq!(kmsg_record_lines("1,2,3,-;a\\x").unwrap(), ["a\\x"]);
        assert_eq!(kmsg_record_lines("1,2,3,-;a\\xZZ€").unwrap(), ["a\\xZZ€"]);
    }

    #[test]
    fn test_printk_stamp_found_only_for_timestamps() {
        assert_eq!(printk_stamp_at("[   29.215148]  ret"), Some(0));
        assert_eq!(printk_stamp_at("ok 6 x[ 1.5] y"), Some(6));
        assert_eq!(printk_stamp_at("ok 6 a[0] b[x.1] c[1.] d[.1]"), None);
        assert_eq!(printk_stamp_at("€[ 1.2]"), Some(3));
        assert_eq!(printk_stamp_at("[[[ 1.2]"), Some(2));
    }

    #[test]
    fn test_strip_prefix_on_garbage_does_not_panic() {
        for s in [
            "[", "<", "<1", "[€]", "<€>x", ";", "1,2;", "[ 1.0][", "\u{0}[1]",
        ] {
            let _ = strip_prefix(s);
            let _ = classify(s);
        }
    }
}
