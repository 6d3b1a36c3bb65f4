//! Placement: which pool a task should take a lease on, decided from the local mirror of the
//! registry (no round trip). Pure: the caller then Acquires over the socket, and a lost race
//! (the slot went to someone else in between) simply means deciding again on the next mirror
//! update. Never picks a pool that is not Ready, is draining, serves another model, or has no
//! free slot.

use pool_ipc::registry::{PoolId, PoolSnapshot, PoolState, RegistrySnapshot};
use std::collections::HashMap;

/// Client hints from the native API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlacementHints {
    /// Only this pool.
    pub pin: Option<PoolId>,
    /// This pool when it has a free slot, else any other.
    pub prefer: Option<PoolId>,
    /// Never these pools.
    pub avoid: Vec<PoolId>,
}

/// Why nothing could be chosen right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPlacement {
    /// No pool serves the model at all (or the pinned pool does not exist / serve it).
    UnknownModel,
    /// Pools serve the model, but none is ready (starting, unhealthy, draining, stopped…).
    NoneReady,
    /// Ready pools serve the model, but every slot is leased: wait for one.
    Busy,
    /// Every pool serving the model is stopped (drained) or failed: only an operator brings one
    /// back, so waiting is pointless.
    OutOfService,
}

/// Remembers which pool holds a session's KV cache.
#[derive(Debug, Default)]
pub struct SessionAffinity {
    pools: HashMap<String, PoolId>,
}

impl SessionAffinity {
    pub fn pool_of(&self, session: &str) -> Option<&PoolId> {
        self.pools.get(session)
    }

    pub fn remember(&mut self, session: &str, pool: &PoolId) {
        self.pools.insert(session.to_owned(), pool.clone());
    }

    pub fn forget(&mut self, session: &str) {
        self.pools.remove(session);
    }
}

fn serves(pool: &PoolSnapshot, model: &str, hints: &PlacementHints) -> bool {
    pool.model == model && !hints.avoid.contains(&pool.pool_id)
}

fn takes_work(pool: &PoolSnapshot) -> bool {
    pool.state == PoolState::Ready && pool.slots_free > 0
}

fn out_of_service(pool: &PoolSnapshot) -> bool {
    matches!(pool.state, PoolState::Stopped | PoolState::Failed)
}

/// Picks a pool for `model`: the pinned one; else the session's pool while it has a free slot;
/// else the preferred one while it has a free slot; else the least loaded (largest share of
/// free slots, ties to the lowest pool id).
pub fn choose(
    snapshot: &RegistrySnapshot,
    model: &str,
    session_pool: Option<&PoolId>,
    hints: &PlacementHints,
) -> Result<PoolId, NoPlacement> {
    if let Some(pin) = &hints.pin {
        let pool = snapshot
            .pool(pin)
            .filter(|pool| pool.model == model)
            .ok_or(NoPlacement::UnknownModel)?;
        return if takes_work(pool) {
            Ok(pin.clone())
        } else if pool.state == PoolState::Ready {
            Err(NoPlacement::Busy)
        } else if out_of_service(pool) {
            Err(NoPlacement::OutOfService)
        } else {
            Err(NoPlacement::NoneReady)
        };
    }
    let candidates: Vec<&PoolSnapshot> = snapshot
        .pools
        .iter()
        .filter(|pool| serves(pool, model, hints))
        .collect();
    if candidates.is_empty() {
        return Err(NoPlacement::UnknownModel);
    }
    for wanted in [session_pool, hints.prefer.as_ref()].into_iter().flatten() {
        if let Some(pool) = candidates.iter().find(|pool| &pool.pool_id == wanted)
            && takes_work(pool)
        {
            return Ok(pool.pool_id.clone());
        }
    }
    let best = candidates
        .iter()
        .filter(|pool| takes_work(pool))
        .max_by(|a, b| {
            let a_share = u64::from(a.slots_free) * u64::from(b.slots_total);
            let b_share = u64::from(b.slots_free) * u64::from(a.slots_total);
            a_share
                .cmp(&b_share)
                .then_with(|| b.pool_id.cmp(&a.pool_id))
        });
    match best {
        Some(pool) => Ok(pool.pool_id.clone()),
        None if candidates.iter().any(|pool| pool.state == PoolState::Ready) => {
            Err(NoPlacement::Busy)
        }
        None if candidates.iter().all(|pool| out_of_service(pool)) => {
            Err(NoPlacement::OutOfService)
        }
        None => Err(NoPlacement::NoneReady),
    }
}

