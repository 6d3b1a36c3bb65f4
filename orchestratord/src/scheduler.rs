//! The scheduler: one task that owns the admission queue and turns queued requests into leases.
//!
//! A request is admitted (or refused at once: queue full, model unknown, pool manager down),
//! then waits until the local mirror of the registry shows a pool for its model with a free
//! slot; the scheduler Acquires that slot over the socket (the one round trip) and hands the
//! lease to the waiting handler. It wakes on mirror changes (a freed slot is a published
//! change), on new requests, on Acquire answers and on the next queue deadline; nothing polls.
//!
//! Bursts are placed at once: every queued request the mirror says fits gets its Acquire sent
//! in the same pass, without waiting for the previous answer (the shared connection pipelines
//! them). So that a pass cannot promise the same slot twice, each sent Acquire reserves its
//! slots locally until the mirror shows its outcome (`Reservations`): until it is answered, and
//! if granted until the mirror reaches the lease's `registry_epoch` (the answer may come before
//! the event that publishes the lease). Placement sees the mirror's free slots less those
//! reservations: conservative, never promising a slot twice, while the mirror may count a lease
//! twice for a moment. pool-managerd stays the authority: an Acquire it refuses (the
//! slot went elsewhere between mirror and Acquire) puts the request back in line, and placement
//! then waits for the next registry change before it tries again, so a stale mirror cannot
//! make it spin.
//!
//! Every waiter ends in exactly one outcome: placed, refused, expired or cancelled; a lease
//! whose waiter vanished is dropped, which releases it.

use crate::admission::{AdmissionConfig, AdmissionQueue, Priority, RejectReason, TaskId};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::placement::{
    self, Choice, NoPlacement, PlacementHints, SessionAffinity, SlotNeed, Wanted,
};
use crate::request_trace::AcquireParent;
use pool_ipc::client::{ClientError, LeaseGuard, PoolClient, RegistryMirror};
use pool_ipc::error_code::ErrorCode;
use pool_ipc::registry::{AcquireTarget, ApiEndpoint, PoolId, PoolState, RegistrySnapshot};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// What a handler asks for.
#[derive(Debug, Clone)]
pub struct Demand {
    pub model: String,
    /// The API the request calls: only pools whose engine serves it are considered.
    pub api: ApiEndpoint,
    /// The engine sequences the request runs; its lease reserves the slots they occupy.
    pub slots: SlotNeed,
    pub priority: Priority,
    pub session: Option<String>,
    pub hints: PlacementHints,
    pub deadline: Instant,
    /// For logs and the lease's task id.
    pub correlation_id: String,
    /// Where the spans of its Acquires hang, when spans are exported.
    pub trace: Option<AcquireParent>,
}

impl Demand {
    /// What the request needs of a pool; it may not use the `held_back` ones.
    fn wanted<'a>(&'a self, held_back: &'a [PoolId]) -> Wanted<'a> {
        Wanted {
            model: &self.model,
            api: self.api,
            slots: self.slots,
            hints: &self.hints,
            held_back,
        }
    }
}

/// A granted slot.
#[derive(Debug)]
pub struct Placed {
    pub lease: LeaseGuard,
    pub queued_for: Duration,
}

/// An admitted request, waiting for its slot.
#[derive(Debug)]
pub struct Ticket {
    pub id: TaskId,
    pub position: usize,
    pub predicted_start: Duration,
    pub placed: oneshot::Receiver<Result<Placed, ApiError>>,
    cancel: mpsc::UnboundedSender<Command>,
}

impl Drop for Ticket {
    /// A handler that goes away (client disconnected) takes its request out of the queue.
    fn drop(&mut self) {
        let _ = self.cancel.send(Command::Cancel { id: self.id });
    }
}

struct Waiting {
    demand: Demand,
    enqueued: Instant,
    placed: oneshot::Sender<Result<Placed, ApiError>>,
}

/// Slots this scheduler has promised that its mirror may not show yet.
#[derive(Debug, Default)]
struct Reservations {
    /// Acquires sent and not answered, by request.
    asked: HashMap<TaskId, (PoolId, u32)>,
    /// Leases granted whose registry epoch the mirror has not reached.
    granted: Vec<(PoolId, u32, u64)>,
    /// The mirror's epoch when last looked at: a lower one is a restarted pool-managerd, whose
    /// epochs start again (its snapshot shows every lease it holds).
    epoch: u64,
}

