//! The service end to end over real TCP on loopback, with the host device.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use headroom_devices::select::DeviceSpec;
use headroom_service::config::Config;
use serde_json::{json, Value};
use support::{job, metric_value, Answer, Http, ServerProcess};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A server in this process on an ephemeral loopback port, shut down when dropped.
struct TestServer {
    http: Http,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    fn start(mut config: Config) -> TestServer {
        // This test binary serves; its probe workers are the real binary's.
        config.worker_program = env!("CARGO_BIN_EXE_headroom").into();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (send, receive) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                headroom_service::serve(config, listener, async move {
                    let _ = receive.await;
                })
                .await
                .unwrap();
            });
        });
        let server = TestServer {
            http: Http { base },
            shutdown: Some(send),
            thread: Some(thread),
        };
        server.http.wait_ready();
        server
    }
}

impl std::ops::Deref for TestServer {
    type Target = Http;

    fn deref(&self) -> &Http {
        &self.http
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

fn host_config() -> Config {
    Config {
        devices: vec![DeviceSpec::Host],
        host_memory: bytesize::ByteSize::mib(16),
        store: "sqlite::memory:".into(),
        ..Config::default()
    }
}

/// A tiny job that tunes in milliseconds; `width` makes jobs distinct.
fn tiny_job(width: u64) -> Value {
    let mut tiny = job(&[16], &[width], 4, "sgd");
    tiny["search"] = json!({"max": 4096});
    tiny
}

/// A job whose probes each take a while: many steps of a CIFAR-sized layer.
fn slow_job() -> Value {
    let mut slow = job(&[3, 32, 32], &[128], 10, "adam");
    slow["search"] = json!({"steps_per_probe": 200, "start": 64});
    slow["no_cache"] = json!(true);
    slow
}

#[test]
fn synchronous_tune_then_the_cache() {
    let server = TestServer::start(host_config());
    let job = json!({"model": {"input_shape": [1, 28, 28], "hidden_layers": [128], "num_classes": 10},
                     "optimizer": {"name": "sgd"}, "device": "host"});
    let Answer {
        status,
        body: result,
        ..
    } = server.tune(&job, &[]);
    assert_eq!(status, 200, "{result}");
    let max = result["max_batch_size"].as_u64().unwrap();
    assert!(max > 1000, "{result}");
    assert_eq!(result["limited_by"], "memory");
    assert!(result.get("cached").is_none());

    let Answer {
        status,
        body: again,
        ..
    } = server.tune(&job, &[]);
    assert_eq!(status, 200);
    assert_eq!(again["cached"], true);
    assert_eq!(again["max_batch_size"], max);

    let mut fresh = job.clone();
    fresh["no_cache"] = json!(true);
    let Answer {
        status,
        body: probed,
        ..
    } = server.tune(&fresh, &[]);
    assert_eq!(status, 200);
    assert!(probed.get("cached").is_none());
}

#[test]
fn asynchronous_tune_with_prefer_respond_async() {
    let server = TestServer::start(host_config());
    let accepted = server.tune(&tiny_job(7), &[("Prefer", "respond-async")]);
    assert_eq!(accepted.status, 202);
    let document = accepted.body;
    assert_eq!(
        accepted.location.unwrap(),
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
    let Answer {
        status,
        body: document,
        ..
    } = server.tune(&slow_job(), &[("Prefer", "respond-async")]);
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
    let status = server.tune(&tiny_job(3), &[]).status;
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
                let answer = server.tune(&tiny_job(8 + i), &[("Prefer", "respond-async")]);
                (answer.status, answer.body)
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
    // Three different jobs: identical ones would join the first.
    let slow = |width: u64| {
        let mut job = slow_job();
        job["model"]["hidden_layers"] = json!([width]);
        job
    };
    let Answer { body: running, .. } = server.tune(&slow(128), &[("Prefer", "respond-async")]);
    let running = running["id"].as_str().unwrap().to_string();
    server.wait_until_running(&running);
    let Answer {
        status,
        body: queued,
        ..
    } = server.tune(&slow(129), &[("Prefer", "respond-async")]);
    assert_eq!(status, 202, "{queued}");
    let Answer {
        status,
        body: problem,
        retry_after: retry,
        ..
    } = server.tune(&slow(130), &[("Prefer", "respond-async")]);
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
    let status = server
        .tune_raw("{\"model\": ", "application/json", &[])
        .status;
    assert_eq!(status, 400);
    let status = server
        .tune_raw(&tiny_job(4).to_string(), "text/plain", &[])
        .status;
    assert_eq!(status, 415);
    let status = server
        .tune_raw(&"x".repeat(65 * 1024), "application/json", &[])
        .status;
    assert_eq!(status, 413);
    let mut bad = tiny_job(4);
    bad["model"]["hidden_layers"] = json!([8, 0]);
    let Answer {
        status,
        body: problem,
        ..
    } = server.tune(&bad, &[]);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("model.hidden_layers[1]")),
        "{problem}"
    );
    // A layer list is checked shape by shape; one PyTorch would refuse names its layer.
    let mut image = tiny_job(4);
    image["model"] = json!({"input_shape": [3, 8, 8], "num_classes": 4, "layers": [
        {"conv2d": {"out_channels": 4, "kernel_size": 3, "groups": 2}}, {"batch_norm2d": {}},
        {"relu": {}}, {"global_avg_pool2d": {}}, {"linear": {"out_features": 4}}]});
    let Answer {
        status,
        body: problem,
        ..
    } = server.tune(&image, &[]);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("model.layers[0].conv2d.groups")),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("must divide both the input's 3 channels and the 4 output channels"),
        "{problem}"
    );
    image["model"]["layers"][0]["conv2d"]["stride"] = json!(0);
    let problem = server.tune(&image, &[]).body;
    assert_eq!(
        problem["field"], "model.layers[0].conv2d.stride",
        "{problem}"
    );
    // A misspelt option of the route is listed with the job's fields.
    let mut bad = tiny_job(4);
    bad["devcie"] = json!("host");
    let problem = server.tune(&bad, &[]).body;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("`optimizer`")
            && detail.contains("`device`")
            && detail.contains("`no_cache`"),
        "{detail}"
    );
    let mut whole = tiny_job(4);
    whole["memory_bytes"] = json!(1073741824.0);
    assert_eq!(server.post_json("/estimate", &whole).0, 200);
    let mut bad = tiny_job(4);
    bad["memory"] = json!(1 << 30);
    let (status, problem) = server.post_json("/estimate", &bad);
    let detail = problem["detail"].as_str().unwrap();
    assert_eq!(status, 422);
    assert!(
        detail.contains("`memory_bytes`") && detail.contains("`gpu`"),
        "{detail}"
    );
    let mut bad = tiny_job(4);
    bad["device"] = json!("cuda:7");
    let Answer {
        status,
        body: problem,
        ..
    } = server.tune(&bad, &[]);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("device")),
        "{problem}"
    );
    let huge = json!({"model": {"input_shape": [3, 32, 32], "hidden_layers": [100000], "num_classes": 10},
                      "optimizer": {"name": "adam"}});
    let Answer {
        status,
        body: problem,
        ..
    } = server.tune(&huge, &[]);
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
        let Answer {
            status,
            body: problem,
            ..
        } = server.tune_raw(body, "application/json", &[]);
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
    assert_eq!(server.tune(&tiny_job(5), &[]).status, 401);
    assert_eq!(
        server
            .tune(&tiny_job(5), &[("Authorization", "Bearer wrong")])
            .status,
        401
    );
    assert_eq!(
        server
            .tune(&tiny_job(5), &[("Authorization", "Bearer s3cret")])
            .status,
        200
    );
    assert_eq!(server.get("/jobs").0, 401);
    assert_eq!(server.get("/livez").0, 200);
    assert_eq!(server.get("/metrics").0, 200);
}

