//! How a pool looks to operators: the JSON served by the debug shim and printed by
//! `pool-managerd status --json`, and the table printed by `pool-managerd status` (with each
//! managed pool's footprint and each device's memory budget). One view for both, so the two
//! never disagree.

use crate::supervisor::process::LOG_TAIL_MARKER;
use pool_ipc::registry::{GpuInventory, MemoryReport, PoolSnapshot, PoolState, RegistrySnapshot};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolStatusView {
    pub pool_id: String,
    pub model: String,
    pub engine: &'static str,
    /// Where the engine listens; left out of views for every local user
    /// ([`without_engine_details`](Self::without_engine_details)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub state: &'static str,
    pub live: bool,
    pub ready: bool,
    pub draining: bool,
    pub slots_total: u32,
    pub slots_free: u32,
    /// Slots held by leases (a lease of several slots counts each): `slots_total - slots_free`.
    pub active_leases: u32,
    pub engine_version: Option<String>,
    pub last_error: Option<String>,
    pub restarts: u32,
    /// When a backing-off pool tries again (Unix epoch, milliseconds).
    pub next_attempt_unix_ms: Option<u64>,
    pub last_probe_unix_ms: Option<u64>,
    /// The APIs the engine serves, by their config names.
    pub api_endpoints: Vec<&'static str>,
    /// A managed pool's memory footprint on its device (see [`with_memory`](Self::with_memory)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub footprint: Option<FootprintView>,
}

/// A managed pool's footprint: measured after a load, else estimated from its model's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FootprintView {
    pub device: String,
    /// `None`: unknown.
    pub bytes: Option<u64>,
    pub measured: bool,
}

impl From<&PoolSnapshot> for PoolStatusView {
    fn from(pool: &PoolSnapshot) -> PoolStatusView {
        PoolStatusView {
            pool_id: pool.pool_id.to_string(),
            model: pool.model.clone(),
            engine: pool.engine.name(),
            endpoint: Some(pool.endpoint.to_string()),
            state: pool.state.name(),
            live: pool.live,
            ready: pool.state == PoolState::Ready,
            draining: pool.state == PoolState::Draining,
            slots_total: pool.slots_total,
            slots_free: pool.slots_free,
            active_leases: pool.active_leases(),
            engine_version: pool.engine_version.clone(),
            last_error: pool.last_error.clone(),
            restarts: pool.restarts,
            next_attempt_unix_ms: match pool.state {
                PoolState::BackingOff { until_unix_ms } => Some(until_unix_ms),
                _ => None,
            },
            last_probe_unix_ms: pool.last_probe_unix_ms,
            api_endpoints: pool.api_endpoints.iter().map(|api| api.name()).collect(),
            footprint: None,
        }
    }
}

impl PoolStatusView {
    /// The view with the pool's footprint from `memory` (external engines have none).
    pub fn with_memory(mut self, memory: &MemoryReport) -> PoolStatusView {
        self.footprint = memory
            .pools
            .iter()
            .find(|pool| pool.pool.as_str() == self.pool_id)
            .map(|pool| FootprintView {
                device: pool.device.clone(),
                bytes: pool.footprint_bytes,
                measured: pool.measured,
            });
        self
    }

