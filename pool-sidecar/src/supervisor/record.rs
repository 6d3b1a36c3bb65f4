//! Engine records in the state directory, so a restarted pool-managerd can adopt engines that
//! outlived it. A record names the process (pid, its start time in clock ticks since boot and the
//! boot it belongs to, so neither a recycled pid nor the same pid after a reboot ever matches),
//! where it listens, and the exact configuration it was started with (a canonical JSON
//! fingerprint: a changed config means the engine is stopped, not adopted). Records are written
//! durably: temp file synced, renamed, directory synced.

use pool_ipc::registry::Endpoint;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineRecord {
    pub pid: u32,
    pub start_ticks: u64,
    pub endpoint: Endpoint,
    pub fingerprint: String,
    /// Which model file it serves (changes with a reload).
    pub model_path: String,
    pub restarts: u32,
    /// The kernel's boot id when it was written (`None` in records of older versions).
    #[serde(default)]
    pub boot_id: Option<String>,
}

impl EngineRecord {
    /// Whether the recorded process is still the one it was written for: the same boot, the same
    /// pid started at the same tick.
    pub fn is_running(&self) -> bool {
        let same_boot = self
            .boot_id
            .as_deref()
            .is_none_or(|recorded| current_boot_id().as_deref() == Some(recorded));
        same_boot && process_start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn current_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

pub fn record_path(state_dir: &Path, pool: &str) -> PathBuf {
    state_dir.join("engines").join(format!("{pool}.json"))
}

/// The record of an engine that runs beside the pool's main one during a reload (the new one
/// while it starts, the old one while it retires), so that a sidecar crash in between leaves
/// nothing behind that nobody knows about.
pub fn side_record_path(state_dir: &Path, pool: &str, generation: u64) -> PathBuf {
    state_dir
        .join("engines")
        .join(format!("{pool}.{generation}.side.json"))
}

/// Every side record of `pool`.
pub fn side_records(state_dir: &Path, pool: &str) -> Vec<PathBuf> {
    let prefix = format!("{pool}.");
    let Ok(entries) = std::fs::read_dir(state_dir.join("engines")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix) && name.ends_with(".side.json"))
        })
        .collect()
}

/// Writes the record atomically and durably (see [`crate::durable`]): a crash or power loss
/// leaves the old record or the new one, whole.
pub fn write_record(path: &Path, record: &EngineRecord) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(record).map_err(std::io::Error::other)?;
    crate::durable::write_file(path, text.as_bytes(), 0o640)
}

pub fn read_record(path: &Path) -> Option<EngineRecord> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "ignoring an unreadable engine record");
            None
        }
    }
}

pub fn remove_record(path: &Path) {
    if let Err(error) = std::fs::remove_file(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "cannot remove engine record");
    }
}

/// The start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), if the
/// process exists and is not a zombie.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state); field 22 is at index 19.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_a_missing_one_has_none() {
        assert!(process_start_ticks(std::process::id()).is_some());
        assert_eq!(process_start_ticks(u32::MAX - 1), None);
    }

    #[test]
    fn records_round_trip_through_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path(), "a");
        let record = EngineRecord {
            pid: 42,
            start_ticks: 7,
            endpoint: Endpoint::Unix {
                path: "/run/e.sock".into(),
            },
            fingerprint: "{}".into(),
            model_path: "/m".into(),
            restarts: 2,
            boot_id: current_boot_id(),
        };
        write_record(&path, &record).unwrap();
        assert_eq!(read_record(&path), Some(record));
        remove_record(&path);
        assert_eq!(read_record(&path), None);
    }

    #[test]
    fn a_record_from_another_boot_never_matches_a_live_process() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        let mut record = EngineRecord {
            pid: me,
            start_ticks: ticks,
            endpoint: Endpoint::Unix {
                path: "/run/e.sock".into(),
            },
            fingerprint: "{}".into(),
            model_path: "/m".into(),
            restarts: 0,
            boot_id: current_boot_id(),
        };
        assert!(record.is_running());
        record.boot_id = Some("00000000-0000-0000-0000-000000000000".into());
        assert!(!record.is_running(), "same pid and ticks, another boot");
        record.boot_id = None;
        assert!(
            record.is_running(),
            "a record of an older version: judged by pid and ticks"
        );
    }
}
