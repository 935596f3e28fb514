//! The architecture, checked: the engine and the devices depend on no HTTP, SQL, HTML, plotting
//! or OpenAPI crate (Cargo's own dependency graph), and no crate's modules import each other in
//! a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates the lower layers must not depend on, directly or through another crate.
const SERVICE_ONLY: &[&str] = &[
    "axum", "sqlx", "maud", "plotters", "utoipa", "hyper", "tokio",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every package `package` depends on, transitively, through normal dependencies (what is
/// built into the binary, not for tests or build scripts), as `cargo tree` resolves them.
fn dependencies_of(package: &str) -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree", "--edges", "normal", "--prefix", "none", "--format", "{p}",
        ])
        .args(["--package", package])
        .current_dir(root())
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != package)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_engine_and_the_devices_know_nothing_of_the_service() {
    for package in ["headroom-engine", "headroom-devices"] {
        let dependencies = dependencies_of(package);
        let leaked: Vec<&&str> = SERVICE_ONLY
            .iter()
            .filter(|name| dependencies.contains(**name))
            .collect();
        assert!(leaked.is_empty(), "{package} depends on {leaked:?}");
    }
    let engine = dependencies_of("headroom-engine");
    assert!(
        !engine.contains("headroom-devices"),
        "the engine depends on the devices"
    );
    assert!(!engine.contains("cudarc"), "the engine depends on CUDA");
    // The check can see a dependency: the service has them.
    assert!(dependencies_of("headroom-service").contains("axum"));
}

/// A crate's modules by path (`["handlers", "jobs"]`), with their source.
fn modules(src: &Path) -> BTreeMap<Vec<String>, String> {
    let mut found = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(src).unwrap().with_extension("");
                let mut module: Vec<String> = relative
                    .iter()
                    .map(|part| part.to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    module.last().map(String::as_str),
                    Some("mod" | "lib" | "main")
                ) {
                    module.pop();
                }
                found.insert(module, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    found
}

/// The module a path names: its longest prefix that is a module.
fn resolve(modules: &BTreeMap<Vec<String>, String>, path: &[String]) -> Option<Vec<String>> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains_key(prefix))
}

/// Every `crate::a::b` and `super::a` path in `source` (comments and strings ignored as far as
/// a line-based reading can), as the module path it starts from and the names after it.
fn imports(module: &[String], source: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let words: Vec<char> = code.chars().collect();
        let text: String = words.iter().collect();
        for (start, _) in text
            .match_indices("crate::")
            .chain(text.match_indices("super::"))
        {
            if start > 0 {
                let before = words[start - 1];
                if before.is_alphanumeric() || before == '_' || before == ':' {
                    continue;
                }
            }
            let rest = &text[start..];
            let mut base: Vec<String> = Vec::new();
            let mut parts = rest.split("::").peekable();
            let mut depth = 0;
            let first = parts.next().unwrap();
            if first == "crate" {
                base.clear();
            } else {
                depth += 1;
                while parts.peek() == Some(&"super") {
                    parts.next();
                    depth += 1;
                }
                base = module[..module.len().saturating_sub(depth)].to_vec();
            }
            let tail: Vec<&str> = parts.collect();
            let joined = tail.join("::");
            if let Some(group) = joined.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let mut path = base.clone();
                    path.extend(names(item));
                    paths.push(path);
                }
            } else {
                let mut path = base.clone();
                path.extend(names(&joined));
                paths.push(path);
            }
        }
    }
    paths
}

