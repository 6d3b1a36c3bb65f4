//! The registry actor: one task owns the [`RegistryState`] and applies commands to it in order.
//!
//! Commands are compound (acquire = check + reserve), decided inside the actor, never
//! get-then-act from outside. After each batch of queued commands the actor publishes a fresh
//! snapshot (a `watch`, for advisory reads: CanDispatch, the debug shim, metrics) and the
//! coalesced changes (a `broadcast`, for subscribers). The actor never awaits anything but its
//! inbox and the timer of the next lease expiry, so one slow peer or engine can never stall the
//! registry. It is the registry's clock: before each batch it tells the state the time, which
//! expires the leases whose TTL ran out.
//!
//! The inbox is unbounded on purpose: `Drop` paths must be able to hand back leases without
//! awaiting, and its depth is bounded in practice because every connection waits for each reply
//! before reading its next call.

use super::state::{
    ConnectionId, EngineReport, LeasePolicy, Owner, ProbeReport, RegistryState, UnloadReason,
};
use crate::config::PoolConfig;
use crate::metrics::Metrics;
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{AcquireTarget, Lease, LeaseId, PoolId, RegistrySnapshot, ReleaseOutcome};
use pool_ipc::wire::{Change, HeldLease};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// Commands handled in a batch before publishing; bounds how stale the snapshot can get.
/// The registry's name as a core task (its panic ends the process).
pub const CORE_TASK: &str = "the registry";

const MAX_BATCH: usize = 256;
const EVENT_BUFFER: usize = 1024;

type Reply<T> = oneshot::Sender<T>;
type ReassertOutcome = (Vec<LeaseId>, Vec<(LeaseId, IpcError)>);

enum Command {
    Acquire {
        owner: Owner,
        target: AcquireTarget,
        slots: u32,
        reply: Reply<Result<Lease, IpcError>>,
    },
    Release {
        owner: ConnectionId,
        lease: LeaseId,
        outcome: ReleaseOutcome,
        reply: Reply<Result<(), IpcError>>,
    },
    Reassert {
        owner: Owner,
        held: Vec<HeldLease>,
        reply: Reply<ReassertOutcome>,
    },
    Renew {
        owner: ConnectionId,
        reply: Reply<u32>,
    },
    ConnectionClosed {
        owner: ConnectionId,
    },
    Probe {
        pool: PoolId,
        report: ProbeReport,
    },
    Engine {
        pool: PoolId,
        report: EngineReport,
    },
    AddPool(Box<PoolConfig>),
    ReplacePool(Box<PoolConfig>),
    RemovePool(PoolId),
    /// Answered at once: the actor is alive and working through its inbox.
    Ping {
        reply: Reply<()>,
    },
}

/// One published change, and the connections that must see it even without subscribing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEvent {
    pub epoch: u64,
    pub change: Change,
    pub lease_owners: Vec<ConnectionId>,
}

/// A cheap, cloneable way to talk to the registry actor.
#[derive(Clone)]
pub struct RegistryHandle {
    commands: mpsc::UnboundedSender<Command>,
    snapshot: watch::Receiver<Arc<RegistrySnapshot>>,
    events: broadcast::Sender<Arc<Vec<RegistryEvent>>>,
}

fn registry_gone() -> IpcError {
    IpcError::new(ErrorCode::ShuttingDown, "the registry is shutting down")
}

