//! Placement: which pool a request should take a lease on, and how many of its slots, decided
//! from the local mirror of the registry (no round trip). Pure: the caller then Acquires over the
//! socket, and a lost race (the slots went to someone else in between) simply means deciding again
//! on the next mirror update. Never picks a pool that is not Ready, is draining, serves another
//! model or not the request's API, or has fewer free slots than the request will occupy.

use lru::LruCache;
use pool_ipc::registry::{ApiEndpoint, PoolId, PoolSnapshot, PoolState, RegistrySnapshot};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

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

/// The engine sequences a request makes an engine run. `parallel` must run at once (OpenAI `n`:
/// the engine decodes the choices side by side); `total` counts every sequence, including those of
/// a prompt array or an embedding batch, which the engine queues itself when it has fewer slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotNeed {
    pub parallel: u32,
    pub total: u32,
}

impl SlotNeed {
    pub const ONE: SlotNeed = SlotNeed {
        parallel: 1,
        total: 1,
    };

    /// The slots a lease on a pool with `slots_total` slots must reserve: every sequence the engine
    /// will run at once there, and never fewer than the parallel ones.
    pub fn on(self, slots_total: u32) -> u32 {
        self.total.min(slots_total).max(self.parallel)
    }
}

/// What a request needs of a pool.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub model: &'a str,
    pub api: ApiEndpoint,
    pub slots: SlotNeed,
    pub hints: &'a PlacementHints,
    /// Pools held back for an earlier request that needs more slots than they have free (see
    /// [`pool_to_wait_for`]): this request may not take their slots.
    pub held_back: &'a [PoolId],
}

/// A pool to lease, and how many of its slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub pool: PoolId,
    pub slots: u32,
}

/// Why nothing could be chosen right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoPlacement {
    /// No pool serves the model at all (or the pinned pool does not exist / serve it).
    UnknownModel,
    /// Pools serve the model, but none of them serves the request's API.
    ApiNotServed,
    /// The request must run more sequences at once than any pool of the model has slots.
    TooManyParallel { most: u32 },
    /// Pools serve the model, but none is ready (starting, unhealthy, draining, stopped…).
    NoneReady,
    /// Ready pools serve the model, but not enough of their slots are free: wait for some.
    Busy,
    /// Every pool serving the model is stopped (drained) or failed: only an operator brings one
    /// back, so waiting is pointless.
    OutOfService,
}

/// Remembers which pool holds a session's KV cache, for at most `capacity` sessions (clients
/// choose session ids): the least recently served are forgotten first. A pool remembered longer
/// ago than the sessions' TTL is not used: the session has expired (its next turn starts a new
/// one), and its cache is long gone. Checked on lookup, never by a scan; an expired entry stays
/// until the LRU bound pushes it out or its session is served again.
#[derive(Debug)]
pub struct SessionAffinity {
    pools: LruCache<String, Remembered>,
    ttl: Duration,
}

#[derive(Debug)]
struct Remembered {
    pool: PoolId,
    /// When a turn of the session last ended on `pool`.
    at: Instant,
}

impl SessionAffinity {
    pub fn new(capacity: NonZeroUsize, ttl: Duration) -> SessionAffinity {
        SessionAffinity {
            pools: LruCache::new(capacity),
            ttl,
        }
    }

    /// The pool that served `session` less than the TTL before `now`.
    pub fn pool_of(&self, session: &str, now: Instant) -> Option<&PoolId> {
        self.pools
            .peek(session)
            .filter(|remembered| now.saturating_duration_since(remembered.at) < self.ttl)
            .map(|remembered| &remembered.pool)
    }

    /// `session`'s turn ended on `pool` at `now`.
    pub fn remember(&mut self, session: &str, pool: &PoolId, now: Instant) {
        self.pools.put(
            session.to_owned(),
            Remembered {
                pool: pool.clone(),
                at: now,
            },
        );
    }

