//! `orchestratord`: parses flags, starts logging and the runtime, and runs
//! [`startup::serve`](orchestratord::startup::serve) (config, listener, signals, then
//! [`orchestratord::run`]) until SIGTERM/SIGINT.

use clap::Parser;
use daemon_support::systemd::InheritedSockets;
use orchestratord::startup::{self, Args};
use std::process::ExitCode;

/// See the workspace's Cargo.toml for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    // Read before any thread starts: it edits the environment.
    let inherited = InheritedSockets::from_env();
    daemon_support::logging::init(args.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orchestratord: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(startup::serve(args, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("orchestratord: {message}");
            ExitCode::from(2)
        }
    }
}
