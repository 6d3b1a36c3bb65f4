//! The registry's plain state: pools, their slots and the leases on them, and every rule about
//! how they change. Synchronous, no I/O, no clock of its own: the actor owns the only instance,
//! feeds it commands and tells it the time ([`RegistryState::advance`]); tests drive it directly.
//!
//! Invariants (checked by `check_invariants` in tests): a lease holds one or more slots of one
//! pool, and a pool's free slots are `slots_total - slots held by its leases` (saturating), so
//! `0 <= slots_free <= slots_total` by construction and `slots_total - slots_free` is the slots
//! held; a new lease is granted only on a `Ready` pool with as many slots free as it asks for,
//! in the same step as the check; every lease belongs to exactly one live connection and dies
//! with it; no uid holds more than `max_slots_per_uid` slots through new leases or re-asserted
//! ones; a fresh lease id is never the id of a live or orphaned lease.
//!
//! Lease lifecycle. A lease ends when it is released, when its pool's engine goes (revoked), when
//! it is not renewed within the TTL (expired), or when its connection closes. Only the last
//! leaves it *orphaned*: its holder may re-assert it in the `Hello` of its next connection, within
//! [`REASSERT_GRACE_MS`], by showing the lease's secret. A lease issued before this daemon started
//! (a previous incarnation) is unknown here: it may come back once, with its secret, during the
//! first [`REASSERT_GRACE_MS`] after the start, so that clients keep their leases across a
//! pool-managerd restart. Released, revoked and expired leases never come back.

use super::signer::LeaseSigner;
use crate::config::{LoadPolicy, PoolConfig, ProbePolicy};
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{
    AcquireTarget, ApiEndpoint, Endpoint, EngineKind, Lease, LeaseId, PoolId, PoolSnapshot,
    PoolState, RegistrySnapshot, ReleaseOutcome,
};
use pool_ipc::wire::{Change, HeldLease};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

/// Identifies one accepted socket connection for the lifetime of the daemon.
pub type ConnectionId = u64;

/// How long an orphaned lease may be re-asserted, and how long after the start leases of a
/// previous incarnation may: a reconnecting client retries within a second (its backoff is capped
/// there), so a minute is generous, and it bounds both the orphan list and the replay of old
/// secrets after a restart.
pub const REASSERT_GRACE_MS: u64 = 60_000;

/// The most orphans remembered at once; past it the oldest are forgotten first. A peer that
/// takes leases and drops its connection in a loop could otherwise grow the list for a whole
/// grace period; a real reconnect re-asserts within a second, long before its orphans are oldest.
pub const MAX_ORPHANS: usize = 65_536;

/// Who holds a lease: its connection, and the uid behind it (what the per-peer cap counts: a peer
/// cannot get around it by opening more connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub connection: ConnectionId,
    pub uid: u32,
}

/// The rules for leases that hold for every pool.
#[derive(Debug, Clone)]
pub struct LeasePolicy {
    /// The first lease id of this incarnation (random, far from the previous one's).
    pub id_base: u64,
    pub signer: LeaseSigner,
    /// A lease not renewed for this long expires; `None`: leases never expire.
    pub ttl_ms: Option<u64>,
    /// The most slots the leases of one uid may hold at once, over every pool.
    pub max_slots_per_uid: u32,
}

/// What a health probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub at_unix_ms: u64,
    /// Ok when the engine says it is ready.
    pub result: Result<(), String>,
    /// The engine answered at all (a 503 while loading counts): the liveness half.
    pub alive: bool,
    /// The engine's version, where the engine reports one.
    pub engine_version: Option<String>,
}

/// What an engine's supervisor saw happen (probe results travel as [`ProbeReport`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineReport {
    /// A new engine process is starting at `endpoint`; whatever served before is gone.
    Spawned { endpoint: Endpoint, restarts: u32 },
    /// The engine passed its readiness check; `slots` where the engine reported them.
    Ready {
        slots: Option<u32>,
        engine_version: Option<String>,
        at_unix_ms: u64,
    },
    /// No new leases; live leases run on.
    Draining,
    /// The engine is gone (exited, killed, stopped); the pool is now `state`.
    Down { reason: String, state: PoolState },
    /// A reload brought a new engine up at `endpoint`; new leases go there.
    Swapped {
        endpoint: Endpoint,
        slots: Option<u32>,
        engine_version: Option<String>,
    },
    /// Something went wrong that leaves the pool as it is (e.g. a reload rolled back).
    Note { error: String },
    /// An on-demand pool's engine is being started; the pool shows Loading until it is Ready
    /// (a [`Spawned`](EngineReport::Spawned) meanwhile keeps it Loading).
    Loading,
    /// An on-demand pool's engine was stopped: no engine, no leases, loads on demand.
    Unloaded { reason: UnloadReason },
}

/// Why an on-demand pool was unloaded, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnloadReason {
    /// No lease for its `idle_unload_ms`.
    Idle,
    /// `pool-managerd unload` (or the shim's `POST /pools/{id}/unload`).
    Operator,
    /// A load given up before it was done: nobody waited for it any more.
    Cancelled,
}

impl UnloadReason {
    pub fn name(self) -> &'static str {
        match self {
            UnloadReason::Idle => "idle",
            UnloadReason::Operator => "operator",
            UnloadReason::Cancelled => "cancelled",
        }
    }
}

/// Why leases ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseEnd {
    Released(ReleaseOutcome),
    ConnectionClosed,
    Revoked,
    /// Not renewed within the TTL.
    Expired,
}

impl LeaseEnd {
    pub fn name(self) -> &'static str {
        match self {
            LeaseEnd::Released(outcome) => outcome.name(),
            LeaseEnd::ConnectionClosed => "connection_closed",
            LeaseEnd::Revoked => "revoked",
            LeaseEnd::Expired => "expired",
        }
    }
}

/// One change to publish, with the connections it must reach even if they did not subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChange {
    pub change: Change,
    pub lease_owners: Vec<ConnectionId>,
}

#[derive(Debug)]
struct PoolEntry {
    model: String,
    engine: EngineKind,
    endpoint: Endpoint,
    probe: ProbePolicy,
    state: PoolState,
    live: bool,
    slots_total: u32,
    /// Each live lease on the pool and the slots it holds (at least 1); changed only through
    /// `add_lease` and `remove_lease`, which keep `held` its sum.
    leases: BTreeMap<LeaseId, u32>,
    /// Slots held by `leases`, kept as they change: the free-slot check of every Acquire and
    /// every published snapshot reads it, and summing thousands of leases each time made a
    /// burst quadratic.
    held: u32,
    api_endpoints: Vec<ApiEndpoint>,
    engine_version: Option<String>,
    last_error: Option<String>,
    restarts: u32,
    last_probe_unix_ms: Option<u64>,
    consecutive_failures: u32,
    consecutive_successes: u32,
}

impl PoolEntry {
    fn slots_held(&self) -> u32 {
        self.held
    }

    fn add_lease(&mut self, id: LeaseId, slots: u32) {
        if let Some(replaced) = self.leases.insert(id, slots) {
            self.held = self.held.saturating_sub(replaced);
        }
        self.held = self.held.saturating_add(slots);
    }

    fn remove_lease(&mut self, id: LeaseId) {
        if let Some(slots) = self.leases.remove(&id) {
            self.held = self.held.saturating_sub(slots);
        }
    }

    fn slots_free(&self) -> u32 {
        // Held slots exceed the total only after an engine swap to fewer slots (see
        // `EngineReport::Swapped`): then none are free until enough leases end.
        self.slots_total.saturating_sub(self.slots_held())
    }
}

#[derive(Debug)]
struct LeaseRecord {
    pool: PoolId,
    owner: Owner,
    slots: u32,
    /// When it expires unless renewed (ms on the actor's clock); `None` without a TTL.
    expires_at_ms: Option<u64>,
}

