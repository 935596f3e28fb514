//! End to end: the `headroom` binary, as a user runs it, on the host device.

mod support;

use std::process::{Command, Output};

/// Asserts that `output` exited with `code` and that its stderr says `said`; returns the stderr.
fn refused(output: &Output, code: i32, said: &str) -> String {
    let message = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{message}");
    assert!(message.contains(said), "{message}");
    message
}

/// The JSON a successful run printed.
fn json_of(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn headroom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every example's answer, pinned: its parameter count as PyTorch counts it, the PyTorch
/// profile's peak bytes at batch 1, 64 and 4096 on the host's exact ledger, and the largest
/// batch the memory model puts on an H100 80GB. An example added without a pin fails here.
#[test]
fn every_example_keeps_its_pinned_answer() {
    #[rustfmt::skip]
    let pinned: [(&str, u64, [u64; 3], u64); 21] = [
        ("cifar10-cnn-bn", 94762, [1696668, 44545428, 2802594708], 123403),
        ("cifar10-mlp-adam", 394634, [7904980, 8679628, 61396644], 50000),
        ("cifar10-mlp-bf16", 394634, [7904980, 8679628, 83416740], 50000),
        ("deep-mlp-adamw", 5256202, [105136340, 105910988, 231084196], 2056925),
        ("gpt2-small", 124439808, [2760585732, 67035439620, 4180626088452], 81),
        ("gpt2-small-checkpointed", 124439808, [2488812548, 43864007172, 2708356178436], 125),
        ("lenet5-mnist", 61706, [799444, 4553740, 244828684], 1416511),
        ("mnist-mlp-dropout", 669706, [8041668, 8368764, 64557180], 5842201),
        ("mnist-mlp-sgd", 101770, [817820, 1048148, 19581524], 18036987),
        ("mobilenet-v2-imagenet", 3504872, [94098908, 2608804772, 163697881508], 2111),
        ("resnet18-cifar10", 11173962, [136818468, 415334684, 19601424156], 17701),
        ("resnet18-imagenet", 11689512, [151181068, 927021316, 51703756548], 6693),
        ("resnet50-imagenet", 25557032, [340770836, 3124435468, 183584659468], 1880),
        ("smollm2-135m", 134515008, [4682698500, 180988833540, 11464581476100], 29),
        ("smollm2-135m-fsdp8", 134515008, [3383539428, 179689674468, 11463282317028], 29),
        ("smollm2-135m-lora", 134975808, [3205704964, 153921219844, 9799714172164], 34),
        ("tiny-gpt", 136960, [2740228, 62821892, 3917026820], 88305),
        ("tiny-gpt-frozen-lower-blocks", 136960, [1689604, 38042116, 2364602884], 146289),
        ("vgg11-bn-imagenet", 132868840, [1663460140, 6605673764, 324636447524], 1050),
        ("vit-b16-imagenet", 86567656, [1732560428, 6068523652, 311672737924], 1097),
        ("wide-mlp-bf16-mixed", 46190602, [923824340, 924598988, 974176460], 1105376),
    ];
    let mut examples: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
    examples.sort();
    let names: Vec<&str> = pinned.iter().map(|p| p.0).collect();
    assert_eq!(examples, names, "every example, and only they, have a pin");
    for (name, parameters, peaks, on_h100) in pinned {
        let file = format!("examples/{name}.json");
        for (batch, peak) in [1, 64, 4096].into_iter().zip(peaks) {
            let batch = batch.to_string();
            let estimate = json_of(&headroom(&[
                "estimate",
                &file,
                "--batch-size",
                &batch,
                "--json",
            ]));
            assert_eq!(estimate["memory"]["total"], peak, "{name} at batch {batch}");
        }
        let estimate = json_of(&headroom(&[
            "estimate",
            &file,
            "--gpu",
            "H100 80GB",
            "--json",
        ]));
        assert_eq!(
            estimate["estimate"]["parameter_count"], parameters,
            "{name}"
        );
        assert_eq!(
            estimate["estimate"]["predicted_max_batch_size"], on_h100,
            "{name}"
        );
    }
}

/// A language model with causal self-attention tunes on the host to the memory model's limit,
/// within the band the MLP meets, and fresh probes confirm it: the max fits, one `multiple_of`
/// above it does not. Its attention fused, eager (the scores materialized), fine-tuned with
/// LoRA on every linear layer (adapters with dropout, the model frozen), with every block
/// checkpointed (recomputed in backward), and sharded with FSDP over 3 GPUs (one rank's step:
/// its shards, each block gathered for its forward and backward, padded where 3 does not divide
/// a dimension), trained or with LoRA.
#[test]
fn a_tiny_gpt_tunes_on_the_host_to_a_limit_that_probes_confirm() {
    let mut example: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/tiny-gpt.json").unwrap()).unwrap();
    let mut attention = 0;
    for block in example["model"]["layers"].as_array_mut().unwrap() {
        if let Some(layers) = block.pointer_mut("/residual/layers") {
            for layer in layers.as_array_mut().unwrap() {
                if let Some(args) = layer.get_mut("self_attention") {
                    args["implementation"] = "eager".into();
                    attention += 1;
                }
            }
        }
    }
    assert!(attention > 0);
    let eager = support::temp_file(".json", example.to_string());
    let mut adapted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/tiny-gpt.json").unwrap()).unwrap();
    adapted["model"]["lora"] =
        serde_json::json!({"r": 4, "lora_dropout": 0.1, "target_modules": "all-linear"});
    let lora = support::temp_file(".json", adapted.to_string());
    let mut checkpointed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/tiny-gpt.json").unwrap()).unwrap();
    checkpointed["model"]["gradient_checkpointing"] = true.into();
    let checkpointed = support::temp_file(".json", checkpointed.to_string());
    let mut sharded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/tiny-gpt.json").unwrap()).unwrap();
    sharded["sharding"] = "fsdp".into();
    sharded["world_size"] = 3.into();
    // Adapted with LoRA, its blocks kept gathered from forward to backward; checkpointed, each
    // block gathered again for its recomputation.
    let mut sharded_lora = sharded.clone();
    sharded_lora["model"]["lora"] = adapted["model"]["lora"].clone();
    sharded_lora["reshard_after_forward"] = false.into();
    let mut sharded_checkpointed = sharded.clone();
    sharded_checkpointed["model"]["gradient_checkpointing"] = true.into();
    let sharded = support::temp_file(".json", sharded.to_string());
    let sharded_lora = support::temp_file(".json", sharded_lora.to_string());
    let sharded_checkpointed = support::temp_file(".json", sharded_checkpointed.to_string());
    let jobs = [
        "examples/tiny-gpt.json",
        eager.to_str().unwrap(),
        lora.to_str().unwrap(),
        checkpointed.to_str().unwrap(),
        sharded.to_str().unwrap(),
        sharded_lora.to_str().unwrap(),
        sharded_checkpointed.to_str().unwrap(),
    ];
    for job in jobs {
        let on_host = ["--device", "host", "--host-memory", "64MiB", "--json"];
        let result = json_of(&headroom(&[&["tune", job][..], &on_host].concat()));
        let max = result["max_batch_size"].as_u64().unwrap();
        let predicted = result["predicted_max_batch_size"].as_u64().unwrap();
        assert!(
            max <= predicted && predicted - max <= predicted / 100 + 8,
            "{job}: max {max}, predicted {predicted}"
        );
        assert_eq!(result["limited_by"], "memory");
        let recommended = result["recommended_batch_size"].as_u64().unwrap();
        assert_eq!(result["recommended_tokens"], recommended * 64);
        let sizes = format!("{max},{}", max + 8);
        let probes = json_of(&headroom(
            &[&["probe", job, "--batch-size", &sizes][..], &on_host].concat(),
        ));
        let outcomes: Vec<&str> = probes
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(outcomes, ["fit", "oom"], "{job}: max {max}");
    }
}

/// Fine-tuning options a job gets wrong are named by field, with exit code 2.
#[test]
fn bad_fine_tuning_options_are_named_by_field() {
    let tiny: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/tiny-gpt.json").unwrap()).unwrap();
    let with = |model_field: &str, value: serde_json::Value| {
        let mut job = tiny.clone();
        job["model"][model_field] = value;
        support::temp_file(".json", job.to_string())
    };
    let cases = [
        (
            with("lora", serde_json::json!({"r": 0})),
            "model.lora.r: must be at least 1",
        ),
        (
            with("lora", serde_json::json!({"target_modules": ["gate_proj"]})),
            "model.lora.target_modules: \"gate_proj\" matches no layer of the model, which has \
             k_proj, linear, o_proj, q_proj, v_proj",
        ),
        (
            with("lora", serde_json::json!({"target_modules": ["c_attn"]})),
            "model.lora.target_modules: \"c_attn\" is not a linear layer headroom adapts",
        ),
    ];
    for (job, said) in &cases {
        let args = ["estimate", job.to_str().unwrap(), "--batch-size", "1"];
        refused(&headroom(&args), 2, said);
    }
    let mut frozen = tiny.clone();
    let layers = frozen["model"]["layers"].take();
    frozen["model"]["layers"] = serde_json::json!([{"frozen": {"layers": layers}}]);
    let frozen = support::temp_file(".json", frozen.to_string());
    let args = ["estimate", frozen.to_str().unwrap(), "--batch-size", "1"];
    refused(
        &headroom(&args),
        2,
        "model.layers: every parameter is frozen",
    );
    let mut mlp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/mnist-mlp-sgd.json").unwrap())
            .unwrap();
    mlp["model"]["gradient_checkpointing"] = true.into();
    let mlp = support::temp_file(".json", mlp.to_string());
    let args = ["estimate", mlp.to_str().unwrap(), "--batch-size", "1"];
    refused(
        &headroom(&args),
        2,
        "model.gradient_checkpointing: the model has no residual blocks to checkpoint",
    );
}

/// A two-block GPT-2 config (32 wide, 4 heads, 100 tokens, 64 positions) written in `dir`.
fn tiny_gpt2_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("config.json");
    let tiny = serde_json::json!({
        "model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 100,
        "n_positions": 64, "bos_token_id": 50256
    });
    std::fs::write(&config, tiny.to_string()).unwrap();
    config
}

