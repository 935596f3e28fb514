//! The service's memory across restarts and across nodes: every job (request, device, state,
//! probes, result or error, times) and every finished result, behind one small trait.
//!
//! - [`sql`]: SQLite (the default: a file, nothing to install) and PostgreSQL (shared by a
//!   cluster's agents), both through sqlx with the same embedded migrations.
//! - [`schema`]: the checks that a database is headroom's, whole and of a known schema, made
//!   before anything is written to it.
//! - [`claim`]: one tune of a job at a time across the nodes sharing a store.
//! - [`journal`]: the ordered writer that keeps the store up to date without putting it on the
//!   path of a probe, and the store's health for `/readyz` and the metrics.

pub mod claim;
pub mod journal;
pub mod schema;
pub mod sql;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use super::problem::Problem;
use crate::answer::TuneAnswer;
use crate::document::JobDocument;
use claim::Claim;

/// A job as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredJob {
    /// The node that accepted it, and runs it.
    pub node: String,
    /// The normalised job (JSON), to run it again after a restart.
    pub request: String,
    /// Its result-cache key.
    pub cache_key: String,
    /// The job as `GET /jobs/{id}` shows it.
    pub document: JobDocument,
}

/// How long the store keeps what it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished jobs older than this go.
    pub max_age: Duration,
    /// Past this many finished jobs, the oldest go.
    pub max_jobs: u64,
    /// Results measured longer ago than this go (the cache's time to live).
    pub result_ttl: Duration,
}

/// What a node finds of its own jobs when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    /// Jobs that were running when the node stopped: now `interrupted`, their probes kept.
    pub interrupted: usize,
    /// Jobs still queued, oldest first, to run again.
    pub queued: Vec<StoredJob>,
}

/// What went wrong with the store.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    /// The database is not one headroom can read: not a SQLite file, or damaged.
    #[error(
        "the store {store} is not a database headroom can read ({detail}); it was left untouched: \
         move it aside or set `store` to another database, then start again"
    )]
    Corrupt {
        /// The store, its password hidden.
        store: String,
        /// What the database library said.
        detail: String,
    },
    /// The database belongs to something else: another application's tables, or a migration
    /// history that is not headroom's.
    #[error(
        "the store {store} is not headroom's database ({detail}); it was left untouched: set \
         `store` to a database of headroom's own (a new SQLite file, or an empty PostgreSQL \
         database or schema)"
    )]
    NotHeadrooms {
        /// The store, its password hidden.
        store: String,
        /// What gave it away.
        detail: String,
    },
    /// A newer headroom wrote the database: it has schema changes this build does not know.
    #[error(
        "the store {store} was written by a newer headroom (schema migration {version}, which \
         this build does not know); it was left untouched: upgrade headroom or set `store` to \
         another database"
    )]
    NewerSchema {
        /// The store, its password hidden.
        store: String,
        /// The first unknown migration.
        version: i64,
    },
    /// The store cannot be reached, read or written now: down, read-only, full, or slow.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// Where the service keeps jobs and results.
#[async_trait]
pub trait Store: Send + Sync {
    /// The backend and where it is, without a password: `sqlite:///var/lib/headroom/headroom.db`.
    fn describe(&self) -> &str;

    /// Whether the store answers.
    async fn check(&self) -> Result<(), StoreError>;

    /// Writes each job as it is now, replacing what was kept of it.
    async fn save_jobs(&self, jobs: &[StoredJob]) -> Result<(), StoreError>;

    /// A job by id, whichever node ran it.
    async fn job(&self, id: Uuid) -> Result<Option<StoredJob>, StoreError>;

    /// The `limit` newest jobs of `node`, newest first.
    async fn recent_jobs(&self, node: &str, limit: usize) -> Result<Vec<JobDocument>, StoreError>;

    /// At a node's start: marks its jobs that were running `interrupted` (with `why` as their
    /// error) and returns its queued jobs, oldest first.
    async fn recover(&self, node: &str, why: &Problem) -> Result<Recovered, StoreError>;

    /// Keeps a finished result under `key` (its `measured_on` and `measured_at` set).
    async fn save_result(&self, key: &str, result: &TuneAnswer) -> Result<(), StoreError>;

    /// The result under `key`, if it was measured within `max_age`.
    async fn result(&self, key: &str, max_age: Duration) -> Result<Option<TuneAnswer>, StoreError>;

    /// Removes what `retention` no longer keeps; returns how many jobs and results went.
    async fn prune(&self, retention: &Retention) -> Result<u64, StoreError>;

    /// Claims the tuning of `key` among every node sharing the store: `Some` while this node
    /// holds it (released, dropped, or with the process gone, it frees), `None` while another
    /// node holds it. A store no other node shares always grants it.
    async fn claim(&self, key: &str) -> Result<Option<Claim>, StoreError>;
}
