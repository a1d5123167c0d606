//! Order statistics over recorded durations, in microseconds.
//!
//! Percentiles use the nearest-rank method on the sorted sample, so every
//! reported figure is a value that was actually observed.

use serde_json::{Map, Value, json};

/// Returns the nearest-rank percentile `p` (0..=100) of an ascending sample,
/// or `None` when the sample is empty.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied()
}

/// Summarises a sample as a JSON object with `n`, `min`, `max`, `mean` and the
/// requested percentiles (keys `p50`, `p99`, `p99.9`, ...). Sorts in place.
/// An empty sample yields `{"n":0}`.
pub fn summary(sample: &mut [u64], percentiles: &[f64]) -> Value {
    let mut out = Map::new();
    out.insert("n".into(), json!(sample.len()));
    if sample.is_empty() {
        return Value::Object(out);
    }
    sample.sort_unstable();
    let sum: u128 = sample.iter().map(|&v| u128::from(v)).sum();
    out.insert("min".into(), json!(sample.first()));
    out.insert("max".into(), json!(sample.last()));
    out.insert("mean".into(), json!(sum as f64 / sample.len() as f64));
    for &p in percentiles {
        out.insert(format!("p{p}"), json!(percentile(sample, p)));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_an_observed_value() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&s, 50.0), Some(50));
        assert_eq!(percentile(&s, 99.0), Some(99));
        assert_eq!(percentile(&s, 100.0), Some(100));
        assert_eq!(percentile(&s, 0.0), Some(1));
    }

    #[test]
    fn percentile_of_empty_sample_is_none() {
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_and_names_percentiles() {
        let mut s = vec![30, 10, 20];
        let v = summary(&mut s, &[50.0, 99.9]);
        assert_eq!(v["n"], 3);
        assert_eq!(v["min"], 10);
        assert_eq!(v["max"], 30);
        assert_eq!(v["p50"], 20);
        assert_eq!(v["p99.9"], 30);
    }

    #[test]
    fn summary_of_empty_sample_has_only_a_count() {
        let v = summary(&mut [], &[50.0]);
        assert_eq!(v, json!({"n": 0}));
    }
}