    /// Sessions remembered, expired ones included.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

fn takes_work(pool: &PoolSnapshot, wanted: &Wanted<'_>) -> bool {
    pool.state == PoolState::Ready
        && pool.slots_free >= wanted.slots.on(pool.slots_total)
        && !wanted.held_back.contains(&pool.pool_id)
}

/// Exhaustive, so that every new state is decided here: an Unloaded pool loads on demand and a
/// Loading one is on its way, so both are worth waiting for.
fn out_of_service(pool: &PoolSnapshot) -> bool {
    match pool.state {
        PoolState::Stopped | PoolState::Failed => true,
        PoolState::Starting
        | PoolState::Ready
        | PoolState::Unhealthy
        | PoolState::Draining
        | PoolState::BackingOff { .. }
        | PoolState::Unloaded
        | PoolState::Loading => false,
    }
}

fn chosen(pool: &PoolSnapshot, slots: SlotNeed) -> Choice {
    Choice {
        pool: pool.pool_id.clone(),
        slots: slots.on(pool.slots_total),
    }
}

/// The pools of `wanted.model` that serve its API and are not avoided (or the pinned one).
fn candidates<'s>(
    snapshot: &'s RegistrySnapshot,
    wanted: &Wanted<'_>,
) -> Result<Vec<&'s PoolSnapshot>, NoPlacement> {
    let of_model: Vec<&PoolSnapshot> = snapshot
        .pools
        .iter()
        .filter(|pool| pool.model == wanted.model)
        .filter(|pool| match &wanted.hints.pin {
            Some(pin) => &pool.pool_id == pin,
            None => !wanted.hints.avoid.contains(&pool.pool_id),
        })
        .collect();
    if of_model.is_empty() {
        return Err(NoPlacement::UnknownModel);
    }
    let serving: Vec<&PoolSnapshot> = of_model
        .into_iter()
        .filter(|pool| pool.serves(wanted.api))
        .collect();
    if serving.is_empty() {
        return Err(NoPlacement::ApiNotServed);
    }
    // Slot counts are known once an engine has been ready; judge only by those.
    let most = serving
        .iter()
        .map(|pool| pool.slots_total)
        .max()
        .unwrap_or(0);
    if most > 0 && wanted.slots.parallel > most {
        return Err(NoPlacement::TooManyParallel { most });
    }
    Ok(serving)
}

/// Picks a pool for `wanted`: the pinned one; else the session's pool while it has the slots free;
/// else the preferred one while it has them; else the least loaded (largest share of free slots,
/// ties to the lowest pool id).
pub fn choose(
    snapshot: &RegistrySnapshot,
    wanted: &Wanted<'_>,
    session_pool: Option<&PoolId>,
) -> Result<Choice, NoPlacement> {
    let candidates = candidates(snapshot, wanted)?;
    let preferred = [session_pool, wanted.hints.prefer.as_ref()];
    for wanted_pool in preferred.into_iter().flatten() {
        if let Some(pool) = candidates.iter().find(|pool| &pool.pool_id == wanted_pool)
            && takes_work(pool, wanted)
        {
            return Ok(chosen(pool, wanted.slots));
        }
    }
    let best = candidates
        .iter()
        .filter(|pool| takes_work(pool, wanted))
        .max_by(|a, b| {
            let a_share = u64::from(a.slots_free) * u64::from(b.slots_total);
            let b_share = u64::from(b.slots_free) * u64::from(a.slots_total);
            a_share
                .cmp(&b_share)
                .then_with(|| b.pool_id.cmp(&a.pool_id))
        });
    match best {
        Some(pool) => Ok(chosen(pool, wanted.slots)),
        None if candidates.iter().any(|pool| pool.state == PoolState::Ready) => {
            Err(NoPlacement::Busy)
        }
        None if candidates.iter().all(|pool| out_of_service(pool)) => {
            Err(NoPlacement::OutOfService)
        }
        None => Err(NoPlacement::NoneReady),
    }
}

/// The pool a request that needs several slots and found none with enough free should wait for:
/// the ready pool that could hold it with the most slots free already. Its slots are then held back
/// from later requests (`Wanted::held_back`) until the request fits, so a stream of one-slot
/// requests cannot starve it. `None` for a one-slot request (slots go in queue order anyway) or
/// when no ready pool could ever hold it.
pub fn pool_to_wait_for(snapshot: &RegistrySnapshot, wanted: &Wanted<'_>) -> Option<PoolId> {
    let candidates = candidates(snapshot, wanted).ok()?;
    candidates
        .iter()
        .filter(|pool| pool.state == PoolState::Ready && !wanted.held_back.contains(&pool.pool_id))
        .filter(|pool| {
            let need = wanted.slots.on(pool.slots_total);
            need > 1 && need <= pool.slots_total
        })
        .max_by(|a, b| {
            a.slots_free
                .cmp(&b.slots_free)
                .then_with(|| b.pool_id.cmp(&a.pool_id))
        })
        .map(|pool| pool.pool_id.clone())
}

