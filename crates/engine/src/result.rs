//! The answer of a search: the JSON the CLI prints, and the core of the service's answer (which
//! adds where and when it was measured).

use serde::{Deserialize, Serialize};

use crate::advice::Accumulation;
use crate::device::DeviceInfo;
use crate::knee::{Knee, Measured, StepTime, ThroughputPoint};
use crate::plan::{Framework, MemoryBreakdown, Precision};

/// The outcome of a finished search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneResult {
    /// The largest batch size that ran.
    pub max_batch_size: u64,
    /// The batch size to use: `headroom x max_batch_size`, rounded down to `multiple_of`.
    pub recommended_batch_size: u64,
    /// Tokens in the recommended batch, when a sample is a sequence of token ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_tokens: Option<u64>,
    /// The share of the largest batch the recommendation uses.
    pub headroom: f64,
    /// How the probed steps stored and computed (`32-true` for results from before precisions).
    #[serde(default)]
    pub precision: Precision,
    /// Set when this precision holds fewer samples than `32-true` would, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision_note: Option<String>,
    /// Whose training step the probes ran and the prediction describes (`headroom` for results
    /// from before the PyTorch profile).
    #[serde(default = "Framework::before_profiles")]
    pub framework: Framework,
    /// The GPUs FSDP shards the model over, when it does: the batch and memory are one GPU's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_world_size: Option<u64>,
    /// Whether FSDP's blocks let their gathered parameters go after their forward (`false`:
    /// kept to their backward), when FSDP shards the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_reshard_after_forward: Option<bool>,
    /// The throughput knee: the smallest batch from which doubling the batch gains less than
    /// `search.knee_tolerance` in fitted samples/s. A larger batch trains little faster.
    pub throughput_batch_size: u64,
    /// The range the knee could lie in: the knees of every curve that fits the measurements
    /// within three standard errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_knee: Option<Knee>,
    /// Said when the measurements do not place the knee within a factor of four.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_note: Option<String>,
    /// Samples/s of every batch size that fitted, by batch size, with the fitted curve.
    pub throughput: Vec<ThroughputPoint>,
    /// The step time fitted to the measurements, the curve the knee is read from (absent with
    /// fewer than two sizes measured, and in results from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_fit: Option<StepTime>,
    /// How to reach the job's `target_batch_size` with gradient accumulation, when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accumulation: Option<Accumulation>,
    /// What stopped the search from going higher.
    pub limited_by: LimitedBy,
    /// The memory model's largest batch for the device's free memory at the start.
    pub predicted_max_batch_size: u64,
    /// The device probed.
    pub device: DeviceInfo,
    /// The modelled memory at the recommended batch size.
    pub memory: MemoryBreakdown,
    /// Every probe, in the order it ran.
    pub probes: Vec<Probe>,
    /// Wall time of the whole search, seconds.
    pub elapsed_seconds: f64,
}

/// Why the batch size stopped growing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitedBy {
    /// The device ran out of memory above `max_batch_size`.
    Memory,
    /// The job's `dataset_size` capped the batch.
    DatasetSize,
    /// The job's `search.max` capped the batch.
    Max,
}

impl std::fmt::Display for LimitedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitedBy::Memory => "memory",
            LimitedBy::DatasetSize => "dataset_size",
            LimitedBy::Max => "max",
        })
    }
}

/// One probe of the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Batch size probed.
    pub batch_size: u64,
    /// What happened.
    pub outcome: Outcome,
    /// Median seconds per training step, the warm-up step left out (0 unless it fitted).
    pub step_seconds: f64,
    /// How much the timed steps disagreed: their interquartile range relative to the median (0
    /// for one step, or unless it fitted).
    #[serde(default)]
    pub step_seconds_spread: f64,
    /// Steps timed (0 unless it fitted).
    #[serde(default)]
    pub timed_steps: u32,
    /// `batch_size / step_seconds` (0 unless it fitted).
    pub samples_per_second: f64,
    /// Device bytes the probe held (0 unless it fitted).
    pub device_bytes: u64,
}

