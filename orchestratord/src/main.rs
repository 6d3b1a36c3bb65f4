//! `orchestratord`: parses flags, loads and validates its config (refusing a public listener
//! without API keys), binds (or takes systemd's socket), and runs [`orchestratord::run`] until
//! SIGTERM/SIGINT; SIGHUP rereads the config and hands it over.

use clap::Parser;
use daemon_support::systemd::{self, DaemonSignal, InheritedSockets, NotifyState, StopSignals};
use orchestratord::config::{Config, RawConfig};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Parser)]
#[command(
    name = "orchestratord",
    version,
    about = "LLM request orchestrator in front of pool-managerd"
)]
struct Args {
    /// TOML config file (optional: every setting has a default).
    #[arg(long, env = "ORCHESTRATORD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (ip:port; port 0 for any); overrides the config.
    #[arg(long, env = "ORCHESTRATORD_LISTEN")]
    listen: Option<String>,
    /// pool-managerd's socket; overrides the config (default: $POOL_MANAGERD_SOCKET, then the
    /// system or per-user default).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// API keys, one per line; overrides the config.
    #[arg(long, env = "ORCHESTRATORD_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Read before any thread starts: it edits the environment.
    let inherited = InheritedSockets::from_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("orchestratord: cannot start the async runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(start(args, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("orchestratord: {message}");
            ExitCode::from(2)
        }
    }
}

async fn start(args: Args, mut inherited: InheritedSockets) -> Result<(), String> {
    let signals = StopSignals::install()
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    let config = load_config(&args)?;
    // A socket systemd holds (orchestratord.socket, FileDescriptorName=http) is used as it is.
    let listener = match inherited
        .take_tcp("http")
        .map_err(|error| error.to_string())?
    {
        Some(listener) => listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .map_err(|error| format!("cannot register the inherited socket: {error}"))?,
        None => tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|error| format!("cannot listen on {}: {error}", config.listen))?,
    };
    let shutdown = CancellationToken::new();
    let (reloads, reloaded) = mpsc::unbounded_channel();
    tokio::spawn(handle_signals(signals, shutdown.clone(), args, reloads));
    orchestratord::run(config, listener, shutdown, reloaded)
        .await
        .map_err(|error| error.to_string())
}

/// The configuration file (if any) with the command line's overrides, validated.
fn load_config(args: &Args) -> Result<Config, String> {
    let mut raw = match &args.config {
        Some(path) => RawConfig::load(path).map_err(|error| error.to_string())?,
        None => RawConfig::default(),
    };
    if args.listen.is_some() {
        raw.listen.clone_from(&args.listen);
    }
    if args.socket.is_some() {
        raw.socket.clone_from(&args.socket);
    }
    if args.api_keys_file.is_some() {
        raw.api_keys_file.clone_from(&args.api_keys_file);
    }
    raw.validate().map_err(|error| error.to_string())
}

/// SIGTERM/SIGINT stop the server; SIGHUP rereads the configuration and hands a valid one over
/// (an invalid one changes nothing).
async fn handle_signals(
    mut signals: StopSignals,
    shutdown: CancellationToken,
    args: Args,
    reloads: mpsc::UnboundedSender<Config>,
) {
    while signals.next().await == DaemonSignal::Reload {
        systemd::notify_reloading();
        match load_config(&args) {
            Ok(new) => {
                if reloads.send(new).is_err() {
                    break;
                }
            }
            Err(error) => {
                tracing::error!(%error, "reload refused: the configuration is not valid; nothing changed");
                systemd::notify(&[
                    NotifyState::Ready,
                    NotifyState::Status("reload failed: configuration not valid; nothing changed"),
                ]);
            }
        }
    }
    shutdown.cancel();
}