#[test]
fn metrics_and_openapi_are_served() {
    let server = TestServer::start(host_config());
    assert_eq!(server.tune(&tiny_job(6), &[]).status, 200);
    assert_eq!(server.tune(&tiny_job(6), &[]).status, 200); // a cache hit
    let text = server.get_text("/metrics");
    let host = [("device", "host")];
    let value = |metric: &str, labels: &[(&str, &str)]| {
        metric_value(&text, metric, labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in\n{text}"))
    };
    let succeeded = [("device", "host"), ("outcome", "succeeded")];
    assert_eq!(value("headroom_tunes_total", &succeeded), 1.0);
    assert!(
        value(
            "headroom_probes_total",
            &[("device", "host"), ("outcome", "fit")]
        ) > 0.0
    );
    assert!(
        value(
            "headroom_probe_duration_seconds_count",
            &[("device", "host"), ("outcome", "fit")]
        ) > 0.0
    );
    assert_eq!(value("headroom_tune_duration_seconds_count", &host), 1.0);
    assert_eq!(value("headroom_cache_hits_total", &[]), 1.0);
    assert_eq!(value("headroom_cache_misses_total", &[]), 1.0);
    assert_eq!(value("headroom_queue_length", &host), 0.0);
    assert_eq!(value("headroom_device_busy", &host), 0.0);
    assert!(value("headroom_last_max_batch_size", &host) > 0.0);
    let tune = [("route", "/tune"), ("method", "POST"), ("status", "200")];
    assert_eq!(value("headroom_http_requests_total", &tune), 2.0);
    assert_eq!(
        value("headroom_http_request_duration_seconds_count", &tune),
        2.0
    );
    assert_eq!(
        value(
            "headroom_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(value("process_cpu_seconds_total", &[]) >= 0.0);
    // Every per-device series carries the DCGM exporter's labels (empty for the host).
    for line in text.lines().filter(|l| l.contains("device=\"host\"")) {
        for label in ["gpu=", "UUID=", "model_name=", "Hostname="] {
            assert!(line.contains(label), "{label} missing from {line}");
        }
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
        support::skip_or_fail("PROMTOOL", "promtool is not installed");
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

/// A node restarted on a store that already holds results exports every device series at once,
/// as a fresh one does, before it tunes again.
#[test]
fn a_restarted_node_exports_its_device_series_before_it_tunes() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/headroom.db", dir.path().display());
    let start = || {
        let mut command = support::headroom();
        command
            .args(["serve", "--device", "host", "--host-memory", "32MiB"])
            .env("HEADROOM_STORE", &store);
        ServerProcess::start(command)
    };
    let mut first = start();
    let job = support::job(&[1, 28, 28], &[16], 10, "sgd");
    assert_eq!(first.http.tune(&job, &[]).status, 200);
    assert!(first.terminate(), "{}", first.log());
    let second = start();
    let (_, jobs) = second.http.get("/jobs");
    assert_eq!(
        jobs[0]["state"], "succeeded",
        "the store held the result: {jobs:#}"
    );
    let metrics = second.http.get_text("/metrics");
    let host = [("device", "host")];
    for (metric, labels) in [
        ("headroom_queue_length", &host[..]),
        ("headroom_device_busy", &host[..]),
        ("headroom_device_healthy", &host[..]),
        ("headroom_device_memory_total_bytes", &host[..]),
        ("headroom_device_memory_used_bytes", &host[..]),
        ("headroom_tune_duration_seconds_count", &host[..]),
        (
            "headroom_tunes_total",
            &[("device", "host"), ("outcome", "succeeded")][..],
        ),
        (
            "headroom_probes_total",
            &[("device", "host"), ("outcome", "fit")][..],
        ),
        (
            "headroom_store_errors_total",
            &[("operation", "save_jobs")][..],
        ),
    ] {
        assert!(
            support::metric_value(&metrics, metric, labels).is_some(),
            "{metric} {labels:?} is not exported after the restart:\n{metrics}"
        );
    }
    assert_eq!(
        support::metric_value(&metrics, "headroom_device_memory_total_bytes", &host),
        Some((32u64 << 20) as f64)
    );
}

#[test]
fn sigterm_with_a_job_running_shuts_down_cleanly() {
    let mut command = support::headroom();
    command
        .args(["serve", "--device", "host", "--host-memory", "64MiB"])
        .env("HEADROOM_SHUTDOWN_GRACE_SECONDS", "60");
    let mut server = ServerProcess::start(command);
    let answer = server
        .http
        .tune(&slow_job(), &[("Prefer", "respond-async")]);
    assert_eq!(answer.status, 202);
    server
        .http
        .wait_until_running(answer.body["id"].as_str().unwrap());
    assert!(server.terminate(), "{}", server.log());
    let log = server.log();
    assert!(log.contains("stopping jobs"), "{log}");
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
        support::headroom()
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
            .output()
            .unwrap()
    };
    let output = run("examples/mnist-mlp-sgd.json");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    // While it waits, the CLI shows the job's states (the running one only if a look falls
    // while it runs) and every probe, as a local tune does.
    assert!(log.contains("succeeded on host"), "{log}");
    assert!(log.matches("probe batch").count() > 3, "{log}");
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

/// Writes the served OpenAPI document to a file for the Python tools.
fn openapi_file(server: &Http) -> tempfile::TempPath {
    support::temp_file(".json", server.get_text("/openapi.json"))
}

#[test]
fn the_openapi_document_is_valid_and_every_example_is_a_tune_request() {
    let server = TestServer::start(host_config());
    let (status, document) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["components"]["securitySchemes"]["bearer"].is_object());
    for (path, method) in [("/tune", "post"), ("/jobs/{id}", "get"), ("/jobs", "get")] {
        let responses = &document["paths"][path][method]["responses"];
        assert!(responses["401"].is_object(), "{path} lacks 401");
        for (code, response) in responses.as_object().unwrap() {
            assert!(
                !response["description"].as_str().unwrap_or("").is_empty(),
                "{method} {path} {code} has no description"
            );
            if code.starts_with('4') || code.starts_with('5') {
                assert!(
                    response["content"]["application/problem+json"].is_object(),
                    "{method} {path} {code} is not a problem document"
                );
            }
        }
    }
    let tune = &document["paths"]["/tune"]["post"];
    for code in ["400", "409", "413", "415", "422", "429", "503"] {
        assert!(
            tune["responses"][code].is_object(),
            "POST /tune lacks {code}"
        );
    }
    assert!(tune["responses"]["202"]["headers"]["Location"].is_object());
    assert!(tune["responses"]["429"]["headers"]["Retry-After"].is_object());
    assert!(tune["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "Prefer"));

    let Some(validator) = support::python_tool("openapi-spec-validator") else {
        return;
    };
    let file = openapi_file(&server);
    let output = Command::new(validator).arg(&file).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );

    // Every example, with the service's options, validates against the published TuneRequest.
    let Some(python) = support::python_tool("python3") else {
        return;
    };
    let check = r##"
import json, sys
from jsonschema import Draft202012Validator
document = json.load(open(sys.argv[1]))
schema = {"$ref": "#/components/schemas/TuneRequest", "components": document["components"]}
validator = Draft202012Validator(schema)
for path in sys.argv[2:]:
    request = json.load(open(path))
    request.update({"device": "cuda:0", "no_cache": True, "allow_shared": False})
    errors = [e.message for e in validator.iter_errors(request)]
    assert not errors, (path, errors)
    request["colour"] = "blue"
    assert list(validator.iter_errors(request)), (path, "an unknown member was accepted")
print("ok")
"##;
    let examples: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| path.display().to_string())
        .collect();
    assert!(examples.len() >= 3);
    support::run_ok(
        "the examples' check",
        Command::new(python)
            .args(["-c", check])
            .arg(&file)
            .args(&examples),
    );
}

/// Property-based requests from the published document, against a real `headroom serve`, with
/// every check and the stateful phase (which follows the document's links from `POST /tune` to
/// `GET` and `DELETE /jobs/{id}`): no 5xx, every answer within its documented status, content
/// type, headers and schema, and nothing the schema forbids accepted.
#[test]
fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let Some(schemathesis) = support::python_tool("st") else {
        return;
    };
    let mut command = support::headroom();
    command
        .args(["serve", "--device", "host", "--host-memory", "2MiB"])
        .env("HEADROOM_WAIT_SECONDS", "1")
        .env("HEADROOM_QUEUE_LENGTH", "2");
    let server = ServerProcess::start(command);
    // schemathesis keeps a cache in its working directory: give it one outside the tree, with
    // its configuration: a request the schema allows may still be refused with 422 for what a
    // schema cannot say (the model does not fit; the flattened input is too large), so 422 is
    // an accepted answer to valid data as well.
    let workdir = tempfile::tempdir().unwrap();
    std::fs::write(
        workdir.path().join("schemathesis.toml"),
        "[checks.positive_data_acceptance]\n\
         expected-statuses = [\"2xx\", \"3xx\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\", \"5xx\"]\n",
    )
    .unwrap();
    let output = support::run_ok(
        "schemathesis",
        Command::new(schemathesis)
            .current_dir(workdir.path())
            .args(["run", &format!("{}/openapi.json", server.http.base)])
            .args([
                "--checks",
                "all",
                "--max-examples",
                "40",
                "--seed",
                "7",
                "--generation-database",
                "none",
                "--no-color",
            ]),
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("passed"), "{report}");
}

#[test]
fn identical_jobs_in_flight_are_tuned_once() {
    let server = Arc::new(TestServer::start(Config {
        host_memory: bytesize::ByteSize::mib(64),
        ..host_config()
    }));
    let mut slow = slow_job();
    slow["no_cache"] = json!(false);
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let server = Arc::clone(&server);
            let slow = slow.clone();
            thread::spawn(move || {
                let answer = server.tune(&slow, &[("Prefer", "respond-async")]);
                assert_eq!(answer.status, 202, "{}", answer.body);
                answer.body["id"].as_str().unwrap().to_string()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    server.delete(&format!("/jobs/{}", ids[0]));
    assert_eq!(server.wait_for(&ids[0])["state"], "cancelled");
    let metrics = server.get_text("/metrics");
    assert!(
        metrics.contains("headroom_single_flight_joins_total 2"),
        "{metrics}"
    );
    // One tune, cancelled; the other outcomes' series are there from the start, at zero.
    let tunes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("headroom_tunes_total{"))
        .collect();
    assert_eq!(tunes.len(), 3, "{tunes:?}");
    for line in tunes {
        let once = line.contains("outcome=\"cancelled\"");
        assert!(line.ends_with(if once { " 1" } else { " 0" }), "{line}");
    }
}

/// Raises this test process's open-file limit to its hard limit: it opens thousands of sockets.
fn many_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads and writes one rlimit of this process.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// `count` connections that send half a request head and then nothing.
fn half_sent(base: &str, count: usize) -> Vec<std::net::TcpStream> {
    let address = base.trim_start_matches("http://");
    (0..count)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(address).unwrap();
            std::io::Write::write_all(&mut stream, b"GET /livez HTTP/1.1\r\nHost: x\r\n").unwrap();
            stream
        })
        .collect()
}

/// 2,000 clients that send half a request neither starve the service (`/livez` and a cached
/// `/tune` answer within 100 ms, median of five, while they hang) nor outlive the header
/// timeout, and SIGTERM exits within the grace whatever they do.
#[test]
fn half_sent_requests_neither_starve_the_service_nor_hold_up_shutdown() {
    many_files();
    let mut command = support::headroom();
    command
        .args(["serve", "--device", "host", "--host-memory", "32MiB"])
        .env("HEADROOM_HEADER_TIMEOUT_SECONDS", "3")
        .env("HEADROOM_SHUTDOWN_GRACE_SECONDS", "3");
    let mut server = ServerProcess::start(command);
    let job = support::job(&[1, 28, 28], &[16], 10, "sgd");
    assert_eq!(server.http.tune(&job, &[]).status, 200);
    let slow = half_sent(&server.http.base, 2000);
    let timed = |request: &dyn Fn() -> u16| {
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                assert_eq!(request(), 200);
                started.elapsed()
            })
            .collect();
        times.sort();
        times[2]
    };
    let livez = timed(&|| server.http.get("/livez").0);
    let cached = timed(&|| server.http.tune(&job, &[]).status);
    assert!(livez < Duration::from_millis(100), "/livez took {livez:?}");
    assert!(
        cached < Duration::from_millis(100),
        "a cached /tune took {cached:?}"
    );
    // Past the header timeout the server has closed them.
    thread::sleep(Duration::from_secs(5));
    let still_open = slow
        .into_iter()
        .filter(|stream| {
            stream
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
            let mut byte = [0u8; 1];
            matches!(std::io::Read::read(&mut &*stream, &mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert_eq!(
        still_open, 0,
        "half-sent requests outlived the header timeout"
    );
    let _slow = half_sent(&server.http.base, 2000);
    let started = std::time::Instant::now();
    assert!(server.terminate(), "{}", server.log());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "SIGTERM took {took:?} with a grace of 3 s"
    );
}

/// At the default log level a request writes no line of its own; a slow one and a failed one do.
#[test]
fn requests_are_logged_only_when_slow_or_failed() {
    let mut command = support::headroom();
    command
        .args(["serve", "--device", "host", "--host-memory", "32MiB"])
        .env_remove("RUST_LOG")
        .env("HEADROOM_WAIT_SECONDS", "300")
        .env("HEADROOM_SLOW_REQUEST_SECONDS", "0.5");
    let mut server = ServerProcess::start(command);
    for _ in 0..20 {
        assert_eq!(server.http.get("/livez").0, 200);
    }
    let mut slow = support::job(&[1, 28, 28], &[128], 10, "sgd");
    slow["no_cache"] = json!(true);
    assert_eq!(server.http.tune(&slow, &[]).status, 200);
    let log = server.log();
    assert!(!log.contains("/livez"), "{log}");
    assert!(!log.contains("finished processing request"), "{log}");
    assert!(
        log.contains("slow request") && log.contains("/tune"),
        "{log}"
    );
}

#[test]
fn a_misspelt_setting_is_named_in_a_warning() {
    let mut command = support::headroom();
    command
        .args(["serve", "--device", "host"])
        .env("HEADROOM_QUEUE_LENGHT", "3");
    let mut server = ServerProcess::start(command);
    let log = server.log();
    assert!(
        log.contains("HEADROOM_QUEUE_LENGHT is not a setting"),
        "{log}"
    );
}

#[test]
fn the_cli_waits_for_a_busy_server_as_it_says_and_no_longer_than_its_timeout() {
    let server = TestServer::start(Config {
        queue_length: 1,
        wait_seconds: 1,
        host_memory: bytesize::ByteSize::mib(64),
        ..host_config()
    });
    let mut running = slow_job();
    running["model"]["hidden_layers"] = json!([127]);
    let running = server.tune(&running, &[("Prefer", "respond-async")]).body;
    server.wait_until_running(running["id"].as_str().unwrap());
    let queued = server
        .tune(&slow_job(), &[("Prefer", "respond-async")])
        .body;
    let started = std::time::Instant::now();
    let output = support::headroom()
        .args([
            "tune",
            "-",
            "--server",
            &server.base,
            "--device",
            "host",
            "--timeout",
            "3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            let job = job(&[8], &[4], 2, "sgd").to_string();
            child.stdin.take().unwrap().write_all(job.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(log.contains("retrying in"), "{log}");
    assert!(log.contains("--timeout"), "{log}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    for id in [&running["id"], &queued["id"]] {
        server.delete(&format!("/jobs/{}", id.as_str().unwrap()));
    }
}

/// Headless Chromium (Debian's package; CI installs it and sets HEADROOM_REQUIRE_CHROMIUM=1), with
/// the flags a closed network needs and its profile in `profile`; `None`, having said so, when it
/// is missing.
fn chromium(profile: &std::path::Path) -> Option<Command> {
    let Some(path) = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    }) else {
        support::skip_or_fail("CHROMIUM", "chromium is not installed");
        return None;
    };
    let mut command = Command::new(path);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1800",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    Some(command)
}

/// An id no job has.
fn uuid_like() -> &'static str {
    "00000000-0000-4000-8000-000000000000"
}

#[test]
fn the_status_pages_render_in_a_browser_with_the_answer_and_both_charts() {
    let server = TestServer::start(host_config());
    let mut cifar = job(&[3, 32, 32], &[128], 10, "adam");
    cifar["target_batch_size"] = json!(4096);
    let answer = server.tune(&cifar, &[]);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let result = answer.body;
    let (_, jobs) = server.get("/jobs");
    let id = jobs[0]["id"].as_str().unwrap().to_string();
    let profile = tempfile::tempdir().unwrap();
    let Some(mut browser) = chromium(profile.path()) else {
        return;
    };
    let page = format!("{}/jobs/{id}", server.base);
    let output = browser.arg("--dump-dom").arg(&page).output().unwrap();
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (id, key) in [
        ("max-batch-size", "max_batch_size"),
        ("recommended-batch-size", "recommended_batch_size"),
        ("throughput-batch-size", "throughput_batch_size"),
    ] {
        let shown = format!("id=\"{id}\">{}<", result[key]);
        assert!(dom.contains(&shown), "{shown} not in the rendered page");
    }
    assert_eq!(dom.matches("<svg").count(), 1, "one SVG holds both charts");
    for chart in [
        "Device memory against batch size",
        "Training speed against batch size",
    ] {
        assert!(dom.contains(chart), "{chart} not rendered");
    }
    let accumulation = &result["accumulation"];
    assert!(dom.contains(&format!(
        "micro batch × steps × GPUs = {}",
        accumulation["global_batch_size"]
    )));
    // The page, the job document and the list say what was tuned.
    let model = "MLP 3x32x32-128-10 relu, adam, 32-true, pytorch";
    assert!(
        dom.contains(model),
        "the model's summary is not on the page"
    );
    let (_, document) = server.get(&format!("/jobs/{id}"));
    assert_eq!(document["model"], model);
    assert_eq!(document["request"]["target_batch_size"], 4096);
    assert_eq!(document["request"]["search"]["multiple_of"], 8);
    assert_eq!(jobs[0]["model"], model);
    // A browser that opens a job that is not there gets a page, not JSON.
    let missing = chromium(profile.path())
        .unwrap()
        .arg("--dump-dom")
        .arg(format!("{}/jobs/{}", server.base, uuid_like()))
        .output()
        .unwrap();
    let missing = String::from_utf8_lossy(&missing.stdout);
    assert!(
        missing.contains("<h1>Not found</h1>") && missing.contains("no job"),
        "{missing}"
    );

    let home = chromium(profile.path())
        .unwrap()
        .arg("--dump-dom")
        .arg(&server.base)
        .output()
        .unwrap();
    let home = String::from_utf8_lossy(&home.stdout);
    assert!(
        home.contains("id=\"devices\"") && home.contains(&id[..8]),
        "{home}"
    );

    // The screenshot is kept as a test artefact.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("job-page.png");
    let _ = std::fs::remove_file(&shot);
    let output = chromium(profile.path())
        .unwrap()
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&page)
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 20_000,
        "an empty screenshot"
    );
    eprintln!("screenshot of the job page: {}", shot.display());
}

