//! headroom's PyTorch profile against PyTorch's own accounting of the same step, without a GPU:
//! `tests/pytorch/memory_check.py` runs PyTorch's `MemTracker` under `FakeTensorMode` for every
//! example (torchvision's own modules for the torchvision ones) in every precision at several
//! batch sizes, and for 300 layer lists drawn by a seeded generator over every layer kind (some
//! sharded with FSDP, against `FSDPMemTracker` over a fake process group), and requires the
//! peaks within 0.1% or 1 KiB (and by category where both name the same thing); then for the
//! jobs of `tests/pytorch/hugging-face/` (small Llama, Qwen2 and GPT-2 configs, SDPA and eager,
//! with LoRA and gradient checkpointing, sharded with FSDP; small ViT image classifiers), against
//! transformers' own model built from the config and trained as `model(input_ids,
//! labels=labels).loss` (`model(pixel_values, labels=labels).loss`).
//! `HEADROOM_MEMORY_CHECK_SEED` fixes the generator's seed (the run prints the one it used). It
//! needs a `python3` with PyTorch, torchvision, peft and transformers (`.ci/run` installs them);
//! without them the
//! test says it skipped, and `HEADROOM_REQUIRE_TORCH=1` makes that a failure.

mod support;

use std::path::{Path, PathBuf};
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

/// The `python3` on `PATH`, if it imports torch, torchvision, peft and transformers.
fn python_with_torch() -> Option<&'static str> {
    let imports = Command::new("python3")
        .args(["-c", "import torch, torchvision, peft, transformers"])
        .output()
        .is_ok_and(|output| output.status.success());
    imports.then_some("python3")
}

/// `memory_check.py` over `jobs` with `options`, against this build: its table, once it has
/// passed; `None` (after saying it skipped) without PyTorch.
fn memory_check(jobs: &[PathBuf], options: &[&str]) -> Option<String> {
    let Some(python) = python_with_torch() else {
        support::skip_or_fail(
            "TORCH",
            "no python3 with torch, torchvision, peft and transformers on PATH",
        );
        return None;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(python)
        .arg(root.join("tests/pytorch/memory_check.py"))
        .args(["--headroom", env!("CARGO_BIN_EXE_headroom")])
        .args(options)
        .args(jobs)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(stdout)
}

/// The JSON files of `folder` (under the repository), sorted.
fn jobs_in(folder: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut jobs: Vec<_> = std::fs::read_dir(root.join(folder))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    jobs.sort();
    jobs
}

#[test]
fn the_pytorch_profile_is_pytorchs_peak_for_every_example_and_precision() {
    let examples = jobs_in("examples");
    assert!(examples.len() >= 5, "{examples:?}");
    let seed = std::env::var("HEADROOM_MEMORY_CHECK_SEED").ok();
    let generated = GENERATED.to_string();
    let mut options = vec!["--random", &generated];
    if let Some(seed) = &seed {
        options.extend(["--seed", seed]);
    }
    let Some(stdout) = memory_check(&examples, &options) else {
        return;
    };
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

#[test]
fn hugging_face_models_peak_as_headroom_reads_their_configs() {
    let jobs = jobs_in("tests/pytorch/hugging-face");
    assert!(jobs.len() >= 4, "{jobs:?}");
    let options = ["--sequence-lengths", "32,64", "--batch-sizes", "1,4"];
    let Some(stdout) = memory_check(&jobs, &options) else {
        return;
    };
    // Every job at both batch sizes in the four precisions, a language model's at both lengths.
    let images = jobs
        .iter()
        .filter(|job| std::fs::read_to_string(job).unwrap().contains("\"vit\""))
        .count();
    assert!(images >= 1, "{jobs:?}");
    let compared = (jobs.len() - images) * 2 * 2 * 4 + images * 2 * 4;
    assert!(
        stdout.contains(&format!("{compared} comparisons")),
        "{stdout}"
    );
}
