//! The pools controller: the one task that owns which pools run and how they change. It starts
//! every configured pool (a prober for an external engine, a supervisor for a managed one, which
//! adopts what a previous run left), applies reloaded configurations (SIGHUP: new pools start,
//! removed ones are drained and stopped, changed ones are replaced, unchanged ones are untouched),
//! and carries operators' admin requests (drain, reload, restart, unload) and anyone's loads from
//! the socket and the debug shim to the supervisors, whose command queues only it holds. It
//! decides on-demand loads under the memory budgets (evicting idle pools, waiting for busy ones)
//! and keeps who asked for each load under way, so a load nobody waits for any more is given up
//! (`abandoned_load`). Everyone else talks to it through a [`PoolsHandle`].

use crate::config::{AbandonedLoad, Config, EngineSource, LoadPolicy, ModelDirs, PoolConfig};
use crate::eviction::{self, Budget, Device, Plan, Residency, Resident};
use crate::footprint::{self, FootprintStore};
use crate::gpu::{self, GpuProbe};
use crate::gpu_baselines::{BaselineReading, Baselines, GpuMeter};
use crate::metrics::Metrics;
use crate::probe;
use crate::registry::RegistryHandle;
use crate::residency;
use crate::supervisor::engine::supervisor_gone;
use crate::supervisor::log::{DEFAULT_LOG_CAP_BYTES, follow_log};
use crate::supervisor::{AdminCommand, EnginePaths, EngineSupervisor};
use daemon_support::systemd::{self, NotifyState};
use daemon_support::trace_export::Tracer;
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{
    DeviceMemory, MemoryReport, PoolFootprint, PoolId, PoolState, RegistrySnapshot,
};
use pool_ipc::wire::Request;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a retired pool's supervisor may take to stop its engine once told to.
/// The controller's name as a core task (its panic ends the process).
pub const CORE_TASK: &str = "the pools controller";

const RETIRE_STOP_WAIT: Duration = Duration::from_secs(60);

/// Commands a supervisor may have queued (loads and cancels of a flapping demand included)
/// before more are refused as busy.
const SUPERVISOR_QUEUE: usize = 64;

/// The longest drain deadline an operator may ask for.
const MAX_DRAIN_DEADLINE_MS: u64 = 24 * 60 * 60 * 1000;

/// What the controller is asked.
enum Message {
    /// An operator's drain, reload, restart or unload, or anyone's load or cancelled load;
    /// answered once the pool's supervisor has taken it on (or refused it).
    Admin {
        request: Request,
        from: Requester,
        reply: oneshot::Sender<Result<(), IpcError>>,
    },
    /// The devices' budgets and the managed pools' footprints.
    Memory {
        reply: oneshot::Sender<MemoryReport>,
    },
    /// A socket connection closed: the loads it asked for on behalf of its waiting requests are
    /// withdrawn.
    ConnectionClosed { connection: u64 },
}

/// Who asked for a load: a connection on behalf of its waiting requests (withdrawn by
/// `CancelLoad` or when the connection closes), or an operator (the CLI, the debug shim, a
/// `Load` without `for_waiting_requests`), whose load is always finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Requester {
    Operator,
    Connection(u64),
}

impl Requester {
    /// Who a request from socket connection `connection` is from.
    pub fn of(request: &Request, connection: u64) -> Requester {
        match request {
            Request::Load {
                for_waiting_requests: false,
                ..
            } => Requester::Operator,
            _ => Requester::Connection(connection),
        }
    }
}

/// How the socket server and the debug shim reach the controller.
#[derive(Debug, Clone)]
pub struct PoolsHandle {
    messages: mpsc::Sender<Message>,
}

impl PoolsHandle {
    /// Hands an admin request (drain, reload, restart, unload), a load or a cancelled load from
    /// `from` to the pool's supervisor and waits until it has taken it on.
    pub async fn admin(&self, request: Request, from: Requester) -> Result<(), IpcError> {
        match self.submit(request, from).await {
            Ok(answer) => answer.await.unwrap_or_else(|_| Err(stopping())),
            Err(error) => Err(error),
        }
    }

    /// Queues an admin request, a load or a cancelled load from `from` and returns where its
    /// answer will come. Requests submitted one after the other reach each pool's supervisor
    /// in that order (a load and its cancel must never cross).
    pub async fn submit(
        &self,
        request: Request,
        from: Requester,
    ) -> Result<oneshot::Receiver<Result<(), IpcError>>, IpcError> {
        let (reply, answer) = oneshot::channel();
        self.messages
            .send(Message::Admin {
                request,
                from,
                reply,
            })
            .await
            .map_err(|_| stopping())?;
        Ok(answer)
    }

    /// Socket connection `connection` closed; its loads for waiting requests are withdrawn.
    /// Never waits (called from a destructor): if the controller's queue is full, the loads it
    /// asked for are finished instead, and their idle time unloads them.
    pub fn connection_closed(&self, connection: u64) {
        if let Err(error) = self
            .messages
            .try_send(Message::ConnectionClosed { connection })
        {
            tracing::warn!(connection, %error, "could not withdraw the closed connection's loads");
        }
    }
}