    /// The view without the engine's own output (the log lines `last_error` carries) and without
    /// its address (a TCP engine's port lets whoever connects bypass orchestratord's keys and
    /// queue), for readers who may not see the engine's log nor reach the engine: the debug shim
    /// without a token, open to every local user.
    pub fn without_engine_details(mut self) -> PoolStatusView {
        self.endpoint = None;
        if let Some(error) = &mut self.last_error
            && let Some(at) = error.find(LOG_TAIL_MARKER)
        {
            error.truncate(at);
            error.push_str(" (engine output: `pool-managerd status` or the engine's log)");
        }
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RegistryView {
    pub epoch: u64,
    pub pools: Vec<PoolStatusView>,
}

impl RegistryView {
    /// Every pool [`with_memory`](PoolStatusView::with_memory).
    pub fn with_memory(self, memory: &MemoryReport) -> RegistryView {
        RegistryView {
            epoch: self.epoch,
            pools: self
                .pools
                .into_iter()
                .map(|pool| pool.with_memory(memory))
                .collect(),
        }
    }

    /// Every pool [`without_engine_details`](PoolStatusView::without_engine_details).
    pub fn without_engine_details(self) -> RegistryView {
        RegistryView {
            epoch: self.epoch,
            pools: self
                .pools
                .into_iter()
                .map(PoolStatusView::without_engine_details)
                .collect(),
        }
    }
}

impl From<&RegistrySnapshot> for RegistryView {
    fn from(snapshot: &RegistrySnapshot) -> RegistryView {
        RegistryView {
            epoch: snapshot.epoch,
            pools: snapshot.pools.iter().map(PoolStatusView::from).collect(),
        }
    }
}

/// A fixed-width table, one pool per line.
pub fn render_table(pools: &[PoolStatusView]) -> String {
    let header = [
        "POOL",
        "MODEL",
        "ENGINE",
        "STATE",
        "LIVE",
        "FREE/SLOTS",
        "LEASED",
        "RESTARTS",
        "NEXT TRY",
        "VERSION",
        "APIS",
        "FOOTPRINT",
        "LAST ERROR",
    ];
    let now = crate::probe::unix_ms_now();
    let rows: Vec<[String; 13]> = pools
        .iter()
        .map(|pool| {
            [
                pool.pool_id.clone(),
                pool.model.clone(),
                pool.engine.to_owned(),
                pool.state.to_owned(),
                if pool.live { "yes" } else { "no" }.to_owned(),
                format!("{}/{}", pool.slots_free, pool.slots_total),
                pool.active_leases.to_string(),
                pool.restarts.to_string(),
                pool.next_attempt_unix_ms.map_or_else(
                    || "-".into(),
                    |at| format!("in {:.1}s", at.saturating_sub(now) as f64 / 1000.0),
                ),
                pool.engine_version.clone().unwrap_or_else(|| "-".into()),
                pool.api_endpoints.join(","),
                pool.footprint
                    .as_ref()
                    .map_or_else(|| "-".into(), footprint_cell),
                pool.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[&str]| {
        let last = cells.len() - 1;
        for (index, cell) in cells.iter().enumerate() {
            if index == last {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[index]));
            }
        }
        text.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    text
}

/// `1.2 GiB on gpu0`, `est. 310 MiB on host`, `? on host`.
fn footprint_cell(footprint: &FootprintView) -> String {
    let bytes = footprint.bytes.map_or_else(|| "?".to_owned(), human_bytes);
    let estimated = if footprint.measured || footprint.bytes.is_none() {
        ""
    } else {
        "est. "
    };
    format!("{estimated}{bytes} on {}", footprint.device)
}

/// Bytes in the largest binary unit that keeps a whole number in front: `512 B`, `310.0 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The memory section of `pool-managerd status`: each device's budget for pools, what the pools
/// loaded on it hold, and which managed pools have their memory there.
pub fn render_memory(memory: &MemoryReport) -> String {
    if memory.devices.is_empty() {
        return "Memory budgets: none\n".to_owned();
    }
    let mut text = "Memory budgets:\n".to_owned();
    for device in &memory.devices {
        let pools: Vec<&str> = memory
            .pools
            .iter()
            .filter(|pool| pool.device == device.device)
            .map(|pool| pool.pool.as_str())
            .collect();
        text.push_str(&format!(
            "  {:<6} {} of {} held  pools: {}\n",
            device.device,
            human_bytes(device.held_bytes),
            human_bytes(device.budget_bytes),
            if pools.is_empty() {
                "-".to_owned()
            } else {
                pools.join(", ")
            }
        ));
    }
    text
}

/// The GPU section of `pool-managerd status`.
pub fn render_gpus(inventory: &GpuInventory) -> String {
    let Some(driver) = &inventory.driver else {
        return "GPUs: none (no NVIDIA driver)\n".to_owned();
    };
    let mut text = format!("GPUs (driver {driver}):\n");
    for gpu in &inventory.gpus {
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        text.push_str(&format!(
            "  {}  {}  {:.1}/{:.1} GiB used  {}\n",
            gpu.index,
            gpu.name,
            gpu.memory_used_bytes as f64 / GIB,
            gpu.memory_total_bytes as f64 / GIB,
            gpu.uuid
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_ipc::registry::{
        ApiEndpoint, DeviceMemory, Endpoint, EngineKind, PoolFootprint, PoolId,
    };

    #[test]
    fn the_table_lines_up_and_shows_leased_slots_and_apis() {
        let pool = PoolSnapshot {
            pool_id: PoolId("tiny".into()),
            model: "tiny-llama".into(),
            engine: EngineKind::Llamacpp,
            endpoint: Endpoint::Unix {
                path: "/run/e.sock".into(),
            },
            state: PoolState::Ready,
            live: true,
            slots_total: 4,
            slots_free: 3,
            engine_version: Some("b1".into()),
            last_error: None,
            restarts: 0,
            last_probe_unix_ms: Some(5),
            api_endpoints: vec![ApiEndpoint::Embeddings, ApiEndpoint::Models],
        };
        let view = PoolStatusView::from(&pool);
        assert_eq!(view.active_leases, 1);
        assert!(view.ready && !view.draining);
        assert_eq!(view.api_endpoints, ["embeddings", "models"]);
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(
            json["api_endpoints"],
            serde_json::json!(["embeddings", "models"])
        );
        let table = render_table(std::slice::from_ref(&view));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("STATE"), lines[1].find("ready"));
        assert_eq!(lines[0].find("APIS"), lines[1].find("embeddings,models"));
        assert!(lines[1].contains("3/4"));

        let memory = MemoryReport {
            devices: vec![DeviceMemory {
                device: "host".into(),
                budget_bytes: 8 << 30,
                held_bytes: 300 << 20,
            }],
            pools: vec![PoolFootprint {
                pool: PoolId("tiny".into()),
                device: "host".into(),
                footprint_bytes: Some(300 << 20),
                measured: false,
            }],
        };
        let view = view.with_memory(&memory);
        let table = render_table(&[view]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0].find("FOOTPRINT"),
            lines[1].find("est. 300.0 MiB on host")
        );
        assert_eq!(
            render_memory(&memory),
            "Memory budgets:\n  host   300.0 MiB of 8.0 GiB held  pools: tiny\n"
        );
    }
}
