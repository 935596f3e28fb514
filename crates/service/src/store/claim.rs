//! A claim on tuning one job: on PostgreSQL, a session advisory lock on the job's cache key,
//! held by one pooled connection for as long as the tune runs. The database frees it when the
//! claim is released, or when the connection closes: a node that dies frees its claims.

use sqlx::pool::PoolConnection;
use sqlx::Any;

/// The lock's key: PostgreSQL's own 64-bit hash of the cache key, the same on every node.
pub const LOCK_KEY: &str = "hashtextextended($1, 0)";

/// The right to tune one job until released.
pub struct Claim {
    held: Option<(PoolConnection<Any>, String)>,
}

impl Claim {
    /// A claim no other node can contend for (a store only this node uses).
    pub fn local() -> Claim {
        Claim { held: None }
    }

    /// Whether no other node could contend for it.
    pub fn is_local(&self) -> bool {
        self.held.is_none()
    }

    /// A claim held by `connection`'s advisory lock on `key`.
    pub fn locked(connection: PoolConnection<Any>, key: String) -> Claim {
        Claim {
            held: Some((connection, key)),
        }
    }

    /// Frees the claim for the other nodes; the connection goes back to the pool, or is closed
    /// (freeing the lock all the same) when unlocking fails.
    pub async fn release(mut self) {
        if let Some((mut connection, key)) = self.held.take() {
            let unlocked = sqlx::query(&format!("SELECT pg_advisory_unlock({LOCK_KEY})"))
                .bind(key)
                .execute(&mut *connection)
                .await;
            if unlocked.is_err() {
                drop(connection.detach());
            }
        }
    }
}

impl Drop for Claim {
    /// A claim dropped unreleased closes its connection, which frees the lock.
    fn drop(&mut self) {
        if let Some((connection, _)) = self.held.take() {
            drop(connection.detach());
        }
    }
}
