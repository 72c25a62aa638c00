//! The kernel-log report matcher on arbitrary text, as the in-guest suite reads /dev/kmsg and
//! the host reads the console: every report starts with a header and stays bounded, and
//! nothing the guest prints may panic.
//! Also the per-line helpers (prefix stripping, printk stamps) and the test-protocol markers.
#![no_main]

use gracevm_contract::kernel_log::{self, Scanner, REPORT_LINES};
use gracevm_contract::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut scanner = Scanner::new();
    for line in text.lines() {
        let stripped = kernel_log::strip_prefix(line);
        assert!(line.contains(stripped), "strip_prefix keeps a part of the line");
        if let Some(at) = kernel_log::printk_stamp_at(line) {
            assert!(line.is_char_boundary(at));
        }
        let _ = protocol::running_test(line);
        let _ = protocol::done_test(line);
        scanner.push(line);
    }
    for report in scanner.reports() {
        assert!(!report.lines.is_empty() && report.lines.len() <= REPORT_LINES);
        assert!(kernel_log::classify(report.header()).is_some());
        let _ = report.head(3);
        let _ = report.has_trace();
        let _ = report.in_code("nvgrace");
        let _ = report.to_string();
    }
    for record in text.split('\0') {
        let _ = kernel_log::kmsg_record_lines(record);
    }
    // Glob selection takes user and scenario text: no pattern may panic or blow up.
    if let Some((pattern, name)) = text.split_once('\n') {
        let _ = protocol::glob_match(pattern, name);
        let _ = protocol::selected(pattern, name);
    }
});
