//! Runs tests and prints KTAP.
//!
//! Each test runs in a child process (`gracevm-suite --run-one NAME`, the suite's own binary):
//! the release profile aborts on panic, so a panicking test would otherwise take the whole
//! suite down, and a hung test could not be stopped. The child prints the test's notes on
//! stdout and finally one protocol line (starting with [`MARK`]) holding the outcome; its
//! panic hook prints the panic message the same way before the abort. The parent turns notes,
//! stderr and panics into `# ` diagnostics and kills the child's process group on timeout.
//!
//! If the suite cannot re-execute itself (no /proc), tests run in-process: a panic then ends
//! the suite, but a timeout still reports and the suite goes on.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use gracevm_contract::findings::Finding;
use gracevm_contract::kernel_log::Report as KernelReport;
use gracevm_contract::protocol;

use crate::kconfig;
use crate::kmsg::{self, Kmsg};
use crate::ktap;
use crate::outcome::Outcome;
use crate::procfs;
use crate::registry::{Context, Test};
use crate::testdev::TestDev;

/// Starts a child-to-parent protocol line (ASCII record separator: never in normal output).
pub const MARK: char = '\u{1e}';
/// Argument that makes the binary run one test as a child.
pub const RUN_ONE: &str = "--run-one";

/// Left behind when any test's window had a kernel report (read by /init).
pub const REPORTS_SEEN: &str = "/tmp/gracevm-kernel-reports";

/// How often a waiting runner looks at the kernel's taint.
const WAIT_SLICE: Duration = Duration::from_secs(1);
/// How long a test may go on after the kernel oopsed in another task (the oops decides its
/// result whatever it does next: this only lets it say what it saw).
const STUCK_AFTER_OOPS: Duration = Duration::from_secs(10);
/// How long to wait for a killed test process to go.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After an oops, a test process whose every thread stays in uninterruptible sleep this long
/// is taken as stuck for good (it holds or waits for what the dead task left locked) rather
/// than waited for until [`STUCK_AFTER_OOPS`].
const BLOCKED_AFTER_OOPS: Duration = Duration::from_secs(2);

/// How long to wait for a finished child's output pipes to close (a grandchild may hold them).
/// Generous: on a loaded host the guest's vCPUs starve for whole seconds, and a drain cut
/// short loses the test's result ("exited with status 0 without a result").
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// The same for a test process abandoned in the kernel: what it wrote is in the pipe already.
const STUCK_DRAIN_GRACE: Duration = Duration::from_secs(1);

/// How the suite went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub pass: usize,
    pub fail: usize,
    pub skip: usize,
    pub xfail: usize,
}

impl Totals {
    fn count(&mut self, report: &Report) {
        match report {
            Report::Done(Outcome::Pass) => self.pass += 1,
            Report::Done(Outcome::Fail(_)) | Report::TimedOut => self.fail += 1,
            Report::Done(Outcome::Skip(_)) => self.skip += 1,
            Report::Done(Outcome::XFail(_)) => self.xfail += 1,
        }
    }
}

/// What became of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Report {
    Done(Outcome),
    TimedOut,
}

/// Once the kernel has oopsed, a later test waits at most this long: the dead task may hold
/// locks every later test needs, and each would otherwise wait out its full timeout.
const AFTER_OOPS_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for a report still being printed when a test ends to reach the log.
const LOG_SETTLE: Duration = Duration::from_millis(100);

