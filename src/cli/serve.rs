//! `headroom serve`: loads the settings, binds, and serves until SIGTERM or SIGINT.

use std::path::PathBuf;

use bytesize::ByteSize;

use super::input::check_host_budget;
use super::CliError;
use headroom_devices::select::DeviceSpec;
use headroom_service::config::{Config, LogFormat};

/// Arguments of `headroom serve`, which override the file and the environment.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Config file (see config/default.toml); HEADROOM_* variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:8080.
    #[arg(long)]
    bind: Option<std::net::SocketAddr>,
    /// Device to serve (repeatable): auto, host, cuda:N.
    #[arg(long = "device")]
    devices: Vec<DeviceSpec>,
    /// Memory budget of the host device.
    #[arg(long)]
    host_memory: Option<ByteSize>,
    /// Bearer token required for /tune and /jobs.
    #[arg(long)]
    token: Option<String>,
    /// Where jobs and results are kept: sqlite:///path/headroom.db, sqlite::memory: (nothing
    /// kept past the process) or postgres://user:password@host/db (shared by a cluster's
    /// nodes); by default a SQLite file under the user's state directory.
    #[arg(long)]
    store: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

impl ServeArgs {
    /// The flags given, over `config`.
    fn apply(self, config: &mut Config) {
        if let Some(bind) = self.bind {
            config.bind = bind;
        }
        if let Some(bytes) = self.host_memory {
            config.host_memory = bytes;
        }
        if let Some(token) = self.token {
            config.token = token;
        }
        if let Some(store) = self.store {
            config.store = store;
        }
        if let Some(format) = self.log_format {
            config.log_format = match format {
                LogFormatArg::Human => LogFormat::Human,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        if !self.devices.is_empty() {
            config.devices = self.devices;
        }
    }
}

/// Serves with the settings of the config file (if any), the environment and the flags.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    let mut config = Config::load(args.config.as_deref())?;
    args.apply(&mut config);
    check_host_budget(config.host_memory.0)?;
    headroom_service::logging::init_logging(config.log_format);
    for name in headroom_service::config::unknown_variables(std::env::vars().map(|(name, _)| name))
    {
        tracing::warn!(variable = %name, "{name} is not a setting and is ignored; see config/default.toml for the settings' names");
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|source| CliError::System {
        what: "cannot start the async runtime".into(),
        source,
    })?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .map_err(|source| CliError::System {
                what: format!("cannot listen on {}", config.bind),
                source,
            })?;
        headroom_service::serve(config, listener, headroom_service::shutdown_signal()).await?;
        Ok(())
    })
}
