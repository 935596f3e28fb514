//! The store over real SQLite files and a real PostgreSQL: the contract both backends keep, and
//! `headroom serve` across a kill, a restart, a shared database, a soak and store faults.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::thread;
use std::time::{Duration, Instant};

use headroom_devices::select::DeviceSpec;
use headroom_service::answer::TuneAnswer;
use headroom_service::document::{JobDocument, JobState, Progress};
use headroom_service::problem::Problem;
use headroom_service::store::{sql, Retention, Store, StoredJob};
use serde_json::json;
use support::postgres::Postgres;
use support::store::{
    block_on, probes, quick_job, readiness, refused_start, serve, slow_job, wait_for_store,
    UnprivilegedStore,
};
use support::ServerProcess;

fn document(id: &str, state: JobState, created_at: &str, probes: usize) -> JobDocument {
    let probe = json!({"batch_size": 16, "outcome": "fit", "step_seconds": 0.001,
                       "samples_per_second": 16000.0, "device_bytes": 1024});
    JobDocument {
        id: id.into(),
        state,
        device: DeviceSpec::Host,
        model: "MLP 1x28x28-128-10 relu, sgd, 32-true, pytorch".into(),
        request: json!({"model": {"input_shape": [1, 28, 28]}}),
        queue_position: None,
        progress: Progress {
            probes: vec![serde_json::from_value(probe).unwrap(); probes],
        },
        result: None,
        error: None,
        created_at: created_at.into(),
        started_at: None,
        finished_at: None,
    }
}

fn stored(node: &str, document: JobDocument) -> StoredJob {
    StoredJob {
        node: node.into(),
        request: json!({"model": {"input_shape": [4], "num_classes": 2}}).to_string(),
        cache_key: format!("key of {}", document.id),
        document,
    }
}

/// A result as the service keeps it, measured `hours_ago`.
fn result(hours_ago: i64) -> TuneAnswer {
    let measured_at = time::OffsetDateTime::now_utc() - time::Duration::hours(hours_ago);
    serde_json::from_value(json!({
        "max_batch_size": 4096, "recommended_batch_size": 3272, "headroom": 0.8,
        "throughput_batch_size": 1024, "throughput": [], "limited_by": "memory",
        "predicted_max_batch_size": 4100,
        "device": {"kind": "host", "index": 0, "name": "host", "total_bytes": 1, "free_bytes": 1},
        "memory": {"parameters": 1, "gradients": 1, "optimizer_state": 0, "batch_data": 1,
                   "activations": 1, "total": 4},
        "probes": [], "elapsed_seconds": 0.5, "measured_on": "node-a/host",
        "measured_at": measured_at.format(&time::format_description::well_known::Rfc3339).unwrap(),
    }))
    .unwrap()
}

