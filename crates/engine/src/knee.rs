//! The throughput knee read from noisy measurements. A step's time is fitted to every measured
//! point at once as a fixed cost and a cost per sample ([`step_time`]): samples/s against batch
//! size can then only rise and flatten, as physics says it must (more samples never take less
//! time). The knee is the smallest batch from which doubling the batch gains less than the
//! tolerance in fitted speed (diminishing returns: past it a larger batch buys almost nothing);
//! the knees of every curve the measurements cannot tell from the best give the range it could
//! lie in. When that range spans more than [`DECIDED_RATIO`], the measurements do not decide
//! the knee, and the answer says so. A point far from the curve the others draw (a machine that
//! got quieter or busier during its probe) is set aside: drawn, not fitted.
//!
//! Read from neighbouring points instead (an isotonic fit and the gain of each doubling), the
//! knee followed the machine's drift between probes: 4 to 9 of 10 runs of the host examples
//! within one doubling of their median; from the fitted curve, 8 to 10 of 10, and 10 of 10 in
//! 9 of 12 rounds (`cargo bench --bench knee`, README).

use serde::{Deserialize, Serialize};

pub mod step_time;

pub use step_time::StepTime;

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

/// The knee and the range it could lie in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knee {
    /// The smallest batch from which doubling gains less than the tolerance in fitted samples/s.
    pub batch_size: u64,
    /// The smallest knee of the curves that fit the measurements within three standard errors.
    pub low: u64,
    /// The largest.
    pub high: u64,
}

impl Knee {
    /// Whether the measurements place the knee within [`DECIDED_RATIO`].
    pub fn decided(&self) -> bool {
        self.high as f64 <= DECIDED_RATIO * self.low as f64
    }

    /// The knee on the job's grid of sizes: the nearest multiple of `multiple_of` (where the
    /// knee reaches one), its interval widened to multiples; none past `largest`, the largest
    /// batch that fits.
    pub fn aligned(self, multiple_of: u64, largest: u64) -> Knee {
        let m = multiple_of.max(1);
        let down = |b: u64| if b >= m { b / m * m } else { b };
        let nearest = |b: u64| if b >= m { (b + m / 2) / m * m } else { b };
        let up = |b: u64| {
            if b >= m {
                b.div_ceil(m).saturating_mul(m)
            } else {
                b
            }
        };
        Knee {
            batch_size: nearest(self.batch_size).min(largest),
            low: down(self.low).min(largest),
            high: up(self.high).min(largest),
        }
    }
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
    /// The fitted step time's speed at this size.
    #[serde(default)]
    pub fitted_samples_per_second: f64,
    /// Left out of the fit: further from the curve the other points draw than their scatter
    /// allows.
    #[serde(default)]
    pub set_aside: bool,
}

/// What the measurements say about speed: the fitted step time, if there are two sizes or more
/// to fit, and the knee it gives.
pub struct Reading {
    points: Vec<Measured>,
    fit: Option<step_time::Fit>,
}

/// Reads `points` (sorted by batch size): fits their step time once.
pub fn read(points: &[Measured]) -> Reading {
    Reading {
        points: points.to_vec(),
        fit: step_time::fit(points),
    }
}

impl Reading {
    /// The knee for `tolerance`: `None` without points, the point itself with one.
    pub fn knee(&self, tolerance: f64) -> Option<Knee> {
        match (&self.fit, self.points.as_slice()) {
            (Some(fit), _) => Some(fit.knee(tolerance)),
            (None, [only]) => Some(Knee {
                batch_size: only.batch_size,
                low: only.batch_size,
                high: only.batch_size,
            }),
            (None, _) => None,
        }
    }

    /// The fitted step time; `None` with fewer than two sizes.
    pub fn step_time(&self) -> Option<StepTime> {
        self.fit.as_ref().map(|fit| fit.step_time)
    }

    /// The curve: each point with the fitted speed there (its own speed when there is too
    /// little to fit) and whether it was set aside.
    pub fn curve(&self) -> Vec<ThroughputPoint> {
        let fit = self.fit.as_ref();
        self.points
            .iter()
            .enumerate()
            .map(|(i, p)| ThroughputPoint {
                batch_size: p.batch_size,
                samples_per_second: p.samples_per_second,
                spread: p.spread,
                fitted_samples_per_second: fit.map_or(p.samples_per_second, |f| {
                    f.step_time.samples_per_second(p.batch_size.max(1) as f64)
                }),
                set_aside: fit.is_some_and(|f| f.set_aside[i]),
            })
            .collect()
    }
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
/// knee depends on it: of the [`RETIMED`] measured sizes nearest the knee (by ratio), the
/// nearest still short of probes.
pub fn next_to_time(points: &[Measured], knee: &Knee) -> Option<u64> {
    let distance = |p: &Measured| {
        (p.batch_size.max(1) as f64 / knee.batch_size.max(1) as f64)
            .ln()
            .abs()
    };
    let mut nearest: Vec<&Measured> = points.iter().collect();
    nearest.sort_by(|a, b| distance(a).total_cmp(&distance(b)));
    nearest
        .into_iter()
        .take(RETIMED)
        .find(|p| p.probes < KNEE_PROBES)
        .map(|p| p.batch_size)
}

/// How many measured sizes around the knee are probed again.
const RETIMED: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn knee(points: &[Measured], tolerance: f64) -> Option<Knee> {
        read(points).knee(tolerance)
    }

