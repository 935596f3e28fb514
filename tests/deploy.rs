//! The deployment files, as an administrator uses them: the image's build inputs agree with the
//! lockfile, every Kubernetes manifest validates and follows the rules a GPU node agent needs,
//! the Slurm prolog exports the server's recommended batch size or nothing, the systemd unit
//! verifies, and the Grafana dashboard queries only metrics `/metrics` exports.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};
use support::standin::StandIn;
use support::ServerProcess;

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repository().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `1.89` or `1.89.0` as (1, 89).
fn minor_version(text: &str) -> (u32, u32) {
    let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

#[test]
fn the_image_builds_with_the_lockfile() {
    let dockerfile = read("Dockerfile");
    let builder = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .expect("the builder is an official rust image");
    let builder = minor_version(builder.split(['-', ' ']).next().unwrap());
    let manifest = read("Cargo.toml");
    let declared = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("Cargo.toml declares its rust-version");
    let declared = minor_version(declared.trim_matches('"'));
    let metadata = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repository())
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "{}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let (needed, by) = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                minor_version(p["rust_version"].as_str()?),
                p["name"].as_str()?,
            ))
        })
        .max()
        .unwrap();
    assert!(
        declared >= needed,
        "Cargo.toml's rust-version {declared:?} is older than {by}'s {needed:?}"
    );
    assert!(
        builder >= declared,
        "the Dockerfile builds with Rust {builder:?}, older than rust-version {declared:?}"
    );

    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .unwrap();
    assert!(
        user.split(':')
            .all(|id| id.parse::<u32>().is_ok_and(|id| id > 0)),
        "USER {user} must be numeric and not root, for runAsNonRoot"
    );
    assert!(dockerfile.contains("org.opencontainers.image.revision"));
    let ignore = read(".dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for needed in ["target/", ".git/", ".deps/"] {
        assert!(
            ignore.lines().any(|l| l == needed),
            ".dockerignore lacks {needed}"
        );
    }
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(
                repository().join(source).exists(),
                "COPY {source}: no such file"
            );
            assert!(
                !ignored.contains(source),
                "COPY {source}, which .dockerignore leaves out"
            );
        }
    }
}

/// The top-level directories the compiler reads: where the sources are, and what
/// `include_str!` names in them.
fn compiled_in_directories() -> Vec<String> {
    fn walk(dir: &Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            {
                for rest in text.split("include_str!(\"").skip(1) {
                    let target = path.parent().unwrap().join(rest.split('"').next().unwrap());
                    let target = target.canonicalize().unwrap();
                    let top = target
                        .strip_prefix(repository().canonicalize().unwrap())
                        .unwrap();
                    let top = top
                        .components()
                        .next()
                        .unwrap()
                        .as_os_str()
                        .to_string_lossy();
                    if !found.contains(&top.to_string()) {
                        found.push(top.to_string());
                    }
                }
            }
        }
    }
    let mut found = vec!["src".to_string(), "crates".to_string()];
    walk(&repository().join("src"), &mut found);
    walk(&repository().join("crates"), &mut found);
    found
}

#[test]
fn the_image_copies_what_the_compiler_reads_and_keeps_its_store_on_a_volume() {
    let dockerfile = read("Dockerfile");
    let directories = compiled_in_directories();
    for directory in directories {
        assert!(
            dockerfile.contains(&format!("COPY {directory} {directory}")),
            "the sources compile in {directory}/, which the Dockerfile does not copy"
        );
    }
    let store = "HEADROOM_STORE=sqlite:///var/lib/headroom/headroom.db";
    assert!(dockerfile.contains(store));
    assert!(dockerfile.contains("install -d -o 10001 -g 10001 -m 0750 /var/lib/headroom"));
    let unit = read("deploy/systemd/headroom.service");
    assert!(unit.contains("StateDirectory=headroom") && unit.contains(store));
}

