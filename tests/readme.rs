//! The README cannot drift from the program: every transcript in it (`$ headroom ...` and
//! `$ curl ...` with the output shown under it) is run here and its output compared with the
//! README's, and every JSON job in it is accepted.
//!
//! CLI transcripts of the memory model are deterministic and compared line for line. HTTP
//! transcripts come from a real `headroom serve` on the host device: status lines, problem
//! documents, answers and the names of metric series are compared exactly; timings and generated
//! identifiers (ids, timestamps, the device's name) by type only. A `...` line in the README stands for
//! any number of lines, a `, ...]` for more array elements.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};
use support::{headroom, skip_or_fail, ServerProcess};

/// One fenced block of the README.
struct Block {
    language: String,
    first_line: usize,
    lines: Vec<String>,
}

/// One `$ command` of a transcript, with the output the README shows under it.
struct Transcript {
    line: usize,
    command: String,
    expected: Vec<String>,
}

fn readme() -> Vec<Block> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md is readable");
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in text.lines().enumerate() {
        match (open.take(), line.strip_prefix("```")) {
            (None, Some(language)) => {
                open = Some(Block {
                    language: language.trim().to_string(),
                    first_line: index + 2,
                    lines: Vec::new(),
                })
            }
            (Some(block), Some(_)) => blocks.push(block),
            (Some(mut block), None) => {
                block.lines.push(line.to_string());
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md has an unclosed code block");
    blocks
}

/// The transcripts of every text block whose commands start with `program`.
fn transcripts(program: &str) -> Vec<Transcript> {
    let mut found = Vec::new();
    for block in readme().iter().filter(|b| b.language == "text") {
        let mut current: Option<Transcript> = None;
        let mut continued = false;
        for (offset, line) in block.lines.iter().enumerate() {
            if continued {
                if let Some(transcript) = current.as_mut() {
                    transcript.command.push('\n');
                    transcript.command.push_str(line);
                }
                continued = line.ends_with('\\');
            } else if let Some(command) = line.strip_prefix("$ ") {
                found.extend(current.take());
                current = command.starts_with(program).then(|| Transcript {
                    line: block.first_line + offset,
                    command: command.to_string(),
                    expected: Vec::new(),
                });
                continued = command.ends_with('\\');
            } else if let Some(transcript) = current.as_mut() {
                transcript.expected.push(line.to_string());
            }
        }
        found.extend(current);
    }
    for transcript in &mut found {
        while transcript.expected.last().is_some_and(|l| l.is_empty()) {
            transcript.expected.pop();
        }
    }
    found
}

/// Runs `command` through bash from the repository root, `headroom` being the binary under test;
/// returns its standard output and error together, one entry per line.
fn run(command: &str) -> Vec<String> {
    let binary = Path::new(env!("CARGO_BIN_EXE_headroom"));
    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("bash")
        .args(["-c", &format!("exec 2>&1\n{command}")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PATH", path)
        .env_remove("HEADROOM_TOKEN")
        .output()
        .expect("bash runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.trim_end_matches('\r').to_string())
        .collect()
}

/// Whether `actual` matches `expected`, where a `...` line of `expected` matches any number of
/// lines and `same` compares one line with another.
fn lines_match(expected: &[String], actual: &[String], same: &dyn Fn(&str, &str) -> bool) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "..." => {
            (0..=actual.len()).any(|skip| lines_match(rest, &actual[skip..], same))
        }
        Some((first, rest)) => actual
            .split_first()
            .is_some_and(|(line, others)| same(first, line) && lines_match(rest, others, same)),
    }
}

fn assert_transcript(
    transcript: &Transcript,
    actual: &[String],
    same: &dyn Fn(&str, &str) -> bool,
) {
    assert!(
        lines_match(&transcript.expected, actual, same),
        "README.md line {}: `{}` printed\n{}\n\nwhere the README shows\n{}",
        transcript.line,
        transcript.command,
        actual.join("\n"),
        transcript.expected.join("\n")
    );
}

/// Whether a transcript shows a tune's measured answer: not run here (what it measured differs
/// from run to run), but its lines the memory model decides are checked
/// ([`every_tune_transcript_shows_what_the_memory_model_says`]).
fn measured(transcript: &Transcript) -> bool {
    transcript.command.starts_with("headroom tune ")
        && transcript
            .expected
            .iter()
            .any(|line| line.starts_with("max batch size"))
}

#[test]
fn every_cli_transcript_prints_what_the_readme_shows() {
    let transcripts: Vec<Transcript> = transcripts("headroom ")
        .into_iter()
        .filter(|t| !measured(t))
        .collect();
    assert!(
        transcripts.len() >= 3,
        "the README's CLI transcripts were not found"
    );
    for transcript in &transcripts {
        assert_transcript(transcript, &run(&transcript.command), &|a, b| a == b);
    }
}

/// A measured tune's transcript says what the memory model says: its `predicted max` is the
/// model's largest batch for the device's memory (the host's budget, 256 MiB unless
/// `--host-memory` says otherwise), and its memory at the recommended batch is the model's at
/// that batch, line for line.
#[test]
fn every_tune_transcript_shows_what_the_memory_model_says() {
    let tunes: Vec<Transcript> = transcripts("headroom tune ")
        .into_iter()
        .filter(measured)
        .collect();
    assert!(
        tunes.len() >= 3,
        "the README's tune transcripts were not found"
    );
    for tune in &tunes {
        let words: Vec<&str> = tune.command.split_whitespace().collect();
        let job = words[2];
        let budget = words
            .iter()
            .position(|w| *w == "--host-memory")
            .map_or("256MiB", |at| words[at + 1]);
        let at = |prefix: &str| {
            tune.expected
                .iter()
                .position(|line| line.starts_with(prefix))
                .unwrap_or_else(|| panic!("README.md line {}: no `{prefix}` line", tune.line))
        };
        let predicted = &tune.expected[at("predicted max")];
        let estimate = run(&format!("headroom estimate {job} --memory {budget} --json"));
        let estimate: Value = serde_json::from_str(&estimate.join("\n")).unwrap();
        let modelled = estimate["predicted_max_batch_size"].as_u64().unwrap();
        assert!(
            predicted.split_whitespace().nth(2) == Some(modelled.to_string().as_str()),
            "README.md line {}: `{predicted}` where the model predicts {modelled}",
            tune.line
        );
        let memory = at("memory at batch ");
        let batch = tune.expected[memory]
            .trim_start_matches("memory at batch ")
            .trim_end_matches(':');
        let breakdown = run(&format!("headroom estimate {job} --batch-size {batch}"));
        let shown = &tune.expected[memory..(memory + breakdown.len()).min(tune.expected.len())];
        assert_eq!(
            shown,
            breakdown.as_slice(),
            "README.md line {}: the memory at batch {batch}",
            tune.line
        );
    }
}

#[test]
fn every_json_job_in_the_readme_is_accepted() {
    let jobs: Vec<Block> = readme()
        .into_iter()
        .filter(|b| b.language == "json")
        .collect();
    assert!(!jobs.is_empty(), "the README's job was not found");
    for job in jobs {
        let file = support::temp_file(".json", job.lines.join("\n"));
        let output = headroom()
            .args(["estimate", file.to_str().unwrap(), "--memory", "80GB"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "README.md line {}: the job is refused: {}",
            job.first_line,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn every_http_transcript_answers_what_the_readme_shows() {
    if Command::new("curl").arg("--version").output().is_err() {
        return skip_or_fail("CURL", "curl is not installed");
    }
    let server = ServerProcess::start({
        let mut command = headroom();
        command.args(["serve", "--device", "host"]);
        command
    });
    let address = server.http.base.trim_start_matches("http://").to_string();
    let transcripts = transcripts("curl ");
    assert!(
        transcripts.len() >= 4,
        "the README's curl transcripts were not found"
    );
    for transcript in &transcripts {
        // As a reader does, each command is sent once the jobs before it have finished.
        wait_until_idle(&server.http);
        let command = transcript.command.replace("localhost:8080", &address);
        assert_transcript(transcript, &run(&command), &same_http_line);
    }
}

fn wait_until_idle(http: &support::Http) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, jobs) = http.get("/jobs");
        assert_eq!(status, 200, "{jobs}");
        let busy = jobs
            .as_array()
            .expect("GET /jobs lists jobs")
            .iter()
            .any(|job| matches!(job["state"].as_str(), Some("queued" | "running")));
        if !busy {
            return;
        }
        assert!(Instant::now() < deadline, "the jobs never finished: {jobs}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// One line of an HTTP transcript: a JSON body, a header, a metric sample or anything else.
fn same_http_line(expected: &str, actual: &str) -> bool {
    if expected.starts_with('{') {
        let expected: Value = serde_json::from_str(&expected.replace(", ...]", "]"))
            .unwrap_or_else(|e| panic!("the README's JSON does not parse ({e}): {expected}"));
        return serde_json::from_str(actual).is_ok_and(|actual| same_shape(&expected, &actual, ""));
    }
    if expected.starts_with("headroom_") {
        return series(expected) == series(actual);
    }
    match (expected.split_once(": "), actual.split_once(": ")) {
        (Some((name, value)), Some((actual_name, actual_value)))
            if !name.contains(' ') && name.eq_ignore_ascii_case(actual_name) =>
        {
            match name.to_ascii_lowercase().as_str() {
                "location" => actual_value.starts_with("/jobs/"),
                "content-length" => actual_value.parse::<u64>().is_ok(),
                "date" => !actual_value.is_empty(),
                _ => value == actual_value,
            }
        }
        _ => expected == actual,
    }
}

/// A metric sample's series: its name and labels, less the host's name.
fn series(sample: &str) -> String {
    let identity = sample.rsplit_once(' ').map_or(sample, |(series, _)| series);
    identity
        .split(',')
        .filter(|label| !label.contains("Hostname="))
        .collect::<Vec<_>>()
        .join(",")
}

/// Fields whose values differ from run to run or machine to machine (identifiers, times, the
/// host's name, what was timed and how many steps it took to time it): compared by type only.
const VARYING: [&str; 17] = [
    "id",
    "created_at",
    "started_at",
    "measured_at",
    "measured_on",
    "name",
    "elapsed_seconds",
    "step_seconds",
    "step_seconds_spread",
    "timed_steps",
    "samples_per_second",
    "spread",
    "fitted_samples_per_second",
    "throughput_batch_size",
    "throughput_knee",
    "throughput_fit",
    "set_aside",
];

/// Fields present only in some runs (the note of a knee the measurements could not place).
const SOMETIMES: [&str; 1] = ["throughput_note"];

/// Objects with the same keys, arrays at least as long with matching leading elements, and equal
/// values but for the varying fields, whose values need only be of the same type.
fn same_shape(expected: &Value, actual: &Value, key: &str) -> bool {
    match (expected, actual) {
        (e, a) if VARYING.contains(&key) && !e.is_number() && !e.is_string() => {
            std::mem::discriminant(e) == std::mem::discriminant(a)
        }
        (Value::Object(e), Value::Object(a)) => {
            let kept = |o: &serde_json::Map<String, Value>| {
                o.keys()
                    .filter(|k| !SOMETIMES.contains(&k.as_str()))
                    .count()
            };
            kept(e) == kept(a)
                && e.iter()
                    .filter(|(k, _)| !SOMETIMES.contains(&k.as_str()))
                    .all(|(k, v)| a.get(k).is_some_and(|av| same_shape(v, av, k)))
        }
        (Value::Array(e), Value::Array(a)) => {
            a.len() >= e.len() && e.iter().zip(a).all(|(e, a)| same_shape(e, a, key))
        }
        (Value::String(_), Value::String(_)) if VARYING.contains(&key) => true,
        (Value::Number(e), Value::Number(a)) if VARYING.contains(&key) => e.is_f64() == a.is_f64(),
        (e, a) => e == a,
    }
}
