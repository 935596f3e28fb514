//! Finished results, reused for an identical normalised job on an identical device: a bounded
//! cache (moka) with a time to live and a capacity from the config.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use moka::sync::Cache;

use crate::device::cuda::kernel::Family;
use crate::job::Job;
use crate::result::TuneResult;

/// The kernel sources and crate version: a result is only reused by the same code.
fn code_version() -> u64 {
    let mut hasher = DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    for family in Family::ALL {
        family.source().hash(&mut hasher);
    }
    hasher.finish()
}

/// The cache key: the job with every default filled in, and the device's identity.
pub fn key(job: &Job, device_identity: &str) -> String {
    let normalised = serde_json::to_string(job).expect("jobs serialise");
    format!("{device_identity}|{:016x}|{normalised}", code_version())
}

/// Results by key, each kept for the TTL, at most `capacity` of them.
pub struct ResultCache {
    entries: Option<Cache<String, TuneResult>>,
}

impl ResultCache {
    /// A cache whose entries live `ttl` (zero: nothing is kept), at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: u64) -> ResultCache {
        let entries = (!ttl.is_zero() && capacity > 0).then(|| {
            Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .build()
        });
        ResultCache { entries }
    }

    /// The live result for `key`, marked as cached.
    pub fn get(&self, key: &str) -> Option<TuneResult> {
        let result = self.entries.as_ref()?.get(key)?;
        Some(TuneResult {
            cached: true,
            ..result
        })
    }

    /// Keeps `result` under `key`.
    pub fn insert(&self, key: String, result: TuneResult) {
        if let Some(entries) = &self.entries {
            entries.insert(key, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceInfo, DeviceKind};
    use crate::plan::MemoryBreakdown;
    use crate::result::LimitedBy;

    fn result(max: u64) -> TuneResult {
        TuneResult {
            max_batch_size: max,
            recommended_batch_size: max,
            headroom: 1.0,
            throughput_batch_size: max,
            throughput: vec![],
            accumulation: None,
            limited_by: LimitedBy::Memory,
            predicted_max_batch_size: max,
            device: DeviceInfo {
                kind: DeviceKind::Host,
                index: 0,
                name: "host".into(),
                uuid: None,
                total_bytes: 1,
                free_bytes: 1,
            },
            memory: MemoryBreakdown::default(),
            probes: vec![],
            elapsed_seconds: 0.0,
            cached: false,
        }
    }

    #[test]
    fn entries_are_reused_marked_cached_and_bounded() {
        let cache = ResultCache::new(Duration::from_secs(60), 8);
        cache.insert("a".into(), result(1));
        let hit = cache.get("a").unwrap();
        assert!(hit.cached && hit.max_batch_size == 1);
        assert!(cache.get("b").is_none());
        for i in 0..1000 {
            cache.insert(format!("k{i}"), result(i));
        }
        let entries = cache.entries.as_ref().unwrap();
        entries.run_pending_tasks();
        assert!(entries.entry_count() <= 8, "{}", entries.entry_count());
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let cache = ResultCache::new(Duration::ZERO, 8);
        cache.insert("a".into(), result(1));
        assert!(cache.get("a").is_none());
    }
}
