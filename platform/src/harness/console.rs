//! The guest console sink: raw bytes to the log file (and stdout when attached), complete lines
//! scanned for KTAP and for kernel panics as they stream.
//!
//! Two sources feed it: the UART, a byte at a time, and the suite's whole lines through the
//! test device's PRINT. A suite line that arrives while the UART is in the middle of a line
//! (a kernel message on another CPU) is scanned at once but written to the log after that
//! line ends, so the log reads as the guest wrote it.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use gracevm_contract::{kernel_log, protocol};

use crate::devices::{lock, ConsoleOut};
use crate::harness::ktap;
use crate::machine::Watch;

/// Lines of interest collected from the console.
#[derive(Default)]
pub struct Captured {
    pub ktap: Vec<String>,
    /// The first line of a kernel panic, for the report.
    pub panic: Option<String>,
    /// The guest test that was running last (the suite announces each before it starts).
    pub running: Option<String>,
    /// How long each guest test took, in milliseconds (the suite says so after each).
    pub durations: std::collections::BTreeMap<String, u64>,
}

pub struct ConsoleSink {
    log: Option<File>,
    echo: bool,
    /// Print KTAP result lines to stderr as they arrive (progress in test runs).
    progress: Option<String>,
    /// The UART's current line so far: not empty while the UART is in the middle of a line.
    line: Vec<u8>,
    /// PRINT lines waiting for the UART's line to end before they go to the log.
    held: Vec<u8>,
    /// The start of a suite line a kernel message broke into, waiting for its rest.
    broken: Option<String>,
    captured: Arc<Mutex<Captured>>,
    watch: Arc<Watch>,
}

impl ConsoleSink {
    pub fn new(log: Option<File>, echo: bool, progress: Option<String>, watch: Arc<Watch>) -> Self {
        ConsoleSink {
            log,
            echo,
            progress,
            line: Vec::new(),
            held: Vec::new(),
            broken: None,
            captured: Arc::default(),
            watch,
        }
    }

    pub fn captured(&self) -> Arc<Mutex<Captured>> {
        self.captured.clone()
    }

    fn end_line(&mut self) {
        let raw = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        // The kernel prints to the same UART the suite writes to, and a message can land in
        // the middle of a suite line: "not ok 6 x[  29.2] ret_from_fork+0x10\n # TODO ...\n".
        // The suite's part waits for its rest, which follows the kernel's lines.
        let text = match (self.broken.take(), kernel_log::printk_stamp_at(&raw)) {
            (None, Some(at)) if at > 0 && suite_line(&raw[..at]) => {
                self.broken = Some(raw[..at].to_string());
                self.take_line(raw[at..].to_string());
                return;
            }
            (Some(head), Some(0)) => {
                self.broken = Some(head);
                raw
            }
            (Some(head), _) => format!("{head}{raw}"),
            (None, _) => raw,
        };
        self.take_line(text);
    }

    fn take_line(&mut self, text: String) {
        let mut cap = lock(&self.captured);
        if let Some(name) = protocol::running_test(&text) {
            cap.running = Some(name.to_string());
        }
        if let Some((name, ms)) = protocol::done_test(&text) {
            cap.durations.insert(name.to_string(), ms);
        }
        if kernel_log::classify(&text) == Some(kernel_log::Kind::Panic) {
            cap.panic.get_or_insert(text.clone());
            self.watch.panicked.store(true, Ordering::Release);
        }
        if ktap::is_ktap_line(&text) {
            if let Some(tag) = &self.progress {
                if text.starts_with("ok ") || text.starts_with("not ok ") {
                    eprintln!("[gracevm] {tag}: {text}");
                }
            }
            cap.ktap.push(text);
        }
    }
}

/// Whether `text` begins a suite line worth rejoining: a KTAP result or a marker. (A broken
/// diagnostic just loses its tail; rejoining one that quotes a kernel timestamp itself could
/// swallow the next result.)
fn suite_line(text: &str) -> bool {
    text.starts_with("ok ") || text.starts_with("not ok ") || text.starts_with("gracevm-suite: ")
}

/// PRINT lines held back longer than this go to the log anyway (a UART line that never ends).
const HELD_MAX: usize = 64 * 1024;

impl ConsoleSink {
    /// Raw text to the log file and to stdout when attached.
    fn record(&mut self, bytes: &[u8]) {
        if let Some(log) = &mut self.log {
            // A full disk must not stop the guest; the loss is visible in the log itself.
            let _ = log.write_all(bytes);
        }
        if self.echo {
            let mut out = io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
    }

    fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.record(&held);
    }
}