/// The outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step ran.
    Fit,
    /// An allocation ran out of memory.
    Oom,
    /// A device fault; the search stopped.
    Error,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Fit => "fit",
            Outcome::Oom => "oom",
            Outcome::Error => "error",
        })
    }
}

/// The points of every probe that fitted, one per batch size, sorted by batch size. Repeated
/// probes of a size are pooled: their medians averaged by steps timed, the widest spread kept.
pub fn measured(probes: &[Probe]) -> Vec<Measured> {
    let mut points: Vec<Measured> = Vec::new();
    for probe in probes.iter().filter(|p| p.outcome == Outcome::Fit) {
        let steps = probe.timed_steps.max(1);
        match points.iter_mut().find(|p| p.batch_size == probe.batch_size) {
            Some(kept) => {
                let total = kept.timed_steps + steps;
                kept.samples_per_second = (kept.samples_per_second * f64::from(kept.timed_steps)
                    + probe.samples_per_second * f64::from(steps))
                    / f64::from(total);
                kept.spread = kept.spread.max(probe.step_seconds_spread);
                kept.timed_steps = total;
                kept.probes += 1;
            }
            None => points.push(Measured {
                batch_size: probe.batch_size,
                samples_per_second: probe.samples_per_second,
                spread: probe.step_seconds_spread,
                timed_steps: steps,
                probes: 1,
            }),
        }
    }
    points.sort_by_key(|p| p.batch_size);
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_probes_are_pooled_and_the_curve_is_sorted() {
        let probe = |batch_size, samples_per_second, timed_steps| Probe {
            batch_size,
            outcome: Outcome::Fit,
            step_seconds: 1.0,
            step_seconds_spread: 0.0,
            timed_steps,
            samples_per_second,
            device_bytes: 1,
        };
        let points = measured(&[probe(64, 1.0, 3), probe(16, 3.0, 1), probe(64, 2.0, 1)]);
        let kept: Vec<(u64, f64, u32)> = points
            .iter()
            .map(|p| (p.batch_size, p.samples_per_second, p.timed_steps))
            .collect();
        assert_eq!(kept, [(16, 3.0, 1), (64, 1.25, 4)]);
        // A larger batch measured slower: the fitted curve, which cannot fall, runs flat.
        let drawn = crate::knee::read(&points).curve();
        let (small, large) = (
            drawn[0].fitted_samples_per_second,
            drawn[1].fitted_samples_per_second,
        );
        assert!(large >= small && large / small < 1.02, "{drawn:?}");
    }

    /// A result stored before jobs named a framework was measured with headroom's own step, and
    /// reads back saying so.
    #[test]
    fn a_result_from_before_the_profiles_describes_headroom_s_step() {
        let host = TuneResult {
            max_batch_size: 64,
            recommended_batch_size: 48,
            recommended_tokens: None,
            headroom: 0.8,
            precision: Precision::F32True,
            precision_note: None,
            framework: Framework::Pytorch,
            fsdp_world_size: None,
            fsdp_reshard_after_forward: None,
            throughput_batch_size: 64,
            throughput_knee: None,
            throughput_fit: None,
            throughput_note: None,
            throughput: vec![],
            accumulation: None,
            limited_by: LimitedBy::Memory,
            predicted_max_batch_size: 65,
            device: DeviceInfo {
                kind: crate::device::DeviceKind::Host,
                index: 0,
                name: "host".into(),
                uuid: None,
                total_bytes: 1 << 20,
                free_bytes: 1 << 20,
            },
            memory: MemoryBreakdown::default(),
            probes: vec![],
            elapsed_seconds: 0.5,
        };
        let mut stored = serde_json::to_value(&host).unwrap();
        stored.as_object_mut().unwrap().remove("framework");
        let read: TuneResult = serde_json::from_value(stored).unwrap();
        assert_eq!(read.framework, Framework::Headroom);
        let current: TuneResult =
            serde_json::from_value(serde_json::to_value(&host).unwrap()).unwrap();
        assert_eq!(current, host);
    }
}
