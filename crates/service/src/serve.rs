//! Serving: the store opened and taken over, the devices opened, the router on a listener until
//! a shutdown signal, and an orderly stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::config::Config;
use crate::connections;
use crate::recovery;
use crate::routes::router;
use crate::state::AppState;
use crate::store::journal::Direction;
use crate::store::{self, Store, StoreError};

/// Why the service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or taken over at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving failed.
    #[error("the server stopped: {0}")]
    Io(#[from] std::io::Error),
}

/// How long shutdown waits for the store to take the last writes.
const STORE_FLUSH: Duration = Duration::from_secs(10);

/// Opens the store and takes over this node's jobs from before, then serves on `listener`
/// until `shutdown` resolves: stops taking jobs, lets a running probe finish (bounded by the
/// config's grace), frees the devices and writes the last changes to the store.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let store = Arc::new(store::sql::connect(&config.store)?);
    // A large SQLite file's integrity check would hold the start for many seconds: it runs
    // while the service serves instead, the store unused until it passes.
    let large = store.large_file().filter(|_| config.store_integrity_check);
    let check_later = large.is_some();
    let taken_over = match large {
        Some(bytes) => {
            let reason = format!(
                "its integrity check is running ({} MB of SQLite file, about 16 s a GB); \
                 nothing is written to it until it passes",
                bytes >> 20
            );
            store.closed_because(reason.clone());
            Err(StoreError::Unavailable(reason))
        }
        None => recovery::take_over(&store, &config.node(), config.store_integrity_check).await,
    };
    let mut unavailable = None;
    let recovered = match taken_over {
        Ok(recovered) => {
            tracing::info!(store = store.describe(), "store open");
            Some(recovered)
        }
        // Unreachable now is no reason not to serve: the store is taken over when it answers.
        Err(StoreError::Unavailable(reason)) => {
            tracing::warn!(store = store.describe(), %reason, "the store is unavailable at start; serving without it, degraded, and trying again");
            unavailable = Some(StoreError::Unavailable(reason));
            None
        }
        Err(refused) => return Err(refused.into()),
    };
    let state = AppState::new(config, Arc::clone(&store) as Arc<dyn Store>);
    if recovered.is_some() {
        tokio::spawn(recovery::restore_last_answers_once_open(Arc::clone(&state)));
    }
    let opening = Arc::clone(&state);
    let opened = tokio::task::spawn_blocking(move || {
        opening.open_devices()?;
        if let Some(recovered) = recovered {
            opening.requeue(recovered.queued);
        }
        Ok::<(), crate::state::AlreadyOpen>(())
    });
    let store_back = unavailable.map(|reason| {
        state
            .store_health
            .record(Direction::Write, "open", &Err::<(), _>(reason));
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            // Queued jobs wait for their devices.
            recovery::devices_open(&state).await;
            match check_later {
                true => recovery::check_then_take_over(state, store).await,
                false => {
                    let integrity_check = state.config.store_integrity_check;
                    recovery::take_over_when_back(state, store, integrity_check).await
                }
            }
        })
    });
    let stopping = Arc::clone(&state);
    let app = router(Arc::clone(&state));
    let files = connections::raise_file_limit();
    // Room beside the connections for the store, the workers' pipes and the process itself.
    let max_connections = state
        .config
        .max_connections
        .min(files.saturating_sub(256).max(16) as usize);
    let limits = connections::Limits {
        header_timeout: Duration::from_secs(state.config.header_timeout_seconds),
        max_connections,
    };
    tracing::info!(address = %listener.local_addr()?, max_connections, "listening");
    let stopped_at = Arc::new(std::sync::OnceLock::new());
    let signalled = Arc::clone(&stopped_at);
    let on_signal = async move {
        shutdown.await;
        let _ = signalled.set(Instant::now());
        tracing::info!("shutting down: stopping jobs; queued ones stay queued for the next start");
        stopping.begin_shutdown();
    };
    // One grace from the signal on: clients get it, the devices what is left of it.
    connections::serve(listener, app, limits, on_signal, grace).await;
    let grace = stopped_at
        .get()
        .map_or(grace, |at: &Instant| grace.saturating_sub(at.elapsed()));
    if let Some(task) = store_back {
        task.abort();
    }
    match opened.await {
        Ok(Err(e)) => tracing::error!("opening devices failed: {e}"),
        Err(e) => tracing::error!("opening devices panicked: {e}"),
        Ok(Ok(())) => {}
    }
    let finishing = Arc::clone(&state);
    let released = tokio::task::spawn_blocking(move || finishing.finish_shutdown(grace))
        .await
        .unwrap_or(false);
    let stored = state.journal.flush(STORE_FLUSH).await;
    tracing::info!(released, stored, "stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}
