//! Recent traffic of one version, for status: requests answered per second and p50/p99
//! latency over about the last [`WINDOW`], from a small ring of counter snapshots the control
//! loop takes (at most one per [`EVERY`]; at most `WINDOW / EVERY + 2` kept, ~1 KiB each).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sluice_deployments::metrics::LatencyBuckets;

use crate::rollout::Counters;

/// How far back the rates look.
pub const WINDOW: Duration = Duration::from_secs(30);

/// The closest two snapshots may be.
const EVERY: Duration = Duration::from_secs(1);

/// Requests per second and latency percentiles over a recent window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    /// Requests answered (successes and errors) per second.
    pub requests_per_s: f64,
    /// Median latency in milliseconds (bucket upper bound, within 19 %); None without requests.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds; None without requests.
    pub p99_ms: Option<f64>,
    /// The seconds the rates cover (up to [`WINDOW`]; less just after a version starts).
    pub window_s: f64,
}

/// Snapshots of one version's counters, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrafficWindow {
    samples: VecDeque<(Instant, Counters)>,
}

impl TrafficWindow {
    /// Takes a snapshot at `now` unless the last one is younger than [`EVERY`] (`counters` is
    /// only called when one is taken), and drops those no longer needed: the oldest kept is the
    /// newest at least [`WINDOW`] old, the baseline of the rates.
    pub fn sample(&mut self, now: Instant, counters: impl FnOnce() -> Counters) {
        if self.samples.back().is_some_and(|(t, _)| now.saturating_duration_since(*t) < EVERY) {
            return;
        }
        self.samples.push_back((now, counters()));
        while self.samples.get(1).is_some_and(|(t, _)| now.saturating_duration_since(*t) >= WINDOW) {
            self.samples.pop_front();
        }
    }

    /// The rates between the oldest and newest snapshot; None before there are two.
    pub fn traffic(&self) -> Option<Traffic> {
        let ((t0, first), (t1, last)) = (self.samples.front()?, self.samples.back()?);
        let secs = t1.saturating_duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let answered = last.latencies.iter().sum::<u64>().saturating_sub(first.latencies.iter().sum());
        let ms =
            |q| LatencyBuckets::quantile(&first.latencies, &last.latencies, q).map(|d| d.as_secs_f64() * 1e3);
        Some(Traffic {
            requests_per_s: answered as f64 / secs,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            window_s: secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters after `n` requests of `latency` each.
    fn after(n: u64, latency: Duration) -> Counters {
        let b = LatencyBuckets::default();
        for _ in 0..n {
            b.record(latency);
        }
        Counters { success: n, failed: 0, latencies: b.snapshot(), ..Counters::default() }
    }

    #[test]
    fn rates_cover_the_window_and_old_snapshots_are_dropped() {
        let t0 = Instant::now();
        let mut w = TrafficWindow::default();
        w.sample(t0, || after(0, Duration::ZERO));
        assert_eq!(w.traffic(), None, "one snapshot: no rate yet");
        // 10 requests a second for 60 s, each taking 4 ms.
        for s in 1..=60u64 {
            w.sample(t0 + Duration::from_secs(s), || after(10 * s, Duration::from_millis(4)));
        }
        let t = w.traffic().unwrap();
        assert_eq!(t.window_s, 30.0, "the oldest kept is exactly WINDOW old");
        assert!((t.requests_per_s - 10.0).abs() < 1e-9, "{t:?}");
        let p50 = t.p50_ms.unwrap();
        assert!((4.0..=4.8).contains(&p50), "{t:?}");
        assert_eq!(w.samples.len(), 31, "bounded: one a second over the window");
    }

    #[test]
    fn snapshots_closer_than_a_second_are_skipped_and_idle_means_zero() {
        let t0 = Instant::now();
        let mut w = TrafficWindow::default();
        w.sample(t0, || after(5, Duration::from_millis(1)));
        w.sample(t0 + Duration::from_millis(500), || panic!("not taken: too soon"));
        w.sample(t0 + Duration::from_secs(2), || after(5, Duration::from_millis(1)));
        let t = w.traffic().unwrap();
        assert_eq!((t.requests_per_s, t.p50_ms, t.p99_ms), (0.0, None, None));
    }
}
