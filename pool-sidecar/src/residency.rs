//! What the eviction planner needs to know about the configured pools, worked out from the
//! configuration, the host and the state directory: which device each pool's memory is on, its
//! footprint (measured after an earlier load of the same model, else estimated from the model's
//! GGUF header and the context its command gives the engine), and each device's budget.

use crate::config::{MemoryConfig, PoolConfig};
use crate::eviction::{Budget, Device};
use crate::footprint::FootprintStore;
use crate::gguf::{Footprint, read_summary};
use crate::gpu::GpuProbe;
use std::path::Path;

/// Where a pool's memory is: its first GPU (`gpus`), or the host.
pub fn device_of(pool: &PoolConfig) -> Device {
    pool.managed()
        .and_then(|engine| engine.gpus.as_deref())
        .and_then(|gpus| gpus.split(',').next())
        .and_then(|first| first.trim().parse().ok())
        .map_or(Device::Host, Device::Gpu)
}

/// The context the engine's command gives it (llama-server's `-c` / `--ctx-size`); `None`
/// when it gives none (the model's training context then).
pub fn context_of(command: &[String]) -> Option<u64> {
    command.iter().enumerate().find_map(|(index, argument)| {
        let value = match argument.as_str() {
            "-c" | "--ctx-size" => command.get(index + 1).map(String::as_str),
            other => other
                .strip_prefix("--ctx-size=")
                .or_else(|| other.strip_prefix("-c=")),
        }?;
        value.parse().ok()
    })
}

/// The footprint the planner uses for `pool`: measured for its model, else estimated from the
/// model file; `None` for an external engine or a model file that is not GGUF.
pub fn footprint_of(pool: &PoolConfig, store: &FootprintStore) -> Option<u64> {
    let engine = pool.managed()?;
    if let Some(measured) = store.get(pool.id.as_str(), &engine.model_path) {
        return Some(measured);
    }
    match read_summary(Path::new(&engine.model_path)) {
        Ok(summary) => Some(Footprint::estimate(&summary, context_of(&engine.command)).total()),
        Err(error) => {
            tracing::debug!(pool = %pool.id, %error, "no footprint estimate");
            None
        }
    }
}

/// Each device's budget: the host's from the config or three quarters of MemTotal, each GPU's
/// from the config or NVML's total minus the reserve. A GPU NVML cannot see has none.
pub fn budgets(memory: &MemoryConfig, gpus: &GpuProbe) -> Vec<Budget> {
    let host = memory.host_budget_bytes.or_else(|| {
        procfs::Current::current()
            .ok()
            .map(|info: procfs::Meminfo| info.mem_total / 4 * 3)
    });
    let mut budgets: Vec<Budget> = host
        .map(|bytes| Budget {
            device: Device::Host,
            bytes,
        })
        .into_iter()
        .collect();
    for gpu in gpus.inventory().gpus {
        let bytes = memory.gpu_budget_bytes.unwrap_or_else(|| {
            gpu.memory_total_bytes
                .saturating_sub(memory.gpu_reserve_bytes)
        });
        budgets.push(Budget {
            device: Device::Gpu(gpu.index),
            bytes,
        });
    }
    budgets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_context_comes_from_the_command_in_any_of_its_spellings() {
        assert_eq!(
            context_of(&argv("llama-server -m m.gguf -c 4096")),
            Some(4096)
        );
        assert_eq!(
            context_of(&argv("llama-server --ctx-size 8192")),
            Some(8192)
        );
        assert_eq!(context_of(&argv("llama-server --ctx-size=512")), Some(512));
        assert_eq!(context_of(&argv("llama-server -m m.gguf")), None);
        assert_eq!(context_of(&argv("llama-server -c")), None);
    }

    #[test]
    fn the_host_budget_is_configured_or_three_quarters_of_its_memory() {
        let configured = MemoryConfig {
            host_budget_bytes: Some(1234),
            gpu_budget_bytes: None,
            gpu_reserve_bytes: 0,
            min_residency: std::time::Duration::ZERO,
        };
        let budgets = budgets(&configured, &GpuProbe::default());
        assert_eq!(
            budgets.iter().find(|budget| budget.device == Device::Host),
            Some(&Budget {
                device: Device::Host,
                bytes: 1234
            })
        );
        let default = MemoryConfig {
            host_budget_bytes: None,
            ..configured
        };
        let host = budgets_of_host(&default);
        assert!(host > 0, "MemTotal is known on Linux");
    }

    fn budgets_of_host(memory: &MemoryConfig) -> u64 {
        budgets(memory, &GpuProbe::default())
            .into_iter()
            .find(|budget| budget.device == Device::Host)
            .map_or(0, |budget| budget.bytes)
    }
}
