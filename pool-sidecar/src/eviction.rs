//! Deciding what must be unloaded before a demanded pool can be loaded, as a pure function of the
//! pools, their footprints, the devices' budgets and the time: [`plan`]. The caller (the pools
//! controller) carries the plan out and plans again whenever something changes (a lease ended, an
//! unload finished, a residency guard expired), so a plan never has to predict anything.
//!
//! The rules: a pool that fits in what its device has free loads at once. Otherwise idle pools
//! (no leases) of the same device are unloaded, least recently used first, until it fits. A pool
//! with leases is never evicted: the demand waits until they end, and the pools it waits for are
//! named so that the caller gives them no new leases meanwhile. A pool loaded less than the
//! minimum residency ago is not evicted yet (against swap storms: the demand waits until the
//! guard expires). Pinned pools (`load = "always"`) are never evicted. A pool whose footprint is
//! above its device's budget, or above what the pinned pools leave of it, can never load.

use pool_ipc::registry::PoolId;
use std::time::{Duration, Instant};

/// Where a pool's memory comes from: a GPU (by NVML index) or the host's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    Gpu(u32),
    Host,
}

impl std::fmt::Display for Device {
    /// `host`, or `gpu<N>` for NVML index N (as in metrics labels and the status table).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Host => f.write_str("host"),
            Device::Gpu(index) => write!(f, "gpu{index}"),
        }
    }
}

/// A pool as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub pool: PoolId,
    pub device: Device,
    /// Measured after its last load, else estimated from its model file.
    pub footprint: u64,
    /// `load = "always"`: never evicted.
    pub pinned: bool,
    pub residency: Residency,
}

/// Whether a pool holds memory, and how it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    Unloaded,
    /// Being loaded: counts as holding its footprint.
    Loading,
    Loaded {
        leases: u32,
        loaded_at: Instant,
        /// When its last lease ended (or it finished loading, if it never had one).
        last_used: Instant,
    },
    /// Being unloaded: holds its footprint until it is gone.
    Unloading,
}

/// How much a device may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub device: Device,
    pub bytes: u64,
}

/// What to do about a demand for a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// It is loaded or loading: nothing to do.
    Resident,
    /// Unload `evict` (idle, in this order), then load the pool; `evict` may be empty.
    Load { evict: Vec<PoolId> },
    /// It cannot load yet: `draining` (the pools chosen to make room, least recently used first)
    /// take no new leases and are unloaded once their leases end (the idle ones at once); it
    /// also waits for pools already unloading to be gone, or until `until` (a residency guard).
    /// Plan again when any of that happens.
    Wait {
        draining: Vec<PoolId>,
        until: Option<Instant>,
    },
    /// It can never load on this device: its footprint is above the budget, or above what the
    /// pinned pools leave of it.
    NeverFits {
        footprint: u64,
        budget: u64,
        pinned: u64,
    },
    /// No such pool, or its device has no budget.
    Unknown,
}

