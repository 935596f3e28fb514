//! Finished results, reused for an identical normalised job on an identical device.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::job::Job;
use crate::result::TuneResult;

/// The kernel sources and crate version: a result is only reused by the same code.
fn code_version() -> u64 {
    let mut hasher = DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    for family in crate::device::cuda::kernel::Family::ALL {
        family.source().hash(&mut hasher);
    }
    hasher.finish()
}

/// The cache key: the job with every default filled in, and the device's identity.
pub fn key(job: &Job, device_identity: &str) -> String {
    let normalised = serde_json::to_string(job).expect("jobs serialise");
    format!("{device_identity}|{:016x}|{normalised}", code_version())
}

/// Results by key, each kept for the TTL.
pub struct ResultCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, TuneResult)>>,
}

impl ResultCache {
    /// A cache whose entries live `ttl` (zero: nothing is kept).
    pub fn new(ttl: Duration) -> ResultCache {
        ResultCache {
            ttl,
            entries: Mutex::default(),
        }
    }

    /// The live result for `key`, marked as cached.
    pub fn get(&self, key: &str) -> Option<TuneResult> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
        entries.get(key).map(|(_, result)| TuneResult {
            cached: true,
            ..result.clone()
        })
    }

    /// Keeps `result` under `key`.
    pub fn insert(&self, key: String, result: TuneResult) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert(key, (Instant::now(), result));
    }
}