    fn curve(points: &[Measured]) -> Vec<ThroughputPoint> {
        read(points).curve()
    }

    fn point(batch_size: u64, samples_per_second: f64) -> Measured {
        Measured {
            batch_size,
            samples_per_second,
            spread: 0.05,
            timed_steps: 6,
            probes: 1,
        }
    }

    fn curve_of(sizes: &[u64], speeds: &[f64]) -> Vec<Measured> {
        sizes
            .iter()
            .zip(speeds)
            .map(|(&b, &s)| point(b, s))
            .collect()
    }

    #[test]
    fn a_zigzag_curve_has_the_knee_of_its_trend() {
        // Measured speeds that zig-zag by 1.7x around a curve flat from about 1024 on.
        let noisy = curve_of(
            &[256, 512, 1024, 2048, 4096, 8192],
            &[40.0, 70.0, 100.0, 60.0, 101.0, 99.0],
        );
        let knee = knee(&noisy, 0.1).unwrap();
        assert!((512..=1536).contains(&knee.batch_size), "{knee:?}");
        assert!(knee.decided(), "{knee:?}");
    }

    #[test]
    fn a_point_far_from_the_others_curve_is_set_aside() {
        // A plateau from 8192 on, and two confirming probes at the maximum on a machine that
        // had just gone quiet: 45% faster, 7% larger (the README's run of 2026-11-30).
        let mut points = curve_of(
            &[2048, 4096, 8192, 16384, 32768, 57344, 61440],
            &[30e3, 48e3, 58e3, 61e3, 60e3, 59e3, 88e3],
        );
        points[6].probes = 2;
        let drawn = curve(&points);
        let aside: Vec<bool> = drawn.iter().map(|p| p.set_aside).collect();
        assert_eq!(aside, [false, false, false, false, false, false, true]);
        assert!(drawn[6].fitted_samples_per_second < 65e3, "{:?}", drawn[6]);
        let knee = knee(&points, 0.1).unwrap();
        assert!((4096..=8192).contains(&knee.batch_size), "{knee:?}");
        // Without the quiet spell the same points keep every measurement, and the knee.
        points[6].samples_per_second = 60e3;
        assert!(curve(&points).iter().all(|p| !p.set_aside));
        let calm = self::knee(&points, 0.1).unwrap();
        assert!((calm.batch_size as f64 / knee.batch_size as f64 - 1.0).abs() < 0.05);
    }

    #[test]
    fn a_slow_point_is_set_aside_rather_than_its_faster_neighbours() {
        let points = curve_of(
            &[256, 512, 1024, 2048, 4096, 7680, 8192],
            &[30e3, 50e3, 75e3, 90e3, 100e3, 60e3, 101e3],
        );
        let aside: Vec<bool> = curve(&points).iter().map(|p| p.set_aside).collect();
        assert_eq!(aside, [false, false, false, false, false, true, false]);
    }

    #[test]
    fn a_curve_still_rising_at_the_limit_has_its_knee_there() {
        let sizes: Vec<u64> = (8..16).map(|k| 1 << k).collect();
        let speeds: Vec<f64> = sizes.iter().map(|&b| b as f64 * 0.9).collect();
        let rising = curve_of(&sizes, &speeds);
        assert!(curve(&rising).iter().all(|p| !p.set_aside));
        assert_eq!(knee(&rising, 0.1).unwrap().batch_size, 1 << 15);
    }

    #[test]
    fn a_curve_that_keeps_creeping_up_has_its_knee_where_doubling_stops_paying() {
        // Steep to 512, then 3% a doubling, with the fastest point 12% high: the knee stays
        // near 512 whichever point the noise makes fastest.
        let sizes: Vec<u64> = (4..15).map(|k| 1 << k).collect();
        let mut speeds: Vec<f64> = (4..15)
            .map(|k| {
                if k <= 9 {
                    100.0 * f64::from(1u32 << k) / 512.0
                } else {
                    100.0 * 1.03f64.powi(k - 9)
                }
            })
            .collect();
        let steady = knee(&curve_of(&sizes, &speeds), 0.1).unwrap();
        assert!((384..=1024).contains(&steady.batch_size), "{steady:?}");
        *speeds.last_mut().unwrap() *= 1.12;
        let knee = knee(&curve_of(&sizes, &speeds), 0.1).unwrap();
        assert!(knee.decided(), "{knee:?}");
        let moved = knee.batch_size as f64 / steady.batch_size as f64;
        assert!((0.9..1.1).contains(&moved), "{knee:?} {steady:?}");
    }