impl Reservations {
    /// Forgets what the mirror at `epoch` shows, then takes what is left off `view`'s free
    /// slots.
    fn apply(&mut self, view: &mut RegistrySnapshot) {
        if view.epoch < self.epoch {
            self.granted.clear();
        }
        self.epoch = view.epoch;
        self.granted.retain(|(_, _, epoch)| *epoch > view.epoch);
        let taken = self
            .asked
            .values()
            .map(|(pool, slots)| (pool, *slots))
            .chain(self.granted.iter().map(|(pool, slots, _)| (pool, *slots)));
        for (pool, slots) in taken {
            if let Some(status) = view.pools.iter_mut().find(|each| &each.pool_id == pool) {
                status.slots_free = status.slots_free.saturating_sub(slots);
            }
        }
    }
}

/// An Acquire sent for a queued request, and its answer.
struct Acquired {
    id: TaskId,
    waiting: Waiting,
    pool: PoolId,
    slots: u32,
    result: Result<LeaseGuard, ClientError>,
}

enum Command {
    Submit {
        demand: Demand,
        reply: oneshot::Sender<Result<Ticket, ApiError>>,
    },
    Cancel {
        id: TaskId,
    },
    Served {
        session: Option<(String, pool_ipc::registry::PoolId)>,
        held_for: Duration,
    },
    Reconfigure(AdmissionConfig),
    /// Answered at once: the actor is alive and working through its inbox.
    Ping(oneshot::Sender<()>),
    /// Requests waiting in the queue, by model.
    WaitingByModel(oneshot::Sender<HashMap<String, usize>>),
    /// pool-managerd refused to load a pool the queue asked for (or could not be asked).
    LoadFailed {
        pool: PoolId,
        error: ClientError,
    },
}

/// The handle handlers use.
#[derive(Clone)]
pub struct Scheduler {
    commands: mpsc::UnboundedSender<Command>,
}

impl Scheduler {
    /// Starts the scheduler; it remembers the pools of at most `sessions.max_sessions` sessions,
    /// each for the sessions' TTL.
    pub fn start(
        client: PoolClient,
        mirror: watch::Receiver<RegistryMirror>,
        config: AdmissionConfig,
        metrics: Arc<Metrics>,
        sessions: &crate::sessions::SessionPolicy,
    ) -> Scheduler {
        let (commands, inbox) = mpsc::unbounded_channel();
        let (load_calls, calls) = mpsc::unbounded_channel();
        let (acquired_sender, acquired) = mpsc::unbounded_channel();
        tokio::spawn(make_load_calls(client.clone(), calls, commands.clone()));
        let actor = SchedulerActor {
            queue: AdmissionQueue::new(config),
            client,
            mirror,
            inbox,
            handle: commands.clone(),
            reservations: Reservations::default(),
            acquired,
            acquired_sender,
            lost_race_at: None,
            affinity: SessionAffinity::new(sessions.max_sessions, sessions.ttl),
            next_id: 1,
            metrics,
            pool_states: Vec::new(),
            loads_requested: HashSet::new(),
            load_calls,
            loads_refused: HashMap::new(),
        };
        tokio::spawn(daemon_support::systemd::core_task(
            CORE_TASK,
            tokio::spawn(actor.run()),
        ));
        Scheduler { commands }
    }

    /// Admits a request or says why not.
    pub async fn submit(&self, demand: Demand) -> Result<Ticket, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Submit { demand, reply })
            .map_err(|_| ApiError::ShuttingDown)?;
        answer.await.map_err(|_| ApiError::ShuttingDown)?
    }

    /// Whether the scheduler answers: it is alive and not stuck (the systemd watchdog asks).
    pub async fn ping(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Ping(reply)).is_ok() && answer.await.is_ok()
    }

    /// Requests waiting in the queue, by model (empty if the scheduler is gone).
    pub async fn waiting_by_model(&self) -> HashMap<String, usize> {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::WaitingByModel(reply)).is_err() {
            return HashMap::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Applies the admission limits of a reloaded configuration.
    pub fn reconfigure(&self, config: AdmissionConfig) {
        let _ = self.commands.send(Command::Reconfigure(config));
    }

    /// Reports how long a lease was held (feeds the start-time prediction) and the pool a
    /// session's KV cache now lives on.
    pub fn served(
        &self,
        session: Option<(String, pool_ipc::registry::PoolId)>,
        held_for: Duration,
    ) {
        let _ = self.commands.send(Command::Served { session, held_for });
    }
}