fn id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// What every backend must do alike: keep jobs and results, hand a restarted node its jobs,
/// and enforce retention.
fn keeps_the_contract(store: &dyn Store) {
    let jobs = [
        stored(
            "node-a",
            document(&id(1), JobState::Queued, "2026-11-01T00:00:01Z", 0),
        ),
        stored(
            "node-a",
            document(&id(2), JobState::Running, "2026-11-01T00:00:02Z", 3),
        ),
        stored(
            "node-b",
            document(&id(3), JobState::Running, "2026-11-01T00:00:03Z", 1),
        ),
        stored(
            "node-a",
            document(&id(4), JobState::Succeeded, "2026-01-01T00:00:00Z", 5),
        ),
    ];
    block_on(async {
        store.save_jobs(&jobs).await.unwrap();
        // A later write of a job replaces it.
        let mut probed = jobs[1].clone();
        probed
            .document
            .progress
            .probes
            .push(probed.document.progress.probes[0].clone());
        store.save_jobs(&[probed]).await.unwrap();
        let read = store.job(id(2).parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(read.document.progress.probes.len(), 4);
        assert_eq!(read.request, jobs[1].request);
        assert!(store.job(id(9).parse().unwrap()).await.unwrap().is_none());

        let recent = store.recent_jobs("node-a", 10).await.unwrap();
        let ids: Vec<&str> = recent.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, [id(2), id(1), id(4)]);

        let why = Problem::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopped");
        let recovered = store.recover("node-a", &why).await.unwrap();
        assert_eq!(recovered.interrupted, 1);
        assert_eq!(recovered.queued, [jobs[0].clone()]);
        let interrupted = store.job(id(2).parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(interrupted.document.state, JobState::Interrupted);
        assert_eq!(
            interrupted.document.progress.probes.len(),
            4,
            "its probes are kept"
        );
        assert_eq!(interrupted.document.error, Some(why));
        let other_node = store.job(id(3).parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(
            other_node.document.state,
            JobState::Running,
            "another node's job is its own"
        );

        store.save_result("fresh", &result(0)).await.unwrap();
        store.save_result("stale", &result(5)).await.unwrap();
        let hour = Duration::from_secs(3600);
        let fresh = store.result("fresh", hour).await.unwrap().unwrap();
        assert_eq!(fresh.max_batch_size, 4096);
        assert_eq!(fresh.measured_on.as_deref(), Some("node-a/host"));
        assert!(store.result("stale", hour).await.unwrap().is_none());
        assert!(store.result("stale", 6 * hour).await.unwrap().is_some());

        // Retention: jobs by age and count (unfinished ones stay), results by age.
        let retention = Retention {
            max_age: Duration::from_secs(30 * 86_400),
            max_jobs: 1,
            result_ttl: hour,
        };
        // The newest finished job, a few milliseconds after the others.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let newest = document(&id(5), JobState::Failed, "2026-11-02T00:00:00Z", 0);
        store.save_jobs(&[stored("node-a", newest)]).await.unwrap();
        let removed = store.prune(&retention).await.unwrap();
        assert!(removed >= 2, "{removed}");
        let left: Vec<String> = store
            .recent_jobs("node-a", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|d| format!("{} {}", d.id, d.state.label()))
            .collect();
        assert_eq!(
            left,
            [format!("{} failed", id(5)), format!("{} queued", id(1))]
        );
        assert!(store.result("stale", 6 * hour).await.unwrap().is_none());
        assert!(store.result("fresh", hour).await.unwrap().is_some());
    });
}

#[test]
fn sqlite_keeps_the_store_contract_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/nested/headroom.db", dir.path().display());
    let store = block_on(sql::open(&url)).unwrap();
    keeps_the_contract(&store);
    drop(store);
    let again = block_on(sql::open(&url)).unwrap();
    assert!(block_on(again.job(id(1).parse().unwrap()))
        .unwrap()
        .is_some());
}

/// `headroom serve --store URL` keeps jobs where the flag says, over the environment's store.
#[test]
fn the_store_flag_names_where_jobs_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flagged.db");
    let url = format!("sqlite://{}", file.display());
    let mut command = support::headroom();
    command
        .args([
            "serve",
            "--device",
            "host",
            "--host-memory",
            "64MiB",
            "--store",
            &url,
        ])
        .env("HEADROOM_STORE", "sqlite::memory:")
        .env("HEADROOM_NODE_NAME", "node-a");
    let server = ServerProcess::start(command);
    assert_eq!(readiness(&server)["store"]["location"], url.as_str());
    let answer = server.http.tune(&quick_job(8), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    drop(server);
    let kept = block_on(sql::open(&url)).unwrap();
    assert_eq!(block_on(kept.recent_jobs("node-a", 10)).unwrap().len(), 1);
}

/// Retention removes old jobs a batch to a transaction: a prune interrupted part way (a kill,
/// a timeout) keeps what it removed, where one statement for all of them removed nothing until
/// it finished, and left a journal as large as everything it removed when it did not.
#[test]
fn an_interrupted_prune_keeps_what_it_removed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/headroom.db", dir.path().display());
    let store = std::sync::Arc::new(block_on(sql::open(&url)).unwrap());
    let jobs = 30_000;
    let count = "SELECT COUNT(*) FROM jobs";
    let observer = block_on(async {
        let pool = sqlx_sqlite::SqlitePool::connect(&url).await.unwrap();
        let mut transaction = pool.begin().await.unwrap();
        for n in 0..jobs {
            sqlx::query(
                "INSERT INTO jobs (id, node, state, request, cache_key, document, created_at, updated_at) \
                 VALUES ($1, 'node-a', 'succeeded', '{}', 'key', '{}', 0, 0)",
            )
            .bind(format!("job-{n}"))
            .execute(&mut *transaction)
            .await
            .unwrap();
        }
        transaction.commit().await.unwrap();
        pool
    });
    let retention = Retention {
        max_age: Duration::from_secs(3600),
        max_jobs: 100_000,
        result_ttl: Duration::from_secs(3600),
    };
    let left = block_on(async {
        let pruning = {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move { store.prune(&retention).await })
        };
        // Interrupted as soon as another connection sees a job gone.
        loop {
            let left: i64 = sqlx::query_scalar(count)
                .fetch_one(&observer)
                .await
                .unwrap();
            if left < jobs || pruning.is_finished() {
                pruning.abort();
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let _ = pruning.await;
        sqlx::query_scalar::<_, i64>(count)
            .fetch_one(&observer)
            .await
            .unwrap()
    });
    assert!(0 < left && left < jobs, "{left} of {jobs} jobs left");
}

#[test]
fn postgres_keeps_the_store_contract_and_reopens() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let store = block_on(sql::open(&postgres.url())).unwrap();
    assert!(!store.describe().is_empty());
    keeps_the_contract(&store);
    drop(store);
    let again = block_on(sql::open(&postgres.url())).unwrap();
    assert!(block_on(again.job(id(1).parse().unwrap()))
        .unwrap()
        .is_some());
}

