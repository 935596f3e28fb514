//! The examples the host benchmarks tune, chosen by the filter argument (`cargo bench` passes
//! `--bench`; a plain argument selects examples whose name contains it).

/// The tuned examples, in order.
const EXAMPLES: [&str; 4] = [
    "mnist-mlp-sgd",
    "cifar10-mlp-adam",
    "cifar10-mlp-bf16",
    "deep-mlp-adamw",
];

/// Each selected example's name and job (JSON, as written in `examples/`).
pub fn selected() -> Vec<(&'static str, serde_json::Value)> {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    EXAMPLES
        .into_iter()
        .filter(|name| filter.as_deref().is_none_or(|f| name.contains(f)))
        .map(|name| {
            let path = format!("{}/../../examples/{name}.json", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}