impl PoolsHandle {
    /// Each device's memory budget and what its pools hold, and each managed pool's footprint.
    pub async fn memory(&self) -> Result<MemoryReport, IpcError> {
        let (reply, answer) = oneshot::channel();
        if self.messages.send(Message::Memory { reply }).await.is_err() {
            return Err(stopping());
        }
        answer.await.map_err(|_| stopping())
    }
}

fn stopping() -> IpcError {
    IpcError::new(ErrorCode::ShuttingDown, "pool-managerd is stopping")
}

/// What the controller needs to run pools.
pub struct PoolsContext {
    pub registry: RegistryHandle,
    pub paths: EnginePaths,
    /// Every pool's task lives here, so shutdown waits for them.
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Where `reload` may load models from (a server setting: fixed until a restart).
    pub model_dirs: ModelDirs,
    /// The devices' budgets for on-demand pools.
    pub budgets: Vec<Budget>,
    pub min_residency: Duration,
    pub metrics: Arc<Metrics>,
    /// NVML, for GPU pools' footprints.
    pub gpus: Arc<GpuProbe>,
    /// Makes the spans of probes and engine starts when spans are exported.
    pub tracer: Option<Tracer>,
}

/// A GPU pool's footprint measured off the controller's task (NVML blocks) once it was ready,
/// with the model it was measured with.
struct Measurement {
    pool: PoolId,
    model_path: String,
    bytes: u64,
}

/// Starts every pool of `config` (managed engines are adopted or started before this returns,
/// so re-asserted leases find adopted engines ready once the socket is served), then the
/// controller task, which applies `reloads` until shutdown.
pub async fn start(
    context: PoolsContext,
    config: &Config,
    reloads: mpsc::UnboundedReceiver<Result<Config, String>>,
) -> (PoolsHandle, JoinHandle<()>) {
    let (retired, retired_inbox) = mpsc::unbounded_channel();
    let (measurements, measured) = mpsc::unbounded_channel();
    let (baseline_readings, readings) = mpsc::unbounded_channel();
    let footprints = FootprintStore::load(&context.paths.state_dir);
    let snapshots = context.registry.watch_snapshot();
    let mut controller = Controller {
        context,
        running: HashMap::new(),
        retiring: HashMap::new(),
        retired,
        measurements,
        baseline_readings,
        config: config.clone(),
        memory: Memory {
            footprints,
            estimates: HashMap::new(),
            usage: HashMap::new(),
            waiting: Vec::new(),
            unloading: HashSet::new(),
            wake: None,
            demand: HashMap::new(),
            baselines: Baselines::default(),
            sent_loads: HashSet::new(),
        },
    };
    for pool in &config.pools {
        controller.start(pool.clone()).await;
    }
    let (messages, inbox) = mpsc::channel(64);
    let task = tokio::spawn(controller.run(
        inbox,
        reloads,
        retired_inbox,
        (measured, readings),
        snapshots,
    ));
    (PoolsHandle { messages }, task)
}

struct Controller {
    context: PoolsContext,
    running: HashMap<PoolId, RunningPool>,
    /// Pools being taken out, and the config to start in their place once they are gone.
    retiring: HashMap<PoolId, Option<PoolConfig>>,
    retired: mpsc::UnboundedSender<PoolId>,
    measurements: mpsc::UnboundedSender<Measurement>,
    /// Where GPU pools' supervisors send the device readings taken before a load.
    baseline_readings: mpsc::UnboundedSender<BaselineReading>,
    /// The configuration last applied (server settings are those of the start).
    config: Config,
    memory: Memory,
}

/// What the controller keeps to decide loads under the memory budgets (see `eviction`).
struct Memory {
    footprints: FootprintStore,
    /// Footprints worked out per pool and model file (`None`: unknown), so a model's header is
    /// read once.
    estimates: HashMap<PoolId, (String, Option<u64>)>,
    usage: HashMap<PoolId, Usage>,
    /// On-demand pools asked to load that wait for room.
    waiting: Vec<PoolId>,
    /// Pools told to unload to make room, until they are unloaded.
    unloading: HashSet<PoolId>,
    /// When a residency guard a waiting load depends on expires.
    wake: Option<tokio::time::Instant>,
    /// Who asked for each on-demand load not yet done (waiting for room, loading, or backing
    /// off after a failed start); forgotten once the pool serves, stops or is given up.
    demand: HashMap<PoolId, HashSet<Requester>>,
    /// GPU loads under way, for footprints measured by the device's growth.
    baselines: Baselines,
    /// Loads sent to Unloaded pools whose supervisors have not reported them Loading yet.
    sent_loads: HashSet<PoolId>,
}

/// When a loaded pool was loaded and last used.
#[derive(Debug, Clone, Copy)]
struct Usage {
    loaded_at: Instant,
    last_used: Instant,
}

struct RunningPool {
    config: PoolConfig,
    stop: CancellationToken,
    /// The supervisor's command queue; `None` for an external engine's prober.
    commands: Option<mpsc::Sender<AdminCommand>>,
    /// The pool's supervisor (managed engine) or prober (external one): awaited before the pool's
    /// registry entry is replaced, so nothing it reports lands on its successor.
    task: JoinHandle<()>,
}

