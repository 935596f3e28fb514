//! headroom's PyTorch profile against PyTorch's own accounting of the same step, without a GPU:
//! `tests/pytorch/memory_check.py` runs PyTorch's `MemTracker` under `FakeTensorMode` for every
//! example (torchvision's own modules for the torchvision ones) in every precision at several
//! batch sizes, and for 300 layer lists drawn by a seeded generator over every layer kind (some
//! sharded with FSDP, against `FSDPMemTracker` over a fake process group), and requires the
//! peaks within 0.1% or 1 KiB (and by category where both name the same thing).
//! `HEADROOM_MEMORY_CHECK_SEED` fixes the generator's seed (the run prints the one it used). It
//! needs a `python3` with PyTorch, torchvision and peft (`.ci/run` installs them); without them the
//! test says it skipped, and `HEADROOM_REQUIRE_TORCH=1` makes that a failure.

mod support;

use std::path::Path;
use std::process::Command;

/// Layer lists the generator draws in one run.
const GENERATED: usize = 300;

/// The examples `memory_check.py` checks against torchvision's own modules (its `TORCHVISION`),
/// at three batch sizes; the others are built from their layer lists, at four.
const TORCHVISION: [&str; 4] = [
    "mobilenet-v2-imagenet",
    "resnet18-imagenet",
    "resnet50-imagenet",
    "vgg11-bn-imagenet",
];

/// The `python3` on `PATH`, if it imports torch, torchvision and peft.
fn python_with_torch() -> Option<&'static str> {
    let imports = Command::new("python3")
        .args(["-c", "import torch, torchvision, peft"])
        .output()
        .is_ok_and(|output| output.status.success());
    imports.then_some("python3")
}

#[test]
fn the_pytorch_profile_is_pytorchs_peak_for_every_example_and_precision() {
    let Some(python) = python_with_torch() else {
        support::skip_or_fail(
            "TORCH",
            "no python3 with torch, torchvision and peft on PATH",
        );
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
    let mut command = Command::new(python);
    command
        .arg(root.join("tests/pytorch/memory_check.py"))
        .args(["--headroom", env!("CARGO_BIN_EXE_headroom")])
        .args(["--random", &GENERATED.to_string()])
        .args(&examples);
    if let Ok(seed) = std::env::var("HEADROOM_MEMORY_CHECK_SEED") {
        command.args(["--seed", &seed]);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every example in every precision at every batch size (three for the torchvision ones,
    // four for the others) was compared, and every generated list.
    let torchvision = examples
        .iter()
        .filter(|path| {
            let name = path.file_stem().unwrap().to_string_lossy();
            TORCHVISION.contains(&name.as_ref())
        })
        .count();
    assert_eq!(torchvision, TORCHVISION.len(), "{examples:?}");
    let compared = (examples.len() - torchvision) * 4 * 4 + torchvision * 4 * 3 + GENERATED;
    assert!(
        stdout.contains(&format!("{compared} comparisons")),
        "{stdout}"
    );
}
