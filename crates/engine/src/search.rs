//! The batch-size search: bracket the limit (doubling, or around the memory model's
//! prediction), bisect to the tolerance, confirm, and scale by the headroom.
//!
//! The search sees only [`Device`], so the property tests below drive it with a fake device
//! whose limit is known.

use std::ops::ControlFlow;
use std::time::Instant;

use crate::advice::{accumulation, recommended_batch_size};
use crate::device::{Device, DeviceError};
use crate::job::{Job, Strategy};
use crate::knee;
use crate::plan::{DoesNotFit, Plan};
use crate::result::{measured, LimitedBy, Outcome, Probe, TuneResult};
use crate::step::Steps;

/// Seed of the synthetic data and parameters of every probe: probes are reproducible.
pub const PROBE_SEED: u64 = 0x5eed;

/// How many times a confirmation may fail (the limit moved) before the search gives up.
const MAX_CONFIRMATIONS: u32 = 3;

/// Why a search gave no answer. It crosses from a probe worker process to the service as JSON.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TuneError {
    /// Batch size 1 does not fit.
    #[error(transparent)]
    DoesNotFit(#[from] DoesNotFit),
    /// A device error that is not out-of-memory stopped the search.
    #[error("probe at batch size {batch_size} failed: {message}")]
    Fault {
        /// The probe that failed.
        batch_size: u64,
        /// The device's message.
        message: String,
    },
    /// Confirmation probes kept failing: memory available to the search is changing.
    #[error("the device's limit moved during the search (batch size {batch_size} fitted, then did not); is another process using the device?")]
    Unstable {
        /// The size that fitted once and then failed.
        batch_size: u64,
    },
    /// The observer asked the search to stop.
    #[error("the search was cancelled")]
    Cancelled,
}

/// Runs the search for `job` on `device`. `observer` sees each probe as it finishes and may stop
/// the search by returning `ControlFlow::Break`.
pub fn tune(
    job: &Job,
    device: &mut dyn Device,
    observer: &mut dyn FnMut(&Probe) -> ControlFlow<()>,
) -> Result<TuneResult, TuneError> {
    let started = Instant::now();
    let plan = job.plan();
    let info = device.info();
    let predicted = plan.predict_max_batch(info.free_bytes, info.kind.allocator());
    let mut search = Search {
        device,
        plan,
        job,
        cap: job.batch_cap(),
        probes: Vec::new(),
        observer,
    };
    let (mut fit, mut oom) = match job.search.strategy {
        Strategy::Double => search.bracket_by_doubling()?,
        Strategy::Predict => search.bracket_around(predicted.max(1))?,
    };
    let mut confirmations = 0;
    while let Some(first_oom) = oom {
        fit = search.bisect(fit, first_oom)?;
        if search.last_probe_fit_at(fit) || search.probe(fit)? {
            break;
        }
        confirmations += 1;
        if confirmations == MAX_CONFIRMATIONS {
            return Err(TuneError::Unstable { batch_size: fit });
        }
        oom = Some(fit);
        fit = search
            .largest_fit_below(fit)
            .ok_or(TuneError::Unstable { batch_size: fit })?;
    }
    let limited_by = match oom {
        Some(_) => LimitedBy::Memory,
        None => job.cap_reason(),
    };
    search.measure_knee()?;
    let points = measured(&search.probes);
    let reading = knee::read(&points);
    let largest = points.last().map_or(1, |p| p.batch_size);
    let knee = reading
        .knee(job.search.knee_tolerance)
        .map(|k| k.aligned(job.search.multiple_of, largest));
    let recommended = recommended_batch_size(fit, job.headroom, job.search.multiple_of);
    Ok(TuneResult {
        max_batch_size: fit,
        recommended_batch_size: recommended,
        recommended_tokens: plan.tokens_in(recommended),
        headroom: job.headroom,
        precision: plan.precision,
        precision_note: plan.precision_note(info.free_bytes, info.kind.allocator()),
        framework: plan.framework,
        fsdp_world_size: plan.sharding.map(|s| s.world),
        fsdp_reshard_after_forward: plan.sharding.map(|s| s.reshard_after_forward),
        throughput_batch_size: knee.map_or(fit, |k| k.batch_size),
        throughput_note: knee.filter(|k| !k.decided()).map(|k| {
            format!(
                "the speed measurements do not place the knee: anywhere from {} to {} fits them; \
                 more throughput_probes, a longer min_timed_seconds or a quieter machine would",
                k.low, k.high
            )
        }),
        throughput_knee: knee,
        throughput: reading.curve(),
        throughput_fit: reading.step_time(),
        accumulation: job.target_batch_size.map(|target| {
            accumulation(target, job.world_size, recommended, job.search.multiple_of)
        }),
        limited_by,
        predicted_max_batch_size: predicted,
        device: info,
        memory: plan.memory(recommended).unwrap_or_default(),
        probes: search.probes,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    })
}

