//! The throughput knee read from noisy measurements. Samples/s against batch size is fitted with
//! a curve that can only rise (isotonic regression, weighted by the steps timed at each point);
//! the knee is the smallest batch from which doubling the batch gains less than the tolerance
//! in fitted speed (diminishing returns: past it a larger batch buys almost nothing); and the
//! same rule with every gain made as small, then as large, as the points' uncertainty allows
//! gives the range the knee could lie in. When that range spans more than [`DECIDED_RATIO`], the
//! measurements do not decide the knee, and the answer says so.
//!
//! Read against the best speed instead ("the smallest batch within 5% of the fastest"), the
//! knee of a curve that keeps rising slowly lands wherever the noise puts the fastest point:
//! on the host's CIFAR MLP, 6 of 10 runs within one doubling of their median; by the gain of a
//! doubling, 10 of 10 on the same measurements (`cargo bench --bench knee`, README).
//!
//! One rule comes from physics rather than the fit: more samples never take less time, so a
//! larger batch cannot step faster than a smaller one. A pair of neighbours that breaks it
//! beyond both points' uncertainty holds an outlier (a machine that got quieter or busier
//! between them); the one further from the other points is set aside ([`set_aside`]), drawn but
//! not fitted.

use serde::{Deserialize, Serialize};

/// Probes pooled at a point the knee depends on once the largest batch is found. Each probe is
/// a window of its own, and a machine's speed drifts more between windows than between the
/// steps of one (on this repository's 2-core host, 20-30% between probes of the same batch a
/// second apart): more probes steady a point where more steps do not.
pub const KNEE_PROBES: u32 = 3;
/// The widest knee interval (high / low) that still names a knee.
pub const DECIDED_RATIO: f64 = 4.0;

/// One batch size's measured speed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Batch size.
    pub batch_size: u64,
    /// Median samples/s.
    pub samples_per_second: f64,
    /// The steps' interquartile range relative to their median (the widest of pooled probes).
    pub spread: f64,
    /// Steps timed.
    pub timed_steps: u32,
    /// Probes pooled.
    pub probes: u32,
}

/// The non-decreasing sequence closest to `values` in weighted least squares (pool adjacent
/// violators).
pub fn isotonic(values: &[f64], weights: &[f64]) -> Vec<f64> {
    // Blocks of pooled points: (mean, weight, count).
    let mut blocks: Vec<(f64, f64, usize)> = Vec::with_capacity(values.len());
    for (&value, &weight) in values.iter().zip(weights) {
        blocks.push((value, weight, 1));
        while blocks.len() > 1 && blocks[blocks.len() - 2].0 > blocks[blocks.len() - 1].0 {
            let (v2, w2, n2) = blocks.pop().expect("two blocks");
            let (v1, w1, n1) = blocks.pop().expect("two blocks");
            let weight = w1 + w2;
            blocks.push(((v1 * w1 + v2 * w2) / weight, weight, n1 + n2));
        }
    }
    blocks
        .into_iter()
        .flat_map(|(value, _, count)| std::iter::repeat_n(value, count))
        .collect()
}

/// The knee and the range it could lie in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knee {
    /// The smallest batch from which doubling gains less than the tolerance in fitted samples/s.
    pub batch_size: u64,
    /// The smallest batch the knee could be, given the measurements' spread.
    pub low: u64,
    /// The largest batch the knee could be.
    pub high: u64,
}

impl Knee {
    /// Whether the measurements place the knee within [`DECIDED_RATIO`].
    pub fn decided(&self) -> bool {
        self.high as f64 <= DECIDED_RATIO * self.low as f64
    }
}

/// A point's relative uncertainty: how far a probe strays from the fit (`scatter`: the
/// machine's drift between probes), less by the square root of the probes pooled there, or the
/// standard error of its median where that is larger (three steps timed or more); at least
/// [`MIN_UNCERTAINTY`].
fn uncertainty(point: &Measured, scatter: f64) -> f64 {
    let within = if point.timed_steps >= 3 {
        MEDIAN_ERROR * point.spread / f64::from(point.timed_steps).sqrt()
    } else {
        0.0
    };
    let between = scatter / f64::from(point.probes.max(1)).sqrt();
    within.max(between).max(MIN_UNCERTAINTY)
}