/// A lease whose connection closed under it: its holder may re-assert it for a while.
#[derive(Debug)]
struct Orphan {
    pool: PoolId,
    since_ms: u64,
}

#[derive(Debug)]
pub struct RegistryState {
    epoch: u64,
    pools: BTreeMap<PoolId, PoolEntry>,
    leases: HashMap<LeaseId, LeaseRecord>,
    policy: LeasePolicy,
    next_lease: u64,
    /// The actor's clock (ms since it started), as of the last [`Self::advance`].
    now_ms: u64,
    /// Every lease that can expire, by when.
    expiries: BTreeSet<(u64, LeaseId)>,
    orphans: HashMap<LeaseId, Orphan>,
    /// Orphans in the order they were made, to forget them after the grace; an entry whose time
    /// no longer matches `orphans` is stale.
    orphaned_order: VecDeque<(u64, LeaseId)>,
    /// Leases of a previous incarnation re-created during this one's grace: they come back once.
    adopted: HashSet<LeaseId>,
    /// Slots held per uid: what the per-peer cap counts.
    slots_by_uid: HashMap<u32, u64>,
    dirty: BTreeSet<PoolId>,
    revocations: Vec<PendingChange>,
    ended: Vec<LeaseEnd>,
}

fn not_found_pool(pool: &PoolId) -> IpcError {
    IpcError::new(
        ErrorCode::NotFound,
        format!("unknown pool {:?}", pool.as_str()),
    )
}

