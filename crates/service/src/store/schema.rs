//! Whether a database is headroom's, whole, and of a schema this build knows: decided on a
//! connection that only reads, before anything is written to it.

use std::collections::BTreeSet;
use std::time::Instant;

use sqlx::migrate::Migration;
use sqlx::{AnyConnection, Row};

use super::StoreError;

/// SQLite's result codes for "not a database" and "damaged": a file headroom must not touch.
const SQLITE_NOTADB: &str = "26";
const SQLITE_CORRUPT: &str = "11";

/// Tells a database that is not one (or is damaged) from one that cannot be reached now.
pub fn classify(store: &str, error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error {
        if matches!(db.code().as_deref(), Some(SQLITE_NOTADB | SQLITE_CORRUPT)) {
            return StoreError::Corrupt {
                store: store.into(),
                detail: db.message().into(),
            };
        }
    }
    StoreError::Unavailable(format!("{store}: {error}"))
}

/// The tables headroom's migrations create, sqlx's own among them.
const OURS: [&str; 3] = ["_sqlx_migrations", "jobs", "results"];

/// The database behind a store URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (or memory).
    Sqlite,
    /// A PostgreSQL database; headroom's tables live in its current schema.
    Postgres,
}

/// What is checked before a database is used.
pub struct Expected<'a> {
    /// The store, its password hidden, for messages.
    pub store: &'a str,
    /// This build's migrations.
    pub migrations: &'a [Migration],
    /// Run SQLite's structural check (`PRAGMA quick_check`) over the whole file.
    pub integrity_check: bool,
}

/// Refuses a database that another application's tables, another migration history, a newer
/// headroom or damage make unsafe to write to. An empty database passes: it becomes headroom's.
pub async fn verify(
    connection: &mut AnyConnection,
    backend: Backend,
    expected: &Expected<'_>,
) -> Result<(), StoreError> {
    if backend == Backend::Sqlite && expected.integrity_check {
        integrity(connection, expected.store).await?;
    }
    let tables = tables(connection, backend, expected.store).await?;
    if tables.is_empty() {
        return Ok(());
    }
    let foreign: Vec<&str> = tables
        .iter()
        .map(String::as_str)
        .filter(|t| !OURS.contains(t))
        .collect();
    if !foreign.is_empty() {
        return Err(not_ours(
            expected.store,
            format!(
                "it has tables headroom does not create: {}",
                foreign.join(", ")
            ),
        ));
    }
    if !tables.contains("_sqlx_migrations") {
        return Err(not_ours(
            expected.store,
            format!(
                "it has {} but no migration history",
                tables.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    history(connection, expected).await
}

fn not_ours(store: &str, detail: String) -> StoreError {
    StoreError::NotHeadrooms {
        store: store.into(),
        detail,
    }
}

/// SQLite's own structural check of every page; logs how long it took.
pub async fn integrity(connection: &mut AnyConnection, store: &str) -> Result<(), StoreError> {
    let started = Instant::now();
    let findings: Vec<String> = sqlx::query_scalar("PRAGMA quick_check")
        .fetch_all(&mut *connection)
        .await
        .map_err(|e| classify(store, e))?;
    tracing::info!(
        store,
        seconds = started.elapsed().as_secs_f64(),
        "integrity check"
    );
    if findings.len() == 1 && findings[0] == "ok" {
        return Ok(());
    }
    let shown: Vec<String> = findings.into_iter().take(3).collect();
    Err(StoreError::Corrupt {
        store: store.into(),
        detail: format!("the integrity check found damage: {}", shown.join("; ")),
    })
}

async fn tables(
    connection: &mut AnyConnection,
    backend: Backend,
    store: &str,
) -> Result<BTreeSet<String>, StoreError> {
    let query = match backend {
        Backend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        }
        Backend::Postgres => {
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
             WHERE table_schema = current_schema()"
        }
    };
    let names: Vec<String> = sqlx::query_scalar(query)
        .fetch_all(&mut *connection)
        .await
        .map_err(|e| classify(store, e))?;
    Ok(names.into_iter().collect())
}

/// Every applied migration must be one of this build's, byte for byte; one past them means a
/// newer headroom wrote the database.
async fn history(
    connection: &mut AnyConnection,
    expected: &Expected<'_>,
) -> Result<(), StoreError> {
    let rows =
        sqlx::query("SELECT version, description, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut *connection)
            .await
            .map_err(|e| classify(expected.store, e))?;
    let newest = expected
        .migrations
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    for row in rows {
        let version: i64 = row.try_get(0).map_err(|e| classify(expected.store, e))?;
        let description: String = row.try_get(1).map_err(|e| classify(expected.store, e))?;
        let checksum: Vec<u8> = row.try_get(2).map_err(|e| classify(expected.store, e))?;
        if version > newest {
            return Err(StoreError::NewerSchema {
                store: expected.store.into(),
                version,
            });
        }
        let known = expected.migrations.iter().find(|m| m.version == version);
        if !known.is_some_and(|m| m.description == description && *m.checksum == *checksum) {
            return Err(not_ours(
                expected.store,
                format!("its migration {version} (\"{description}\") is not headroom's"),
            ));
        }
    }
    Ok(())
}
