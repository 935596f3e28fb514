//! Deterministic synthetic data and parameter initialisation from a counter-based hash.
//!
//! The same integer arithmetic runs in `kernels/fill.cu`, so both devices generate bit-identical
//! inputs, labels and initial parameters from a seed, each where it is used.

/// Hash stream of the input batch.
pub const INPUT_STREAM: u64 = 0;

/// Hash stream of the labels when they are drawn, not computed from the inputs (a loss at
/// every position of a sequence).
pub const LABEL_STREAM: u64 = 1 << 62;

/// Hash stream of the model's `index`-th parameter (in the order the model declares its
/// parameters and buffers).
pub fn parameter_stream(index: usize) -> u64 {
    1 + index as u64
}

/// Hash stream of the masks of the model's `index`-th dropout layer; each step's mask is the
/// sub-stream [`stream_key`]`(key, step)` of its key.
pub fn dropout_stream(index: usize) -> u64 {
    1 << 63 | index as u64
}

/// Whether dropout of probability `p` keeps value `index` of the mask stream `key`: the stream's
/// uniform value `u` in `[-1, 1)` keeps it when `(u + 1) / 2 >= p`. Exact in f32, as in
/// `kernels/dropout.cu`.
pub fn keeps(key: u64, index: u64, p: f32) -> bool {
    uniform(key, index, 1.0) >= keep_threshold(p)
}

/// The stream value from which dropout of probability `p` keeps a value, `2p - 1` in f32.
pub fn keep_threshold(p: f32) -> f32 {
    2.0 * p - 1.0
}

/// What dropout of probability `p` multiplies the values it keeps by, `1 / (1 - p)` in f32.
pub fn dropout_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

/// The splitmix64 finaliser: a bijective mix of 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of one tensor's stream of values, passed to the fill kernels.
pub fn stream_key(seed: u64, stream: u64) -> u64 {
    mix64(seed.wrapping_add(stream.wrapping_mul(0xd1b5_4a32_d192_ed03)))
}

/// The `index`-th value of a stream, uniform in `[-1, 1)` with 24 bits, times `scale`.
///
/// Every step is exact in f32, so the CUDA kernel gives the same bits.
pub fn uniform(key: u64, index: u64, scale: f32) -> f32 {
    let bits = mix64(key.wrapping_add((index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))) >> 40;
    ((bits as f32) * (1.0 / 8_388_608.0) - 1.0) * scale
}

/// The `index`-th token of a stream, uniform in `[0, vocab)`: the stream's 64 bits modulo
/// `vocab`, as `kernels/fill.cu` draws it.
pub fn token(key: u64, index: u64, vocab: u64) -> u64 {
    mix64(key.wrapping_add((index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))) % vocab.max(1)
}

/// Fills `out` with the stream `key`, scaled.
pub fn fill_uniform(out: &mut [f32], key: u64, scale: f32) {
    for (i, v) in out.iter_mut().enumerate() {
        *v = uniform(key, i as u64, scale);
    }
}

/// The learnable task: a row's label is the index of its largest value among its first
/// `min(classes, features)` features (the lowest index on ties).
pub fn fill_labels(labels: &mut [u32], inputs: &[f32], features: usize, classes: usize) {
    let considered = classes.min(features);
    for (label, row) in labels.iter_mut().zip(inputs.chunks_exact(features)) {
        let mut best = 0;
        for c in 1..considered {
            if row[c] > row[best] {
                best = c;
            }
        }
        *label = best as u32;
    }
}

/// Initial scale of a layer's parameters: `1 / sqrt(fan_in)`, as PyTorch's `Linear` does.
pub fn init_scale(fan_in: u64) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_deterministic_and_in_range() {
        let key = stream_key(7, INPUT_STREAM);
        let values: Vec<f32> = (0..10_000).map(|i| uniform(key, i, 1.0)).collect();
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert_eq!(values[123], uniform(key, 123, 1.0));
        assert_ne!(uniform(stream_key(8, INPUT_STREAM), 123, 1.0), values[123]);
    }

    #[test]
    fn dropout_keeps_each_value_with_probability_one_minus_p() {
        let key = stream_key(7, dropout_stream(2));
        for p in [0.1f32, 0.5, 0.9] {
            let kept = (0..100_000u64).filter(|&i| keeps(key, i, p)).count();
            let share = kept as f64 / 100_000.0;
            assert!(
                (share - f64::from(1.0 - p)).abs() < 0.01,
                "p={p}: kept {share}"
            );
        }
        assert!((0..10_000u64).all(|i| keeps(key, i, 0.0)));
        assert_ne!(
            stream_key(7, dropout_stream(0)),
            stream_key(7, parameter_stream(0))
        );
    }

    #[test]
    fn labels_are_the_argmax_of_the_leading_features() {
        let inputs = [0.1, 0.9, -0.3, 5.0, /* row 2 */ 0.7, 0.2, 0.7, 9.0];
        let mut labels = [9; 2];
        fill_labels(&mut labels, &inputs, 4, 3);
        assert_eq!(labels, [1, 0]);
    }
}
