//! Running orchestratord: [`run`] takes a validated configuration and an already-bound listener
//! (so tests and systemd socket activation pass their own), connects to pool-managerd in the
//! background (it may start later), starts the scheduler, serves HTTP, applies reloaded
//! configurations, exports requests' spans when `otlp_endpoint` is set, and shuts down in phases
//! when `shutdown` fires: not ready, no new connections, running requests finish within
//! [`SHUTDOWN_GRACE`], then whatever still runs is cut off (its engine streams end, its leases
//! return), and the spans still queued are exported.

use crate::adapters::EngineClients;
use crate::app::{AppState, router};
use crate::config::{Config, LiveConfig};
use crate::drain::HostDrain;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use crate::sessions::SessionStore;
use crate::tenants::Tenants;
use daemon_support::http_server;
use daemon_support::systemd::{self, NotifyState};
use daemon_support::trace_export::{TraceExport, TraceExportError};
use pool_ipc::client::{ClientConfig, PoolClient};
use pool_ipc::socket_path::resolve_socket_path;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long running requests may take to finish after SIGTERM (keep below systemd's
/// TimeoutStopSec).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("pool-managerd's socket: {0}")]
    Socket(String),
    #[error("cannot read the bound address: {0}")]
    Address(std::io::Error),
    #[error(
        "refusing to serve on {0} (not a loopback address) without API keys: set api_keys_file"
    )]
    OpenToTheNetwork(std::net::SocketAddr),
    #[error("otlp_endpoint: {0}")]
    TraceExport(#[from] TraceExportError),
}

/// Serves until `shutdown` is cancelled; each configuration received on `reloads` replaces the
/// live one (keys, open paths, limits, deadlines and timeouts apply at once; the listener, the
/// socket and session limits at the next start). Prints `READY listen=<addr>` and tells systemd
/// once it serves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    mut reloads: mpsc::UnboundedReceiver<Config>,
) -> Result<(), DaemonError> {
    let socket = resolve_socket_path(config.socket.clone())
        .map_err(|error| DaemonError::Socket(error.to_string()))?;
    let local = listener.local_addr().map_err(DaemonError::Address)?;
    // Judged on the socket really served: one systemd handed over is not in the config.
    if !local.ip().is_loopback() && config.api_keys.is_empty() {
        return Err(DaemonError::OpenToTheNetwork(local));
    }
    let (export, tracer) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let (export, tracer) = TraceExport::start(endpoint, "orchestratord")?;
            (Some(export), Some(tracer))
        }
        None => (None, None),
    };
    let cut_off = CancellationToken::new();
    let pools = PoolClient::start(ClientConfig::new(&socket, "orchestratord"));
    let mirror = pools.follow();
    let metrics = Arc::new(Metrics::new());
    let host = Arc::new(HostDrain::default());
    let tenants = Arc::new(Tenants::new(&config.api_keys));
    let scheduler = Scheduler::start(
        pools.clone(),
        mirror.clone(),
        config.admission.clone(),
        Arc::clone(&metrics),
        &config.sessions,
    );
    let sessions = Arc::new(SessionStore::new(config.sessions.clone()));
    let live = Arc::new(LiveConfig::new(config));
    let state = AppState {
        config: Arc::clone(&live),
        pools,
        mirror,
        scheduler: scheduler.clone(),
        engines: Arc::new(EngineClients::new(cut_off.clone())),
        metrics,
        tasks: Arc::default(),
        sessions,
        models_seen: Arc::default(),
        host: Arc::clone(&host),
        tenants: Arc::clone(&tenants),
        tracer,
    };
    tokio::spawn(async move {
        while let Some(new) = reloads.recv().await {
            apply_reload(&live, &scheduler, &tenants, new, local);
        }
    });
    tracing::info!(%local, socket = %socket.display(), "orchestratord listening");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "READY listen={local}");
    let _ = stdout.flush();
    systemd::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let watched = state.scheduler.clone();
    tokio::spawn(systemd::keep_watchdog_fed(cut_off.clone(), move || {
        let scheduler = watched.clone();
        async move { scheduler.ping().await }
    }));

    let limits = state.config.get().http;
    let phased = async move {
        shutdown.cancelled().await;
        systemd::notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: letting running requests finish"),
        ]);
        host.shut_down();
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::warn!("shutdown grace period over; cutting off running requests");
            cut_off.cancel();
        });
    };
    http_server::serve(listener, router(state), limits, phased).await;
    if let Some(export) = export {
        export.shutdown().await;
    }
    Ok(())
}

fn apply_reload(
    live: &LiveConfig,
    scheduler: &Scheduler,
    tenants: &Tenants,
    new: Config,
    local: SocketAddr,
) {
    if !local.ip().is_loopback() && new.api_keys.is_empty() {
        tracing::error!(%local, "reload refused: it removes every API key while serving a non-loopback address; nothing changed");
        systemd::notify(&[
            NotifyState::Ready,
            NotifyState::Status(
                "reload refused: no API keys on a public listener; nothing changed",
            ),
        ]);
        return;
    }
    let old = live.get();
    if new.listen != old.listen
        || new.socket != old.socket
        || new.sessions != old.sessions
        || new.http != old.http
        || new.otlp_endpoint != old.otlp_endpoint
    {
        tracing::warn!(
            "listen, socket, otlp_endpoint, [sessions] and [http] connection limits apply at the next restart"
        );
    }
    scheduler.reconfigure(new.admission.clone());
    tenants.apply(&new.api_keys);
    live.replace(new);
    tracing::info!("configuration reloaded");
    systemd::notify(&[
        NotifyState::Ready,
        NotifyState::Status("configuration reloaded"),
    ]);
}
