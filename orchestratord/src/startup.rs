//! From orchestratord's flags to a running server: the flags ([`Args`]), the configuration they
//! select and override (validated: a public listener without API keys is refused in
//! [`run`](crate::run)), the listener (systemd's `http` socket, or one bound on `listen`), the
//! signal handlers, then [`run`](crate::run) until SIGTERM/SIGINT; SIGHUP rereads the
//! configuration and hands a valid one over.

use crate::config::{Config, RawConfig};
use daemon_support::listeners::tcp_listener;
use daemon_support::logging::LogFormat;
use daemon_support::systemd::{self, DaemonSignal, InheritedSockets, NotifyState, StopSignals};
use std::path::PathBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, clap::Parser)]
#[command(
    name = "orchestratord",
    version,
    about = "LLM request orchestrator in front of pool-managerd"
)]
pub struct Args {
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
    /// Log lines as text or as one JSON object each (access lines carry the key's name and the
    /// correlation id either way).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

/// Serves until asked to stop; `Err` is the message it could not start (or serve) with.
pub async fn serve(args: Args, mut inherited: InheritedSockets) -> Result<(), String> {
    let signals = StopSignals::install()
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    let config = load_config(&args)?;
    // A socket systemd holds (orchestratord.socket, FileDescriptorName=http) is used as it is.
    let inherited_http = inherited
        .take_tcp("http")
        .map_err(|error| error.to_string())?;
    let listener =
        tcp_listener(inherited_http, config.listen).map_err(|error| error.to_string())?;
    let shutdown = CancellationToken::new();
    let (reloads, reloaded) = mpsc::unbounded_channel();
    tokio::spawn(handle_signals(signals, shutdown.clone(), args, reloads));
    crate::run(config, listener, shutdown, reloaded)
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