/// The standard error of the median of `n` timed steps is this much of their interquartile
/// range over `sqrt(n)`: `1.2533 / 1.349` for normal scatter.
const MEDIAN_ERROR: f64 = 0.93;

/// The weight of each point in the rising fit: the probes pooled there (each an independent
/// window of the machine's speed).
fn weights<'a>(points: impl IntoIterator<Item = &'a Measured>) -> Vec<f64> {
    points
        .into_iter()
        .map(|p| f64::from(p.probes.max(1)))
        .collect()
}

/// How much faster a larger batch may step than a smaller one before the pair is a contradiction:
/// a size that suits the kernels' tiles (a multiple of 16, say) can beat a slightly smaller one.
const ALIGNMENT_SLACK: f64 = 0.10;

/// The smallest uncertainty a point is given.
const MIN_UNCERTAINTY: f64 = 0.01;

/// How far the points stray from the rising fit: the median relative distance, doubled.
fn scatter(points: &[Measured], fit: &[f64]) -> f64 {
    let mut residuals: Vec<f64> = points
        .iter()
        .zip(fit)
        .filter(|(_, &f)| f > 0.0)
        .map(|(p, &f)| (p.samples_per_second - f).abs() / f)
        .collect();
    if residuals.is_empty() {
        return MIN_UNCERTAINTY;
    }
    residuals.sort_by(f64::total_cmp);
    2.0 * residuals[residuals.len() / 2]
}

/// The knee of `points` for `tolerance` (a fraction): `None` without points. The interval holds
/// every batch that could, within the points' uncertainty, be the first whose fitted speed
/// reaches the threshold: from the first the optimistic fit puts past it to the first the
/// pessimistic fit does.
pub fn knee(points: &[Measured], tolerance: f64) -> Option<Knee> {
    let aside = set_aside(points);
    let kept: Vec<Measured> = points
        .iter()
        .zip(&aside)
        .filter(|(_, &aside)| !aside)
        .map(|(p, _)| *p)
        .collect();
    knee_of_fitted(&kept, tolerance)
}

fn knee_of_fitted(points: &[Measured], tolerance: f64) -> Option<Knee> {
    let values: Vec<f64> = points.iter().map(|p| p.samples_per_second).collect();
    let fit = isotonic(&values, &weights(points));
    if fit.is_empty() {
        return None;
    }
    let scatter = scatter(points, &fit);
    let uncertainties: Vec<f64> = points.iter().map(|p| uncertainty(p, scatter)).collect();
    // The first size from which doubling gains less than the tolerance, each gain moved by its
    // uncertainty (the two speeds' combined): `lean` -1 makes every gain as small as the points
    // allow (the earliest the knee could be), 1 as large (the latest), 0 keeps the fit's.
    let first_flat = |lean: f64| {
        (0..points.len())
            .find(|&i| {
                let (next, next_uncertainty) = at_double(points, &fit, &uncertainties, i);
                // Not `f64::hypot`: it links glibc 2.35's `hypot`, past the glibc the binary supports.
                let spread = (uncertainties[i].powi(2) + next_uncertainty.powi(2)).sqrt();
                next / fit[i] * (1.0 + spread).powf(lean) < 1.0 + tolerance
            })
            .map_or(points[points.len() - 1].batch_size, |i| {
                points[i].batch_size
            })
    };
    Some(Knee {
        batch_size: first_flat(0.0),
        low: first_flat(-1.0),
        high: first_flat(1.0),
    })
}

/// The fitted speed at twice point `i`'s batch size, and its uncertainty: both interpolated in
/// log batch size between the measured points around it, and flat past the largest (no batch
/// beyond it fits, so none is faster).
fn at_double(points: &[Measured], fit: &[f64], uncertainties: &[f64], i: usize) -> (f64, f64) {
    let sizes: Vec<u64> = points.iter().map(|p| p.batch_size).collect();
    let target = 2.0 * points[i].batch_size as f64;
    let at = |values: &[f64]| log_interpolate(&sizes, values, target).unwrap_or(values[i]);
    (at(fit), at(uncertainties))
}

