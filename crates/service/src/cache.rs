//! Finished results, reused for an identical normalised job on an identical device: a bounded
//! cache (moka) in front of the store, with a time to live and a capacity from the config.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use std::sync::{Arc, LazyLock};

use axum::body::Bytes;

use moka::sync::Cache;
use moka::Expiry;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::store::journal::{Direction, Journal, StoreHealth};
use super::store::Store;
use crate::answer::TuneAnswer;
use headroom_devices::cuda::kernel::Family;
use headroom_engine::job::Job;

/// The kernel sources and crate version: a result is only reused by the same code. Hashed
/// once per process, not per request.
fn code_version() -> u64 {
    static VERSION: LazyLock<u64> = LazyLock::new(|| {
        let mut hasher = DefaultHasher::new();
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        for family in Family::ALL {
            family.source().hash(&mut hasher);
        }
        hasher.finish()
    });
    *VERSION
}

/// A reusable answer, marked `cached`, with its JSON serialised once when it was kept: a
/// cache hit sends these bytes as they are.
pub struct Cached {
    /// The answer, `cached: true`.
    pub answer: TuneAnswer,
    /// `answer` as JSON.
    pub json: Bytes,
}

impl Cached {
    fn new(result: TuneAnswer) -> Arc<Cached> {
        let answer = TuneAnswer {
            cached: true,
            ..result
        };
        let json = serde_json::to_vec(&answer)
            .expect("answers serialise")
            .into();
        Arc::new(Cached { answer, json })
    }
}

/// The job with every default filled in, as the cache key holds it.
pub fn normalised(job: &Job) -> String {
    serde_json::to_string(job).expect("jobs serialise")
}

/// The cache key: the [`normalised`] job, and the device's identity.
pub fn key(normalised: &str, device_identity: &str) -> String {
    format!("{device_identity}|{:016x}|{normalised}", code_version())
}

/// The store behind the in-memory cache: where results are kept across restarts and shared
/// between nodes.
pub struct SharedResults {
    /// Where results are read.
    pub store: Arc<dyn Store>,
    /// Where results are written, in order, off the request path.
    pub journal: Journal,
    /// Where a failed read is noted.
    pub health: Arc<StoreHealth>,
}

/// Results by key, each reused for the TTL after it was measured: at most `capacity` of them in
/// memory, every one in the store.
pub struct ResultCache {
    ttl: Duration,
    entries: Option<Cache<String, Arc<Cached>>>,
    shared: Option<SharedResults>,
}

/// Expires an entry when its result turns `ttl` old: a result read from the store, measured
/// elsewhere a while ago, lives only what is left of its time.
struct UntilStale {
    ttl: Duration,
}

impl Expiry<String, Arc<Cached>> for UntilStale {
    fn expire_after_create(
        &self,
        _key: &String,
        cached: &Arc<Cached>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let measured = cached
            .answer
            .measured_at
            .as_deref()
            .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok());
        let age = measured.map_or(Duration::ZERO, |at| {
            (OffsetDateTime::now_utc() - at)
                .try_into()
                .unwrap_or(Duration::ZERO)
        });
        Some(self.ttl.saturating_sub(age))
    }
}

impl ResultCache {
    /// A cache whose results live `ttl` (zero: nothing is kept), at most `capacity` of them in
    /// memory, backed by `shared` when given.
    pub fn new(ttl: Duration, capacity: u64, shared: Option<SharedResults>) -> ResultCache {
        let entries = (!ttl.is_zero() && capacity > 0).then(|| {
            Cache::builder()
                .expire_after(UntilStale { ttl })
                .max_capacity(capacity)
                .build()
        });
        ResultCache {
            ttl,
            entries,
            shared: shared.filter(|_| !ttl.is_zero()),
        }
    }

    /// The live result for `key`, marked as cached: from memory, else from the store.
    pub async fn get(&self, key: &str) -> Option<Arc<Cached>> {
        match self.entries.as_ref().and_then(|e| e.get(key)) {
            Some(cached) => Some(cached),
            None => {
                let shared = self
                    .shared
                    .as_ref()
                    .filter(|s| !s.health.failing(Direction::Read))?;
                let found = shared.store.result(key, self.ttl).await;
                shared.health.record(Direction::Read, "read_result", &found);
                let cached = Cached::new(found.ok().flatten()?);
                if let Some(entries) = &self.entries {
                    entries.insert(key.to_string(), Arc::clone(&cached));
                }
                Some(cached)
            }
        }
    }

    /// Keeps `result` under `key`, in memory and in the store.
    pub fn insert(&self, key: String, result: TuneAnswer) {
        if let Some(entries) = &self.entries {
            entries.insert(key.clone(), Cached::new(result.clone()));
        }
        if let Some(shared) = &self.shared {
            shared.journal.result(key, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use headroom_engine::device::{DeviceInfo, DeviceKind};
    use headroom_engine::plan::MemoryBreakdown;
    use headroom_engine::result::LimitedBy;

    fn result(max: u64) -> TuneAnswer {
        TuneAnswer {
            result: headroom_engine::TuneResult {
                max_batch_size: max,
                recommended_batch_size: max,
                recommended_tokens: None,
                headroom: 1.0,
                precision: Default::default(),
                precision_note: None,
                framework: Default::default(),
                fsdp_world_size: None,
                fsdp_reshard_after_forward: None,
                throughput_batch_size: max,
                throughput_knee: None,
                throughput_fit: None,
                throughput_note: None,
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
            },
            cached: false,
            measured_on: None,
            measured_at: None,
        }
    }

    fn get(cache: &ResultCache, key: &str) -> Option<TuneAnswer> {
        let cached = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(cache.get(key))?;
        let sent: TuneAnswer = serde_json::from_slice(&cached.json).unwrap();
        assert_eq!(sent, cached.answer, "the kept bytes are the answer");
        Some(cached.answer.clone())
    }

    #[test]
    fn entries_are_reused_marked_cached_and_bounded() {
        let cache = ResultCache::new(Duration::from_secs(60), 8, None);
        cache.insert("a".into(), result(1));
        let hit = get(&cache, "a").unwrap();
        assert!(hit.cached && hit.max_batch_size == 1);
        assert!(get(&cache, "b").is_none());
        for i in 0..1000 {
            cache.insert(format!("k{i}"), result(i));
        }
        let entries = cache.entries.as_ref().unwrap();
        entries.run_pending_tasks();
        assert!(entries.entry_count() <= 8, "{}", entries.entry_count());
    }

    #[test]
    fn a_zero_ttl_keeps_nothing() {
        let cache = ResultCache::new(Duration::ZERO, 8, None);
        cache.insert("a".into(), result(1));
        assert!(get(&cache, "a").is_none());
    }

    #[test]
    fn a_result_lives_what_is_left_of_its_time_since_it_was_measured() {
        let cache = ResultCache::new(Duration::from_secs(60), 8, None);
        let measured = |seconds_ago: i64| TuneAnswer {
            measured_at: Some(
                (OffsetDateTime::now_utc() - time::Duration::seconds(seconds_ago))
                    .format(&Rfc3339)
                    .unwrap(),
            ),
            ..result(1)
        };
        cache.insert("recent".into(), measured(10));
        cache.insert("stale".into(), measured(61));
        assert!(get(&cache, "recent").is_some());
        assert!(get(&cache, "stale").is_none());
    }
}
