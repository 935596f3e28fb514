//! The CUDA stand-in: `tests/standin/` (a CPU stand-in for `libcuda.so.1` and
//! `libnvidia-ml.so.1`) over the kernel emulation of `tests/emulation/`, built here with g++ and
//! found by cudarc and nvml-wrapper through `LD_LIBRARY_PATH`, as the real libraries are.
//!
//! It is a test fixture: it proves headroom's Rust side (launch arguments, module loading,
//! allocation, the OOM-versus-fault split, leak checks, context rebuilds, NVML) and the kernels'
//! arithmetic. It never says anything about speed or real hardware.

use std::collections::hash_map::DefaultHasher;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use headroom_devices::cuda::kernel::Family;

/// Set in a child process the stand-in runs a test in.
const CHILD: &str = "HEADROOM_STANDIN_CHILD";

/// The built stand-in libraries.
pub struct StandIn {
    dir: PathBuf,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every file the build reads, for the cache key.
fn sources() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = [
        "tests/emulation/emulate.h",
        "tests/emulation/emulate.cpp",
        "tests/standin/standin.h",
        "tests/standin/driver.cpp",
        "tests/standin/nvml.cpp",
    ]
    .iter()
    .map(|f| root().join(f))
    .collect();
    files.extend(
        Family::ALL
            .iter()
            .map(|f| root().join("crates/devices/kernels").join(f.file())),
    );
    files.extend(
        Family::HEADERS
            .iter()
            .map(|h| root().join("crates/devices/kernels").join(h)),
    );
    files
}

/// `kernels.inc`: an #include of every kernel file and the list of their entry points, so the
/// emulation's kernel table is generated from the sources, never written by hand.
fn kernel_table() -> String {
    let mut text = String::new();
    let mut entries = Vec::new();
    for header in Family::HEADERS {
        let path = root().join("crates/devices/kernels").join(header);
        text.push_str(&format!("#include \"{}\"\n", path.display()));
    }
    for family in Family::ALL {
        let path = root().join("crates/devices/kernels").join(family.file());
        text.push_str(&format!("#include \"{}\"\n", path.display()));
        entries.extend(family.entry_points());
    }
    let list: Vec<String> = entries.iter().map(|e| format!("X({e})")).collect();
    text.push_str(&format!("#define HEADROOM_KERNELS(X) {}\n", list.join(" ")));
    text
}

fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Compiles the two libraries into `dir`: g++ -O3 for the kernels, the two objects in parallel.
fn build(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("kernels.inc"), kernel_table()).map_err(|e| e.to_string())?;
    let compile = |source: &str, object: &str, optimisation: &str| {
        let mut command = Command::new("g++");
        command
            .args([
                "-std=c++20",
                optimisation,
                "-march=native",
                "-fPIC",
                "-fvisibility=hidden",
            ])
            .args(["-pthread", "-c"])
            .arg("-I")
            .arg(dir)
            .arg(root().join(source))
            .arg("-o")
            .arg(dir.join(object));
        command
    };
    let mut kernels = compile("tests/emulation/emulate.cpp", "emulate.o", "-O3")
        .spawn()
        .map_err(|e| format!("g++: {e}"))?;
    run(&mut compile("tests/standin/driver.cpp", "driver.o", "-O2"))?;
    if !kernels.wait().map_err(|e| e.to_string())?.success() {
        return run(&mut compile(
            "tests/emulation/emulate.cpp",
            "emulate.o",
            "-O3",
        ));
    }
    run(Command::new("g++")
        .args(["-shared", "-pthread", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(dir.join("libcuda.so.1"))
        .arg(dir.join("emulate.o"))
        .arg(dir.join("driver.o")))?;
    run(Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-fPIC",
            "-fvisibility=hidden",
            "-shared",
        ])
        .arg(root().join("tests/standin/nvml.cpp"))
        .arg("-L")
        .arg(dir)
        .args([
            "-l:libcuda.so.1",
            "-Wl,-rpath,$ORIGIN",
            "-Wl,-soname,libnvidia-ml.so.1",
            "-o",
        ])
        .arg(dir.join("libnvidia-ml.so.1")))
}

impl StandIn {
    /// The stand-in, built once per change of its sources (cached under the target directory);
    /// `None`, having said so, when g++ or NVRTC (which compiles the kernels for it) is missing.
    /// CI sets `HEADROOM_REQUIRE_STANDIN=1`, which makes that a failure.
    pub fn get() -> Option<&'static StandIn> {
        static STANDIN: OnceLock<Option<StandIn>> = OnceLock::new();
        STANDIN
            .get_or_init(|| {
                if !headroom_devices::cuda::compile::nvrtc_available() {
                    super::skip_or_fail("STANDIN", "NVRTC is not on the loader path");
                    return None;
                }
                if Command::new("g++").arg("--version").output().is_err() {
                    super::skip_or_fail("STANDIN", "g++ is not installed");
                    return None;
                }
                let mut hasher = DefaultHasher::new();
                for file in sources() {
                    std::fs::read(&file)
                        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
                        .hash(&mut hasher);
                }
                let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .join(format!("cuda-standin-{:016x}", hasher.finish()));
                if !dir.join("libnvidia-ml.so.1").exists() {
                    let staging = dir.with_extension(format!("building-{}", std::process::id()));
                    build(&staging).unwrap_or_else(|e| panic!("building the CUDA stand-in: {e}"));
                    // Another test binary may have finished first; either copy is the same.
                    let _ = std::fs::rename(&staging, &dir);
                    let _ = std::fs::remove_dir_all(&staging);
                }
                Some(StandIn { dir })
            })
            .as_ref()
    }

    /// `LD_LIBRARY_PATH` with the stand-in first, then whatever the tests run with (NVRTC).
    pub fn library_path(&self) -> OsString {
        let mut path = OsString::from(&self.dir);
        if let Some(rest) = std::env::var_os("LD_LIBRARY_PATH") {
            path.push(":");
            path.push(rest);
        }
        path
    }

    /// The `headroom` binary with the stand-in as its CUDA driver and NVML, and a state
    /// directory of its own, through which the stand-in's NVML lists the contexts of every
    /// process the command starts (its probe workers), as the real NVML does.
    pub fn headroom(&self) -> Command {
        static COMMANDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let number = COMMANDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let state = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("cuda-standin-state")
            .join(format!("{}-{number}", std::process::id()));
        std::fs::create_dir_all(&state).expect("a state directory for the stand-in");
        let mut command = super::headroom();
        command
            .env("LD_LIBRARY_PATH", self.library_path())
            .env("HEADROOM_STANDIN_STATE_DIR", state);
        command
    }

    /// Runs the test named `test` of this binary again in a child process whose loader finds
    /// the stand-in (the loader path is read once, at process start), with `env` set. Returns
    /// true in the parent, after the child passed, and false in the child, which runs the rest.
    pub fn in_child(&self, test: &str, env: &[(&str, &str)]) -> bool {
        if std::env::var_os(CHILD).is_some() {
            return false;
        }
        let output = Command::new(std::env::current_exe().expect("the test binary's path"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .env("LD_LIBRARY_PATH", self.library_path())
            .envs(env.iter().copied())
            .output()
            .expect("the test binary runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && text.contains("1 passed"),
            "{test} on the CUDA stand-in:\n{text}"
        );
        true
    }
}