/// Plans a demand for `demanded` among `pools` under `budgets`, at `now`.
pub fn plan(
    pools: &[Resident],
    budgets: &[Budget],
    demanded: &PoolId,
    now: Instant,
    min_residency: Duration,
) -> Plan {
    let Some(wanted) = pools.iter().find(|pool| &pool.pool == demanded) else {
        return Plan::Unknown;
    };
    match wanted.residency {
        Residency::Loading | Residency::Loaded { .. } => return Plan::Resident,
        // Its memory comes back first; loading it again now would count it twice.
        Residency::Unloading => {
            return Plan::Wait {
                draining: Vec::new(),
                until: None,
            };
        }
        Residency::Unloaded => {}
    }
    let Some(budget) = budgets.iter().find(|budget| budget.device == wanted.device) else {
        return Plan::Unknown;
    };
    let on_device: Vec<&Resident> = pools
        .iter()
        .filter(|pool| pool.device == wanted.device && pool.pool != wanted.pool)
        .collect();
    let pinned: u64 = on_device
        .iter()
        .filter(|pool| pool.pinned && holds_memory(pool.residency))
        .map(|pool| pool.footprint)
        .sum();
    if wanted.footprint > budget.bytes.saturating_sub(pinned) {
        return Plan::NeverFits {
            footprint: wanted.footprint,
            budget: budget.bytes,
            pinned,
        };
    }
    let used: u64 = on_device
        .iter()
        .filter(|pool| holds_memory(pool.residency))
        .map(|pool| pool.footprint)
        .sum();
    let mut missing = (used + wanted.footprint).saturating_sub(budget.bytes);
    if missing == 0 {
        return Plan::Load { evict: Vec::new() };
    }
    // Memory on its way back counts first: those pools are already going.
    let unloading: u64 = on_device
        .iter()
        .filter(|pool| pool.residency == Residency::Unloading)
        .map(|pool| pool.footprint)
        .sum();
    let after_unloads = missing.saturating_sub(unloading);
    // Evictable pools, least recently used first (ties by id, so plans are stable).
    let mut loaded: Vec<(&Resident, u32, Instant, Instant)> = on_device
        .iter()
        .filter(|pool| !pool.pinned)
        .filter_map(|pool| match pool.residency {
            Residency::Loaded {
                leases,
                loaded_at,
                last_used,
            } => Some((*pool, leases, loaded_at, last_used)),
            Residency::Unloaded | Residency::Loading | Residency::Unloading => None,
        })
        .collect();
    loaded.sort_by(|a, b| a.3.cmp(&b.3).then_with(|| a.0.pool.cmp(&b.0.pool)));
    let evictable_now = |leases: u32, loaded_at: Instant| {
        leases == 0 && now.saturating_duration_since(loaded_at) >= min_residency
    };
    let mut evict = Vec::new();
    let mut freed = 0u64;
    for (pool, leases, loaded_at, _) in &loaded {
        if freed >= after_unloads {
            break;
        }
        if evictable_now(*leases, *loaded_at) {
            evict.push(pool.pool.clone());
            freed += pool.footprint;
        }
    }
    if unloading == 0 && freed >= missing {
        return Plan::Load { evict };
    }
    // Not enough now: the least recently used pools that would make room are chosen, idle ones
    // unloaded at once, busy ones drained (no new leases) and guarded ones waited for.
    missing = after_unloads;
    let mut draining = Vec::new();
    let mut until: Option<Instant> = None;
    let mut chosen = 0u64;
    let mut evict_now = Vec::new();
    for (pool, leases, loaded_at, _) in &loaded {
        if chosen >= missing {
            break;
        }
        chosen += pool.footprint;
        if *leases > 0 {
            draining.push(pool.pool.clone());
        } else if evictable_now(*leases, *loaded_at) {
            evict_now.push(pool.pool.clone());
        } else {
            let expires = *loaded_at + min_residency;
            until = Some(until.map_or(expires, |earlier| earlier.min(expires)));
        }
    }
    if evict_now.is_empty() || !draining.is_empty() || until.is_some() || unloading > 0 {
        // The idle pools chosen are named with the busy ones: none of them takes new work, and
        // the caller unloads them (at once, having no leases) while the busy ones drain.
        draining.extend(evict_now);
        return Plan::Wait { draining, until };
    }
    Plan::Load { evict: evict_now }
}

