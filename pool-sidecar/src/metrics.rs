//! pool-managerd's Prometheus metrics (prefix `pool_managerd_`), kept with `prometheus-client`.
//!
//! Counters are bumped where things happen (the registry actor, connections, probes); per-pool
//! gauges are set from the published registry snapshot at scrape time, so they can never drift
//! from the registry itself. Labels are bounded: pool ids come from the config, the rest from
//! fixed sets.

use crate::registry::state::{LeaseEnd, UnloadReason};
use pool_ipc::registry::{PoolId, PoolState, RegistrySnapshot};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

const POOL_STATES: [&str; 9] = [
    "starting",
    "ready",
    "unhealthy",
    "draining",
    "stopped",
    "backing_off",
    "failed",
    "unloaded",
    "loading",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    pub pool: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub op: &'static str,
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pool_state: Family<PoolStateLabels, Gauge>,
    pool_slots: Family<PoolLabels, Gauge>,
    pool_slots_free: Family<PoolLabels, Gauge>,
    pool_live: Family<PoolLabels, Gauge>,
    pool_restarts: Family<PoolLabels, Gauge>,
    pool_next_attempt: Family<PoolLabels, Gauge>,
    probe_failures: Family<PoolLabels, Counter>,
    pub leases_active: Gauge,
    pub leases_granted: Counter,
    leases_ended: Family<ReasonLabels, Counter>,
    pub ipc_connections: Gauge,
    ipc_connections_refused: Family<ReasonLabels, Counter>,
    ipc_requests: Family<RequestLabels, Counter>,
    /// Loads of on-demand pools begun (a retry after a failed load counts again).
    pub loads: Counter,
    /// Loads given up because nobody waited for them any more (`abandoned_load = "cancel"`).
    pub loads_cancelled: Counter,
    unloads: Family<ReasonLabels, Counter>,
    pub evictions: Counter,
    memory_budget: Family<DeviceLabels, Gauge>,
    memory_held: Family<DeviceLabels, Gauge>,
    pool_footprint: Family<PoolLabels, Gauge>,
    /// From a load's start to its engine's Ready.
    pub load_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pool_managerd");
        let metrics = Metrics {
            registry: Registry::default(),
            pool_state: Family::default(),
            pool_slots: Family::default(),
            pool_slots_free: Family::default(),
            pool_live: Family::default(),
            pool_restarts: Family::default(),
            pool_next_attempt: Family::default(),
            probe_failures: Family::default(),
            leases_active: Gauge::default(),
            leases_granted: Counter::default(),
            leases_ended: Family::default(),
            ipc_connections: Gauge::default(),
            ipc_connections_refused: Family::default(),
            ipc_requests: Family::default(),
            loads: Counter::default(),
            loads_cancelled: Counter::default(),
            unloads: Family::default(),
            evictions: Counter::default(),
            memory_budget: Family::default(),
            memory_held: Family::default(),
            pool_footprint: Family::default(),
            // 50 ms to ~14 min in 12 quadrupling steps: a small model loads in a second, a large
            // one from a cold disk in minutes.
            load_duration: Histogram::new(exponential_buckets(0.05, 4.0, 12)),
        };
        registry.register(
            "pool_state",
            "1 for the state each pool is in, 0 for the others",
            metrics.pool_state.clone(),
        );
        registry.register(
            "pool_slots",
            "Slots each pool has",
            metrics.pool_slots.clone(),
        );
        registry.register(
            "pool_slots_free",
            "Slots of each pool not held by a lease",
            metrics.pool_slots_free.clone(),
        );
        registry.register(
            "pool_live",
            "1 when the pool's engine answered its last probe",
            metrics.pool_live.clone(),
        );
        registry.register(
            "pool_engine_restarts",
            "Times each pool's engine was restarted",
            metrics.pool_restarts.clone(),
        );
        registry.register(
            "pool_next_attempt_timestamp_seconds",
            "When a backing-off pool restarts its engine (Unix time); 0 when not backing off",
            metrics.pool_next_attempt.clone(),
        );
        registry.register(
            "probe_failures",
            "Failed health probes by pool",
            metrics.probe_failures.clone(),
        );
        registry.register(
            "leases_active",
            "Slots currently held by leases (a lease of several slots counts each)",
            metrics.leases_active.clone(),
        );
        registry.register(
            "leases_granted",
            "Leases granted",
            metrics.leases_granted.clone(),
        );
        registry.register(
            "leases_ended",
            "Leases ended, by how (completed, cancelled, failed, connection_closed, revoked, expired)",
            metrics.leases_ended.clone(),
        );
        registry.register(
            "ipc_connections",
            "Open connections on the Unix socket",
            metrics.ipc_connections.clone(),
        );
        registry.register(
            "ipc_connections_refused",
            "Connections refused, by reason",
            metrics.ipc_connections_refused.clone(),
        );
        registry.register(
            "ipc_requests",
            "Requests served on the Unix socket, by operation and result",
            metrics.ipc_requests.clone(),
        );
        registry.register(
            "loads",
            "Loads of on-demand pools begun (a retry after a failed load counts again)",
            metrics.loads.clone(),
        );
        registry.register(
            "loads_cancelled",
            "Loads given up because no client waited for them any more (abandoned_load = \"cancel\")",
            metrics.loads_cancelled.clone(),
        );
        registry.register(
            "unloads",
            "On-demand pools unloaded, by reason (idle, operator, cancelled)",
            metrics.unloads.clone(),
        );
        registry.register(
            "evictions",
            "On-demand pools told to unload to make room for another pool's load",
            metrics.evictions.clone(),
        );
        registry.register(
            "memory_budget_bytes",
            "What on-demand pools may hold, by device (host, gpu0, gpu1, ...)",
            metrics.memory_budget.clone(),
        );
        registry.register(
            "memory_held_bytes",
            "The footprints of the pools holding memory (loading, loaded or unloading), by device",
            metrics.memory_held.clone(),
        );
        registry.register(
            "pool_footprint_bytes",
            "Each managed pool's footprint: measured after its last load, else estimated from its model",
            metrics.pool_footprint.clone(),
        );
        registry.register(
            "load_duration_seconds",
            "From the start of an on-demand pool's load to its engine passing its readiness check",
            metrics.load_duration.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// A device's budget and what its pools hold now.
    pub fn set_memory(&self, device: String, budget: u64, held: u64) {
        let labels = DeviceLabels { device };
        let bytes = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.memory_budget.get_or_create(&labels).set(bytes(budget));
        self.memory_held.get_or_create(&labels).set(bytes(held));
    }

    pub fn set_footprint(&self, pool: &PoolId, bytes: u64) {
        self.pool_footprint
            .get_or_create(&PoolLabels {
                pool: pool.to_string(),
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn record_probe_failure(&self, pool: &PoolId) {
        self.probe_failures
            .get_or_create(&PoolLabels {
                pool: pool.to_string(),
            })
            .inc();
    }

    pub fn record_lease_end(&self, end: LeaseEnd) {
        self.leases_ended
            .get_or_create(&ReasonLabels { reason: end.name() })
            .inc();
    }

    pub fn record_unload(&self, reason: UnloadReason) {
        self.unloads
            .get_or_create(&ReasonLabels {
                reason: reason.name(),
            })
            .inc();
    }

    pub fn record_refused(&self, reason: &'static str) {
        self.ipc_connections_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn record_request(&self, op: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.ipc_requests
            .get_or_create(&RequestLabels { op, result })
            .inc();
    }

    /// Prometheus text exposition, with per-pool gauges taken from `snapshot`.
    pub fn render(&self, snapshot: &RegistrySnapshot) -> String {
        for pool in &snapshot.pools {
            let labels = PoolLabels {
                pool: pool.pool_id.to_string(),
            };
            for state in POOL_STATES {
                let value = i64::from(state == pool.state.name());
                self.pool_state
                    .get_or_create(&PoolStateLabels {
                        pool: labels.pool.clone(),
                        state,
                    })
                    .set(value);
            }
            self.pool_slots
                .get_or_create(&labels)
                .set(i64::from(pool.slots_total));
            self.pool_slots_free
                .get_or_create(&labels)
                .set(i64::from(pool.slots_free));
            self.pool_live
                .get_or_create(&labels)
                .set(i64::from(pool.live));
            self.pool_restarts
                .get_or_create(&labels)
                .set(i64::from(pool.restarts));
            let next_attempt = match pool.state {
                PoolState::BackingOff { until_unix_ms } => {
                    i64::try_from(until_unix_ms / 1000).unwrap_or(i64::MAX)
                }
                _ => 0,
            };
            self.pool_next_attempt
                .get_or_create(&labels)
                .set(next_attempt);
        }
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "could not encode metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pool_state_has_a_gauge_label() {
        let states = [
            PoolState::Starting,
            PoolState::Ready,
            PoolState::Unhealthy,
            PoolState::Draining,
            PoolState::Stopped,
            PoolState::BackingOff { until_unix_ms: 0 },
            PoolState::Failed,
            PoolState::Unloaded,
            PoolState::Loading,
        ];
        for state in states {
            assert!(POOL_STATES.contains(&state.name()), "{state}");
        }
    }
}