struct SchedulerActor {
    queue: AdmissionQueue<Waiting>,
    client: PoolClient,
    mirror: watch::Receiver<RegistryMirror>,
    inbox: mpsc::UnboundedReceiver<Command>,
    handle: mpsc::UnboundedSender<Command>,
    /// Slots promised that the mirror may not show yet (see the module header).
    reservations: Reservations,
    /// Where sent Acquires' answers come back.
    acquired: mpsc::UnboundedReceiver<Acquired>,
    acquired_sender: mpsc::UnboundedSender<Acquired>,
    /// The registry epoch at which an Acquire was last refused: placement waits for a newer one.
    lost_race_at: Option<u64>,
    affinity: SessionAffinity,
    next_id: u64,
    metrics: Arc<Metrics>,
    /// Each pool's state when the queue was last checked for hopeless requests. Most registry
    /// updates only move leases; the queue is checked again only when pools or states change.
    pool_states: Vec<(PoolId, PoolState)>,
    /// Pools asked to load for queued requests, until the load is done (or given up): asked
    /// once, and withdrawn (`CancelLoad`) when no queued request could use the pool any more.
    loads_requested: HashSet<PoolId>,
    /// Where load calls go (see [`make_load_calls`]).
    load_calls: mpsc::UnboundedSender<LoadCall>,
    /// Pools pool-managerd refused to load because they can never fit, with its reason and
    /// when: requests for their models are refused at admission for a while.
    loads_refused: HashMap<PoolId, (String, Instant)>,
}

/// What the queue asks pool-managerd about loads, in order.
enum LoadCall {
    /// Load the pool for requests waiting here.
    Load(PoolId),
    /// No request here waits for the pool's load any more.
    Withdraw(PoolId),
}

/// Makes the queue's load calls one after the other, so a load and its withdrawal reach
/// pool-managerd in the order the queue decided them (concurrent calls could cross, and a
/// withdrawal overtaking its load would leave the load running, or the pool never loaded).
async fn make_load_calls(
    client: PoolClient,
    mut calls: mpsc::UnboundedReceiver<LoadCall>,
    scheduler: mpsc::UnboundedSender<Command>,
) {
    while let Some(call) = calls.recv().await {
        match call {
            LoadCall::Load(pool) => {
                if let Err(error) = client.load_for_waiting_requests(&pool).await {
                    tracing::warn!(%pool, %error, "pool-managerd did not load the pool");
                    let _ = scheduler.send(Command::LoadFailed { pool, error });
                }
            }
            LoadCall::Withdraw(pool) => {
                if let Err(error) = client.cancel_load(&pool).await {
                    tracing::warn!(%pool, %error, "could not withdraw the pool's load");
                }
            }
        }
    }
}

/// How long a refusal to load (a pool that can never fit) answers new requests at admission
/// before pool-managerd is asked again (a restart may have changed its budgets).
const LOAD_REFUSAL_MEMORY: Duration = Duration::from_secs(60);

/// The scheduler's name as a core task (its panic ends the process).
const CORE_TASK: &str = "the scheduler";

