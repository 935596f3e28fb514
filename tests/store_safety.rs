//! The store on a bad day, over real SQLite files, a real PostgreSQL and real server processes:
//! a database that is not headroom's or is damaged is refused and left byte for byte as it was;
//! a restart while the store is unavailable starts degraded and takes the store over when it
//! returns; a 202 is only given for a job the store holds; and nodes sharing PostgreSQL tune a
//! job once between them, even when the node tuning it dies.

mod support;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use headroom_service::store::sql;
use support::postgres::Postgres;
use support::store::{
    block_on, probes, quick_job, readiness, refused_start, serve, slow_job, wait_for_store,
    UnprivilegedStore,
};
use support::ServerProcess;

/// A SQLite file made by `statements` (on a connection of its own, closed after).
fn sqlite_file(path: &Path, statements: &[&str]) {
    let url = format!("sqlite://{}?mode=rwc", path.display());
    block_on(async {
        let pool = sqlx_sqlite::SqlitePool::connect(&url).await.unwrap();
        for statement in statements {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        pool.close().await;
    });
}

/// Starting on `file` is refused with a message naming it and saying `said`; the file's bytes
/// are unchanged.
fn refused_untouched(file: &Path, said: &str) {
    let before = std::fs::read(file).unwrap();
    let stderr = refused_start(&format!("sqlite://{}", file.display()));
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains(said),
        "{stderr}"
    );
    assert!(stderr.contains("left untouched"), "{stderr}");
    assert_eq!(
        std::fs::read(file).unwrap(),
        before,
        "{} changed",
        file.display()
    );
    for suffix in ["-wal", "-journal"] {
        let side = format!("{}{suffix}", file.display());
        assert!(!Path::new(&side).exists(), "{side} was written");
    }
}

#[test]
fn another_applications_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.db");
    sqlite_file(
        &notes,
        &["CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)"],
    );
    refused_untouched(&notes, "tables headroom does not create: notes");

    let jobs = dir.path().join("jobs.db");
    sqlite_file(
        &jobs,
        &["CREATE TABLE jobs (id INTEGER PRIMARY KEY, cron TEXT)"],
    );
    refused_untouched(&jobs, "no migration history");

    // Another sqlx application's history, with tables of the same names as headroom's.
    let other = dir.path().join("other-sqlx.db");
    sqlite_file(
        &other,
        &[
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
             installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, \
             checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (1, 'create users', TRUE, X'0102', 0)",
            "CREATE TABLE jobs (id TEXT PRIMARY KEY)",
        ],
    );
    refused_untouched(
        &other,
        "its migration 1 (\"create users\") is not headroom's",
    );

    // An empty file is a new store: headroom's from then on.
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    drop(serve(
        &format!("sqlite://{}", empty.display()),
        "node-a",
        &[],
    ));
}

