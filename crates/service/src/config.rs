//! Service configuration: `config/default.toml` documents every setting.
//!
//! Precedence, highest first: command-line flags, `HEADROOM_*` environment variables, the config
//! file, the built-in defaults (which equal `config/default.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::probe_worker::client::Watchdog;
use headroom_devices::host::DEFAULT_BUDGET_BYTES;
use headroom_devices::select::DeviceSpec;

/// Every setting of `headroom serve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port to listen on.
    pub bind: SocketAddr,
    /// Devices to serve: `auto` (every CUDA device, plus the host) or a list such as `["host", "cuda:0"]`.
    pub devices: Vec<DeviceSpec>,
    /// Memory budget of the host device.
    pub host_memory: ByteSize,
    /// Jobs that may wait per device; a full queue answers 429.
    pub queue_length: usize,
    /// How long `POST /tune` waits for a result before answering 202, seconds.
    pub wait_seconds: u64,
    /// Finished jobs kept in memory for `GET /jobs` (the store keeps more).
    pub job_history: usize,
    /// Where jobs and results are kept: `sqlite:///path/headroom.db`, `sqlite::memory:`,
    /// `postgres://user:password@host/db`, or empty for a SQLite file in the state directory.
    pub store: String,
    /// Check a SQLite store's every page at start (`PRAGMA quick_check`) and refuse a damaged
    /// file; off skips it (it reads the whole file: 16 s for 1 GB on 2 cores).
    pub store_integrity_check: bool,
    /// This service's name in the store, unique among the services sharing one (empty: the host
    /// name). A restart under the same name takes over its jobs.
    pub node_name: String,
    /// Reuse results other nodes of the store measured on devices identical to this one's.
    pub share_results: bool,
    /// Finished jobs older than this many days leave the store.
    pub retention_days: u64,
    /// Most finished jobs the store keeps; past it the oldest go.
    pub retention_jobs: u64,
    /// How long a result is reused for an identical job on an identical device, seconds (0: never).
    pub cache_ttl_seconds: u64,
    /// Most results kept in memory for reuse; the least used go first (the store keeps all).
    pub cache_capacity: u64,
    /// Largest request body.
    pub body_limit: ByteSize,
    /// Bearer token required for `/tune` and `/jobs` (empty: none).
    pub token: String,
    /// `human` or `json` log lines.
    pub log_format: LogFormat,
    /// Probe GPUs on which other processes hold compute contexts.
    pub allow_shared: bool,
    /// How long shutdown waits for a running probe, seconds.
    pub shutdown_grace_seconds: u64,
    /// The most a probe may take, seconds; past it its worker is killed and the job fails.
    pub probe_timeout_seconds: u64,
    /// The least a probe is given, seconds (otherwise ten times the last probe's time, scaled
    /// by the batch ratio).
    pub probe_timeout_floor_seconds: u64,
    /// How long a new probe worker may take to open its device (compiling kernels), seconds.
    pub worker_start_seconds: u64,
    /// How long a device whose worker failed repeatedly refuses jobs (503), seconds.
    pub worker_cooldown_seconds: u64,
    /// The `headroom` binary that runs probe workers (empty: this one).
    pub worker_program: String,
    /// How long a client may take to send a request's head, seconds; a slower one is closed.
    pub header_timeout_seconds: u64,
    /// Connections open at once (also kept below the open-file limit); more are closed at once.
    pub max_connections: usize,
    /// Requests that take longer than this are logged at INFO, seconds (every request is
    /// logged at DEBUG, failures at WARN).
    pub slow_request_seconds: f64,
    /// Default `headroom` of jobs that give none.
    pub headroom: f64,
    /// Default `search` settings of jobs that give none (any subset of the job's `search` keys).
    pub search: serde_json::Map<String, serde_json::Value>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:8080".parse().expect("a valid address"),
            devices: vec![DeviceSpec::Auto],
            host_memory: ByteSize(DEFAULT_BUDGET_BYTES),
            queue_length: 8,
            wait_seconds: 60,
            job_history: 256,
            store: String::new(),
            node_name: String::new(),
            store_integrity_check: true,
            share_results: true,
            retention_days: 30,
            retention_jobs: 100_000,
            cache_ttl_seconds: 3600,
            cache_capacity: 1024,
            body_limit: ByteSize(64 << 10),
            token: String::new(),
            log_format: LogFormat::Human,
            allow_shared: false,
            shutdown_grace_seconds: 30,
            probe_timeout_seconds: Watchdog::DEFAULT.ceiling.as_secs(),
            probe_timeout_floor_seconds: Watchdog::DEFAULT.floor.as_secs(),
            worker_start_seconds: 300,
            worker_cooldown_seconds: 60,
            worker_program: String::new(),
            slow_request_seconds: 5.0,
            header_timeout_seconds: 10,
            max_connections: 8192,
            headroom: 0.8,
            search: serde_json::Map::new(),
        }
    }
}

/// `HEADROOM_*` variables that are not settings but are read elsewhere: the CLI's token, and
/// the test and GPU-check tooling (`HEADROOM_REQUIRE_*`, `HEADROOM_STANDIN_*`, ...).
const OTHER_VARIABLES: [&str; 6] = ["TOKEN", "REQUIRE_", "STANDIN_", "PTXAS", "BIN", "DEVICE"];

