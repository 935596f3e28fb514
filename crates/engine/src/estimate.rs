//! The memory model's answer for an amount of free memory: the largest and the recommended
//! batch, no device touched.

use serde::Serialize;

use crate::advice::recommended_batch_size;
use crate::frontier::{frontier, sequence_jobs, SequencePoint};
use crate::job::Job;
use crate::plan::{Allocator, DoesNotFit, Framework, MemoryBreakdown, Precision};
use crate::result::LimitedBy;

/// The memory model's answer for a device with `memory_bytes` free: no probe runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// Free bytes assumed.
    pub memory_bytes: u64,
    /// How the step stores and computes.
    pub precision: Precision,
    /// Set when this precision holds fewer samples than `32-true` would, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision_note: Option<String>,
    /// Whose training step the prediction describes.
    pub framework: Framework,
    /// The GPUs FSDP shards the model over, when it does: the batch and memory are one GPU's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fsdp_world_size: Option<u64>,
    /// Whether FSDP's blocks let their gathered parameters go after their forward (`false`:
    /// kept to their backward), when FSDP shards the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsdp_reshard_after_forward: Option<bool>,
    /// Learnt parameters, frozen ones included (`sum(p.numel() for p in model.parameters())`).
    pub parameter_count: u64,
    /// Those of them it trains (not frozen).
    pub trainable_parameter_count: u64,
    /// Bytes independent of the batch size, at the instant of the step that peaks at the
    /// predicted batch.
    pub fixed_bytes: u64,
    /// Bytes each sample adds, at that instant.
    pub bytes_per_sample: u64,
    /// Largest batch the model predicts fits, capped by `search.max` and `dataset_size`.
    pub predicted_max_batch_size: u64,
    /// What bounds it: the memory, or the cap that did.
    pub limited_by: LimitedBy,
    /// The headroom rule applied to the prediction.
    pub recommended_batch_size: u64,
    /// Tokens in the recommended batch, when a sample is a sequence of token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommended_tokens: Option<u64>,
    /// Breakdown at the recommended batch size.
    pub memory: MemoryBreakdown,
    /// Over token ids: the largest batch at each sequence length the model could train at
    /// ([`crate::frontier`]), shortest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sequence_lengths: Vec<SequencePoint>,
}

