//! NVML's view of the GPUs for `/metrics` and `/devices`, read at most once a second however
//! often they are asked: each reading initialises NVML and walks every GPU, and Prometheus,
//! dashboards and schedulers may all poll at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headroom_devices::nvml::{self, GpuTelemetry};

/// How long a reading is reused.
const READING_TTL: Duration = Duration::from_secs(1);

/// The last reading and when it was taken.
#[derive(Default)]
pub struct GpuReadings {
    last: Mutex<Option<(Instant, Arc<Vec<GpuTelemetry>>)>>,
}

impl GpuReadings {
    /// The last reading, if it is fresh.
    fn fresh(last: &Option<(Instant, Arc<Vec<GpuTelemetry>>)>) -> Option<Arc<Vec<GpuTelemetry>>> {
        let (at, gpus) = last.as_ref()?;
        (at.elapsed() < READING_TTL).then(|| Arc::clone(gpus))
    }

    /// The GPUs as NVML saw them within the last second (none where NVML is unavailable).
    /// Blocks while NVML is read (one reader at a time); call it off the async threads.
    pub fn read(&self) -> Arc<Vec<GpuTelemetry>> {
        let mut last = crate::lock(&self.last);
        if let Some(gpus) = Self::fresh(&last) {
            return gpus;
        }
        Self::read_into(&mut last)
    }

    /// A new reading, kept as the last: for a decision that a second-old reading could get
    /// wrong (a probe worker that has just been replaced would read as another process).
    /// Blocks while NVML is read; call it off the async threads.
    pub fn read_now(&self) -> Arc<Vec<GpuTelemetry>> {
        Self::read_into(&mut crate::lock(&self.last))
    }

    fn read_into(last: &mut Option<(Instant, Arc<Vec<GpuTelemetry>>)>) -> Arc<Vec<GpuTelemetry>> {
        let gpus = Arc::new(nvml::telemetry().map(|(_, gpus)| gpus).unwrap_or_default());
        *last = Some((Instant::now(), Arc::clone(&gpus)));
        gpus
    }

    /// [`GpuReadings::read_now`] on tokio's blocking threads.
    pub async fn read_now_async(self: &Arc<Self>) -> Arc<Vec<GpuTelemetry>> {
        let readings = Arc::clone(self);
        tokio::task::spawn_blocking(move || readings.read_now())
            .await
            .unwrap_or_default()
    }

    /// [`GpuReadings::read`] for async code: a fresh reading at once, a new one read on
    /// tokio's blocking threads.
    pub async fn read_async(self: &Arc<Self>) -> Arc<Vec<GpuTelemetry>> {
        if let Some(gpus) = Self::fresh(&crate::lock(&self.last)) {
            return gpus;
        }
        let readings = Arc::clone(self);
        tokio::task::spawn_blocking(move || readings.read())
            .await
            .unwrap_or_default()
    }
}