impl RegistryHandle {
    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, IpcError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| registry_gone())?;
        answer.await.map_err(|_| registry_gone())
    }

    pub async fn acquire(
        &self,
        owner: Owner,
        target: AcquireTarget,
        slots: u32,
    ) -> Result<Lease, IpcError> {
        self.ask(|reply| Command::Acquire {
            owner,
            target,
            slots,
            reply,
        })
        .await?
    }

    pub async fn release(
        &self,
        owner: ConnectionId,
        lease: LeaseId,
        outcome: ReleaseOutcome,
    ) -> Result<(), IpcError> {
        self.ask(|reply| Command::Release {
            owner,
            lease,
            outcome,
            reply,
        })
        .await?
    }

    pub async fn reassert(
        &self,
        owner: Owner,
        held: Vec<HeldLease>,
    ) -> Result<ReassertOutcome, IpcError> {
        self.ask(|reply| Command::Reassert { owner, held, reply })
            .await
    }

    /// Renews every lease of the connection for another TTL; returns how many it holds.
    pub async fn renew(&self, owner: ConnectionId) -> Result<u32, IpcError> {
        self.ask(|reply| Command::Renew { owner, reply }).await
    }

    /// Whether the actor answers: it is alive and not stuck (the systemd watchdog asks).
    pub async fn ping(&self) -> bool {
        self.ask(|reply| Command::Ping { reply }).await.is_ok()
    }

    /// Hands back every lease of a closed connection; callable from `Drop`.
    pub fn connection_closed(&self, owner: ConnectionId) {
        let _ = self.commands.send(Command::ConnectionClosed { owner });
    }

    pub fn record_probe(&self, pool: PoolId, report: ProbeReport) {
        let _ = self.commands.send(Command::Probe { pool, report });
    }

    /// A pool a reloaded config added.
    pub fn add_pool(&self, config: PoolConfig) {
        let _ = self.commands.send(Command::AddPool(Box::new(config)));
    }

    /// A pool a reloaded config removed (its engine already stopped or never managed).
    /// Puts `config` in place of the pool with its id, in one published change.
    pub fn replace_pool(&self, config: PoolConfig) {
        let _ = self.commands.send(Command::ReplacePool(Box::new(config)));
    }

    pub fn remove_pool(&self, pool: PoolId) {
        let _ = self.commands.send(Command::RemovePool(pool));
    }

    pub fn record_engine(&self, pool: PoolId, report: EngineReport) {
        let _ = self.commands.send(Command::Engine { pool, report });
    }

    /// The last published registry (advisory: it may be a few microseconds behind).
    pub fn snapshot(&self) -> Arc<RegistrySnapshot> {
        Arc::clone(&self.snapshot.borrow())
    }

    pub fn watch_snapshot(&self) -> watch::Receiver<Arc<RegistrySnapshot>> {
        self.snapshot.clone()
    }

    /// Changes published from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Vec<RegistryEvent>>> {
        self.events.subscribe()
    }
}

/// Starts the actor; it runs until every handle is dropped.
pub fn spawn_registry(
    pools: &[PoolConfig],
    policy: LeasePolicy,
    metrics: Arc<Metrics>,
) -> (RegistryHandle, tokio::task::JoinHandle<()>) {
    let state = RegistryState::new(pools, policy);
    let (commands, inbox) = mpsc::unbounded_channel();
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(state.snapshot()));
    let events = broadcast::Sender::new(EVENT_BUFFER);
    let actor = RegistryActor {
        state,
        started: Instant::now(),
        inbox,
        snapshot: snapshot_tx,
        events: events.clone(),
        metrics,
        loads_begun: HashMap::new(),
    };
    let task = tokio::spawn(actor.run());
    (
        RegistryHandle {
            commands,
            snapshot,
            events,
        },
        task,
    )
}

struct RegistryActor {
    state: RegistryState,
    /// Time 0 of the state's clock.
    started: Instant,
    inbox: mpsc::UnboundedReceiver<Command>,
    snapshot: watch::Sender<Arc<RegistrySnapshot>>,
    events: broadcast::Sender<Arc<Vec<RegistryEvent>>>,
    metrics: Arc<Metrics>,
    /// When each loading pool's current load began, for the load duration: kept here, not in
    /// the state, whose clock does not run between commands.
    loads_begun: HashMap<PoolId, Instant>,
}

impl RegistryActor {
    /// Counts loads and unloads, and times a load from its report to its engine's Ready.
    fn count_load(&mut self, pool: &PoolId, report: &EngineReport) {
        match report {
            EngineReport::Loading => {
                self.metrics.loads.inc();
                self.loads_begun.insert(pool.clone(), Instant::now());
            }
            EngineReport::Ready { .. } => {
                if let Some(begun) = self.loads_begun.remove(pool) {
                    self.metrics
                        .load_duration
                        .observe(begun.elapsed().as_secs_f64());
                }
            }
            EngineReport::Unloaded { reason } => {
                self.loads_begun.remove(pool);
                self.metrics.record_unload(*reason);
                if *reason == UnloadReason::Cancelled {
                    self.metrics.loads_cancelled.inc();
                }
            }
            EngineReport::Down { .. } => {
                self.loads_begun.remove(pool);
            }
            EngineReport::Spawned { .. }
            | EngineReport::Draining
            | EngineReport::Swapped { .. }
            | EngineReport::Note { .. } => {}
        }
    }