/// The runtime stage installs the package of every shared library the binary links beyond
/// glibc and libgcc, which the CUDA base image has (read from the binary's ELF `NEEDED` entries).
#[test]
fn the_image_installs_every_library_the_binary_links() {
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    let Ok(readelf) = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_headroom")])
        .output()
    else {
        support::skip_or_fail("READELF", "readelf (binutils) is not installed");
        return;
    };
    let dynamic = String::from_utf8_lossy(&readelf.stdout);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| line.split('[').nth(1)?.split(']').next())
        .collect();
    assert!(needed.contains(&"libc.so.6"), "{dynamic}");
    let in_the_base = [
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
    ];
    // Ubuntu 24.04's packages (the runtime stage's base).
    let packages = [
        ("libsqlite3.so.0", "libsqlite3-0"),
        ("libssl.so.3", "libssl3t64"),
        ("libcrypto.so.3", "libssl3t64"),
    ];
    // Only what headroom loads: NVIDIA's base image (no CUDA libraries) with NVRTC, and a binary
    // without debug information.
    assert!(
        runtime.starts_with("nvidia/cuda:") && runtime.lines().next().unwrap().contains("-base-"),
        "the runtime stage must be NVIDIA's CUDA base image: {}",
        runtime.lines().next().unwrap()
    );
    assert!(runtime.contains(" cuda-nvrtc-13-0"), "NVRTC is installed");
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=debuginfo"));
    for library in needed.iter().filter(|l| !in_the_base.contains(l)) {
        let Some((_, package)) = packages.iter().find(|(l, _)| l == library) else {
            panic!("the binary links {library}, which this test does not know a package for");
        };
        assert!(
            runtime.contains(&format!(" {package}")),
            "the binary links {library}; the runtime stage must install {package}"
        );
    }
}

/// The README names the oldest glibc the binary runs on: the newest `GLIBC_` symbol version it
/// asks for (read with `objdump -T`, binutils, which CI has with gcc).
#[test]
fn the_readme_names_the_glibc_the_binary_needs() {
    let Ok(objdump) = Command::new("objdump")
        .args(["-T", env!("CARGO_BIN_EXE_headroom")])
        .output()
    else {
        support::skip_or_fail("READELF", "objdump (binutils) is not installed");
        return;
    };
    let symbols = String::from_utf8_lossy(&objdump.stdout);
    let newest = symbols
        .split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let version: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .expect("the binary links glibc");
    let floor = format!("glibc {}.{} or\nnewer", newest.0, newest.1);
    let readme = read("README.md");
    assert!(
        readme.contains(&floor) || readme.contains(&floor.replace('\n', " ")),
        "the binary needs glibc {}.{}; the README must say so",
        newest.0,
        newest.1
    );
}

/// Every document of the YAML files, as JSON, read by PyYAML from the project's Python tools.
fn yaml_documents(files: &[&str]) -> Option<Vec<(String, Value)>> {
    let python = support::python_tool("python3")?;
    let script = "import json, sys, yaml\n\
                  print(json.dumps([[f, d] for f in sys.argv[1:] for d in yaml.safe_load_all(open(f))]))";
    let output = Command::new(python)
        .args(["-c", script])
        .args(files)
        .current_dir(repository())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let documents: Vec<(String, Value)> = serde_json::from_slice(&output.stdout).unwrap();
    Some(documents)
}