/// `values` (one per size of `sizes`, which rise) at `size`: interpolated in log size between
/// the sizes around it, flat past the largest; `None` with no size below it.
fn log_interpolate(sizes: &[u64], values: &[f64], size: f64) -> Option<f64> {
    let Some(above) = sizes.iter().position(|&s| s as f64 >= size) else {
        return values.last().copied();
    };
    if sizes[above] as f64 == size {
        return Some(values[above]);
    }
    let below = above.checked_sub(1)?;
    let (x0, x1) = ((sizes[below] as f64).ln(), (sizes[above] as f64).ln());
    let t = ((size.ln() - x0) / (x1 - x0)).clamp(0.0, 1.0);
    Some(values[below] + t * (values[above] - values[below]))
}

/// One point of the throughput curve in the answer: a batch size that fitted, its measured
/// speed and spread, and the fitted speed the knee is read from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThroughputPoint {
    /// Batch size.
    pub batch_size: u64,
    /// Samples trained per second at that size (the median step).
    pub samples_per_second: f64,
    /// The timed steps' interquartile range relative to their median.
    #[serde(default)]
    pub spread: f64,
    /// The rising curve fitted through the points kept, at this one.
    #[serde(default)]
    pub fitted_samples_per_second: f64,
    /// Left out of the fit: it stepped faster than a smaller batch could ([`set_aside`]).
    #[serde(default)]
    pub set_aside: bool,
}

/// The curve of `points` with its fit; a point set aside reads the fit of the nearest kept
/// point below it (or above, with none below).
pub fn curve(points: &[Measured]) -> Vec<ThroughputPoint> {
    let aside = set_aside(points);
    let kept: Vec<usize> = (0..points.len()).filter(|&i| !aside[i]).collect();
    let values: Vec<f64> = kept.iter().map(|&i| points[i].samples_per_second).collect();
    let fitted = isotonic(&values, &weights(kept.iter().map(|&i| &points[i])));
    let fitted_at = |i: usize| {
        let below = kept.iter().rposition(|&k| k <= i);
        below
            .or((!kept.is_empty()).then_some(0))
            .map_or(0.0, |at| fitted[at])
    };
    points
        .iter()
        .enumerate()
        .map(|(i, p)| ThroughputPoint {
            batch_size: p.batch_size,
            samples_per_second: p.samples_per_second,
            spread: p.spread,
            fitted_samples_per_second: fitted_at(i),
            set_aside: aside[i],
        })
        .collect()
}

/// Which of `points` (sorted by batch size) to leave out of the fit. Neighbours `a < b` break
/// the rule when `b` steps faster than `a` by more than [`ALIGNMENT_SLACK`] beyond both points'
/// uncertainty; of the two, the one
/// further (in log speed) from the level of the other points there is set aside, and the check
/// runs again until no pair breaks it. A pair with no other point below it is left alone: there
/// is nothing to tell which of the two strays.
pub fn set_aside(points: &[Measured]) -> Vec<bool> {
    let mut aside = vec![false; points.len()];
    let values: Vec<f64> = points.iter().map(|p| p.samples_per_second).collect();
    let scatter = scatter(points, &isotonic(&values, &weights(points)));
    while let Some((a, b)) = breaking_pair(points, &aside, scatter) {
        let others: Vec<&Measured> = (0..points.len())
            .filter(|&i| !aside[i] && i != a && i != b)
            .map(|i| &points[i])
            .collect();
        let sizes: Vec<u64> = others.iter().map(|p| p.batch_size).collect();
        let values: Vec<f64> = others.iter().map(|p| p.samples_per_second).collect();
        let level = isotonic(&values, &weights(others.iter().copied()));
        let stray = |i: usize| stray(&points[i], &sizes, &level);
        let (Some(da), Some(db)) = (stray(a), stray(b)) else {
            break;
        };
        aside[if db >= da { b } else { a }] = true;
    }
    aside
}