/// Runs `tests` in order and prints KTAP for them (header, plan, results, totals).
///
/// Each test's window of the kernel log is judged too ([`judge`]): a kernel report during a
/// test fails it, or makes it XFAIL when the test names the review finding it reproduces.
///
/// `dev`: the test device, under gracevm. When a test needs the VMM's boot pattern in the
/// carve-outs ([`Test::needs_fill`]) the VMM is asked to fill them at once, beside the first
/// tests. Opening /dev/egm zeroes a region, so the fill must be over before it (or it would
/// overwrite what the driver wrote): the first test not marked [`Test::during_fill`] waits
/// for it. Without such a test nothing is filled (seconds per GiB under nested emulation).
pub fn run_all(tests: &[Test], warnings: &[String], dev: Option<TestDev>) -> Totals {
    ktap::emit(ktap::HEADER);
    ktap::emit(&ktap::plan(tests.len()));
    for warning in warnings {
        ktap::note(format!("gracevm env: {warning}"));
    }
    let mut fill = dev.filter(|_| tests.iter().any(Test::needs_fill));
    if let Some(Err(why)) = fill.as_ref().map(TestDev::start_fill) {
        ktap::note(format!("asking for the carve-out fill: {why}"));
    }
    let exe = self_exe();
    if exe.is_none() {
        ktap::note("cannot re-execute the suite (no /proc/self/exe): running tests in-process");
    }
    let mut log = match Kmsg::from_now() {
        Ok(log) => Some(log),
        Err(e) => {
            ktap::note(format!(
                "cannot read {} ({e}): kernel reports are not judged",
                kmsg::KMSG
            ));
            None
        }
    };
    let ctx = Context::load();
    let scale = timeout_scale();
    if scale > 1 {
        ktap::note(format!(
            "debug kernel (KASAN or lockdep): test timeouts x{scale}"
        ));
    }
    let mut died_noted = false;
    let mut totals = Totals::default();
    for (index, test) in tests.iter().enumerate() {
        let mut test = *test;
        test.timeout *= scale;
        if kmsg::kernel_died() && test.timeout > AFTER_OOPS_TIMEOUT {
            if !died_noted {
                ktap::note(format!(
                    "the kernel has oopsed: later tests wait at most {} s",
                    AFTER_OOPS_TIMEOUT.as_secs()
                ));
                died_noted = true;
            }
            test.timeout = AFTER_OOPS_TIMEOUT;
        }
        if !test.during_fill {
            if let Some(dev) = fill.take() {
                if let Err(why) = dev.await_fill() {
                    ktap::note(format!("waiting for the carve-out fill: {why}"));
                }
            }
        }
        ktap::emit(&format!("{}{}", protocol::RUNNING, test.name));
        let started = std::time::Instant::now();
        let (mut notes, report) = match &exe {
            Some(exe) => run_isolated(exe, &test).unwrap_or_else(|e| {
                let mut notes = vec![format!(
                    "cannot start test process ({e}): running in-process"
                )];
                let (more, report) = run_in_process(&test);
                notes.extend(more);
                (notes, report)
            }),
            None => run_in_process(&test),
        };
        let took = started.elapsed();
        // A test that skipped did nothing to wait for (what the kernel says late still lands
        // in the next test's window).
        let settle = match &report {
            Report::Done(Outcome::Skip(_)) => Duration::ZERO,
            _ => LOG_SETTLE,
        };
        let window = log.as_mut().map(|log| {
            thread::sleep(settle);
            log.drain()
        });
        let report = match window {
            Some(window) => {
                if window.lost {
                    notes.push("kernel log: records were lost before they were read".into());
                }
                notes.extend(kmsg::diagnostics(&window.reports, 3, 12));
                if !window.reports.is_empty() {
                    // /init then ends the run through the test device: a kernel that
                    // reported trouble may not get through its own device shutdown.
                    let _ = std::fs::write(REPORTS_SEEN, b"1\n");
                }
                judge(report, &window.reports, |r| {
                    test.known.and_then(|known| known(&ctx, r))
                })
            }
            None => report,
        };
        for note in &notes {
            ktap::note(note);
        }
        let number = index + 1;
        match &report {
            Report::Done(outcome) => {
                for line in ktap::outcome_diagnostics(outcome) {
                    ktap::emit(&line);
                }
                ktap::emit(&ktap::result_line(number, test.name, outcome));
            }
            Report::TimedOut => {
                ktap::note(format!(
                    "{}: no result after {} s, killed",
                    test.name,
                    test.timeout.as_secs()
                ));
                ktap::emit(&ktap::timeout_line(number, test.name, test.timeout));
            }
        }
        ktap::emit(&format!(
            "{}{} {}",
            protocol::DONE,
            test.name,
            took.as_millis()
        ));
        totals.count(&report);
    }
    ktap::emit(&ktap::totals_line(
        totals.pass,
        totals.fail,
        totals.xfail,
        totals.skip,
    ));
    totals
}

