//! What the integration tests share: job builders, the all-pass assertion, an HTTP client, a
//! `headroom serve` process, and the CUDA stand-in (`tests/standin/`).
//!
//! Each test binary uses part of this module.
#![allow(dead_code)]

pub mod postgres;
pub mod standin;
pub mod store;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use headroom_devices::parity::Check;
use serde_json::{json, Value};

/// An MLP job: `input_shape` through `hidden` widths to `classes`, trained with `optimizer`.
/// Writes `contents` to a new temporary file whose name ends in `suffix`; the file is removed
/// when the returned path drops.
pub fn temp_file(suffix: &str, contents: impl AsRef<[u8]>) -> tempfile::TempPath {
    use std::io::Write;
    let mut file = tempfile::Builder::new()
        .prefix("headroom-")
        .suffix(suffix)
        .tempfile()
        .unwrap();
    file.write_all(contents.as_ref()).unwrap();
    file.into_temp_path()
}

/// A job written to a temporary JSON file, as the CLI and the deploy scripts read jobs.
pub fn job_file(job: &Value) -> tempfile::TempPath {
    temp_file(".json", job.to_string())
}

pub fn job(input_shape: &[u64], hidden: &[u64], classes: u64, optimizer: &str) -> Value {
    json!({"model": {"input_shape": input_shape, "hidden_layers": hidden, "num_classes": classes},
           "optimizer": {"name": optimizer}})
}

/// Asserts that every check of a device passed, listing the ones that did not.
pub fn assert_all_pass(device: &str, checks: &[Check]) {
    assert!(!checks.is_empty(), "{device}: no checks ran");
    let failed: Vec<_> = checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{device}: {failed:#?}");
}

/// Runs `command` and asserts that it succeeded, showing what it printed if not.
pub fn run_ok(what: &str, command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A tool a test needs is missing: a failure when `HEADROOM_REQUIRE_<what>=1` (CI sets it),
/// otherwise a line saying the test skipped.
pub fn skip_or_fail(what: &str, why: &str) {
    let variable = format!("HEADROOM_REQUIRE_{what}");
    assert_ne!(
        std::env::var(&variable).as_deref(),
        Ok("1"),
        "{variable}=1 but {why}"
    );
    eprintln!("skipped: {why} (set {variable}=1 to make this a failure)");
}

/// A command-line tool from the project's Python tools (`.ci/run` installs them into a
/// virtual environment on `PATH`: openapi-spec-validator, schemathesis), or `None`, having said
/// so, when it is missing. CI sets `HEADROOM_REQUIRE_PYTHON_TOOLS=1`, which makes that a failure.
pub fn python_tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        skip_or_fail("PYTHON_TOOLS", &format!("{name} is not on PATH"));
    }
    found
}

/// The value of the series of `metric` in a Prometheus exposition whose labels include every
/// one of `labels`.
pub fn metric_value(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(metric)?;
        let (label_text, value) = if let Some(rest) = rest.strip_prefix('{') {
            let (labels, value) = rest.split_once("} ")?;
            (labels, value)
        } else {
            ("", rest.strip_prefix(' ')?)
        };
        let all = labels
            .iter()
            .all(|(name, value)| label_text.contains(&format!("{name}=\"{value}\"")));
        all.then(|| value.trim().parse().ok()).flatten()
    })
}

/// The `headroom` binary, run from the repository root.
pub fn headroom() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_headroom"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

/// An HTTP answer: status, headers of interest and the JSON body (null when not JSON).
pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub retry_after: Option<String>,
    pub location: Option<String>,
    pub body: Value,
}

/// A client of one server.
#[derive(Clone)]
pub struct Http {
    pub base: String,
}

impl Http {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn answer(response: ureq::http::Response<ureq::Body>) -> Answer {
        let mut response = response;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (content_type, retry_after, location) = (
            header("content-type"),
            header("retry-after"),
            header("location"),
        );
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        Answer {
            status,
            content_type,
            retry_after,
            location,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }

