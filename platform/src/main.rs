//! gracevm: a minimal aarch64 VMM modelling an NVIDIA Grace platform with EGM carve-outs, for
//! testing the nvgrace-gpu and EGM kernel drivers without the hardware.
//!
//! The binary is the command line over the `gracevm` library: `cli` parses it, `resolve`
//! checks what it names, and `commands` holds one module per subcommand (`bench` its own).

mod bench;
mod cli;
mod commands;
mod resolve;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;

use gracevm::exit::{self, Status};
use gracevm::guest::Mode;
use gracevm::machine::Watch;

use cli::{Cli, Command, Usage};
use commands::create_out;
// `bench` reaches the resolved guest as `crate::Resolved`.
use resolve::Resolved;

fn main() {
    // A run's boot time counts from here, as a qemu boot counts from qemu's launch.
    let started = Instant::now();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    exit::exit_on_panic();
    let watch = Arc::new(Watch::default());
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The handler only raises the flag; every wait loop polls it.
        if let Err(e) = signal_hook::flag::register(sig, watch.interrupted.clone()) {
            log::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let code = match dispatch(cli.command, watch, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gracevm: {e:#}");
            e.downcast_ref::<Usage>()
                .map_or(Status::VmmError.code(), |_| exit::USAGE)
        }
    };
    std::process::exit(code);
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 | 1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("GRACEVM_LOG")
        .format(|f, r| match r.level() {
            log::Level::Info => writeln!(f, "[gracevm] {}", r.args()),
            l => writeln!(f, "[gracevm] {}: {}", l.as_str().to_lowercase(), r.args()),
        })
        .init();
}

fn dispatch(cmd: Command, watch: Arc<Watch>, started: Instant) -> Result<i32> {
    match cmd {
        Command::Run { guest, cmd, out } => {
            let g = Resolved::new(&guest)?;
            let mode = cmd.map_or(Mode::Shell, Mode::Run);
            if let Some(out) = &out {
                create_out(out)?;
            }
            commands::run::run(&g, mode, out.as_deref(), watch, started)
        }
        Command::Test(args) => commands::test::command(args, watch),
        Command::Merge { runs, out } => commands::merge::merge(&runs, &out),
        Command::Initramfs {
            init,
            busybox,
            suite,
            out,
        } => commands::initramfs::write(&init, &busybox, &suite, &out),
        Command::Firmware {
            platform,
            cpus,
            out,
        } => commands::firmware::write(platform.as_deref(), cpus, &out),
        Command::Bench { guest, runs, out } => {
            let g = Resolved::new(&guest)?;
            create_out(&out)?;
            bench::run(&g, runs.max(1), &out, watch)
        }
    }
}
