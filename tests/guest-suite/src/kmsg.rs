//! The kernel log as the suite reads it: `/dev/kmsg` records, read without blocking, turned
//! into [`Report`]s by the contract's matcher (the host reads the console with the same one).
//!
//! The runner keeps one reader open for the whole suite and drains it after each test, so the
//! windows are contiguous: a report printed late (an RCU callback, a hung-task check) lands in
//! the next test's window rather than in none.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

use gracevm_contract::kernel_log::{self, Report, Scanner};

pub const KMSG: &str = "/dev/kmsg";
/// `/proc/sys/kernel/tainted` bit set once the kernel has oopsed (TAINT_DIE).
const TAINT_DIE: u64 = 1 << 7;

/// What one drain of the log gave.
#[derive(Debug, Default)]
pub struct Window {
    pub reports: Vec<Report>,
    /// Records were overwritten before they were read (the ring buffer wrapped).
    pub lost: bool,
    pub records: usize,
}

/// A non-blocking reader of `/dev/kmsg`.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// A reader positioned at the oldest record still in the buffer (the boot).
    pub fn from_start() -> io::Result<Kmsg> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(KMSG)?;
        Ok(Kmsg { file })
    }

    /// A reader that sees only records printed from now on.
    pub fn from_now() -> io::Result<Kmsg> {
        let mut k = Kmsg::from_start()?;
        k.file.seek(SeekFrom::End(0))?;
        Ok(k)
    }

    /// Reads every record available now and groups the reports in them.
    pub fn drain(&mut self) -> Window {
        let mut window = Window::default();
        let mut scanner = Scanner::new();
        // One read returns one record; a record is at most about 8 KiB with its dictionary.
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    window.records += 1;
                    let record = String::from_utf8_lossy(&buf[..n]);
                    if let Some(lines) = kernel_log::kmsg_record_lines(&record) {
                        for line in lines {
                            scanner.push(&line);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // EPIPE: the reader fell behind and records were overwritten; the next read
                // goes on from the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => window.lost = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        window.reports = scanner.into_reports();
        window
    }
}

/// Whether the kernel has oopsed since boot (a dead task may hold locks later tests need).
pub fn kernel_died() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/tainted")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .is_some_and(|t| t & TAINT_DIE != 0)
}

/// Diagnostic lines for `reports`: the first lines of each, at most `per_report` each and
/// `max_reports` reports.
pub fn diagnostics(reports: &[Report], max_reports: usize, per_report: usize) -> Vec<String> {
    let mut out = Vec::new();
    for report in reports.iter().take(max_reports) {
        for (i, line) in telling_lines(report, per_report).iter().enumerate() {
            if i == 0 {
                out.push(format!("kernel {}: {line}", report.kind));
            } else {
                out.push(format!("kernel   {line}"));
            }
        }
    }
    if reports.len() > max_reports {
        out.push(format!(
            "kernel: {} more report(s), see the console log",
            reports.len() - max_reports
        ));
    }
    out
}

/// The lines that say most about a report, at most `n`: its header, then the first frames of
/// its call trace (where the bug is), then what follows the header (access sizes, registers).
fn telling_lines(report: &Report, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = report.lines.iter().map(String::as_str).collect();
    let Some((&header, rest)) = lines.split_first() else {
        return Vec::new();
    };
    let mut out = vec![header];
    if let Some(at) = rest.iter().position(|l| l.starts_with("Call trace:")) {
        // The reporting machinery's own frames say nothing about the bug.
        let reporting = [
            "show_stack",
            "dump_stack",
            "print_",
            "check_",
            "__might_",
            "__warn",
            "report_bug",
            "kasan_report",
            "print_report",
            "__kasan",
            "validate_chain",
            "__lock_acquire",
        ];
        out.push(rest[at]);
        out.extend(
            rest[at + 1..]
                .iter()
                .filter(|l| !l.is_empty())
                .filter(|l| !reporting.iter().any(|r| l.trim_start().starts_with(r)))
                .take((n / 2).max(2)),
        );
    }
    for line in rest {
        if out.len() >= n {
            break;
        }
        if !out.contains(line) {
            out.push(line);
        }
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gracevm_contract::kernel_log::Kind;

    #[test]
    fn test_diagnostics_show_header_then_call_trace() {
        let mut lines =
            vec!["Unable to handle kernel paging request at dead000000000100".to_string()];
        lines.extend((0..20).map(|i| format!("noise {i}")));
        lines.push("Call trace:".into());
        lines.push(" nvgrace_gpu_destroy_egm_aux_device+0x54/0xd8".into());
        lines.push(" nvgrace_gpu_remove+0x14/0x30".into());
        let r = Report {
            kind: Kind::Oops,
            lines,
        };
        let d = diagnostics(&[r], 1, 6);
        assert_eq!(d.len(), 6);
        assert!(d[0].starts_with("kernel oops: Unable to handle"));
        assert!(d[1].contains("Call trace:"));
        assert!(d[2].contains("nvgrace_gpu_destroy_egm_aux_device"));
    }
}
