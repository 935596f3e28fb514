//! The service end to end over real TCP on loopback, with the host device.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use headroom::config::Config;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A server on an ephemeral loopback port, shut down when dropped.
struct TestServer {
    base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(config: Config) -> TestServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (send, receive) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                headroom::service::serve(config, listener, async move {
                    let _ = receive.await;
                })
                .await
                .unwrap();
            });
        });
        let server = TestServer {
            base,
            shutdown: Some(send),
            thread: Some(thread),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.get("/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn get(&self, path: &str) -> (u16, Value) {
        answer(Self::agent().get(format!("{}{path}", self.base)).call())
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        answer(Self::agent().delete(format!("{}{path}", self.base)).call())
    }

    fn post(&self, body: &Value, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
        self.post_raw(&body.to_string(), "application/json", headers)
    }

    fn post_raw(
        &self,
        body: &str,
        content_type: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value, Option<String>) {
        let mut request = Self::agent()
            .post(format!("{}/tune", self.base))
            .header("Content-Type", content_type);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.send(body.as_bytes()).unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let retry = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let value: Value = response.body_mut().read_json().unwrap_or(Value::Null);
        if status >= 400 {
            assert_eq!(
                content_type.as_deref(),
                Some("application/problem+json"),
                "{status} {value}"
            );
            assert_eq!(value["status"], status, "{value}");
            assert!(
                value["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{value}"
            );
        }
        (status, value, retry)
    }

    /// Polls a job until it finishes.
    fn wait_for(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, job) = self.get(&format!("/jobs/{id}"));
            assert_eq!(status, 200, "{job}");
            if matches!(
                job["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never finished: {job}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_until_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get(&format!("/jobs/{id}")).1["state"] != "running" {
            assert!(Instant::now() < deadline, "job {id} never started");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(send) = self.shutdown.take() {
            let _ = send.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut response = response.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_json().unwrap_or(Value::Null),
    )
}

fn host_config() -> Config {
    Config {
        devices: vec!["host".into()],
        host_memory: bytesize::ByteSize::mib(16),
        ..Config::default()
    }
}

/// A tiny job that tunes in milliseconds; `width` makes jobs distinct.
fn tiny_job(width: u64) -> Value {
    json!({"model": {"input_shape": [16], "hidden_layers": [width], "num_classes": 4},
           "optimizer": {"name": "sgd"}, "search": {"max": 4096}})
}

/// A job whose probes each take a while: many steps of a CIFAR-sized layer.
fn slow_job() -> Value {
    json!({"model": {"input_shape": [3, 32, 32], "hidden_layers": [128], "num_classes": 10},
           "optimizer": {"name": "adam"}, "search": {"steps_per_probe": 200, "start": 64}, "no_cache": true})
}

#[test]
fn synchronous_tune_then_the_cache() {
    let server = TestServer::start(host_config());
    let job = json!({"model": {"input_shape": [1, 28, 28], "hidden_layers": [128], "num_classes": 10},
                     "optimizer": {"name": "sgd"}, "device": "host"});
    let (status, result, _) = server.post(&job, &[]);
    assert_eq!(status, 200, "{result}");
    let max = result["max_batch_size"].as_u64().unwrap();
    assert!(max > 1000, "{result}");
    assert_eq!(result["limited_by"], "memory");
    assert!(result.get("cached").is_none());

    let (status, again, _) = server.post(&job, &[]);
    assert_eq!(status, 200);
    assert_eq!(again["cached"], true);
    assert_eq!(again["max_batch_size"], max);

    let mut fresh = job.clone();
    fresh["no_cache"] = json!(true);
    let (status, probed, _) = server.post(&fresh, &[]);
    assert_eq!(status, 200);
    assert!(probed.get("cached").is_none());
}

#[test]
fn asynchronous_tune_with_prefer_respond_async() {
    let server = TestServer::start(host_config());
    let mut response = TestServer::agent()
        .post(format!("{}/tune", server.base))
        .header("Content-Type", "application/json")
        .header("Prefer", "respond-async")
        .send(tiny_job(7).to_string().as_bytes())
        .unwrap();
    assert_eq!(response.status(), 202);
    let location = response
        .headers()
        .get("location")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let document: Value = response.body_mut().read_json().unwrap();
    assert_eq!(
        location,
        format!("/jobs/{}", document["id"].as_str().unwrap())
    );
    assert!(matches!(
        document["state"].as_str(),
        Some("queued" | "running" | "succeeded")
    ));
    let finished = server.wait_for(document["id"].as_str().unwrap());
    assert_eq!(finished["state"], "succeeded", "{finished}");
    assert_eq!(finished["device"], "host");
    assert!(!finished["progress"]["probes"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(finished["result"]["max_batch_size"].as_u64().unwrap() > 0);
    for key in ["created_at", "started_at", "finished_at"] {
        OffsetDateTime::parse(finished[key].as_str().unwrap(), &Rfc3339).unwrap();
    }
    let (status, jobs) = server.get("/jobs");
    assert_eq!(status, 200);
    assert_eq!(jobs[0]["id"], document["id"]);
}

#[test]
fn a_running_job_can_be_cancelled() {
    let server = TestServer::start(Config {
        host_memory: bytesize::ByteSize::mib(64),
        ..host_config()
    });
    let (status, document, _) = server.post(&slow_job(), &[("Prefer", "respond-async")]);
    assert_eq!(status, 202);
    let id = document["id"].as_str().unwrap();
    server.wait_until_running(id);
    let (status, cancelling) = server.delete(&format!("/jobs/{id}"));
    assert_eq!(status, 202, "{cancelling}");
    let finished = server.wait_for(id);
    assert_eq!(finished["state"], "cancelled", "{finished}");
    assert_eq!(finished["error"]["status"], 409);
    assert!(finished.get("result").is_none());
    let (status, problem) = server.delete(&format!("/jobs/{id}"));
    assert_eq!(status, 409, "{problem}");
    // The device is free again: a new job runs.
    let (status, _, _) = server.post(&tiny_job(3), &[]);
    assert_eq!(status, 200);
}

#[test]
fn fifty_concurrent_jobs_are_all_answered_one_device_job_at_a_time() {
    let server = Arc::new(TestServer::start(Config {
        queue_length: 64,
        ..host_config()
    }));
    let answers: Vec<(u16, Value)> = (0..50)
        .map(|i| {
            let server = Arc::clone(&server);
            thread::spawn(move || {
                let (status, document, _) =
                    server.post(&tiny_job(8 + i), &[("Prefer", "respond-async")]);
                (status, document)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut spans = Vec::new();
    for (status, document) in answers {
        assert_eq!(status, 202, "{document}");
        let job = server.wait_for(document["id"].as_str().unwrap());
        assert_eq!(job["state"], "succeeded", "{job}");
        let at = |key: &str| OffsetDateTime::parse(job[key].as_str().unwrap(), &Rfc3339).unwrap();
        spans.push((at("started_at"), at("finished_at")));
    }
    assert_eq!(spans.len(), 50);
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two jobs overlapped on the host device: {pair:?}"
        );
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = TestServer::start(Config {
        queue_length: 1,
        host_memory: bytesize::ByteSize::mib(64),
        ..host_config()
    });
    let (_, running, _) = server.post(&slow_job(), &[("Prefer", "respond-async")]);
    let running = running["id"].as_str().unwrap().to_string();
    server.wait_until_running(&running);
    let (status, queued, _) = server.post(&slow_job(), &[("Prefer", "respond-async")]);
    assert_eq!(status, 202, "{queued}");
    let (status, problem, retry) = server.post(&slow_job(), &[("Prefer", "respond-async")]);
    assert_eq!(status, 429, "{problem}");
    assert!(retry.unwrap().parse::<u64>().unwrap() > 0);
    let (_, devices) = server.get("/devices");
    assert_eq!(devices[0]["busy"], true);
    assert_eq!(devices[0]["queue_length"], 1);
    for id in [running, queued["id"].as_str().unwrap().to_string()] {
        server.delete(&format!("/jobs/{id}"));
        assert_eq!(server.wait_for(&id)["state"], "cancelled");
    }
}

#[test]
fn every_error_class_is_a_problem() {
    let server = TestServer::start(host_config());
    let (status, _, _) = server.post_raw("{\"model\": ", "application/json", &[]);
    assert_eq!(status, 400);
    let (status, _, _) = server.post_raw(&tiny_job(4).to_string(), "text/plain", &[]);
    assert_eq!(status, 415);
    let (status, _, _) = server.post_raw(&"x".repeat(65 * 1024), "application/json", &[]);
    assert_eq!(status, 413);
    let mut bad = tiny_job(4);
    bad["model"]["hidden_layers"] = json!([8, 0]);
    let (status, problem, _) = server.post(&bad, &[]);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("model.hidden_layers[1]")),
        "{problem}"
    );
    let mut bad = tiny_job(4);
    bad["device"] = json!("cuda:7");
    let (status, problem, _) = server.post(&bad, &[]);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("device")),
        "{problem}"
    );
    let huge = json!({"model": {"input_shape": [3, 32, 32], "hidden_layers": [100000], "num_classes": 10},
                      "optimizer": {"name": "adam"}});
    let (status, problem, _) = server.post(&huge, &[]);
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["type"].as_str().unwrap().ends_with("/does-not-fit"),
        "{problem}"
    );
    assert_eq!(server.get("/jobs/not-a-uuid").0, 404);
    assert_eq!(
        server.get("/jobs/8f8e2f9e-2a57-4a39-9a87-2f43c5c0a6d1").0,
        404
    );
    assert_eq!(server.get("/no/such/route").0, 404);
}

#[test]
fn the_bad_input_corpus_never_yields_a_5xx() {
    let server = TestServer::start(host_config());
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let corpus = [
        String::new(),
        "{".into(),
        "null".into(),
        "[]".into(),
        "\"job\"".into(),
        r#"{"model": "mlp", "optimizer": {"name": "sgd"}}"#.into(),
        r#"{"model": {"input_shape": [1e400], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#.into(),
        r#"{"model": {"input_shape": [18446744073709551616], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#.into(),
        r#"{"model": {"input_shape": [-1, 28], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#.into(),
        r#"{"model": {"input_shape": [4294967296, 4294967296], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#.into(),
        r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"}, "search": {"start": 0}}"#.into(),
        r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"}, "headroom": "high"}"#.into(),
        r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"}, "device": 3}"#.into(),
        r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "sgd"}, "no_cache": "yes"}"#.into(),
        r#"{"model": {"input_shape": [4], "num_classes": 10, "ñ": "日本語 🚀"}, "optimizer": {"name": "sgd"}}"#.into(),
        r#"{"model": {"input_shape": [4], "num_classes": 10}, "optimizer": {"name": "ađam"}}"#.into(),
        "\u{feff}{}".into(),
        deep,
        format!("{{\"pad\": \"{}\"}}", "a".repeat(1 << 20)),
    ];
    for body in &corpus {
        let (status, problem, _) = server.post_raw(body, "application/json", &[]);
        assert!(
            (400..500).contains(&status),
            "{status} for {:.80}: {problem}",
            body
        );
    }
}

#[test]
fn a_token_guards_tune_and_jobs_but_not_health_or_metrics() {
    let server = TestServer::start(Config {
        token: "s3cret".into(),
        ..host_config()
    });
    assert_eq!(server.post(&tiny_job(5), &[]).0, 401);
    assert_eq!(
        server
            .post(&tiny_job(5), &[("Authorization", "Bearer wrong")])
            .0,
        401
    );
    assert_eq!(
        server
            .post(&tiny_job(5), &[("Authorization", "Bearer s3cret")])
            .0,
        200
    );
    assert_eq!(server.get("/jobs").0, 401);
    assert_eq!(server.get("/livez").0, 200);
    assert_eq!(server.get("/metrics").0, 200);
}

#[test]
fn metrics_and_openapi_are_served() {
    let server = TestServer::start(host_config());
    assert_eq!(server.post(&tiny_job(6), &[]).0, 200);
    assert_eq!(server.post(&tiny_job(6), &[]).0, 200); // a cache hit
    let text = TestServer::agent()
        .get(format!("{}/metrics", server.base))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    for series in [
        "headroom_http_requests_total{",
        "headroom_tunes_total{device=\"host\",outcome=\"succeeded\"} 1",
        "headroom_probes_total{device=\"host\",outcome=\"fit\"}",
        "headroom_probe_duration_seconds_bucket{",
        "headroom_tune_duration_seconds_count{device=\"host\"} 1",
        "headroom_cache_hits_total 1",
        "headroom_cache_misses_total 1",
        "headroom_queue_length{device=\"host\"} 0",
        "headroom_device_busy{device=\"host\"} 0",
        "headroom_last_max_batch_size{device=\"host\"}",
        "headroom_build_info{version=",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    assert!(
        !text.contains("job=") && !text.contains("id="),
        "a job label leaked into the metrics"
    );
    check_with_promtool(&text);

    let (status, document) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/tune",
        "/jobs/{id}",
        "/jobs",
        "/devices",
        "/metrics",
        "/livez",
        "/readyz",
    ] {
        assert!(
            document["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
}

/// `promtool check metrics`, from Debian's `prometheus` package; CI installs it and sets
/// HEADROOM_REQUIRE_PROMTOOL=1 so that its absence fails.
fn check_with_promtool(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        assert_ne!(
            std::env::var("HEADROOM_REQUIRE_PROMTOOL").as_deref(),
            Ok("1"),
            "promtool is required but missing"
        );
        eprintln!("skipped: promtool not found");
        return;
    };
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn sigterm_with_a_job_running_shuts_down_cleanly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--device",
            "host",
            "--host-memory",
            "64MiB",
        ])
        .env("HEADROOM_SHUTDOWN_GRACE_SECONDS", "60")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (line_sender, line_receiver) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = line_sender.send(line.clone());
        }
    });
    let mut log = Vec::new();
    let address = loop {
        let line = line_receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("the server logs its address");
        log.push(line.clone());
        if let Some(rest) = line.split("address=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let server = TestServer {
        base: format!("http://{address}"),
        shutdown: None,
        thread: None,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.get("/readyz").0 != 200 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(20));
    }
    let (status, document, _) = server.post(&slow_job(), &[("Prefer", "respond-async")]);
    assert_eq!(status, 202);
    server.wait_until_running(document["id"].as_str().unwrap());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the server did not stop"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    reader.join().unwrap();
    log.extend(line_receiver.try_iter());
    let log = log.join("\n");
    assert!(log.contains("cancelling jobs"), "{log}");
    assert!(log.contains("device released"), "{log}");
    assert!(log.contains("released=true"), "{log}");
}

#[test]
fn the_cli_can_tune_through_a_server() {
    let server = TestServer::start(Config {
        token: "t0ken".into(),
        ..host_config()
    });
    let run = |job: &str| {
        Command::new(env!("CARGO_BIN_EXE_headroom"))
            .args([
                "tune",
                "--server",
                &server.base,
                job,
                "--device",
                "host",
                "--json",
            ])
            .env("HEADROOM_TOKEN", "t0ken")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    let output = run("examples/mnist-mlp-sgd.json");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        result["max_batch_size"].as_u64().unwrap() > 1000,
        "{result}"
    );
    assert_eq!(result["device"]["kind"], "host");
    let output = run("examples/deep-mlp-adamw.json");
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