    /// `GET path`, as JSON.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let answer = Self::answer(
            Self::agent()
                .get(format!("{}{path}", self.base))
                .call()
                .unwrap(),
        );
        (answer.status, answer.body)
    }

    /// `GET path`, as text.
    pub fn get_text(&self, path: &str) -> String {
        self.text_of(path, None)
    }

    /// `GET path` as a browser asks for it (HTML first), as text.
    pub fn get_html(&self, path: &str) -> String {
        self.text_of(
            path,
            Some("text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"),
        )
    }

    /// `GET path` as a polling page asks for it: HTML, with `If-None-Match` when given. Returns
    /// the status, the `ETag` and the body.
    pub fn get_html_if_none_match(
        &self,
        path: &str,
        etag: Option<&str>,
    ) -> (u16, Option<String>, String) {
        let mut request = Self::agent()
            .get(format!("{}{path}", self.base))
            .header("Accept", "text/html");
        if let Some(etag) = etag {
            request = request.header("If-None-Match", etag);
        }
        let mut response = request.call().unwrap();
        let etag = response
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        let status = response.status().as_u16();
        (status, etag, response.body_mut().read_to_string().unwrap())
    }

    fn text_of(&self, path: &str, accept: Option<&str>) -> String {
        let mut request = Self::agent().get(format!("{}{path}", self.base));
        if let Some(accept) = accept {
            request = request.header("Accept", accept);
        }
        request.call().unwrap().body_mut().read_to_string().unwrap()
    }

    /// `POST path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let answer = Self::answer(
            Self::agent()
                .post(format!("{}{path}", self.base))
                .header("Content-Type", "application/json")
                .send(body.to_string().as_bytes())
                .unwrap(),
        );
        (answer.status, answer.body)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> (u16, Value) {
        let answer = Self::answer(
            Self::agent()
                .delete(format!("{}{path}", self.base))
                .call()
                .unwrap(),
        );
        (answer.status, answer.body)
    }

    /// `POST /tune` with `body` as JSON and extra headers.
    pub fn tune(&self, body: &Value, headers: &[(&str, &str)]) -> Answer {
        self.tune_raw(&body.to_string(), "application/json", headers)
    }

    /// `POST /tune` with any body and content type. Every error must be a problem document.
    pub fn tune_raw(&self, body: &str, content_type: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = Self::agent()
            .post(format!("{}/tune", self.base))
            .header("Content-Type", content_type);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let answer = Self::answer(request.send(body.as_bytes()).unwrap());
        if answer.status >= 400 {
            assert_eq!(
                answer.content_type.as_deref(),
                Some("application/problem+json"),
                "{} {}",
                answer.status,
                answer.body
            );
            assert_eq!(answer.body["status"], answer.status, "{}", answer.body);
            assert!(
                answer.body["detail"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{}",
                answer.body
            );
        }
        answer
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get("/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "the server never became ready");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a job until it finishes.
    pub fn wait_for(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let (status, job) = self.get(&format!("/jobs/{id}"));
            assert_eq!(status, 200, "{job}");
            if matches!(
                job["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "interrupted")
            ) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never finished: {job}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls a job until it runs.
    pub fn wait_until_running(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.get(&format!("/jobs/{id}")).1["state"] != "running" {
            assert!(Instant::now() < deadline, "job {id} never started");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A `headroom serve` process on an ephemeral loopback port, its log lines collected.
pub struct ServerProcess {
    pub child: Child,
    pub http: Http,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl ServerProcess {
    /// Starts `command` (a `headroom serve` without `--bind`) and waits until it is ready. Its
    /// store is in memory unless the command names one.
    pub fn start(mut command: Command) -> ServerProcess {
        if !command.get_envs().any(|(name, _)| name == "HEADROOM_STORE") {
            command.env("HEADROOM_STORE", "sqlite::memory:");
        }
        let mut child = command
            .args(["--bind", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("headroom serve starts");
        let (send, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        let mut log = Vec::new();
        let address = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!("the server never logged its address:\n{}", log.join("\n"))
                });
            log.push(line.clone());
            if let Some(rest) = line.split("address=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        let server = ServerProcess {
            child,
            http: Http {
                base: format!("http://{address}"),
            },
            lines,
            log,
        };
        server.http.wait_ready();
        server
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the server did not stop"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process at once (SIGKILL: no shutdown of any kind) and waits for it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Every log line so far.
    pub fn log(&mut self) -> String {
        self.log.extend(self.lines.try_iter());
        self.log.join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
