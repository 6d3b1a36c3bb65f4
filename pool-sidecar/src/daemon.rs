//! Running the daemon: [`run`] takes already-bound listeners (so tests and socket activation can
//! pass their own), starts the registry, the probes of external engines, the supervisors of
//! managed ones (adopting engines a previous run left behind), the socket server and the debug
//! shim; applies reloaded configurations to the pools (see [`PoolSet`]); and shuts everything
//! down in order when `shutdown` fires: stop accepting, close connections (their leases come
//! back), stop engines, wait for every task within the grace period.

use crate::config::{Config, EngineSource, PoolConfig};
use crate::debug_http::{self, DebugState};
use crate::gpu::GpuProbe;
use crate::ipc::server::{self, EngineControls, IpcContext};
use crate::metrics::Metrics;
use crate::probe;
use crate::registry::{LeasePolicy, LeaseSigner, RegistryHandle, spawn_registry};
use crate::supervisor::log::{DEFAULT_LOG_CAP_BYTES, follow_log};
use crate::supervisor::{AdminCommand, EnginePaths, EngineSupervisor};
use daemon_support::systemd::{self, NotifyState};
use pool_ipc::registry::PoolId;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a retired pool's supervisor may take to stop its engine once told to.
const RETIRE_STOP_WAIT: Duration = Duration::from_secs(60);

/// The pools being run: each one's stop token and, for engines pool-managerd runs, its
/// supervisor's command queue. Changed by reloads: new pools start, removed ones are drained and
/// stopped, changed ones are replaced (drained, then started anew); unchanged ones are untouched.
struct PoolSet {
    registry: RegistryHandle,
    paths: EnginePaths,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    engines: Arc<RwLock<EngineControls>>,
    running: HashMap<PoolId, RunningPool>,
    /// Pools being taken out, and the config to start in their place once they are gone.
    retiring: HashMap<PoolId, Option<PoolConfig>>,
    retired: mpsc::UnboundedSender<PoolId>,
}

struct RunningPool {
    config: PoolConfig,
    stop: CancellationToken,
    /// The pool's supervisor (managed engine) or prober (external one): awaited before the pool's
    /// registry entry is replaced, so nothing it reports lands on its successor.
    task: JoinHandle<()>,
}