#[test]
fn a_running_job_page_grows_in_place_until_the_answer() {
    let server = TestServer::start(Config {
        host_memory: bytesize::ByteSize::mib(64),
        ..host_config()
    });
    let async_id = |job: &Value| {
        server.tune(job, &[("Prefer", "respond-async")]).body["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // A job that holds the device, so the one under test waits in the queue for as long as the
    // browser needs.
    let mut holding = slow_job();
    holding["model"]["hidden_layers"] = json!([129]);
    let holding = async_id(&holding);
    server.wait_until_running(&holding);
    let mut watched = job(&[3, 32, 32], &[128], 10, "adam");
    watched["no_cache"] = json!(true);
    let watched = async_id(&watched);
    let path = format!("/jobs/{watched}");
    let queued = server.get_html(&path);
    assert!(
        queued.contains("data-live=\"2\"") && queued.contains("id=\"progress\">Queued for "),
        "a waiting job's page is live and says so: {queued}"
    );
    assert!(
        queued.contains("<noscript><meta http-equiv=\"refresh\""),
        "a meta refresh only without scripts"
    );
    let profile = tempfile::tempdir().unwrap();
    if chromium(profile.path()).is_none() {
        return;
    }
    // Virtual time runs the page's timers, each fetch taking real time: the page swaps its
    // content in place, and stays live while the job waits.
    let browse = || {
        let output = chromium(profile.path())
            .unwrap()
            .arg("--virtual-time-budget=20000")
            .arg("--dump-dom")
            .arg(format!("{}{path}", server.base))
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    // While the job waits its page does not change: every poll is a bodiless 304, nothing is
    // swapped, and the browser counts the time waited on by itself.
    let waiting = browse();
    assert!(
        waiting.contains("data-polls=") && waiting.contains("data-live"),
        "the waiting page did not poll: {waiting}"
    );
    assert!(
        !waiting.contains("data-refreshes="),
        "an unchanged page was fetched again: {waiting}"
    );
    let counted = |page: &str| -> Option<(f64, f64)> {
        let at = page.find("data-elapsed=\"")? + "data-elapsed=\"".len();
        let (served, rest) = page[at..].split_once("\">")?;
        let (shown, _) = rest.split_once(" s<")?;
        Some((served.parse().ok()?, shown.parse().ok()?))
    };
    let (served, shown) = counted(&waiting).expect("the waiting page shows how long");
    assert!(
        waiting.contains("Queued for ") && shown >= served + 5.0,
        "the browser did not count the wait on ({served} s served, {shown} s shown): {waiting}"
    );
    let (status, etag, _) = server.get_html_if_none_match(&path, None);
    assert_eq!(status, 200);
    let etag = etag.expect("a job's page has an ETag");
    let (status, _, body) = server.get_html_if_none_match(&path, Some(&etag));
    assert_eq!(
        (status, body.as_str()),
        (304, ""),
        "the page had not changed"
    );
    server.delete(&format!("/jobs/{holding}"));
    // Running: how long and how far, and the charts of the probes so far.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let page = server.get_html(&path);
        if page.contains("id=\"progress\">Running for ")
            && page.contains("Training speed against batch size")
        {
            assert!(page.contains("probe(s), the largest fit "), "{page}");
            let (status, _, _) = server.get_html_if_none_match(&path, Some(&etag));
            assert_eq!(
                status, 200,
                "the page of a job that has probed is a new version"
            );
            break;
        }
        assert!(
            !page.contains("id=\"max-batch-size\""),
            "the job finished before its page showed it running"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the watched job never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    while server.get(&path).1["state"] != "succeeded" {
        assert!(
            std::time::Instant::now() < deadline,
            "the watched job did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let done = browse();
    let (_, document) = server.get(&path);
    assert!(
        done.contains(&format!(
            "id=\"max-batch-size\">{}<",
            document["result"]["max_batch_size"]
        )),
        "the finished page has the answer: {done}"
    );
    assert!(
        !done.contains("data-live"),
        "a finished job's page does not poll: {done}"
    );
}

#[test]
fn estimate_answers_for_a_card_every_card_or_an_unknown_one() {
    let server = TestServer::start(host_config());
    let post = |body: &Value| {
        support::Http {
            base: server.base.clone(),
        }
        .post_json("/estimate", body)
    };
    let mut request = job(&[1, 28, 28], &[128], 10, "sgd");
    request["gpu"] = json!("H200 141GB");
    let (status, answer) = post(&request);
    assert_eq!(status, 200, "{answer}");
    assert!(answer["note"]
        .as_str()
        .unwrap()
        .contains("not a measurement"));
    let h200 = &answer["estimates"][0];
    assert_eq!(h200["gpu"], "H200 141GB");
    assert!(
        h200["estimate"]["predicted_max_batch_size"]
            .as_u64()
            .unwrap()
            > 20_000_000
    );
    request.as_object_mut().unwrap().remove("gpu");
    let (_, every) = post(&request);
    assert!(every["estimates"].as_array().unwrap().len() >= 8);
    request["gpu"] = json!("TPU v5");
    let (status, problem) = post(&request);
    assert_eq!((status, problem["field"].as_str()), (422, Some("gpu")));
    assert!(problem["detail"].as_str().unwrap().contains("H100 80GB"));
    // Over token ids, the answer at each sequence length, the job's own among them.
    let mut gpt: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/gpt2-small.json"
        ))
        .unwrap(),
    )
    .unwrap();
    gpt["gpu"] = json!("H100 80GB");
    let (status, answer) = post(&gpt);
    assert_eq!(status, 200, "{answer}");
    let estimate = &answer["estimates"][0]["estimate"];
    let lengths: Vec<u64> = estimate["sequence_lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sequence_length"].as_u64().unwrap())
        .collect();
    assert_eq!(lengths, [128, 256, 512, 1024]);
    let own = &estimate["sequence_lengths"][3];
    assert_eq!(
        own["predicted_max_batch_size"],
        estimate["predicted_max_batch_size"]
    );
    assert_eq!(own["recommended_tokens"], estimate["recommended_tokens"]);
    // A model over values has none.
    assert!(every["estimates"][0]["estimate"]
        .get("sequence_lengths")
        .is_none());
    // A Hugging Face config of the Llama family is read as its layer list: SmolLM2-135M's.
    let config = json!({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000, "tie_word_embeddings": true,
        "vocab_size": 49152, "hidden_act": "silu", "max_position_embeddings": 8192
    });
    let smollm2 = json!({
        "model": {"huggingface": config, "tokens": {"sequence_length": 2048}},
        "optimizer": {"name": "adamw"}, "precision": "bf16-mixed", "gpu": "H100 80GB"
    });
    let (status, answer) = post(&smollm2);
    assert_eq!(status, 200, "{answer}");
    let estimate = &answer["estimates"][0]["estimate"];
    assert_eq!(estimate["parameter_count"], 134_515_008);
    assert!(estimate.get("fsdp_world_size").is_none());
    // Sharded with FSDP over 8 GPUs, the answer says it is one GPU's; over one, refused.
    let mut sharded = smollm2.clone();
    sharded["sharding"] = json!("fsdp");
    sharded["world_size"] = json!(8);
    let (status, answer) = post(&sharded);
    assert_eq!(status, 200, "{answer}");
    let estimate = &answer["estimates"][0]["estimate"];
    assert_eq!(estimate["fsdp_world_size"], 8);
    assert_eq!(estimate["fsdp_reshard_after_forward"], true);
    let mut kept = sharded.clone();
    kept["reshard_after_forward"] = json!(false);
    let (status, answer) = post(&kept);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["estimates"][0]["estimate"]["fsdp_reshard_after_forward"],
        false
    );
    kept["sharding"] = json!("none");
    let (status, problem) = post(&kept);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("reshard_after_forward"))
    );
    sharded["world_size"] = json!(1);
    let (status, problem) = post(&sharded);
    assert_eq!((status, problem["field"].as_str()), (422, Some("sharding")));
    let mut phi = smollm2.clone();
    phi["model"]["huggingface"]["model_type"] = json!("phi3");
    let (status, problem) = post(&phi);
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("model.huggingface.model_type"))
    );
}