#[test]
fn every_kubernetes_manifest_validates_and_suits_a_gpu_node_agent() {
    let files = [
        "deploy/kubernetes/namespace.yaml",
        "deploy/kubernetes/daemonset.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/servicemonitor.yaml",
        "deploy/kubernetes/examples/training-job.yaml",
    ];
    let Some(validator) = support::python_tool("kubernetes-validate") else {
        return;
    };
    let output = support::run_ok(
        "kubernetes-validate",
        Command::new(validator)
            .arg("--strict")
            .args(files)
            .current_dir(repository()),
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(report.matches("passed").count(), 4, "{report}");

    let Some(documents) = yaml_documents(&files) else {
        return;
    };
    let kind = |kind: &str| {
        documents
            .iter()
            .find(|(_, d)| d["kind"] == kind)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    for file in &files[..4] {
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        assert!(
            kustomization.contains(name),
            "kustomization.yaml lacks {name}"
        );
    }

    let agent = kind("DaemonSet");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["runtimeClassName"], "nvidia");
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert!(security["runAsUser"].as_u64().is_some_and(|uid| uid > 0));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0];
    assert!(
        !container["resources"]
            .to_string()
            .contains("nvidia.com/gpu"),
        "the node agent must not take a GPU from training"
    );
    assert!(container["resources"]["limits"]["memory"].is_string());
    let env: Vec<(&str, &str)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .collect();
    assert!(env.contains(&("NVIDIA_VISIBLE_DEVICES", "all")));
    assert!(env.contains(&("CUDA_DEVICE_ORDER", "PCI_BUS_ID")));
    let context = &container["securityContext"];
    assert_eq!(context["allowPrivilegeEscalation"], false);
    assert_eq!(context["readOnlyRootFilesystem"], true);
    assert_eq!(context["capabilities"]["drop"], json!(["ALL"]));
    let variable = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
            .clone()
    };
    assert_eq!(
        variable("HEADROOM_NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName",
        "a new pod on the node must take over its predecessor's jobs"
    );
    assert_eq!(
        variable("HEADROOM_STORE")["valueFrom"]["secretKeyRef"]["optional"],
        true
    );
    let state = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/headroom")
        .expect("the SQLite store is on a volume, not the read-only root");
    assert!(pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == state["name"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    let labels = &agent["spec"]["template"]["metadata"]["labels"];
    let service = kind("Service");
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the Service selects {key}={value}");
    }
    assert_eq!(service["spec"]["internalTrafficPolicy"], "Local");
    let monitor = kind("ServiceMonitor");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][key], value);
    }
    let port = &monitor["spec"]["endpoints"][0];
    assert_eq!(port["path"], "/metrics");
    assert!(service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == port["port"]));

    // The init-container pattern: the tuner and the trainer share the answer through an emptyDir.
    let training = &kind("Job")["spec"]["template"]["spec"];
    let tuner = &training["initContainers"][0];
    let command = tuner["args"][0].as_str().unwrap();
    assert!(
        command.contains("headroom tune")
            && command.contains("--batch-size-file /headroom/batch_size")
    );
    assert!(command.contains("> /headroom/headroom.json"));
    let trainer = &training["containers"][0];
    assert!(trainer["args"][0]
        .as_str()
        .unwrap()
        .contains("/headroom/batch_size"));
    let shared = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "headroom")
    };
    assert!(shared(tuner) && shared(trainer));
    let volume = training["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "headroom")
        .unwrap();
    assert!(volume["emptyDir"].is_object());
}

fn mnist(search: Value) -> Value {
    let mut job = support::job(&[1, 28, 28], &[128], 10, "sgd");
    job["search"] = search;
    job
}

/// Runs the TaskProlog with nothing in its environment but what Slurm and the user give it.
fn prolog(server: &str, job: &std::path::Path, gpus: Option<&str>) -> Output {
    let mut command = Command::new("/bin/sh");
    command
        .arg(repository().join("deploy/slurm/task-prolog.sh"))
        .env_clear()
        .env("HEADROOM_BIN", env!("CARGO_BIN_EXE_headroom"))
        .env("HEADROOM_URL", server)
        .env("HEADROOM_JOB", job);
    if let Some(gpus) = gpus {
        command.env("CUDA_VISIBLE_DEVICES", gpus);
    }
    command.output().unwrap()
}