impl SchedulerActor {
    async fn run(mut self) {
        daemon_support::systemd::injected_fault(CORE_TASK).await;
        loop {
            let deadline = self
                .queue
                .next_deadline()
                .map(tokio::time::Instant::from_std);
            let expiry = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.inbox.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => return,
                },
                changed = self.mirror.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.update_capacity_hint();
                    self.fail_hopeless();
                }
                Some(acquired) = self.acquired.recv() => self.on_acquired(acquired),
                () = expiry => {}
            }
            self.expire();
            self.dispatch();
            self.request_loads();
            let (interactive, batch) = self.queue.depth();
            self.metrics.set_queue_depth(interactive, batch);
        }
    }

    fn update_capacity_hint(&mut self) {
        let slots: u32 = self
            .mirror
            .borrow()
            .snapshot
            .pools
            .iter()
            .map(|pool| pool.slots_total)
            .sum();
        self.queue.set_capacity_hint(slots.max(1) as usize);
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::Submit { demand, reply } => {
                let outcome = self.admit(demand);
                if let Err(Ok(ticket)) = reply.send(outcome) {
                    // The handler left before hearing back: its Drop cancels the ticket.
                    drop(ticket);
                }
            }
            Command::Cancel { id } => {
                if self.queue.remove(id).is_some() {
                    tracing::debug!(task = %id, "cancelled while queued");
                }
            }
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
            Command::WaitingByModel(reply) => {
                let mut waiting: HashMap<String, usize> = HashMap::new();
                for queued in self.queue.payloads() {
                    *waiting.entry(queued.demand.model.clone()).or_default() += 1;
                }
                let _ = reply.send(waiting);
            }
            Command::Reconfigure(config) => {
                tracing::info!(capacity = config.capacity, policy = ?config.full_policy, "admission limits reloaded");
                self.queue.set_config(config);
            }
            Command::Served { session, held_for } => {
                self.queue.record_service(held_for);
                if let Some((session, pool)) = session {
                    self.affinity.remember(&session, &pool, Instant::now());
                }
            }
            Command::LoadFailed { pool, error } => self.load_failed(pool, error),
        }
    }

    /// A load the queue asked for was refused: the requests waiting for it are answered at once
    /// (a pool that can never fit is remembered, so new requests for it are refused at
    /// admission); a load that could not be asked is asked again on the next change.
    fn load_failed(&mut self, pool: PoolId, error: ClientError) {
        self.loads_requested.remove(&pool);
        let ClientError::Remote(refusal) = error else {
            tracing::warn!(%pool, %error, "could not ask pool-managerd to load the pool");
            return;
        };
        let never_fits = refusal.code == ErrorCode::NoCapacity;
        if never_fits {
            self.loads_refused
                .insert(pool.clone(), (refusal.message.clone(), Instant::now()));
        }
        let mirror = self.mirror.borrow();
        let snapshot = &mirror.snapshot;
        let answered = self.queue.remove_where(|waiting| {
            placement::pool_to_load(snapshot, &waiting.demand.wanted(&[])).as_ref() == Some(&pool)
        });
        drop(mirror);
        for (id, waiting) in answered {
            let error = if never_fits {
                ApiError::ModelNeverFits {
                    model: waiting.demand.model.clone(),
                    reason: refusal.message.clone(),
                }
            } else {
                ApiError::PoolManagerRefused {
                    code: refusal.code,
                    message: refusal.message.clone(),
                }
            };
            tracing::info!(task = %id, %error, "the load it waited for was refused");
            let _ = waiting.placed.send(Err(error));
        }
    }

    fn admit(&mut self, demand: Demand) -> Result<Ticket, ApiError> {
        let mirror = self.mirror.borrow();
        if !mirror.connected {
            return Err(ApiError::PoolUnavailable {
                retry_after: crate::error::POOL_MANAGER_RETRY_AFTER,
            });
        }
        let session_pool = demand
            .session
            .as_deref()
            .and_then(|session| self.affinity.pool_of(session, Instant::now()));
        let choice = placement::choose(&mirror.snapshot, &demand.wanted(&[]), session_pool);
        if let Some(error) = unservable(&choice, &demand) {
            return Err(error);
        }
        if choice.is_err()
            && let Some(pool) = placement::pool_to_load(&mirror.snapshot, &demand.wanted(&[]))
            && let Some((reason, _)) = self
                .loads_refused
                .get(&pool)
                .filter(|(_, when)| when.elapsed() < LOAD_REFUSAL_MEMORY)
        {
            return Err(ApiError::ModelNeverFits {
                model: demand.model.clone(),
                reason: reason.clone(),
            });
        }
        // A slot is free right now: the wait is the dispatch itself, not a service time.
        let free_now = choice.is_ok();
        drop(mirror);
        let id = TaskId(self.next_id);
        self.next_id += 1;
        let (placed, receiver) = oneshot::channel();
        let now = Instant::now();
        let deadline = demand.deadline;
        let priority = demand.priority;
        let waiting = Waiting {
            demand,
            enqueued: now,
            placed,
        };
        match self.queue.push(id, priority, deadline, waiting, now) {
            Ok(admitted) => {
                if let Some((dropped_id, dropped)) = admitted.dropped {
                    tracing::info!(task = %dropped_id, "dropped from the full queue (drop-lru)");
                    let _ = dropped.placed.send(Err(ApiError::DroppedFromQueue));
                }
                let predicted_start = if free_now && admitted.position == 0 {
                    Duration::ZERO
                } else {
                    admitted.predicted_start
                };
                Ok(Ticket {
                    id,
                    position: admitted.position,
                    predicted_start,
                    placed: receiver,
                    cancel: self.handle.clone(),
                })
            }
            Err(rejected) => Err(match rejected.reason {
                RejectReason::QueueFull => ApiError::QueueFull {
                    retry_after: rejected.retry_after,
                },
                RejectReason::DeadlinePassed => ApiError::DeadlineUnmet,
                RejectReason::DuplicateTask => {
                    ApiError::Internal(format!("task {id} queued twice"))
                }
            }),
        }
    }

    /// Answers, at once, queued requests that the registry says can no longer be served: their
    /// model's pools were removed, or all of them were stopped (drained) or failed. Waiting for
    /// their deadline would only delay the same answer.
    fn fail_hopeless(&mut self) {
        let mirror = self.mirror.borrow();
        if !mirror.connected {
            return;
        }
        let pools = &mirror.snapshot.pools;
        let unchanged = self.pool_states.len() == pools.len()
            && self
                .pool_states
                .iter()
                .zip(pools)
                .all(|((id, state), pool)| *id == pool.pool_id && *state == pool.state);
        if unchanged {
            return;
        }
        // Pools whose load (or start after a load) just failed: their engine backs off, and the
        // requests waiting for nothing else are told at once rather than at their deadline.
        let failed_loads: Vec<(PoolId, String, Duration)> = pools
            .iter()
            .filter(|pool| {
                matches!(pool.state, PoolState::BackingOff { .. })
                    && self
                        .pool_states
                        .iter()
                        .any(|(id, was)| *id == pool.pool_id && matches!(was, PoolState::Loading))
            })
            .map(|pool| {
                let retry_after = match pool.state {
                    PoolState::BackingOff { until_unix_ms } => {
                        Duration::from_millis(until_unix_ms.saturating_sub(unix_ms_now()))
                            .max(Duration::from_secs(1))
                    }
                    _ => Duration::from_secs(1),
                };
                let reason = pool
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "the engine did not start".into());
                (pool.pool_id.clone(), reason, retry_after)
            })
            .collect();
        self.pool_states = pools
            .iter()
            .map(|pool| (pool.pool_id.clone(), pool.state))
            .collect();
        let failed_pools: Vec<PoolId> = failed_loads.iter().map(|(id, ..)| id.clone()).collect();
        let mut errors = Vec::new();
        let hopeless = self.queue.remove_where(|waiting| {
            let demand = &waiting.demand;
            let wanted = demand.wanted(&[]);
            let choice = placement::choose(&mirror.snapshot, &wanted, None);
            let error = unservable(&choice, demand).or_else(|| {
                if !placement::waits_only_for_failed_loads(&mirror.snapshot, &wanted, &failed_pools)
                {
                    return None;
                }
                let (_, reason, retry_after) = failed_loads.iter().find(|(pool, ..)| {
                    mirror
                        .snapshot
                        .pool(pool)
                        .is_some_and(|status| status.model == demand.model)
                })?;
                Some(ApiError::ModelLoadFailed {
                    model: demand.model.clone(),
                    reason: reason.clone(),
                    retry_after: *retry_after,
                })
            });
            let doomed = error.is_some();
            errors.extend(error);
            doomed
        });
        for ((id, waiting), error) in hopeless.into_iter().zip(errors) {
            tracing::info!(task = %id, %error, "failed while queued");
            let _ = waiting.placed.send(Err(error));
        }
    }

    /// Answers the requests whose queue deadline passed, except those waiting for their model
    /// to load: the time a load takes does not count, so they get their whole queue allowance
    /// again (behind the requests queued meanwhile); a load that fails answers them at once.
    fn expire(&mut self) {
        let now = Instant::now();
        for (id, mut waiting) in self.queue.expire(now) {
            if self.waits_for_a_load(&waiting.demand) {
                let allowance = waiting
                    .demand
                    .deadline
                    .saturating_duration_since(waiting.enqueued);
                waiting.demand.deadline = now + allowance;
                waiting.enqueued = now;
                let deadline = waiting.demand.deadline;
                let priority = waiting.demand.priority;
                if let Err(rejected) = self.queue.push(id, priority, deadline, waiting, now) {
                    tracing::warn!(task = %id, %rejected, "could not requeue a request waiting for a load");
                }
                continue;
            }
            tracing::info!(task = %id, "queue deadline passed");
            let _ = waiting.placed.send(Err(ApiError::DeadlineUnmet));
        }
    }

    /// Whether `demand` waits for its model to load: no pool of it is ready and one is loading.
    /// (A load that waits for room — other pools' leases to end — counts against the deadline.)
    fn waits_for_a_load(&self, demand: &Demand) -> bool {
        let mirror = self.mirror.borrow();
        let snapshot = &mirror.snapshot;
        let of_model = || {
            snapshot
                .pools
                .iter()
                .filter(|pool| pool.model == demand.model && pool.serves(demand.api))
        };
        !of_model().any(|pool| pool.state == PoolState::Ready)
            && of_model().any(|pool| pool.state == PoolState::Loading)
    }

    /// Asks pool-managerd to load a pool for every queued request whose model has only unloaded
    /// pools, once per pool until the load is done; withdraws the ask for a load still under
    /// way once no queued request could use the pool (its requests were cancelled, expired or
    /// placed elsewhere), so pool-managerd can give up a load nobody waits for.
    fn request_loads(&mut self) {
        let mirror = self.mirror.borrow();
        if !mirror.connected {
            return;
        }
        let snapshot = &mirror.snapshot;
        // The common case, every pool loaded and no load asked for: nothing to look for in
        // the queue.
        if self.loads_requested.is_empty()
            && !snapshot
                .pools
                .iter()
                .any(|pool| pool.state == PoolState::Unloaded)
        {
            return;
        }
        let under_way = |pool: &PoolId| {
            snapshot.pool(pool).is_some_and(|status| {
                matches!(
                    status.state,
                    PoolState::Unloaded | PoolState::Loading | PoolState::BackingOff { .. }
                )
            })
        };
        self.loads_requested.retain(under_way);
        let unwanted: Vec<PoolId> = self
            .loads_requested
            .iter()
            .filter(|pool| {
                !self.queue.payloads().any(|waiting| {
                    placement::may_serve(snapshot, &waiting.demand.wanted(&[]), pool)
                })
            })
            .cloned()
            .collect();
        let wanted: Vec<PoolId> = self
            .queue
            .payloads()
            .filter_map(|waiting| placement::pool_to_load(snapshot, &waiting.demand.wanted(&[])))
            .collect();
        drop(mirror);
        for pool in unwanted {
            self.loads_requested.remove(&pool);
            tracing::info!(%pool, "no queued request waits for the pool's load any more");
            let _ = self.load_calls.send(LoadCall::Withdraw(pool));
        }
        self.loads_refused
            .retain(|_, (_, when)| when.elapsed() < LOAD_REFUSAL_MEMORY);
        for pool in wanted {
            if !self.loads_requested.insert(pool.clone()) {
                continue;
            }
            tracing::info!(%pool, "loading the pool for queued requests");
            let _ = self.load_calls.send(LoadCall::Load(pool));
        }
    }

    /// Sends an Acquire for every queued request that can be placed now (see the module
    /// header), each reserving its slots until it is answered.
    fn dispatch(&mut self) {
        let mut view = {
            let mirror = self.mirror.borrow();
            if !mirror.connected || self.lost_race_at == Some(mirror.snapshot.epoch) {
                return;
            }
            self.lost_race_at = None;
            if self.queue.is_empty() {
                return;
            }
            mirror.snapshot.clone()
        };
        self.reservations.apply(&mut view);
        loop {
            let affinity = &self.affinity;
            let now = Instant::now();
            // Pools whose slots wait for an earlier request that needs several at once: later
            // requests, checked after it in service order, may not take them.
            let mut held_back: Vec<PoolId> = Vec::new();
            // The choice made for the request the queue hands out (the search stops at it).
            let mut chosen = None;
            let next = self.queue.next_eligible(now, |waiting| {
                let session_pool = waiting
                    .demand
                    .session
                    .as_deref()
                    .and_then(|session| affinity.pool_of(session, now));
                let wanted = waiting.demand.wanted(&held_back);
                match placement::choose(&view, &wanted, session_pool) {
                    Ok(choice) => {
                        chosen = Some(choice);
                        true
                    }
                    Err(NoPlacement::Busy) => {
                        if let Some(pool) = placement::pool_to_wait_for(&view, &wanted) {
                            held_back.push(pool);
                        }
                        false
                    }
                    Err(_) => false,
                }
            });
            let (Some((id, waiting)), Some(Choice { pool, slots })) = (next, chosen) else {
                return;
            };
            if waiting.placed.is_closed() {
                continue;
            }
            if let Some(chosen) = view.pools.iter_mut().find(|each| each.pool_id == pool) {
                chosen.slots_free = chosen.slots_free.saturating_sub(slots);
            }
            self.reservations.asked.insert(id, (pool.clone(), slots));
            let client = self.client.clone();
            let answers = self.acquired_sender.clone();
            let metrics = Arc::clone(&self.metrics);
            tokio::spawn(async move {
                let asked = Instant::now();
                let span = waiting
                    .demand
                    .trace
                    .as_ref()
                    .map(|parent| parent.acquire(&pool, slots));
                let result = client
                    .acquire_traced(
                        AcquireTarget::Pool(pool.clone()),
                        waiting.demand.correlation_id.clone(),
                        waiting.demand.session.clone(),
                        slots,
                        span.as_ref().and_then(|span| span.traceparent()),
                    )
                    .await;
                Metrics::observe(&metrics.dispatch, asked.elapsed());
                if let Some(span) = span {
                    span.answered(&result);
                }
                let _ = answers.send(Acquired {
                    id,
                    waiting,
                    pool,
                    slots,
                    result,
                });
            });
        }
    }

    /// An Acquire's answer: the lease goes to its waiting handler; a lost race puts the request
    /// back in line; an unreachable pool-managerd answers the request.
    fn on_acquired(&mut self, acquired: Acquired) {
        let Acquired {
            id,
            waiting,
            pool,
            slots,
            result,
        } = acquired;
        self.reservations.asked.remove(&id);
        match result {
            Ok(lease) => {
                if lease.lease().registry_epoch > self.mirror.borrow().snapshot.epoch {
                    self.reservations.granted.push((
                        pool.clone(),
                        slots,
                        lease.lease().registry_epoch,
                    ));
                }
                let queued_for = waiting.enqueued.elapsed();
                Metrics::observe(&self.metrics.queue_wait, queued_for);
                if let Err(Ok(orphan)) = waiting.placed.send(Ok(Placed { lease, queued_for })) {
                    // Dropping the guard releases the lease.
                    drop(orphan);
                }
            }
            Err(ClientError::Remote(error))
                if matches!(
                    error.code,
                    ErrorCode::NoCapacity
                        | ErrorCode::LeaseCapReached
                        | ErrorCode::NotReady
                        | ErrorCode::Draining
                        | ErrorCode::NotFound
                        | ErrorCode::BadRequest
                ) =>
            {
                // Lost a race against the mirror (the slots went elsewhere, or the pool was
                // drained, removed or reloaded with fewer slots meanwhile), or orchestratord
                // holds all the slots pool-managerd lets one uid lease: back in line; the next
                // change (a lease of ours ending is one) retries, and `fail_hopeless` answers a
                // request no pool can take.
                tracing::debug!(task = %id, %pool, %error, "lost the race for a slot");
                self.lost_race_at = Some(self.mirror.borrow().snapshot.epoch);
                let deadline = waiting.demand.deadline;
                let priority = waiting.demand.priority;
                match self
                    .queue
                    .push(id, priority, deadline, waiting, Instant::now())
                {
                    Ok(admitted) => {
                        if let Some((dropped_id, dropped)) = admitted.dropped {
                            tracing::info!(task = %dropped_id, "dropped from the full queue (drop-lru)");
                            let _ = dropped.placed.send(Err(ApiError::DroppedFromQueue));
                        }
                    }
                    Err(rejected) => {
                        // The queue filled up (or the deadline passed) meanwhile: the payload is
                        // gone, and its handler sees its channel close.
                        tracing::warn!(task = %id, %rejected, "could not requeue after a lost race");
                    }
                }
            }
            Err(error) => {
                // pool-managerd is unreachable or refuses orchestratord itself: an operator's
                // problem, never the client's request.
                tracing::warn!(task = %id, %pool, %error, "acquire failed");
                let _ = waiting.placed.send(Err(ApiError::PoolUnavailable {
                    retry_after: crate::error::POOL_MANAGER_RETRY_AFTER,
                }));
            }
        }
    }
}

