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
    /// Processes holding a compute context on the GPU, this one included.
    pub compute_processes: usize,
    /// Whether this process is among them by its PID. In a container without the host's PID
    /// namespace NVML's PIDs are the host's, and this process is not recognised by its own.
    pub lists_this_process: bool,
}

impl GpuTelemetry {
    /// Processes other than this one computing on the GPU; `this_process_computes` says whether
    /// this process holds a context there (then one of the processes is this one, by PID or not).
    pub fn other_compute_processes(&self, this_process_computes: bool) -> usize {
        let this_one = self.lists_this_process || this_process_computes;
        self.compute_processes - usize::from(this_one && self.compute_processes > 0)
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
            compute_processes: processes.len(),
            lists_this_process: processes.iter().any(|p| p.pid == std::process::id()),
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

    fn gpu(compute_processes: usize, lists_this_process: bool) -> GpuTelemetry {
        GpuTelemetry {
            index: 0,
            name: "GPU".into(),
            uuid: "GPU-0".into(),
            total_bytes: 1,
            used_bytes: 0,
            free_bytes: 1,
            utilization_percent: None,
            temperature_celsius: None,
            compute_processes,
            lists_this_process,
        }
    }

    #[test]
    fn this_process_is_not_another_even_when_its_pid_is_not_recognised() {
        assert_eq!(gpu(1, true).other_compute_processes(true), 0);
        // In a container: NVML lists the host PID of this process.
        assert_eq!(gpu(1, false).other_compute_processes(true), 0);
        assert_eq!(gpu(2, false).other_compute_processes(true), 1);
        // Not computing here: every process is another.
        assert_eq!(gpu(2, false).other_compute_processes(false), 2);
        assert_eq!(gpu(0, false).other_compute_processes(true), 0);
    }
}
