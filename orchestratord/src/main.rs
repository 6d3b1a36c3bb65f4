//! `orchestratord`: parses flags, loads and validates its config (refusing a public listener
//! without API keys), binds, connects to pool-managerd in the background (it may start later),
//! and serves until SIGTERM/SIGINT.

use clap::Parser;
use orchestratord::adapters::EngineClients;
use orchestratord::app::{AppState, router};
use orchestratord::config::{Config, LiveConfig, RawConfig};
use orchestratord::metrics::Metrics;
use orchestratord::scheduler::Scheduler;
use orchestratord::sessions::SessionStore;
use pool_ipc::client::{ClientConfig, PoolClient};
use pool_ipc::socket_path::resolve_socket_path;
use pool_ipc::systemd::{self, DaemonSignal, InheritedSockets, NotifyState, StopSignals};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long running requests may take to finish after SIGTERM (keep below systemd's
/// TimeoutStopSec).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

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
    match runtime.block_on(run(args, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("orchestratord: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args, mut inherited: InheritedSockets) -> Result<(), String> {
    let signals = StopSignals::install()
        .map_err(|error| format!("cannot install signal handlers: {error}"))?;
    let config = load_config(&args)?;
    let socket = resolve_socket_path(config.socket.clone()).map_err(|error| error.to_string())?;
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
    let local = listener
        .local_addr()
        .map_err(|error| format!("cannot read the bound address: {error}"))?;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let pools = PoolClient::start(ClientConfig::new(&socket, "orchestratord"));
    let mirror = pools.follow();
    let metrics = Arc::new(Metrics::new());
    let draining = Arc::new(AtomicBool::new(false));
    let sessions = config.sessions.clone();
    let scheduler = Scheduler::start(
        pools.clone(),
        mirror.clone(),
        config.admission.clone(),
        Arc::clone(&metrics),
    );
    let live = Arc::new(LiveConfig::new(config));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(handle_signals(
        signals,
        stop.clone(),
        args.clone(),
        Arc::clone(&live),
        scheduler.clone(),
    ));
    let state = AppState {
        config: live,
        pools,
        mirror,
        scheduler,
        engines: Arc::new(EngineClients::new(shutdown.clone())),
        metrics,
        tasks: Arc::default(),
        sessions: Arc::new(SessionStore::new(sessions)),
        draining: Arc::clone(&draining),
    };
    tracing::info!(%local, socket = %socket.display(), "orchestratord listening");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "READY listen={local}");
    let _ = stdout.flush();
    systemd::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    tokio::spawn(systemd::keep_watchdog_fed(shutdown.clone()));

    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            systemd::notify(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: letting running requests finish"),
            ]);
            // Phased: not ready, no new connections, running requests finish; whatever still
            // runs after the grace period is cut off (its engine streams end, leases return).
            draining.store(true, Ordering::Relaxed);
            tokio::spawn(async move {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
                tracing::warn!("shutdown grace period over; cutting off running requests");
                shutdown.cancel();
            });
        })
        .await
        .map_err(|error| format!("server failed: {error}"))
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

/// SIGTERM/SIGINT stop the server (`stop`); SIGHUP rereads the configuration: API keys, open
/// paths, queue limits, deadlines and streaming timeouts apply at once; the listener, the
/// pool-managerd socket, the body limit and session limits wait for a restart.
async fn handle_signals(
    mut signals: StopSignals,
    stop: tokio_util::sync::CancellationToken,
    args: Args,
    live: Arc<LiveConfig>,
    scheduler: Scheduler,
) {
    while signals.next().await == DaemonSignal::Reload {
        systemd::notify_reloading();
        match load_config(&args) {
            Ok(new) => {
                let old = live.get();
                if new.listen != old.listen
                    || new.socket != old.socket
                    || new.max_body_bytes != old.max_body_bytes
                    || new.sessions != old.sessions
                {
                    tracing::warn!(
                        "listen, socket, max_body_bytes and [sessions] apply at the next restart"
                    );
                }
                scheduler.reconfigure(new.admission.clone());
                live.replace(new);
                tracing::info!("configuration reloaded");
                systemd::notify(&[
                    NotifyState::Ready,
                    NotifyState::Status("configuration reloaded"),
                ]);
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
    stop.cancel();
}
