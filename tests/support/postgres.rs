//! A private PostgreSQL server per test (Debian's `postgresql` package: CI installs it and sets
//! HEADROOM_REQUIRE_POSTGRES=1): its own data directory and port, so tests run in parallel and
//! one can stop it mid-run. PostgreSQL refuses to run as root, so as root it runs as `nobody`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The user id unprivileged processes of the tests run as when the tests run as root.
const NOBODY: u32 = 65534;

/// Whether this process runs as root (`/proc/self` belongs to the effective user).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `program` run as `nobody` when the tests run as root, else as the tests' user.
pub fn unprivileged(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid",
                &NOBODY.to_string(),
                "--regid",
                &NOBODY.to_string(),
            ])
            .args(["--clear-groups", "--"])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Makes `path` belong to the user [`unprivileged`] runs as.
pub fn give_to_unprivileged(path: &Path) {
    if is_root() {
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

/// The directory of `pg_ctl` and `initdb`: on the PATH, else Debian's.
fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("pg_ctl").is_file() && dir.join("initdb").is_file())
    });
    on_path.or_else(|| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
            .filter(|bin| bin.join("pg_ctl").is_file())
            .collect();
        versions.sort();
        versions.pop()
    })
}

/// A running PostgreSQL server, stopped and removed when dropped.
pub struct Postgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    /// Initialises and starts a server; `None`, having said so, when PostgreSQL is missing.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = binaries() else {
            super::skip_or_fail("POSTGRES", "PostgreSQL (pg_ctl, initdb) is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        give_to_unprivileged(&data);
        super::run_ok(
            "initdb",
            unprivileged(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "headroom", "--auth=trust", "--no-sync"]),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = Postgres {
            _dir: dir,
            data,
            bin,
            port,
        };
        server.pg_ctl(&["start"]);
        Some(server)
    }

    /// The URL headroom's `store` setting takes.
    pub fn url(&self) -> String {
        format!("postgres://headroom@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (fast: connections are cut).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast"]);
    }

    /// Starts the server again after [`Postgres::stop`].
    pub fn restart(&self) {
        self.pg_ctl(&["start"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.data.display()
        );
        super::run_ok(
            &format!("pg_ctl {args:?}"),
            unprivileged(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.data.join("server.log"))
                .args(["-w", "-o", &options])
                .args(args),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = unprivileged(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate"])
            .output();
    }
}
