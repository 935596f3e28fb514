//! How reproducible the answer is: tunes each example `RUNS` times (10) on the host device at
//! its default budget and reports the spread of the throughput knee, the largest and the
//! recommended batch. The knee should land within one probe step (a factor of two, doubling's
//! step) of its median in at least 9 of 10 runs on a quiet machine. `exact` counts knees equal
//! to the median: the knee is read from a fitted curve, so it need not be a size probed, and
//! equal knees are rare; `undecided` counts answers whose interval spans more than 4x, and
//! `intervals holding the median` those whose interval holds the median knee (how honest the
//! intervals are: too wide and every answer is undecided, too narrow and they mislead).
//! Run: `cargo bench --bench knee [-- FILTER]`; `RUNS=N` changes the count, `STEPS=N` the
//! examples' `steps_per_probe`, `TOLERANCE=F` their `knee_tolerance`, `PROBES=N` their
//! `throughput_probes`, and `CURVES=FILE` appends every run's throughput curve to FILE
//! (JSON lines: example, knee, interval, points), to try other knee rules on the same data.

use std::ops::ControlFlow;
use std::time::Instant;

use headroom_devices::host::HostDevice;
use headroom_engine::{tune, Job};

#[path = "common/examples.rs"]
mod examples;

fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

fn main() {
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    for (name, mut spec) in examples::selected() {
        if let Some(steps) = std::env::var("STEPS")
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
        {
            spec["search"]["steps_per_probe"] = steps.into();
        }
        if let Some(tolerance) = std::env::var("TOLERANCE")
            .ok()
            .and_then(|t| t.parse::<f64>().ok())
        {
            spec["search"]["knee_tolerance"] = tolerance.into();
        }
        if let Some(probes) = std::env::var("PROBES")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
        {
            spec["search"]["throughput_probes"] = probes.into();
        }
        let job = Job::from_value(spec).unwrap();
        let (mut knees, mut maxes, mut recommended, mut undecided) = (vec![], vec![], vec![], 0);
        let mut intervals = vec![];
        let started = Instant::now();
        for _ in 0..runs {
            let result = tune(&job, &mut HostDevice::default(), &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap();
            if let Ok(path) = std::env::var("CURVES") {
                let line = serde_json::json!({
                    "example": name,
                    "knee": result.throughput_knee,
                    "throughput": result.throughput,
                    "probes": result.probes,
                });
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .unwrap();
                std::io::Write::write_all(&mut file, format!("{line}\n").as_bytes()).unwrap();
            }
            knees.push(result.throughput_batch_size);
            intervals.extend(result.throughput_knee.map(|k| (k.low, k.high)));
            maxes.push(result.max_batch_size);
            recommended.push(result.recommended_batch_size);
            undecided += usize::from(result.throughput_note.is_some());
        }
        let knee = median(&knees);
        let within = knees
            .iter()
            .filter(|&&k| k * 2 >= knee && k <= knee * 2)
            .count();
        let exact = knees.iter().filter(|&&k| k == knee).count();
        let covering = intervals
            .iter()
            .filter(|&&(low, high)| low <= knee && knee <= high)
            .count();
        let range = |v: &[u64]| (*v.iter().min().unwrap(), *v.iter().max().unwrap());
        println!(
            "{name:<18} {runs} runs in {:>6.1} s  knee median {knee:>6}, within one step {within}/{runs}, \
             exact {exact}/{runs}, undecided {undecided}/{runs}, intervals holding the median \
             {covering}/{runs}, knees {knees:?}  max {:?}  recommended {:?}",
            started.elapsed().as_secs_f64(),
            range(&maxes),
            range(&recommended),
        );
    }
}