#[test]
fn a_hugging_face_config_is_a_job_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_gpt2_config(dir.path());
    let config = config.to_str().unwrap();
    let from = ["--hf-config", config, "--sequence-length", "16"];
    let on_host = ["--device", "host", "--host-memory", "64MiB"];
    // transformers' GPT2LMHeadModel counts 30,720 parameters for this config.
    let tuned = headroom(&[&["tune"][..], &from, &on_host].concat());
    assert!(tuned.status.success(), "{}", stderr(&tuned));
    let said = String::from_utf8_lossy(&tuned.stdout);
    assert!(
        said.contains("gpt2 (a Hugging Face config): 30720 parameters, sequences of 16 tokens"),
        "{said}"
    );
    assert!(
        said.contains("step                    transformers' own (its loss, its key/value cache)"),
        "{said}"
    );
    assert!(said.contains("recommended batch size"), "{said}");
    // AdamW and 32-true unless given; --optimizer and --precision as in a job.
    let estimate = |extra: &[&str]| {
        let args = [
            &["estimate"][..],
            &from,
            &["--batch-size", "8", "--json"],
            extra,
        ]
        .concat();
        json_of(&headroom(&args))["memory"]["optimizer_state"].clone()
    };
    assert_eq!(estimate(&[]), serde_json::json!(2 * 4 * 30720));
    assert_eq!(estimate(&["--optimizer", "sgd"]), serde_json::json!(0));
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"model_type\": ").unwrap();
    let bad = bad.to_str().unwrap();
    let args = ["estimate", "--hf-config", bad, "--sequence-length", "16"];
    refused(&headroom(&args), 2, "model.huggingface: is not JSON");
    let args = ["estimate", "--hf-config", config, "--sequence-length", "65"];
    refused(&headroom(&args), 2, "n_positions (64)");
    let args = ["estimate", "--hf-config", config, "--precision", "fp8"];
    refused(&headroom(&args), 2, "--sequence-length");
    let args = ["estimate", "examples/tiny-gpt.json", "--hf-config", config];
    refused(&headroom(&args), 2, "cannot be used with");
    let args = ["estimate", "examples/tiny-gpt.json", "--optimizer", "sgd"];
    refused(&headroom(&args), 2, "--hf-config");
    // An image model's config: its image and classes from the config, no sequence length.
    let vit = dir.path().join("vit.json");
    let small = serde_json::json!({
        "model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "image_size": 16, "patch_size": 4,
        "num_labels": 5
    });
    std::fs::write(&vit, small.to_string()).unwrap();
    let vit = vit.to_str().unwrap();
    let estimated = headroom(&["estimate", "--hf-config", vit, "--memory", "1GiB"]);
    assert!(estimated.status.success(), "{}", stderr(&estimated));
    let said = String::from_utf8_lossy(&estimated.stdout);
    assert!(said.contains("vit (a Hugging Face config)"), "{said}");
    assert!(said.contains("images of [3, 16, 16]"), "{said}");
    let args = ["estimate", "--hf-config", vit, "--sequence-length", "16"];
    refused(&headroom(&args), 2, "leave --sequence-length out");
}