/// The pool to load for `wanted`: when none of its model's pools (serving its API) is ready or
/// on its way (starting, loading, recovering, backing off) and one is unloaded, the unloaded one
/// with the most slots (ties to the lowest id); `None` otherwise.
pub fn pool_to_load(snapshot: &RegistrySnapshot, wanted: &Wanted<'_>) -> Option<PoolId> {
    let pools = candidates(snapshot, wanted).ok()?;
    let live = pools
        .iter()
        .any(|pool| !out_of_service(pool) && pool.state != PoolState::Unloaded);
    if live {
        return None;
    }
    pools
        .iter()
        .filter(|pool| pool.state == PoolState::Unloaded)
        .min_by(|a, b| {
            b.slots_total
                .cmp(&a.slots_total)
                .then_with(|| a.pool_id.cmp(&b.pool_id))
        })
        .map(|pool| pool.pool_id.clone())
}

/// Whether `pool` is one the demand could be placed on (its model, its API, not avoided).
pub fn may_serve(snapshot: &RegistrySnapshot, wanted: &Wanted<'_>, pool: &PoolId) -> bool {
    candidates(snapshot, wanted).is_ok_and(|pools| pools.iter().any(|each| &each.pool_id == pool))
}

/// Whether a demand waits for nothing but loads that just failed: none of its model's pools is
/// ready or on its way, and one of `failed` (pools whose load failed) is among them.
pub fn waits_only_for_failed_loads(
    snapshot: &RegistrySnapshot,
    wanted: &Wanted<'_>,
    failed: &[PoolId],
) -> bool {
    let Ok(pools) = candidates(snapshot, wanted) else {
        return false;
    };
    let coming = |pool: &&PoolSnapshot| {
        matches!(
            pool.state,
            PoolState::Ready
                | PoolState::Starting
                | PoolState::Loading
                | PoolState::Unhealthy
                | PoolState::Draining
        )
    };
    !pools.iter().any(coming) && pools.iter().any(|pool| failed.contains(&pool.pool_id))
}

/// Whether a request whose engine failed could go elsewhere: a pool other than the avoided ones
/// (the failed one among them) serves its model and API and is ready. Never for a pinned request.
pub fn another_ready(snapshot: &RegistrySnapshot, wanted: &Wanted<'_>) -> bool {
    wanted.hints.pin.is_none()
        && candidates(snapshot, wanted)
            .is_ok_and(|pools| pools.iter().any(|pool| pool.state == PoolState::Ready))
}

/// A ready pool of `wanted.model` serving its API, for a request that occupies no slot (the token
/// counters): the one with the most free slots, busy or not.
pub fn choose_unleased(
    snapshot: &RegistrySnapshot,
    wanted: &Wanted<'_>,
) -> Result<PoolId, NoPlacement> {
    let candidates = candidates(snapshot, wanted)?;
    let best = candidates
        .iter()
        .filter(|pool| pool.state == PoolState::Ready)
        .max_by(|a, b| {
            a.slots_free
                .cmp(&b.slots_free)
                .then_with(|| b.pool_id.cmp(&a.pool_id))
        });
    match best {
        Some(pool) => Ok(pool.pool_id.clone()),
        None if candidates.iter().all(|pool| out_of_service(pool)) => {
            Err(NoPlacement::OutOfService)
        }
        None => Err(NoPlacement::NoneReady),
    }
}