/// The prolog's stdout, and its stderr, which must be one line when it exports nothing.
fn exported(output: &Output) -> (String, String) {
    assert!(
        output.status.success(),
        "the prolog must never fail the job"
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if stdout.is_empty() {
        assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    }
    (stdout, stderr)
}

fn serve(standin: &StandIn, env: &[(&str, &str)]) -> ServerProcess {
    let mut command = standin.headroom();
    command
        .args(["serve", "--device", "cuda:0"])
        .env("HEADROOM_STANDIN_MEMORY", "16MiB")
        .envs(env.iter().copied());
    ServerProcess::start(command)
}

#[test]
fn the_slurm_prolog_exports_the_recommended_batch_size_or_nothing() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let quick = support::job_file(&mnist(json!({"strategy": "predict", "steps_per_probe": 1})));
    let server = serve(standin, &[]);
    let (stdout, stderr) = exported(&prolog(&server.http.base, &quick, Some("0")));
    let mut request: Value =
        serde_json::from_str(&std::fs::read_to_string(&quick).unwrap()).unwrap();
    request["device"] = json!("cuda:0");
    let answer = server.http.tune(&request, &[]);
    assert_eq!(answer.body["cached"], true, "{}", answer.body);
    let recommended = answer.body["recommended_batch_size"].as_u64().unwrap();
    assert_eq!(
        stdout,
        format!("export HEADROOM_BATCH_SIZE={recommended}\n"),
        "{stderr}"
    );

    // A site that names GPUs by UUID: the service finds the GPU with that UUID; one it does not
    // serve is named in the reason.
    let uuid = "GPU-57a4d100-0000-4000-8000-000000000000";
    let (stdout, stderr) = exported(&prolog(&server.http.base, &quick, Some(uuid)));
    assert_eq!(
        stdout,
        format!("export HEADROOM_BATCH_SIZE={recommended}\n"),
        "{stderr}"
    );
    let other = "GPU-57a4d100-0000-4000-8000-0000000000ff";
    let (stdout, stderr) = exported(&prolog(&server.http.base, &quick, Some(other)));
    assert!(
        stdout.is_empty() && stderr.contains(&format!("no GPU {other}")),
        "{stderr}"
    );

    let (stdout, stderr) = exported(&prolog(&server.http.base, &quick, None));
    assert!(stdout.is_empty() && stderr.contains("no GPU"), "{stderr}");

    let deep = support::job_file(&support::job(
        &[3, 32, 32],
        &[1024, 1024, 1024],
        10,
        "adamw",
    ));
    let (stdout, stderr) = exported(&prolog(&server.http.base, &deep, Some("0")));
    assert!(
        stdout.is_empty() && stderr.contains("does not fit"),
        "{stderr}"
    );

    let (stdout, stderr) = exported(&prolog("http://127.0.0.1:9", &quick, Some("0")));
    assert!(
        stdout.is_empty() && stderr.contains("cannot reach"),
        "{stderr}"
    );
}

/// Under `ConstrainDevices` a job on the node's second GPU sees it as `CUDA_VISIBLE_DEVICES=0`;
/// Slurm's `SLURM_JOB_GPUS=1` names it node-wide, and the prolog asks for that one.
#[test]
fn the_slurm_prolog_asks_for_the_node_wide_gpu_under_constrained_devices() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let quick = support::job_file(&mnist(json!({"strategy": "predict", "steps_per_probe": 1})));
    let mut command = standin.headroom();
    command
        .args(["serve", "--device", "cuda:0", "--device", "cuda:1"])
        .env("HEADROOM_STANDIN_DEVICES", "2")
        .env("HEADROOM_STANDIN_MEMORY", "16MiB");
    let server = ServerProcess::start(command);
    let mut constrained = Command::new("/bin/sh");
    constrained
        .arg(repository().join("deploy/slurm/task-prolog.sh"))
        .env_clear()
        .env("HEADROOM_BIN", env!("CARGO_BIN_EXE_headroom"))
        .env("HEADROOM_URL", &server.http.base)
        .env("HEADROOM_JOB", &quick)
        .env("SLURM_JOB_GPUS", "1")
        .env("CUDA_VISIBLE_DEVICES", "0");
    let (stdout, stderr) = exported(&constrained.output().unwrap());
    assert!(
        stdout.starts_with("export HEADROOM_BATCH_SIZE="),
        "{stderr}"
    );
    let (_, jobs) = server.http.get("/jobs");
    assert_eq!(jobs[0]["device"], "cuda:1", "{jobs:#}");
}

