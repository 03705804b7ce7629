//! Small statistics: nearest-rank percentiles and min/median/max summaries.

use serde::Serialize;

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample.
    pub max: u64,
    /// Arithmetic mean.
    pub mean: f64,
}

/// The nearest-rank `p`-th percentile (0 < p ≤ 100) of `sorted` (ascending, non-empty):
/// the smallest sample with at least p % of the samples at or below it.
pub fn nearest_rank(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Percentiles of `samples`; `None` when there are none.
pub fn percentiles(samples: &[u64]) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let sum: u128 = sorted.iter().map(|&v| u128::from(v)).sum();
    Some(Percentiles {
        count: sorted.len(),
        p50: nearest_rank(&sorted, 50.0),
        p90: nearest_rank(&sorted, 90.0),
        p99: nearest_rank(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
        mean: sum as f64 / sorted.len() as f64,
    })
}

/// Minimum, median and maximum of per-node values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Smallest.
    pub min: f64,
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Largest.
    pub max: f64,
}

/// The [`Spread`] of `values`, ignoring NaN; `None` when there are none.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        let p = percentiles(&v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50, 90, 99, 100));
        assert_eq!(p.mean, 50.5);
        let p = percentiles(&[7]).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (7, 7, 7));
        // Order does not matter.
        let p = percentiles(&[30, 10, 20]).unwrap();
        assert_eq!((p.p50, p.p90), (20, 30));
        assert!(percentiles(&[]).is_none());
    }

    #[test]
    fn spreads() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = spread(&[4.0, 1.0, 2.0, 3.0, f64::NAN]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(spread(&[]).is_none());
    }
}
