use super::*;
use crate::device::{DeviceInfo, DeviceKind, StepReport};
use crate::job::testing::mlp;
use crate::plan::Allocator;
use proptest::prelude::*;

/// A device whose largest batch is `limit`; it can also fault at one size or lose memory. It
/// trains 1000 samples per second per sample of batch up to `plateau`, then no faster.
struct FakeDevice {
    limit: u64,
    plateau: u64,
    /// What its timer reports instead of the step's time, if anything (a GPU's event pair read
    /// as NaN).
    timer: Option<f64>,
    fault_at: Option<u64>,
    /// After this many probes the limit drops to `limit / 2` (a neighbour took memory).
    shrink_after: Option<usize>,
    probed: Vec<u64>,
}

impl FakeDevice {
    fn with_limit(limit: u64) -> Self {
        FakeDevice {
            limit,
            plateau: u64::MAX,
            timer: None,
            fault_at: None,
            shrink_after: None,
            probed: Vec::new(),
        }
    }
}

impl Device for FakeDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            kind: DeviceKind::Host,
            index: 0,
            name: "fake".into(),
            uuid: None,
            total_bytes: 1 << 40,
            free_bytes: 1 << 40,
        }
    }

    fn run_steps(
        &mut self,
        _: &Plan,
        batch_size: u64,
        steps: Steps,
        _: u64,
    ) -> Result<StepReport, DeviceError> {
        self.probed.push(batch_size);
        if self.shrink_after.is_some_and(|n| self.probed.len() > n) {
            self.limit /= 2;
            self.shrink_after = None;
        }
        if Some(batch_size) == self.fault_at {
            return Err(DeviceError::Fault("illegal address".into()));
        }
        if batch_size > self.limit {
            return Err(DeviceError::OutOfMemory {
                requested_bytes: batch_size,
                free_bytes: self.limit,
            });
        }
        let seconds = batch_size as f64 / (batch_size.min(self.plateau) as f64 * 1000.0);
        Ok(StepReport {
            step_seconds: self.timer.unwrap_or(seconds),
            step_seconds_spread: self.timer.map_or(0.0, |_| f64::NAN),
            timed_steps: steps.at_least.saturating_sub(1).max(1),
            device_bytes: batch_size,
            final_loss: 1.0,
        })
    }
}

fn job(search: &str, extra: &str) -> Job {
    mlp(
        &[784],
        &[128],
        10,
        "sgd",
        &format!(r#", "search": {{{search}}} {extra}"#),
    )
}

fn run(job: &Job, device: &mut FakeDevice) -> Result<TuneResult, TuneError> {
    tune(job, device, &mut |_| ControlFlow::Continue(()))
}

#[test]
fn doubling_then_bisection_finds_the_limit() {
    let mut device = FakeDevice::with_limit(20_000);
    let result = run(&job("", ""), &mut device).unwrap();
    assert_eq!(result.limited_by, LimitedBy::Memory);
    assert!(result.max_batch_size <= 20_000 && result.max_batch_size >= 20_000 - 200);
    assert_eq!(result.max_batch_size % 8, 0);
    assert_eq!(
        result.recommended_batch_size,
        recommended_batch_size(result.max_batch_size, 0.8, 8)
    );
    assert_eq!(&device.probed[..4], &[16, 32, 64, 128]);
    assert!(result.probes.iter().any(|p| p.outcome == Outcome::Oom));
    assert_eq!(result.probes.len(), device.probed.len());
}

#[test]
fn the_throughput_knee_is_found_and_sharpened_below_the_maximum() {
    let mut device = FakeDevice::with_limit(100_000);
    device.plateau = 3000;
    let result = run(&job("", ""), &mut device).unwrap();
    // Doubling measured 2048 (slower) and 4096 (as fast as any); the fitted curve turns
    // between them, where a step of 1 ms becomes 3000 samples' work. Doubling stops gaining 10%
    // at 2728 on this sharp curve, `max(fixed, per_sample * b)`; the fitted curve, whose sharpest
    // shape (`p` 8) turns more gently, puts the knee 11% above (3032 measured; held within 12%), as
    // docs/gpu-runs.md says.
    assert!(
        (2728..=3055).contains(&result.throughput_batch_size),
        "knee {:?}",
        result.throughput_knee
    );
    // The sizes around the knee were probed again.
    let probes_at = |b: u64| result.probes.iter().filter(|p| p.batch_size == b).count();
    assert!(
        probes_at(2048) > 1 && probes_at(4096) > 1,
        "{:?}",
        result.probes
    );
    let sizes: Vec<u64> = result.throughput.iter().map(|p| p.batch_size).collect();
    assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
    assert_eq!(*sizes.last().unwrap(), result.max_batch_size);

    // A prediction-first search measures only near the limit: it adds probes below.
    let mut device = FakeDevice::with_limit(100_000);
    device.plateau = 3000;
    let predicted = job(r#""strategy": "predict", "max": 100000"#, "");
    let result = run(&predicted, &mut device).unwrap();
    assert!(result.throughput.len() >= 4, "{:?}", result.throughput);
    assert!(result.throughput_batch_size < result.max_batch_size / 4);
    let extra = result
        .probes
        .iter()
        .filter(|p| p.batch_size < 50_000)
        .count();
    assert!(extra <= 4, "{:?}", result.probes);
}

/// A timer that reports NaN or infinity leaves probes without a speed, never a number JSON
/// cannot carry: the answer crosses a worker's pipe and the API as it was made.
#[test]
fn a_timer_that_gives_no_number_leaves_probes_without_a_speed() {
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        let mut device = FakeDevice::with_limit(5_000);
        device.timer = Some(bad);
        let result = run(&job("", ""), &mut device).unwrap();
        assert!(result.max_batch_size > 4_900, "{bad}");
        for probe in &result.probes {
            assert_eq!((probe.step_seconds, probe.samples_per_second), (0.0, 0.0));
            assert_eq!(probe.step_seconds_spread, 0.0);
        }
        let json = serde_json::to_string(&result).unwrap();
        assert!(!json.contains("null"), "{json}");
        let back: TuneResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.max_batch_size, result.max_batch_size);
    }
}