impl ConsoleOut for ConsoleSink {
    fn uart(&mut self, buf: &[u8]) {
        let mut rest = buf;
        while !rest.is_empty() {
            let (chunk, more) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => rest.split_at(i + 1),
                None => (rest, &[][..]),
            };
            self.record(chunk);
            for &b in chunk {
                if b == b'\n' {
                    self.end_line();
                } else if self.line.len() < 4096 {
                    self.line.push(b);
                }
            }
            if self.line.is_empty() && !self.held.is_empty() {
                self.release_held();
            }
            rest = more;
        }
    }

    fn lines(&mut self, text: &[u8]) {
        let mut whole = text.to_vec();
        if !whole.ends_with(b"\n") {
            whole.push(b'\n');
        }
        for line in whole[..whole.len() - 1].split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            self.take_line(line.trim_end_matches('\r').to_string());
        }
        if !self.line.is_empty() && self.held.len() < HELD_MAX {
            self.held.extend_from_slice(&whole);
        } else {
            // Lines held before these go first, so the log keeps the suite's order.
            self.release_held();
            self.record(&whole);
        }
    }
}

impl Drop for ConsoleSink {
    fn drop(&mut self) {
        self.release_held();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.uart(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(log) = &mut self.log {
            log.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_console_sink_captures_ktap_and_panic() {
        let watch = Arc::new(Watch::default());
        let mut sink = ConsoleSink::new(None, false, None, watch.clone());
        let cap = sink.captured();
        sink.write_all(b"[ 0.1] booting\r\nKTAP version 1\r\n1..1\nok 1 a\n")
            .unwrap();
        assert!(!watch.panicked.load(Ordering::Acquire));
        sink.write_all(b"[ 2.0] Kernel panic - not syncing: Attempted to kill init!\n")
            .unwrap();
        let cap = cap.lock().unwrap();
        assert_eq!(cap.ktap, ["KTAP version 1", "1..1", "ok 1 a"]);
        assert!(cap
            .panic
            .as_deref()
            .unwrap()
            .contains("Attempted to kill init"));
        assert!(watch.panicked.load(Ordering::Acquire));
    }

    #[test]
    fn test_console_sink_remembers_running_test() {
        let mut sink = ConsoleSink::new(None, false, None, Arc::default());
        let cap = sink.captured();
        sink.write_all(
            b"gracevm-suite: running egm_a
ok 1 egm_a
gracevm-suite: running egm_b
",
        )
        .unwrap();
        let cap = cap.lock().unwrap();
        assert_eq!(cap.running.as_deref(), Some("egm_b"));
        assert_eq!(cap.ktap, ["ok 1 egm_a"]);
    }

    #[test]
    fn test_console_sink_rejoins_a_line_a_kernel_message_broke() {
        let mut sink = ConsoleSink::new(None, false, None, Arc::default());
        let cap = sink.captured();
        sink.write_all(
            b"not ok 6 egm_x[   29.215148]  ret_from_fork+0x10/0x20\n\
              [   29.3] more kernel\n # TODO known review point\n\
              ok 7 y[ 30.1] flags: 0x240\n\nok 8 z\n",
        )
        .unwrap();
        let cap = cap.lock().unwrap();
        assert_eq!(
            cap.ktap,
            [
                "not ok 6 egm_x # TODO known review point",
                "ok 7 y",
                "ok 8 z"
            ]
        );
    }

    /// A sink logging to `console.log` in a fresh directory named after `name`, and that path.
    fn logging_sink(name: &str) -> (ConsoleSink, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("gracevm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let log = File::create(&path).unwrap();
        (
            ConsoleSink::new(Some(log), false, None, Arc::default()),
            path,
        )
    }

    fn remove_log(path: &std::path::Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    #[test]
    fn test_printed_lines_scanned_at_once_and_logged_after_the_uart_line() {
        let (mut sink, path) = logging_sink("sink");
        let cap = sink.captured();
        sink.uart(b"KTAP version 1\n[ 1.0] BUG: KASAN: slab-");
        sink.lines(b"ok 1 a\ngracevm-suite: running b\n");
        sink.uart(b"use-after-free in egm_release\n");
        sink.lines(b"not ok 2 b");
        drop(sink);
        let cap = cap.lock().unwrap();
        assert_eq!(cap.ktap, ["KTAP version 1", "ok 1 a", "not ok 2 b"]);
        assert_eq!(cap.running.as_deref(), Some("b"));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "KTAP version 1\n[ 1.0] BUG: KASAN: slab-use-after-free in egm_release\n\
             ok 1 a\ngracevm-suite: running b\nnot ok 2 b\n"
        );
        remove_log(&path);
    }

    #[test]
    fn test_printed_lines_past_the_hold_limit_keep_their_order() {
        let (mut sink, path) = logging_sink("sink-held");
        sink.uart(b"[ 1.0] a kernel line that never ends");
        let first = vec![b'a'; HELD_MAX];
        sink.lines(&first);
        sink.lines(b"ok 2 after");
        drop(sink);
        let log = std::fs::read_to_string(&path).unwrap();
        let a = log.find("aaaa").unwrap();
        let after = log.find("ok 2 after").unwrap();
        assert!(a < after, "held lines logged after later ones");
        remove_log(&path);
    }

    #[test]
    fn test_console_sink_bounds_runaway_lines() {
        let mut sink = ConsoleSink::new(None, false, None, Arc::default());
        sink.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(sink.line.len() <= 4096);
    }
}