#[test]
fn another_applications_postgres_schema_is_refused() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    block_on(async {
        let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
        sqlx::query("CREATE TABLE invoices (id BIGINT PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    let stderr = refused_start(&postgres.url());
    assert!(
        stderr.contains("not headroom's database") && stderr.contains("invoices"),
        "{stderr}"
    );
    let tables: Vec<String> = block_on(async {
        let pool = sqlx::PgPool::connect(&postgres.url()).await.unwrap();
        let tables = sqlx::query_scalar(
            "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
             WHERE table_schema = current_schema() ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        tables
    });
    assert_eq!(tables, ["invoices"], "headroom created tables in it");
}

/// A headroom store at `file` holding `jobs` finished jobs of `bytes` bytes each, with the
/// first page of its jobs table zeroed when `damaged`.
fn store_of_jobs(file: &Path, jobs: usize, bytes: usize, damaged: bool) {
    let url = format!("sqlite://{}", file.display());
    let padding = "x".repeat(bytes);
    let root_page: i64 = block_on(async {
        drop(sql::open(&url).await.unwrap());
        let pool = sqlx_sqlite::SqlitePool::connect(&url).await.unwrap();
        let mut transaction = pool.begin().await.unwrap();
        for n in 0..jobs {
            sqlx::query(
                "INSERT INTO jobs (id, node, state, request, cache_key, document, created_at, updated_at) \
                 VALUES ($1, 'node-a', 'succeeded', '{}', 'key', $2, 0, 0)",
            )
            .bind(format!("job-{n}"))
            .bind(&padding)
            .execute(&mut *transaction)
            .await
            .unwrap();
        }
        transaction.commit().await.unwrap();
        let root = sqlx::query_scalar("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        root
    });
    assert!(
        root_page > 1,
        "the jobs table's root is past the header page"
    );
    if damaged {
        let mut bytes = std::fs::read(file).unwrap();
        let page_size = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
        let start = (root_page as usize - 1) * page_size;
        bytes[start..start + page_size].fill(0);
        std::fs::write(file, &bytes).unwrap();
    }
}

#[test]
fn a_damaged_database_is_found_at_start_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("headroom.db");
    store_of_jobs(&file, 200, 2000, true);
    refused_untouched(&file, "the integrity check found damage");
}

/// A store too large to check before serving (past `sql::INLINE_CHECK_BYTES`) is checked while
/// the service serves, degraded, and nothing is written to it meanwhile: found damaged, it is
/// left byte for byte as it was and the service goes on without it; found whole, it is taken
/// over.
#[test]
fn a_large_store_is_checked_while_the_service_serves() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = (sql::INLINE_CHECK_BYTES / 4000 + 2000) as usize;
    for damaged in [true, false] {
        let file = dir.path().join(format!("damaged-{damaged}.db"));
        store_of_jobs(&file, jobs, 4000, damaged);
        let before = std::fs::read(&file).unwrap();
        let mut server = serve(&format!("sqlite://{}", file.display()), "node-a", &[]);
        let log = server.log();
        let listening = log.find("listening").expect("listening");
        assert!(
            log.find("schema: integrity check")
                .is_none_or(|checked| checked > listening),
            "the start waited for the check: {log}"
        );
        let answer = server.http.tune(&quick_job(8), &[]);
        assert_eq!(answer.status, 200, "{}", answer.body);
        if damaged {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !server.log().contains("the integrity check found damage") {
                assert!(Instant::now() < deadline, "{}", server.log());
                thread::sleep(Duration::from_millis(100));
            }
            let ready = readiness(&server);
            assert_eq!(ready["status"], "degraded", "{ready}");
            assert!(ready.to_string().contains("found damage"), "{ready}");
            drop(server);
            assert!(
                std::fs::read(&file).unwrap() == before,
                "the damaged store was written"
            );
        } else {
            let ready = wait_for_store(&server, true);
            assert_eq!(ready["status"], "ready", "{ready}");
        }
    }
}

#[test]
fn a_restart_during_a_store_outage_serves_degraded_and_takes_over_when_it_returns() {
    let store = UnprivilegedStore::new();
    let start = || store.serve("node-a");
    let mut first = start();
    let running = first
        .http
        .tune(&slow_job(128), &[("Prefer", "respond-async")]);
    assert_eq!(running.status, 202, "{}", running.body);
    let running_id = running.body["id"].as_str().unwrap().to_string();
    first.http.wait_until_running(&running_id);
    thread::sleep(Duration::from_millis(500));
    first.kill();

    // The disk turns read-only while the node is down: the restart cannot mark the job.
    store.set_writable(false);
    let mut second = start();
    let degraded = readiness(&second);
    assert_eq!(degraded["status"], "degraded", "{degraded}");
    assert!(
        second.log().contains("the store is unavailable at start"),
        "{}",
        second.log()
    );

    // Tuning goes on; a job to be followed later is refused, since the store cannot keep it.
    let answer = second.http.tune(&quick_job(8), &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let tuned_during = second.http.get("/jobs").1[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = second
        .http
        .tune(&quick_job(9), &[("Prefer", "respond-async")]);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.retry_after.is_some());
    assert!(
        refused.body["detail"]
            .as_str()
            .unwrap()
            .contains("store cannot keep jobs"),
        "{}",
        refused.body
    );

    store.set_writable(true);
    assert_eq!(wait_for_store(&second, true)["status"], "ready");
    let interrupted = second.http.wait_for(&running_id);
    assert_eq!(interrupted["state"], "interrupted", "{interrupted}");
    let accepted = second
        .http
        .tune(&quick_job(9), &[("Prefer", "respond-async")]);
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let accepted_id = accepted.body["id"].as_str().unwrap().to_string();

    // Every job survives a kill: the one run during the outage, the one accepted after it.
    second.kill();
    let third = start();
    for id in [&running_id, &tuned_during, &accepted_id] {
        let (status, job) = third.http.get(&format!("/jobs/{id}"));
        assert_eq!(status, 200, "job {id} was lost: {job}");
    }
    // The accepted job ran to its end, or was interrupted by the kill: either way it is known.
    let accepted = third.http.wait_for(&accepted_id);
    assert!(
        matches!(
            accepted["state"].as_str(),
            Some("succeeded" | "interrupted")
        ),
        "{accepted}"
    );
}

/// A job that tunes for a few seconds: long enough for two nodes to meet on it.
fn tune_for_seconds(width: u64) -> serde_json::Value {
    let mut job = slow_job(width);
    job["search"]["steps_per_probe"] = 20.into();
    job
}

/// What a node logs when it waits for another node's tune of the same job.
const WAITING: &str = "another node is tuning the same job";

/// Sends `job` to `server` on a thread of its own; the answer's body.
fn tune_in_background(
    server: &ServerProcess,
    job: &serde_json::Value,
) -> thread::JoinHandle<serde_json::Value> {
    let (http, job) = (server.http.clone(), job.clone());
    thread::spawn(move || {
        let answer = http.tune(&job, &[]);
        assert_eq!(answer.status, 200, "{}", answer.body);
        answer.body
    })
}

#[test]
fn nodes_sharing_postgres_tune_a_new_job_once_and_a_dead_holder_frees_it() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    let patient = [("HEADROOM_WAIT_SECONDS", "300")];
    let first = serve(&postgres.url(), "node-a", &patient);
    let mut second = serve(&postgres.url(), "node-b", &patient);
    let job = tune_for_seconds(32);
    let answers: Vec<serde_json::Value> = [&first, &second]
        .map(|server| tune_in_background(server, &job))
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let ran = [probes(&first), probes(&second)];
    assert!(
        ran.iter().filter(|&&p| p > 0.0).count() == 1,
        "both nodes tuned: {ran:?}"
    );
    assert_eq!(answers[0]["max_batch_size"], answers[1]["max_batch_size"]);
    assert_eq!(answers[0]["measured_at"], answers[1]["measured_at"]);
    assert_eq!(
        answers.iter().filter(|a| a["cached"] == true).count(),
        1,
        "{answers:?}"
    );

    // The node holding a claim dies: the waiting node takes the claim and tunes.
    let mut holder = serve(&postgres.url(), "node-c", &patient);
    let job = tune_for_seconds(48);
    let held = holder.http.tune(&job, &[("Prefer", "respond-async")]);
    assert_eq!(held.status, 202, "{}", held.body);
    holder
        .http
        .wait_until_running(held.body["id"].as_str().unwrap());
    let waits = |server: &mut ServerProcess| server.log().matches(WAITING).count();
    let before = waits(&mut second);
    let waiting = tune_in_background(&second, &job);
    let deadline = Instant::now() + Duration::from_secs(60);
    while waits(&mut second) == before {
        assert!(Instant::now() < deadline, "node-b never waited");
        thread::sleep(Duration::from_millis(50));
    }
    holder.kill();
    let answer = waiting.join().unwrap();
    assert!(answer.get("cached").is_none(), "{answer}");
    assert_eq!(answer["measured_on"], "node-b/host");
}

#[test]
fn postgres_down_at_start_is_named_with_its_cause_and_taken_over_when_it_returns() {
    let Some(postgres) = Postgres::start() else {
        return;
    };
    postgres.stop();
    let mut server = serve(&postgres.url(), "node-a", &[]);
    let degraded = readiness(&server);
    assert_eq!(degraded["status"], "degraded", "{degraded}");
    let log = server.log();
    let unavailable = log
        .lines()
        .find(|l| l.contains("the store is unavailable at start"))
        .unwrap_or_else(|| panic!("{log}"));
    let host = postgres
        .url()
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(
        unavailable.contains(&host) && !unavailable.contains("pool timed out"),
        "the host and the cause are named: {unavailable}"
    );
    assert_eq!(server.http.tune(&quick_job(8), &[]).status, 200);
    postgres.restart();
    assert_eq!(wait_for_store(&server, true)["status"], "ready");
    let errors = support::metric_value(
        &server.http.get_text("/metrics"),
        "headroom_store_errors_total",
        &[("operation", "open")],
    );
    assert_eq!(errors, Some(1.0), "one failed start, however many tries");
}