struct Search<'a> {
    device: &'a mut dyn Device,
    plan: &'a Plan,
    job: &'a Job,
    cap: u64,
    probes: Vec<Probe>,
    observer: &'a mut dyn FnMut(&Probe) -> ControlFlow<()>,
}

impl Search<'_> {
    /// Runs one probe: `Ok(true)` if it fitted, `Ok(false)` on out-of-memory.
    fn probe(&mut self, batch_size: u64) -> Result<bool, TuneError> {
        debug_assert!((1..=self.cap).contains(&batch_size));
        let steps = Steps {
            at_least: self.job.search.steps_per_probe,
            min_timed_seconds: self.job.search.min_timed_seconds,
        };
        let outcome = self
            .device
            .run_steps(self.plan, batch_size, steps, PROBE_SEED);
        let (probe, result) = match outcome {
            Ok(report) => {
                let speed = report.speed();
                (
                    Probe {
                        batch_size,
                        outcome: Outcome::Fit,
                        step_seconds: speed.map_or(0.0, |s| s.step_seconds),
                        step_seconds_spread: speed.map_or(0.0, |s| s.spread),
                        timed_steps: report.timed_steps,
                        samples_per_second: speed.map_or(0.0, |s| s.samples_per_second(batch_size)),
                        device_bytes: report.device_bytes,
                    },
                    Ok(true),
                )
            }
            Err(DeviceError::OutOfMemory { .. }) => (failed(batch_size, Outcome::Oom), Ok(false)),
            Err(DeviceError::Fault(message)) => (
                failed(batch_size, Outcome::Error),
                Err(TuneError::Fault {
                    batch_size,
                    message,
                }),
            ),
        };
        let flow = (self.observer)(&probe);
        self.probes.push(probe);
        if flow.is_break() && result.is_ok() {
            return Err(TuneError::Cancelled);
        }
        result
    }

    fn does_not_fit(&self) -> TuneError {
        self.plan.does_not_fit(self.device.info().free_bytes).into()
    }

    /// Doubles from `start` to the first OOM or the cap; halves to 1 if `start` does not fit.
    /// Returns the last fit and the first OOM (none if the cap was reached).
    fn bracket_by_doubling(&mut self) -> Result<(u64, Option<u64>), TuneError> {
        let mut size = self.job.search.start.min(self.cap);
        if self.probe(size)? {
            loop {
                if size == self.cap {
                    return Ok((size, None));
                }
                let next = size.saturating_mul(2).min(self.cap);
                if !self.probe(next)? {
                    return Ok((size, Some(next)));
                }
                size = next;
            }
        }
        loop {
            if size == 1 {
                return Err(self.does_not_fit());
            }
            let smaller = size / 2;
            if self.probe(smaller)? {
                return Ok((smaller, Some(size)));
            }
            size = smaller;
        }
    }

    /// Probes `predicted` first, then gallops up or down from it with a doubling step that starts
    /// at the bisection's resolution, so an accurate prediction costs two probes.
    fn bracket_around(&mut self, predicted: u64) -> Result<(u64, Option<u64>), TuneError> {
        let first = self.align_down(predicted.min(self.cap));
        let mut step = self.resolution(first);
        if self.probe(first)? {
            let mut fit = first;
            loop {
                if fit == self.cap {
                    return Ok((fit, None));
                }
                let next = fit.saturating_add(step).min(self.cap);
                if !self.probe(next)? {
                    return Ok((fit, Some(next)));
                }
                fit = next;
                step = step.saturating_mul(2);
            }
        }
        let mut oom = first;
        loop {
            if oom == 1 {
                return Err(self.does_not_fit());
            }
            let next = oom.saturating_sub(step).max(1);
            if self.probe(next)? {
                return Ok((next, Some(oom)));
            }
            oom = next;
            step = step.saturating_mul(2);
        }
    }

    /// Narrows `[fit, oom)` until the gap is within the resolution; returns the last fit.
    fn bisect(&mut self, mut fit: u64, mut oom: u64) -> Result<u64, TuneError> {
        while oom - fit > self.resolution(fit) {
            let middle = self.midpoint(fit, oom);
            if self.probe(middle)? {
                fit = middle;
            } else {
                oom = middle;
            }
        }
        Ok(fit)
    }

    /// The gap at which bisection stops: `tolerance x size`, but at least `multiple_of` once
    /// `size` reaches it (below that, exact).
    fn resolution(&self, size: u64) -> u64 {
        resolution(size, self.job.search.tolerance, self.job.search.multiple_of)
    }

    /// A point strictly inside `(fit, oom)`, on a multiple of `multiple_of` where one lies there.
    fn midpoint(&self, fit: u64, oom: u64) -> u64 {
        let middle = fit + (oom - fit) / 2;
        let aligned = self.align_down(middle);
        if aligned > fit {
            aligned
        } else {
            middle
        }
    }

    /// `size` rounded down to `multiple_of`, unless that would reach 0.
    fn align_down(&self, size: u64) -> u64 {
        let m = self.job.search.multiple_of;
        if size >= m {
            size / m * m
        } else {
            size.max(1)
        }
    }

    /// Once the largest batch is found, measures what the throughput knee depends on, up to
    /// `search.throughput_probes` more probes of the same steps as the others (so that no point
    /// is timed differently): sizes between the knee and a distant smaller neighbour (or below
    /// a knee with none), then, while the knee's interval is open, the sizes nearest the knee
    /// probed again until [`knee::KNEE_PROBES`] probes are pooled there. An OOM there (the limit
    /// moved) ends them.
    fn measure_knee(&mut self) -> Result<(), TuneError> {
        let search = &self.job.search;
        for _ in 0..search.throughput_probes {
            let points = measured(&self.probes);
            let Some(estimate) = knee::read(&points).knee(search.knee_tolerance) else {
                break;
            };
            // First a grid fine enough to place the knee, then, while its interval is open,
            // more steps where it is decided.
            let next = knee::next_between(&points, estimate.batch_size, search.multiple_of)
                .or_else(|| {
                    (estimate.low < estimate.high)
                        .then(|| knee::next_to_time(&points, &estimate))
                        .flatten()
                });
            match next {
                Some(size) if self.probe(size)? => {}
                _ => break,
            }
        }
        Ok(())
    }

    fn last_probe_fit_at(&self, size: u64) -> bool {
        self.probes
            .last()
            .is_some_and(|p| p.batch_size == size && p.outcome == Outcome::Fit)
    }

    fn largest_fit_below(&self, size: u64) -> Option<u64> {
        self.probes
            .iter()
            .filter(|p| p.outcome == Outcome::Fit && p.batch_size < size)
            .map(|p| p.batch_size)
            .max()
    }
}

/// The gap between the last fit and the first OOM at which the search stops.
pub fn resolution(size: u64, tolerance: f64, multiple_of: u64) -> u64 {
    let relative = (size as f64 * tolerance).floor() as u64;
    relative.max(if size >= multiple_of { multiple_of } else { 1 })
}

fn failed(batch_size: u64, outcome: Outcome) -> Probe {
    Probe {
        batch_size,
        outcome,
        step_seconds: 0.0,
        step_seconds_spread: 0.0,
        timed_steps: 0,
        samples_per_second: 0.0,
        device_bytes: 0,
    }
}

#[cfg(test)]
mod tests;
