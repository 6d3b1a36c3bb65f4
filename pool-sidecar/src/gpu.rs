//! The host's NVIDIA GPUs, from NVML. libnvidia-ml is loaded at run time on first use, so the
//! same binary runs on hosts without a driver: there the inventory is empty, said once in the
//! log, and never an error. NVML calls block, so callers run [`GpuProbe::inventory`] off the
//! async runtime (`spawn_blocking`).

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

#[cfg(test)]
mod tests {
    use super::*;

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