#[test]
fn a_kill_during_a_tune_leaves_it_interrupted_and_the_restart_runs_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/headroom.db", dir.path().display());
    let mut first = serve(&store, "node-a", &[]);
    let answer = first.http.tune(&quick_job(8), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let measured = answer.body;

    let running = first
        .http
        .tune(&slow_job(128), &[("Prefer", "respond-async")]);
    let running_id = running.body["id"].as_str().unwrap().to_string();
    let queued = first
        .http
        .tune(&quick_job(16), &[("Prefer", "respond-async")]);
    assert_eq!(queued.status, 202, "{}", queued.body);
    let queued_id = queued.body["id"].as_str().unwrap().to_string();
    // Kill once the running job has a probe in the store.
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.http.get(&format!("/jobs/{running_id}")).1["progress"]["probes"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(Instant::now() < deadline, "no probe ran");
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    first.kill();

    let second = serve(&store, "node-a", &[]);
    let interrupted = second.http.wait_for(&running_id);
    assert_eq!(interrupted["state"], "interrupted", "{interrupted}");
    assert!(
        !interrupted["progress"]["probes"]
            .as_array()
            .unwrap()
            .is_empty(),
        "the probes it had are kept: {interrupted}"
    );
    assert_eq!(interrupted["error"]["title"], "Interrupted");
    let rerun = second.http.wait_for(&queued_id);
    assert_eq!(rerun["state"], "succeeded", "{rerun}");

    let probes_before = probes(&second);
    let again = second.http.tune(&quick_job(8), &[]);
    assert_eq!(again.status, 200);
    assert_eq!(again.body["cached"], true, "{}", again.body);
    assert_eq!(again.body["max_batch_size"], measured["max_batch_size"]);
    assert_eq!(again.body["measured_on"], "node-a/host");
    assert_eq!(probes(&second), probes_before, "a cache hit runs no probe");
    let (_, listed) = second.http.get("/jobs");
    let listed: HashSet<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert!(listed.contains(running_id.as_str()) && listed.contains(queued_id.as_str()));
}

/// The last answer's gauges of a device, by model.
fn last_answers(server: &ServerProcess) -> BTreeMap<String, (f64, f64)> {
    let exposition = server.http.get_text("/metrics");
    let gauge = |name: &str, line: &str| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let model = rest.split(",model=\"").nth(1)?.split('"').next()?;
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        Some((model.to_string(), value))
    };
    let mut answers = BTreeMap::new();
    for line in exposition.lines() {
        if let Some((model, max)) = gauge("headroom_last_max_batch_size", line) {
            answers.entry(model).or_insert((0.0, 0.0)).0 = max;
        }
        if let Some((model, recommended)) = gauge("headroom_last_recommended_batch_size", line) {
            answers.entry(model).or_insert((0.0, 0.0)).1 = recommended;
        }
    }
    answers
}

