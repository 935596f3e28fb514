//! GPU telemetry through NVML: driver version, name, UUID, memory, utilisation, processes.
//!
//! NVML is loaded at run time; when it is missing every call returns an error, never a panic.

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use serde::Serialize;

use crate::device::DeviceInfo;

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
    /// Other processes (not this one) holding a compute context on the GPU.
    pub other_compute_processes: usize,
}

/// The driver version and every GPU, or why NVML could not answer.
pub fn telemetry() -> Result<(String, Vec<GpuTelemetry>), String> {
    let nvml = Nvml::init().map_err(|e| format!("NVML is not available: {e}"))?;
    let driver = nvml.sys_driver_version().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let memory = device.memory_info().map_err(|e| e.to_string())?;
        gpus.push(GpuTelemetry {
            index,
            name: device.name().map_err(|e| e.to_string())?,
            uuid: device.uuid().map_err(|e| e.to_string())?,
            total_bytes: memory.total,
            used_bytes: memory.used,
            free_bytes: memory.free,
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
            other_compute_processes: device.running_compute_processes().map_or(0, |p| {
                p.iter().filter(|p| p.pid != std::process::id()).count()
            }),
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