fn write(engines: &RwLock<EngineControls>) -> std::sync::RwLockWriteGuard<'_, EngineControls> {
    // The map is consistent after every update, so a poisoned lock is still usable.
    engines
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PoolSet {
    async fn start(&mut self, pool: PoolConfig) {
        let stop = self.shutdown.child_token();
        let task = match &pool.source {
            EngineSource::External { endpoint } => self.tracker.spawn(probe::probe_pool(
                pool.clone(),
                endpoint.clone(),
                self.registry.clone(),
                stop.clone(),
            )),
            EngineSource::Managed(engine) => {
                let (commands, inbox) = mpsc::channel(8);
                write(&self.engines).insert(pool.id.clone(), commands);
                let mut supervisor = EngineSupervisor::new(
                    pool.clone(),
                    engine.clone(),
                    self.registry.clone(),
                    self.paths.clone(),
                    inbox,
                    stop.clone(),
                );
                // Adoption is decided before the socket is served, so re-asserted leases find
                // adopted engines Ready.
                let adopted = supervisor.adopt().await;
                self.tracker.spawn(follow_log(
                    self.paths.log(pool.id.as_str()),
                    pool.id.to_string(),
                    DEFAULT_LOG_CAP_BYTES,
                    stop.clone(),
                ));
                self.tracker.spawn(supervisor.run(adopted))
            }
        };
        self.running.insert(
            pool.id.clone(),
            RunningPool {
                config: pool,
                stop,
                task,
            },
        );
    }

    /// Takes a pool out: a managed engine is drained first (its leases end, or its reload drain
    /// deadline passes) and stopped, the pool showing Draining throughout; then `retired` hears
    /// it, and [`retired`](Self::retired) removes or replaces the registry entry in one step.
    fn retire(&mut self, id: &PoolId, replacement: Option<PoolConfig>) {
        let Some(pool) = self.running.remove(id) else {
            return;
        };
        self.retiring.insert(id.clone(), replacement);
        let commands = write(&self.engines).remove(id);
        let retired = self.retired.clone();
        let id = id.clone();
        let deadline = pool
            .config
            .managed()
            .map(|engine| engine.reload.drain_deadline())
            .unwrap_or_default();
        tracing::info!(pool = %id, "taking the pool out (reload)");
        self.tracker.spawn(async move {
            let drained = async {
                let Some(commands) = commands else {
                    return;
                };
                let (reply, answer) = oneshot::channel();
                let (done, stopped) = oneshot::channel();
                let command = AdminCommand::Drain {
                    deadline,
                    reply,
                    retiring: Some(done),
                };
                // A supervisor busy with an operator's command refuses: it is stopped below.
                if commands.send(command).await.is_ok() && matches!(answer.await, Ok(Ok(()))) {
                    let grace = deadline + Duration::from_secs(30);
                    if tokio::time::timeout(grace, stopped).await.is_err() {
                        tracing::warn!(pool = %id, "drain did not finish in time; stopping anyway");
                    }
                }
            };
            // A daemon shutting down stops the pool at once (its supervisor stops the engine).
            tokio::select! {
                () = drained => {}
                () = pool.stop.cancelled() => {}
            }
            pool.stop.cancel();
            if tokio::time::timeout(RETIRE_STOP_WAIT, pool.task)
                .await
                .is_err()
            {
                tracing::warn!(pool = %id, "the pool's supervisor did not stop in time");
            }
            let _ = retired.send(id);
        });
    }

    /// A retired pool is gone: the registry forgets it, or shows its replacement (Starting) in
    /// the same step, so clients never see the pool absent or stopped in between; then the
    /// replacement starts.
    async fn retired(&mut self, id: &PoolId) {
        match self.retiring.remove(id) {
            Some(Some(replacement)) => {
                self.registry.replace_pool(replacement.clone());
                self.start(replacement).await;
            }
            _ => self.registry.remove_pool(id.clone()),
        }
    }

    async fn apply(&mut self, config: &Config) {
        let wanted: HashMap<&PoolId, &PoolConfig> =
            config.pools.iter().map(|pool| (&pool.id, pool)).collect();
        let running: Vec<PoolId> = self.running.keys().cloned().collect();
        for id in running {
            match wanted.get(&id) {
                None => self.retire(&id, None),
                Some(new)
                    if self
                        .running
                        .get(&id)
                        .is_some_and(|pool| pool.config != **new) =>
                {
                    self.retire(&id, Some((*new).clone()));
                }
                Some(_) => {}
            }
        }
        for (id, new) in wanted {
            if let Some(replacement) = self.retiring.get_mut(id) {
                // Back (or changed again) while its predecessor is still on its way out.
                *replacement = Some(new.clone());
            } else if !self.running.contains_key(id) {
                tracing::info!(pool = %id, "adding the pool (reload)");
                self.registry.add_pool(new.clone());
                self.start(new.clone()).await;
            }
        }
    }
}

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
    mut reloads: mpsc::UnboundedReceiver<Result<Config, String>>,
    on_ready: impl FnOnce(),
) {
    let metrics = Arc::new(Metrics::new());
    let lease_policy = lease_policy(&config, &paths);
    let (registry, registry_task) =
        spawn_registry(&config.pools, lease_policy, Arc::clone(&metrics));
    let registry_task = tokio::spawn(systemd::core_task("the registry", registry_task));
    let tracker = TaskTracker::new();
    let engines = Arc::new(RwLock::new(EngineControls::new()));
    let (retired_tx, mut retired) = mpsc::unbounded_channel();
    let mut pools = PoolSet {
        registry: registry.clone(),
        paths,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        engines: Arc::clone(&engines),
        running: HashMap::new(),
        retiring: HashMap::new(),
        retired: retired_tx,
    };
    let external: Vec<PoolId> = config
        .pools
        .iter()
        .filter(|pool| pool.managed().is_none())
        .map(|pool| pool.id.clone())
        .collect();
    for pool in &config.pools {
        pools.start(pool.clone()).await;
    }
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

    let model_dirs = Arc::new(config.server.model_dirs.clone());
    if let Some(listener) = listeners.debug_http {
        let state = DebugState {
            gpus: Arc::clone(&gpus),
            engines: Arc::clone(&engines),
            registry: registry.clone(),
            metrics: Arc::clone(&metrics),
            token: config.debug_http.token.as_deref().map(Arc::from),
            model_dirs: Arc::clone(&model_dirs),
        };
        let stop = shutdown.clone();
        let limits = config.debug_http.limits;
        tracker.spawn(debug_http::serve(listener, state, limits, stop));
    }
    let context = Arc::new(IpcContext {
        gpus,
        engines: Arc::clone(&engines),
        registry: registry.clone(),
        access: config.server.access.clone(),
        max_frame_bytes: config.server.max_frame_bytes,
        lease_ttl_ms: config.server.lease_ttl_ms.unwrap_or(0),
        max_leased_slots_per_uid: config.server.max_leased_slots_per_uid,
        metrics,
        model_dirs,
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

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(reread) = reloads.recv() => {
                match reread {
                    Ok(new) => {
                        if new.server.access != config.server.access
                            || new.server.max_frame_bytes != config.server.max_frame_bytes
                            || new.debug_http.listen != config.debug_http.listen
                        {
                            tracing::warn!("server and debug_http settings apply at the next restart; pools apply now");
                        }
                        pools.apply(&new).await;
                        systemd::notify(&[NotifyState::Ready, NotifyState::Status("configuration reloaded")]);
                    }
                    Err(error) => {
                        tracing::error!(%error, "reload refused: the new configuration is not valid; nothing changed");
                        systemd::notify(&[NotifyState::Ready, NotifyState::Status("reload failed: configuration not valid; nothing changed")]);
                    }
                }
            }
            Some(id) = retired.recv() => pools.retired(&id).await,
        }
    }
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
    drop(pools);
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
