//! headroom's PyTorch profile against PyTorch's own accounting of the same step, without a GPU:
//! `tests/pytorch/memory_check.py` runs PyTorch's `MemTracker` under `FakeTensorMode` for every
//! example, every precision and batch sizes from 1 to 65 536, and compares the peaks (within 3%,
//! and by category where both name the same thing). It needs a `python3` with PyTorch
//! (`.ci/run` installs it); without one the test says it skipped, and `HEADROOM_REQUIRE_TORCH=1`
//! makes that a failure.

mod support;

use std::path::Path;
use std::process::Command;

/// The `python3` on `PATH`, if it imports torch.
fn python_with_torch() -> Option<&'static str> {
    let imports = Command::new("python3")
        .args(["-c", "import torch"])
        .output()
        .is_ok_and(|output| output.status.success());
    imports.then_some("python3")
}

#[test]
fn the_pytorch_profile_is_pytorchs_peak_for_every_example_and_precision() {
    let Some(python) = python_with_torch() else {
        support::skip_or_fail("TORCH", "no python3 with torch on PATH");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut examples: Vec<_> = std::fs::read_dir(root.join("examples"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "{examples:?}");
    let output = Command::new(python)
        .arg(root.join("tests/pytorch/memory_check.py"))
        .args(["--headroom", env!("CARGO_BIN_EXE_headroom")])
        .args(&examples)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every example in every precision at every batch size was compared.
    let compared = examples.len() * 4 * 5;
    assert!(
        stdout.contains(&format!("{compared} comparisons")),
        "{stdout}"
    );
}