/// A Hugging Face config takes the fine-tuning options a job does: activation checkpointing of
/// every decoder layer, LoRA adapters, and FSDP over several GPUs.
#[test]
fn a_hugging_face_config_takes_checkpointing_lora_and_fsdp_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_gpt2_config(dir.path());
    let config = config.to_str().unwrap();
    let estimate = |extra: &[&str]| {
        let from = ["estimate", "--hf-config", config, "--sequence-length", "64"];
        json_of(&headroom(
            &[&from[..], &["--batch-size", "64", "--json"], extra].concat(),
        ))
    };
    let whole = estimate(&[]);
    let checkpointed = estimate(&["--gradient-checkpointing"]);
    let activations = |estimate: &serde_json::Value| estimate["memory"]["activations"].as_u64();
    assert!(
        activations(&checkpointed) < activations(&whole),
        "{checkpointed} vs {whole}"
    );
    // Rank 4 on each block's two MLP layers (32 -> 128 -> 32): 4 * (32 + 128) twice a block.
    let adapted = estimate(&["--lora-r", "4", "--lora-target-modules", "linear"]);
    assert_eq!(
        adapted["trainable_parameter_count"],
        2 * 2 * 4 * (32 + 128),
        "{adapted}"
    );
    // Sharded over 4 GPUs, each holds a quarter of the parameters (rounded up by rows) in
    // Adam's two moments.
    let sharded = estimate(&["--fsdp", "4"]);
    assert_eq!(sharded["fsdp_world_size"], 4);
    assert_eq!(sharded["fsdp_reshard_after_forward"], true);
    // Kept gathered from forward to backward, the decoder layers' parameters are held longer.
    // Checkpointed too, each decoder layer is gathered for its recomputation: fewer activations.
    let both = estimate(&["--fsdp", "4", "--gradient-checkpointing"]);
    assert!(
        activations(&both) < activations(&sharded),
        "{both} vs {sharded}"
    );
    let kept = estimate(&["--fsdp", "4", "--no-reshard-after-forward"]);
    assert_eq!(kept["fsdp_reshard_after_forward"], false);
    let parameters = |estimate: &serde_json::Value| estimate["memory"]["parameters"].as_u64();
    assert!(
        parameters(&kept) > parameters(&sharded),
        "{kept} vs {sharded}"
    );
    let state = |estimate: &serde_json::Value| estimate["memory"]["optimizer_state"].as_u64();
    let (sharded_state, whole_state) = (state(&sharded).unwrap(), state(&whole).unwrap());
    assert!(
        sharded_state >= whole_state / 4 && sharded_state < whole_state / 4 + whole_state / 16,
        "{sharded_state} of {whole_state}"
    );
    let args = [
        "estimate",
        "--hf-config",
        config,
        "--sequence-length",
        "64",
        "--fsdp",
        "4",
    ];
    let said = String::from_utf8(headroom(&args).stdout).unwrap();
    assert!(
        said.contains("sharding                FSDP over 4 GPUs: "),
        "{said}"
    );
    let args = [&args[..], &["--no-reshard-after-forward"]].concat();
    let said = String::from_utf8(headroom(&args).stdout).unwrap();
    assert!(
        said.contains("FSDP over 4 GPUs, blocks kept gathered from forward to backward"),
        "{said}"
    );
    for flag in ["--gradient-checkpointing", "--fsdp"] {
        let args = ["estimate", "examples/tiny-gpt.json", flag];
        let args = match flag {
            "--fsdp" => [&args[..], &["2"]].concat(),
            _ => args.to_vec(),
        };
        refused(&headroom(&args), 2, "--hf-config");
    }
    let args = ["estimate", "--hf-config", config, "--lora-alpha", "16"];
    refused(&headroom(&args), 2, "--lora-r");
    let args = [
        "estimate",
        "--hf-config",
        config,
        "--no-reshard-after-forward",
    ];
    refused(&headroom(&args), 2, "--fsdp");
}

