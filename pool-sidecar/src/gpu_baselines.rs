//! Baselines for GPU footprints measured by delta. Where the driver gives no per-process figures
//! (pool-managerd in a PID namespace), an engine's footprint on a GPU is the growth of the
//! device's used memory from just before its load to its Ready. The pool's supervisor reads the
//! device just before it starts the engine for a load ([`GpuMeter`]); the pools controller keeps
//! the readings ([`Baselines`]). A figure is only the engine's when nothing else changed the
//! device meanwhile: another load or engine start on the same GPU, or a pool leaving it, spoils
//! every load pending there, and a spoiled load keeps its estimate.

use crate::gpu::GpuProbe;
use pool_ipc::registry::PoolId;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A GPU's used memory read just before `pool`'s engine was started for a load (`None`: it
/// could not be read).
#[derive(Debug)]
pub struct BaselineReading {
    pub pool: PoolId,
    pub used: Option<u64>,
}

/// What a GPU pool's supervisor needs to read its device before a load.
#[derive(Clone)]
pub struct GpuMeter {
    pub probe: Arc<GpuProbe>,
    pub index: u32,
    pub readings: mpsc::UnboundedSender<BaselineReading>,
}

impl GpuMeter {
    /// Reads the device's used memory (off the async runtime) and hands it to the controller.
    pub async fn read_baseline(&self, pool: &PoolId) {
        let probe = Arc::clone(&self.probe);
        let index = self.index;
        let used = tokio::task::spawn_blocking(move || probe.device_used(index))
            .await
            .ok()
            .flatten();
        let _ = self.readings.send(BaselineReading {
            pool: pool.clone(),
            used,
        });
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Baseline {
    /// The load was sent; the device's used memory is being read.
    Pending,
    Read(u64),
    Spoiled,
}

/// The baselines of the GPU loads under way, by pool.
#[derive(Debug, Default)]
pub struct Baselines {
    loads: HashMap<PoolId, (u32, Baseline)>,
}

impl Baselines {
    /// A load of `pool` on GPU `gpu` begins: whether its baseline is worth reading. Loads
    /// already pending on that GPU are spoiled, and so is this one if there were any.
    pub fn begin(&mut self, pool: &PoolId, gpu: u32) -> bool {
        self.loads.remove(pool);
        let mut others = false;
        for (on, baseline) in self.loads.values_mut() {
            if *on == gpu {
                *baseline = Baseline::Spoiled;
                others = true;
            }
        }
        let baseline = if others {
            Baseline::Spoiled
        } else {
            Baseline::Pending
        };
        self.loads.insert(pool.clone(), (gpu, baseline));
        !others
    }

    /// The device's used memory read for `pool`'s load (`None`: it could not be read).
    pub fn read(&mut self, pool: &PoolId, used: Option<u64>) {
        if let Some((_, baseline)) = self.loads.get_mut(pool)
            && *baseline == Baseline::Pending
        {
            *baseline = used.map_or(Baseline::Spoiled, Baseline::Read);
        }
    }

    /// Memory on `gpu` changed for another reason than `except`'s load (a pool left the GPU, or
    /// another engine started there): the loads pending there cannot tell their own growth any
    /// more.
    pub fn disturb(&mut self, gpu: u32, except: Option<&PoolId>) {
        for (pool, (on, baseline)) in &mut self.loads {
            if *on == gpu && Some(pool) != except {
                *baseline = Baseline::Spoiled;
            }
        }
    }

    /// `pool`'s load is done: its baseline, if nothing spoiled it.
    pub fn finish(&mut self, pool: &PoolId) -> Option<u64> {
        match self.loads.remove(pool) {
            Some((_, Baseline::Read(used))) => Some(used),
            _ => None,
        }
    }

    /// `pool`'s load ended without a Ready (cancelled, failed for good). A load still being
    /// read (just sent, the pool not yet Loading) is kept.
    pub fn forget(&mut self, pool: &PoolId) {
        if self
            .loads
            .get(pool)
            .is_some_and(|(_, baseline)| *baseline != Baseline::Pending)
        {
            self.loads.remove(pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(id: &str) -> PoolId {
        PoolId::from(id)
    }

    #[test]
    fn a_lone_load_keeps_the_used_memory_read_before_it() {
        let mut baselines = Baselines::default();
        assert!(baselines.begin(&pool("a"), 0));
        baselines.read(&pool("a"), Some(1_000));
        assert_eq!(baselines.finish(&pool("a")), Some(1_000));
        assert_eq!(baselines.finish(&pool("a")), None, "once");
    }

    #[test]
    fn two_loads_on_one_gpu_spoil_each_other_and_other_gpus_are_untouched() {
        let mut baselines = Baselines::default();
        assert!(baselines.begin(&pool("a"), 0));
        baselines.read(&pool("a"), Some(1_000));
        assert!(baselines.begin(&pool("other-gpu"), 1));
        assert!(!baselines.begin(&pool("b"), 0));
        baselines.read(&pool("b"), Some(1_500));
        assert_eq!(baselines.finish(&pool("a")), None);
        assert_eq!(baselines.finish(&pool("b")), None);
        baselines.read(&pool("other-gpu"), Some(7));
        assert_eq!(baselines.finish(&pool("other-gpu")), Some(7));
    }

    #[test]
    fn memory_given_back_meanwhile_or_an_unreadable_device_leave_no_baseline() {
        let mut baselines = Baselines::default();
        baselines.begin(&pool("a"), 0);
        baselines.read(&pool("a"), Some(1_000));
        baselines.disturb(0, Some(&pool("a")));
        assert_eq!(baselines.finish(&pool("a")), Some(1_000), "a's own start");
        baselines.begin(&pool("a"), 0);
        baselines.read(&pool("a"), Some(1_000));
        baselines.disturb(0, Some(&pool("other")));
        assert_eq!(baselines.finish(&pool("a")), None);
        baselines.begin(&pool("a"), 0);
        baselines.read(&pool("a"), None);
        assert_eq!(baselines.finish(&pool("a")), None);
    }

    #[test]
    fn a_load_that_ended_without_ready_is_forgotten_but_one_just_sent_is_not() {
        let mut baselines = Baselines::default();
        baselines.begin(&pool("a"), 0);
        baselines.forget(&pool("a"));
        baselines.read(&pool("a"), Some(1_000));
        assert_eq!(
            baselines.finish(&pool("a")),
            Some(1_000),
            "still being read"
        );
        baselines.begin(&pool("a"), 0);
        baselines.read(&pool("a"), Some(1_000));
        baselines.forget(&pool("a"));
        assert!(baselines.begin(&pool("b"), 0), "a's load no longer counts");
    }
}
