//! The sequence-length frontier of a model over token ids: for each sequence length it could be
//! trained at, the largest batch of sequences that fits and the tokens in it. A transformer's
//! activations grow with the batch and the length both, so the question "what batch fits?" is
//! asked per length; the answer at the job's own length is the one a tune gives.

use serde::Serialize;

use crate::advice::recommended_batch_size;
use crate::job::{Job, TokensSpec};
use crate::modules::LayerSpec;
use crate::plan::Allocator;

/// The shortest length of the frontier's powers of two.
pub const SHORTEST: u64 = 128;

/// One sequence length's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequencePoint {
    /// Tokens a sequence.
    pub sequence_length: u64,
    /// The largest batch of sequences the model predicts fits (0: not one), capped as the
    /// search would be.
    pub predicted_max_batch_size: u64,
    /// Tokens in that batch.
    pub tokens: u64,
    /// The headroom rule applied to it.
    pub recommended_batch_size: u64,
    /// Tokens in the recommended batch.
    pub recommended_tokens: u64,
}

/// The job at each length of its frontier: the powers of two from [`SHORTEST`] to the longest
/// sequence the model places (its positional table's rows; the job's own length when it has
/// none), and the job's own length. Empty for a model over values.
pub fn sequence_jobs(job: &Job) -> Vec<Job> {
    let Some(tokens) = job.model.tokens else {
        return Vec::new();
    };
    let longest = longest_sequence(job, tokens);
    let mut lengths: Vec<u64> = std::iter::successors(Some(SHORTEST), |n| n.checked_mul(2))
        .take_while(|&n| n <= longest)
        .chain([tokens.sequence_length])
        .collect();
    lengths.sort_unstable();
    lengths.dedup();
    lengths
        .into_iter()
        .filter_map(|sequence_length| {
            let mut spec = job.spec().clone();
            spec.model.tokens = Some(TokensSpec {
                sequence_length,
                ..tokens
            });
            Job::new(spec).ok()
        })
        .collect()
}

/// The rows of the model's first positional embedding, or the job's length without one.
fn longest_sequence(job: &Job, tokens: TokensSpec) -> u64 {
    job.model
        .layers
        .iter()
        .flatten()
        .flat_map(LayerSpec::nested)
        .find_map(|layer| match layer {
            LayerSpec::PositionalEmbedding(spec) => Some(spec.max_positions),
            _ => None,
        })
        .flatten()
        .unwrap_or(tokens.sequence_length)
}

/// The frontier of `jobs` (from [`sequence_jobs`]) for `memory_bytes` free on a device that
/// rounds like `allocator`.
pub fn frontier(jobs: &[Job], memory_bytes: u64, allocator: Allocator) -> Vec<SequencePoint> {
    jobs.iter()
        .map(|job| {
            let plan = job.plan();
            let max = plan
                .predict_max_batch(memory_bytes, allocator)
                .min(job.batch_cap());
            let recommended = match max {
                0 => 0,
                _ => recommended_batch_size(max, job.headroom, job.search.multiple_of),
            };
            SequencePoint {
                sequence_length: job.model.tokens.map_or(0, |t| t.sequence_length),
                predicted_max_batch_size: max,
                tokens: plan.tokens_in(max).unwrap_or(0),
                recommended_batch_size: recommended,
                recommended_tokens: plan.tokens_in(recommended).unwrap_or(0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lm(sequence_length: u64, positions: Option<u64>) -> Job {
        let positional = positions.map_or(String::new(), |n| {
            format!(r#"{{"positional_embedding": {{"max_positions": {n}}}}},"#)
        });
        Job::from_json(&format!(
            r#"{{"model": {{"tokens": {{"sequence_length": {sequence_length}, "vocab_size": 100}},
                "num_classes": 100, "layers": [{{"embedding": {{"embedding_dim": 16}}}}, {positional}
                {{"self_attention": {{"num_heads": 2, "causal": true}}}},
                {{"linear": {{"out_features": 100}}}}]}},
                "optimizer": {{"name": "adamw"}}}}"#
        ))
        .unwrap()
    }

    fn lengths(job: &Job) -> Vec<u64> {
        sequence_jobs(job)
            .iter()
            .map(|j| j.model.tokens.unwrap().sequence_length)
            .collect()
    }

    #[test]
    fn lengths_are_powers_of_two_to_the_positional_table_and_the_job_s_own() {
        assert_eq!(lengths(&lm(300, Some(1024))), [128, 256, 300, 512, 1024]);
        assert_eq!(lengths(&lm(1000, Some(1000))), [128, 256, 512, 1000]);
        assert_eq!(lengths(&lm(64, None)), [64]);
        assert_eq!(lengths(&lm(600, None)), [128, 256, 512, 600]);
        let values = Job::from_json(
            r#"{"model": {"input_shape": [4], "num_classes": 2}, "optimizer": {"name": "sgd"}}"#,
        )
        .unwrap();
        assert!(sequence_jobs(&values).is_empty());
    }

    #[test]
    fn longer_sequences_fit_fewer_of_them_each_as_its_own_plan_predicts() {
        let job = lm(256, Some(2048));
        let memory = 1 << 30;
        let jobs = sequence_jobs(&job);
        let points = frontier(&jobs, memory, Allocator::Exact);
        for pair in points.windows(2) {
            assert!(pair[1].predicted_max_batch_size < pair[0].predicted_max_batch_size);
            assert!(pair[1].predicted_max_batch_size > 0, "{pair:?}");
        }
        for (point, job) in points.iter().zip(&jobs) {
            let max = job.plan().predict_max_batch(memory, Allocator::Exact);
            assert_eq!(point.predicted_max_batch_size, max);
            assert_eq!(point.tokens, point.sequence_length * max);
            assert_eq!(
                point.recommended_tokens,
                point.sequence_length * point.recommended_batch_size
            );
        }
        // A length at which not one sequence fits says 0.
        let tiny = frontier(&jobs, 1 << 20, Allocator::Exact);
        assert_eq!(tiny.last().unwrap().predicted_max_batch_size, 0);
    }
}