/// The first pair of kept neighbours whose larger batch steps faster than the smaller beyond
/// both points' uncertainty, among those with a kept point below them.
fn breaking_pair(points: &[Measured], aside: &[bool], scatter: f64) -> Option<(usize, usize)> {
    let kept: Vec<usize> = (0..points.len()).filter(|&i| !aside[i]).collect();
    kept.windows(2).skip(1).find_map(|w| {
        let (a, b) = (&points[w[0]], &points[w[1]]);
        let step_a = a.batch_size as f64 / a.samples_per_second;
        let step_b = b.batch_size as f64 / b.samples_per_second;
        let margin = 1.0 + ALIGNMENT_SLACK + uncertainty(a, scatter) + uncertainty(b, scatter);
        (step_b * margin < step_a).then_some((w[0], w[1]))
    })
}

/// How far (|ln|) `point`'s speed lies from the level of the other points at its batch size:
/// their fit `level` at their `sizes`, interpolated in log batch size (flat past the largest).
/// `None` with no other point below it.
fn stray(point: &Measured, sizes: &[u64], level: &[f64]) -> Option<f64> {
    let level = log_interpolate(sizes, level, point.batch_size as f64)?;
    (level > 0.0 && point.samples_per_second > 0.0)
        .then(|| (point.samples_per_second / level).ln().abs())
}

/// Where one more probe would sharpen the knee, if anywhere: below the knee when nothing smaller
/// was measured (a search that started near the maximum), else between the knee and the largest
/// size below it while they are more than `1.5x` apart. Sizes stay multiples of `multiple_of`
/// where one lies there, and are never one already measured.
pub fn next_between(points: &[Measured], knee: u64, multiple_of: u64) -> Option<u64> {
    let below = points
        .iter()
        .map(|p| p.batch_size)
        .filter(|&b| b < knee)
        .max();
    let candidate = match below {
        None if knee > 1 => knee / 2,
        None => return None,
        Some(below) if knee as f64 > 1.5 * below as f64 => {
            ((below as f64 * knee as f64).sqrt()) as u64
        }
        Some(_) => return None,
    };
    let aligned = if candidate >= multiple_of {
        candidate / multiple_of * multiple_of
    } else {
        candidate
    }
    .max(1);
    let measured = points.iter().any(|p| p.batch_size == aligned);
    (!measured && aligned < knee).then_some(aligned)
}

