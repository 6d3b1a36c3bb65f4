//! `pool-managerd`: parses the command line, then either runs the daemon
//! ([`startup::serve`](pool_sidecar::startup::serve): sockets bound first, so that a bad config or
//! a busy socket fails before anything starts) or runs an operator command against a running one.

use clap::Parser;
use daemon_support::logging;
use daemon_support::systemd::InheritedSockets;
use pool_sidecar::cli::{Cli, Command, ServeArgs, run_command};
use pool_sidecar::startup;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Read before any thread starts: it edits the environment.
    let inherited = InheritedSockets::from_env();
    // One thread: pool-managerd's work per request is small and passes between its tasks (a
    // connection, the registry, the pools controller); on one thread that costs no wake-up of
    // another. relay-bench, one-token requests, alternately ×3: 22–27 µs of pool-managerd CPU per
    // request on one worker against 37–39 µs on the default two. Blocking work (NVML, log
    // rotation, measured footprints synced to disk) runs on tokio's blocking threads; engine
    // records are synced in place, in order with the engine's reports (rare: start, swap, stop).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pool-managerd: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        None => serve(cli.serve, &runtime, inherited),
        Some(Command::Serve(args)) => serve(args, &runtime, inherited),
        Some(command) => runtime.block_on(run_command(command)),
    }
}

fn serve(
    args: ServeArgs,
    runtime: &tokio::runtime::Runtime,
    inherited: InheritedSockets,
) -> ExitCode {
    logging::init(args.log_format);
    match startup::serve(args, runtime, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pool-managerd: {message}");
            ExitCode::from(2)
        }
    }
}
