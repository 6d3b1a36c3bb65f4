//! The host's NVIDIA GPUs, from NVML: the inventory, a device's used memory, and what an
//! engine's processes hold on a GPU (its footprint, see [`gpu_footprint`]). libnvidia-ml is
//! loaded at run time on first use, so the same binary runs on hosts without a driver: there the
//! inventory is empty, said once in the log, and never an error. NVML calls block, so callers
//! run them off the async runtime (`spawn_blocking`).

use nvml_wrapper::Nvml;
use pool_ipc::registry::{GpuInfo, GpuInventory};
use std::sync::OnceLock;

#[derive(Default)]
pub struct GpuProbe {
    nvml: OnceLock<Option<Nvml>>,
}

impl GpuProbe {
    fn nvml(&self) -> Option<&Nvml> {
        self.nvml
            .get_or_init(|| match Nvml::init() {
                Ok(nvml) => Some(nvml),
                Err(error) => {
                    tracing::info!(%error, "no NVIDIA driver found: the GPU inventory is empty");
                    None
                }
            })
            .as_ref()
    }

    pub fn inventory(&self) -> GpuInventory {
        let Some(nvml) = self.nvml() else {
            return GpuInventory::default();
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => {
                tracing::warn!(%error, "NVML cannot count GPUs");
                0
            }
        };
        let gpus = (0..count)
            .filter_map(|index| {
                let device = match nvml.device_by_index(index) {
                    Ok(device) => device,
                    Err(error) => {
                        tracing::warn!(index, %error, "NVML cannot open GPU");
                        return None;
                    }
                };
                let memory = device.memory_info().ok();
                Some(GpuInfo {
                    index,
                    name: device.name().unwrap_or_else(|_| "?".into()),
                    uuid: device.uuid().unwrap_or_default(),
                    memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                    memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
                })
            })
            .collect();
        GpuInventory {
            driver: nvml.sys_driver_version().ok(),
            gpus,
        }
    }
}

/// What NVML says a set of processes holds on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessMemory {
    /// The processes' own figures, summed.
    PerProcess(u64),
    /// The driver gives no per-process figures (inside a PID namespace its pids are not ours):
    /// the device's used memory, for a before/after delta.
    DeviceUsed(u64),
}

/// An engine's footprint on a GPU from what NVML said once it was ready: its processes' own
/// figures where the driver gives them, else the growth of the device's used memory since
/// `baseline` (read just before the load; `None` when none could be read, or another load on
/// the device made it meaningless). `None`: nothing trustworthy to keep (the estimate stays).
pub fn gpu_footprint(reading: ProcessMemory, baseline: Option<u64>) -> Option<u64> {
    match reading {
        ProcessMemory::PerProcess(bytes) => (bytes > 0).then_some(bytes),
        ProcessMemory::DeviceUsed(after) => baseline
            .and_then(|before| after.checked_sub(before))
            .filter(|grown| *grown > 0),
    }
}

impl GpuProbe {
    /// GPU `index`'s used memory (blocking); `None` without a driver or such a GPU.
    pub fn device_used(&self, index: u32) -> Option<u64> {
        let device = self.nvml()?.device_by_index(index).ok()?;
        device.memory_info().ok().map(|memory| memory.used)
    }

    /// The memory `pids` hold on GPU `index` (blocking: run off the async runtime); `None`
    /// without a driver or such a GPU.
    pub fn process_memory(&self, index: u32, pids: &[u32]) -> Option<ProcessMemory> {
        let device = self.nvml()?.device_by_index(index).ok()?;
        let own: Vec<u64> = device
            .running_compute_processes()
            .unwrap_or_default()
            .into_iter()
            .filter(|process| pids.contains(&process.pid))
            .filter_map(|process| match process.used_gpu_memory {
                nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => Some(bytes),
                nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => None,
            })
            .collect();
        if own.is_empty() {
            return device
                .memory_info()
                .ok()
                .map(|memory| ProcessMemory::DeviceUsed(memory.used));
        }
        Some(ProcessMemory::PerProcess(own.into_iter().sum()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_a_driver_has_no_gpu_memory_to_report() {
        let probe = GpuProbe::default();
        if probe.inventory().driver.is_none() {
            assert_eq!(probe.process_memory(0, &[std::process::id()]), None);
            assert_eq!(probe.device_used(0), None);
        }
    }

    #[test]
    fn a_footprint_is_the_processes_own_figure_else_the_devices_growth_since_the_load() {
        assert_eq!(
            gpu_footprint(ProcessMemory::PerProcess(700), Some(5_000)),
            Some(700),
            "per-process figures need no baseline"
        );
        assert_eq!(
            gpu_footprint(ProcessMemory::DeviceUsed(5_700), Some(5_000)),
            Some(700)
        );
        assert_eq!(
            gpu_footprint(ProcessMemory::DeviceUsed(5_700), None),
            None,
            "no baseline: the device's total says nothing about this engine"
        );
        assert_eq!(
            gpu_footprint(ProcessMemory::DeviceUsed(4_000), Some(5_000)),
            None,
            "memory freed elsewhere meanwhile: no figure"
        );
        assert_eq!(gpu_footprint(ProcessMemory::PerProcess(0), None), None);
    }

    #[test]
    fn a_host_without_a_driver_reports_no_gpus_without_an_error() {
        let inventory = GpuProbe::default().inventory();
        if inventory.driver.is_none() {
            assert!(inventory.gpus.is_empty());
        } else {
            assert!(inventory.gpus.iter().all(|gpu| gpu.memory_total_bytes > 0));
        }
    }
}
