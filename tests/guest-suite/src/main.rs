//! gracevm-suite: the in-guest test suite. Runs inside a gracevm guest (started by `/init` in
//! test mode), checks the machine against the VMM's expectations in `/gracevm/env`, and prints
//! KTAP version 1 on stdout. Exits 0 when no test failed, 1 otherwise, 2 on bad usage.
//!
//! Usage: `gracevm-suite [--list] [--selftest] [NAME...]`

use std::process::ExitCode;

use gracevm_contract::protocol;
use guest_suite::registry::{self, Test};
use guest_suite::{env, ktap, runner, suites, testdev};

const USAGE: &str = "usage: gracevm-suite [--list] [--selftest] [--mmio-without-syndrome] [NAME...]
  --list      print the test names and exit
  --selftest  run the harness self-tests instead of the guest tests
  --mmio-without-syndrome
              read the test device with one load-pair instruction (the hypervisor gets no
              syndrome): the VMM must end the run as a guest fault (harness check)
  NAME...     run only these tests";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(runner::RUN_ONE) {
        return run_one(args.get(1).map(String::as_str).unwrap_or(""));
    }
    let mut list = false;
    let mut tests = suites::all();
    let mut names = Vec::new();
    for arg in &args {
        match arg.as_str() {
            "--list" => list = true,
            "--selftest" => tests = suites::selftests(),
            "--mmio-without-syndrome" => return mmio_without_syndrome(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            flag if flag.starts_with('-') => {
                eprintln!("gracevm-suite: unknown option {flag}\n{USAGE}");
                return ExitCode::from(2);
            }
            name => names.push(name),
        }
    }
    if !names.is_empty() {
        let mut chosen = Vec::new();
        for name in names {
            match registry::find(&tests, name) {
                Some(test) => chosen.push(*test),
                None => {
                    eprintln!("gracevm-suite: no test called {name}");
                    return ExitCode::from(2);
                }
            }
        }
        tests = chosen;
    }
    // With no names on the command line: the scenario's `tests` globs and the run's `--tests`.
    let env = env::GuestEnv::load();
    if args.iter().all(|a| a.starts_with('-')) {
        for key in ["GRACEVM_TESTS", "GRACEVM_TESTS_SELECTED"] {
            if let Some(globs) = env.get(key) {
                tests.retain(|t| protocol::selected(globs, t.name));
            }
        }
    }
    if list {
        for test in &tests {
            println!("{}", test.name);
        }
        return ExitCode::SUCCESS;
    }
    // Under gracevm the suite prints through the test device, and asks for the carve-out fill
    // when a test needs it. Elsewhere: stdout, and no fill.
    let fill = testdev::TestDev::from_env(&env).ok();
    if let Ok(dev) = testdev::TestDev::from_env(&env) {
        match testdev::Printer::new(dev) {
            Ok(printer) => ktap::print_through(printer),
            Err(why) => eprintln!("gracevm-suite: printing to the UART: {why}"),
        }
    }
    let warnings = env.warnings;
    let totals = runner::run_all(&tests, &warnings, fill);
    if totals.fail == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Harness check of the VMM (tests/e2e/exit-status.sh): an MMIO read it cannot decode.
fn mmio_without_syndrome() -> ExitCode {
    let env = env::GuestEnv::load();
    match testdev::TestDev::from_env(&env) {
        Ok(dev) => {
            let (a, b) = dev.read_pair(0);
            eprintln!("gracevm-suite: the load pair returned {a:#x} {b:#x}: the VMM let it pass");
            ExitCode::FAILURE
        }
        Err(why) => {
            eprintln!("gracevm-suite: no test device: {why:?}");
            ExitCode::from(2)
        }
    }
}

/// Child mode: run one test (guest test or self-test) and report it to the parent.
fn run_one(name: &str) -> ExitCode {
    let everything: Vec<Test> = [suites::all(), suites::selftests()].concat();
    match registry::find(&everything, name) {
        Some(test) => {
            runner::run_child(test);
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("gracevm-suite: no test called {name}");
            ExitCode::from(2)
        }
    }
}
