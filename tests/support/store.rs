//! What the store tests share: `headroom serve` over a given store, jobs quick and slow, metric
//! readings, readiness, a store an unprivileged server can be made to fail on, a start that
//! must be refused, and one tokio runtime.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use std::process::Command;

use super::postgres;
use super::ServerProcess;

/// Runs `future` on the one runtime of these tests: a store's pooled connections belong to the
/// runtime that opened them, and fail once it is dropped.
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> =
        std::sync::LazyLock::new(|| tokio::runtime::Runtime::new().unwrap());
    RUNTIME.block_on(future)
}

/// `headroom serve` on the host device over `store`, named `node`.
pub fn serve(store: &str, node: &str, env: &[(&str, &str)]) -> ServerProcess {
    let mut command = super::headroom();
    command
        .args(["serve", "--device", "host", "--host-memory", "64MiB"])
        .env("HEADROOM_STORE", store)
        .env("HEADROOM_NODE_NAME", node)
        .envs(env.iter().copied());
    ServerProcess::start(command)
}

/// A job that tunes in a moment; `width` makes jobs distinct.
pub fn quick_job(width: u64) -> Value {
    let mut job = super::job(&[16], &[width], 4, "sgd");
    job["search"] = json!({"max": 1024});
    job
}

/// A job whose probes each take a while.
pub fn slow_job(width: u64) -> Value {
    let mut job = super::job(&[3, 32, 32], &[width], 10, "adam");
    job["search"] = json!({"steps_per_probe": 200, "start": 64});
    job
}

pub fn metric(server: &ServerProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    let exposition = server.http.get_text("/metrics");
    super::metric_value(&exposition, name, labels).unwrap_or(0.0)
}

pub fn probes(server: &ServerProcess) -> f64 {
    ["fit", "oom"]
        .iter()
        .map(|outcome| metric(server, "headroom_probes_total", &[("outcome", outcome)]))
        .sum()
}

/// The `headroom` binary somewhere an unprivileged user may run it: in place when it can,
/// else copied into `dir`.
fn unprivileged_headroom(dir: &Path) -> Command {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_headroom"));
    let runs = postgres::unprivileged(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let binary = if runs {
        binary
    } else {
        let copy = dir.join("headroom");
        std::fs::copy(&binary, &copy).unwrap();
        copy
    };
    let mut command = postgres::unprivileged(&binary);
    command.current_dir(dir);
    command
}

pub fn readiness(server: &ServerProcess) -> Value {
    let (status, ready) = server.http.get("/readyz");
    assert_eq!(
        status, 200,
        "a failing store never unreadies the service: {ready}"
    );
    ready
}

pub fn wait_for_store(server: &ServerProcess, healthy: bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = readiness(server);
        if ready["store"]["healthy"] == healthy {
            return ready;
        }
        assert!(Instant::now() < deadline, "{ready}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A SQLite store in a directory of an unprivileged user, served by that user: root ignores
/// file modes, so only then does making the store read-only bind the server.
pub struct UnprivilegedStore {
    dir: tempfile::TempDir,
    data: PathBuf,
    /// The SQLite file.
    pub file: PathBuf,
}

impl UnprivilegedStore {
    pub fn new() -> UnprivilegedStore {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        postgres::give_to_unprivileged(&data);
        let file = data.join("headroom.db");
        UnprivilegedStore { dir, data, file }
    }

    /// The store's URL.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.file.display())
    }

    /// `headroom serve` on the host device over the store, as the unprivileged user, named
    /// `node`.
    pub fn serve(&self, node: &str) -> ServerProcess {
        let mut command = unprivileged_headroom(self.dir.path());
        command
            .args(["serve", "--device", "host", "--host-memory", "64MiB"])
            .env("HEADROOM_STORE", self.url())
            .env("HEADROOM_NODE_NAME", node);
        ServerProcess::start(command)
    }

    /// Makes the file and its directory read-only (or writable again): writes fail.
    pub fn set_writable(&self, writable: bool) {
        if writable {
            set_mode(&self.data, 0o755);
            set_mode(&self.file, 0o644);
        } else {
            set_mode(&self.file, 0o444);
            set_mode(&self.data, 0o555);
        }
    }
}

/// Runs `headroom serve` on `store` and expects it to refuse to start.
pub fn refused_start(store: &str) -> String {
    let mut child = super::headroom()
        .args(["serve", "--device", "host", "--bind", "127.0.0.1:0"])
        .env("HEADROOM_STORE", store)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server started on a bad store"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}