/// How a failure caused by the test process dying (an oops kills it) begins.
const DIED: &str = "test process";
/// How a failure begins when the test panicked, as it does when an oops killed one of its
/// threads.
const PANICKED: &str = "test panicked";

/// Sanitizers and lockdep slow everything several times over (more under nested emulation).
fn timeout_scale() -> u32 {
    let debug = ["KASAN", "PROVE_LOCKING"]
        .iter()
        .any(|option| kconfig::kernel_has(option) == Some(true));
    if debug {
        3
    } else {
        1
    }
}

/// A test's result with its window of the kernel log: no report keeps the result; a report
/// the test names as a known finding gives XFAIL naming it (unless the test failed on its own
/// account); any other report fails the test, whatever it said.
fn judge(
    report: Report,
    reports: &[KernelReport],
    known: impl Fn(&KernelReport) -> Option<Finding>,
) -> Report {
    if reports.is_empty() {
        return report;
    }
    // A finding that is no longer open (a v1 bug v2 fixed) fails like any report, by name.
    let expected = |r: &KernelReport| known(r).filter(|f| f.open);
    // Two CPUs oopsing at once interleave their reports; a piece without a call trace is part
    // of an event another report names, when one does.
    let any_known = reports.iter().any(|r| known(r).is_some());
    let unknown: Vec<&KernelReport> = reports
        .iter()
        .filter(|r| expected(r).is_none())
        .filter(|r| !(any_known && !r.has_trace() && known(r).is_none()))
        .collect();
    let outcome = match report {
        Report::TimedOut => return Report::TimedOut,
        Report::Done(outcome) => outcome,
    };
    let describe = |r: &KernelReport| {
        let named = known(r).map(|f| format!(" ({f})")).unwrap_or_default();
        format!("kernel {} during this test: {}{named}", r.kind, r.header())
    };
    Report::Done(match (outcome, unknown.first()) {
        // The oops that killed the test process is the known finding: an expected failure.
        (Outcome::Fail(why), None) if why.starts_with(DIED) || why.starts_with(PANICKED) => {
            let first = &reports[0];
            let finding = expected(first).map(|f| f.to_string()).unwrap_or_default();
            Outcome::xfail(format!(
                "{finding}; reproduced: kernel {}: {}\n{why}",
                first.kind,
                first.header()
            ))
        }
        (Outcome::Fail(why), _) => Outcome::fail(format!("{why}\n{}", describe(&reports[0]))),
        (_, Some(first)) => Outcome::fail(describe(first)),
        (Outcome::XFail(why), None) => Outcome::xfail(format!(
            "{why}\nreproduced: kernel {}: {}",
            reports[0].kind,
            reports[0].header()
        )),
        (_, None) => {
            let first = &reports[0];
            let finding = known(first).map(|f| f.to_string()).unwrap_or_default();
            Outcome::xfail(format!(
                "{finding}; reproduced: kernel {}: {}",
                first.kind,
                first.header()
            ))
        }
    })
}

/// The child side: runs `test` and prints its outcome as a protocol line.
pub fn run_child(test: &Test) {
    std::panic::set_hook(Box::new(|info| {
        ktap::emit(&format!("{MARK}panic {}", escape(&info.to_string())));
    }));
    let ctx = Context::load();
    let outcome = (test.run)(&ctx);
    ktap::emit(&encode_outcome(&outcome));
}

fn self_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.is_file().then_some(exe)
}