/// The next point to probe again, until [`KNEE_PROBES`] probes are pooled there, because the
/// knee depends on it: the knee, its smaller neighbour, then the fastest point.
pub fn next_to_time(points: &[Measured], knee: &Knee) -> Option<u64> {
    let at = points
        .iter()
        .position(|p| p.batch_size == knee.batch_size)?;
    let fastest = points
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.samples_per_second.total_cmp(&b.1.samples_per_second))
        .map(|(i, _)| i);
    [Some(at), at.checked_sub(1), fastest]
        .into_iter()
        .flatten()
        .map(|i| points[i])
        .find(|p| p.probes < KNEE_PROBES)
        .map(|p| p.batch_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(batch_size: u64, samples_per_second: f64, spread: f64, timed_steps: u32) -> Measured {
        Measured {
            batch_size,
            samples_per_second,
            spread,
            timed_steps,
            probes: 1,
        }
    }

    #[test]
    fn isotonic_pools_what_falls() {
        assert_eq!(
            isotonic(&[1.0, 3.0, 2.0, 4.0], &[1.0; 4]),
            [1.0, 2.5, 2.5, 4.0]
        );
        assert_eq!(isotonic(&[3.0, 1.0], &[3.0, 1.0]), [2.5, 2.5]);
        assert_eq!(isotonic(&[], &[]), Vec::<f64>::new());
    }

    #[test]
    fn a_zigzag_curve_has_the_knee_of_its_trend() {
        // Measured speeds that zig-zag by 2x around a curve flat from 1024 on.
        let noisy = [
            point(256, 40.0, 0.05, 8),
            point(512, 70.0, 0.05, 8),
            point(1024, 100.0, 0.05, 8),
            point(2048, 60.0, 1.5, 1),
            point(4096, 101.0, 0.05, 8),
            point(8192, 99.0, 0.05, 8),
        ];
        let knee = knee(&noisy, 0.05).unwrap();
        assert_eq!(knee.batch_size, 1024);
        assert!(
            knee.low <= 1024 && knee.high >= 1024 && knee.decided(),
            "{knee:?}"
        );
    }

    #[test]
    fn a_larger_batch_that_steps_faster_is_set_aside() {
        // A plateau from 8192 on, and two confirming probes at the maximum on a machine that
        // had just gone quiet: 45% faster, 7% larger (the README's run of 2026-11-30).
        let mut points: Vec<Measured> = [2048u64, 4096, 8192, 16384, 32768, 57344]
            .iter()
            .zip([30e3, 48e3, 58e3, 61e3, 60e3, 59e3])
            .map(|(&b, s)| point(b, s, 0.1, 2))
            .collect();
        points.push(point(61440, 88e3, 0.05, 4));
        assert_eq!(
            set_aside(&points),
            [false, false, false, false, false, false, true]
        );
        let knee = knee(&points, 0.05).unwrap();
        assert_eq!(knee.batch_size, 8192, "{knee:?}");
        let drawn = curve(&points);
        assert!(drawn[6].set_aside && drawn[6].fitted_samples_per_second < 62e3);
        // Without the quiet spell the same points keep every measurement.
        points[6].samples_per_second = 60e3;
        assert!(set_aside(&points).iter().all(|&aside| !aside));
    }

    #[test]
    fn a_slow_point_is_set_aside_rather_than_its_faster_neighbour() {
        let points: Vec<Measured> = [1024u64, 2048, 4096, 7680, 8192]
            .iter()
            .zip([50e3, 90e3, 100e3, 60e3, 101e3])
            .map(|(&b, s)| point(b, s, 0.05, 6))
            .collect();
        assert_eq!(set_aside(&points), [false, false, false, true, false]);
    }

    #[test]
    fn a_curve_still_rising_at_the_limit_keeps_every_point() {
        let rising: Vec<Measured> = (8..16)
            .map(|k| point(1 << k, f64::from(1u32 << k) * 0.9, 0.05, 6))
            .collect();
        assert!(set_aside(&rising).iter().all(|&aside| !aside));
        assert_eq!(knee(&rising, 0.05).unwrap().batch_size, 1 << 15);
    }

    #[test]
    fn a_curve_that_keeps_creeping_up_has_its_knee_where_doubling_stops_paying() {
        // Steep to 512, then 3% a doubling, with the fastest point 12% high: the knee stays at
        // 512 whichever point the noise makes fastest.
        let mut points: Vec<Measured> = (4..15)
            .map(|k| {
                let speed = if k <= 9 {
                    100.0 * f64::from(1u32 << k) / 512.0
                } else {
                    100.0 * 1.03f64.powi(k - 9)
                };
                point(1 << k, speed, 0.02, 6)
            })
            .collect();
        assert_eq!(knee(&points, 0.05).unwrap().batch_size, 512);
        let last = points.len() - 1;
        points[last].samples_per_second *= 1.12;
        let knee = knee(&points, 0.05).unwrap();
        assert_eq!(knee.batch_size, 512, "{knee:?}");
        assert!(knee.decided(), "{knee:?}");
    }

    #[test]
    fn measurements_that_cannot_decide_say_so() {
        let flat_and_noisy: Vec<Measured> = (4..14)
            .map(|k| point(1 << k, 100.0 + (k % 2) as f64, 0.8, 8))
            .collect();
        let knee = knee(&flat_and_noisy, 0.05).unwrap();
        assert!(!knee.decided(), "{knee:?}");
    }

    #[test]
    fn points_that_decide_the_knee_are_timed_first() {
        let pooled = |p: Measured| Measured {
            probes: KNEE_PROBES,
            ..p
        };
        let points = [
            point(512, 50.0, 0.0, 1),
            point(1024, 100.0, 0.0, 1),
            pooled(point(2048, 100.0, 0.0, 1)),
        ];
        let knee = knee(&points, 0.05).unwrap();
        assert_eq!(next_to_time(&points, &knee), Some(1024));
        let timed = [
            point(512, 50.0, 0.0, 1),
            pooled(point(1024, 100.0, 0.0, 1)),
            pooled(point(2048, 100.0, 0.0, 1)),
        ];
        assert_eq!(next_to_time(&timed, &knee), Some(512));
    }

    #[test]
    fn extra_probes_go_below_a_lone_knee_then_between_distant_points() {
        let at = |sizes: &[u64]| -> Vec<Measured> {
            sizes.iter().map(|&b| point(b, 1.0, 0.0, 8)).collect()
        };
        // Only probes near the maximum (a prediction-first search): look below.
        assert_eq!(next_between(&at(&[10_000, 10_080]), 10_000, 8), Some(5000));
        // Doubling left the knee twice its neighbour: look between them, on a multiple of 8.
        assert_eq!(next_between(&at(&[512, 1024, 2048]), 1024, 8), Some(720));
        // Close neighbours: the knee is sharp enough.
        assert_eq!(next_between(&at(&[720, 1024, 2048]), 1024, 8), None);
        assert_eq!(next_between(&at(&[1]), 1, 8), None);
    }

    proptest! {
        #[test]
        fn the_fit_never_falls_and_keeps_the_weighted_mean(
            values in prop::collection::vec(0.0f64..1e6, 1..40),
        ) {
            let weights: Vec<f64> = (0..values.len()).map(|i| 1.0 + (i % 3) as f64).collect();
            let fit = isotonic(&values, &weights);
            prop_assert!(fit.windows(2).all(|w| w[0] <= w[1] * (1.0 + 1e-12)));
            let mean = |v: &[f64]| v.iter().zip(&weights).map(|(x, w)| x * w).sum::<f64>();
            prop_assert!((mean(&fit) - mean(&values)).abs() <= 1e-6 * mean(&values).max(1.0));
        }

        #[test]
        fn the_knee_lies_in_its_interval(
            speeds in prop::collection::vec((1.0f64..1e5, 0.0f64..2.0, 1u32..10), 1..20),
        ) {
            let points: Vec<Measured> = speeds
                .iter()
                .enumerate()
                .map(|(i, &(s, spread, steps))| point(16 << i, s, spread, steps))
                .collect();
            let knee = knee(&points, 0.05).unwrap();
            prop_assert!(knee.low <= knee.batch_size && knee.batch_size <= knee.high);
        }

        #[test]
        fn what_is_kept_never_steps_faster_at_a_larger_batch_beyond_its_uncertainty(
            speeds in prop::collection::vec((1.0f64..1e5, 0.0f64..0.5), 3..20),
        ) {
            let points: Vec<Measured> = speeds
                .iter()
                .enumerate()
                .map(|(i, &(s, spread))| point(64 + 16 * i as u64, s, spread, 4))
                .collect();
            let aside = set_aside(&points);
            let kept: Vec<&Measured> = points.iter().zip(&aside).filter(|(_, &a)| !a).map(|(p, _)| p).collect();
            prop_assert!(!kept.is_empty());
            let values: Vec<f64> = points.iter().map(|p| p.samples_per_second).collect();
            let scatter = scatter(&points, &isotonic(&values, &weights(&points)));
            // Every pair left breaking the rule has no kept point below it to judge by.
            for (i, w) in kept.windows(2).enumerate().skip(1) {
                let (a, b) = (w[0], w[1]);
                let margin = 1.0 + ALIGNMENT_SLACK + uncertainty(a, scatter) + uncertainty(b, scatter);
                let breaks = b.batch_size as f64 / b.samples_per_second * margin < a.batch_size as f64 / a.samples_per_second;
                prop_assert!(!breaks, "pair {} of {:?} (aside {:?})", i, kept, aside);
            }
        }
    }
}