/// The leading identifiers of a path such as `jobs::JobState;` or `self`.
fn names(path: &str) -> Vec<String> {
    path.split("::")
        .map(|part| {
            part.trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .take_while(|part| !part.is_empty())
        .filter(|part| part != "self")
        .collect()
}

/// The circles among siblings: an import from module `a` to module `b` is an edge between the
/// two children of their nearest common ancestor (none when one contains the other); each
/// parent's children must form no cycle.
fn sibling_cycles(src: &Path) -> Vec<String> {
    let modules = modules(src);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<(String, String)>> = BTreeMap::new();
    for (module, source) in &modules {
        for path in imports(module, source) {
            let Some(target) = resolve(&modules, &path) else {
                continue;
            };
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == module.len() || common == target.len() {
                continue;
            }
            edges
                .entry(module[..common].to_vec())
                .or_default()
                .insert((module[common].clone(), target[common].clone()));
        }
    }
    let mut cycles = Vec::new();
    for (parent, siblings) in &edges {
        let nodes: BTreeSet<&String> = siblings.iter().flat_map(|(a, b)| [a, b]).collect();
        for &start in &nodes {
            // Whether `start` reaches itself again.
            let mut stack: Vec<(&String, Vec<&String>)> = vec![(start, vec![start])];
            let mut visited = BTreeSet::new();
            while let Some((at, trail)) = stack.pop() {
                for (from, to) in siblings.iter().filter(|(from, _)| from == at) {
                    let _ = from;
                    if to == start {
                        let names: Vec<&str> = trail.iter().map(|s| s.as_str()).collect();
                        cycles.push(format!(
                            "{}: {} -> {start}",
                            if parent.is_empty() {
                                "<crate>".into()
                            } else {
                                parent.join("::")
                            },
                            names.join(" -> ")
                        ));
                    } else if visited.insert(to) {
                        let mut next = trail.clone();
                        next.push(to);
                        stack.push((to, next));
                    }
                }
            }
        }
    }
    cycles.sort();
    cycles.dedup();
    cycles
}

#[test]
fn no_crate_has_a_circle_of_imports_among_its_modules() {
    let mut sources: Vec<PathBuf> = vec![root().join("src")];
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        sources.push(entry.unwrap().path().join("src"));
    }
    let cycles: Vec<String> = sources.iter().flat_map(|src| sibling_cycles(src)).collect();
    assert!(cycles.is_empty(), "import circles:\n{}", cycles.join("\n"));
}

#[test]
fn the_circle_check_finds_a_circle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir(src.join("service")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod plan;\nmod result;\n").unwrap();
    std::fs::write(src.join("plan.rs"), "use crate::result::LimitedBy;\n").unwrap();
    std::fs::write(src.join("result.rs"), "use crate::{plan::Plan, other};\n").unwrap();
    std::fs::write(src.join("service/mod.rs"), "use self::jobs::Job;\n").unwrap();
    std::fs::write(src.join("service/jobs.rs"), "use super::store::Store;\n").unwrap();
    std::fs::write(
        src.join("service/store.rs"),
        "use super::super::service::jobs;\n",
    )
    .unwrap();
    let cycles = sibling_cycles(src);
    assert!(
        cycles
            .iter()
            .any(|c| c.starts_with("<crate>: plan -> result")),
        "{cycles:?}"
    );
    assert!(
        cycles
            .iter()
            .any(|c| c.starts_with("service: jobs -> store")),
        "{cycles:?}"
    );
}

/// The kernel checks compare a device with references of their own, never with the host's
/// arithmetic (`host::ops`): run on the host device, they would otherwise compare it with itself.
#[test]
fn the_kernel_checks_never_use_the_host_s_arithmetic() {
    let devices = modules(&root().join("crates/devices/src"));
    let mut borrowed = Vec::new();
    for (module, source) in devices
        .iter()
        .filter(|(m, _)| m.first().is_some_and(|m| m == "parity"))
    {
        for path in imports(module, source) {
            if path.starts_with(&["host".to_string(), "ops".to_string()]) {
                borrowed.push(format!("{}: {}", module.join("::"), path.join("::")));
            }
        }
    }
    assert!(
        devices
            .keys()
            .any(|m| m.first().is_some_and(|m| m == "parity")),
        "the parity modules are read"
    );
    assert!(
        borrowed.is_empty(),
        "parity references the host's own arithmetic: {borrowed:?}"
    );
}