/// A node restarted over a store that holds its answers shows them on the dashboard at once,
/// and a node answering from the results another node measured shows those it serves.
#[test]
fn the_last_answers_survive_a_restart_and_are_set_by_cached_answers() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/headroom.db", dir.path().display());
    let mut first = serve(&store, "node-a", &[]);
    for width in [8, 16] {
        let answer = first.http.tune(&quick_job(width), &[]);
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let before = last_answers(&first);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before
        .values()
        .all(|&(max, recommended)| max >= recommended && recommended > 0.0));
    first.terminate();

    let restarted = serve(&store, "node-a", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while last_answers(&restarted) != before {
        assert!(
            Instant::now() < deadline,
            "{:?} against {before:?}",
            last_answers(&restarted)
        );
        thread::sleep(Duration::from_millis(50));
    }
    drop(restarted);

    // Another node over the same store has no answers of its own until it serves one from the
    // results: then it shows that one.
    let other = serve(&store, "node-b", &[]);
    assert!(last_answers(&other).is_empty());
    let cached = other.http.tune(&quick_job(16), &[]);
    assert_eq!(cached.body["cached"], true, "{}", cached.body);
    let shown = last_answers(&other);
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(
        shown.values().next().unwrap().0,
        cached.body["max_batch_size"].as_f64().unwrap()
    );
}

#[test]
fn two_nodes_sharing_postgres_tune_a_job_once() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let first = serve(&postgres.url(), "node-a", &[]);
    let second = serve(&postgres.url(), "node-b", &[]);
    let job = quick_job(32);
    let measured = first.http.tune(&job, &[]);
    assert_eq!(measured.status, 200, "{}", measured.body);
    assert!(measured.body.get("cached").is_none());

    let shared = second.http.tune(&job, &[]);
    assert_eq!(shared.status, 200, "{}", shared.body);
    assert_eq!(shared.body["cached"], true, "{}", shared.body);
    assert_eq!(shared.body["measured_on"], "node-a/host");
    assert_eq!(shared.body["measured_at"], measured.body["measured_at"]);
    assert_eq!(
        shared.body["max_batch_size"],
        measured.body["max_batch_size"]
    );
    assert_eq!(probes(&second), 0.0, "node-b ran no probe");

    // The same job's record is readable from the other node.
    let (_, jobs) = first.http.get("/jobs");
    let id = jobs[0]["id"].as_str().unwrap();
    let (status, seen) = second.http.get(&format!("/jobs/{id}"));
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["state"], "succeeded");

    // With sharing off, a node tunes for itself.
    let private = serve(
        &postgres.url(),
        "node-c",
        &[("HEADROOM_SHARE_RESULTS", "false")],
    );
    let own = private.http.tune(&job, &[]);
    assert!(own.body.get("cached").is_none(), "{}", own.body);
    assert!(probes(&private) > 0.0);
}

/// A small deterministic generator for the soak's choices.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Submits `count` distinct jobs (widths from `first`), cancelling about one in five; returns
/// the accepted ids and how many submissions met a full queue.
fn submit(server: &ServerProcess, first: u64, count: u64, rng: &mut Lcg) -> (Vec<String>, u32) {
    let mut accepted = Vec::new();
    let mut full = 0;
    for width in first..first + count {
        let answer = loop {
            let answer = server
                .http
                .tune(&quick_job(width), &[("Prefer", "respond-async")]);
            if answer.status != 429 {
                break answer;
            }
            full += 1;
            thread::sleep(Duration::from_millis(50));
        };
        assert!(matches!(answer.status, 200 | 202), "{}", answer.body);
        let id = answer.body["id"].as_str().unwrap().to_string();
        if rng.below(5) == 0 {
            let (status, body) = server.http.delete(&format!("/jobs/{id}"));
            assert!(matches!(status, 202 | 409), "{status} {body}");
        }
        accepted.push(id);
    }
    (accepted, full)
}

