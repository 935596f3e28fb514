//! The store in SQL: SQLite or PostgreSQL through sqlx's `Any` driver, one set of portable
//! queries and the migrations in `migrations/`, embedded in the binary.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator};
use sqlx::{AnyConnection, AnyPool, Connection, Row};
use std::sync::OnceLock;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::claim::{self, Claim};
use super::schema::{self, classify, Backend};
use super::{Recovered, Retention, Store, StoreError, StoredJob};
use crate::answer::TuneAnswer;
use crate::document::{JobDocument, JobState};
use crate::problem::Problem;

/// How long one store operation may take before it counts as a failure.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);

/// Rows one statement of a prune removes at most: a transaction of about 4 MB of jobs.
const PRUNE_BATCH: u32 = 1000;

/// The largest SQLite file whose integrity check the start waits for (about a second); a larger
/// one is checked while the service serves degraded, the store unused until it passes.
pub const INLINE_CHECK_BYTES: u64 = 64 << 20;

/// The states a job leaves no more: the ones retention may remove.
const UNFINISHED: &str = "('queued', 'running')";

/// The SQLite file used when the config names none: under the user's state directory
/// (`$XDG_STATE_HOME`, else `~/.local/state`), or the working directory where there is none.
pub fn default_sqlite_path() -> PathBuf {
    dirs::state_dir()
        .or_else(dirs::data_local_dir)
        .map(|dir| dir.join("headroom"))
        .unwrap_or_default()
        .join("headroom.db")
}

/// The store at `url`: `sqlite:///path/file.db` (created with its directory if missing),
/// `sqlite::memory:` (nothing kept past the process), `postgres://user:password@host/db`, or
/// empty for [`default_sqlite_path`]. Nothing is connected yet, and every operation fails until
/// [`SqlStore::start`] (or [`open`]) has checked and migrated the database.
pub fn connect(url: &str) -> Result<SqlStore, StoreError> {
    // The drivers compiled in: PostgreSQL, and SQLite over the system's library. Installed once
    // per process; a store opened later finds them in place.
    let _ = sqlx::any::install_drivers(&[sqlx::postgres::any::DRIVER, sqlx_sqlite::any::DRIVER]);
    let url = if url.is_empty() {
        format!("sqlite://{}", default_sqlite_path().display())
    } else {
        url.to_string()
    };
    let described = without_password(&url);
    let (backend, connect, options, file) = if let Some(location) = url.strip_prefix("sqlite:") {
        let (connect, options, file) = sqlite_connection(location, &described)?;
        (Backend::Sqlite, connect, options, file)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = AnyPoolOptions::new().max_connections(8);
        (Backend::Postgres, url.clone(), options, None)
    } else {
        return Err(StoreError::Unavailable(format!(
            "`store` must be a sqlite:// or postgres:// URL, not {described}"
        )));
    };
    Ok(SqlStore {
        pool: OnceLock::new(),
        options: options.acquire_timeout(OPERATION_TIMEOUT),
        described,
        backend,
        connect,
        file,
        closed_because: std::sync::Mutex::new(None),
    })
}

/// The store at `url`, checked (with SQLite's integrity check) and migrated, ready for use.
pub async fn open(url: &str) -> Result<SqlStore, StoreError> {
    let store = connect(url)?;
    let pool = store.new_pool()?;
    store.prepare(&pool, true).await?;
    let _ = store.pool.set(pool);
    Ok(store)
}

/// The connection URL and pool of a SQLite location (what follows `sqlite:`), and its file
/// (none in memory).
fn sqlite_connection(
    location: &str,
    described: &str,
) -> Result<(String, AnyPoolOptions, Option<PathBuf>), StoreError> {
    if location == ":memory:" {
        // One connection that never closes: each connection to `:memory:` is a database of its own.
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None);
        return Ok(("sqlite::memory:".into(), pool, None));
    }
    let file = location
        .trim_start_matches("//")
        .split('?')
        .next()
        .unwrap_or_default();
    if let Some(parent) = Path::new(file)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create the directory {} for the store {described}: {e}",
                parent.display()
            ))
        })?;
    }
    let query = if location.contains("mode=") {
        ""
    } else {
        "?mode=rwc"
    };
    Ok((
        format!("sqlite:{location}{query}"),
        AnyPoolOptions::new().max_connections(4),
        Some(PathBuf::from(file)),
    ))
}