impl Controller {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Message>,
        mut reloads: mpsc::UnboundedReceiver<Result<Config, String>>,
        mut retired: mpsc::UnboundedReceiver<PoolId>,
        (mut measured, mut readings): (
            mpsc::UnboundedReceiver<Measurement>,
            mpsc::UnboundedReceiver<BaselineReading>,
        ),
        mut snapshots: tokio::sync::watch::Receiver<Arc<RegistrySnapshot>>,
    ) {
        daemon_support::systemd::injected_fault(CORE_TASK).await;
        let shutdown = self.context.shutdown.clone();
        loop {
            let wake = self.memory.wake;
            let woken = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Shutdown first: a message that arrives after it is answered "stopping" (by
                // the dropped inbox), never carried out.
                biased;
                () = shutdown.cancelled() => return,
                Some(message) = inbox.recv() => match message {
                    Message::Admin { request, from, reply } => self.admin(request, from, reply),
                    Message::Memory { reply } => {
                        let _ = reply.send(self.memory_report());
                    }
                    Message::ConnectionClosed { connection } => {
                        self.withdraw_everywhere(Requester::Connection(connection));
                    }
                },
                Some(reread) = reloads.recv() => self.reload(reread).await,
                Some(id) = retired.recv() => self.retired(&id).await,
                Some(measurement) = measured.recv() => {
                    self.remember(&measurement.pool, measurement.model_path, measurement.bytes)
                        .await;
                }
                Some(reading) = readings.recv() => {
                    self.memory.baselines.read(&reading.pool, reading.used);
                }
                changed = snapshots.changed() => {
                    if changed.is_ok() {
                        let snapshot = Arc::clone(&snapshots.borrow_and_update());
                        self.observe(&snapshot);
                        self.plan_waiting(&snapshot);
                    }
                }
                () = woken => {
                    self.memory.wake = None;
                    let snapshot = self.context.registry.snapshot();
                    self.plan_waiting(&snapshot);
                }
            }
        }
    }

    async fn reload(&mut self, reread: Result<Config, String>) {
        match reread {
            Ok(new) => {
                if new.server.access != self.config.server.access
                    || new.server.max_frame_bytes != self.config.server.max_frame_bytes
                    || new.server.otlp_endpoint != self.config.server.otlp_endpoint
                    || new.debug_http.listen != self.config.debug_http.listen
                {
                    tracing::warn!(
                        "server and debug_http settings apply at the next restart; pools apply now"
                    );
                }
                self.apply(&new).await;
                systemd::notify(&[
                    NotifyState::Ready,
                    NotifyState::Status("configuration reloaded"),
                ]);
            }
            Err(error) => {
                tracing::error!(%error, "reload refused: the new configuration is not valid; nothing changed");
                systemd::notify(&[
                    NotifyState::Ready,
                    NotifyState::Status("reload failed: configuration not valid; nothing changed"),
                ]);
            }
        }
    }

    /// Checks an admin request and hands it to the pool's supervisor, in the order requests
    /// came; the supervisor's answer goes to `reply` from a task of its own, so a busy
    /// supervisor never holds up the controller.
    fn admin(
        &mut self,
        request: Request,
        from: Requester,
        reply: oneshot::Sender<Result<(), IpcError>>,
    ) {
        if let Request::CancelLoad { pool } = &request {
            let _ = reply.send(self.cancel_load(pool, from));
            return;
        }
        if let Request::Load { pool, .. } = &request {
            if self.running.contains_key(pool) {
                self.memory
                    .demand
                    .entry(pool.clone())
                    .or_default()
                    .insert(from);
            }
            match self.make_room(pool, false) {
                Ok(true) => {}
                Ok(false) => {
                    let _ = reply.send(Ok(()));
                    return;
                }
                Err(error) => {
                    self.memory.demand.remove(pool);
                    let _ = reply.send(Err(error));
                    return;
                }
            }
        }
        if let Request::Load { pool, .. } = &request {
            self.begin_load(pool);
        }
        let (pool, command) = match self.command_for(request) {
            Ok(planned) => planned,
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        };
        let commands = match self.running.get(&pool) {
            Some(RunningPool {
                commands: Some(commands),
                ..
            }) => commands.clone(),
            Some(RunningPool { commands: None, .. }) => {
                let _ = reply.send(Err(IpcError::new(
                    ErrorCode::Unsupported,
                    format!(
                        "pool {:?} runs an external engine; pool-managerd can only drain, reload, restart, load or unload engines it runs",
                        pool.as_str()
                    ),
                )));
                return;
            }
            None => {
                let _ = reply.send(Err(if self.retiring.contains_key(&pool) {
                    IpcError::new(
                        ErrorCode::Draining,
                        format!(
                            "pool {:?} is being taken out by a configuration reload",
                            pool.as_str()
                        ),
                    )
                } else {
                    IpcError::new(
                        ErrorCode::NotFound,
                        format!("unknown pool {:?}", pool.as_str()),
                    )
                }));
                return;
            }
        };
        let (taken, answer) = oneshot::channel();
        if let Err(error) = send_command(&commands, &pool, command(taken)) {
            self.memory.sent_loads.remove(&pool);
            let _ = reply.send(Err(error));
            return;
        }
        tokio::spawn(async move {
            let result = answer
                .await
                .unwrap_or_else(|_| Err(supervisor_gone(pool.as_str())));
            let _ = reply.send(result);
        });
    }

    /// The pool an admin request is about and the supervisor command it becomes, or why it is
    /// refused as it stands.
    #[expect(
        clippy::type_complexity,
        reason = "a command waiting for its reply channel"
    )]
    fn command_for(
        &self,
        request: Request,
    ) -> Result<
        (
            PoolId,
            Box<dyn FnOnce(oneshot::Sender<Result<(), IpcError>>) -> AdminCommand + Send>,
        ),
        IpcError,
    > {
        match request {
            Request::Drain { deadline_ms, .. } if deadline_ms > MAX_DRAIN_DEADLINE_MS => {
                Err(IpcError::new(
                    ErrorCode::BadRequest,
                    format!("drain deadline_ms must be at most {MAX_DRAIN_DEADLINE_MS}"),
                ))
            }
            Request::Drain { pool, deadline_ms } => Ok((
                pool,
                Box::new(move |reply| AdminCommand::Drain {
                    deadline: Duration::from_millis(deadline_ms),
                    reply,
                    retiring: None,
                }),
            )),
            Request::Reload { model, .. } if model.trim().is_empty() => Err(IpcError::new(
                ErrorCode::BadRequest,
                "reload needs a model path",
            )),
            Request::Reload { pool, model } => {
                // Only a file inside the configured model directories, by its resolved path.
                let model_path = self
                    .context
                    .model_dirs
                    .admit(&model)
                    .map_err(|message| IpcError::new(ErrorCode::BadRequest, message))?
                    .display()
                    .to_string();
                Ok((
                    pool,
                    Box::new(move |reply| AdminCommand::Reload { model_path, reply }),
                ))
            }
            Request::Restart { pool } => {
                Ok((pool, Box::new(|reply| AdminCommand::Restart { reply })))
            }
            Request::Load { pool, .. } => {
                Ok((pool, Box::new(|reply| AdminCommand::Load { reply })))
            }
            Request::Unload { pool } => {
                Ok((pool, Box::new(|reply| AdminCommand::Unload { reply })))
            }
            other => Err(IpcError::new(
                ErrorCode::BadRequest,
                format!("{} is not an admin request", other.name()),
            )),
        }
    }

    /// Whether an on-demand pool asked to load can be loaded now (`Ok(true)`); otherwise the
    /// pools that must make room are told to unload and the load waits for them (`Ok(false)`),
    /// or it can never fit in its device's budget. `waited`: the load was already waiting (planned again after a change), so an unchanged
    /// wait is not logged again.
    fn make_room(&mut self, pool: &PoolId, waited: bool) -> Result<bool, IpcError> {
        let on_demand = self
            .running
            .get(pool)
            .is_some_and(|running| matches!(running.config.load, LoadPolicy::OnDemand { .. }));
        if !on_demand || self.footprint(pool).is_none() {
            return Ok(true);
        }
        let snapshot = self.context.registry.snapshot();
        let plan = eviction::plan(
            &self.residents(&snapshot),
            &self.context.budgets,
            pool,
            Instant::now(),
            self.context.min_residency,
        );
        match plan {
            Plan::Resident | Plan::Unknown => Ok(true),
            Plan::Load { evict } if evict.is_empty() => Ok(true),
            Plan::Load { evict } => {
                tracing::info!(%pool, ?evict, "evicting idle pools to make room");
                self.context.metrics.evictions.inc_by(evict.len() as u64);
                self.unload(&evict);
                self.wait_for_room(pool);
                Ok(false)
            }
            Plan::Wait { draining, until } => {
                let new = draining
                    .iter()
                    .filter(|pool| !self.memory.unloading.contains(*pool))
                    .count();
                if !waited || new > 0 {
                    tracing::info!(%pool, ?draining, "the load waits for room");
                }
                self.context.metrics.evictions.inc_by(new as u64);
                self.unload(&draining);
                if let Some(until) = until {
                    let at = tokio::time::Instant::from_std(until);
                    self.memory.wake = Some(self.memory.wake.map_or(at, |wake| wake.min(at)));
                }
                self.wait_for_room(pool);
                Ok(false)
            }
            Plan::NeverFits {
                footprint,
                budget,
                pinned,
            } => Err(IpcError::new(
                ErrorCode::NoCapacity,
                format!(
                    "pool {:?} needs {footprint} bytes, more than its device's budget of {budget} bytes leaves beside the always-loaded pools ({pinned} bytes)",
                    pool.as_str()
                ),
            )),
        }
    }

    /// `from` no longer needs `pool`'s load. Once nobody does, an `abandoned_load = "cancel"`
    /// pool gives the load up: a load still waiting for room never begins, a starting engine
    /// is stopped (by its supervisor, which leaves a serving one alone).
    fn cancel_load(&mut self, pool: &PoolId, from: Requester) -> Result<(), IpcError> {
        let Some(running) = self.running.get(pool) else {
            if self.retiring.contains_key(pool) {
                return Ok(());
            }
            return Err(IpcError::new(
                ErrorCode::NotFound,
                format!("unknown pool {:?}", pool.as_str()),
            ));
        };
        let Some(wanting) = self.memory.demand.get_mut(pool) else {
            return Ok(());
        };
        if !wanting.remove(&from) || !wanting.is_empty() {
            return Ok(());
        }
        self.memory.demand.remove(pool);
        let LoadPolicy::OnDemand { abandoned, .. } = running.config.load else {
            return Ok(());
        };
        if abandoned == AbandonedLoad::Finish {
            tracing::info!(%pool, "nobody waits for the load any more; finishing it (abandoned_load = \"finish\")");
            return Ok(());
        }
        if let Some(at) = self
            .memory
            .waiting
            .iter()
            .position(|waiting| waiting == pool)
        {
            self.memory.waiting.remove(at);
            tracing::info!(%pool, "load cancelled before it began: nobody waits for it");
            self.context.metrics.loads_cancelled.inc();
            return Ok(());
        }
        // The supervisor has the load (or had it: it ignores a cancel once the engine serves),
        // queued behind it: a load and its cancel never cross.
        let Some(commands) = running.commands.clone() else {
            return Ok(());
        };
        tracing::info!(%pool, "nobody waits for the load any more; cancelling it");
        self.memory.sent_loads.remove(pool);
        let (reply, answer) = oneshot::channel();
        send_command(&commands, pool, AdminCommand::CancelLoad { reply })?;
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Ok(Err(error)) = answer.await {
                tracing::warn!(%pool, %error, "the supervisor did not cancel the load");
            }
        });
        Ok(())
    }

    /// `from` withdraws every load it asked for (its connection closed).
    fn withdraw_everywhere(&mut self, from: Requester) {
        let pools: Vec<PoolId> = self
            .memory
            .demand
            .iter()
            .filter(|(_, wanting)| wanting.contains(&from))
            .map(|(pool, _)| pool.clone())
            .collect();
        for pool in pools {
            if let Err(error) = self.cancel_load(&pool, from) {
                tracing::warn!(%pool, %error, "could not withdraw a closed connection's load");
            }
        }
    }

    fn wait_for_room(&mut self, pool: &PoolId) {
        if !self.memory.waiting.contains(pool) {
            self.memory.waiting.push(pool.clone());
        }
    }

    /// Loads the waiting pools that fit now (after a change or a residency guard expired).
    fn plan_waiting(&mut self, snapshot: &RegistrySnapshot) {
        let waiting = std::mem::take(&mut self.memory.waiting);
        for pool in waiting {
            let unloaded = snapshot
                .pool(&pool)
                .is_some_and(|status| status.state == PoolState::Unloaded);
            if !unloaded {
                continue;
            }
            match self.make_room(&pool, true) {
                Ok(true) => self.forward_load(&pool),
                Ok(false) => {}
                Err(error) => tracing::warn!(%pool, %error, "a waiting load can never fit"),
            }
        }
    }

    fn forward_load(&mut self, pool: &PoolId) {
        let Some(commands) = self
            .running
            .get(pool)
            .and_then(|running| running.commands.clone())
        else {
            return;
        };
        self.begin_load(pool);
        let (reply, answer) = oneshot::channel();
        if let Err(error) = send_command(&commands, pool, AdminCommand::Load { reply }) {
            tracing::warn!(%pool, %error, "the supervisor did not take the load");
            self.memory.sent_loads.remove(pool);
            return;
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Ok(Err(error)) = answer.await {
                tracing::warn!(%pool, %error, "the supervisor did not load the pool");
            }
        });
    }

    /// Tells each of `pools` to unload (drain, then stop), once.
    fn unload(&mut self, pools: &[PoolId]) {
        for pool in pools {
            if !self.memory.unloading.insert(pool.clone()) {
                continue;
            }
            let Some(commands) = self
                .running
                .get(pool)
                .and_then(|running| running.commands.clone())
            else {
                continue;
            };
            let (reply, answer) = oneshot::channel();
            if let Err(error) = send_command(&commands, pool, AdminCommand::Unload { reply }) {
                tracing::warn!(%pool, %error, "the pool's supervisor did not take the unload");
                self.memory.unloading.remove(pool);
                continue;
            }
            let pool = pool.clone();
            tokio::spawn(async move {
                if let Ok(Err(error)) = answer.await {
                    tracing::warn!(%pool, %error, "the pool did not unload to make room");
                }
            });
        }
    }

    /// Keeps when pools were loaded and last used, and measures a pool's footprint once it is
    /// ready.
    fn observe(&mut self, snapshot: &RegistrySnapshot) {
        let now = Instant::now();
        // A load's askers are kept until it is done (the pool serves, stops or fails); a
        // draining pool may be asked to load again once it has unloaded.
        self.memory.demand.retain(|pool, _| {
            snapshot.pool(pool).is_some_and(|status| {
                matches!(
                    status.state,
                    PoolState::Unloaded
                        | PoolState::Loading
                        | PoolState::BackingOff { .. }
                        | PoolState::Draining
                )
            })
        });
        self.memory.sent_loads.retain(|pool| {
            snapshot
                .pool(pool)
                .is_some_and(|status| status.state == PoolState::Unloaded)
        });
        for status in &snapshot.pools {
            let gpu = match self
                .running
                .get(&status.pool_id)
                .map(|running| residency::device_of(&running.config))
            {
                Some(Device::Gpu(index)) => Some(index),
                _ => None,
            };
            // Another engine starting on a GPU changes its used memory under loads pending there.
            if let Some(index) = gpu
                && matches!(status.state, PoolState::Starting | PoolState::Loading)
            {
                self.memory.baselines.disturb(index, Some(&status.pool_id));
            }
            let loaded = matches!(
                status.state,
                PoolState::Ready | PoolState::Unhealthy | PoolState::Draining
            );
            if !loaded {
                let left_memory = self.memory.usage.remove(&status.pool_id).is_some();
                if let Some(index) = gpu
                    && left_memory
                {
                    self.memory.baselines.disturb(index, Some(&status.pool_id));
                }
                if matches!(
                    status.state,
                    PoolState::Unloaded | PoolState::Stopped | PoolState::Failed
                ) {
                    self.memory.baselines.forget(&status.pool_id);
                }
                if status.state == PoolState::Unloaded {
                    self.memory.unloading.remove(&status.pool_id);
                }
                continue;
            }
            match self.memory.usage.get_mut(&status.pool_id) {
                Some(usage) => {
                    if status.active_leases() > 0 {
                        usage.last_used = now;
                    }
                }
                None => {
                    self.memory.usage.insert(
                        status.pool_id.clone(),
                        Usage {
                            loaded_at: now,
                            last_used: now,
                        },
                    );
                    if status.state == PoolState::Ready {
                        self.measure(&status.pool_id);
                    }
                }
            }
        }
        self.publish_memory(snapshot);
    }

    /// Each device's budget and held bytes, and each pool's footprint, as metrics.
    fn publish_memory(&mut self, snapshot: &RegistrySnapshot) {
        let residents = self.residents(snapshot);
        for resident in &residents {
            self.context
                .metrics
                .set_footprint(&resident.pool, resident.footprint);
        }
        for budget in &self.context.budgets {
            let held = held_on(&residents, budget.device);
            self.context
                .metrics
                .set_memory(budget.device.to_string(), budget.bytes, held);
        }
    }

    /// The answer to `Request::Memory`.
    fn memory_report(&mut self) -> MemoryReport {
        let snapshot = self.context.registry.snapshot();
        let residents = self.residents(&snapshot);
        let devices = self
            .context
            .budgets
            .iter()
            .map(|budget| DeviceMemory {
                device: budget.device.to_string(),
                budget_bytes: budget.bytes,
                held_bytes: held_on(&residents, budget.device),
            })
            .collect();
        let mut pools: Vec<PoolFootprint> = residents
            .iter()
            .map(|resident| {
                let footprint_bytes = self.footprint(&resident.pool);
                let measured = self
                    .running
                    .get(&resident.pool)
                    .and_then(|running| running.config.managed())
                    .is_some_and(|engine| {
                        self.memory
                            .footprints
                            .get(resident.pool.as_str(), &engine.model_path)
                            .is_some()
                    });
                PoolFootprint {
                    pool: resident.pool.clone(),
                    device: resident.device.to_string(),
                    footprint_bytes,
                    measured,
                }
            })
            .collect();
        pools.sort_by(|a, b| a.pool.cmp(&b.pool));
        MemoryReport { devices, pools }
    }

    /// A load of an Unloaded managed pool is about to be sent: until its supervisor reports it
    /// Loading, the planner counts its memory as taken; a GPU pool's supervisor reads the device
    /// just before it starts the engine (see `gpu_baselines`).
    fn begin_load(&mut self, pool: &PoolId) {
        let Some(running) = self.running.get(pool) else {
            return;
        };
        let unloaded = self
            .context
            .registry
            .snapshot()
            .pool(pool)
            .is_some_and(|status| status.state == PoolState::Unloaded);
        if running.config.managed().is_none() || !unloaded {
            return;
        }
        self.memory.sent_loads.insert(pool.clone());
        if let Device::Gpu(index) = residency::device_of(&running.config) {
            self.memory.baselines.begin(pool, index);
        }
    }

    /// Keeps a measured footprint (in the state directory, across restarts).
    async fn remember(&mut self, pool: &PoolId, model_path: String, bytes: u64) {
        tracing::info!(%pool, bytes, "measured the pool's footprint");
        let measured = footprint::Measured {
            bytes,
            model_path: model_path.clone(),
            measured_unix_ms: crate::probe::unix_ms_now(),
        };
        if let Err(error) = self.memory.footprints.record(pool.as_str(), measured).await {
            tracing::warn!(%pool, %error, "cannot keep the measured footprint");
        }
        self.memory
            .estimates
            .insert(pool.clone(), (model_path, Some(bytes)));
    }

    /// Measures a freshly loaded pool's footprint and remembers it: on the host from procfs,
    /// on a GPU from NVML (off this task; the figure comes back as a [`Measurement`]).
    fn measure(&mut self, pool: &PoolId) {
        let Some(running) = self.running.get(pool) else {
            return;
        };
        let Some(engine) = running.config.managed() else {
            return;
        };
        let device = residency::device_of(&running.config);
        let record = self
            .context
            .paths
            .state_dir
            .join("engines")
            .join(format!("{}.json", pool.as_str()));
        let Some(pid) = crate::supervisor::record::read_record(&record).map(|record| record.pid)
        else {
            return;
        };
        let model_path = engine.model_path.clone();
        let Device::Gpu(index) = device else {
            match footprint::measure_host(pid, Path::new(&model_path)) {
                // Kept by the run loop, like a GPU measurement: writing it waits for the disk.
                Ok(bytes) => {
                    let _ = self.measurements.send(Measurement {
                        pool: pool.clone(),
                        model_path,
                        bytes,
                    });
                }
                Err(error) => tracing::warn!(%pool, %error, "cannot measure the pool's footprint"),
            }
            return;
        };
        let baseline = self.memory.baselines.finish(pool);
        let probe = Arc::clone(&self.context.gpus);
        let sink = self.measurements.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let reading = tokio::task::spawn_blocking(move || {
                let pids = footprint::process_group_pids(pid).unwrap_or_else(|_| vec![pid]);
                probe.process_memory(index, &pids)
            })
            .await
            .ok()
            .flatten();
            match reading.and_then(|reading| gpu::gpu_footprint(reading, baseline)) {
                Some(bytes) => {
                    let _ = sink.send(Measurement {
                        pool,
                        model_path,
                        bytes,
                    });
                }
                None => tracing::info!(
                    %pool,
                    ?reading,
                    "no GPU footprint measured (no per-process figures, and the device changed during the load or could not be read); the estimate stays"
                ),
            }
        });
    }

    /// The pool's footprint (measured, else estimated), worked out once per model file.
    fn footprint(&mut self, pool: &PoolId) -> Option<u64> {
        let config = &self.running.get(pool)?.config;
        let model = config.managed()?.model_path.clone();
        if let Some((known_model, bytes)) = self.memory.estimates.get(pool)
            && *known_model == model
        {
            return *bytes;
        }
        let bytes = residency::footprint_of(config, &self.memory.footprints);
        self.memory.estimates.insert(pool.clone(), (model, bytes));
        bytes
    }

    /// The managed pools as the planner sees them.
    fn residents(&mut self, snapshot: &RegistrySnapshot) -> Vec<Resident> {
        let pools: Vec<PoolId> = self
            .running
            .iter()
            .filter(|(_, running)| running.config.managed().is_some())
            .map(|(id, _)| id.clone())
            .collect();
        let now = Instant::now();
        pools
            .into_iter()
            .filter_map(|pool| {
                let footprint = self.footprint(&pool).unwrap_or(0);
                let running = self.running.get(&pool)?;
                let status = snapshot.pool(&pool)?;
                let usage = self.memory.usage.get(&pool).copied().unwrap_or(Usage {
                    loaded_at: now,
                    last_used: now,
                });
                let residency = match status.state {
                    PoolState::Unloaded if self.memory.sent_loads.contains(&pool) => {
                        Residency::Loading
                    }
                    PoolState::Unloaded | PoolState::Stopped | PoolState::Failed => {
                        Residency::Unloaded
                    }
                    PoolState::Loading | PoolState::Starting | PoolState::BackingOff { .. } => {
                        Residency::Loading
                    }
                    PoolState::Draining => Residency::Unloading,
                    PoolState::Ready | PoolState::Unhealthy => Residency::Loaded {
                        leases: status.active_leases(),
                        loaded_at: usage.loaded_at,
                        last_used: usage.last_used,
                    },
                };
                Some(Resident {
                    device: residency::device_of(&running.config),
                    footprint,
                    pinned: matches!(running.config.load, LoadPolicy::Always),
                    residency,
                    pool,
                })
            })
            .collect()
    }

    async fn start(&mut self, pool: PoolConfig) {
        let context = &self.context;
        let stop = context.shutdown.child_token();
        let (task, commands) = match &pool.source {
            EngineSource::External { endpoint } => (
                context.tracker.spawn(probe::probe_pool(
                    pool.clone(),
                    endpoint.clone(),
                    context.registry.clone(),
                    context.tracer.clone(),
                    stop.clone(),
                )),
                None,
            ),
            EngineSource::Managed(engine) => {
                let (commands, inbox) = mpsc::channel(SUPERVISOR_QUEUE);
                let mut supervisor = EngineSupervisor::new(
                    pool.clone(),
                    engine.clone(),
                    context.registry.clone(),
                    context.paths.clone(),
                    inbox,
                    stop.clone(),
                );
                if let Some(tracer) = &context.tracer {
                    supervisor = supervisor.with_tracer(tracer.clone());
                }
                if let Device::Gpu(index) = residency::device_of(&pool) {
                    supervisor = supervisor.with_gpu_meter(GpuMeter {
                        probe: Arc::clone(&context.gpus),
                        index,
                        readings: self.baseline_readings.clone(),
                    });
                }
                // Adoption is decided before the socket is served, so re-asserted leases find
                // adopted engines Ready.
                let adopted = supervisor.adopt().await;
                context.tracker.spawn(follow_log(
                    context.paths.log(pool.id.as_str()),
                    pool.id.to_string(),
                    DEFAULT_LOG_CAP_BYTES,
                    stop.clone(),
                ));
                (
                    context.tracker.spawn(supervisor.run(adopted)),
                    Some(commands),
                )
            }
        };
        self.running.insert(
            pool.id.clone(),
            RunningPool {
                config: pool,
                stop,
                commands,
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
        let retired = self.retired.clone();
        let id = id.clone();
        let deadline = pool
            .config
            .managed()
            .map(|engine| engine.reload.drain_deadline())
            .unwrap_or_default();
        tracing::info!(pool = %id, "taking the pool out (reload)");
        let RunningPool {
            stop,
            commands,
            task,
            ..
        } = pool;
        self.context.tracker.spawn(async move {
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
                () = stop.cancelled() => {}
            }
            stop.cancel();
            if tokio::time::timeout(RETIRE_STOP_WAIT, task).await.is_err() {
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
                self.context.registry.replace_pool(replacement.clone());
                self.start(replacement).await;
            }
            _ => self.context.registry.remove_pool(id.clone()),
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
                self.context.registry.add_pool(new.clone());
                self.start(new.clone()).await;
            }
        }
        self.config.pools = config.pools.clone();
    }
}

