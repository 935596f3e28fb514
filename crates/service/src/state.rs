//! What every handler shares: the settings, the jobs, the cache, the store, the metrics and the
//! device workers, and how the devices are opened and closed.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cache::{self, ResultCache, SharedResults};
use crate::config::Config;
use crate::document::JobDocument;
use crate::gpu_readings::GpuReadings;
use crate::jobs::{JobStore, Recorder};
use crate::metrics::Metrics;
use crate::probe_worker::client::{Watchdog, WorkerCommand};
use crate::recovery;
use crate::store::journal::Direction;
use crate::store::journal::{Journal, StoreHealth};
use crate::store::{Retention, Store, StoredJob};
use crate::turns::Turns;
use crate::workers::{DeviceWorker, Supervision, WorkerContext};
use headroom_devices::nvml;
use headroom_devices::select::DeviceSpec;

/// The devices of this state were opened before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the devices were already opened")]
pub struct AlreadyOpen;

/// Everything the handlers share.
pub struct AppState {
    /// The settings in force.
    pub config: Config,
    /// This service's node name in the store.
    pub node: Arc<str>,
    /// Jobs in memory: every unfinished one and the recently finished, recent first.
    pub jobs: JobStore,
    /// Finished results, in memory and in the store.
    pub cache: Arc<ResultCache>,
    /// Where jobs and results are kept.
    pub store: Arc<dyn Store>,
    /// The store's writer.
    pub journal: Journal,
    /// Whether the store works.
    pub store_health: Arc<StoreHealth>,
    /// NVML's telemetry for `/metrics` and `/devices`.
    pub gpu_readings: Arc<GpuReadings>,
    /// The claims that keep a job to one tune across the nodes sharing the store.
    pub turns: Arc<Turns>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    workers: OnceLock<Vec<Arc<DeviceWorker>>>,
}

impl AppState {
    /// State over `store`, with no devices open yet; starts the store's writer on the current
    /// tokio runtime.
    pub fn new(config: Config, store: Arc<dyn Store>) -> Arc<AppState> {
        let metrics = Arc::new(Metrics::new());
        let store_health = Arc::new(StoreHealth::new(Arc::clone(&metrics)));
        let ttl = Duration::from_secs(config.cache_ttl_seconds);
        let retention = Retention {
            max_age: Duration::from_secs(config.retention_days.saturating_mul(86_400)),
            max_jobs: config.retention_jobs,
            result_ttl: ttl,
        };
        let journal = Journal::start(Arc::clone(&store), Arc::clone(&store_health), retention);
        let shared = SharedResults {
            store: Arc::clone(&store),
            journal: journal.clone(),
            health: Arc::clone(&store_health),
        };
        Arc::new(AppState {
            node: config.node().into(),
            jobs: JobStore::new(config.job_history),
            cache: Arc::new(ResultCache::new(ttl, config.cache_capacity, Some(shared))),
            store: Arc::clone(&store),
            journal: journal.clone(),
            store_health: Arc::clone(&store_health),
            metrics,
            workers: OnceLock::new(),
            gpu_readings: Arc::default(),
            turns: Arc::new(Turns::new(
                Arc::clone(&store),
                journal.clone(),
                Arc::clone(&store_health),
                tokio::runtime::Handle::current(),
            )),
            config,
        })
    }

    /// The jobs of this node, newest first: those in memory, then the store's, `job_history` in
    /// all at most (unfinished ones always shown). The store's are left out while reading it fails.
    pub async fn recent_documents(&self) -> Vec<JobDocument> {
        let mut documents: Vec<JobDocument> = self
            .jobs
            .recent()
            .iter()
            .map(|j| self.jobs.document(j))
            .collect();
        let limit = self.config.job_history;
        if documents.len() < limit && !self.store_health.failing(Direction::Read) {
            let stored = self.store.recent_jobs(&self.node, limit).await;
            self.store_health
                .record(Direction::Read, "read_jobs", &stored);
            for document in stored.unwrap_or_default() {
                if documents.len() >= limit {
                    break;
                }
                if !documents.iter().any(|d| d.id == document.id) {
                    documents.push(document);
                }
            }
        }
        documents.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        documents
    }

    /// The device workers, once the devices are open.
    pub fn workers(&self) -> Option<&[Arc<DeviceWorker>]> {
        self.workers.get().map(Vec::as_slice)
    }

    /// What a job's changes are recorded with.
    pub fn recorder(&self) -> Recorder {
        Recorder {
            journal: self.journal.clone(),
            node: Arc::clone(&self.node),
        }
    }

    /// The result-cache key of a job ([`cache::normalised`]) on `worker`'s device: shared by
    /// every node with an identical device, or this node's alone when results are not shared.
    pub fn cache_key(&self, normalised: &str, worker: &DeviceWorker) -> String {
        if self.config.share_results {
            cache::key(normalised, &worker.identity)
        } else {
            cache::key(normalised, &format!("{}|{}", worker.identity, self.node))
        }
    }

