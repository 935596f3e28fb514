//! Advice drawn from a search's measurements, as pure functions: the headroom rule and
//! gradient-accumulation advice for a target global batch ([`crate::knee`] reads the throughput
//! knee).

use serde::{Deserialize, Serialize};

/// The 80% rule: `floor(headroom x max)`, rounded down to `multiple_of` when that leaves at least
/// `multiple_of`, and never below 1.
pub fn recommended_batch_size(max_batch_size: u64, headroom: f64, multiple_of: u64) -> u64 {
    let scaled = (max_batch_size as f64 * headroom).floor() as u64;
    let rounded = if scaled >= multiple_of {
        scaled / multiple_of * multiple_of
    } else {
        scaled
    };
    rounded.clamp(1, max_batch_size.max(1))
}

/// How to reach a target global batch with gradient accumulation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accumulation {
    /// Batch size of one forward/backward pass on one GPU.
    pub micro_batch_size: u64,
    /// Micro batches accumulated before each optimizer step.
    pub steps: u64,
    /// Data-parallel GPUs.
    pub world_size: u64,
    /// `micro_batch_size x steps x world_size`: the global batch each optimizer step sees.
    pub global_batch_size: u64,
    /// The global batch the recipe asked for.
    pub target_batch_size: u64,
    /// Whether the global batch equals the target.
    pub exact: bool,
    /// Why it is not exact, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The micro batch (at most `recommended`, a multiple of `multiple_of` unless `recommended` is
/// smaller than that) and accumulation steps whose global batch `micro x steps x world_size`
/// equals `target` if any micro batch allows it, with the largest such micro batch (the fewest
/// steps); otherwise the smallest global batch above the target.
pub fn accumulation(
    target: u64,
    world_size: u64,
    recommended: u64,
    multiple_of: u64,
) -> Accumulation {
    let step = if recommended >= multiple_of {
        multiple_of
    } else {
        1
    };
    let largest = (recommended / step * step).max(1);
    let plan = |micro: u64, steps: u64, note: Option<String>| {
        let global = micro * steps * world_size;
        Accumulation {
            micro_batch_size: micro,
            steps,
            world_size,
            global_batch_size: global,
            target_batch_size: target,
            exact: global == target,
            note,
        }
    };
    // Every rank trains at least one micro batch of at least `step` samples.
    if target <= world_size * step {
        let micro = (target / world_size).max(1);
        if micro.is_multiple_of(step) && micro * world_size == target {
            return plan(micro, 1, None);
        }
        return plan(
            step,
            1,
            Some(format!(
                "{world_size} GPU(s) with micro batches of at least {step} already make {}, more than {target}",
                step * world_size
            )),
        );
    }
    if target.is_multiple_of(world_size) {
        let per_rank = target / world_size;
        if let Some(micro) = largest_divisor(per_rank, largest, step) {
            return plan(micro, per_rank / micro, None);
        }
    }
    let (micro, steps) = nearest_above(target, world_size, largest, step);
    let reason = if !target.is_multiple_of(world_size) {
        format!("{target} is not divisible by world_size {world_size}")
    } else {
        format!(
            "no multiple of {step} up to {largest} divides the {} samples each GPU takes",
            target / world_size
        )
    };
    let global = micro * steps * world_size;
    plan(
        micro,
        steps,
        Some(format!(
            "{reason}; the nearest global batch above is {global}"
        )),
    )
}

/// The largest multiple of `step`, at most `limit`, that divides `n`. Trial division up to
/// `sqrt(n)`, which the job's validation bounds.
fn largest_divisor(n: u64, limit: u64, step: u64) -> Option<u64> {
    let mut best = None;
    let mut d = 1u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            for candidate in [d, n / d] {
                if candidate <= limit && candidate % step == 0 && Some(candidate) > best {
                    best = Some(candidate);
                }
            }
        }
        d += 1;
    }
    best
}