/// `url` with its password replaced, for logs and errors.
fn without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The migrations of `migrations/`, embedded in the binary: version, description, SQL. Named
/// and checksummed as sqlx's own directory source does, so a store migrated by another build
/// of headroom reads the same.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "jobs and results",
    include_str!("../../migrations/0001_jobs_and_results.sql"),
)];

/// [`MIGRATIONS`] as sqlx takes them.
fn migrations() -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                sql.into(),
                false,
            )
        })
        .collect()
}

/// [`MIGRATIONS`] as sqlx's migrator takes them.
#[derive(Debug)]
struct Embedded;

impl<'s> MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(std::future::ready(Ok(migrations())))
    }
}

async fn migrate(pool: &AnyPool, store: &str) -> Result<(), StoreError> {
    let migrator = Migrator::new(Embedded)
        .await
        .map_err(|e| StoreError::Unavailable(format!("reading the embedded migrations: {e}")))?;
    match migrator.run(pool).await {
        Ok(()) => Ok(()),
        Err(MigrateError::VersionMissing(version)) => Err(StoreError::NewerSchema {
            store: store.into(),
            version,
        }),
        Err(MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _)) => {
            Err(classify(store, e))
        }
        Err(other) => Err(StoreError::NotHeadrooms {
            store: store.into(),
            detail: other.to_string(),
        }),
    }
}

/// Milliseconds since the Unix epoch.
fn millis(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// An RFC 3339 time of a document in milliseconds; now if it does not parse.
fn millis_of(rfc3339: &str) -> i64 {
    millis(OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap_or_else(|_| OffsetDateTime::now_utc()))
}

fn age_limit(max_age: Duration) -> i64 {
    let age = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
    millis(OffsetDateTime::now_utc()).saturating_sub(age)
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn stored_job(row: &AnyRow) -> Result<StoredJob, StoreError> {
    let document: String = row.try_get("document").map_err(unavailable)?;
    Ok(StoredJob {
        node: row.try_get("node").map_err(unavailable)?,
        request: row.try_get("request").map_err(unavailable)?,
        cache_key: row.try_get("cache_key").map_err(unavailable)?,
        document: serde_json::from_str(&document).map_err(unavailable)?,
    })
}

/// Runs `operation`, failing it past [`OPERATION_TIMEOUT`].
async fn timed<T>(
    operation: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(result) => result.map_err(unavailable),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no answer within {} s",
            OPERATION_TIMEOUT.as_secs()
        ))),
    }
}

/// The store in a SQL database.
pub struct SqlStore {
    /// Set once the database is checked and migrated (and this node's jobs taken over): until
    /// then nothing is read or written.
    pool: OnceLock<AnyPool>,
    /// How pools are made: each try at a start gets a new one, so that no connection opened
    /// while the file was read-only outlives the outage.
    options: AnyPoolOptions,
    described: String,
    backend: Backend,
    /// The pool's connection URL.
    connect: String,
    /// The SQLite file, if the store is one.
    file: Option<PathBuf>,
    /// Why the store is not open yet, when more is known than that it has not been started.
    closed_because: std::sync::Mutex<Option<String>>,
}

impl SqlStore {
    /// Says why the store is not open (its integrity check runs, or found damage): every
    /// operation's error names it until the store is started.
    pub fn closed_because(&self, reason: String) {
        *crate::lock(&self.closed_because) = Some(reason);
    }

