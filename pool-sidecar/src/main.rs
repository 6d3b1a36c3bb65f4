//! `pool-managerd`: parses the command line, then either runs the daemon (binding its sockets
//! first, so that a bad config or a busy socket fails before anything starts) or runs an
//! operator command against a running one.

use clap::Parser;
use daemon_support::systemd::{self, DaemonSignal, InheritedSockets, NotifyState, StopSignals};
use pool_sidecar::cli::{Cli, Command, LogFormat, ServeArgs, run_command};
use pool_sidecar::config::{Config, parse_listen};
use pool_sidecar::daemon::{Listeners, run};
use pool_sidecar::ipc::socket::{bind_socket, prepare_engine_directory};
use pool_sidecar::supervisor::EnginePaths;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Read before any thread starts: it edits the environment.
    let inherited = InheritedSockets::from_env();
    let runtime = match tokio::runtime::Runtime::new() {
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(
    args: ServeArgs,
    runtime: &tokio::runtime::Runtime,
    inherited: InheritedSockets,
) -> ExitCode {
    init_tracing(args.log_format);
    match start(args, runtime, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("pool-managerd: {message}");
            ExitCode::from(2)
        }
    }
}

fn start(
    args: ServeArgs,
    runtime: &tokio::runtime::Runtime,
    mut inherited: InheritedSockets,
) -> Result<(), String> {
    // As pool-managerd.service's UMask=0007, when started by hand too: what it and its engines
    // create (engine sockets above all) is never open to other users, and the socket group
    // keeps read and write.
    nix::sys::stat::umask(nix::sys::stat::Mode::S_IRWXO);
    let mut config = Config::load(&args.config).map_err(|error| error.to_string())?;
    if let Some(listen) = &args.debug_listen {
        config.debug_http.listen = match listen.as_str() {
            "off" => None,
            text => Some(parse_listen(text)?),
        };
        config.debug_http.check_exposure()?;
    }
    let explicit =
        args.socket
            .clone()
            .or(match std::env::var_os(pool_ipc::socket_path::SOCKET_ENV) {
                Some(value) if !value.is_empty() => None,
                _ => config.server.socket.clone(),
            });
    let socket_path =
        pool_ipc::socket_path::resolve_socket_path(explicit).map_err(|error| error.to_string())?;

    let _guard = runtime.enter();
    // Sockets systemd holds (socket activation) are used as they are; otherwise bind our own.
    let inherited_ipc = inherited
        .take_unix("ipc")
        .map_err(|error| error.to_string())?;
    let inherited_debug = inherited
        .take_tcp("debug-http")
        .map_err(|error| error.to_string())?;
    if let Some(unknown) = inherited
        .names()
        .iter()
        .find(|name| !matches!(name.as_str(), "ipc" | "debug-http"))
    {
        tracing::warn!(name = %unknown, "ignoring an inherited socket with an unknown FileDescriptorName");
    }
    let (std_listener, socket_file) = match inherited_ipc {
        Some(listener) => (listener, None),
        None => {
            let (listener, file) = bind_socket(&socket_path, config.server.socket_group)
                .map_err(|error| error.to_string())?;
            (listener, Some(file))
        }
    };
    let socket_path = std_listener
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_pathname().map(Path::to_path_buf))
        .unwrap_or(socket_path);
    std_listener
        .set_nonblocking(true)
        .map_err(|error| format!("cannot make the socket non-blocking: {error}"))?;
    let ipc = tokio::net::UnixListener::from_std(std_listener)
        .map_err(|error| format!("cannot register the socket: {error}"))?;
    let debug_http = match (inherited_debug, config.debug_http.listen) {
        (Some(listener), _) => Some(
            listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener))
                .map_err(|error| format!("cannot register the inherited shim socket: {error}"))?,
        ),
        (None, None) => None,
        (None, Some(addr)) => {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|listener| {
                    listener.set_nonblocking(true)?;
                    Ok(listener)
                })
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|error| format!("cannot bind the debug HTTP shim on {addr}: {error}"))?;
            Some(listener)
        }
    };
    let debug_addr = match &debug_http {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|error| format!("cannot read the shim's address: {error}"))?;
            // Judged on the socket really served, inherited ones included.
            config.debug_http.check_exposure_of(addr)?;
            addr.to_string()
        }
        None => "off".into(),
    };

    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.server.state_dir.clone())
        .or_else(default_state_dir)
        .ok_or("no state directory: pass --state-dir or set server.state_dir")?;
    let mut paths = EnginePaths::under(&state_dir);
    if let Some(dir) = socket_path.parent() {
        paths.socket_dir = dir.join("engines");
    }
    prepare_engine_directory(&paths.socket_dir, config.server.socket_group)
        .map_err(|error| error.to_string())?;

    let shutdown = CancellationToken::new();
    let signals = StopSignals::install()
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    let (reload_requests, reloads) = mpsc::unbounded_channel();
    runtime.spawn(handle_signals(
        signals,
        shutdown.clone(),
        reload_requests,
        args.config.clone(),
    ));
    let socket_shown = socket_path.display().to_string();
    runtime.block_on(run(
        config,
        Listeners { ipc, debug_http },
        paths,
        shutdown,
        reloads,
        move || {
            let mut stdout = std::io::stdout();
            let _ = writeln!(
                stdout,
                "READY socket={socket_shown} debug_http={debug_addr}"
            );
            let _ = stdout.flush();
            systemd::notify(&[NotifyState::Ready]);
        },
    ));
    drop(socket_file);
    Ok(())
}

fn default_state_dir() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from("/var/lib/pool-managerd"));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
        })?;
    Some(base.join("pool-managerd"))
}

/// SIGTERM/SIGINT stop the daemon; SIGHUP rereads the config file and hands it to the daemon,
/// which applies the pool changes (RELOADING=1 now, READY=1 once applied).
async fn handle_signals(
    mut signals: StopSignals,
    shutdown: CancellationToken,
    reloads: mpsc::UnboundedSender<Result<Config, String>>,
    config_path: PathBuf,
) {
    loop {
        match signals.next().await {
            DaemonSignal::Stop => return shutdown.cancel(),
            DaemonSignal::Reload => {
                systemd::notify_reloading();
                tracing::info!(config = %config_path.display(), "rereading the configuration");
                let reread = Config::load(&config_path).map_err(|error| error.to_string());
                if reloads.send(reread).is_err() {
                    return;
                }
            }
        }
    }
}