impl RegistryState {
    /// Starts at time 0 on the caller's clock.
    pub fn new(pools: &[PoolConfig], policy: LeasePolicy) -> RegistryState {
        let pools = pools
            .iter()
            .map(|config| (config.id.clone(), new_entry(config)))
            .collect();
        RegistryState {
            epoch: 0,
            pools,
            leases: HashMap::new(),
            next_lease: policy.id_base,
            policy,
            now_ms: 0,
            expiries: BTreeSet::new(),
            orphans: HashMap::new(),
            orphaned_order: VecDeque::new(),
            adopted: HashSet::new(),
            slots_by_uid: HashMap::new(),
            dirty: BTreeSet::new(),
            revocations: Vec::new(),
            ended: Vec::new(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves the clock to `now_ms` (ms since the actor started; never backwards): leases whose
    /// TTL ran out expire, their holders are told, and orphans past the grace are forgotten.
    pub fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.expire_due();
        while self
            .orphaned_order
            .front()
            .is_some_and(|(since_ms, _)| since_ms.saturating_add(REASSERT_GRACE_MS) <= self.now_ms)
        {
            self.forget_oldest_orphan();
        }
        if self.now_ms >= REASSERT_GRACE_MS && !self.adopted.is_empty() {
            // Past the grace no lease of a previous incarnation comes back anyway.
            self.adopted = HashSet::new();
        }
    }

    /// When the next lease expires (ms on the actor's clock), if any can.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.expiries.first().map(|(at_ms, _)| *at_ms)
    }

    fn expire_due(&mut self) {
        let mut expired: BTreeMap<PoolId, (Vec<LeaseId>, Vec<ConnectionId>)> = BTreeMap::new();
        while self
            .expiries
            .first()
            .is_some_and(|(at_ms, _)| *at_ms <= self.now_ms)
        {
            // Popped first: the loop ends even if an entry had no lease behind it.
            let Some((_, lease)) = self.expiries.pop_first() else {
                break;
            };
            if let Some(record) = self.drop_lease(lease, LeaseEnd::Expired) {
                let (leases, owners) = expired.entry(record.pool).or_default();
                leases.push(lease);
                owners.push(record.owner.connection);
            }
        }
        let ttl_ms = self.policy.ttl_ms.unwrap_or(0);
        for (pool, (leases, mut owners)) in expired {
            owners.sort_unstable();
            owners.dedup();
            self.revocations.push(PendingChange {
                change: Change::LeasesRevoked {
                    pool,
                    leases,
                    reason: format!(
                        "the lease was not renewed within its {ttl_ms} ms time-to-live"
                    ),
                },
                lease_owners: owners,
            });
        }
    }

    /// Renews every lease of `connection` for another TTL; returns how many it holds.
    pub fn renew(&mut self, connection: ConnectionId) -> u32 {
        let expires_at_ms = self.expiry_from_now();
        let mut renewed = 0u32;
        for (id, record) in &mut self.leases {
            if record.owner.connection != connection {
                continue;
            }
            renewed = renewed.saturating_add(1);
            if let Some(old) = record.expires_at_ms {
                self.expiries.remove(&(old, *id));
            }
            record.expires_at_ms = expires_at_ms;
            if let Some(new) = expires_at_ms {
                self.expiries.insert((new, *id));
            }
        }
        renewed
    }

    fn expiry_from_now(&self) -> Option<u64> {
        self.policy
            .ttl_ms
            .map(|ttl_ms| self.now_ms.saturating_add(ttl_ms))
    }

    /// Refuses `slots` more slots for `owner` when its uid would hold more than its cap.
    fn check_cap(&self, owner: Owner, slots: u32) -> Result<(), IpcError> {
        let held = self.slots_by_uid.get(&owner.uid).copied().unwrap_or(0);
        let cap = self.policy.max_slots_per_uid;
        if held.saturating_add(u64::from(slots)) > u64::from(cap) {
            return Err(IpcError::new(
                ErrorCode::LeaseCapReached,
                format!(
                    "uid {} holds {held} leased slots and asks for {slots} more; one uid may hold at most {cap} (server.max_leased_slots_per_uid)",
                    owner.uid
                ),
            ));
        }
        Ok(())
    }

    /// A lease id nobody holds and no orphan has: ids run on from this incarnation's base, and
    /// skip any a re-assertion already put there.
    fn fresh_lease_id(&mut self) -> LeaseId {
        loop {
            let id = LeaseId(self.next_lease);
            self.next_lease = self.next_lease.wrapping_add(1);
            if !self.leases.contains_key(&id) && !self.orphans.contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether this incarnation handed out `lease` (ids run from the base up).
    fn issued_here(&self, lease: LeaseId) -> bool {
        lease.0.wrapping_sub(self.policy.id_base)
            < self.next_lease.wrapping_sub(self.policy.id_base)
    }

    /// Puts a granted or re-created lease in place: on its pool, in the uid's count, on the
    /// expiry clock.
    fn insert_lease(&mut self, id: LeaseId, pool: PoolId, owner: Owner, slots: u32) {
        if let Some(entry) = self.pools.get_mut(&pool) {
            entry.add_lease(id, slots);
        }
        let expires_at_ms = self.expiry_from_now();
        if let Some(at_ms) = expires_at_ms {
            self.expiries.insert((at_ms, id));
        }
        *self.slots_by_uid.entry(owner.uid).or_default() += u64::from(slots);
        self.dirty.insert(pool.clone());
        self.leases.insert(
            id,
            LeaseRecord {
                pool,
                owner,
                slots,
                expires_at_ms,
            },
        );
    }

    /// Check-and-reserve: grants a lease of `slots` slots only where that many are free right
    /// now. Asking for none, or for more than the pool has at all, is a bad request: waiting
    /// would never help.
    pub fn acquire(
        &mut self,
        owner: Owner,
        target: &AcquireTarget,
        slots: u32,
    ) -> Result<Lease, IpcError> {
        if slots == 0 {
            return Err(IpcError::new(
                ErrorCode::BadRequest,
                "an Acquire must ask for at least 1 slot",
            ));
        }
        let pool_id = match target {
            AcquireTarget::Pool(pool) => {
                let entry = self.pools.get(pool).ok_or_else(|| not_found_pool(pool))?;
                match entry.state {
                    PoolState::Ready if slots > entry.slots_total => {
                        return Err(IpcError::new(
                            ErrorCode::BadRequest,
                            format!(
                                "asks for {slots} slots; pool {:?} has {}",
                                pool.as_str(),
                                entry.slots_total
                            ),
                        ));
                    }
                    PoolState::Ready if entry.slots_free() >= slots => pool.clone(),
                    PoolState::Ready => {
                        return Err(IpcError::new(
                            ErrorCode::NoCapacity,
                            format!(
                                "asks for {slots} slots; {} of the {} slots of pool {:?} are free",
                                entry.slots_free(),
                                entry.slots_total,
                                pool.as_str()
                            ),
                        ));
                    }
                    PoolState::Draining => {
                        return Err(IpcError::new(
                            ErrorCode::Draining,
                            format!("pool {pool:?} is draining"),
                        ));
                    }
                    state => {
                        return Err(IpcError::new(
                            ErrorCode::NotReady,
                            format!("pool {pool:?} is {state}"),
                        ));
                    }
                }
            }
            AcquireTarget::Model(model) => self.least_loaded_pool_for(model, slots)?,
        };
        self.check_cap(owner, slots)?;
        let Some(entry) = self.pools.get(&pool_id) else {
            return Err(not_found_pool(&pool_id));
        };
        let (model, engine, endpoint) = (entry.model.clone(), entry.engine, entry.endpoint.clone());
        let id = self.fresh_lease_id();
        let secret = self.policy.signer.sign(id, &pool_id, slots);
        self.insert_lease(id, pool_id.clone(), owner, slots);
        Ok(Lease {
            id,
            pool: pool_id,
            model,
            engine,
            endpoint,
            slots,
            secret,
            // The next flush publishes the change that adds this lease, under the next epoch.
            registry_epoch: self.epoch + 1,
        })
    }

    fn least_loaded_pool_for(&self, model: &str, slots: u32) -> Result<PoolId, IpcError> {
        let serving: Vec<(&PoolId, &PoolEntry)> = self
            .pools
            .iter()
            .filter(|(_, entry)| entry.model == model)
            .collect();
        if serving.is_empty() {
            return Err(IpcError::new(
                ErrorCode::NotFound,
                format!("no pool serves model {model:?}"),
            ));
        }
        let ready: Vec<&(&PoolId, &PoolEntry)> = serving
            .iter()
            .filter(|(_, entry)| entry.state == PoolState::Ready)
            .collect();
        if ready.is_empty() {
            return Err(IpcError::new(
                ErrorCode::NotReady,
                format!("no pool serving model {model:?} is ready"),
            ));
        }
        // Every pool of the model counts here, ready or not: one that comes back may fit.
        let largest = serving
            .iter()
            .map(|(_, entry)| entry.slots_total)
            .max()
            .unwrap_or(0);
        if slots > largest {
            return Err(IpcError::new(
                ErrorCode::BadRequest,
                format!(
                    "asks for {slots} slots; the largest pool serving model {model:?} has {largest}"
                ),
            ));
        }
        ready
            .iter()
            .filter(|(_, entry)| entry.slots_free() >= slots)
            // Least loaded: the largest share of free slots; ties go to the first pool id.
            .max_by(|(a_id, a), (b_id, b)| {
                let a_share = u64::from(a.slots_free()) * u64::from(b.slots_total);
                let b_share = u64::from(b.slots_free()) * u64::from(a.slots_total);
                a_share.cmp(&b_share).then_with(|| b_id.cmp(a_id))
            })
            .map(|(id, _)| (*id).clone())
            .ok_or_else(|| {
                IpcError::new(
                    ErrorCode::NoCapacity,
                    format!("no ready pool serving {model:?} has {slots} slots free right now"),
                )
            })
    }

    /// Releases a lease held by `connection`; another connection's lease is not found.
    pub fn release(
        &mut self,
        connection: ConnectionId,
        lease: LeaseId,
        outcome: ReleaseOutcome,
    ) -> Result<(), IpcError> {
        match self.leases.get(&lease) {
            Some(record) if record.owner.connection == connection => {}
            _ => {
                return Err(IpcError::new(
                    ErrorCode::NotFound,
                    format!("lease {lease} is not held by this connection"),
                ));
            }
        }
        self.drop_lease(lease, LeaseEnd::Released(outcome));
        Ok(())
    }

    fn drop_lease(&mut self, lease: LeaseId, end: LeaseEnd) -> Option<LeaseRecord> {
        let record = self.leases.remove(&lease)?;
        if let Some(entry) = self.pools.get_mut(&record.pool) {
            entry.remove_lease(lease);
        }
        if let Some(at_ms) = record.expires_at_ms {
            self.expiries.remove(&(at_ms, lease));
        }
        if let Some(held) = self.slots_by_uid.get_mut(&record.owner.uid) {
            *held = held.saturating_sub(u64::from(record.slots));
            if *held == 0 {
                self.slots_by_uid.remove(&record.owner.uid);
            }
        }
        self.dirty.insert(record.pool.clone());
        self.ended.push(end);
        Some(record)
    }

    /// Every lease of a closed connection comes back, and is orphaned: its holder may re-assert
    /// it from its next connection for a while. Returns how many.
    pub fn connection_closed(&mut self, connection: ConnectionId) -> usize {
        let owned: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, record)| record.owner.connection == connection)
            .map(|(id, _)| *id)
            .collect();
        for lease in &owned {
            if let Some(record) = self.drop_lease(*lease, LeaseEnd::ConnectionClosed) {
                self.orphans.insert(
                    *lease,
                    Orphan {
                        pool: record.pool,
                        since_ms: self.now_ms,
                    },
                );
                self.orphaned_order.push_back((self.now_ms, *lease));
            }
        }
        while self.orphaned_order.len() > MAX_ORPHANS {
            self.forget_oldest_orphan();
        }
        owned.len()
    }

    fn forget_oldest_orphan(&mut self) {
        if let Some((since_ms, lease)) = self.orphaned_order.pop_front()
            && self
                .orphans
                .get(&lease)
                .is_some_and(|orphan| orphan.since_ms == since_ms)
        {
            self.orphans.remove(&lease);
        }
    }

    /// Re-creates leases a reconnecting client still uses, each at its size. A lease comes back
    /// only with its secret, only if it may come back at all (see the module's header: an orphan,
    /// or a lease of a previous incarnation during the grace), on a pool that is Ready or Draining
    /// with as many slots free as it holds, and within the uid's cap.
    pub fn reassert(
        &mut self,
        owner: Owner,
        held: &[HeldLease],
    ) -> (Vec<LeaseId>, Vec<(LeaseId, IpcError)>) {
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for claim in held {
            match self.check_reassert(owner, claim) {
                Ok(()) => {
                    let lease = claim.lease;
                    if self.orphans.remove(&lease).is_none() {
                        self.adopted.insert(lease);
                    }
                    self.insert_lease(lease, claim.pool.clone(), owner, claim.slots);
                    accepted.push(lease);
                }
                Err(error) => rejected.push((claim.lease, error)),
            }
        }
        (accepted, rejected)
    }

    fn check_reassert(&self, owner: Owner, claim: &HeldLease) -> Result<(), IpcError> {
        let HeldLease {
            lease,
            pool,
            slots,
            secret,
        } = claim;
        let (lease, slots) = (*lease, *slots);
        if slots == 0 {
            return Err(IpcError::new(
                ErrorCode::BadRequest,
                format!("re-asserted lease {lease} holds no slots"),
            ));
        }
        // First, so that a peer without the secret learns nothing about the lease.
        if !self.policy.signer.verify(lease, pool, slots, secret) {
            return Err(IpcError::new(
                ErrorCode::Unauthorized,
                format!(
                    "lease {lease} of {slots} slots on pool {:?} was not granted to this client (wrong secret)",
                    pool.as_str()
                ),
            ));
        }
        if self.leases.contains_key(&lease) {
            return Err(IpcError::new(
                ErrorCode::BadRequest,
                format!("lease {lease} is already held by a live connection"),
            ));
        }
        let may_return = self.orphans.contains_key(&lease)
            || (!self.issued_here(lease)
                && !self.adopted.contains(&lease)
                && self.now_ms < REASSERT_GRACE_MS);
        if !may_return {
            return Err(IpcError::new(
                ErrorCode::NotFound,
                format!(
                    "lease {lease} has ended (released, revoked, expired, or orphaned more than {} s ago)",
                    REASSERT_GRACE_MS / 1000
                ),
            ));
        }
        let entry = self.pools.get(pool).ok_or_else(|| not_found_pool(pool))?;
        if !matches!(entry.state, PoolState::Ready | PoolState::Draining) {
            return Err(IpcError::new(
                ErrorCode::NotReady,
                format!("pool {pool:?} is {}", entry.state),
            ));
        }
        if entry.slots_free() < slots {
            return Err(IpcError::new(
                ErrorCode::NoCapacity,
                format!(
                    "re-asserted lease {lease} holds {slots} slots; pool {:?} has {} free",
                    pool.as_str(),
                    entry.slots_free()
                ),
            ));
        }
        self.check_cap(owner, slots)
    }

    /// Applies a probe result to the pool's state (see the thresholds in [`ProbePolicy`]).
    /// A pool that turns Unhealthy loses its leases: their holders are told.
    pub fn record_probe(&mut self, pool: &PoolId, report: ProbeReport) {
        let Some(entry) = self.pools.get_mut(pool) else {
            return;
        };
        let before = (
            entry.state,
            entry.live,
            entry.engine_version.clone(),
            entry.last_error.clone(),
        );
        entry.last_probe_unix_ms = Some(report.at_unix_ms);
        if report.engine_version.is_some() {
            entry.engine_version = report.engine_version;
        }
        let mut revoke = false;
        entry.live = report.alive;
        match report.result {
            Ok(()) => {
                entry.consecutive_failures = 0;
                entry.consecutive_successes = entry.consecutive_successes.saturating_add(1);
                let recovering = matches!(entry.state, PoolState::Starting | PoolState::Unhealthy);
                if recovering && entry.consecutive_successes >= entry.probe.success_threshold {
                    entry.state = PoolState::Ready;
                    entry.last_error = None;
                }
            }
            Err(error) => {
                entry.consecutive_successes = 0;
                entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
                entry.last_error = Some(error);
                let give_up = match entry.state {
                    PoolState::Starting => true,
                    PoolState::Ready => entry.consecutive_failures >= entry.probe.failure_threshold,
                    _ => false,
                };
                if give_up {
                    entry.state = PoolState::Unhealthy;
                    revoke = true;
                }
            }
        }
        let after = (
            entry.state,
            entry.live,
            entry.engine_version.clone(),
            entry.last_error.clone(),
        );
        if before != after {
            self.dirty.insert(pool.clone());
        }
        if revoke {
            self.revoke_pool_leases(pool, "the pool's engine failed its health probes");
        }
    }

    /// Applies what a supervisor reports about its engine.
    pub fn record_engine(&mut self, pool: &PoolId, report: EngineReport) {
        let Some(entry) = self.pools.get_mut(pool) else {
            return;
        };
        let mut revoke = None;
        match report {
            EngineReport::Spawned { endpoint, restarts } => {
                entry.endpoint = endpoint;
                entry.restarts = restarts;
                if entry.state != PoolState::Loading {
                    entry.state = PoolState::Starting;
                }
                entry.live = false;
                entry.consecutive_failures = 0;
                entry.consecutive_successes = 0;
                revoke = Some("the engine was replaced".to_owned());
            }
            EngineReport::Ready {
                slots,
                engine_version,
                at_unix_ms,
            } => {
                if let Some(slots) = slots {
                    entry.slots_total = slots;
                }
                if engine_version.is_some() {
                    entry.engine_version = engine_version;
                }
                entry.state = PoolState::Ready;
                entry.live = true;
                entry.last_error = None;
                entry.last_probe_unix_ms = Some(at_unix_ms);
            }
            EngineReport::Draining => entry.state = PoolState::Draining,
            EngineReport::Down { reason, state } => {
                entry.live = false;
                entry.state = state;
                revoke = Some(format!("the engine is down: {reason}"));
                entry.last_error = Some(reason);
            }
            EngineReport::Swapped {
                endpoint,
                slots,
                engine_version,
            } => {
                // Leases on the old engine still count against the new one's slots until they
                // end: conservative, never oversubscribing the new engine (if it has fewer slots
                // than its leases hold, it shows none free until enough of them end).
                entry.endpoint = endpoint;
                if let Some(slots) = slots {
                    entry.slots_total = slots;
                }
                if engine_version.is_some() {
                    entry.engine_version = engine_version;
                }
                entry.state = PoolState::Ready;
                entry.live = true;
                entry.consecutive_failures = 0;
                entry.consecutive_successes = 0;
                entry.last_error = None;
            }
            EngineReport::Note { error } => entry.last_error = Some(error),
            EngineReport::Loading => {
                entry.state = PoolState::Loading;
                entry.live = false;
            }
            EngineReport::Unloaded { reason } => {
                entry.state = PoolState::Unloaded;
                entry.live = false;
                revoke = Some(format!(
                    "the pool was unloaded ({}) with the lease still held",
                    reason.name()
                ));
            }
        }
        self.dirty.insert(pool.clone());
        if let Some(reason) = revoke {
            self.revoke_pool_leases(pool, &reason);
        }
    }

    fn revoke_pool_leases(&mut self, pool: &PoolId, reason: &str) {
        // Orphans belonged to the engine that is going: they must not come back on its successor.
        self.orphans.retain(|_, orphan| orphan.pool != *pool);
        let Some(entry) = self.pools.get(pool) else {
            return;
        };
        let leases: Vec<LeaseId> = entry.leases.keys().copied().collect();
        if leases.is_empty() {
            return;
        }
        let mut owners: Vec<ConnectionId> = leases
            .iter()
            .filter_map(|lease| self.leases.get(lease).map(|record| record.owner.connection))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        for lease in &leases {
            self.drop_lease(*lease, LeaseEnd::Revoked);
        }
        self.revocations.push(PendingChange {
            change: Change::LeasesRevoked {
                pool: pool.clone(),
                leases,
                reason: reason.to_owned(),
            },
            lease_owners: owners,
        });
    }

    /// Adds a pool from a reloaded config (Starting until its engine reports); an existing id is
    /// left as it is.
    pub fn add_pool(&mut self, config: &PoolConfig) {
        if self.pools.contains_key(&config.id) {
            return;
        }
        self.pools.insert(config.id.clone(), new_entry(config));
        self.dirty.insert(config.id.clone());
    }

    /// Puts a reloaded config in place of a pool's current one at once (Starting until its new
    /// engine reports), so the pool never looks absent: leases still held on the old engine are
    /// revoked and their holders told. A pool not there yet is simply added.
    pub fn replace_pool(&mut self, config: &PoolConfig) {
        self.revoke_pool_leases(
            &config.id,
            "the pool was replaced by a configuration reload",
        );
        self.pools.insert(config.id.clone(), new_entry(config));
        self.dirty.insert(config.id.clone());
    }

    /// Removes a pool that left the config: its leases are revoked, subscribers told.
    pub fn remove_pool(&mut self, pool: &PoolId) {
        if !self.pools.contains_key(pool) {
            return;
        }
        self.revoke_pool_leases(pool, "the pool was removed from the configuration");
        self.pools.remove(pool);
        self.dirty.remove(pool);
        self.revocations.push(PendingChange {
            change: Change::PoolRemoved(pool.clone()),
            lease_owners: Vec::new(),
        });
    }

    /// Whether any pool still waits for its first probe.
    pub fn any_unprobed(&self) -> bool {
        self.pools
            .values()
            .any(|entry| entry.last_probe_unix_ms.is_none())
    }

    pub fn snapshot(&self) -> RegistrySnapshot {
        RegistrySnapshot {
            epoch: self.epoch,
            pools: self
                .pools
                .iter()
                .map(|(id, entry)| pool_snapshot(id, entry))
                .collect(),
        }
    }

    /// Everything that changed since the last call, coalesced: one update per changed pool
    /// (its latest state), after the revocations. Bumps the epoch when anything changed.
    pub fn take_changes(&mut self) -> Vec<PendingChange> {
        if self.dirty.is_empty() && self.revocations.is_empty() {
            return Vec::new();
        }
        self.epoch += 1;
        let mut changes = std::mem::take(&mut self.revocations);
        for id in std::mem::take(&mut self.dirty) {
            if let Some(entry) = self.pools.get(&id) {
                changes.push(PendingChange {
                    change: Change::PoolUpdated(pool_snapshot(&id, entry)),
                    lease_owners: Vec::new(),
                });
            }
        }
        changes
    }

    /// How leases ended since the last call (for metrics).
    pub fn take_ended(&mut self) -> Vec<LeaseEnd> {
        std::mem::take(&mut self.ended)
    }

    /// Slots held by live leases, over every pool.
    pub fn leased_slots(&self) -> u64 {
        self.pools
            .values()
            .map(|entry| u64::from(entry.slots_held()))
            .sum()
    }

    #[cfg(test)]
    pub fn check_invariants(&self) {
        let mut counted = 0;
        for (id, entry) in &self.pools {
            let held: u64 = entry.leases.values().map(|slots| u64::from(*slots)).sum();
            assert_eq!(
                u64::from(entry.held),
                held,
                "{id}: the kept sum of its leases' slots"
            );
            assert!(held <= u64::from(entry.slots_total), "{id} oversubscribed");
            assert_eq!(
                u64::from(entry.slots_total - entry.slots_free()),
                held,
                "{id}: slots_total - slots_free must be the slots its leases hold"
            );
            for (lease, slots) in &entry.leases {
                assert!(*slots >= 1, "lease {lease} on {id} holds no slot");
                assert_eq!(self.leases.get(lease).map(|r| &r.pool), Some(id));
            }
            counted += entry.leases.len();
        }
        assert_eq!(counted, self.leases.len());
        let mut by_uid: HashMap<u32, u64> = HashMap::new();
        for (id, record) in &self.leases {
            *by_uid.entry(record.owner.uid).or_default() += u64::from(record.slots);
            assert!(
                !self.orphans.contains_key(id),
                "lease {id} is live and orphaned"
            );
            if let Some(at_ms) = record.expires_at_ms {
                assert!(
                    self.expiries.contains(&(at_ms, *id)),
                    "lease {id} off the clock"
                );
            }
        }
        assert_eq!(by_uid, self.slots_by_uid, "slots per uid");
        assert!(
            self.expiries.iter().all(|(at_ms, id)| self
                .leases
                .get(id)
                .and_then(|r| r.expires_at_ms)
                == Some(*at_ms)),
            "an expiry of no live lease"
        );
    }
}

fn new_entry(config: &PoolConfig) -> PoolEntry {
    PoolEntry {
        model: config.model.clone(),
        engine: config.engine,
        endpoint: config.initial_endpoint(),
        probe: config.probe.clone(),
        // An on-demand pool has no engine until one is adopted or loaded.
        state: if matches!(config.load, LoadPolicy::OnDemand { .. }) {
            PoolState::Unloaded
        } else {
            PoolState::Starting
        },
        live: false,
        slots_total: config.slots.unwrap_or(0),
        leases: BTreeMap::new(),
        held: 0,
        api_endpoints: config.api_endpoints.clone(),
        engine_version: None,
        last_error: None,
        restarts: 0,
        last_probe_unix_ms: None,
        consecutive_failures: 0,
        consecutive_successes: 0,
    }
}

fn pool_snapshot(id: &PoolId, entry: &PoolEntry) -> PoolSnapshot {
    PoolSnapshot {
        pool_id: id.clone(),
        model: entry.model.clone(),
        engine: entry.engine,
        endpoint: entry.endpoint.clone(),
        state: entry.state,
        live: entry.live,
        slots_total: entry.slots_total,
        slots_free: entry.slots_free(),
        engine_version: entry.engine_version.clone(),
        last_error: entry.last_error.clone(),
        restarts: entry.restarts,
        last_probe_unix_ms: entry.last_probe_unix_ms,
        api_endpoints: entry.api_endpoints.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(id: &str, model: &str, slots: u32) -> PoolConfig {
        PoolConfig {
            id: PoolId(id.into()),
            model: model.into(),
            engine: EngineKind::Llamacpp,
            source: crate::config::EngineSource::External {
                endpoint: Endpoint::Http {
                    authority: "127.0.0.1:1".into(),
                },
            },
            slots: Some(slots),
            health_path: "/health".into(),
            probe: ProbePolicy::default(),
            api_endpoints: ApiEndpoint::defaults(EngineKind::Llamacpp),
            load: crate::config::LoadPolicy::Always,
        }
    }

    fn ok() -> ProbeReport {
        ProbeReport {
            at_unix_ms: 1,
            result: Ok(()),
            alive: true,
            engine_version: Some("b1".into()),
        }
    }

    fn failed() -> ProbeReport {
        ProbeReport {
            at_unix_ms: 2,
            result: Err("connection refused".into()),
            alive: false,
            engine_version: None,
        }
    }

    /// The uid every test connection runs as, unless a test says otherwise.
    const UID: u32 = 1000;

    fn owner(connection: ConnectionId) -> Owner {
        Owner {
            connection,
            uid: UID,
        }
    }

    fn signer() -> LeaseSigner {
        LeaseSigner::from_key([3; 64])
    }

    fn policy() -> LeasePolicy {
        LeasePolicy {
            id_base: 100,
            signer: signer(),
            ttl_ms: None,
            max_slots_per_uid: 1024,
        }
    }

    /// A lease as its rightful holder re-asserts it: with the secret it was granted with.
    fn held(lease: u64, pool: &str, slots: u32) -> HeldLease {
        let (lease, pool) = (LeaseId(lease), PoolId(pool.into()));
        HeldLease {
            secret: signer().sign(lease, &pool, slots),
            lease,
            pool,
            slots,
        }
    }

    fn ready_registry(pools: &[PoolConfig]) -> RegistryState {
        let mut state = RegistryState::new(pools, policy());
        for config in pools {
            state.record_probe(&config.id, ok());
        }
        state.take_changes();
        state
    }

    fn target(id: &str) -> AcquireTarget {
        AcquireTarget::Pool(PoolId(id.into()))
    }

    #[test]
    fn acquire_never_oversubscribes_a_pool() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        assert!(state.acquire(owner(1), &target("a"), 1).is_ok());
        assert!(state.acquire(owner(2), &target("a"), 1).is_ok());
        let error = state.acquire(owner(3), &target("a"), 1).unwrap_err();
        assert_eq!(error.code, ErrorCode::NoCapacity);
        state.check_invariants();
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
    }

    #[test]
    fn a_two_slot_lease_fills_a_two_slot_pool_and_a_one_slot_acquire_finds_no_capacity() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(1), &target("a"), 2).unwrap();
        assert_eq!(lease.slots, 2);
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
        assert_eq!(state.snapshot().pools[0].active_leases(), 2);
        assert_eq!(state.leased_slots(), 2);
        let error = state.acquire(owner(2), &target("a"), 1).unwrap_err();
        assert_eq!(error.code, ErrorCode::NoCapacity, "{error}");
        state.check_invariants();
    }

    #[test]
    fn more_slots_than_the_pool_has_is_a_bad_request_that_changes_nothing() {
        let mut state = ready_registry(&[pool("p", "m", 2)]);
        state.acquire(owner(1), &target("p"), 1).unwrap();
        state.take_changes();
        let before = state.snapshot();
        let error = state.acquire(owner(2), &target("p"), 3).unwrap_err();
        assert_eq!(error.code, ErrorCode::BadRequest);
        assert!(
            error
                .message
                .contains(r#"asks for 3 slots; pool "p" has 2"#),
            "{error}"
        );
        assert_eq!(state.snapshot(), before);
        assert!(
            state.take_changes().is_empty(),
            "a refusal publishes nothing"
        );
        state.check_invariants();
    }

    #[test]
    fn an_acquire_for_no_slots_is_a_bad_request() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        for target in [target("a"), AcquireTarget::Model("m".into())] {
            let error = state.acquire(owner(1), &target, 0).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest, "{error}");
        }
        assert_eq!(state.snapshot().pools[0].slots_free, 2);
        assert_eq!(state.leased_slots(), 0);
    }

    #[test]
    fn releasing_a_two_slot_lease_frees_both_slots() {
        let mut state = ready_registry(&[pool("a", "m", 3)]);
        let big = state.acquire(owner(1), &target("a"), 2).unwrap();
        let small = state.acquire(owner(1), &target("a"), 1).unwrap();
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
        state.release(1, big.id, ReleaseOutcome::Completed).unwrap();
        assert_eq!(state.snapshot().pools[0].slots_free, 2);
        state.check_invariants();
        state
            .release(1, small.id, ReleaseOutcome::Completed)
            .unwrap();
        assert_eq!(state.snapshot().pools[0].slots_free, 3);
        state.check_invariants();
    }

    #[test]
    fn a_closed_connection_gives_back_every_slot_of_its_leases() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        state.acquire(owner(1), &target("a"), 2).unwrap();
        state.acquire(owner(1), &target("a"), 1).unwrap();
        state.acquire(owner(2), &target("a"), 1).unwrap();
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
        assert_eq!(state.connection_closed(1), 2);
        assert_eq!(state.snapshot().pools[0].slots_free, 3);
        assert_eq!(state.leased_slots(), 1);
        state.check_invariants();
    }

    #[test]
    fn a_model_target_goes_to_a_ready_pool_with_enough_slots_free() {
        let mut state = ready_registry(&[pool("a", "m", 4), pool("b", "m", 2)]);
        // Both keep half their slots free, but only "a" has the 2 asked for.
        state.acquire(owner(9), &target("a"), 2).unwrap();
        state.acquire(owner(9), &target("b"), 1).unwrap();
        let lease = state
            .acquire(owner(1), &AcquireTarget::Model("m".into()), 2)
            .unwrap();
        assert_eq!(
            (lease.pool.as_str(), lease.slots),
            ("a", 2),
            "only a has 2 free"
        );
        let error = state
            .acquire(owner(1), &AcquireTarget::Model("m".into()), 2)
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::NoCapacity, "{error}");
        let error = state
            .acquire(owner(1), &AcquireTarget::Model("m".into()), 5)
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::BadRequest);
        assert!(
            error
                .message
                .contains(r#"asks for 5 slots; the largest pool serving model "m" has 4"#),
            "{error}"
        );
        state.check_invariants();
    }

    #[test]
    fn reasserted_leases_come_back_at_their_size_or_not_at_all() {
        let mut state = ready_registry(&[pool("a", "m", 3)]);
        let held = [
            held(5, "a", 2),
            held(6, "a", 2),
            held(7, "a", 0),
            held(8, "a", 1),
        ];
        let (accepted, rejected) = state.reassert(owner(1), &held);
        assert_eq!(accepted, vec![LeaseId(5), LeaseId(8)]);
        let codes: Vec<(LeaseId, ErrorCode)> = rejected
            .iter()
            .map(|(lease, error)| (*lease, error.code))
            .collect();
        assert_eq!(
            codes,
            vec![
                (LeaseId(6), ErrorCode::NoCapacity),
                (LeaseId(7), ErrorCode::BadRequest)
            ]
        );
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
        state.check_invariants();
        state
            .release(1, LeaseId(5), ReleaseOutcome::Completed)
            .unwrap();
        assert_eq!(state.snapshot().pools[0].slots_free, 2);
        state.check_invariants();
    }

    #[test]
    fn a_fresh_lease_id_never_collides_with_a_reasserted_or_orphaned_one() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        // Leases of a previous incarnation whose ids this one is about to hand out (100, 101).
        let (accepted, _) = state.reassert(owner(1), &[held(100, "a", 1), held(101, "a", 1)]);
        assert_eq!(accepted, vec![LeaseId(100), LeaseId(101)]);
        state.connection_closed(1);
        state.reassert(owner(2), &[held(100, "a", 1)]);
        let fresh = state.acquire(owner(3), &target("a"), 1).unwrap();
        assert_eq!(fresh.id, LeaseId(102), "100 is live, 101 is an orphan");
        state.check_invariants();
    }

    #[test]
    fn a_lease_comes_back_only_with_its_secret_even_on_a_draining_pool() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(1), &target("a"), 1).unwrap();
        state.connection_closed(1);
        state.record_engine(&PoolId("a".into()), EngineReport::Draining);
        state.take_changes();
        let forged = [
            HeldLease {
                secret: pool_ipc::registry::LeaseSecret([0; 16]),
                ..held(lease.id.0, "a", 1)
            },
            // Signed for one slot, claimed for two.
            HeldLease {
                slots: 2,
                ..held(lease.id.0, "a", 1)
            },
            // A lease nobody was ever granted, with a secret from another key.
            HeldLease {
                secret: LeaseSigner::from_key([9; 64]).sign(LeaseId(7), &PoolId("a".into()), 1),
                ..held(7, "a", 1)
            },
        ];
        let (accepted, rejected) = state.reassert(owner(2), &forged);
        assert!(accepted.is_empty());
        assert!(
            rejected
                .iter()
                .all(|(_, error)| error.code == ErrorCode::Unauthorized),
            "{rejected:?}"
        );
        assert_eq!(state.snapshot().pools[0].slots_free, 2);
        assert!(state.take_changes().is_empty(), "a refusal changes nothing");
        let real = HeldLease {
            lease: lease.id,
            pool: lease.pool.clone(),
            slots: 1,
            secret: lease.secret,
        };
        let (accepted, _) = state.reassert(owner(3), &[real]);
        assert_eq!(
            accepted,
            vec![lease.id],
            "its holder gets it back while draining"
        );
        state.check_invariants();
    }

    #[test]
    fn an_orphan_comes_back_once_within_the_grace_and_an_ended_lease_never() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        let released = state.acquire(owner(1), &target("a"), 1).unwrap();
        let orphaned = state.acquire(owner(1), &target("a"), 1).unwrap();
        let late = state.acquire(owner(1), &target("a"), 1).unwrap();
        state
            .release(1, released.id, ReleaseOutcome::Completed)
            .unwrap();
        state.advance(1_000);
        assert_eq!(state.connection_closed(1), 2);
        let claim = |lease: &Lease| held(lease.id.0, "a", 1);
        let (accepted, rejected) = state.reassert(owner(2), &[claim(&released), claim(&orphaned)]);
        assert_eq!(accepted, vec![orphaned.id]);
        assert_eq!(rejected[0].1.code, ErrorCode::NotFound, "{rejected:?}");
        state
            .release(2, orphaned.id, ReleaseOutcome::Completed)
            .unwrap();
        let (accepted, _) = state.reassert(owner(3), &[claim(&orphaned)]);
        assert!(accepted.is_empty(), "released after it came back: ended");
        state.advance(1_000 + REASSERT_GRACE_MS);
        let (accepted, rejected) = state.reassert(owner(3), &[claim(&late)]);
        assert!(accepted.is_empty(), "orphaned longer than the grace");
        assert_eq!(rejected[0].1.code, ErrorCode::NotFound);
        assert_eq!(state.snapshot().pools[0].slots_free, 4);
        state.check_invariants();
    }

    #[test]
    fn a_peer_dropping_its_connection_in_a_loop_leaves_at_most_max_orphans() {
        let mut state = ready_registry(&[pool("a", "m", 1)]);
        let first = state.acquire(owner(0), &target("a"), 1).unwrap();
        state.connection_closed(0);
        for connection in 1..=MAX_ORPHANS as u64 {
            state.acquire(owner(connection), &target("a"), 1).unwrap();
            state.connection_closed(connection);
        }
        assert_eq!(state.orphans.len(), MAX_ORPHANS);
        assert!(state.orphaned_order.len() <= MAX_ORPHANS);
        let (accepted, _) = state.reassert(owner(1), &[held(first.id.0, "a", 1)]);
        assert!(accepted.is_empty(), "the oldest orphan was forgotten");
        state.check_invariants();
    }

    #[test]
    fn leases_of_a_previous_incarnation_come_back_once_and_only_during_the_grace() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        let before_restart = [held(7, "a", 1), held(8, "a", 1)];
        let (accepted, _) = state.reassert(owner(1), &before_restart[..1]);
        assert_eq!(accepted, vec![LeaseId(7)]);
        state
            .release(1, LeaseId(7), ReleaseOutcome::Completed)
            .unwrap();
        let (accepted, _) = state.reassert(owner(1), &before_restart[..1]);
        assert!(
            accepted.is_empty(),
            "released: it does not come back a second time"
        );
        state.advance(REASSERT_GRACE_MS);
        let (accepted, rejected) = state.reassert(owner(1), &before_restart[1..]);
        assert!(accepted.is_empty(), "too late after the start");
        assert_eq!(rejected[0].1.code, ErrorCode::NotFound);
        state.check_invariants();
    }

    #[test]
    fn one_uid_holds_at_most_its_cap_of_slots_however_many_connections_it_opens() {
        let mut state = RegistryState::new(
            &[pool("a", "m", 8)],
            LeasePolicy {
                max_slots_per_uid: 3,
                ..policy()
            },
        );
        state.record_probe(&PoolId("a".into()), ok());
        state.acquire(owner(1), &target("a"), 2).unwrap();
        state.acquire(owner(2), &target("a"), 1).unwrap();
        state.take_changes();
        for (connection, slots) in [(3, 1), (1, 1), (2, 2)] {
            let error = state
                .acquire(owner(connection), &target("a"), slots)
                .unwrap_err();
            assert_eq!(error.code, ErrorCode::LeaseCapReached, "{error}");
            assert!(error.message.contains("at most 3"), "{error}");
        }
        let (_, rejected) = state.reassert(owner(4), &[held(7, "a", 1)]);
        assert_eq!(rejected[0].1.code, ErrorCode::LeaseCapReached);
        assert!(state.take_changes().is_empty(), "a refusal changes nothing");
        assert_eq!(state.snapshot().pools[0].slots_free, 5);
        let other_uid = Owner {
            connection: 5,
            uid: UID + 1,
        };
        state.acquire(other_uid, &target("a"), 3).unwrap();
        state.connection_closed(2);
        state.acquire(owner(3), &target("a"), 1).unwrap();
        state.check_invariants();
    }

    #[test]
    fn a_lease_not_renewed_within_the_ttl_expires_and_its_owner_is_told() {
        let mut state = RegistryState::new(
            &[pool("a", "m", 2)],
            LeasePolicy {
                ttl_ms: Some(1_000),
                ..policy()
            },
        );
        state.record_probe(&PoolId("a".into()), ok());
        let kept = state.acquire(owner(1), &target("a"), 1).unwrap();
        state.advance(500);
        let lost = state.acquire(owner(2), &target("a"), 1).unwrap();
        assert_eq!(state.next_expiry_ms(), Some(1_000));
        state.advance(900);
        assert_eq!(state.renew(1), 1);
        state.take_changes();
        state.take_ended();
        state.advance(1_500);
        assert_eq!(state.snapshot().pools[0].slots_free, 1);
        let changes = state.take_changes();
        assert_eq!(
            changes[0],
            PendingChange {
                change: Change::LeasesRevoked {
                    pool: PoolId("a".into()),
                    leases: vec![lost.id],
                    reason: "the lease was not renewed within its 1000 ms time-to-live".into(),
                },
                lease_owners: vec![2],
            }
        );
        assert_eq!(state.take_ended(), vec![LeaseEnd::Expired]);
        let (accepted, _) = state.reassert(owner(3), &[held(lost.id.0, "a", 1)]);
        assert!(accepted.is_empty(), "an expired lease never comes back");
        assert_eq!(state.next_expiry_ms(), Some(1_900));
        state.advance(1_900);
        assert_eq!(
            state.snapshot().pools[0].slots_free,
            2,
            "{kept:?} expired too"
        );
        assert_eq!(state.next_expiry_ms(), None);
        state.check_invariants();
    }

    #[test]
    fn an_engine_going_down_takes_the_orphans_of_its_pool_with_it() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(1), &target("a"), 1).unwrap();
        state.connection_closed(1);
        state.record_engine(
            &PoolId("a".into()),
            EngineReport::Down {
                reason: "killed".into(),
                state: PoolState::Stopped,
            },
        );
        state.record_engine(
            &PoolId("a".into()),
            EngineReport::Ready {
                slots: None,
                engine_version: None,
                at_unix_ms: 3,
            },
        );
        let (accepted, rejected) = state.reassert(owner(2), &[held(lease.id.0, "a", 1)]);
        assert!(accepted.is_empty(), "the lease was on the engine that went");
        assert_eq!(rejected[0].1.code, ErrorCode::NotFound);
        state.check_invariants();
    }

    #[test]
    fn acquire_on_a_pool_that_is_not_ready_is_refused() {
        let mut state = RegistryState::new(&[pool("a", "m", 2)], policy());
        assert_eq!(
            state.acquire(owner(1), &target("a"), 1).unwrap_err().code,
            ErrorCode::NotReady
        );
        assert_eq!(
            state.acquire(owner(1), &target("zzz"), 1).unwrap_err().code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn a_closed_connection_gives_back_its_leases_only() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        state.acquire(owner(1), &target("a"), 1).unwrap();
        state.acquire(owner(1), &target("a"), 1).unwrap();
        let kept = state.acquire(owner(2), &target("a"), 1).unwrap();
        assert_eq!(state.connection_closed(1), 2);
        assert_eq!(state.snapshot().pools[0].slots_free, 3);
        assert_eq!(
            state
                .release(1, kept.id, ReleaseOutcome::Completed)
                .unwrap_err()
                .code,
            ErrorCode::NotFound,
            "another connection's lease is not releasable"
        );
        state
            .release(2, kept.id, ReleaseOutcome::Completed)
            .unwrap();
        assert_eq!(state.snapshot().pools[0].slots_free, 4);
        state.check_invariants();
    }

    #[test]
    fn model_targets_go_to_the_least_loaded_ready_pool() {
        let mut state = ready_registry(&[pool("a", "m", 2), pool("b", "m", 2), pool("c", "x", 9)]);
        let first = state
            .acquire(owner(1), &AcquireTarget::Model("m".into()), 1)
            .unwrap();
        let second = state
            .acquire(owner(1), &AcquireTarget::Model("m".into()), 1)
            .unwrap();
        assert_ne!(first.pool, second.pool);
        assert_eq!(
            state
                .acquire(owner(1), &AcquireTarget::Model("nope".into()), 1)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn a_ready_pool_turns_unhealthy_only_after_the_threshold_and_revokes_leases() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(7), &target("a"), 1).unwrap();
        state.take_changes();
        state.record_probe(&PoolId("a".into()), failed());
        state.record_probe(&PoolId("a".into()), failed());
        assert_eq!(state.snapshot().pools[0].state, PoolState::Ready);
        state.record_probe(&PoolId("a".into()), failed());
        let snapshot = state.snapshot();
        assert_eq!(snapshot.pools[0].state, PoolState::Unhealthy);
        assert_eq!(snapshot.pools[0].slots_free, 2);
        let changes = state.take_changes();
        assert_eq!(
            changes[0],
            PendingChange {
                change: Change::LeasesRevoked {
                    pool: PoolId("a".into()),
                    leases: vec![lease.id],
                    reason: "the pool's engine failed its health probes".into(),
                },
                lease_owners: vec![7],
            }
        );
        state.record_probe(&PoolId("a".into()), ok());
        assert_eq!(state.snapshot().pools[0].state, PoolState::Ready);
        assert_eq!(state.snapshot().pools[0].last_error, None);
    }

    #[test]
    fn reasserted_leases_are_recreated_once() {
        let mut state = ready_registry(&[pool("a", "m", 1)]);
        let held = [held(5, "a", 1)];
        let (accepted, rejected) = state.reassert(owner(1), &held);
        assert_eq!(accepted, vec![LeaseId(5)]);
        assert!(rejected.is_empty());
        let (accepted, rejected) = state.reassert(owner(2), &held);
        assert!(accepted.is_empty());
        assert_eq!(rejected[0].1.code, ErrorCode::BadRequest);
        state.check_invariants();
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
    }

    #[test]
    fn an_unloaded_pool_takes_no_lease_and_stays_loading_through_its_engines_spawn() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let a = PoolId("a".into());
        state.record_engine(
            &a,
            EngineReport::Unloaded {
                reason: UnloadReason::Idle,
            },
        );
        assert_eq!(state.snapshot().pools[0].state, PoolState::Unloaded);
        assert_eq!(
            state.acquire(owner(3), &target("a"), 1).unwrap_err().code,
            ErrorCode::NotReady
        );
        state.record_engine(&a, EngineReport::Loading);
        state.record_engine(
            &a,
            EngineReport::Spawned {
                endpoint: Endpoint::Unix {
                    path: "/run/e/a.sock".into(),
                },
                restarts: 0,
            },
        );
        assert_eq!(
            state.snapshot().pools[0].state,
            PoolState::Loading,
            "a load shows Loading until the engine is ready"
        );
        state.record_engine(
            &a,
            EngineReport::Ready {
                slots: Some(2),
                engine_version: None,
                at_unix_ms: 7,
            },
        );
        assert_eq!(state.snapshot().pools[0].state, PoolState::Ready);
        state.acquire(owner(3), &target("a"), 1).unwrap();
        state.check_invariants();
    }

    #[test]
    fn an_engine_going_down_revokes_its_leases_and_a_new_one_starts_empty() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(3), &target("a"), 1).unwrap();
        state.take_changes();
        let until = PoolState::BackingOff { until_unix_ms: 99 };
        state.record_engine(
            &PoolId("a".into()),
            EngineReport::Down {
                reason: "exited with status 1".into(),
                state: until,
            },
        );
        let snapshot = state.snapshot();
        assert_eq!(snapshot.pools[0].state, until);
        assert_eq!(snapshot.pools[0].slots_free, 2);
        let changes = state.take_changes();
        assert!(
            matches!(&changes[0].change, Change::LeasesRevoked { leases, .. } if leases == &vec![lease.id])
        );
        assert_eq!(
            state.acquire(owner(3), &target("a"), 1).unwrap_err().code,
            ErrorCode::NotReady
        );
        let endpoint = Endpoint::Unix {
            path: "/run/e/a.sock".into(),
        };
        state.record_engine(
            &PoolId("a".into()),
            EngineReport::Spawned {
                endpoint: endpoint.clone(),
                restarts: 1,
            },
        );
        state.record_engine(
            &PoolId("a".into()),
            EngineReport::Ready {
                slots: Some(3),
                engine_version: None,
                at_unix_ms: 5,
            },
        );
        let lease = state.acquire(owner(4), &target("a"), 1).unwrap();
        assert_eq!(lease.endpoint, endpoint);
        let snapshot = state.snapshot();
        assert_eq!(
            (snapshot.pools[0].slots_total, snapshot.pools[0].restarts),
            (3, 1)
        );
        state.record_engine(&PoolId("a".into()), EngineReport::Draining);
        assert_eq!(
            state.acquire(owner(4), &target("a"), 1).unwrap_err().code,
            ErrorCode::Draining
        );
        state.check_invariants();
    }

    #[test]
    fn a_replaced_pool_is_never_absent_starts_afresh_and_revokes_the_old_leases() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(9), &target("a"), 1).unwrap();
        state.take_changes();
        state.replace_pool(&pool("a", "m2", 3));
        let changes: Vec<Change> = state.take_changes().into_iter().map(|c| c.change).collect();
        assert!(
            matches!(&changes[0], Change::LeasesRevoked { leases, .. } if leases == &vec![lease.id])
        );
        assert!(
            !changes.contains(&Change::PoolRemoved(PoolId("a".into()))),
            "{changes:?}"
        );
        let replaced = state.snapshot();
        assert_eq!(replaced.pools.len(), 1);
        let entry = &replaced.pools[0];
        assert_eq!(
            (
                entry.model.as_str(),
                entry.state,
                entry.slots_total,
                entry.slots_free
            ),
            ("m2", PoolState::Starting, 3, 3)
        );
        state.check_invariants();
    }

    #[test]
    fn a_removed_pool_takes_its_leases_with_it_and_an_added_one_starts_empty() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(owner(9), &target("a"), 1).unwrap();
        state.take_changes();
        state.remove_pool(&PoolId("a".into()));
        let changes: Vec<Change> = state.take_changes().into_iter().map(|c| c.change).collect();
        assert!(
            matches!(&changes[0], Change::LeasesRevoked { leases, .. } if leases == &vec![lease.id])
        );
        assert_eq!(changes[1], Change::PoolRemoved(PoolId("a".into())));
        assert!(state.snapshot().pools.is_empty());
        assert_eq!(
            state
                .release(9, lease.id, ReleaseOutcome::Completed)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        state.add_pool(&pool("b", "m", 3));
        let added = state.snapshot();
        assert_eq!(
            (added.pools[0].state, added.pools[0].slots_total),
            (PoolState::Starting, 3)
        );
        state.check_invariants();
    }

    #[test]
    fn changes_are_coalesced_per_pool_and_bump_the_epoch_once() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        let epoch = state.epoch();
        for _ in 0..3 {
            let lease = state.acquire(owner(1), &target("a"), 1).unwrap();
            assert_eq!(
                lease.registry_epoch,
                epoch + 1,
                "the flush that publishes the lease"
            );
        }
        let changes = state.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(state.epoch(), epoch + 1);
        assert!(matches!(&changes[0].change, Change::PoolUpdated(p) if p.slots_free == 1));
        assert!(state.take_changes().is_empty());
        assert_eq!(state.epoch(), epoch + 1);
    }
}