    /// Starts a probe worker process for each configured device (compiling kernels for GPUs)
    /// and the device's worker thread, one per physical device. A device whose worker does not
    /// start is logged and left out; the others are served. GPUs are counted by a worker too:
    /// the service never loads the CUDA driver itself.
    pub fn open_devices(&self) -> Result<(), AlreadyOpen> {
        let command = match WorkerCommand::new(
            &self.config.worker_program,
            self.config.host_memory.0,
        ) {
            Ok(command) => command,
            Err(e) => {
                tracing::error!(error = %e, "the service cannot find its own binary to start probe workers; serving no device");
                return self.workers.set(Vec::new()).map_err(|_| AlreadyOpen);
            }
        };
        let wants_cuda = self.config.devices.contains(&DeviceSpec::Auto);
        let cuda_devices = if wants_cuda { command.count_cuda() } else { 0 };
        let specs = device_specs(&self.config.devices, cuda_devices);
        let (driver_version, gpus) =
            nvml::telemetry().unwrap_or_else(|_| ("none".into(), Vec::new()));
        let seconds = Duration::from_secs;
        let supervision = Supervision {
            command,
            watchdog: Watchdog {
                floor: seconds(self.config.probe_timeout_floor_seconds),
                ceiling: seconds(self.config.probe_timeout_seconds),
            },
            start_timeout: seconds(self.config.worker_start_seconds),
            cooldown: seconds(self.config.worker_cooldown_seconds),
        };
        let mut workers = Vec::new();
        for spec in specs {
            let context = WorkerContext {
                cache: Arc::clone(&self.cache),
                turns: Arc::clone(&self.turns),
                metrics: Arc::clone(&self.metrics),
                node: Arc::clone(&self.node),
            };
            let started = DeviceWorker::start(
                spec,
                &driver_version,
                supervision.clone(),
                self.config.queue_length,
                context,
                |info| nvml::find(&gpus, info).map(|g| g.index),
            );
            match started {
                Ok(worker) => {
                    tracing::info!(device = %spec, "device open in its probe worker");
                    workers.push(worker);
                }
                Err(e) => {
                    tracing::error!(device = %spec, error = %e, "device could not be opened; not serving it");
                }
            }
        }
        self.workers.set(workers).map_err(|_| AlreadyOpen)
    }

    /// Queues again the jobs that were queued when this node last stopped, oldest first, each
    /// waiting for room in its device's queue. A job whose device is no longer served, or that
    /// no longer validates, fails saying so.
    pub fn requeue(&self, queued: Vec<StoredJob>) {
        for stored in queued {
            let id = stored.document.id.clone();
            match recovery::requeue(self, stored) {
                Ok(()) => tracing::info!(job = %id, "queued again after the restart"),
                Err(reason) => tracing::warn!(job = %id, %reason, "not run after the restart"),
            }
        }
    }

    /// Stops the workers taking jobs and the running ones after their probe; queued jobs stay
    /// queued in the store, for the next start.
    pub fn begin_shutdown(&self) {
        for worker in self.workers().unwrap_or_default() {
            worker.close();
        }
        for job in self.jobs.recent() {
            job.stop_for_shutdown();
        }
    }

    /// Waits (up to `grace` in all) for the workers to finish their probe and free their devices.
    pub fn finish_shutdown(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        self.workers()
            .unwrap_or_default()
            .iter()
            .all(|w| w.join(deadline.saturating_duration_since(Instant::now())))
    }
}

/// The devices to serve, each physical device once: `auto` is every one of the `cuda_devices`
/// and the host; `cuda` is `cuda:0`. A device listed twice (`["auto", "cuda:0"]`) is served once,
/// with a warning: two workers on one GPU would disturb each other's probes, and one's fault
/// recovery would reset the other's context.
fn device_specs(configured: &[DeviceSpec], cuda_devices: u32) -> Vec<DeviceSpec> {
    let mut specs = Vec::new();
    for &spec in configured {
        let expanded = match spec {
            DeviceSpec::Auto => (0..cuda_devices)
                .map(DeviceSpec::Cuda)
                .chain([DeviceSpec::Host])
                .collect(),
            named => vec![named],
        };
        for device in expanded {
            if specs.contains(&device) {
                tracing::warn!(device = %device, "{device} is configured more than once (\"auto\" includes every GPU and the host); serving it once");
            } else {
                specs.push(device);
            }
        }
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_is_served_once() {
        use DeviceSpec::{Auto, Cuda, Host};
        assert_eq!(device_specs(&[Auto], 2), [Cuda(0), Cuda(1), Host]);
        assert_eq!(device_specs(&[Auto, Cuda(0)], 2), [Cuda(0), Cuda(1), Host]);
        assert_eq!(device_specs(&[Cuda(0), Host, Cuda(0)], 1), [Cuda(0), Host]);
        assert_eq!(device_specs(&[Host, Auto], 0), [Host]);
    }
}
