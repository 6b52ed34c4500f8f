//! Latency recording (HDR histogram, microseconds) and the result of one load step.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The longest latency a histogram holds when a step sets no timeout.
pub const DEFAULT_CAP: Duration = Duration::from_secs(100);

/// A latency histogram in microseconds with 3 significant digits, as large as the longest
/// latency it holds needs (it grows when one is recorded): a closed-loop step keeps one per
/// connection, and one sized up front to a 30 s timeout takes 128 KiB (1.25 GiB at
/// `--concurrency 10000`). Merging histograms of different sizes loses nothing.
pub fn histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 1_000, 3).expect("valid histogram bounds");
    h.auto(true);
    h
}

/// Records `d`, clamped to 1 µs … `cap` (a step's timeout, past which a request is an error
/// and no latency: one answered just as its timeout fell is recorded as the timeout; a longer
/// timeout's latencies are recorded as they are, not clamped to a fixed bound).
pub fn record(h: &mut Histogram<u64>, d: Duration, cap: Duration) {
    let cap = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX).max(1);
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, cap);
    // Grows the histogram where it must (a saturating record would clamp to its size instead).
    let _ = h.record(us);
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |p: f64| h.value_at_quantile(p) as f64;
        Self {
            p50: q(0.5),
            p90: q(0.9),
            p95: q(0.95),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64,
            mean: h.mean(),
        }
    }
}

/// One request of a step, kept when the step logs its requests (`--request-log`).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// When it was sent (open loop: its scheduled time), counted from the step's start.
    pub sent: Duration,
    /// Until its answer (or failure) came back.
    pub latency: Duration,
    /// `None` when it succeeded; else its failure kind, as counted in `errors`.
    pub error: Option<String>,
}

/// What one step (a concurrency or a rate) measured.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    /// `concurrency 8` or `rate 200/s`.
    pub label: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub protocol: String,
    /// Requests answered successfully (and matching, with --check), the drain's included.
    pub ok: u64,
    /// Failures by kind: `http 503`, `grpc Unavailable`, `transport: ...`, `mismatch`, `overrun`.
    pub errors: BTreeMap<String, u64>,
    /// What the rates are over: a step bound by its duration, that duration (the time it
    /// sent requests); a step bound by its request count, until its last answer.
    pub seconds: f64,
    /// Successful requests per second: those answered within `seconds` (as wrk and h2load
    /// count), so that a slow last answer does not stretch the time the others are divided by.
    pub throughput: f64,
    /// Successful rows (inferences) per second, counted as `throughput`.
    pub inferences_per_second: f64,
    /// A step bound by its duration: from its end until the last request it had sent was
    /// answered (or timed out); those answers count in `ok` and the latencies, not the rates.
    /// 0 for a step bound by its request count.
    pub drain_seconds: f64,
    /// Latency of successful requests, µs (open loop: from the scheduled send time).
    pub latency_us: Percentiles,
    /// When the step started, seconds since the Unix epoch (to line its requests up with
    /// events outside the load tester).
    pub started_unix_s: f64,
    /// Open loop: sends that left more than 1 ms after their scheduled time (the load tester
    /// fell behind; their latencies carry that delay). 0 in a closed loop.
    pub late_sends: u64,
    /// Every request, when the step was asked to log them; in no particular order.
    #[serde(skip)]
    pub requests: Vec<RequestRecord>,
}

impl StepResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us), DEFAULT_CAP);
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p90 - 900.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.p999 - 999.0).abs() <= 1.0, "{p:?}");
        assert!((p.max - 1000.0).abs() <= 1.0, "{p:?}");
        assert!((p.mean - 500.5).abs() <= 1.0, "{p:?}");
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_lost() {
        let mut h = histogram();
        record(&mut h, Duration::ZERO, DEFAULT_CAP);
        record(&mut h, Duration::from_secs(1000), DEFAULT_CAP);
        assert_eq!(h.len(), 2);
        assert!((h.max() as f64 / 100e6 - 1.0).abs() < 1e-3, "{}", h.max());
    }

    /// A step with a 5-minute timeout records a 250 s answer as 250 s, not as the 100 s a
    /// fixed cap clamped it to.
    #[test]
    fn the_cap_follows_the_timeout() {
        let cap = Duration::from_secs(300);
        let mut h = histogram();
        record(&mut h, Duration::from_secs(250), cap);
        let max = Percentiles::of(&h).max;
        assert!((max / 250e6 - 1.0).abs() < 1e-3, "{max}");
        // Past the cap (a request answered just as its timeout fell): clamped to it.
        record(&mut h, Duration::from_secs(301), cap);
        assert!((h.max() as f64 / 300e6 - 1.0).abs() < 1e-3, "{}", h.max());
    }

    /// A histogram holds room for the latencies it has, not for its step's timeout: a
    /// closed-loop step keeps one per connection (sized to a 30 s timeout up front, 10,000
    /// connections took 1.25 GiB). Histograms of different sizes merge into the same
    /// percentiles.
    #[test]
    fn a_histogram_is_as_large_as_its_latencies() {
        let cap = Duration::from_secs(30);
        let mut fast = histogram();
        for us in [80, 120, 950] {
            record(&mut fast, Duration::from_micros(us), cap);
        }
        let bytes = |h: &Histogram<u64>| h.distinct_values() * std::mem::size_of::<u64>();
        assert!(bytes(&fast) <= 16 * 1024, "{} bytes", bytes(&fast));
        let mut slow = histogram();
        record(&mut slow, Duration::from_secs(20), cap);
        fast.add(&slow).unwrap();
        assert_eq!(fast.len(), 4);
        assert!((fast.max() as f64 / 20e6 - 1.0).abs() < 1e-3, "{}", fast.max());
        assert!((Percentiles::of(&fast).p50 - 120.0).abs() <= 1.0);
    }
}
