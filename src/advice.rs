//! Advice drawn from a search's measurements, as pure functions: the headroom rule.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommendation_rounding_rules() {
        assert_eq!(recommended_batch_size(20480, 0.8, 8), 16384);
        assert_eq!(recommended_batch_size(1000, 0.8, 64), 768);
        assert_eq!(recommended_batch_size(9, 0.8, 8), 7);
        assert_eq!(recommended_batch_size(1, 0.5, 8), 1);
        assert_eq!(recommended_batch_size(100, 1.0, 1), 100);
    }
}
