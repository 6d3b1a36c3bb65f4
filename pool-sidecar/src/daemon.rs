//! Running the daemon: [`run`] takes already-bound listeners (so tests and socket activation can
//! pass their own), starts the registry, the probes of external engines, the supervisors of
//! managed ones (adopting engines a previous run left behind), the socket server and the debug
//! shim, and shuts them down in order when `shutdown` fires: stop accepting, close connections
//! (their leases come back), stop engines, wait for every task within the grace period.

use crate::config::{Config, EngineSource};
use crate::debug_http::{self, DebugState};
use crate::gpu::GpuProbe;
use crate::ipc::server::{self, IpcContext};
use crate::metrics::Metrics;
use crate::probe;
use crate::registry::spawn_registry;
use crate::supervisor::log::{DEFAULT_LOG_CAP_BYTES, follow_log};
use crate::supervisor::{EnginePaths, EngineSupervisor};
use pool_ipc::systemd::{self, NotifyState};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Keeps systemd's STATUS= line saying how many pools are ready, as it changes.
async fn report_status(
    mut snapshots: tokio::sync::watch::Receiver<Arc<pool_ipc::registry::RegistrySnapshot>>,
    shutdown: CancellationToken,
) {
    let mut last = String::new();
    loop {
        let status = {
            let snapshot = snapshots.borrow_and_update();
            let ready = snapshot
                .pools
                .iter()
                .filter(|pool| pool.state == pool_ipc::registry::PoolState::Ready)
                .count();
            format!("{ready}/{} pools ready", snapshot.pools.len())
        };
        if status != last {
            systemd::notify(&[NotifyState::Status(&status)]);
            last = status;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
        }
    }
}

pub struct Listeners {
    pub ipc: UnixListener,
    pub debug_http: Option<TcpListener>,
}

/// Runs until `shutdown` is cancelled. `on_ready` is called once every pool has been probed
/// once (or the first probes timed out) and the socket is being served.
pub async fn run(
    config: Config,
    listeners: Listeners,
    paths: EnginePaths,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(),
) {
    let metrics = Arc::new(Metrics::new());
    // Lease ids of this incarnation start at a random point, far from the last one's.
    let lease_id_base = u64::from(rand::random::<u32>()) << 32;
    let (registry, registry_task) =
        spawn_registry(&config.pools, lease_id_base, Arc::clone(&metrics));
    let tracker = TaskTracker::new();
    let mut engines = HashMap::new();
    let mut external = Vec::new();
    for pool in &config.pools {
        match &pool.source {
            EngineSource::External { endpoint } => {
                external.push(pool.id.clone());
                tracker.spawn(probe::probe_pool(
                    pool.clone(),
                    endpoint.clone(),
                    registry.clone(),
                    shutdown.clone(),
                ));
            }
            EngineSource::Managed(engine) => {
                let (commands, inbox) = mpsc::channel(8);
                engines.insert(pool.id.clone(), commands);
                let mut supervisor = EngineSupervisor::new(
                    pool.clone(),
                    engine.clone(),
                    registry.clone(),
                    paths.clone(),
                    inbox,
                    shutdown.clone(),
                );
                // Adoption is decided before the socket is served, so re-asserted leases find
                // adopted engines Ready.
                let adopted = supervisor.adopt().await;
                tracker.spawn(supervisor.run(adopted));
                tracker.spawn(follow_log(
                    paths.log(pool.id.as_str()),
                    pool.id.to_string(),
                    DEFAULT_LOG_CAP_BYTES,
                    shutdown.clone(),
                ));
            }
        }
    }

    let engines = Arc::new(engines);
    let gpus = Arc::new(GpuProbe::default());

    // Answer the first client with known states of external engines rather than "starting".
    let first_probe_window = config
        .pools
        .iter()
        .map(|pool| pool.probe.timeout())
        .max()
        .unwrap_or_default()
        + Duration::from_millis(500);
    let mut snapshots = registry.watch_snapshot();
    let first_probes = snapshots.wait_for(|snapshot| {
        snapshot
            .pools
            .iter()
            .filter(|pool| external.contains(&pool.pool_id))
            .all(|pool| pool.last_probe_unix_ms.is_some())
    });
    if tokio::time::timeout(first_probe_window, first_probes)
        .await
        .is_err()
    {
        tracing::warn!("not every pool answered its first probe in time; serving anyway");
    }

    if let Some(listener) = listeners.debug_http {
        let state = DebugState {
            gpus: Arc::clone(&gpus),
            engines: Arc::clone(&engines),
            registry: registry.clone(),
            metrics: Arc::clone(&metrics),
            token: config.debug_http.token.as_deref().map(Arc::from),
        };
        let stop = shutdown.clone();
        tracker.spawn(async move {
            if let Err(error) = debug_http::serve(listener, state, stop).await {
                tracing::error!(%error, "debug HTTP shim failed");
            }
        });
    }
    let context = Arc::new(IpcContext {
        gpus,
        engines: Arc::clone(&engines),
        registry: registry.clone(),
        access: config.server.access.clone(),
        max_frame_bytes: config.server.max_frame_bytes,
        metrics,
    });
    tracker.spawn(server::serve(
        listeners.ipc,
        context,
        shutdown.clone(),
        tracker.clone(),
    ));
    let ready = config
        .pools
        .iter()
        .filter(|pool| {
            registry
                .snapshot()
                .pool(&pool.id)
                .is_some_and(|status| status.is_dispatchable())
        })
        .count();
    tracing::info!(
        pools = config.pools.len(),
        ready,
        "pool-managerd is serving"
    );
    on_ready();
    tracker.spawn(report_status(registry.watch_snapshot(), shutdown.clone()));
    tracker.spawn(systemd::keep_watchdog_fed(shutdown.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    systemd::notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining connections and stopping engines"),
    ]);
    tracker.close();
    // Supervisors stop their engines: give them each engine's grace period and then some.
    let grace = config
        .pools
        .iter()
        .filter_map(|pool| pool.managed().map(|engine| engine.stop_grace()))
        .max()
        .unwrap_or_default()
        + SHUTDOWN_GRACE;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("some tasks did not finish within the shutdown grace period");
    }
    drop(registry);
    // A task stuck past the grace period may still hold a handle: do not wait for it forever.
    if tokio::time::timeout(SHUTDOWN_GRACE, registry_task)
        .await
        .is_err()
    {
        tracing::warn!("the registry did not stop in time");
    }
    tracing::info!("stopped");
}