    /// At a node's start: checks the database is headroom's, whole (SQLite's integrity check,
    /// unless `integrity_check` is off) and of a known schema, migrates it, then takes over
    /// `node`'s jobs (running ones become `interrupted` with `why`). Until this succeeds, every
    /// operation fails as unavailable; an unavailable database may be started again later.
    pub async fn start(
        &self,
        node: &str,
        why: &Problem,
        integrity_check: bool,
    ) -> Result<Recovered, StoreError> {
        let pool = self.new_pool()?;
        let started = match self.prepare(&pool, integrity_check).await {
            Ok(()) => timed(Self::take_over(&pool, node, why)).await,
            Err(refused) => Err(refused),
        };
        match started {
            Ok(recovered) => {
                let _ = self.pool.set(pool);
                Ok(recovered)
            }
            Err(error) => {
                pool.close().await;
                Err(error)
            }
        }
    }

    /// The size of a SQLite file whose integrity check would hold the start for long (larger
    /// than [`INLINE_CHECK_BYTES`]); `None` for a smaller file, PostgreSQL or memory.
    pub fn large_file(&self) -> Option<u64> {
        let bytes = self.file.as_ref()?.metadata().ok()?.len();
        (bytes > INLINE_CHECK_BYTES).then_some(bytes)
    }