/// Why `demand` cannot be served however long it waits, given where placement stands: no pool
/// serves its model or its API, it needs more parallel slots than any pool has, or every pool of
/// the model is stopped or failed. `None` while a pool may still take it (the answer does not
/// depend on session affinity).
fn unservable(choice: &Result<Choice, NoPlacement>, demand: &Demand) -> Option<ApiError> {
    match choice {
        Err(NoPlacement::UnknownModel) => Some(ApiError::ModelNotFound(demand.model.clone())),
        Err(NoPlacement::ApiNotServed) => Some(ApiError::EndpointNotServed {
            model: demand.model.clone(),
            path: demand.api.path(),
        }),
        Err(NoPlacement::TooManyParallel { most }) => Some(ApiError::InvalidParams(format!(
            "the request runs {} sequences at once; the pools of model {:?} have at most {most} slots",
            demand.slots.parallel, demand.model
        ))),
        Err(NoPlacement::OutOfService) => Some(ApiError::PoolUnready(demand.model.clone())),
        Ok(_) | Err(NoPlacement::NoneReady | NoPlacement::Busy) => None,
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::pool;

    fn view(epoch: u64, free: u32) -> RegistrySnapshot {
        RegistrySnapshot {
            epoch,
            pools: vec![pool("p", "m", PoolState::Ready, free, 8)],
        }
    }

    fn free_after(reservations: &mut Reservations, epoch: u64, free: u32) -> u32 {
        let mut view = view(epoch, free);
        reservations.apply(&mut view);
        view.pools[0].slots_free
    }

    #[test]
    fn slots_stay_promised_until_the_mirror_shows_the_lease_that_took_them() {
        let mut reservations = Reservations::default();
        let pool = PoolId("p".into());
        reservations.asked.insert(TaskId(1), (pool.clone(), 2));
        assert_eq!(
            free_after(&mut reservations, 10, 8),
            6,
            "asked, not answered"
        );
        // Granted at epoch 11, but the mirror is still at 10: still taken.
        reservations.asked.remove(&TaskId(1));
        reservations.granted.push((pool.clone(), 2, 11));
        assert_eq!(free_after(&mut reservations, 10, 8), 6);
        // The mirror shows the lease: it counts it itself.
        assert_eq!(free_after(&mut reservations, 11, 6), 6);
        assert!(reservations.granted.is_empty());
    }

    #[test]
    fn a_restarted_pool_managers_lower_epochs_drop_the_granted_reservations() {
        let mut reservations = Reservations::default();
        let pool = PoolId("p".into());
        assert_eq!(free_after(&mut reservations, 500, 8), 8);
        reservations.granted.push((pool, 1, 501));
        assert_eq!(
            free_after(&mut reservations, 3, 7),
            7,
            "its snapshot already shows the re-asserted lease"
        );
    }
}
