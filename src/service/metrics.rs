//! Every metric the service exports, registered in one place (prefix `headroom_`, base units,
//! bounded labels: route, method, status, device, outcome, and the GPU's index and UUID as
//! NVIDIA's DCGM exporter labels them). Never a job id.

use crate::device::select::DeviceSpec;
use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    tunes: IntCounterVec,
    tune_duration: HistogramVec,
    probes: IntCounterVec,
    probe_duration: HistogramVec,
    queue_length: IntGaugeVec,
    busy: IntGaugeVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    memory_total: IntGaugeVec,
    memory_used: IntGaugeVec,
    last_max_batch_size: IntGaugeVec,
    last_recommended_batch_size: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("headroom")
}

fn seconds(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace("headroom")
        .buckets(exponential_buckets(0.001, 4.0, 10).expect("valid buckets"))
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let counter = |name, help, labels: &[&str]| {
            IntCounterVec::new(opts(name, help), labels).expect("valid metric")
        };
        let gauge = |name, help, labels: &[&str]| {
            IntGaugeVec::new(opts(name, help), labels).expect("valid metric")
        };
        let histogram = |name, help, labels: &[&str]| {
            HistogramVec::new(seconds(name, help), labels).expect("valid metric")
        };
        let metrics = Metrics {
            registry: Registry::new(),
            requests: counter(
                "http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            ),
            tunes: counter(
                "tunes_total",
                "Finished tuning jobs by device and outcome",
                &["device", "outcome"],
            ),
            tune_duration: histogram(
                "tune_duration_seconds",
                "Wall time of tuning jobs",
                &["device"],
            ),
            probes: counter(
                "probes_total",
                "Probes by device and outcome",
                &["device", "outcome"],
            ),
            probe_duration: histogram(
                "probe_duration_seconds",
                "Wall time of probes",
                &["device", "outcome"],
            ),
            queue_length: gauge("queue_length", "Jobs waiting per device", &["device"]),
            busy: gauge(
                "device_busy",
                "1 while the device runs a tuning job",
                &["device"],
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
            memory_total: gauge(
                "device_memory_total_bytes",
                "GPU memory in all",
                &["gpu", "UUID"],
            ),
            memory_used: gauge(
                "device_memory_used_bytes",
                "GPU memory in use by any process",
                &["gpu", "UUID"],
            ),
            last_max_batch_size: gauge(
                "last_max_batch_size",
                "Largest batch size of the last tune per device",
                &["device"],
            ),
            last_recommended_batch_size: gauge(
                "last_recommended_batch_size",
                "Recommended batch size of the last tune per device",
                &["device"],
            ),
        };
        let build_info = gauge(
            "build_info",
            "Build information; the value is always 1",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.tunes.clone()),
            Box::new(metrics.tune_duration.clone()),
            Box::new(metrics.probes.clone()),
            Box::new(metrics.probe_duration.clone()),
            Box::new(metrics.queue_length.clone()),
            Box::new(metrics.busy.clone()),
            Box::new(metrics.cache_hits.clone()),
            Box::new(metrics.cache_misses.clone()),
            Box::new(metrics.memory_total.clone()),
            Box::new(metrics.memory_used.clone()),
            Box::new(metrics.last_max_batch_size.clone()),
            Box::new(metrics.last_recommended_batch_size.clone()),
            Box::new(build_info),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }

    /// Counts an answered request.
    pub fn request(&self, route: &str, method: &str, status: u16) {
        self.requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
    }

    /// Records a finished probe.
    pub fn probe(&self, device: &DeviceSpec, outcome: &str, seconds: f64) {
        let device = device.to_string();
        self.probes.with_label_values(&[&device, outcome]).inc();
        self.probe_duration
            .with_label_values(&[&device, outcome])
            .observe(seconds);
    }

    /// Records a finished tune (`succeeded`, `failed` or `cancelled`).
    pub fn tune(&self, device: &DeviceSpec, outcome: &str, seconds: f64) {
        let device = device.to_string();
        self.tunes.with_label_values(&[&device, outcome]).inc();
        self.tune_duration
            .with_label_values(&[&device])
            .observe(seconds);
    }

    /// The last successful tune's answer on a device.
    pub fn last_batch_sizes(&self, device: &DeviceSpec, max: u64, recommended: u64) {
        let device = device.to_string();
        self.last_max_batch_size
            .with_label_values(&[&device])
            .set(max as i64);
        self.last_recommended_batch_size
            .with_label_values(&[&device])
            .set(recommended as i64);
    }

    /// Jobs waiting on a device.
    pub fn queue_length(&self, device: &DeviceSpec, jobs: usize) {
        self.queue_length
            .with_label_values(&[&device.to_string()])
            .set(jobs as i64);
    }

    /// Whether a device runs a job.
    pub fn busy(&self, device: &DeviceSpec, busy: bool) {
        self.busy
            .with_label_values(&[&device.to_string()])
            .set(i64::from(busy));
    }

    /// A result answered from the cache.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// A job that found no cached result.
    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// A GPU's memory, as NVML reports it.
    pub fn gpu_memory(&self, index: u32, uuid: &str, total_bytes: u64, used_bytes: u64) {
        let index = index.to_string();
        self.memory_total
            .with_label_values(&[index.as_str(), uuid])
            .set(total_bytes as i64);
        self.memory_used
            .with_label_values(&[index.as_str(), uuid])
            .set(used_bytes as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(buffer).expect("the exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
