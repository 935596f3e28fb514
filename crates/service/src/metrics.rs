//! Every metric the service exports, registered in one place: prefix `headroom_`, base units,
//! bounded labels (route, method, status, outcome, and a device's [`DeviceLabels`]), never a job
//! id; plus the process collector's `process_*` series.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use headroom_devices::select::DeviceSpec;
use headroom_engine::device::DeviceInfo;

/// Names of the labels every per-device series carries: headroom's own device name, the labels
/// NVIDIA's DCGM exporter puts on the same GPU's series (`gpu`, `UUID`, `Hostname`; empty for the
/// host), so the two join without `label_replace`, and the GPU's model. DCGM spells that one
/// `modelName`, which `promtool check metrics` rejects as camelCase: here it is `model_name`,
/// and a join brings DCGM's own.
pub const DEVICE_LABELS: [&str; 5] = ["device", "gpu", "UUID", "model_name", "Hostname"];

/// The values of [`DEVICE_LABELS`] for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLabels([String; 5]);

impl DeviceLabels {
    /// Labels of a device headroom serves as `spec`; `nvml_index` is the GPU's NVML index.
    pub fn new(spec: DeviceSpec, info: &DeviceInfo, nvml_index: Option<u32>) -> DeviceLabels {
        let gpu = info.uuid.is_some();
        DeviceLabels([
            spec.to_string(),
            nvml_index.map_or(String::new(), |i| i.to_string()),
            info.uuid.clone().unwrap_or_default(),
            if gpu {
                info.name.clone()
            } else {
                String::new()
            },
            hostname(),
        ])
    }

    /// Labels of a GPU NVML reports, which headroom may or may not serve.
    pub fn of_gpu(device: Option<DeviceSpec>, index: u32, uuid: &str, name: &str) -> Self {
        DeviceLabels([
            device.map_or(String::new(), |d| d.to_string()),
            index.to_string(),
            uuid.to_string(),
            name.to_string(),
            hostname(),
        ])
    }

    fn values(&self) -> [&str; 5] {
        self.0.each_ref().map(String::as_str)
    }

    fn with<'a>(&'a self, extra: &'a str) -> [&'a str; 6] {
        let [a, b, c, d, e] = self.values();
        [a, b, c, d, e, extra]
    }
}

fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    /// A little over the last exposition's length: the next one's buffer.
    exposition_size: AtomicUsize,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    tunes: IntCounterVec,
    tune_duration: HistogramVec,
    probes: IntCounterVec,
    probe_duration: HistogramVec,
    queue_length: IntGaugeVec,
    busy: IntGaugeVec,
    healthy: IntGaugeVec,
    worker_restarts: IntCounterVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    single_flight_joins: IntCounter,
    store_errors: IntCounterVec,
    memory_total: IntGaugeVec,
    memory_used: IntGaugeVec,
    last_max_batch_size: IntGaugeVec,
    last_recommended_batch_size: IntGaugeVec,
    /// The models whose last answers are exported, per device, oldest first.
    last_models: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
}

/// Models whose last answer a device exports at once: the gauges' cardinality.
pub const LAST_MODELS: usize = 8;

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("headroom")
}

/// Buckets from `start` seconds, each 4 times the last, 13 in all: from 0.1 ms they reach 28 min
/// (a synchronous `/tune` waits `wait_seconds`, 60 by default), from 1 ms 4.7 h (a GPU tune).
fn seconds(name: &str, help: &str, start: f64) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("headroom")
        .buckets(exponential_buckets(start, 4.0, 13).expect("valid buckets"))
}

/// What a job ends as, a probe's outcomes, and the store's operations: every label value a
/// series takes, set up at start so that a node that has not tuned exports zeros, not nothing.
/// How long a scrape reuses the process collector's reading (its `/proc` reads, which walk
/// every open file descriptor), as the Prometheus client libraries do.
const PROCESS_READING_TTL: Duration = Duration::from_secs(1);