/// The memory model's largest and recommended batch of `job` for `memory_bytes` free on a
/// device that rounds like `allocator`, capped as the search would be.
pub fn estimate(
    job: &Job,
    memory_bytes: u64,
    allocator: Allocator,
) -> Result<Estimate, DoesNotFit> {
    let plan = job.plan();
    let cap = job.batch_cap();
    let fits = plan.predict_max_batch(memory_bytes, allocator);
    let predicted = fits.min(cap);
    if predicted == 0 {
        return Err(plan.does_not_fit(memory_bytes));
    }
    let limited_by = if fits <= cap {
        LimitedBy::Memory
    } else {
        job.cap_reason()
    };
    let recommended = recommended_batch_size(predicted, job.headroom, job.search.multiple_of);
    let line = plan.peak_line(predicted);
    Ok(Estimate {
        memory_bytes,
        precision: plan.precision,
        precision_note: plan.precision_note(memory_bytes, allocator),
        framework: plan.framework,
        fsdp_world_size: plan.sharding.map(|s| s.world),
        fsdp_reshard_after_forward: plan.sharding.map(|s| s.reshard_after_forward),
        parameter_count: plan.parameter_count(),
        trainable_parameter_count: plan.trainable_parameter_count(),
        fixed_bytes: line.fixed_bytes,
        bytes_per_sample: line.bytes_per_sample,
        predicted_max_batch_size: predicted,
        limited_by,
        recommended_batch_size: recommended,
        recommended_tokens: plan.tokens_in(recommended),
        memory: plan.memory(recommended).unwrap_or_default(),
        sequence_lengths: frontier(&sequence_jobs(job), memory_bytes, allocator),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testing::mlp;

    #[test]
    fn an_estimate_caps_rounds_and_says_what_does_not_fit() {
        // PyTorch's step peaks in backward, at the relu's gradient: per sample the f32 input
        // (3136 bytes), its label and per-sample loss (8), and three widths of 128 in f32 (the
        // input gradient from above, the saved relu output, the relu's gradient): 4680 bytes.
        // Fixed: the parameters (101,770 f32), the top layer's gradients (1290 f32), the loss.
        let job = mlp(&[1, 28, 28], &[128], 10, "sgd", "");
        let e = estimate(&job, 141_000_000_000, Allocator::Exact).unwrap();
        assert_eq!(
            (e.fixed_bytes, e.bytes_per_sample),
            (407_080 + 5_160 + 4, 4680)
        );
        assert_eq!(
            e.predicted_max_batch_size,
            (141_000_000_000 - 412_244) / 4680
        );
        assert_eq!(e.limited_by, LimitedBy::Memory);
        assert_eq!(e.memory.peak_at, Some(crate::plan::Moment::Backward));
        // headroom's own step holds every buffer at once: 5312 bytes a sample (the input, its
        // label and loss; the product and relu of width 128 and their gradients; the logits,
        // the log-probabilities and the logits' gradient), and the gradients of every parameter.
        let job = mlp(
            &[1, 28, 28],
            &[128],
            10,
            "sgd",
            r#", "framework": "headroom""#,
        );
        let e = estimate(&job, 141_000_000_000, Allocator::Exact).unwrap();
        assert_eq!(
            e.predicted_max_batch_size,
            (141_000_000_000 - (2 * 407_080 + 4)) / 5312
        );
        assert_eq!(e.predicted_max_batch_size, 26_543_521);
        assert_eq!(e.recommended_batch_size, 21_234_816);
        let err = estimate(&job, 1000, Allocator::Exact).unwrap_err();
        assert_eq!(err.free_bytes, 1000);
        assert_eq!(err.fixed_bytes, 2 * 101_770 * 4 + 4);
    }

    #[test]
    fn over_tokens_the_answer_at_the_job_s_length_is_the_estimate_s() {
        let job = Job::from_json(
            r#"{"model": {"tokens": {"sequence_length": 300, "vocab_size": 100},
                "num_classes": 100, "layers": [{"embedding": {"embedding_dim": 16}},
                {"positional_embedding": {"max_positions": 1024}},
                {"self_attention": {"num_heads": 2, "causal": true}},
                {"linear": {"out_features": 100}}]}, "optimizer": {"name": "adamw"}}"#,
        )
        .unwrap();
        let e = estimate(&job, 1 << 30, Allocator::Exact).unwrap();
        let lengths: Vec<u64> = e
            .sequence_lengths
            .iter()
            .map(|p| p.sequence_length)
            .collect();
        assert_eq!(lengths, [128, 256, 300, 512, 1024]);
        let own = &e.sequence_lengths[2];
        assert_eq!(own.predicted_max_batch_size, e.predicted_max_batch_size);
        assert_eq!(own.recommended_batch_size, e.recommended_batch_size);
        assert_eq!(Some(own.recommended_tokens), e.recommended_tokens);
        let values = mlp(&[1, 28, 28], &[128], 10, "sgd", "");
        let e = estimate(&values, 1 << 30, Allocator::Exact).unwrap();
        assert!(e.sequence_lengths.is_empty());
    }

    #[test]
    fn a_cap_is_named_as_the_search_names_it() {
        let capped = |extra: &str| {
            let job = mlp(&[1, 28, 28], &[128], 10, "sgd", extra);
            let e = estimate(&job, 1 << 30, Allocator::Exact).unwrap();
            (
                e.predicted_max_batch_size,
                e.recommended_batch_size,
                e.limited_by,
            )
        };
        assert_eq!(
            capped(r#", "search": {"max": 100}"#),
            (100, 80, LimitedBy::Max)
        );
        assert_eq!(
            capped(r#", "dataset_size": 100"#),
            (100, 80, LimitedBy::DatasetSize)
        );
        assert_eq!(
            capped(r#", "dataset_size": 100, "search": {"max": 50}"#),
            (50, 40, LimitedBy::Max)
        );
    }
}