    #[test]
    fn measurements_that_cannot_decide_say_so() {
        // Four sizes whose speeds zig-zag by 3x: rising and flat curves fit them alike.
        let wild = curve_of(&[16, 32, 64, 128], &[100.0, 40.0, 120.0, 60.0]);
        let knee = knee(&wild, 0.1).unwrap();
        assert!(!knee.decided(), "{knee:?}");
        // Two points say nothing about the scatter: the interval stays open.
        let two = curve_of(&[512, 1024], &[100.0, 105.0]);
        let knee = self::knee(&two, 0.1).unwrap();
        assert!(knee.low < knee.high, "{knee:?}");
    }

    #[test]
    fn the_sizes_nearest_the_knee_are_timed_again() {
        let pooled = |p: Measured| Measured {
            probes: KNEE_PROBES,
            ..p
        };
        let points = curve_of(&[256, 512, 1024, 2048, 4096], &[1.0; 5]);
        let knee = Knee {
            batch_size: 700,
            low: 500,
            high: 900,
        };
        assert_eq!(next_to_time(&points, &knee), Some(512));
        let mut timed = points.clone();
        timed[1] = pooled(timed[1]);
        assert_eq!(next_to_time(&timed, &knee), Some(1024));
        timed[2] = pooled(timed[2]);
        assert_eq!(next_to_time(&timed, &knee), Some(256));
        timed[0] = pooled(timed[0]);
        assert_eq!(next_to_time(&timed, &knee), None);
    }

    #[test]
    fn extra_probes_go_below_a_lone_knee_then_between_distant_points() {
        let at =
            |sizes: &[u64]| -> Vec<Measured> { sizes.iter().map(|&b| point(b, 1.0)).collect() };
        // Only probes near the maximum (a prediction-first search): look below.
        assert_eq!(next_between(&at(&[10_000, 10_080]), 10_000, 8), Some(5000));
        // Doubling left the knee twice its neighbour: look between them, on a multiple of 8.
        assert_eq!(next_between(&at(&[512, 1024, 2048]), 1024, 8), Some(720));
        // Close neighbours: the knee is sharp enough.
        assert_eq!(next_between(&at(&[720, 1024, 2048]), 1024, 8), None);
        assert_eq!(next_between(&at(&[1]), 1, 8), None);
    }

    #[test]
    fn a_knee_is_aligned_to_the_jobs_sizes_within_the_limit() {
        let knee = Knee {
            batch_size: 243,
            low: 150,
            high: 301,
        };
        assert_eq!(
            knee.aligned(8, 10_000),
            Knee {
                batch_size: 240,
                low: 144,
                high: 304
            }
        );
        assert_eq!(knee.aligned(8, 300).high, 300);
        let small = Knee {
            batch_size: 5,
            low: 3,
            high: 7,
        };
        assert_eq!(small.aligned(8, 1000), small);
    }

    proptest! {
        /// Whatever was measured, the knee is where doubling stops paying on the fitted curve:
        /// doubling from the batch below it gains at least the tolerance, from the batch above
        /// it at most (the knee is rounded to a whole batch), unless the measured range ends
        /// first, where the curve is already flat (the smallest size) or still climbing (the
        /// largest).
        #[test]
        fn the_knee_is_where_doubling_stops_paying_on_the_fitted_curve(
            speeds in prop::collection::vec((1.0f64..1e5, 1u32..4), 1..20),
        ) {
            let points: Vec<Measured> = speeds
                .iter()
                .enumerate()
                .map(|(i, &(s, probes))| Measured { probes, ..point(16 << i, s) })
                .collect();
            let reading = read(&points);
            let knee = reading.knee(0.1).unwrap();
            let (smallest, largest) = (16u64, 16u64 << (points.len() - 1));
            let Some(fit) = reading.step_time() else {
                prop_assert_eq!(knee.batch_size, smallest);
                return Ok(());
            };
            let gain = |b: u64| fit.samples_per_second(2.0 * b as f64) / fit.samples_per_second(b as f64);
            let slack = 1e-9;
            if knee.batch_size > smallest {
                prop_assert!(gain(knee.batch_size - 1) >= 1.1 - slack, "{:?} {:?}", knee, fit);
            }
            if knee.batch_size < largest {
                prop_assert!(gain(knee.batch_size + 1) <= 1.1 + slack, "{:?} {:?}", knee, fit);
            }
            let drawn = curve(&points);
            prop_assert!(drawn.iter().filter(|p| !p.set_aside).count() >= points.len().min(2));
        }
    }
}