/// The models served by at least one pool, sorted.
pub fn models(snapshot: &RegistrySnapshot) -> Vec<String> {
    let mut models: Vec<String> = snapshot.pools.iter().map(|p| p.model.clone()).collect();
    models.sort();
    models.dedup();
    models
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_ipc::registry::{ApiEndpoint, Endpoint, EngineKind};

    fn pool(id: &str, model: &str, state: PoolState, free: u32, total: u32) -> PoolSnapshot {
        PoolSnapshot {
            pool_id: PoolId(id.into()),
            model: model.into(),
            engine: EngineKind::Llamacpp,
            endpoint: Endpoint::Unix {
                path: format!("/run/{id}.sock"),
            },
            state,
            live: true,
            slots_total: total,
            slots_free: free,
            engine_version: None,
            last_error: None,
            restarts: 0,
            last_probe_unix_ms: None,
            api_endpoints: ApiEndpoint::defaults(EngineKind::Llamacpp),
        }
    }

    fn registry(pools: Vec<PoolSnapshot>) -> RegistrySnapshot {
        RegistrySnapshot { epoch: 1, pools }
    }

    #[test]
    fn the_least_loaded_ready_pool_serving_the_model_wins() {
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 1, 4),
            pool("b", "m", PoolState::Ready, 3, 4),
            pool("c", "x", PoolState::Ready, 9, 9),
            pool("d", "m", PoolState::Draining, 4, 4),
        ]);
        let chosen = choose(&snapshot, "m", None, &PlacementHints::default());
        assert_eq!(chosen, Ok(PoolId("b".into())));
    }

    #[test]
    fn a_session_stays_on_its_pool_while_it_has_a_slot() {
        let mut snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 1, 4),
            pool("b", "m", PoolState::Ready, 3, 4),
        ]);
        let home = PoolId("a".into());
        let hints = PlacementHints::default();
        assert_eq!(
            choose(&snapshot, "m", Some(&home), &hints),
            Ok(home.clone())
        );
        snapshot.pools[0].slots_free = 0;
        assert_eq!(
            choose(&snapshot, "m", Some(&home), &hints),
            Ok(PoolId("b".into()))
        );
    }

    #[test]
    fn pin_prefer_and_avoid_hints_are_honoured() {
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 1, 4),
            pool("b", "m", PoolState::Ready, 3, 4),
        ]);
        let pin = PlacementHints {
            pin: Some(PoolId("a".into())),
            ..Default::default()
        };
        assert_eq!(choose(&snapshot, "m", None, &pin), Ok(PoolId("a".into())));
        let prefer = PlacementHints {
            prefer: Some(PoolId("a".into())),
            ..Default::default()
        };
        assert_eq!(
            choose(&snapshot, "m", None, &prefer),
            Ok(PoolId("a".into()))
        );
        let avoid = PlacementHints {
            avoid: vec![PoolId("b".into())],
            ..Default::default()
        };
        assert_eq!(choose(&snapshot, "m", None, &avoid), Ok(PoolId("a".into())));
        let pin_elsewhere = PlacementHints {
            pin: Some(PoolId("zz".into())),
            ..Default::default()
        };
        assert_eq!(
            choose(&snapshot, "m", None, &pin_elsewhere),
            Err(NoPlacement::UnknownModel)
        );
    }

    #[test]
    fn busy_not_ready_and_unknown_are_told_apart() {
        let busy = registry(vec![pool("a", "m", PoolState::Ready, 0, 4)]);
        let hints = PlacementHints::default();
        assert_eq!(choose(&busy, "m", None, &hints), Err(NoPlacement::Busy));
        let starting = registry(vec![pool("a", "m", PoolState::Starting, 4, 4)]);
        assert_eq!(
            choose(&starting, "m", None, &hints),
            Err(NoPlacement::NoneReady)
        );
        assert_eq!(
            choose(&starting, "other", None, &hints),
            Err(NoPlacement::UnknownModel)
        );
    }

    #[test]
    fn out_of_service_only_when_every_pool_of_the_model_is_stopped_or_failed() {
        let hints = PlacementHints::default();
        let stopped = registry(vec![
            pool("a", "m", PoolState::Stopped, 4, 4),
            pool("b", "m", PoolState::Failed, 4, 4),
        ]);
        assert_eq!(
            choose(&stopped, "m", None, &hints),
            Err(NoPlacement::OutOfService)
        );
        let pin = PlacementHints {
            pin: Some(PoolId("a".into())),
            ..Default::default()
        };
        assert_eq!(
            choose(&stopped, "m", None, &pin),
            Err(NoPlacement::OutOfService)
        );
        // One pool that may still come back (draining, backing off) is worth waiting for.
        for state in [
            PoolState::Draining,
            PoolState::BackingOff { until_unix_ms: 1 },
            PoolState::Starting,
            PoolState::Unhealthy,
        ] {
            let mixed = registry(vec![
                pool("a", "m", PoolState::Stopped, 4, 4),
                pool("b", "m", state, 4, 4),
            ]);
            assert_eq!(
                choose(&mixed, "m", None, &hints),
                Err(NoPlacement::NoneReady),
                "{state:?}"
            );
        }
    }
}
