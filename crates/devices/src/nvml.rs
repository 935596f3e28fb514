//! GPU telemetry through NVML: driver version, name, UUID, memory, utilisation, processes.
//!
//! NVML is loaded at run time; when it is missing every call returns an error, never a panic.

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use serde::Serialize;

use headroom_engine::device::DeviceInfo;

/// What NVML reports about one GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuTelemetry {
    /// NVML index.
    pub index: u32,
    /// Model name.
    pub name: String,
    /// `GPU-...` UUID, as DCGM labels it.
    pub uuid: String,
    /// Memory in all, bytes.
    pub total_bytes: u64,
    /// Memory in use by anyone, bytes.
    pub used_bytes: u64,
    /// Memory free, bytes.
    pub free_bytes: u64,
    /// GPU utilisation over the last sample period, percent.
    pub utilization_percent: Option<u32>,
    /// Core temperature, degrees Celsius.
    pub temperature_celsius: Option<u32>,
    /// PIDs of the processes holding a compute context on the GPU, as NVML reports them. In a
    /// container without the host's PID namespace they are the host's PIDs.
    pub process_ids: Vec<u32>,
}

impl GpuTelemetry {
    /// Processes other than `ours` (headroom's, by PID) computing on the GPU. `ours_compute`
    /// says whether one of ours holds a context there: when NVML lists none of our PIDs (they
    /// are the host's, in a container), one of the processes is taken for ours.
    pub fn other_compute_processes(&self, ours: &[u32], ours_compute: bool) -> usize {
        let listed = self.process_ids.len();
        let recognised = self.process_ids.iter().filter(|p| ours.contains(p)).count();
        if recognised == 0 && ours_compute {
            listed.saturating_sub(1)
        } else {
            listed - recognised
        }
    }
}

/// Why NVML could not answer.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The library is missing or would not start (no NVIDIA driver).
    #[error("NVML is not available: {0}")]
    Unavailable(#[source] NvmlError),
    /// A query failed.
    #[error("NVML could not read {what}: {source}")]
    Query {
        /// What was asked.
        what: &'static str,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },
}

fn query(what: &'static str) -> impl Fn(NvmlError) -> TelemetryError {
    move |source| TelemetryError::Query { what, source }
}

/// The driver version and every GPU, or why NVML could not answer.
pub fn telemetry() -> Result<(String, Vec<GpuTelemetry>), TelemetryError> {
    let nvml = Nvml::init().map_err(TelemetryError::Unavailable)?;
    let driver = nvml
        .sys_driver_version()
        .map_err(query("the driver version"))?;
    let count = nvml.device_count().map_err(query("the GPU count"))?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(query("a GPU"))?;
        let memory = device.memory_info().map_err(query("a GPU's memory"))?;
        let processes = device.running_compute_processes().unwrap_or_default();
        gpus.push(GpuTelemetry {
            index,
            name: device.name().map_err(query("a GPU's name"))?,
            uuid: device.uuid().map_err(query("a GPU's UUID"))?,
            total_bytes: memory.total,
            used_bytes: memory.used,
            free_bytes: memory.free,
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
            process_ids: processes.iter().map(|p| p.pid).collect(),
        });
    }
    Ok((driver, gpus))
}

/// What NVML says of the GPU `device` is, matched by UUID (CUDA and NVML number GPUs apart
/// when `CUDA_VISIBLE_DEVICES` is set); `None` for the host or a GPU NVML does not list.
pub fn find<'a>(gpus: &'a [GpuTelemetry], device: &DeviceInfo) -> Option<&'a GpuTelemetry> {
    let uuid = device.uuid.as_deref()?;
    gpus.iter().find(|gpu| gpu.uuid == uuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(process_ids: &[u32]) -> GpuTelemetry {
        GpuTelemetry {
            index: 0,
            name: "GPU".into(),
            uuid: "GPU-0".into(),
            total_bytes: 1,
            used_bytes: 0,
            free_bytes: 1,
            utilization_percent: None,
            temperature_celsius: None,
            process_ids: process_ids.to_vec(),
        }
    }

    #[test]
    fn our_processes_are_not_others_even_when_their_pids_are_not_recognised() {
        let ours = [100, 101];
        assert_eq!(gpu(&[101]).other_compute_processes(&ours, true), 0);
        assert_eq!(gpu(&[101, 4242]).other_compute_processes(&ours, true), 1);
        // In a container: NVML lists the host PID of our worker.
        assert_eq!(gpu(&[90001]).other_compute_processes(&ours, true), 0);
        assert_eq!(gpu(&[90001, 90002]).other_compute_processes(&ours, true), 1);
        // Not computing there: every process is another.
        assert_eq!(
            gpu(&[90001, 90002]).other_compute_processes(&ours, false),
            2
        );
        assert_eq!(gpu(&[]).other_compute_processes(&ours, true), 0);
    }
}