/// The micro batch and steps of the smallest global batch at or above `target`, preferring the
/// larger micro batch on ties.
fn nearest_above(target: u64, world_size: u64, largest: u64, step: u64) -> (u64, u64) {
    let per_rank = target.div_ceil(world_size);
    let fewest = per_rank.div_ceil(largest).max(1);
    let mut best = (largest, fewest, u64::MAX);
    // Past this many steps every micro batch is the smallest, and the global batch only grows.
    let most = per_rank.div_ceil(step).max(fewest);
    for steps in fewest..=most.min(fewest + 1_000_000) {
        let micro = per_rank.div_ceil(steps).div_ceil(step) * step;
        let global = micro * steps * world_size;
        if global < best.2 || (global == best.2 && micro > best.0) {
            best = (micro, steps, global);
        }
        if micro == step {
            break;
        }
    }
    (best.0, best.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn recommendation_rounding_rules() {
        assert_eq!(recommended_batch_size(20480, 0.8, 8), 16384);
        assert_eq!(recommended_batch_size(1000, 0.8, 64), 768);
        assert_eq!(recommended_batch_size(9, 0.8, 8), 7);
        assert_eq!(recommended_batch_size(1, 0.5, 8), 1);
        assert_eq!(recommended_batch_size(100, 1.0, 1), 100);
    }

    #[test]
    fn accumulation_reaches_the_target_exactly_when_it_can() {
        let a = accumulation(4096, 1, 15048, 8);
        assert_eq!(
            (a.micro_batch_size, a.steps, a.global_batch_size),
            (4096, 1, 4096)
        );
        assert!(a.exact && a.note.is_none());
        let a = accumulation(4096, 2, 1000, 8);
        assert_eq!(
            (a.micro_batch_size, a.steps, a.global_batch_size),
            (512, 4, 4096)
        );
        let a = accumulation(65_536, 4, 3000, 8);
        assert_eq!((a.micro_batch_size, a.steps), (2048, 8));
        assert!(a.exact);
    }

    #[test]
    fn accumulation_edge_cases() {
        // A target below the micro batch: one step of the target itself.
        let a = accumulation(64, 1, 15048, 8);
        assert_eq!(
            (a.micro_batch_size, a.steps, a.global_batch_size),
            (64, 1, 64)
        );
        // A prime target: no multiple of 8 divides it; the nearest global batch above.
        let a = accumulation(4099, 1, 1000, 8);
        assert!(!a.exact && a.global_batch_size >= 4099, "{a:?}");
        assert!(a.global_batch_size <= 4099 + 8 * a.steps, "{a:?}");
        assert!(a
            .note
            .as_deref()
            .unwrap()
            .contains("nearest global batch above"));
        // More GPUs than samples in the target: each still trains a micro batch.
        let a = accumulation(4, 8, 1000, 8);
        assert_eq!((a.micro_batch_size, a.global_batch_size), (8, 64));
        assert!(!a.exact && a.note.is_some());
        // A target the world size does not divide.
        let a = accumulation(1001, 2, 1000, 1);
        assert!(!a.exact && a.global_batch_size >= 1001);
        assert!(a.note.as_deref().unwrap().contains("not divisible"));
        // A recommendation below multiple_of: micro batches of any size up to it.
        let a = accumulation(30, 1, 5, 8);
        assert_eq!(
            (a.micro_batch_size, a.steps, a.global_batch_size),
            (5, 6, 30)
        );
    }

    proptest! {
        #[test]
        fn accumulation_never_exceeds_the_recommendation_and_covers_the_target(
            target in 1u64..200_000,
            world_size in 1u64..64,
            recommended in 1u64..20_000,
            multiple_of in prop::sample::select(vec![1u64, 8, 32]),
        ) {
            let a = accumulation(target, world_size, recommended, multiple_of);
            let step = if recommended >= multiple_of { multiple_of } else { 1 };
            prop_assert!(a.micro_batch_size <= recommended.max(step));
            prop_assert_eq!(a.micro_batch_size % step, 0);
            prop_assert!(a.micro_batch_size >= 1 && a.steps >= 1);
            prop_assert_eq!(a.global_batch_size, a.micro_batch_size * a.steps * world_size);
            prop_assert!(a.global_batch_size >= target);
            prop_assert_eq!(a.exact, a.global_batch_size == target);
            // Exact whenever some allowed micro batch divides the target's share.
            let exact_possible = target % world_size == 0
                && (1..=recommended).any(|m| m % step == 0 && (target / world_size) % m == 0);
            prop_assert_eq!(a.exact, exact_possible);
        }
    }
}