#[test]
fn a_soak_with_cancels_and_a_kill_loses_and_duplicates_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/headroom.db", dir.path().display());
    let env = [
        ("HEADROOM_QUEUE_LENGTH", "64"),
        ("HEADROOM_JOB_HISTORY", "1000"),
    ];
    let started = Instant::now();
    let mut rng = Lcg(7);
    let mut first = serve(&store, "soak", &env);
    let (mut accepted, mut full) = submit(&first, 1, 150, &mut rng);
    first.kill();
    let second = serve(&store, "soak", &env);
    let (more, more_full) = submit(&second, 151, 150, &mut rng);
    accepted.extend(more);
    full += more_full;

    let mut states: BTreeMap<String, u32> = BTreeMap::new();
    for id in &accepted {
        let job = second.http.wait_for(id);
        *states
            .entry(job["state"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(
        unique.len(),
        accepted.len(),
        "every accepted job has its own id"
    );
    let (_, listed) = second.http.get("/jobs");
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    let listed_unique: HashSet<&str> = listed.iter().copied().collect();
    assert_eq!(listed_unique.len(), listed.len(), "no job is listed twice");
    for id in &accepted {
        assert!(listed_unique.contains(id.as_str()), "{id} is not listed");
    }
    assert_eq!(states.values().sum::<u32>() as usize, accepted.len());
    assert!(
        states.get("interrupted").copied().unwrap_or(0) <= 1,
        "{states:?}"
    );
    eprintln!(
        "soak: {} jobs accepted over one kill and restart, {full} submissions met a full queue, \
         terminal states {states:?}, {} listed, {:.1} s",
        accepted.len(),
        listed.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_store_made_read_only_degrades_the_service_and_tuning_goes_on() {
    let store = UnprivilegedStore::new();
    let mut server = store.serve("read-only");
    assert_eq!(server.http.tune(&quick_job(8), &[]).status, 200);
    assert_eq!(readiness(&server)["status"], "ready");

    store.set_writable(false);
    let answer = server.http.tune(&quick_job(9), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let degraded = wait_for_store(&server, false);
    assert_eq!(degraded["status"], "degraded");
    assert!(
        degraded["store"]["problem"].as_str().is_some(),
        "{degraded}"
    );
    let exposition = server.http.get_text("/metrics");
    assert!(
        exposition.contains("headroom_store_errors_total{operation=\"save_jobs\"}"),
        "{exposition}"
    );
    assert!(
        server.log().contains("the store failed"),
        "{}",
        server.log()
    );
    let (_, jobs) = server.http.get("/jobs");
    let during = jobs[0]["id"].as_str().unwrap().to_string();

    store.set_writable(true);
    assert_eq!(wait_for_store(&server, true)["status"], "ready");
    assert!(server.log().contains("the store works again"));
    server.kill();
    let after = serve(&store.url(), "read-only", &[]);
    let (status, job) = after.http.get(&format!("/jobs/{during}"));
    assert_eq!(
        status, 200,
        "the job run while the store was read-only was kept: {job}"
    );
    assert_eq!(job["state"], "succeeded");
}

#[test]
fn postgres_stopped_mid_run_degrades_the_service_until_it_returns() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let mut server = serve(&postgres.url(), "node-a", &[]);
    assert_eq!(server.http.tune(&quick_job(8), &[]).status, 200);
    postgres.stop();
    for width in [9, 10] {
        let answer = server.http.tune(&quick_job(width), &[]);
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert!(answer.body.get("cached").is_none());
    }
    let degraded = wait_for_store(&server, false);
    assert_eq!(degraded["status"], "degraded");
    let (_, jobs) = server.http.get("/jobs");
    let during = jobs[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        server.http.get(&format!("/jobs/{during}")).0,
        200,
        "served from memory"
    );
    assert!(server.log().contains("the store failed"));

    postgres.restart();
    wait_for_store(&server, true);
    let other = serve(&postgres.url(), "node-b", &[]);
    let (status, job) = other.http.get(&format!("/jobs/{during}"));
    assert_eq!(status, 200, "written once PostgreSQL was back: {job}");
    assert_eq!(job["state"], "succeeded");
}

#[test]
fn a_garbage_or_newer_database_stops_the_server_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&garbage, &bytes).unwrap();
    let stderr = refused_start(&format!("sqlite://{}", garbage.display()));
    assert!(
        stderr.contains(&garbage.display().to_string()) && stderr.contains("left untouched"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&garbage).unwrap(), bytes);

    let newer = dir.path().join("newer.db");
    let url = format!("sqlite://{}", newer.display());
    block_on(async {
        drop(sql::open(&url).await.unwrap());
        let pool = sqlx_sqlite::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (29991231000000, 'from a newer headroom', TRUE, X'00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    });
    let before = std::fs::read(&newer).unwrap();
    let stderr = refused_start(&url);
    assert!(
        stderr.contains("newer headroom") && stderr.contains(&newer.display().to_string()),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&newer).unwrap(), before);
}