#[test]
fn tune_json_follows_the_result_contract() {
    let output = headroom(&[
        "tune",
        "examples/mnist-mlp-sgd.json",
        "--device",
        "host",
        "--host-memory",
        "16MiB",
        "--json",
    ]);
    let result = json_of(&output);
    let max = result["max_batch_size"].as_u64().unwrap();
    let recommended = result["recommended_batch_size"].as_u64().unwrap();
    let predicted = result["predicted_max_batch_size"].as_u64().unwrap();
    assert!(
        max > 0 && max <= predicted,
        "max {max}, predicted {predicted}"
    );
    assert!(
        predicted - max <= predicted / 100 + 8,
        "max {max} is not within 1% of {predicted}"
    );
    assert_eq!(recommended, (max as f64 * 0.8).floor() as u64 / 8 * 8);
    assert_eq!(result["limited_by"], "memory");
    assert_eq!(result["device"]["kind"], "host");
    assert_eq!(result["device"]["total_bytes"], 16 << 20);
    let memory = &result["memory"];
    let parts: u64 = [
        "parameters",
        "gradients",
        "optimizer_state",
        "batch_data",
        "activations",
    ]
    .iter()
    .map(|k| memory[k].as_u64().unwrap())
    .sum();
    assert_eq!(memory["total"].as_u64().unwrap(), parts);
    assert_eq!(memory["parameters"], 101_770 * 4);
    let probes = result["probes"].as_array().unwrap();
    assert_eq!(probes[0]["batch_size"], 16);
    assert!(probes.iter().any(|p| p["outcome"] == "oom"));
    let largest_fit = probes
        .iter()
        .filter(|p| p["outcome"] == "fit")
        .map(|p| p["batch_size"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(largest_fit, max);
    let knee = result["throughput_batch_size"].as_u64().unwrap();
    assert!(knee >= 1 && knee <= max);
    assert_eq!(
        result["throughput"].as_array().unwrap().last().unwrap()["batch_size"],
        max
    );
    assert!(result["elapsed_seconds"].as_f64().unwrap() > 0.0);
    // Probes are reported on stderr as they happen.
    assert!(stderr(&output).matches("probe batch").count() == probes.len());
}

#[test]
fn human_output_has_the_summary_and_memory_table() {
    let output = headroom(&[
        "tune",
        "examples/cifar10-mlp-adam.json",
        "--device",
        "host",
        "--host-memory",
        "32MiB",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "max batch size",
        "recommended batch size",
        "optimizer state",
        "activations",
        "MiB",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

/// Each precision runs real steps on the host and lands within the search's 1% of the memory
/// model (`measured <= predicted` holds because the host charges exactly the planned buffers); the CIFAR MLP's input makes mixed precision hold fewer samples, and the answer says so.
#[test]
fn every_precision_tunes_on_the_host_and_says_when_half_holds_less() {
    let job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("examples/cifar10-mlp-bf16.json").unwrap())
            .unwrap();
    let mut max = std::collections::HashMap::new();
    for precision in ["32-true", "bf16-mixed", "16-mixed", "bf16-true"] {
        let mut job = job.clone();
        job["precision"] = precision.into();
        let path = support::temp_file(".json", job.to_string());
        let path = path.to_str().unwrap();
        let tune = |json: &[&str]| {
            let args = [
                &["tune", path, "--device", "host", "--host-memory", "16MiB"],
                json,
            ];
            headroom(&args.concat())
        };
        let result = json_of(&tune(&["--json"]));
        assert_eq!(result["precision"], precision);
        let measured = result["max_batch_size"].as_f64().unwrap();
        let predicted = result["predicted_max_batch_size"].as_f64().unwrap();
        // Bisection stops within the job's 1% tolerance, on a multiple of 8.
        assert!(
            measured <= predicted && measured >= predicted * 0.99 - 8.0,
            "{precision}: {measured} of {predicted}"
        );
        let mixed = precision.ends_with("-mixed");
        assert_eq!(result["precision_note"].is_string(), mixed, "{result}");
        max.insert(precision, measured);
        if precision == "bf16-mixed" {
            let text = String::from_utf8(tune(&[]).stdout).unwrap();
            assert!(
                text.contains(&format!("precision               {precision}")),
                "{text}"
            );
            assert!(
                text.contains("note: ") && text.contains("input-heavy"),
                "{text}"
            );
        }
    }
    assert!(
        max["bf16-mixed"] < max["32-true"] && max["32-true"] < max["bf16-true"],
        "{max:?}"
    );
}

#[test]
fn the_dataset_size_caps_the_batch() {
    let output = headroom(&[
        "tune",
        "examples/cifar10-mlp-adam.json",
        "--device",
        "host",
        "--host-memory",
        "1GiB",
        "--json",
    ]);
    let result = json_of(&output);
    assert_eq!(result["max_batch_size"], 50_000);
    assert_eq!(result["limited_by"], "dataset_size");
    assert_eq!(result["recommended_batch_size"], 40_000);
}

#[test]
fn an_invalid_job_exits_2_naming_the_field() {
    let path = support::temp_file(
        ".json",
        r#"{"model": {"input_shape": [3, 0, 32], "num_classes": 10}, "optimizer": {"name": "sgd"}}"#,
    );
    let output = headroom(&["tune", path.to_str().unwrap(), "--device", "host"]);
    refused(&output, 2, "model.input_shape[1]");
}

#[test]
fn layer_lists_are_estimated_as_pytorch_runs_them_and_a_bad_one_exits_2_naming_its_layer() {
    let mlp = support::temp_file(
        ".json",
        r#"{"model": {"input_shape": [1, 28, 28], "num_classes": 10, "layers": [{"flatten": {}},
            {"linear": {"out_features": 128}}, {"relu": {}}, {"linear": {"out_features": 10}}]},
            "optimizer": {"name": "sgd"}}"#,
    );
    let listed = headroom(&["estimate", mlp.to_str().unwrap(), "--gpu", "H100 80GB"]);
    let shorthand = headroom(&[
        "estimate",
        "examples/mnist-mlp-sgd.json",
        "--gpu",
        "H100 80GB",
    ]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert_eq!(
        listed.stdout, shorthand.stdout,
        "the same MLP, the same estimate"
    );
    let lenet = support::temp_file(
        ".json",
        r#"{"model": {"input_shape": [1, 28, 28], "num_classes": 10, "layers": [
            {"conv2d": {"out_channels": 6, "kernel_size": 5, "padding": 2}}, {"relu": {}},
            {"max_pool2d": {"kernel_size": 2}}, {"conv2d": {"out_channels": 16, "kernel_size": 5}},
            {"relu": {}}, {"max_pool2d": {"kernel_size": 2}}, {"flatten": {}},
            {"linear": {"out_features": 120}}, {"relu": {}}, {"linear": {"out_features": 84}},
            {"relu": {}}, {"linear": {"out_features": 10}}]}, "optimizer": {"name": "sgd"}}"#,
    );
    let output = headroom(&["estimate", lenet.to_str().unwrap(), "--gpu", "H100 80GB"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let normed = support::temp_file(
        ".json",
        std::fs::read_to_string(&lenet).unwrap().replacen(
            r#"{"relu": {}}"#,
            r#"{"batch_norm2d": {}}, {"relu": {}}"#,
            1,
        ),
    );
    // A convolution with its default bias before batch norm, as PyTorch runs it.
    let output = headroom(&["estimate", normed.to_str().unwrap(), "--gpu", "H100 80GB"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("parameters              61718"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let too_big = support::temp_file(
        ".json",
        r#"{"model": {"input_shape": [3, 32, 32], "num_classes": 10, "layers": [
            {"conv2d": {"out_channels": 6, "kernel_size": 33}}]}, "optimizer": {"name": "sgd"}}"#,
    );
    let output = headroom(&["estimate", too_big.to_str().unwrap(), "--gpu", "H100 80GB"]);
    refused(&output, 2, "model.layers[0].conv2d.kernel_size");
}

#[test]
fn a_missing_job_file_and_bad_arguments_exit_2() {
    assert_eq!(
        headroom(&["tune", "no/such/job.json"]).status.code(),
        Some(2)
    );
    assert_eq!(
        headroom(&["tune", "examples/mnist-mlp-sgd.json", "--device", "tpu"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        headroom(&[
            "tune",
            "examples/mnist-mlp-sgd.json",
            "--host-memory",
            "lots"
        ])
        .status
        .code(),
        Some(2)
    );
    let output = headroom(&[
        "tune",
        "examples/mnist-mlp-sgd.json",
        "--device",
        "host",
        "--host-memory",
        "1000PiB",
    ]);
    refused(&output, 2, "more than this machine");
}

#[test]
fn a_model_that_does_not_fit_exits_3_with_the_bytes() {
    let output = headroom(&[
        "tune",
        "examples/deep-mlp-adamw.json",
        "--device",
        "host",
        "--host-memory",
        "8MiB",
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        message.contains("batch size 1") && message.contains("bytes free"),
        "{message}"
    );
}

#[test]
fn estimate_needs_no_device() {
    let output = headroom(&[
        "estimate",
        "examples/mnist-mlp-sgd.json",
        "--memory",
        "141GB",
        "--json",
    ]);
    let estimate = json_of(&output);
    assert_eq!(estimate["parameter_count"], 101_770);
    // A 784-128-10 MLP on a 141 GB card fits tens of millions of samples per batch.
    let predicted = estimate["predicted_max_batch_size"].as_u64().unwrap();
    assert!(predicted > 10_000_000, "{predicted}");
    // PyTorch's step peaks in backward, at the relu's gradient: the input and its label, the
    // per-sample loss, and three buffers of width 128 (the gradient from above, the saved relu
    // output, the relu's gradient).
    assert_eq!(estimate["bytes_per_sample"], (785 + 1 + 3 * 128) * 4);
    assert_eq!(estimate["memory"]["peak_at"], "backward");
}

#[test]
fn cuda_without_a_driver_is_a_clear_error_not_a_panic() {
    if headroom_devices::cuda::driver_available() {
        return; // this machine has a driver; the GPU scripts cover it
    }
    let output = headroom(&["tune", "examples/mnist-mlp-sgd.json", "--device", "cuda"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("libcuda") && !message.contains("panicked"),
        "{message}"
    );
}

#[test]
fn a_job_on_standard_input_is_read_and_checked() {
    use std::io::Write;
    let run = |job: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_headroom"))
            .args(["estimate", "-", "--memory", "1GiB", "--json"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(job.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let output = run(&std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/mnist-mlp-sgd.json"
    ))
    .unwrap());
    let estimate = json_of(&output);
    assert_eq!(estimate["parameter_count"], 101_770);
    let output =
        run(r#"{"model": {"input_shape": [0], "num_classes": 2}, "optimizer": {"name": "sgd"}}"#);
    refused(&output, 2, "standard input");
    assert!(
        stderr(&output).contains("model.input_shape[0]"),
        "{}",
        stderr(&output)
    );
    // Text that is not JSON at all is named as such, with no empty field path.
    let output = run("tune me");
    refused(&output, 2, "standard input");
    assert!(!stderr(&output).contains(": :"), "{}", stderr(&output));
}

#[test]
fn estimate_names_what_limits_it_and_leaves_no_plot_when_it_fails() {
    let job = support::job_file(&serde_json::json!({
        "model": {"input_shape": [1, 28, 28], "hidden_layers": [128], "num_classes": 10},
        "optimizer": {"name": "sgd"},
        "dataset_size": 1000
    }));
    let output = headroom(&[
        "estimate",
        job.to_str().unwrap(),
        "--memory",
        "1GiB",
        "--json",
    ]);
    let estimate = json_of(&output);
    assert_eq!(estimate["limited_by"], "dataset_size");
    assert_eq!(estimate["predicted_max_batch_size"], 1000);

    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("never.svg");
    let output = headroom(&[
        "estimate",
        "examples/deep-mlp-adamw.json",
        "--memory",
        "8MiB",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    refused(&output, 3, "does not fit even at batch size 1");
    assert!(!svg.exists(), "a failed estimate left {}", svg.display());
    assert!(
        stderr(&output)
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("error:"),
        "the error is not the last word: {}",
        stderr(&output)
    );

    // The help's own example is a name the catalogue takes; a bare family is refused, naming both.
    let help = String::from_utf8_lossy(&headroom(&["estimate", "--help"]).stdout).to_string();
    assert!(!help.contains("--gpu H100 "), "{help}");
    let output = headroom(&["estimate", "examples/mnist-mlp-sgd.json", "--gpu", "H100"]);
    refused(&output, 2, "H100 80GB or H100 NVL");
}

#[test]
fn help_names_the_exit_codes_and_completions_are_generated() {
    let output = headroom(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("Exit codes: 0 success"), "{help}");
    assert!(help.contains("3 the model does not fit"), "{help}");
    for shell in ["bash", "zsh", "fish"] {
        let output = headroom(&["completions", shell]);
        assert!(output.status.success());
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(
            script.contains("headroom") && script.contains("doctor"),
            "{shell}"
        );
    }
}

#[test]
fn doctor_reports_as_json() {
    let output = headroom(&["doctor", "--json", "--host-memory", "16MiB"]);
    let report = json_of(&output);
    assert_eq!(report["passed"], true);
    let rows = report["rows"].as_array().unwrap();
    assert!(rows
        .iter()
        .any(|r| r["check"] == "host: small tune (784-128-10, SGD)" && r["status"] == "pass"));
    assert!(rows.iter().all(|r| r["status"] != "fail"), "{report:#}");
    // Without a GPU it says so, and a node agent that needs one can make that a failure.
    assert_eq!(report["gpu_checked"], false);
    assert!(rows.iter().any(|r| r["check"] == "GPU"
        && r["detail"]
            .as_str()
            .unwrap()
            .starts_with("no GPU was checked")));
    let human = headroom(&["doctor", "--host-memory", "16MiB"]);
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("all checks passed; no GPU was checked")
    );
    let required = headroom(&["doctor", "--require-gpu", "--host-memory", "16MiB"]);
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
}

#[test]
fn estimate_over_the_gpu_catalogue_and_for_one_card() {
    let output = headroom(&["estimate", "examples/mnist-mlp-sgd.json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    for card in headroom_engine::catalogue::CATALOGUE {
        assert!(
            table.contains(card.name),
            "{} missing from\n{table}",
            card.name
        );
    }
    assert!(stderr(&output).contains("memory model only, not a measurement"));
    // Cards CUDA 13 cannot compile for are marked, and the mark explained.
    let v100 = table.lines().find(|l| l.starts_with("V100")).unwrap();
    assert!(v100.ends_with("  *"), "{v100}");
    assert!(
        table.contains("* headroom cannot probe this card"),
        "{table}"
    );
    assert!(!table
        .lines()
        .find(|l| l.starts_with("T4"))
        .unwrap()
        .ends_with('*'));
    let output = headroom(&[
        "estimate",
        "examples/mnist-mlp-sgd.json",
        "--gpu",
        "h200",
        "--json",
    ]);
    let h200 = json_of(&output);
    assert_eq!(h200["gpu"], "H200 141GB");
    let output = headroom(&["estimate", "examples/mnist-mlp-sgd.json", "--gpu", "TPU"]);
    refused(&output, 2, "known: T4");
}

#[test]
fn plots_are_drawn_and_an_unwritable_plot_path_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("cifar.svg");
    let output = headroom(&[
        "tune",
        "examples/mnist-mlp-sgd.json",
        "--device",
        "host",
        "--host-memory",
        "8MiB",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.contains("Training speed against batch size"));
    let output = headroom(&[
        "estimate",
        "examples/mnist-mlp-sgd.json",
        "--gpu",
        "L4",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("predicted max"));
    let output = headroom(&[
        "tune",
        "examples/mnist-mlp-sgd.json",
        "--device",
        "host",
        "--plot",
        "/no/such/dir/plot.svg",
    ]);
    refused(&output, 2, "/no/such/dir/plot.svg");
    assert!(
        !stderr(&output).contains("probe batch"),
        "it tuned before refusing"
    );
}

/// A reader that goes away before the answer is printed (`| head`) ends the command quietly:
/// no panic, success.
#[test]
fn a_closed_standard_output_ends_the_command_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_headroom"))
        .args(["estimate", "examples/tiny-gpt.json", "--memory", "256MiB"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}
