//! Summaries of latency samples.

use std::time::Duration;

/// The summary of one set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub median: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub samples: usize,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort();
        Some(Self {
            median: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            min: sorted[0],
            samples: sorted.len(),
        })
    }
}

/// The `p`-th percentile of sorted, non-empty samples (nearest rank).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The median of `samples` (nearest rank), if any.
pub fn median(samples: &[Duration]) -> Option<Duration> {
    Summary::of(samples).map(|s| s.median)
}

/// The median of plain numbers (lower middle for an even count), if any.
pub fn median_u64(samples: &[u64]) -> Option<u64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// `a / b`, or NaN when b is zero.
pub fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let sum = Summary::of(&s).unwrap();
        assert_eq!(sum.median, Duration::from_millis(50));
        assert_eq!(sum.p90, Duration::from_millis(90));
        assert_eq!(sum.p99, Duration::from_millis(99));
        assert_eq!(sum.min, Duration::from_millis(1));
        assert_eq!(sum.samples, 100);
        assert_eq!(Summary::of(&[]), None);
        let one = Summary::of(&[Duration::from_millis(3)]).unwrap();
        assert_eq!(one.p99, Duration::from_millis(3));
        assert_eq!(median_u64(&[5, 1, 3, 2]), Some(2));
        assert_eq!(median_u64(&[]), None);
    }
}
