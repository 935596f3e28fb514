//! `scripts/gpu-check.sh`, the one prepared call for a GPU, run on the CUDA stand-in: every
//! section runs and writes its fields, and the report says it is the stand-in. This proves the
//! script, not a GPU.

mod support;

use std::process::Command;

use serde_json::Value;
use support::standin::StandIn;

#[test]
fn the_gpu_check_runs_every_section_on_the_standin_and_says_so() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    if Command::new("bash").arg("--version").output().is_err() {
        support::skip_or_fail("STANDIN", "bash is not installed");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let state = out.path().join("standin-state");
    std::fs::create_dir(&state).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-check.sh"))
        .arg("--quick")
        .env("HEADROOM_BIN", env!("CARGO_BIN_EXE_headroom"))
        .env("OUT", out.path())
        .env("PORT", port.to_string())
        .env("LD_LIBRARY_PATH", standin.library_path())
        .env("HEADROOM_STANDIN_MEMORY", "32MiB")
        .env("HEADROOM_STANDIN_STATE_DIR", &state)
        .env("HEADROOM_KERNEL_CACHE", out.path().join("kernels"))
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{log}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("check.json")).unwrap())
            .unwrap();
    let sections = &report["sections"];
    assert_eq!(report["failures"], serde_json::json!([]), "{report:#}");
    let doctor = &sections["doctor"];
    assert_eq!(doctor["standin"], true, "{report:#}");
    assert_eq!(doctor["gpu_checked"], true, "{report:#}");
    assert_eq!(doctor["kernels"], "CUBIN for sm_90");
    for example in ["mnist-mlp-sgd", "cifar10-mlp-adam"] {
        let tune = &sections[format!("tune {example}")];
        let ratio = tune["measured_over_predicted"].as_f64().unwrap();
        assert!((0.97..=1.0).contains(&ratio), "{example}: {tune:#}");
        assert!(
            !tune["device_over_model"].as_array().unwrap().is_empty(),
            "{tune:#}"
        );
    }
    let serve = &sections["serve"];
    assert_eq!(serve["tune_status"], serde_json::json!([200, 200]));
    assert_eq!(serve["shared_gpu_status"], 409, "{serve:#}");
    assert!(serve["metrics_with_gpu_labels"].as_u64().unwrap() > 0);
    let pool = &doctor["pool_last_probe"];
    assert!(pool["reserved_peak"].as_u64().unwrap() > 0, "{doctor:#}");
    assert_eq!(pool["used_after"], pool["used_before"], "{doctor:#}");
    assert!(doctor["context"]["assumed_reserve_bytes"].as_u64().unwrap() > 0);
    let drill = &sections["fault drill"];
    assert_eq!(drill["exit_code"], 3, "{drill:#}");
    assert_eq!(drill["drill"]["sticky"], true, "{drill:#}");
    assert!(
        drill["drill"]["synchronize"]
            .as_str()
            .unwrap()
            .contains("CUDA_ERROR_ILLEGAL_ADDRESS"),
        "{drill:#}"
    );
    assert_eq!(drill["new_process_probe"], serde_json::json!(["fit"]));
    let assumptions = report["assumptions"].as_object().unwrap();
    assert_eq!(assumptions.len(), 6, "{assumptions:#?}");
    assert!(
        assumptions.values().all(|held| held == true),
        "the stand-in holds its own assumptions: {assumptions:#?}"
    );
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(
        summary.contains("This ran on the CUDA stand-in, not a GPU"),
        "{summary}"
    );
    assert!(
        summary
            .contains("| a fault is sticky: every later call of the process fails | confirmed |"),
        "{summary}"
    );
}