    async fn run(mut self) {
        daemon_support::systemd::injected_fault(CORE_TASK).await;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let next_expiry = self
                .state
                .next_expiry_ms()
                .map(|at_ms| self.started + Duration::from_millis(at_ms));
            tokio::select! {
                received = self.inbox.recv_many(&mut batch, MAX_BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                () = wait_until(next_expiry) => {}
            }
            let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.state.advance(now_ms);
            for command in batch.drain(..) {
                self.apply(command);
            }
            self.publish();
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
            Command::Acquire {
                owner,
                target,
                slots,
                reply,
            } => {
                let result = self.state.acquire(owner, &target, slots);
                if let Ok(lease) = &result {
                    self.metrics.leases_granted.inc();
                    // The requester may have gone while we decided: then the lease goes back.
                    if reply.send(result.clone()).is_err() {
                        let _ = self.state.release(
                            owner.connection,
                            lease.id,
                            ReleaseOutcome::Cancelled,
                        );
                    }
                } else {
                    let _ = reply.send(result);
                }
            }
            Command::Release {
                owner,
                lease,
                outcome,
                reply,
            } => {
                let _ = reply.send(self.state.release(owner, lease, outcome));
            }
            Command::Reassert { owner, held, reply } => {
                let outcome = self.state.reassert(owner, &held);
                if !outcome.0.is_empty() {
                    tracing::info!(
                        connection = owner.connection,
                        leases = outcome.0.len(),
                        "re-asserted leases re-created"
                    );
                }
                // One line however many: a hostile Hello may carry thousands.
                if let Some((lease, error)) = outcome.1.first() {
                    tracing::warn!(connection = owner.connection, uid = owner.uid, refused = outcome.1.len(), first = %lease, %error, "re-asserted leases refused");
                }
                if reply.send(outcome).is_err() {
                    self.state.connection_closed(owner.connection);
                }
            }
            Command::Renew { owner, reply } => {
                let _ = reply.send(self.state.renew(owner));
            }
            Command::ConnectionClosed { owner } => {
                let released = self.state.connection_closed(owner);
                if released > 0 {
                    tracing::info!(
                        connection = owner,
                        released,
                        "connection closed; its leases came back"
                    );
                }
            }
            Command::Probe { pool, report } => {
                if report.result.is_err() {
                    self.metrics.record_probe_failure(&pool);
                }
                self.state.record_probe(&pool, report);
            }
            Command::Engine { pool, report } => {
                tracing::info!(%pool, ?report, "engine");
                self.count_load(&pool, &report);
                self.state.record_engine(&pool, report);
            }
            Command::AddPool(config) => {
                tracing::info!(pool = %config.id, "pool added");
                self.state.add_pool(&config);
            }
            Command::ReplacePool(config) => {
                tracing::info!(pool = %config.id, "pool replaced");
                self.state.replace_pool(&config);
            }
            Command::RemovePool(pool) => {
                tracing::info!(%pool, "pool removed");
                self.state.remove_pool(&pool);
            }
        }
    }

    fn publish(&mut self) {
        for end in self.state.take_ended() {
            self.metrics.record_lease_end(end);
        }
        let changes = self.state.take_changes();
        self.metrics
            .leases_active
            .set(i64::try_from(self.state.leased_slots()).unwrap_or(i64::MAX));
        self.snapshot.send_replace(Arc::new(self.state.snapshot()));
        if changes.is_empty() {
            return;
        }
        let epoch = self.state.epoch();
        for pending in &changes {
            log_change(&pending.change);
        }
        let batch: Vec<RegistryEvent> = changes
            .into_iter()
            .map(|pending| RegistryEvent {
                epoch,
                change: pending.change,
                lease_owners: pending.lease_owners,
            })
            .collect();
        // No receivers is fine: nobody is subscribed.
        let _ = self.events.send(Arc::new(batch));
    }
}