/// The names of setting-like variables (`HEADROOM_*`) that are neither a setting nor read by
/// anything else: most likely a misspelt setting, which would otherwise be ignored in silence.
pub fn unknown_variables(variables: impl Iterator<Item = String>) -> Vec<String> {
    let settings = setting_names();
    variables
        .filter_map(|name| {
            let key = name.strip_prefix("HEADROOM_")?.to_ascii_lowercase();
            let known = settings.contains(&key)
                || OTHER_VARIABLES.iter().any(|other| {
                    let other = other.to_ascii_lowercase();
                    if other.ends_with('_') {
                        key.starts_with(&other)
                    } else {
                        key == other
                    }
                });
            (!known).then_some(name)
        })
        .collect()
}

fn setting_names() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file named does not exist.
    #[error("config file {} does not exist", .0.display())]
    Missing(PathBuf),
    /// The file or a variable does not parse as the settings.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    /// A setting is outside what it accepts.
    #[error("config {setting} {rule}")]
    OutOfRange {
        /// The setting (or settings) at fault.
        setting: &'static str,
        /// What it must be, and what it was.
        rule: String,
    },
}

fn out_of_range(setting: &'static str, rule: impl Into<String>) -> ConfigError {
    ConfigError::OutOfRange {
        setting,
        rule: rule.into(),
    }
}

impl Config {
    /// Defaults, then `file` (if given), then `HEADROOM_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only the settings' own names: other HEADROOM_* variables (e.g. for tests) are not config.
        let keys = setting_names();
        let environment = Env::prefixed("HEADROOM_")
            .filter(move |key| keys.iter().any(|k| key.as_str().eq_ignore_ascii_case(k)));
        let config: Config = figment.merge(environment).extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// This service's node name: the configured one, else the host name.
    pub fn node(&self) -> String {
        if self.node_name.is_empty() {
            gethostname::gethostname().to_string_lossy().into_owned()
        } else {
            self.node_name.clone()
        }
    }

    /// Checks ranges the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.headroom > 0.0 && self.headroom <= 1.0) {
            return Err(out_of_range(
                "headroom",
                format!("must be in (0, 1], got {}", self.headroom),
            ));
        }
        if !(self.slow_request_seconds.is_finite() && self.slow_request_seconds >= 0.0) {
            return Err(out_of_range(
                "slow_request_seconds",
                format!(
                    "must be a number of seconds, got {}",
                    self.slow_request_seconds
                ),
            ));
        }
        if self.queue_length == 0 || self.job_history == 0 {
            return Err(out_of_range(
                "queue_length and job_history",
                "must be at least 1",
            ));
        }
        let backends = ["sqlite:", "postgres://", "postgresql://"];
        if !(self.store.is_empty() || backends.iter().any(|b| self.store.starts_with(b))) {
            return Err(out_of_range(
                "store",
                format!(
                    "must be empty (the default SQLite file), a sqlite: URL or a postgres:// \
                     URL, got {:?}",
                    self.store
                ),
            ));
        }
        if self.retention_days == 0 || self.retention_jobs == 0 {
            return Err(out_of_range(
                "retention_days and retention_jobs",
                "must be at least 1",
            ));
        }
        if self.devices.is_empty() {
            return Err(out_of_range(
                "devices",
                "must name at least one device (or \"auto\")",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
// figment's Jail fixes the closures' (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
        let from_file: Config = Figment::from(Toml::file(&path)).extract().unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("headroom.toml", "queue_length = 3\nwait_seconds = 5\n")?;
            jail.set_env("HEADROOM_QUEUE_LENGTH", "4");
            jail.set_env("HEADROOM_SOMETHING_ELSE", "not a setting");
            let config = Config::load(Some(Path::new("headroom.toml"))).unwrap();
            assert_eq!(config.queue_length, 4);
            assert_eq!(config.wait_seconds, 5);
            Ok(())
        });
    }

    #[test]
    fn misspelt_variables_are_named_and_others_are_not() {
        let names = [
            "HEADROOM_QUEUE_LENGTH",
            "HEADROOM_QUEUE_LENGHT",
            "HEADROOM_TOKEN",
            "HEADROOM_STANDIN_MEMORY",
            "HEADROOM_REQUIRE_NVRTC",
            "HEADROOM_WAIT_SECONDS",
            "HEADROOM_WAIT_SECOND",
            "HEADROOM_DEVICESS",
            "PATH",
        ];
        assert_eq!(
            unknown_variables(names.iter().map(|n| n.to_string())),
            [
                "HEADROOM_QUEUE_LENGHT",
                "HEADROOM_WAIT_SECOND",
                "HEADROOM_DEVICESS"
            ]
        );
    }

    #[test]
    fn devices_are_typed_specs() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("devices.toml", "devices = [\"host\", \"cuda:1\"]\n")?;
            let config = Config::load(Some(Path::new("devices.toml"))).unwrap();
            assert_eq!(config.devices, [DeviceSpec::Host, DeviceSpec::Cuda(1)]);
            jail.create_file("bad.toml", "devices = [\"gpu\"]\n")?;
            let err = Config::load(Some(Path::new("bad.toml"))).unwrap_err();
            assert!(err.to_string().contains("unknown device `gpu`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_reported() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "headroom = 2.0\n")?;
            assert!(matches!(
                Config::load(Some(Path::new("bad.toml"))),
                Err(ConfigError::OutOfRange {
                    setting: "headroom",
                    ..
                })
            ));
            jail.create_file("typo.toml", "queue_lenght = 2\n")?;
            assert!(Config::load(Some(Path::new("typo.toml"))).is_err());
            Ok(())
        });
    }
}
