//! `headroom serve`: loads the settings, binds, and serves until SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use bytesize::ByteSize;

use super::{check_host_budget, fail, EXIT_FAILURE, EXIT_INVALID};
use crate::config::{Config, LogFormat};
use crate::device::select::DeviceSpec;

/// Flags of `headroom serve`, which override the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct ServeOverrides {
    /// `--bind`.
    pub bind: Option<std::net::SocketAddr>,
    /// `--host-memory`.
    pub host_memory: Option<u64>,
    /// `--token`.
    pub token: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--device` (repeatable).
    pub devices: Vec<DeviceSpec>,
}

impl ServeOverrides {
    fn apply(self, config: &mut Config) {
        if let Some(bind) = self.bind {
            config.bind = bind;
        }
        if let Some(bytes) = self.host_memory {
            config.host_memory = ByteSize(bytes);
        }
        if let Some(token) = self.token {
            config.token = token;
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        if !self.devices.is_empty() {
            config.devices = self.devices;
        }
    }
}

/// Serves with the settings of `config_file` (if any), the environment and `overrides`.
pub fn serve_command(config_file: Option<&Path>, overrides: ServeOverrides) -> ExitCode {
    let mut config = match Config::load(config_file) {
        Ok(config) => config,
        Err(message) => return fail(EXIT_INVALID, message),
    };
    overrides.apply(&mut config);
    if let Err(message) = check_host_budget(config.host_memory.0) {
        return fail(EXIT_INVALID, message);
    }
    crate::service::init_logging(config.log_format);
    for name in crate::config::unknown_variables(std::env::vars().map(|(name, _)| name)) {
        tracing::warn!(variable = %name, "{name} is not a setting and is ignored; see config/default.toml for the settings' names");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format!("cannot start the async runtime: {e}")),
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(config.bind).await {
            Ok(listener) => listener,
            Err(e) => {
                return fail(
                    EXIT_FAILURE,
                    format!("cannot listen on {}: {e}", config.bind),
                )
            }
        };
        match crate::service::serve(config, listener, crate::service::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(EXIT_FAILURE, e.to_string()),
        }
    })
}