/// Queues `command` on `pool`'s supervisor without waiting, so commands reach it in the order
/// the controller decided them.
fn send_command(
    commands: &mpsc::Sender<AdminCommand>,
    pool: &PoolId,
    command: AdminCommand,
) -> Result<(), IpcError> {
    commands.try_send(command).map_err(|error| match error {
        mpsc::error::TrySendError::Full(_) => IpcError::new(
            ErrorCode::NotReady,
            format!(
                "pool {:?}'s supervisor has too many commands queued; try again",
                pool.as_str()
            ),
        ),
        mpsc::error::TrySendError::Closed(_) => supervisor_gone(pool.as_str()),
    })
}

/// The footprints of the pools on `device` that hold memory (loaded, loading or unloading).
fn held_on(residents: &[Resident], device: Device) -> u64 {
    residents
        .iter()
        .filter(|resident| resident.device == device && resident.residency != Residency::Unloaded)
        .map(|resident| resident.footprint)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::registry::{LeasePolicy, LeaseSigner, spawn_registry};
    use std::sync::Arc;

    /// A controller over one external pool `ext` (probed at an address nobody serves), with
    /// reloads allowed from `models/` under a temporary directory.
    async fn controller(dir: &std::path::Path) -> (PoolsHandle, CancellationToken) {
        std::fs::create_dir_all(dir.join("models")).unwrap();
        let text = format!(
            "[server]\nmodel_dirs = [{:?}]\n\n[[pool]]\nid = \"ext\"\nmodel = \"m\"\nengine = \"llamacpp\"\nendpoint = \"http://127.0.0.1:9\"\nslots = 1\n",
            dir.join("models").display().to_string()
        );
        let config = Config::parse(&text, &dir.join("config.toml")).unwrap();
        let policy = LeasePolicy {
            id_base: 1,
            signer: LeaseSigner::ephemeral(),
            ttl_ms: None,
            max_slots_per_uid: 16,
        };
        let (registry, _task) = spawn_registry(&config.pools, policy, Arc::new(Metrics::new()));
        let shutdown = CancellationToken::new();
        let context = PoolsContext {
            registry,
            paths: EnginePaths::under(dir),
            tracker: TaskTracker::new(),
            shutdown: shutdown.clone(),
            model_dirs: config.server.model_dirs.clone(),
            budgets: Vec::new(),
            min_residency: Duration::ZERO,
            metrics: Arc::new(Metrics::new()),
            gpus: Arc::new(GpuProbe::default()),
            tracer: None,
        };
        let (_reload_requests, reloads) = mpsc::unbounded_channel();
        let (pools, _task) = start(context, &config, reloads).await;
        (pools, shutdown)
    }

    #[tokio::test]
    async fn admin_requests_the_controller_cannot_carry_out_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (pools, shutdown) = controller(dir.path()).await;
        let code = |result: Result<(), IpcError>| result.unwrap_err().code;
        let pool = |id: &str| PoolId::from(id);
        assert_eq!(
            code(
                pools
                    .admin(Request::Restart { pool: pool("nope") }, Requester::Operator)
                    .await
            ),
            ErrorCode::NotFound
        );
        assert_eq!(
            code(
                pools
                    .admin(Request::Restart { pool: pool("ext") }, Requester::Operator)
                    .await
            ),
            ErrorCode::Unsupported,
            "an external engine is not pool-managerd's to restart"
        );
        let too_long = Request::Drain {
            pool: pool("ext"),
            deadline_ms: MAX_DRAIN_DEADLINE_MS + 1,
        };
        assert_eq!(
            code(pools.admin(too_long, Requester::Operator).await),
            ErrorCode::BadRequest
        );
        let outside = Request::Reload {
            pool: pool("ext"),
            model: "/etc/passwd".into(),
        };
        assert_eq!(
            code(pools.admin(outside, Requester::Operator).await),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(pools.admin(Request::Ping, Requester::Operator).await),
            ErrorCode::BadRequest
        );
        shutdown.cancel();
        assert_eq!(
            code(
                pools
                    .admin(Request::Restart { pool: pool("ext") }, Requester::Operator)
                    .await
            ),
            ErrorCode::ShuttingDown,
            "a stopped controller says so"
        );
    }
}
