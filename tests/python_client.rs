//! The Python package under `clients/python`: its pytest suite against this build's `headroom
//! serve` (the client, the PyTorch model reader, the Lightning callback in a real fit, the
//! Accelerate helper), its type check (mypy, strict) and its wheel, built without writing into
//! the source tree.
//!
//! Needs Python with pytest, httpx, torch, torchvision, transformers, peft, lightning, accelerate
//! and mypy (`.ci/run` installs them into `.deps/venv`); without them the test says it skipped,
//! and with `HEADROOM_REQUIRE_PYTHON_CLIENT=1` fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{run_ok, skip_or_fail};

const MODULES: &str =
    "pytest, httpx, torch, torchvision, transformers, peft, lightning, accelerate, mypy";

fn package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

/// Whether `python3` has every module the package's tests need (saying so when not).
fn python_ready() -> bool {
    let has_modules = Command::new("python3")
        .args(["-c", &format!("import {MODULES}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_modules {
        skip_or_fail(
            "PYTHON_CLIENT",
            &format!("python3 lacks one of {MODULES} (.ci/run installs them)"),
        );
    }
    has_modules
}

#[test]
fn the_python_package_passes_its_tests_type_check_and_builds() {
    if !python_ready() {
        return;
    }
    let package = package();
    let mut pytest = Command::new("python3");
    pytest
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(&package)
        .env("PYTHONPATH", package.join("src"))
        .env("HEADROOM_BIN", env!("CARGO_BIN_EXE_headroom"));
    let output = run_ok("pytest over clients/python", &mut pytest);
    let summary = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        summary.contains(" passed") && !summary.contains("skipped"),
        "{summary}"
    );

    let mut mypy = Command::new("python3");
    mypy.args([
        "-m",
        "mypy",
        "--config-file",
        "pyproject.toml",
        "src",
        "tests",
    ])
    .current_dir(&package)
    .env("MYPYPATH", package.join("src"));
    run_ok("mypy over clients/python", &mut mypy);

    let wheels = tempfile::tempdir().unwrap();
    let mut wheel = Command::new("python3");
    wheel
        .args(["-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir"])
        .arg(wheels.path())
        .arg(&package);
    run_ok("building the wheel", &mut wheel);
    let written: Vec<PathBuf> = [
        package.join("build"),
        package.join("src/headroom_client.egg-info"),
    ]
    .into_iter()
    .filter(|path| path.exists())
    .collect();
    assert!(
        written.is_empty(),
        "building the package wrote into its source tree: {written:?}"
    );
    let built: Vec<String> = std::fs::read_dir(wheels.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        built.len() == 1 && built[0].starts_with("headroom_client-") && built[0].ends_with(".whl"),
        "{built:?}"
    );
}