#[test]
fn a_target_batch_gets_accumulation_advice() {
    let mut device = FakeDevice::with_limit(1000);
    let result = run(
        &job("", r#", "target_batch_size": 4096, "world_size": 2"#),
        &mut device,
    )
    .unwrap();
    let advice = result.accumulation.unwrap();
    assert!(advice.micro_batch_size <= result.recommended_batch_size);
    assert_eq!(advice.global_batch_size, 4096);
    assert!(advice.exact);
    assert!(run(&job("", ""), &mut FakeDevice::with_limit(1000))
        .unwrap()
        .accumulation
        .is_none());
}

#[test]
fn a_start_that_does_not_fit_halves_down() {
    let mut device = FakeDevice::with_limit(3);
    let result = run(&job("", ""), &mut device).unwrap();
    assert_eq!(result.max_batch_size, 3);
    assert_eq!(result.recommended_batch_size, 2);
    assert_eq!(&device.probed[..4], &[16, 8, 4, 2]);
}

#[test]
fn batch_one_that_does_not_fit_reports_the_bytes() {
    let mut device = FakeDevice::with_limit(0);
    let err = run(&job("", ""), &mut device).unwrap_err();
    match err {
        TuneError::DoesNotFit(DoesNotFit {
            fixed_bytes,
            batch_one_bytes,
            free_bytes,
        }) => {
            assert_eq!(fixed_bytes, 2 * 101_770 * 4 + 4);
            assert!(batch_one_bytes > fixed_bytes);
            assert_eq!(free_bytes, 1 << 40);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(device.probed, [16, 8, 4, 2, 1]);
}

#[test]
fn a_fault_stops_the_search_and_is_not_taken_for_oom() {
    let mut device = FakeDevice::with_limit(1 << 20);
    device.fault_at = Some(256);
    let err = run(&job("", ""), &mut device).unwrap_err();
    assert_eq!(
        err,
        TuneError::Fault {
            batch_size: 256,
            message: "illegal address".into()
        }
    );
    assert_eq!(device.probed.last(), Some(&256));
}

#[test]
fn the_dataset_size_and_max_cap_the_batch() {
    let mut device = FakeDevice::with_limit(1 << 30);
    let result = run(&job("", r#", "dataset_size": 50000"#), &mut device).unwrap();
    assert_eq!(result.max_batch_size, 50_000);
    assert_eq!(result.limited_by, LimitedBy::DatasetSize);
    assert_eq!(result.recommended_batch_size, 40_000);
    let result = run(
        &job(r#""max": 1000"#, r#", "dataset_size": 50000"#),
        &mut FakeDevice::with_limit(1 << 30),
    )
    .unwrap();
    assert_eq!(
        (result.max_batch_size, result.limited_by),
        (1000, LimitedBy::Max)
    );
}

#[test]
fn an_observer_can_cancel_after_a_probe() {
    let mut device = FakeDevice::with_limit(1 << 20);
    let mut seen = 0;
    let err = tune(&job("", ""), &mut device, &mut |_| {
        seen += 1;
        if seen == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap_err();
    assert_eq!(err, TuneError::Cancelled);
    assert_eq!(device.probed.len(), 3);
}

#[test]
fn a_limit_that_moves_is_followed_down() {
    let mut device = FakeDevice::with_limit(10_000);
    device.shrink_after = Some(12);
    let result = run(&job(r#""throughput_probes": 0"#, ""), &mut device).unwrap();
    assert!(result.max_batch_size <= 5_000, "{}", result.max_batch_size);
    let last = result.probes.last().unwrap();
    assert_eq!(
        (last.batch_size, last.outcome),
        (result.max_batch_size, Outcome::Fit)
    );
}

#[test]
fn predict_with_an_exact_model_takes_three_probes() {
    let plan_job = job(r#""strategy": "predict", "throughput_probes": 0"#, "");
    let limit = plan_job.plan().predict_max_batch(1 << 40, Allocator::Exact);
    let mut device = FakeDevice::with_limit(limit);
    let result = run(&plan_job, &mut device).unwrap();
    assert_eq!(result.predicted_max_batch_size, limit);
    assert!(limit - result.max_batch_size <= (limit as f64 * 0.01) as u64);
    assert!(device.probed.len() <= 3, "{:?}", device.probed);
}

proptest! {
    #[test]
    fn the_search_finds_the_true_limit(
        limit in 1u64..1 << 34,
        start in 1u64..4096,
        multiple_of in prop::sample::select(vec![1u64, 8, 32, 64]),
        tolerance in prop::sample::select(vec![0.001, 0.01, 0.05]),
        headroom in 0.05f64..=1.0,
        predict in any::<bool>(),
        prediction_error in 0.25f64..4.0,
    ) {
        let strategy = if predict { "predict" } else { "double" };
        let job = job(
            &format!(r#""start": {start}, "multiple_of": {multiple_of}, "tolerance": {tolerance},
                         "strategy": "{strategy}", "max": {}"#, 1u64 << 40),
            &format!(r#", "headroom": {headroom}"#),
        );
        let mut device = FakeDevice::with_limit(limit);
        // Make the memory model wrong by a random factor: the answer must not depend on it.
        let fit = if predict {
            let skewed = ((limit as f64) * prediction_error) as u64;
            let mut search = Search { device: &mut device, plan: job.plan(), job: &job, cap: job.batch_cap(), probes: vec![], observer: &mut |_| ControlFlow::Continue(()) };
            let (fit, oom) = search.bracket_around(skewed.max(1)).unwrap();
            let fit = search.bisect(fit, oom.unwrap()).unwrap();
            let probes = search.probes.len() as f64;
            let distance = (skewed.max(1) as f64 - limit as f64).abs().max(1.0);
            let resolution = ((limit.min(skewed.max(1)) as f64 * tolerance).floor()).max(multiple_of as f64);
            let bound = 2.0 * (distance / resolution).log2().max(0.0) + 5.0;
            prop_assert!(probes <= bound, "{probes} probes > {bound}");
            fit
        } else {
            let result = run(&job, &mut device).unwrap();
            let bound = (limit as f64 / start as f64).log2().abs().ceil() + (1.0 / tolerance).log2().ceil() + 3.0 + 4.0;
            prop_assert!(result.probes.len() as f64 <= bound, "{} probes > {bound}", result.probes.len());
            prop_assert!(result.recommended_batch_size as f64 <= headroom * result.max_batch_size as f64 || result.recommended_batch_size == 1);
            prop_assert!(result.recommended_batch_size >= 1);
            result.max_batch_size
        };
        prop_assert!(fit <= limit);
        prop_assert!(limit - fit <= resolution(fit, tolerance, multiple_of), "limit {limit}, found {fit}");
        prop_assert!(device.probed.iter().all(|&b| b <= job.batch_cap()));
    }

    #[test]
    fn never_probes_above_the_cap(limit in 1u64..1 << 20, max in 1u64..1 << 16, dataset in 1u64..1 << 16) {
        let job = job(&format!(r#""start": 1, "max": {max}"#), &format!(r#", "dataset_size": {dataset}"#));
        let mut device = FakeDevice::with_limit(limit);
        let result = run(&job, &mut device).unwrap();
        prop_assert!(device.probed.iter().all(|&b| b <= max.min(dataset)));
        prop_assert!(result.max_batch_size <= limit.min(max).min(dataset));
    }
}
