//! The registry's plain state: pools, their slots and the leases on them, and every rule about
//! how they change. Synchronous, no I/O, no clock: the actor owns the only instance and feeds it
//! commands; tests drive it directly.
//!
//! Invariants (checked by `check_invariants` in tests): a lease holds one or more slots of one
//! pool, and a pool's free slots are `slots_total - slots held by its leases` (saturating), so
//! `0 <= slots_free <= slots_total` by construction and `slots_total - slots_free` is the slots
//! held; a new lease is granted only on a `Ready` pool with as many slots free as it asks for,
//! in the same step as the check; every lease belongs to exactly one live connection and dies
//! with it.

use crate::config::{PoolConfig, ProbePolicy};
use pool_ipc::error_code::{ErrorCode, IpcError};
use pool_ipc::registry::{
    AcquireTarget, ApiEndpoint, Endpoint, EngineKind, Lease, LeaseId, PoolId, PoolSnapshot,
    PoolState, RegistrySnapshot, ReleaseOutcome,
};
use pool_ipc::wire::{Change, HeldLease};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Identifies one accepted socket connection for the lifetime of the daemon.
pub type ConnectionId = u64;

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
}

/// Why leases ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseEnd {
    Released(ReleaseOutcome),
    ConnectionClosed,
    Revoked,
}