/// The models served by at least one pool, sorted.
pub fn models(snapshot: &RegistrySnapshot) -> Vec<(String, bool)> {
    let mut models: Vec<(String, bool)> = Vec::new();
    for pool in &snapshot.pools {
        let ready = pool.state == PoolState::Ready;
        match models.iter_mut().find(|(model, _)| *model == pool.model) {
            Some((_, loaded)) => *loaded |= ready,
            None => models.push((pool.model.clone(), ready)),
        }
    }
    models.sort();
    models
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pool_ipc::registry::{ApiEndpoint, Endpoint, EngineKind};

    /// A llama.cpp pool on a Unix socket (also the scheduler's tests' pool).
    pub(crate) fn pool(
        id: &str,
        model: &str,
        state: PoolState,
        free: u32,
        total: u32,
    ) -> PoolSnapshot {
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

    fn wanted<'a>(model: &'a str, hints: &'a PlacementHints) -> Wanted<'a> {
        Wanted {
            model,
            api: ApiEndpoint::ChatCompletions,
            slots: SlotNeed::ONE,
            hints,
            held_back: &[],
        }
    }

    fn on(pool: &str) -> Result<Choice, NoPlacement> {
        Ok(Choice {
            pool: PoolId(pool.into()),
            slots: 1,
        })
    }

    #[test]
    fn the_least_loaded_ready_pool_serving_the_model_wins() {
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 1, 4),
            pool("b", "m", PoolState::Ready, 3, 4),
            pool("c", "x", PoolState::Ready, 9, 9),
            pool("d", "m", PoolState::Draining, 4, 4),
        ]);
        let hints = PlacementHints::default();
        assert_eq!(choose(&snapshot, &wanted("m", &hints), None), on("b"));
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
            choose(&snapshot, &wanted("m", &hints), Some(&home)),
            on("a")
        );
        snapshot.pools[0].slots_free = 0;
        assert_eq!(
            choose(&snapshot, &wanted("m", &hints), Some(&home)),
            on("b")
        );
    }

    #[test]
    fn session_affinity_is_bounded_by_its_capacity_and_forgets_a_pool_older_than_the_ttl() {
        let capacity = NonZeroUsize::new(1_000).unwrap();
        let ttl = Duration::from_secs(60);
        let start = Instant::now();
        let mut affinity = SessionAffinity::new(capacity, ttl);
        let a = PoolId("a".into());
        for i in 0..100_000 {
            affinity.remember(&format!("session-{i}"), &a, start);
        }
        assert_eq!(affinity.len(), capacity.get(), "at most capacity entries");
        assert_eq!(
            affinity.pool_of("session-0", start),
            None,
            "the oldest went"
        );
        assert_eq!(affinity.pool_of("session-99999", start), Some(&a));

        // Within the TTL the pool is used; from the TTL on it is not, though still stored.
        let just_inside = start + ttl - Duration::from_millis(1);
        assert_eq!(affinity.pool_of("session-99999", just_inside), Some(&a));
        assert_eq!(affinity.pool_of("session-99999", start + ttl), None);
        assert_eq!(affinity.len(), capacity.get());
        // A new turn served there makes it count again from then.
        let later = start + ttl * 2;
        affinity.remember("session-99999", &PoolId("b".into()), later);
        assert_eq!(
            affinity.pool_of("session-99999", later + ttl / 2),
            Some(&PoolId("b".into()))
        );

        // An expired session's pool is not where placement sends it.
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 1, 4),
            pool("b", "m", PoolState::Ready, 3, 4),
        ]);
        let hints = PlacementHints::default();
        let home = affinity.pool_of("session-99998", start + ttl);
        assert_eq!(choose(&snapshot, &wanted("m", &hints), home), on("b"));
        let home = affinity.pool_of("session-99998", start);
        assert_eq!(choose(&snapshot, &wanted("m", &hints), home), on("a"));
    }

    #[test]
    fn an_unloaded_pool_is_loaded_only_when_nothing_else_of_the_model_is_ready_or_coming() {
        let hints = PlacementHints::default();
        let all_unloaded = registry(vec![
            pool("a", "m", PoolState::Unloaded, 0, 2),
            pool("b", "m", PoolState::Unloaded, 0, 4),
            pool("c", "m", PoolState::Stopped, 0, 8),
        ]);
        assert_eq!(
            pool_to_load(&all_unloaded, &wanted("m", &hints)),
            Some(PoolId("b".into())),
            "the one with the most slots; a stopped pool is an operator's"
        );
        for coming in [PoolState::Ready, PoolState::Loading, PoolState::Starting] {
            let snapshot = registry(vec![
                pool("a", "m", PoolState::Unloaded, 0, 2),
                pool("b", "m", coming, 0, 4),
            ]);
            assert_eq!(pool_to_load(&snapshot, &wanted("m", &hints)), None);
        }
        assert_eq!(pool_to_load(&all_unloaded, &wanted("other", &hints)), None);
    }

    #[test]
    fn a_demand_is_doomed_by_a_failed_load_only_when_nothing_else_is_coming() {
        let hints = PlacementHints::default();
        let failed = [PoolId("a".into())];
        let backing_off = PoolState::BackingOff { until_unix_ms: 1 };
        let alone = registry(vec![pool("a", "m", backing_off, 0, 1)]);
        assert!(waits_only_for_failed_loads(
            &alone,
            &wanted("m", &hints),
            &failed
        ));
        let with_ready = registry(vec![
            pool("a", "m", backing_off, 0, 1),
            pool("b", "m", PoolState::Ready, 0, 1),
        ]);
        assert!(!waits_only_for_failed_loads(
            &with_ready,
            &wanted("m", &hints),
            &failed
        ));
        assert!(!waits_only_for_failed_loads(
            &alone,
            &wanted("m", &hints),
            &[]
        ));
    }

    #[test]
    fn models_say_whether_any_of_their_pools_is_loaded() {
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Unloaded, 0, 1),
            pool("b", "m", PoolState::Ready, 1, 1),
            pool("c", "n", PoolState::Unloaded, 0, 1),
        ]);
        assert_eq!(
            models(&snapshot),
            vec![("m".to_owned(), true), ("n".to_owned(), false)]
        );
    }

    #[test]
    fn a_failed_request_may_go_only_to_another_ready_pool_of_its_model_and_never_when_pinned() {
        let failed_on_a = PlacementHints {
            avoid: vec![PoolId("a".into())],
            ..Default::default()
        };
        let with = |b: PoolState| {
            registry(vec![
                pool("a", "m", PoolState::Ready, 1, 1),
                pool("b", "m", b, 0, 1),
                pool("c", "other", PoolState::Ready, 1, 1),
            ])
        };
        // Busy is fine: the request waits in the queue for it.
        assert!(another_ready(
            &with(PoolState::Ready),
            &wanted("m", &failed_on_a)
        ));
        for not_ready in [
            PoolState::Starting,
            PoolState::Unhealthy,
            PoolState::Draining,
            PoolState::Failed,
        ] {
            assert!(!another_ready(&with(not_ready), &wanted("m", &failed_on_a)));
        }
        let pinned = PlacementHints {
            pin: Some(PoolId("a".into())),
            avoid: vec![PoolId("a".into())],
            ..Default::default()
        };
        assert!(!another_ready(
            &with(PoolState::Ready),
            &wanted("m", &pinned)
        ));
        let mut other_api = wanted("m", &failed_on_a);
        other_api.api = ApiEndpoint::Embeddings;
        let mut b_serves_chat_only = pool("b", "m", PoolState::Ready, 1, 1);
        b_serves_chat_only.api_endpoints = vec![ApiEndpoint::ChatCompletions];
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 1, 1),
            b_serves_chat_only,
        ]);
        assert!(!another_ready(&snapshot, &other_api));
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
        assert_eq!(choose(&snapshot, &wanted("m", &pin), None), on("a"));
        let prefer = PlacementHints {
            prefer: Some(PoolId("a".into())),
            ..Default::default()
        };
        assert_eq!(choose(&snapshot, &wanted("m", &prefer), None), on("a"));
        let avoid = PlacementHints {
            avoid: vec![PoolId("b".into())],
            ..Default::default()
        };
        assert_eq!(choose(&snapshot, &wanted("m", &avoid), None), on("a"));
        let pin_elsewhere = PlacementHints {
            pin: Some(PoolId("zz".into())),
            ..Default::default()
        };
        assert_eq!(
            choose(&snapshot, &wanted("m", &pin_elsewhere), None),
            Err(NoPlacement::UnknownModel)
        );
    }

    #[test]
    fn busy_not_ready_and_unknown_are_told_apart() {
        let busy = registry(vec![pool("a", "m", PoolState::Ready, 0, 4)]);
        let hints = PlacementHints::default();
        assert_eq!(
            choose(&busy, &wanted("m", &hints), None),
            Err(NoPlacement::Busy)
        );
        let starting = registry(vec![pool("a", "m", PoolState::Starting, 4, 4)]);
        assert_eq!(
            choose(&starting, &wanted("m", &hints), None),
            Err(NoPlacement::NoneReady)
        );
        assert_eq!(
            choose(&starting, &wanted("other", &hints), None),
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
            choose(&stopped, &wanted("m", &hints), None),
            Err(NoPlacement::OutOfService)
        );
        let pin = PlacementHints {
            pin: Some(PoolId("a".into())),
            ..Default::default()
        };
        assert_eq!(
            choose(&stopped, &wanted("m", &pin), None),
            Err(NoPlacement::OutOfService)
        );
        // One pool that may still come back (draining, backing off, loadable) is worth waiting
        // for.
        for state in [
            PoolState::Draining,
            PoolState::BackingOff { until_unix_ms: 1 },
            PoolState::Starting,
            PoolState::Unhealthy,
            PoolState::Unloaded,
            PoolState::Loading,
        ] {
            let mixed = registry(vec![
                pool("a", "m", PoolState::Stopped, 4, 4),
                pool("b", "m", state, 4, 4),
            ]);
            assert_eq!(
                choose(&mixed, &wanted("m", &hints), None),
                Err(NoPlacement::NoneReady),
                "{state:?}"
            );
        }
    }

    #[test]
    fn a_request_goes_only_to_pools_serving_its_api() {
        let mut embeddings = pool("e", "m", PoolState::Ready, 4, 4);
        embeddings.api_endpoints = vec![ApiEndpoint::Embeddings];
        let snapshot = registry(vec![embeddings, pool("c", "m", PoolState::Ready, 1, 4)]);
        let hints = PlacementHints::default();
        assert_eq!(choose(&snapshot, &wanted("m", &hints), None), on("c"));
        let embed = Wanted {
            api: ApiEndpoint::Embeddings,
            ..wanted("m", &hints)
        };
        assert_eq!(choose(&snapshot, &embed, None), on("e"));
        let rerank = Wanted {
            api: ApiEndpoint::Rerank,
            ..wanted("m", &hints)
        };
        assert_eq!(
            choose(&snapshot, &rerank, None),
            Err(NoPlacement::ApiNotServed)
        );
    }

    #[test]
    fn parallel_sequences_need_that_many_free_slots_and_batches_fill_what_the_pool_has() {
        let hints = PlacementHints::default();
        let two = Wanted {
            slots: SlotNeed {
                parallel: 2,
                total: 2,
            },
            ..wanted("m", &hints)
        };
        let one_free = registry(vec![pool("a", "m", PoolState::Ready, 1, 2)]);
        assert_eq!(choose(&one_free, &two, None), Err(NoPlacement::Busy));
        let both_free = registry(vec![pool("a", "m", PoolState::Ready, 2, 2)]);
        assert_eq!(
            choose(&both_free, &two, None),
            Ok(Choice {
                pool: PoolId("a".into()),
                slots: 2
            })
        );
        let three = Wanted {
            slots: SlotNeed {
                parallel: 3,
                total: 3,
            },
            ..wanted("m", &hints)
        };
        assert_eq!(
            choose(&both_free, &three, None),
            Err(NoPlacement::TooManyParallel { most: 2 })
        );
        let batch = Wanted {
            slots: SlotNeed {
                parallel: 1,
                total: 50,
            },
            ..wanted("m", &hints)
        };
        let four = registry(vec![pool("a", "m", PoolState::Ready, 4, 4)]);
        assert_eq!(
            choose(&four, &batch, None),
            Ok(Choice {
                pool: PoolId("a".into()),
                slots: 4
            })
        );
    }

    #[test]
    fn an_unleased_request_takes_any_ready_pool_even_a_busy_one() {
        let hints = PlacementHints::default();
        let snapshot = registry(vec![
            pool("a", "m", PoolState::Ready, 0, 4),
            pool("b", "m", PoolState::Starting, 4, 4),
        ]);
        assert_eq!(
            choose_unleased(&snapshot, &wanted("m", &hints)),
            Ok(PoolId("a".into()))
        );
        let starting = registry(vec![pool("b", "m", PoolState::Starting, 4, 4)]);
        assert_eq!(
            choose_unleased(&starting, &wanted("m", &hints)),
            Err(NoPlacement::NoneReady)
        );
    }

    #[test]
    fn a_pool_held_back_for_a_larger_request_takes_no_smaller_one_until_it_fits() {
        let hints = PlacementHints::default();
        let snapshot = registry(vec![pool("a", "m", PoolState::Ready, 2, 4)]);
        let four = Wanted {
            slots: SlotNeed {
                parallel: 4,
                total: 4,
            },
            ..wanted("m", &hints)
        };
        assert_eq!(choose(&snapshot, &four, None), Err(NoPlacement::Busy));
        let held = pool_to_wait_for(&snapshot, &four).unwrap();
        assert_eq!(held, PoolId("a".into()));
        let held_back = [held];
        let one = Wanted {
            held_back: &held_back,
            ..wanted("m", &hints)
        };
        assert_eq!(choose(&snapshot, &one, None), Err(NoPlacement::Busy));
        assert_eq!(pool_to_wait_for(&snapshot, &wanted("m", &hints)), None);
    }
}
