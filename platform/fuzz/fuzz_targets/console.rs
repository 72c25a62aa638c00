//! Guest console text as the host reads it: arbitrary bytes through the console sink (KTAP
//! lines, panic and running-test markers), from the UART and from the test device's PRINT
//! interleaved as the first byte of each piece chooses, the KTAP parser on what it kept, and
//! the kernel-log report scanner on the same text. Nothing a guest prints may panic the host.
//! Invariants: every report starts with a header line and stays within its bounds; the KTAP
//! parser returns at most one result per captured line.
#![no_main]

use std::sync::Arc;

use gracevm::devices::ConsoleOut;
use gracevm::harness::{console::ConsoleSink, ktap};
use gracevm_contract::kernel_log::{self, REPORT_LINES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut sink = ConsoleSink::new(None, false, None, Arc::default());
    let captured = sink.captured();
    // Feed in uneven pieces, as MMIO writes and vCPU exits split the stream; a piece whose
    // first byte is odd comes as PRINT lines.
    for chunk in data.chunks(7) {
        if chunk[0] & 1 == 1 {
            sink.lines(chunk);
        } else {
            sink.uart(chunk);
        }
    }
    let lines = captured.lock().unwrap().ktap.clone();
    let doc = ktap::parse(&lines);
    assert!(doc.results.len() <= lines.len());
    for r in &doc.results {
        let _ = ktap::format_result(1, r);
    }
    let text = String::from_utf8_lossy(data);
    for report in kernel_log::scan(&text) {
        assert!(!report.lines.is_empty() && report.lines.len() <= REPORT_LINES);
        assert!(kernel_log::classify(report.header()).is_some());
    }
    for record in text.split('\0') {
        let _ = kernel_log::kmsg_record_lines(record);
    }
});