impl LeaseEnd {
    pub fn name(self) -> &'static str {
        match self {
            LeaseEnd::Released(outcome) => outcome.name(),
            LeaseEnd::ConnectionClosed => "connection_closed",
            LeaseEnd::Revoked => "revoked",
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
    /// Each live lease on the pool and the slots it holds (at least 1).
    leases: BTreeMap<LeaseId, u32>,
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
        self.leases
            .values()
            .fold(0u32, |held, slots| held.saturating_add(*slots))
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
    owner: ConnectionId,
}

#[derive(Debug)]
pub struct RegistryState {
    epoch: u64,
    pools: BTreeMap<PoolId, PoolEntry>,
    leases: HashMap<LeaseId, LeaseRecord>,
    next_lease: u64,
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
    /// `lease_id_base` makes lease ids of this daemon incarnation distinct from the previous
    /// one's, whose leases clients may re-assert.
    pub fn new(pools: &[PoolConfig], lease_id_base: u64) -> RegistryState {
        let pools = pools
            .iter()
            .map(|config| (config.id.clone(), new_entry(config)))
            .collect();
        RegistryState {
            epoch: 0,
            pools,
            leases: HashMap::new(),
            next_lease: lease_id_base,
            dirty: BTreeSet::new(),
            revocations: Vec::new(),
            ended: Vec::new(),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Check-and-reserve: grants a lease of `slots` slots only where that many are free right
    /// now. Asking for none, or for more than the pool has at all, is a bad request: waiting
    /// would never help.
    pub fn acquire(
        &mut self,
        owner: ConnectionId,
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
        let id = LeaseId(self.next_lease);
        self.next_lease = self.next_lease.wrapping_add(1);
        let Some(entry) = self.pools.get_mut(&pool_id) else {
            return Err(not_found_pool(&pool_id));
        };
        entry.leases.insert(id, slots);
        let lease = Lease {
            id,
            pool: pool_id.clone(),
            model: entry.model.clone(),
            engine: entry.engine,
            endpoint: entry.endpoint.clone(),
            slots,
        };
        self.leases.insert(
            id,
            LeaseRecord {
                pool: pool_id.clone(),
                owner,
            },
        );
        self.dirty.insert(pool_id);
        Ok(lease)
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

    /// Releases a lease held by `owner`; another connection's lease is not found.
    pub fn release(
        &mut self,
        owner: ConnectionId,
        lease: LeaseId,
        outcome: ReleaseOutcome,
    ) -> Result<(), IpcError> {
        match self.leases.get(&lease) {
            Some(record) if record.owner == owner => {}
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

    fn drop_lease(&mut self, lease: LeaseId, end: LeaseEnd) {
        if let Some(record) = self.leases.remove(&lease) {
            if let Some(entry) = self.pools.get_mut(&record.pool) {
                entry.leases.remove(&lease);
            }
            self.dirty.insert(record.pool);
            self.ended.push(end);
        }
    }

    /// Every lease of a closed connection comes back. Returns how many.
    pub fn connection_closed(&mut self, owner: ConnectionId) -> usize {
        let owned: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, record)| record.owner == owner)
            .map(|(id, _)| *id)
            .collect();
        for lease in &owned {
            self.drop_lease(*lease, LeaseEnd::ConnectionClosed);
        }
        owned.len()
    }

    /// Re-creates leases a reconnecting client still uses, each at its size. A lease is
    /// accepted on a pool that is Ready or Draining with as many slots free as it holds, and
    /// only if no connection holds that id now.
    pub fn reassert(
        &mut self,
        owner: ConnectionId,
        held: &[HeldLease],
    ) -> (Vec<LeaseId>, Vec<(LeaseId, IpcError)>) {
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for HeldLease { lease, pool, slots } in held {
            match self.check_reassert(*lease, pool, *slots) {
                Ok(()) => {
                    if let Some(entry) = self.pools.get_mut(pool) {
                        entry.leases.insert(*lease, *slots);
                    }
                    self.leases.insert(
                        *lease,
                        LeaseRecord {
                            pool: pool.clone(),
                            owner,
                        },
                    );
                    self.dirty.insert(pool.clone());
                    accepted.push(*lease);
                }
                Err(error) => rejected.push((*lease, error)),
            }
        }
        (accepted, rejected)
    }

    fn check_reassert(&self, lease: LeaseId, pool: &PoolId, slots: u32) -> Result<(), IpcError> {
        if slots == 0 {
            return Err(IpcError::new(
                ErrorCode::BadRequest,
                format!("re-asserted lease {lease} holds no slots"),
            ));
        }
        if self.leases.contains_key(&lease) {
            return Err(IpcError::new(
                ErrorCode::BadRequest,
                format!("lease {lease} is already held by a live connection"),
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
        Ok(())
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
                entry.state = PoolState::Starting;
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
        }
        self.dirty.insert(pool.clone());
        if let Some(reason) = revoke {
            self.revoke_pool_leases(pool, &reason);
        }
    }

    fn revoke_pool_leases(&mut self, pool: &PoolId, reason: &str) {
        let Some(entry) = self.pools.get(pool) else {
            return;
        };
        let leases: Vec<LeaseId> = entry.leases.keys().copied().collect();
        if leases.is_empty() {
            return;
        }
        let mut owners: Vec<ConnectionId> = leases
            .iter()
            .filter_map(|lease| self.leases.get(lease).map(|record| record.owner))
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
    }
}

fn new_entry(config: &PoolConfig) -> PoolEntry {
    PoolEntry {
        model: config.model.clone(),
        engine: config.engine,
        endpoint: config.initial_endpoint(),
        probe: config.probe.clone(),
        state: PoolState::Starting,
        live: false,
        slots_total: config.slots.unwrap_or(0),
        leases: BTreeMap::new(),
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

    fn ready_registry(pools: &[PoolConfig]) -> RegistryState {
        let mut state = RegistryState::new(pools, 100);
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
        assert!(state.acquire(1, &target("a"), 1).is_ok());
        assert!(state.acquire(2, &target("a"), 1).is_ok());
        let error = state.acquire(3, &target("a"), 1).unwrap_err();
        assert_eq!(error.code, ErrorCode::NoCapacity);
        state.check_invariants();
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
    }

    #[test]
    fn a_two_slot_lease_fills_a_two_slot_pool_and_a_one_slot_acquire_finds_no_capacity() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(1, &target("a"), 2).unwrap();
        assert_eq!(lease.slots, 2);
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
        assert_eq!(state.snapshot().pools[0].active_leases(), 2);
        assert_eq!(state.leased_slots(), 2);
        let error = state.acquire(2, &target("a"), 1).unwrap_err();
        assert_eq!(error.code, ErrorCode::NoCapacity, "{error}");
        state.check_invariants();
    }

    #[test]
    fn more_slots_than_the_pool_has_is_a_bad_request_that_changes_nothing() {
        let mut state = ready_registry(&[pool("p", "m", 2)]);
        state.acquire(1, &target("p"), 1).unwrap();
        state.take_changes();
        let before = state.snapshot();
        let error = state.acquire(2, &target("p"), 3).unwrap_err();
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
            let error = state.acquire(1, &target, 0).unwrap_err();
            assert_eq!(error.code, ErrorCode::BadRequest, "{error}");
        }
        assert_eq!(state.snapshot().pools[0].slots_free, 2);
        assert_eq!(state.leased_slots(), 0);
    }

    #[test]
    fn releasing_a_two_slot_lease_frees_both_slots() {
        let mut state = ready_registry(&[pool("a", "m", 3)]);
        let big = state.acquire(1, &target("a"), 2).unwrap();
        let small = state.acquire(1, &target("a"), 1).unwrap();
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
        state.acquire(1, &target("a"), 2).unwrap();
        state.acquire(1, &target("a"), 1).unwrap();
        state.acquire(2, &target("a"), 1).unwrap();
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
        state.acquire(9, &target("a"), 2).unwrap();
        state.acquire(9, &target("b"), 1).unwrap();
        let lease = state
            .acquire(1, &AcquireTarget::Model("m".into()), 2)
            .unwrap();
        assert_eq!(
            (lease.pool.as_str(), lease.slots),
            ("a", 2),
            "only a has 2 free"
        );
        let error = state
            .acquire(1, &AcquireTarget::Model("m".into()), 2)
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::NoCapacity, "{error}");
        let error = state
            .acquire(1, &AcquireTarget::Model("m".into()), 5)
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
            HeldLease {
                lease: LeaseId(5),
                pool: PoolId("a".into()),
                slots: 2,
            },
            HeldLease {
                lease: LeaseId(6),
                pool: PoolId("a".into()),
                slots: 2,
            },
            HeldLease {
                lease: LeaseId(7),
                pool: PoolId("a".into()),
                slots: 0,
            },
            HeldLease {
                lease: LeaseId(8),
                pool: PoolId("a".into()),
                slots: 1,
            },
        ];
        let (accepted, rejected) = state.reassert(1, &held);
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
    fn acquire_on_a_pool_that_is_not_ready_is_refused() {
        let mut state = RegistryState::new(&[pool("a", "m", 2)], 0);
        assert_eq!(
            state.acquire(1, &target("a"), 1).unwrap_err().code,
            ErrorCode::NotReady
        );
        assert_eq!(
            state.acquire(1, &target("zzz"), 1).unwrap_err().code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn a_closed_connection_gives_back_its_leases_only() {
        let mut state = ready_registry(&[pool("a", "m", 4)]);
        state.acquire(1, &target("a"), 1).unwrap();
        state.acquire(1, &target("a"), 1).unwrap();
        let kept = state.acquire(2, &target("a"), 1).unwrap();
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
            .acquire(1, &AcquireTarget::Model("m".into()), 1)
            .unwrap();
        let second = state
            .acquire(1, &AcquireTarget::Model("m".into()), 1)
            .unwrap();
        assert_ne!(first.pool, second.pool);
        assert_eq!(
            state
                .acquire(1, &AcquireTarget::Model("nope".into()), 1)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn a_ready_pool_turns_unhealthy_only_after_the_threshold_and_revokes_leases() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(7, &target("a"), 1).unwrap();
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
        let held = [HeldLease {
            lease: LeaseId(5),
            pool: PoolId("a".into()),
            slots: 1,
        }];
        let (accepted, rejected) = state.reassert(1, &held);
        assert_eq!(accepted, vec![LeaseId(5)]);
        assert!(rejected.is_empty());
        let (accepted, rejected) = state.reassert(2, &held);
        assert!(accepted.is_empty());
        assert_eq!(rejected[0].1.code, ErrorCode::BadRequest);
        state.check_invariants();
        assert_eq!(state.snapshot().pools[0].slots_free, 0);
    }

    #[test]
    fn an_engine_going_down_revokes_its_leases_and_a_new_one_starts_empty() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(3, &target("a"), 1).unwrap();
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
            state.acquire(3, &target("a"), 1).unwrap_err().code,
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
        let lease = state.acquire(4, &target("a"), 1).unwrap();
        assert_eq!(lease.endpoint, endpoint);
        let snapshot = state.snapshot();
        assert_eq!(
            (snapshot.pools[0].slots_total, snapshot.pools[0].restarts),
            (3, 1)
        );
        state.record_engine(&PoolId("a".into()), EngineReport::Draining);
        assert_eq!(
            state.acquire(4, &target("a"), 1).unwrap_err().code,
            ErrorCode::Draining
        );
        state.check_invariants();
    }

    #[test]
    fn a_replaced_pool_is_never_absent_starts_afresh_and_revokes_the_old_leases() {
        let mut state = ready_registry(&[pool("a", "m", 2)]);
        let lease = state.acquire(9, &target("a"), 1).unwrap();
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
        let lease = state.acquire(9, &target("a"), 1).unwrap();
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
            state.acquire(1, &target("a"), 1).unwrap();
        }
        let changes = state.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(state.epoch(), epoch + 1);
        assert!(matches!(&changes[0].change, Change::PoolUpdated(p) if p.slots_free == 1));
        assert!(state.take_changes().is_empty());
        assert_eq!(state.epoch(), epoch + 1);
    }
}