/// Sleeps until `deadline`; forever without one.
async fn wait_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn log_change(change: &Change) {
    if let Change::LeasesRevoked {
        pool,
        leases,
        reason,
    } = change
    {
        tracing::warn!(%pool, leases = leases.len(), %reason, "leases revoked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProbePolicy;
    use pool_ipc::registry::{ApiEndpoint, Endpoint, EngineKind, PoolState};

    fn config() -> Vec<PoolConfig> {
        vec![PoolConfig {
            id: PoolId("a".into()),
            model: "m".into(),
            engine: EngineKind::Llamacpp,
            source: crate::config::EngineSource::External {
                endpoint: Endpoint::Unix {
                    path: "/tmp/x.sock".into(),
                },
            },
            slots: Some(1),
            health_path: "/health".into(),
            probe: ProbePolicy::default(),
            api_endpoints: ApiEndpoint::defaults(EngineKind::Llamacpp),
            load: crate::config::LoadPolicy::Always,
        }]
    }

    fn policy(ttl_ms: Option<u64>) -> LeasePolicy {
        LeasePolicy {
            id_base: 0,
            signer: crate::registry::LeaseSigner::from_key([1; 64]),
            ttl_ms,
            max_slots_per_uid: 16,
        }
    }

    fn owner(connection: ConnectionId) -> Owner {
        Owner { connection, uid: 7 }
    }

    async fn ready_registry(ttl_ms: Option<u64>) -> RegistryHandle {
        let (registry, _task) = spawn_registry(&config(), policy(ttl_ms), Arc::new(Metrics::new()));
        registry.record_probe(
            PoolId("a".into()),
            ProbeReport {
                at_unix_ms: 1,
                result: Ok(()),
                alive: true,
                engine_version: None,
            },
        );
        let mut snapshots = registry.watch_snapshot();
        snapshots
            .wait_for(|s| s.pools[0].state == PoolState::Ready)
            .await
            .unwrap();
        registry
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_nobody_renews_expires_on_the_actors_own_timer_and_its_holder_is_told() {
        let registry = ready_registry(Some(1000)).await;
        let mut events = registry.subscribe_events();
        let started = tokio::time::Instant::now();
        let lease = registry
            .acquire(owner(1), AcquireTarget::Pool(PoolId("a".into())), 1)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(registry.renew(1).await.unwrap(), 1);
        assert_eq!(registry.renew(2).await.unwrap(), 0, "not connection 2's");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            registry.snapshot().pools[0].slots_free,
            0,
            "renewed at 600 ms: still held at 1200 ms"
        );
        // No command arrives from now on: only the actor's timer can expire the lease.
        let revoked = loop {
            let batch = events.recv().await.unwrap();
            if let Some(event) = batch
                .iter()
                .find(|event| matches!(event.change, Change::LeasesRevoked { .. }))
            {
                break event.clone();
            }
        };
        assert_eq!(started.elapsed(), Duration::from_millis(1600));
        assert_eq!(revoked.lease_owners, vec![1]);
        assert!(
            matches!(&revoked.change, Change::LeasesRevoked { leases, reason, .. } if leases == &vec![lease.id] && reason.contains("1000 ms")),
            "{revoked:?}"
        );
        assert_eq!(registry.snapshot().pools[0].slots_free, 1);
    }

    #[tokio::test]
    async fn a_vanished_requester_does_not_keep_its_lease() {
        let registry = ready_registry(None).await;
        // The requester gives up before the actor answers.
        let (reply, answer) = oneshot::channel();
        drop(answer);
        registry
            .commands
            .send(Command::Acquire {
                owner: owner(1),
                target: AcquireTarget::Pool(PoolId("a".into())),
                slots: 1,
                reply,
            })
            .unwrap();
        let lease = registry
            .acquire(owner(2), AcquireTarget::Pool(PoolId("a".into())), 1)
            .await;
        assert!(lease.is_ok(), "the abandoned lease came back: {lease:?}");
    }
}