/// A collector whose readings are reused for [`PROCESS_READING_TTL`].
struct Recent<C> {
    inner: C,
    last: Mutex<Option<(Instant, Vec<MetricFamily>)>>,
}

impl<C: Collector> Recent<C> {
    fn new(inner: C) -> Recent<C> {
        Recent {
            inner,
            last: Mutex::new(None),
        }
    }
}

impl<C: Collector> Collector for Recent<C> {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut last = crate::lock(&self.last);
        match &*last {
            Some((at, families)) if at.elapsed() < PROCESS_READING_TTL => families.clone(),
            _ => {
                let families = self.inner.collect();
                *last = Some((Instant::now(), families.clone()));
                families
            }
        }
    }
}

const JOB_OUTCOMES: [&str; 3] = ["succeeded", "failed", "cancelled"];
const PROBE_OUTCOMES: [&str; 3] = ["fit", "oom", "error"];
/// The store operations that can fail (`crate::store::journal`).
pub const STORE_OPERATIONS: [&str; 8] = [
    "check",
    "open",
    "prune",
    "read_job",
    "read_jobs",
    "read_result",
    "save_jobs",
    "save_result",
];

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(opts(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(opts(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, start: f64, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(seconds(name, help, start), labels).expect("valid metric")
}

/// A device's label values and an outcome.
fn with<'a>(device: &[&'a str; 5], outcome: &'a str) -> [&'a str; 6] {
    let [a, b, c, d, e] = *device;
    [a, b, c, d, e, outcome]
}

fn with_model() -> [&'static str; 6] {
    let [a, b, c, d, e] = DEVICE_LABELS;
    [a, b, c, d, e, "model"]
}

fn with_outcome() -> [&'static str; 6] {
    let [a, b, c, d, e] = DEVICE_LABELS;
    [a, b, c, d, e, "outcome"]
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let metrics = Metrics {
            registry: Registry::new(),
            exposition_size: AtomicUsize::new(0),
            requests: counter(
                "http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            ),
            request_duration: histogram(
                "http_request_duration_seconds",
                "Time to answer HTTP requests, by route, method and status",
                0.0001,
                &["route", "method", "status"],
            ),
            tunes: counter(
                "tunes_total",
                "Finished tuning jobs by device and outcome",
                &with_outcome(),
            ),
            tune_duration: histogram(
                "tune_duration_seconds",
                "Wall time of tuning jobs",
                0.001,
                &DEVICE_LABELS,
            ),
            probes: counter(
                "probes_total",
                "Probes by device and outcome",
                &with_outcome(),
            ),
            probe_duration: histogram(
                "probe_duration_seconds",
                "Wall time of probes",
                0.001,
                &with_outcome(),
            ),
            queue_length: gauge("queue_length", "Jobs waiting per device", &DEVICE_LABELS),
            busy: gauge(
                "device_busy",
                "1 while the device runs a tuning job",
                &DEVICE_LABELS,
            ),
            healthy: gauge(
                "device_healthy",
                "0 while the device refuses jobs because its probe worker keeps failing",
                &DEVICE_LABELS,
            ),
            worker_restarts: counter(
                "worker_restarts_total",
                "Probe worker processes started again after one faulted, crashed or hung",
                &DEVICE_LABELS,
            ),
            cache_hits: IntCounter::with_opts(opts(
                "cache_hits_total",
                "Results answered from the cache",
            ))
            .expect("valid metric"),
            cache_misses: IntCounter::with_opts(opts(
                "cache_misses_total",
                "Jobs that found no cached result",
            ))
            .expect("valid metric"),
            single_flight_joins: IntCounter::with_opts(opts(
                "single_flight_joins_total",
                "Requests that joined an identical job already queued or running",
            ))
            .expect("valid metric"),
            store_errors: counter(
                "store_errors_total",
                "Store operations that failed, by operation",
                &["operation"],
            ),
            memory_total: gauge(
                "device_memory_total_bytes",
                "Device memory in all (GPUs as NVML reports it; the host device: its budget)",
                &DEVICE_LABELS,
            ),
            memory_used: gauge(
                "device_memory_used_bytes",
                "Device memory in use (GPUs: by any process; the host device: by probes)",
                &DEVICE_LABELS,
            ),
            last_max_batch_size: gauge(
                "last_max_batch_size",
                "Largest batch size of the last tune per device and model (the 8 models tuned last)",
                &with_model(),
            ),
            last_recommended_batch_size: gauge(
                "last_recommended_batch_size",
                "Recommended batch size of the last tune per device and model (the 8 models tuned last)",
                &with_model(),
            ),
            last_models: Default::default(),
        };
        let build_info = gauge(
            "build_info",
            "Build information; the value is always 1",
            &["version", "revision"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("HEADROOM_REVISION")])
            .set(1);
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.tunes.clone()),
            Box::new(metrics.tune_duration.clone()),
            Box::new(metrics.probes.clone()),
            Box::new(metrics.probe_duration.clone()),
            Box::new(metrics.queue_length.clone()),
            Box::new(metrics.busy.clone()),
            Box::new(metrics.healthy.clone()),
            Box::new(metrics.worker_restarts.clone()),
            Box::new(metrics.cache_hits.clone()),
            Box::new(metrics.cache_misses.clone()),
            Box::new(metrics.single_flight_joins.clone()),
            Box::new(metrics.store_errors.clone()),
            Box::new(metrics.memory_total.clone()),
            Box::new(metrics.memory_used.clone()),
            Box::new(metrics.last_max_batch_size.clone()),
            Box::new(metrics.last_recommended_batch_size.clone()),
            Box::new(build_info),
            Box::new(Recent::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            )),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        for operation in STORE_OPERATIONS {
            metrics.store_errors.with_label_values(&[operation]);
        }
        metrics
    }

    /// Counts and times an answered request.
    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let status = status.to_string();
        let labels = [route, method, status.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.request_duration
            .with_label_values(&labels)
            .observe(seconds);
    }

    /// Records a finished probe.
    pub fn probe(&self, device: &DeviceLabels, outcome: &str, seconds: f64) {
        let labels = device.with(outcome);
        self.probes.with_label_values(&labels).inc();
        self.probe_duration
            .with_label_values(&labels)
            .observe(seconds);
    }

    /// Records a finished tune (`succeeded`, `failed` or `cancelled`).
    pub fn tune(&self, device: &DeviceLabels, outcome: &str, seconds: f64) {
        self.tunes.with_label_values(&device.with(outcome)).inc();
        self.tune_duration
            .with_label_values(&device.values())
            .observe(seconds);
    }

    /// The last successful tune's answer on a device.
    pub fn last_batch_sizes(&self, device: &DeviceLabels, model: &str, max: u64, recommended: u64) {
        let values = device.values();
        let labels = with(&values, model);
        self.last_max_batch_size
            .with_label_values(&labels)
            .set(max as i64);
        self.last_recommended_batch_size
            .with_label_values(&labels)
            .set(recommended as i64);
        // The model goes to the back; past LAST_MODELS, the oldest model's series go.
        let mut models = crate::lock(&self.last_models);
        let kept = models.entry(values.join("\u{1f}")).or_default();
        kept.retain(|m| m != model);
        kept.push(model.to_string());
        if kept.len() > LAST_MODELS {
            let oldest = kept.remove(0);
            let gone = with(&values, &oldest);
            let _ = self.last_max_batch_size.remove_label_values(&gone);
            let _ = self.last_recommended_batch_size.remove_label_values(&gone);
        }
    }

    /// Jobs waiting on a device.
    pub fn queue_length(&self, device: &DeviceLabels, jobs: usize) {
        self.queue_length
            .with_label_values(&device.values())
            .set(jobs as i64);
    }

    /// Whether a device runs a job.
    pub fn busy(&self, device: &DeviceLabels, busy: bool) {
        self.busy
            .with_label_values(&device.values())
            .set(i64::from(busy));
    }

    /// Every series of a device just opened, at its resting value: idle, nothing queued,
    /// healthy, no tunes or probes yet, and its memory.
    pub fn device_at_rest(&self, device: &DeviceLabels, info: &DeviceInfo) {
        let values = device.values();
        self.queue_length.with_label_values(&values).set(0);
        self.busy.with_label_values(&values).set(0);
        self.healthy.with_label_values(&values).set(1);
        self.worker_restarts.with_label_values(&values);
        self.tune_duration.with_label_values(&values);
        for outcome in JOB_OUTCOMES {
            self.tunes.with_label_values(&with(&values, outcome));
        }
        for outcome in PROBE_OUTCOMES {
            self.probes.with_label_values(&with(&values, outcome));
            self.probe_duration
                .with_label_values(&with(&values, outcome));
        }
        self.device_memory(device, info);
    }

    /// The memory of a device as it reports it (the host device; GPUs report through NVML).
    pub fn device_memory(&self, device: &DeviceLabels, info: &DeviceInfo) {
        let used = info.total_bytes.saturating_sub(info.free_bytes);
        self.gpu_memory(device, info.total_bytes, used);
    }

    /// Whether a device takes jobs.
    pub fn healthy(&self, device: &DeviceLabels, healthy: bool) {
        self.healthy
            .with_label_values(&device.values())
            .set(i64::from(healthy));
    }

    /// A probe worker started again.
    pub fn worker_restart(&self, device: &DeviceLabels) {
        self.worker_restarts
            .with_label_values(&device.values())
            .inc();
    }

    /// A result answered from the cache.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// A job that found no cached result.
    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// A request that joined an identical job in flight.
    pub fn single_flight_join(&self) {
        self.single_flight_joins.inc();
    }

    /// Counts a failed store operation.
    pub fn store_error(&self, operation: &str) {
        self.store_errors.with_label_values(&[operation]).inc();
    }

    /// A GPU's memory, as NVML reports it.
    pub fn gpu_memory(&self, device: &DeviceLabels, total_bytes: u64, used_bytes: u64) {
        self.memory_total
            .with_label_values(&device.values())
            .set(total_bytes as i64);
        self.memory_used
            .with_label_values(&device.values())
            .set(used_bytes as i64);
    }

    /// The Prometheus text exposition of every metric (UTF-8), written into a buffer sized
    /// from the last one, so that a scrape does not grow it step by step.
    pub fn encode(&self) -> Vec<u8> {
        let mut buffer = Vec::with_capacity(self.exposition_size.load(Ordering::Relaxed));
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("writing to a Vec cannot fail");
        self.exposition_size
            .store(buffer.len() + buffer.len() / 8, Ordering::Relaxed);
        buffer
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::device::DeviceKind;

    #[test]
    fn the_last_answers_are_kept_per_model_for_the_models_tuned_last() {
        let metrics = Metrics::new();
        let info = DeviceInfo {
            kind: DeviceKind::Host,
            index: 0,
            name: "host".into(),
            uuid: None,
            total_bytes: 1 << 20,
            free_bytes: 1 << 20,
        };
        let device = DeviceLabels::new(DeviceSpec::Host, &info, None);
        for i in 0..10u64 {
            metrics.last_batch_sizes(&device, &format!("model {i}"), 100 + i, 80 + i);
        }
        // Tuned again: its value changes and it is the newest.
        metrics.last_batch_sizes(&device, "model 3", 7, 5);
        metrics.last_batch_sizes(&device, "model 10", 1, 1);
        let text = String::from_utf8(metrics.encode()).unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("headroom_last_max_batch_size{"))
            .collect();
        assert_eq!(series.len(), LAST_MODELS, "{series:#?}");
        assert!(series
            .iter()
            .any(|l| l.contains("model=\"model 3\"") && l.ends_with(" 7")));
        for gone in ["model 0", "model 1", "model 2"] {
            assert!(!text.contains(&format!("model=\"{gone}\"")), "{gone} kept");
        }
        assert!(text.contains("model=\"model 4\""));
    }
}