#[test]
fn the_slurm_prolog_waits_for_a_slow_tune_and_leaves_a_busy_gpu_alone() {
    let Some(standin) = StandIn::get() else {
        return;
    };
    let slow = support::job_file(&mnist(
        json!({"strategy": "predict", "steps_per_probe": 12}),
    ));
    let server = serve(standin, &[("HEADROOM_WAIT_SECONDS", "1")]);
    let (stdout, stderr) = exported(&prolog(&server.http.base, &slow, Some("0,1")));
    let batch: u64 = stdout
        .strip_prefix("export HEADROOM_BATCH_SIZE=")
        .unwrap_or_else(|| panic!("{stdout}{stderr}"))
        .trim()
        .parse()
        .unwrap();
    let (_, jobs) = server.http.get("/jobs");
    assert_eq!(jobs[0]["result"]["recommended_batch_size"], batch);
    drop(server);

    let busy = serve(standin, &[("HEADROOM_STANDIN_PROCESSES", "4242:1MiB")]);
    let (stdout, stderr) = exported(&prolog(&busy.http.base, &slow, Some("0")));
    assert!(
        stdout.is_empty() && stderr.contains("allow_shared"),
        "{stderr}"
    );
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(analyze) = which("systemd-analyze") else {
        support::skip_or_fail("SYSTEMD", "systemd-analyze is not installed");
        return;
    };
    // The unit as installed, its binary where this build put it.
    let unit = read("deploy/systemd/headroom.service")
        .replace("/usr/local/bin/headroom", env!("CARGO_BIN_EXE_headroom"));
    let path = support::temp_file(".service", unit);
    support::run_ok(
        "systemd-analyze verify",
        Command::new(&analyze).arg("verify").arg(&path),
    );
    // Sandboxed: an exposure of 3.0 or less (systemd's scale is tenths: 30).
    let output = support::run_ok(
        "systemd-analyze security --threshold=30",
        Command::new(&analyze)
            .args(["security", "--offline=true", "--threshold=30", "--no-pager"])
            .arg(&path),
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("Overall exposure level"), "{report}");
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The metric names an expression reads: identifiers of headroom's and the process collector's.
fn queried_metrics(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in expression.match_indices(['h', 'p']) {
        let rest = &expression[at..];
        if !(rest.starts_with("headroom_") || rest.starts_with("process_")) {
            continue;
        }
        if at > 0 && expression.as_bytes()[at - 1].is_ascii_alphanumeric() {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        names.push(rest[..end].to_string());
    }
    names
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/headroom-dashboard.json")).unwrap();
    let expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(expressions.len() >= 12);
    let queried: Vec<String> = expressions
        .iter()
        .flat_map(|e| queried_metrics(e))
        .collect();
    for needed in [
        "headroom_tunes_total",
        "headroom_probes_total",
        "headroom_tune_duration_seconds_bucket",
        "headroom_last_max_batch_size",
        "headroom_last_recommended_batch_size",
        "headroom_queue_length",
        "headroom_device_memory_used_bytes",
    ] {
        assert!(
            queried.iter().any(|q| q == needed),
            "the dashboard does not show {needed}"
        );
    }

    // A GPU service (with the host device beside it) exports a sample of every family before it
    // has tuned, so that a node that never tunes shows zeros, not "No data"; the last answer's
    // gauges wait for an answer.
    let Some(standin) = StandIn::get() else {
        return;
    };
    let mut command = standin.headroom();
    command
        .args(["serve", "--device", "cuda:0", "--device", "host"])
        .env("HEADROOM_STANDIN_MEMORY", "16MiB");
    let server = ServerProcess::start(command);
    server.http.get("/readyz");
    let at_rest = server.http.get_text("/metrics");
    let sampled: Vec<&str> = at_rest
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in queried.iter().filter(|n| !n.starts_with("headroom_last_")) {
        for device in ["cuda:0", "host"] {
            let per_device = name.starts_with("headroom_device_")
                || name.starts_with("headroom_queue_")
                || name.starts_with("headroom_tune")
                || name.starts_with("headroom_probe");
            let found = if per_device {
                at_rest.lines().any(|l| {
                    l.starts_with(name.as_str()) && l.contains(&format!("device=\"{device}\""))
                })
            } else {
                sampled.contains(&name.as_str())
            };
            assert!(found, "{name} ({device}) has no sample at rest:\n{at_rest}");
        }
    }
    let mut request = mnist(json!({"strategy": "predict", "steps_per_probe": 1}));
    request["device"] = json!("cuda:0");
    assert_eq!(server.http.tune(&request, &[]).status, 200);
    assert_eq!(server.http.tune(&request, &[]).status, 200);
    let exposition = server.http.get_text("/metrics");
    let exported: Vec<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in queried {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        assert!(
            exported.contains(&family),
            "{name} is not exported:\n{exposition}"
        );
    }
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        queried_metrics("sum(rate(headroom_a_total{x=\"y\"}[5m])) / process_b + xheadroom_c"),
        ["headroom_a_total", "process_b"]
    );
}