    /// SQLite's integrity check of the whole file, on a read-only connection of its own; nothing
    /// for PostgreSQL or memory.
    pub async fn check_integrity(&self) -> Result<(), StoreError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let url = format!("sqlite://{}?mode=ro", file.display());
        let mut connection = AnyConnection::connect(&url)
            .await
            .map_err(|e| classify(&self.described, e))?;
        let checked = schema::integrity(&mut connection, &self.described).await;
        let _ = connection.close().await;
        checked
    }

    fn new_pool(&self) -> Result<AnyPool, StoreError> {
        self.options
            .clone()
            .connect_lazy(&self.connect)
            .map_err(|e| classify(&self.described, e))
    }

    /// Checks the database on a connection of its own that creates nothing (an existing SQLite
    /// file is opened `mode=rw`, which only reads, unless SQLite must roll back a transaction a
    /// crash left behind: its own recovery), then migrates it.
    async fn prepare(&self, pool: &AnyPool, integrity_check: bool) -> Result<(), StoreError> {
        let checking = match (&self.file, self.backend) {
            (Some(file), _) if file.metadata().is_ok_and(|m| m.len() > 0) => {
                Some(format!("sqlite://{}?mode=rw", file.display()))
            }
            (_, Backend::Postgres) => Some(self.connect.clone()),
            _ => None,
        };
        if let Some(url) = checking {
            let mut connection =
                tokio::time::timeout(OPERATION_TIMEOUT, AnyConnection::connect(&url))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!(
                            "{}: no connection within {} s",
                            self.described,
                            OPERATION_TIMEOUT.as_secs()
                        ))
                    })?
                    .map_err(|e| classify(&self.described, e))?;
            let migrations = migrations();
            let expected = schema::Expected {
                store: &self.described,
                migrations: &migrations,
                integrity_check,
            };
            let verified = schema::verify(&mut connection, self.backend, &expected).await;
            let _ = connection.close().await;
            verified?;
        }
        migrate(pool, &self.described).await
    }

    /// The pool, once the store is started.
    fn pool(&self) -> Result<&AnyPool, StoreError> {
        self.pool.get().ok_or_else(|| {
            let reason = crate::lock(&self.closed_because).clone();
            StoreError::Unavailable(format!(
                "{} is not open yet: {}",
                self.described,
                reason
                    .as_deref()
                    .unwrap_or("it could not be checked at start")
            ))
        })
    }

    async fn upsert_jobs(pool: &AnyPool, jobs: &[StoredJob]) -> Result<(), sqlx::Error> {
        let mut transaction = pool.begin().await?;
        for job in jobs {
            let document = serde_json::to_string(&job.document).expect("documents serialise");
            sqlx::query(
                "INSERT INTO jobs (id, node, state, request, cache_key, document, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
                 document = excluded.document, updated_at = excluded.updated_at",
            )
            .bind(&job.document.id)
            .bind(&job.node)
            .bind(job.document.state.label())
            .bind(&job.request)
            .bind(&job.cache_key)
            .bind(document)
            .bind(millis_of(&job.document.created_at))
            .bind(millis(OffsetDateTime::now_utc()))
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await
    }

    async fn take_over(
        pool: &AnyPool,
        node: &str,
        why: &Problem,
    ) -> Result<Recovered, sqlx::Error> {
        let mut transaction = pool.begin().await?;
        let rows = sqlx::query(&format!(
            "SELECT node, request, cache_key, document FROM jobs \
             WHERE node = $1 AND state IN {UNFINISHED} ORDER BY created_at"
        ))
        .bind(node)
        .fetch_all(&mut *transaction)
        .await?;
        let mut recovered = Recovered {
            interrupted: 0,
            queued: Vec::new(),
        };
        let now = OffsetDateTime::now_utc();
        for row in &rows {
            let mut job = stored_job(row).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            if job.document.state == JobState::Queued {
                recovered.queued.push(job);
                continue;
            }
            job.document.state = JobState::Interrupted;
            job.document.error = Some(why.clone());
            job.document.finished_at = Some(now.format(&Rfc3339).expect("UTC times format"));
            sqlx::query("UPDATE jobs SET state = $1, document = $2, updated_at = $3 WHERE id = $4")
                .bind(JobState::Interrupted.label())
                .bind(serde_json::to_string(&job.document).expect("documents serialise"))
                .bind(millis(now))
                .bind(&job.document.id)
                .execute(&mut *transaction)
                .await?;
            recovered.interrupted += 1;
        }
        transaction.commit().await?;
        Ok(recovered)
    }

    /// What `retention` no longer keeps, removed [`PRUNE_BATCH`] rows to a transaction: an
    /// interrupted prune keeps what it removed, and no transaction's journal outgrows a batch.
    async fn delete_old(pool: &AnyPool, retention: &Retention) -> Result<u64, StoreError> {
        let mut removed = Self::delete_in_batches(
            pool,
            &format!("SELECT id FROM jobs WHERE state NOT IN {UNFINISHED} AND updated_at < $1"),
            "DELETE FROM jobs WHERE id IN",
            age_limit(retention.max_age),
        )
        .await?;
        let offset = i64::try_from(retention.max_jobs).unwrap_or(i64::MAX);
        let cutoff: Option<i64> = timed(
            sqlx::query_scalar(&format!(
                "SELECT updated_at FROM jobs WHERE state NOT IN {UNFINISHED} \
                 ORDER BY updated_at DESC LIMIT 1 OFFSET $1"
            ))
            .bind(offset)
            .fetch_optional(pool),
        )
        .await?;
        if let Some(cutoff) = cutoff {
            removed += Self::delete_in_batches(
                pool,
                &format!(
                    "SELECT id FROM jobs WHERE state NOT IN {UNFINISHED} AND updated_at <= $1"
                ),
                "DELETE FROM jobs WHERE id IN",
                cutoff,
            )
            .await?;
        }
        removed += Self::delete_in_batches(
            pool,
            "SELECT cache_key FROM results WHERE measured_at < $1",
            "DELETE FROM results WHERE cache_key IN",
            age_limit(retention.result_ttl),
        )
        .await?;
        Ok(removed)
    }

    /// `delete (select LIMIT batch)` with `bound` as `$1`, each batch a statement (a transaction)
    /// of its own, timed as one operation, until a batch removes nothing.
    async fn delete_in_batches(
        pool: &AnyPool,
        select: &str,
        delete: &str,
        bound: i64,
    ) -> Result<u64, StoreError> {
        let statement = format!("{delete} ({select} LIMIT {PRUNE_BATCH})");
        let mut removed = 0;
        loop {
            let batch = timed(sqlx::query(&statement).bind(bound).execute(pool))
                .await?
                .rows_affected();
            removed += batch;
            if batch == 0 {
                return Ok(removed);
            }
        }
    }
}

