//! Running the daemon: [`run`] takes already-bound listeners (so tests and socket activation can
//! pass their own), starts the registry, the pools controller (which starts the probes of
//! external engines and the supervisors of managed ones, adopting engines a previous run left
//! behind, and applies reloaded configurations: see `pools`), the socket server and the debug
//! shim, exporting spans when `server.otlp_endpoint` is set; and shuts everything down in order
//! when `shutdown` fires: stop accepting, close connections (their leases come back), stop
//! engines, wait for every task within the grace period, export the spans still queued.

use crate::config::Config;
use crate::debug_http::{self, DebugState};
use crate::gpu::GpuProbe;
use crate::ipc::server::{self, IpcContext};
use crate::metrics::Metrics;
use crate::pools::{self, PoolsContext};
use crate::registry::{LeasePolicy, LeaseSigner, spawn_registry};
use crate::residency;
use crate::status_page::OrchestratorFeed;
use crate::supervisor::EnginePaths;
use daemon_support::systemd::{self, NotifyState};
use daemon_support::trace_export::TraceExport;
use pool_ipc::registry::PoolId;
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

/// The lease rules of this run: ids from a random point far from the last run's, secrets signed
/// with the key kept in the state directory (a key of this run only if that fails), and the cap
/// and TTL from the config.
fn lease_policy(config: &Config, paths: &EnginePaths) -> LeasePolicy {
    let signer = LeaseSigner::load_or_create(&paths.state_dir).unwrap_or_else(|error| {
        tracing::warn!(%error, "using a lease key of this run only: clients cannot re-assert their leases after a restart");
        LeaseSigner::ephemeral()
    });
    let cap = config.server.max_leased_slots_per_uid;
    let configured: u64 = config
        .pools
        .iter()
        .filter_map(|pool| pool.slots)
        .map(u64::from)
        .sum();
    if configured > u64::from(cap) {
        tracing::warn!(
            configured_slots = configured,
            max_leased_slots_per_uid = cap,
            "the pools have more slots than one uid may lease: a single client (orchestratord) cannot use them all; raise server.max_leased_slots_per_uid"
        );
    }
    LeasePolicy {
        id_base: u64::from(rand::random::<u32>()) << 32,
        signer,
        ttl_ms: config.server.lease_ttl_ms,
        max_slots_per_uid: cap,
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
    reloads: mpsc::UnboundedReceiver<Result<Config, String>>,
    on_ready: impl FnOnce(),
) {
    let (export, tracer) = match &config.server.otlp_endpoint {
        Some(endpoint) => match TraceExport::start(endpoint, "pool-managerd") {
            Ok((export, tracer)) => (Some(export), Some(tracer)),
            Err(error) => {
                tracing::error!(%error, "no spans are exported");
                (None, None)
            }
        },
        None => (None, None),
    };
    let metrics = Arc::new(Metrics::new());
    let lease_policy = lease_policy(&config, &paths);
    let (registry, registry_task) =
        spawn_registry(&config.pools, lease_policy, Arc::clone(&metrics));
    let registry_task = tokio::spawn(systemd::core_task(
        crate::registry::CORE_TASK,
        registry_task,
    ));
    let tracker = TaskTracker::new();
    let external: Vec<PoolId> = config
        .pools
        .iter()
        .filter(|pool| pool.managed().is_none())
        .map(|pool| pool.id.clone())
        .collect();
    let gpus = Arc::new(GpuProbe::default());
    let log_dir = paths.log_dir.clone();
    let (pools, pools_task) = pools::start(
        PoolsContext {
            registry: registry.clone(),
            paths,
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            model_dirs: config.server.model_dirs.clone(),
            budgets: residency::budgets(&config.memory, &gpus),
            min_residency: config.memory.min_residency,
            metrics: Arc::clone(&metrics),
            gpus: Arc::clone(&gpus),
            tracer: tracer.clone(),
        },
        &config,
        reloads,
    )
    .await;
    let pools_task = tokio::spawn(systemd::core_task(pools::CORE_TASK, pools_task));

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
        let feed = config.debug_http.orchestrator_metrics.clone().map(|url| {
            let feed = Arc::new(OrchestratorFeed::new(url));
            tracker.spawn(Arc::clone(&feed).run(shutdown.clone()));
            feed
        });
        let state = DebugState {
            gpus: Arc::clone(&gpus),
            pools: pools.clone(),
            registry: registry.clone(),
            metrics: Arc::clone(&metrics),
            token: config.debug_http.token.as_deref().map(Arc::from),
            log_dir,
            feed,
            shutdown: shutdown.clone(),
        };
        let stop = shutdown.clone();
        let limits = config.debug_http.limits;
        tracker.spawn(debug_http::serve(listener, state, limits, stop));
    }
    let context = Arc::new(IpcContext {
        gpus,
        pools,
        registry: registry.clone(),
        access: config.server.access.clone(),
        max_frame_bytes: config.server.max_frame_bytes,
        lease_ttl_ms: config.server.lease_ttl_ms.unwrap_or(0),
        max_leased_slots_per_uid: config.server.max_leased_slots_per_uid,
        metrics,
        tracer,
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
    let watched = registry.clone();
    tracker.spawn(systemd::keep_watchdog_fed(shutdown.clone(), move || {
        let registry = watched.clone();
        async move { registry.ping().await }
    }));

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
    if tokio::time::timeout(SHUTDOWN_GRACE, pools_task)
        .await
        .is_err()
    {
        tracing::warn!("the pools controller did not stop in time");
    }
    drop(registry);
    // A task stuck past the grace period may still hold a handle: do not wait for it forever.
    if tokio::time::timeout(SHUTDOWN_GRACE, registry_task)
        .await
        .is_err()
    {
        tracing::warn!("the registry did not stop in time");
    }
    if let Some(export) = export {
        export.shutdown().await;
    }
    tracing::info!("stopped");
}