fn holds_memory(residency: Residency) -> bool {
    !matches!(residency, Residency::Unloaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;
    const RESIDENCY: Duration = Duration::from_secs(30);

    struct World {
        start: Instant,
        pools: Vec<Resident>,
        budgets: Vec<Budget>,
    }

    impl World {
        /// One GPU with `budget_gib`.
        fn new(budget_gib: u64) -> World {
            World {
                start: Instant::now(),
                pools: Vec::new(),
                budgets: vec![Budget {
                    device: Device::Gpu(0),
                    bytes: budget_gib * GIB,
                }],
            }
        }

        fn at(&self, seconds: u64) -> Instant {
            self.start + Duration::from_secs(seconds)
        }

        fn pool(mut self, id: &str, gib: u64, residency: Residency) -> World {
            self.pools.push(Resident {
                pool: PoolId::from(id),
                device: Device::Gpu(0),
                footprint: gib * GIB,
                pinned: false,
                residency,
            });
            self
        }

        fn pinned(mut self, id: &str, gib: u64) -> World {
            let loaded = self.loaded(0, 0, 0);
            self = self.pool(id, gib, loaded);
            if let Some(last) = self.pools.last_mut() {
                last.pinned = true;
            }
            self
        }

        /// Loaded at `loaded_s`, last used at `used_s`, with `leases`.
        fn loaded(&self, leases: u32, loaded_s: u64, used_s: u64) -> Residency {
            Residency::Loaded {
                leases,
                loaded_at: self.at(loaded_s),
                last_used: self.at(used_s),
            }
        }

        fn plan(&self, id: &str, now_s: u64) -> Plan {
            plan(
                &self.pools,
                &self.budgets,
                &PoolId::from(id),
                self.at(now_s),
                RESIDENCY,
            )
        }
    }

    fn ids(names: &[&str]) -> Vec<PoolId> {
        names.iter().map(|name| PoolId::from(*name)).collect()
    }

    #[test]
    fn a_pool_that_fits_loads_at_once_and_a_resident_one_needs_nothing() {
        // a and c (loading) hold 8 of 12.
        let world = World::new(12);
        let a = world.loaded(0, 0, 0);
        let world = world
            .pool("a", 4, a)
            .pool("b", 4, Residency::Unloaded)
            .pool("c", 4, Residency::Loading);
        assert_eq!(world.plan("b", 100), Plan::Load { evict: vec![] });
        assert_eq!(world.plan("a", 100), Plan::Resident);
        assert_eq!(world.plan("c", 100), Plan::Resident);
        assert_eq!(world.plan("zz", 100), Plan::Unknown);
        let going = World::new(10).pool("g", 4, Residency::Unloading);
        assert_eq!(
            going.plan("g", 100),
            Plan::Wait {
                draining: vec![],
                until: None
            },
            "a pool still unloading is loaded again once it is gone"
        );
    }

    #[test]
    fn idle_pools_are_evicted_least_recently_used_first_and_only_as_many_as_needed() {
        let world = World::new(10);
        let (a, b, c) = (
            world.loaded(0, 0, 50),
            world.loaded(0, 0, 40),
            world.loaded(0, 0, 60),
        );
        let world =
            world
                .pool("a", 3, a)
                .pool("b", 3, b)
                .pool("c", 3, c)
                .pool("d", 4, Residency::Unloaded);
        // 9 used + 4 wanted in 10: 3 missing; b was used longest ago.
        assert_eq!(world.plan("d", 100), Plan::Load { evict: ids(&["b"]) });
        let bigger = World {
            pools: world
                .pools
                .iter()
                .cloned()
                .map(|mut pool| {
                    if pool.pool == PoolId::from("d") {
                        pool.footprint = 7 * GIB;
                    }
                    pool
                })
                .collect(),
            ..world
        };
        assert_eq!(
            bigger.plan("d", 100),
            Plan::Load {
                evict: ids(&["b", "a"])
            }
        );
    }

    #[test]
    fn a_pool_with_leases_is_never_evicted_the_demand_waits_for_it_to_drain() {
        let world = World::new(8);
        let (a, b) = (world.loaded(1, 0, 10), world.loaded(0, 0, 90));
        let world = world
            .pool("a", 4, a)
            .pool("b", 4, b)
            .pool("c", 8, Residency::Unloaded);
        // Both must go; a (least recently used) is busy: wait for it, b is not unloaded yet.
        assert_eq!(
            world.plan("c", 100),
            Plan::Wait {
                draining: ids(&["a", "b"]),
                until: None
            }
        );
        let only_busy = World::new(8);
        let a = only_busy.loaded(2, 0, 0);
        let only_busy = only_busy.pool("a", 4, a).pool("c", 6, Residency::Unloaded);
        assert_eq!(
            only_busy.plan("c", 100),
            Plan::Wait {
                draining: ids(&["a"]),
                until: None
            }
        );
    }

    #[test]
    fn a_pool_inside_its_minimum_residency_is_waited_for_not_evicted() {
        let world = World::new(8);
        let a = world.loaded(0, 90, 90);
        let world = world.pool("a", 6, a).pool("b", 6, Residency::Unloaded);
        assert_eq!(
            world.plan("b", 100),
            Plan::Wait {
                draining: vec![],
                until: Some(world.at(120))
            }
        );
        assert_eq!(world.plan("b", 120), Plan::Load { evict: ids(&["a"]) });
    }

    #[test]
    fn pinned_pools_are_never_evicted_and_what_cannot_fit_beside_them_never_loads() {
        let world = World::new(10).pinned("p", 6);
        let a = world.loaded(0, 0, 0);
        let world = world
            .pool("a", 3, a)
            .pool("b", 4, Residency::Unloaded)
            .pool("huge", 12, Residency::Unloaded)
            .pool("big", 5, Residency::Unloaded);
        assert_eq!(world.plan("b", 100), Plan::Load { evict: ids(&["a"]) });
        assert_eq!(
            world.plan("huge", 100),
            Plan::NeverFits {
                footprint: 12 * GIB,
                budget: 10 * GIB,
                pinned: 6 * GIB
            }
        );
        assert_eq!(
            world.plan("big", 100),
            Plan::NeverFits {
                footprint: 5 * GIB,
                budget: 10 * GIB,
                pinned: 6 * GIB
            }
        );
    }

    #[test]
    fn memory_being_unloaded_is_waited_for_before_anything_else_is_evicted() {
        let world = World::new(8);
        let a = world.loaded(0, 0, 0);
        let world = world
            .pool("a", 4, a)
            .pool("going", 4, Residency::Unloading)
            .pool("b", 4, Residency::Unloaded);
        assert_eq!(
            world.plan("b", 100),
            Plan::Wait {
                draining: vec![],
                until: None
            }
        );
    }

    #[test]
    fn other_devices_do_not_count() {
        let mut world = World::new(4);
        world.budgets.push(Budget {
            device: Device::Host,
            bytes: 100 * GIB,
        });
        let a = world.loaded(0, 0, 0);
        let mut world = world.pool("a", 4, a).pool("b", 4, Residency::Unloaded);
        world.pools[0].device = Device::Host;
        assert_eq!(world.plan("b", 100), Plan::Load { evict: vec![] });
        world.budgets.retain(|budget| budget.device == Device::Host);
        assert_eq!(world.plan("b", 100), Plan::Unknown, "no budget for GPU 0");
    }
}