#[async_trait]
impl Store for SqlStore {
    fn describe(&self) -> &str {
        &self.described
    }

    async fn check(&self) -> Result<(), StoreError> {
        let pool = self.pool()?;
        timed(sqlx::query("SELECT 1").execute(pool)).await.map(drop)
    }

    async fn save_jobs(&self, jobs: &[StoredJob]) -> Result<(), StoreError> {
        let pool = self.pool()?;
        timed(Self::upsert_jobs(pool, jobs)).await
    }

    async fn job(&self, id: Uuid) -> Result<Option<StoredJob>, StoreError> {
        let pool = self.pool()?;
        let row = timed(
            sqlx::query("SELECT node, request, cache_key, document FROM jobs WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(pool),
        )
        .await?;
        row.as_ref().map(stored_job).transpose()
    }

    async fn recent_jobs(&self, node: &str, limit: usize) -> Result<Vec<JobDocument>, StoreError> {
        let pool = self.pool()?;
        let documents: Vec<String> = timed(
            sqlx::query_scalar(
                "SELECT document FROM jobs WHERE node = $1 ORDER BY created_at DESC LIMIT $2",
            )
            .bind(node)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(pool),
        )
        .await?;
        documents
            .iter()
            .map(|d| serde_json::from_str(d).map_err(unavailable))
            .collect()
    }

    async fn recover(&self, node: &str, why: &Problem) -> Result<Recovered, StoreError> {
        let pool = self.pool()?;
        timed(Self::take_over(pool, node, why)).await
    }

    async fn save_result(&self, key: &str, result: &TuneAnswer) -> Result<(), StoreError> {
        let pool = self.pool()?;
        let measured_at = result
            .measured_at
            .as_deref()
            .map_or_else(|| millis(OffsetDateTime::now_utc()), millis_of);
        timed(
            sqlx::query(
                "INSERT INTO results (cache_key, result, measured_on, measured_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (cache_key) DO UPDATE SET \
                 result = excluded.result, measured_on = excluded.measured_on, \
                 measured_at = excluded.measured_at",
            )
            .bind(key)
            .bind(serde_json::to_string(result).expect("results serialise"))
            .bind(result.measured_on.clone().unwrap_or_default())
            .bind(measured_at)
            .execute(pool),
        )
        .await
        .map(drop)
    }

    async fn result(&self, key: &str, max_age: Duration) -> Result<Option<TuneAnswer>, StoreError> {
        let pool = self.pool()?;
        let text: Option<String> = timed(
            sqlx::query_scalar(
                "SELECT result FROM results WHERE cache_key = $1 AND measured_at >= $2",
            )
            .bind(key)
            .bind(age_limit(max_age))
            .fetch_optional(pool),
        )
        .await?;
        text.map(|t| serde_json::from_str(&t).map_err(unavailable))
            .transpose()
    }

    async fn prune(&self, retention: &Retention) -> Result<u64, StoreError> {
        let pool = self.pool()?;
        // Each statement is timed on its own: a large prune takes as long as it needs.
        Self::delete_old(pool, retention).await
    }

    async fn claim(&self, key: &str) -> Result<Option<Claim>, StoreError> {
        let pool = self.pool()?;
        if self.backend == Backend::Sqlite {
            return Ok(Some(Claim::local()));
        }
        let mut connection = timed(pool.acquire()).await?;
        let locked: bool = timed(
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({})", claim::LOCK_KEY))
                .bind(key)
                .fetch_one(&mut *connection),
        )
        .await?;
        Ok(locked.then(|| Claim::locked(connection, key.to_string())))
    }
}