/// Runs `test` in a child process with a timeout.
fn run_isolated(exe: &Path, test: &Test) -> std::io::Result<(Vec<String>, Report)> {
    let mut child = Command::new(exe)
        .arg(RUN_ONE)
        .arg(test.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    // Wait in slices, watching for a kernel oops: one in another task (a probe worker, say)
    // can leave the test stuck in the kernel for good, and then waiting out the test's whole
    // timeout, or for a SIGKILL it cannot act on, would stall the suite.
    let died_before = kmsg::kernel_died();
    let deadline = Instant::now() + test.timeout;
    let mut after_oops: Option<Instant> = None;
    let mut blocked_since: Option<Instant> = None;
    // Why the test was given up on after an oops, when it was.
    let mut stuck: Option<String> = None;
    let status = loop {
        match done_rx.recv_timeout(WAIT_SLICE) {
            Ok(status) => break Some(status?),
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if !died_before && after_oops.is_none() && kmsg::kernel_died() {
            after_oops = Some(now + STUCK_AFTER_OOPS);
        }
        if after_oops.is_some() && procfs::blocked_for_good(pid) {
            blocked_since.get_or_insert(now);
        } else {
            blocked_since = None;
        }
        if blocked_since.is_some_and(|t| now.duration_since(t) >= BLOCKED_AFTER_OOPS) {
            stuck = Some(format!(
                "in uninterruptible sleep for {} s",
                BLOCKED_AFTER_OOPS.as_secs()
            ));
        } else if after_oops.is_some_and(|t| now >= t) {
            stuck = Some(format!(
                "stuck in the kernel {} s",
                STUCK_AFTER_OOPS.as_secs()
            ));
        }
        if now >= deadline || stuck.is_some() {
            kill_group(pid);
            // A process in uninterruptible sleep does not die: leave it after a grace (none
            // when every thread of it already sleeps so).
            if !procfs::blocked_for_good(pid) {
                let _ = done_rx.recv_timeout(KILL_GRACE);
            }
            break None;
        }
    };
    let grace = if stuck.is_some() {
        STUCK_DRAIN_GRACE
    } else {
        DRAIN_GRACE
    };
    let stdout = stdout.recv_timeout(grace).unwrap_or_default();
    let stderr = stderr.recv_timeout(grace).unwrap_or_default();
    let (notes, report) = interpret(&stdout, &stderr, status);
    if let Some(how) = stuck {
        return Ok((
            notes,
            Report::Done(Outcome::fail(format!(
                "{DIED} was {how} after an oops in another task; abandoned"
            ))),
        ));
    }
    Ok((notes, report))
}

/// Reads a pipe to its end on a thread; the bytes arrive on the returned channel.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. The child was
    // started in its own process group (pgid == its pid); it had not exited when the wait
    // timed out, and the kernel hands out pids incrementally, so the group id cannot name
    // someone else in the moment before the kill.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Turns a child's output and exit status (`None`: timed out) into notes and a report.
fn interpret(stdout: &[u8], stderr: &[u8], status: Option<ExitStatus>) -> (Vec<String>, Report) {
    let stdout = String::from_utf8_lossy(stdout);
    let stderr = String::from_utf8_lossy(stderr);
    let mut notes = Vec::new();
    let mut outcome = None;
    let mut panic = None;
    for line in stdout.lines() {
        match line.strip_prefix(MARK) {
            Some(message) => match decode_message(message) {
                Some(Message::Outcome(o)) => outcome = Some(o),
                Some(Message::Panic(text)) => panic = Some(text),
                None => notes.push(format!("bad protocol line from test: {message:?}")),
            },
            None => notes.push(line.to_string()),
        }
    }
    notes.extend(stderr.lines().map(str::to_string));
    notes.retain(|note| !note.trim().is_empty());
    let Some(status) = status else {
        return (notes, Report::TimedOut);
    };
    let report = match (outcome, panic) {
        (_, Some(text)) => Outcome::fail(format!("{PANICKED}: {}", text.replace('\n', " "))),
        (Some(outcome), None) if status.success() => outcome,
        (Some(outcome), None) => {
            notes.push(format!("test process {}", describe(status)));
            match outcome {
                Outcome::Pass => {
                    Outcome::fail(format!("test passed but its process {}", describe(status)))
                }
                other => other,
            }
        }
        (None, None) => Outcome::fail(format!("{DIED} {} without a result", describe(status))),
    };
    (notes, Report::Done(report))
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// Runs `test` on a thread of this process; only the timeout is contained.
fn run_in_process(test: &Test) -> (Vec<String>, Report) {
    let (tx, rx) = mpsc::channel();
    let run = test.run;
    let spawned = thread::Builder::new().spawn(move || {
        let ctx = Context::load();
        let _ = tx.send(run(&ctx));
    });
    if let Err(e) = spawned {
        return (
            Vec::new(),
            Report::Done(Outcome::fail(format!("cannot start test thread: {e}"))),
        );
    }
    match rx.recv_timeout(test.timeout) {
        Ok(outcome) => (Vec::new(), Report::Done(outcome)),
        Err(mpsc::RecvTimeoutError::Timeout) => (Vec::new(), Report::TimedOut),
        Err(mpsc::RecvTimeoutError::Disconnected) => (
            Vec::new(),
            Report::Done(Outcome::fail("test thread ended without a result")),
        ),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Message {
    Outcome(Outcome),
    Panic(String),
}

fn encode_outcome(outcome: &Outcome) -> String {
    let (kind, text) = match outcome {
        Outcome::Pass => ("pass", ""),
        Outcome::Fail(why) => ("fail", why.as_str()),
        Outcome::Skip(why) => ("skip", why.as_str()),
        Outcome::XFail(why) => ("xfail", why.as_str()),
    };
    format!("{MARK}{kind} {}", escape(text))
}

fn decode_message(message: &str) -> Option<Message> {
    let (kind, text) = message.split_once(' ').unwrap_or((message, ""));
    let text = unescape(text);
    Some(match kind {
        "pass" => Message::Outcome(Outcome::Pass),
        "fail" => Message::Outcome(Outcome::Fail(text)),
        "skip" => Message::Outcome(Outcome::Skip(text)),
        "xfail" => Message::Outcome(Outcome::XFail(text)),
        "panic" => Message::Panic(text),
        _ => return None,
    })
}

/// Makes `text` one line: `\` and newline escaped.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn signalled(signal: i32) -> ExitStatus {
        ExitStatus::from_raw(signal)
    }

    #[test]
    fn test_protocol_round_trip_multiline_and_backslash() {
        for outcome in [
            Outcome::Pass,
            Outcome::fail("a\\nb\nc"),
            Outcome::skip("why"),
            Outcome::xfail(""),
        ] {
            let line = encode_outcome(&outcome);
            assert!(!line.contains('\n'));
            let message = line.strip_prefix(MARK).unwrap();
            assert_eq!(decode_message(message), Some(Message::Outcome(outcome)));
        }
    }

    #[test]
    fn test_interpret_outcome_and_notes_kept() {
        let stdout = format!(
            "# saw 2 cpus\nplain note\n{}\n",
            encode_outcome(&Outcome::Pass)
        );
        let (notes, report) = interpret(stdout.as_bytes(), b"warning\n", Some(exited(0)));
        assert_eq!(report, Report::Done(Outcome::Pass));
        assert_eq!(notes, vec!["# saw 2 cpus", "plain note", "warning"]);
    }

    #[test]
    fn test_interpret_panic_then_abort_fails_with_message() {
        let stdout = format!(
            "{MARK}panic {}\n",
            escape("panicked at src/x.rs:1:2:\nboom")
        );
        let (_, report) = interpret(stdout.as_bytes(), b"", Some(signalled(libc::SIGABRT)));
        assert_eq!(
            report,
            Report::Done(Outcome::fail(
                "test panicked: panicked at src/x.rs:1:2: boom"
            ))
        );
    }

    #[test]
    fn test_interpret_no_result_crash_fails() {
        let (_, report) = interpret(b"", b"", Some(signalled(libc::SIGSEGV)));
        assert_eq!(
            report,
            Report::Done(Outcome::fail(
                "test process was killed by signal 11 without a result"
            ))
        );
    }

    #[test]
    fn test_interpret_pass_with_bad_exit_fails() {
        let stdout = encode_outcome(&Outcome::Pass);
        let (_, report) = interpret(stdout.as_bytes(), b"", Some(exited(3)));
        assert!(matches!(report, Report::Done(Outcome::Fail(_))));
    }

    #[test]
    fn test_interpret_timeout_reports_timed_out() {
        let (notes, report) = interpret(b"started\n", b"", None);
        assert_eq!(report, Report::TimedOut);
        assert_eq!(notes, vec!["started"]);
    }

    fn kasan(header: &str) -> KernelReport {
        KernelReport {
            kind: gracevm_contract::kernel_log::Kind::Kasan,
            lines: vec![header.to_string(), "Call trace:".into()],
        }
    }

    fn known_release(r: &KernelReport) -> Option<Finding> {
        r.mentions("egm_release")
            .then_some(gracevm_contract::findings::UNBIND_WHILE_OPEN)
    }

    #[test]
    fn test_judge_no_report_keeps_result() {
        for report in [
            Report::Done(Outcome::Pass),
            Report::Done(Outcome::skip("x")),
            Report::TimedOut,
        ] {
            assert_eq!(judge(report.clone(), &[], known_release), report);
        }
    }

    #[test]
    fn test_judge_unknown_report_fails_pass_and_skip() {
        let r = [kasan("BUG: KASAN: double-free in foo")];
        for report in [
            Report::Done(Outcome::Pass),
            Report::Done(Outcome::skip("x")),
        ] {
            let Report::Done(Outcome::Fail(why)) = judge(report, &r, known_release) else {
                panic!("not a failure");
            };
            assert!(why.contains("kernel KASAN during this test: BUG: KASAN: double-free"));
        }
    }

    #[test]
    fn test_judge_known_report_gives_xfail_naming_finding() {
        let r = [kasan("BUG: KASAN: slab-use-after-free in egm_release+0x1")];
        let Report::Done(Outcome::XFail(why)) =
            judge(Report::Done(Outcome::Pass), &r, known_release)
        else {
            panic!("not an xfail");
        };
        assert!(why.contains("[unbind-while-open]"), "{why}");
        // A failure of the test's own checks stays a failure.
        assert!(matches!(
            judge(Report::Done(Outcome::fail("bad")), &r, known_release),
            Report::Done(Outcome::Fail(_))
        ));
    }

    #[test]
    fn test_judge_process_killed_by_known_oops_is_xfail() {
        let r = [kasan("BUG: KASAN: slab-use-after-free in egm_release+0x1")];
        let died = Outcome::fail(format!("{DIED} was killed by signal 9 without a result"));
        assert!(matches!(
            judge(Report::Done(died.clone()), &r, known_release),
            Report::Done(Outcome::XFail(_))
        ));
        let unknown = [kasan("BUG: KASAN: double-free in other")];
        assert!(matches!(
            judge(Report::Done(died), &unknown, known_release),
            Report::Done(Outcome::Fail(_))
        ));
    }

    #[test]
    fn test_judge_closed_finding_fails_by_name() {
        let r = [kasan("BUG: KASAN: slab-use-after-free in egm_release+0x1")];
        let closed = |_: &KernelReport| Some(gracevm_contract::findings::V1_MODULE_EXIT);
        let Report::Done(Outcome::Fail(why)) = judge(Report::Done(Outcome::Pass), &r, closed)
        else {
            panic!("not a failure");
        };
        assert!(why.contains("[v1-module-exit]"), "{why}");
    }

    #[test]
    fn test_judge_traceless_fragment_beside_a_known_report_is_no_new_bug() {
        let fragment = KernelReport {
            kind: gracevm_contract::kernel_log::Kind::Oops,
            lines: vec!["Unable to handle kernel paging request at dead000000000100".into()],
        };
        let r = [
            fragment.clone(),
            kasan("BUG: KASAN: slab-use-after-free in egm_release"),
        ];
        assert!(matches!(
            judge(Report::Done(Outcome::Pass), &r, known_release),
            Report::Done(Outcome::XFail(_))
        ));
        // Alone it is a failure.
        assert!(matches!(
            judge(Report::Done(Outcome::Pass), &[fragment], known_release),
            Report::Done(Outcome::Fail(_))
        ));
    }

    #[test]
    fn test_judge_known_and_unknown_reports_fail() {
        let r = [
            kasan("BUG: KASAN: slab-use-after-free in egm_release+0x1"),
            kasan("BUG: KASAN: double-free in other"),
        ];
        assert!(matches!(
            judge(Report::Done(Outcome::xfail("seen")), &r, known_release),
            Report::Done(Outcome::Fail(_))
        ));
    }

    #[test]
    fn test_totals_timeout_counts_as_failure() {
        let mut totals = Totals::default();
        totals.count(&Report::TimedOut);
        totals.count(&Report::Done(Outcome::xfail("known")));
        totals.count(&Report::Done(Outcome::Pass));
        assert_eq!(
            totals,
            Totals {
                pass: 1,
                fail: 1,
                skip: 0,
                xfail: 1
            }
        );
    }
}
