//! What each pool's engine really takes, measured once it is loaded, and remembered across
//! restarts in `<state dir>/footprints.json`, so the eviction planner has measured figures rather
//! than estimates from the second load on. A figure is kept per pool together with the model file
//! it was measured with: another model (a reload) is unknown again until measured.
//!
//! On the host, an engine takes its process group's anonymous memory (RssAnon: heap, KV cache,
//! buffers) plus the model file it maps (counted whole: mapped pages stay in the page cache once
//! touched). GPU figures come from NVML (`gpu`).

use crate::durable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE: &str = "footprints.json";

/// One pool's measured footprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measured {
    pub bytes: u64,
    /// The model file it was measured with.
    pub model_path: String,
    pub measured_unix_ms: u64,
}

/// The measured footprints of every pool, as kept in the state directory.
#[derive(Debug)]
pub struct FootprintStore {
    path: PathBuf,
    pools: BTreeMap<String, Measured>,
}

impl FootprintStore {
    /// Reads what earlier runs measured; a missing file is an empty store, an unreadable one
    /// too (said in the log: the next loads measure again).
    pub fn load(state_dir: &Path) -> FootprintStore {
        let path = state_dir.join(FILE);
        let pools = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "ignoring unreadable measured footprints; the next loads measure again");
                BTreeMap::new()
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read measured footprints; the next loads measure again");
                BTreeMap::new()
            }
        };
        FootprintStore { path, pools }
    }

    /// The footprint measured for `pool` running `model_path`, if any.
    pub fn get(&self, pool: &str, model_path: &str) -> Option<u64> {
        self.pools
            .get(pool)
            .filter(|measured| measured.model_path == model_path)
            .map(|measured| measured.bytes)
    }

    /// Remembers a measurement, durably: the file is written and synced on a blocking thread
    /// (pool-managerd's runtime has one thread, which a sync to disk must not stall).
    pub async fn record(&mut self, pool: &str, measured: Measured) -> std::io::Result<()> {
        self.pools.insert(pool.to_owned(), measured);
        let text = serde_json::to_vec_pretty(&self.pools).map_err(std::io::Error::other)?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || durable::write_file(&path, &text, 0o640))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// The processes of process group `pgid` (an engine and whatever it started).
fn process_group(pgid: u32) -> std::io::Result<Vec<procfs::process::Process>> {
    let processes = procfs::process::all_processes().map_err(std::io::Error::other)?;
    Ok(processes
        .filter_map(Result::ok)
        .filter(|process| {
            process
                .stat()
                .is_ok_and(|stat| u32::try_from(stat.pgrp).is_ok_and(|group| group == pgid))
        })
        .collect())
}

/// The pids of process group `pgid` (for NVML's per-process figures).
pub fn process_group_pids(pgid: u32) -> std::io::Result<Vec<u32>> {
    Ok(process_group(pgid)?
        .iter()
        .filter_map(|process| u32::try_from(process.pid).ok())
        .collect())
}

/// An engine's footprint on the host: the anonymous resident memory of every process in its
/// process group `pgid`, plus the size of the model file it maps.
pub fn measure_host(pgid: u32, model_path: &Path) -> std::io::Result<u64> {
    let anonymous_kib: u64 = process_group(pgid)?
        .iter()
        .filter_map(|process| process.status().ok()?.rssanon)
        .sum();
    let model_bytes = std::fs::metadata(model_path)?.len();
    Ok(anonymous_kib
        .saturating_mul(1024)
        .saturating_add(model_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn measurements_survive_a_restart_and_belong_to_the_model_they_were_taken_with() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FootprintStore::load(dir.path());
        assert_eq!(store.get("a", "/m/a.gguf"), None);
        let measured = Measured {
            bytes: 123_456,
            model_path: "/m/a.gguf".into(),
            measured_unix_ms: 1,
        };
        store.record("a", measured).await.unwrap();
        let again = FootprintStore::load(dir.path());
        assert_eq!(again.get("a", "/m/a.gguf"), Some(123_456));
        assert_eq!(again.get("a", "/m/other.gguf"), None, "another model");
        std::fs::write(dir.path().join(FILE), "not json").unwrap();
        assert_eq!(FootprintStore::load(dir.path()).get("a", "/m/a.gguf"), None);
    }

    #[test]
    fn a_process_group_takes_its_anonymous_memory_plus_the_model_file() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.gguf");
        std::fs::write(&model, vec![0u8; 4096]).unwrap();
        // This test's own process group: its anonymous memory is far more than nothing.
        let group = u32::try_from(nix::unistd::getpgrp().as_raw()).unwrap();
        let own = measure_host(group, &model).unwrap();
        assert!(own > 4096 + 1024 * 1024, "{own}");
        let nobody = u32::try_from(nix::unistd::getpgrp().as_raw()).unwrap() + 1_000_000;
        assert_eq!(
            measure_host(nobody, &model).unwrap(),
            4096,
            "no process: the file"
        );
        assert!(measure_host(group, &dir.path().join("absent")).is_err());
        assert!(
            process_group_pids(group)
                .unwrap()
                .contains(&std::process::id())
        );
        assert!(process_group_pids(nobody).unwrap().is_empty());
    }
}
