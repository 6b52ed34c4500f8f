//! Automatic canary rollouts as a plain function: at the end of each interval, the canary's
//! requests in the interval are judged against the rollout's bounds. Too few requests: hold
//! (the interval is extended, its counts kept); an error rate or p99 above its bound: roll
//! back; otherwise step the weight up by `step_percent`, and at 100 % the rollout completes.
//! With `min_shadow_agreement`, the canary also shadows the primary and an interval needs
//! `min_requests` compared rows, enough of them agreeing.

use std::collections::BTreeMap;
use std::time::Instant;

use sluice_config::Rollout;
use sluice_deployments::metrics::LatencyBuckets;
use sluice_deployments::{Deployment, Shadow};

/// A deployment's request counters at one moment: successes, server-side failures (internal
/// errors and deadlines; not bad requests or overload) and latency buckets; for a canary shadowing its
/// primary, the rows compared and those that agreed; and what proxies on other nodes said
/// their copies of it answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    pub success: u64,
    pub failed: u64,
    pub latencies: Vec<u64>,
    pub shadow_rows: u64,
    pub shadow_agreed: u64,
    /// By proxy, what its copy answered since it started (reports still counting,
    /// [`crate::demand::RemoteDemand::served`]). Each is judged against its own baseline: a
    /// sum over proxies goes down when one's report lapses and up by its whole history when it
    /// comes back.
    pub proxies: BTreeMap<String, ProxyServed>,
    /// When they were read: a proxy's copy that started after a baseline's counts whole in
    /// the interval from it.
    pub taken: Option<Instant>,
}

/// What one proxy's copy of a version answered since it started.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyServed {
    /// Which copy (a new one counts from 0).
    pub copy: u64,
    /// About when it started (by the controller's clock: when the report came, less the age
    /// the copy said it had); `None`: before anything this clock can say (older than the
    /// clock's origin), so before any baseline.
    pub started: Option<Instant>,
    pub success: u64,
    pub failed: u64,
    /// The latency buckets that are not empty, as (bucket, count).
    pub latencies: Vec<(usize, u64)>,
}

/// Whether `p`'s copy started after `baseline` was taken (all it answered is then since).
fn started_since(baseline: &Counters, p: &ProxyServed) -> bool {
    matches!((baseline.taken, p.started), (Some(t), Some(s)) if s >= t)
}

/// The requests of one interval: the head's own, and each proxy copy's against its own
/// baseline.
struct Interval {
    ok: u64,
    failed: u64,
    latencies: Vec<u64>,
}

impl Interval {
    fn between(baseline: &Counters, now: &Counters) -> Self {
        let mut latencies = now.latencies.clone();
        if baseline.latencies.len() == latencies.len() {
            for (n, b) in latencies.iter_mut().zip(&baseline.latencies) {
                *n = n.saturating_sub(*b);
            }
        }
        let mut interval = Self {
            ok: now.success.saturating_sub(baseline.success),
            failed: now.failed.saturating_sub(baseline.failed),
            latencies,
        };
        for (proxy, p) in &now.proxies {
            let from = match baseline.proxies.get(proxy) {
                Some(b) if b.copy == p.copy => Some(b),
                // Started since the baseline: all it answered is in the interval.
                _ if started_since(baseline, p) => None,
                // Not known when the interval began (its report was missing then): from the
                // next interval on ([`Counters::adopt_new_copies`]).
                _ => continue,
            };
            // Added saturating: the counts come from the network.
            interval.ok = interval.ok.saturating_add(p.success.saturating_sub(from.map_or(0, |b| b.success)));
            interval.failed =
                interval.failed.saturating_add(p.failed.saturating_sub(from.map_or(0, |b| b.failed)));
            for &(i, n) in &p.latencies {
                let before =
                    from.and_then(|b| b.latencies.iter().find(|(j, _)| *j == i)).map_or(0, |(_, m)| *m);
                if let Some(c) = interval.latencies.get_mut(i) {
                    *c = c.saturating_add(n.saturating_sub(before));
                }
            }
        }
        interval
    }
}

impl Counters {
    /// Takes into this baseline the proxies' copies that `now` reads and it has no count of,
    /// where they started before it was taken (what they answered before it and since cannot
    /// be told apart: from here on, their requests count). For a rollout that holds: its
    /// interval, and its baseline, go on.
    pub fn adopt_new_copies(&mut self, now: &Counters) {
        for (proxy, p) in &now.proxies {
            if self.proxies.get(proxy).is_some_and(|b| b.copy == p.copy) {
                continue;
            }
            if !started_since(self, p) {
                self.proxies.insert(proxy.clone(), p.clone());
            }
        }
    }

    /// Takes into this new baseline (after a step) the proxies that `before` had a count of
    /// and this one reads none of (their reports lapsed): one that comes back is judged from
    /// there, what it answered meanwhile in the interval it comes back in.
    pub fn carry_lapsed(&mut self, before: &Counters) {
        for (proxy, p) in &before.proxies {
            self.proxies.entry(proxy.clone()).or_insert_with(|| p.clone());
        }
    }

    /// The counters of `d` now.
    pub fn of(d: &Deployment) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let m = d.metrics();
        Self {
            success: m.stats.success.count.load(Relaxed),
            failed: m.stats.server_errors.load(Relaxed),
            latencies: m.latencies.snapshot(),
            ..Self::default()
        }
    }

    /// The counters of `d` now, with what the copies `shadow` sent it showed.
    pub fn with_shadow(d: &Deployment, shadow: Option<&Shadow>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let mut c = Self::of(d);
        if let Some(s) = shadow {
            c.shadow_rows = s.stats().rows.load(Relaxed);
            c.shadow_agreed = s.stats().rows_agreed.load(Relaxed);
        }
        c
    }
}

/// What a rollout does after an interval.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Too few requests to judge: keep the weight and the interval's counts.
    Hold,
    /// Within bounds: move to this weight.
    Step(u32),
    /// Within bounds and the weight reaches 100 %: the rollout is done.
    Complete,
    /// A bound was broken: send the canary no more traffic, for this reason.
    Rollback(String),
}

/// Judges the canary's requests between `baseline` and `now` (counters at the start and end
/// of the interval) at its current `weight`.
pub fn judge(rollout: &Rollout, weight: u32, baseline: &Counters, now: &Counters) -> Verdict {
    let Interval { ok, failed, latencies } = Interval::between(baseline, now);
    let total = ok.saturating_add(failed);
    if total < rollout.min_requests || total == 0 {
        return Verdict::Hold;
    }
    let error_rate = failed as f64 / total as f64;
    if error_rate > rollout.max_error_rate {
        return Verdict::Rollback(format!(
            "error rate {:.1}% over {total} requests is above max_error_rate {:.1}%",
            error_rate * 100.0,
            rollout.max_error_rate * 100.0
        ));
    }
    let p99 = LatencyBuckets::quantile_of(&latencies, 0.99);
    if let (Some(bound), Some(p99)) = (rollout.max_p99_ms, p99) {
        let ms = p99.as_secs_f64() * 1000.0;
        if ms > bound {
            return Verdict::Rollback(format!("p99 {ms:.1} ms is above max_p99_ms {bound} ms"));
        }
    }
    if let Some(bound) = rollout.min_shadow_agreement {
        let rows = now.shadow_rows.saturating_sub(baseline.shadow_rows);
        let agreed = now.shadow_agreed.saturating_sub(baseline.shadow_agreed);
        if rows < rollout.min_requests.max(1) {
            return Verdict::Hold;
        }
        let agreement = agreed as f64 / rows as f64;
        if agreement < bound {
            return Verdict::Rollback(format!(
                "shadow agreement {:.1}% over {rows} rows is below min_shadow_agreement {:.1}%",
                agreement * 100.0,
                bound * 100.0
            ));
        }
    }
    match (weight + rollout.step_percent).min(100) {
        100 => Verdict::Complete,
        next => Verdict::Step(next),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_deployments::metrics::LatencyBuckets;

    use super::*;

    fn rollout() -> Rollout {
        Rollout {
            step_percent: 20,
            min_requests: 10,
            max_error_rate: 0.05,
            max_p99_ms: Some(50.0),
            ..Rollout::default()
        }
    }

    /// Counters after `ok` successes and `failed` failures, every request taking `latency`.
    fn counters(ok: u64, failed: u64, latency: Duration) -> Counters {
        let buckets = LatencyBuckets::default();
        for _ in 0..ok + failed {
            buckets.record(latency);
        }
        Counters { success: ok, failed, latencies: buckets.snapshot(), ..Counters::default() }
    }

    fn start() -> Counters {
        counters(0, 0, Duration::ZERO)
    }

    /// A p99 under the bound is read within the buckets' 4.4 %, not rolled back.
    #[test]
    fn a_p99_just_under_the_bound_steps_up() {
        let near = counters(100, 0, Duration::from_micros(46_500));
        assert_eq!(judge(&rollout(), 20, &start(), &near), Verdict::Step(40));
        let over = counters(100, 0, Duration::from_micros(52_500));
        assert!(matches!(judge(&rollout(), 20, &start(), &over), Verdict::Rollback(_)));
    }

    #[test]
    fn healthy_intervals_step_the_weight_up_and_complete_at_100() {
        let fast = counters(100, 0, Duration::from_millis(2));
        assert_eq!(judge(&rollout(), 10, &start(), &fast), Verdict::Step(30));
        assert_eq!(judge(&rollout(), 70, &start(), &fast), Verdict::Step(90));
        assert_eq!(judge(&rollout(), 90, &start(), &fast), Verdict::Complete);
        assert_eq!(judge(&rollout(), 80, &start(), &fast), Verdict::Complete);
    }

    #[test]
    fn too_few_requests_hold_whatever_they_show() {
        let bad = counters(3, 6, Duration::from_secs(1));
        assert_eq!(judge(&rollout(), 10, &start(), &bad), Verdict::Hold, "9 requests, min_requests 10");
        assert_eq!(judge(&rollout(), 10, &start(), &start()), Verdict::Hold);
        let mut none = rollout();
        none.min_requests = 0;
        assert_eq!(judge(&none, 10, &start(), &start()), Verdict::Hold, "no request at all is never judged");
    }

    #[test]
    fn an_error_rate_above_the_bound_rolls_back_and_says_why() {
        let v = judge(&rollout(), 30, &start(), &counters(90, 10, Duration::from_millis(1)));
        let Verdict::Rollback(why) = v else { panic!("{v:?}") };
        assert!(why.contains("error rate 10.0% over 100 requests"), "{why}");
        assert!(why.contains("max_error_rate 5.0%"), "{why}");
        // At the bound is within it.
        assert_eq!(
            judge(&rollout(), 30, &start(), &counters(95, 5, Duration::from_millis(1))),
            Verdict::Step(50)
        );
    }

    #[test]
    fn a_p99_above_the_bound_rolls_back_and_none_set_means_no_bound() {
        let slow = counters(100, 0, Duration::from_millis(200));
        let v = judge(&rollout(), 30, &start(), &slow);
        let Verdict::Rollback(why) = v else { panic!("{v:?}") };
        assert!(why.contains("above max_p99_ms 50 ms"), "{why}");
        let mut unbounded = rollout();
        unbounded.max_p99_ms = None;
        assert_eq!(judge(&unbounded, 30, &start(), &slow), Verdict::Step(50));
    }

    #[test]
    fn only_the_interval_counts_not_what_came_before() {
        // A bad past (before the baseline) and a clean interval: steps.
        let before = counters(50, 50, Duration::from_secs(1));
        let mut after = before.clone();
        let fast = counters(40, 0, Duration::from_millis(1));
        after.success += fast.success;
        after.latencies = before.latencies.iter().zip(&fast.latencies).map(|(a, b)| a + b).collect();
        assert_eq!(judge(&rollout(), 10, &before, &after), Verdict::Step(30));
    }

    /// Each proxy's copy is judged against its own baseline. One whose report lapsed reads as
    /// nothing this interval (summed over proxies, its history read as gone and the head's few
    /// failures as all the requests: a false rollback); one that comes back counts from where
    /// it was (not its whole history); one started since the baseline counts whole, as does a
    /// copy started again; one started before the baseline but missing from it counts from the
    /// next interval on.
    #[test]
    fn each_proxys_copy_is_judged_against_its_own_baseline() {
        // An hour ahead, so that the times before it exist on every clock.
        let t = Instant::now() + Duration::from_secs(3600);
        let ago = |s: u64| t - Duration::from_secs(s);
        let copy = |copy, started, success, failed| ProxyServed {
            copy,
            started: Some(started),
            success,
            failed,
            latencies: vec![(10, success.saturating_add(failed))],
        };
        let at = |head: Counters, taken: Instant, proxies: Vec<(&str, ProxyServed)>| Counters {
            proxies: proxies.into_iter().map(|(p, c)| (p.to_string(), c)).collect(),
            taken: Some(taken),
            ..head
        };
        let fast = Duration::from_millis(1);
        let baseline = at(start(), ago(30), vec![("a", copy(1, ago(60), 10_000, 0))]);
        // Lapsed: the head's 2 % failures alone.
        let lapsed = at(counters(980, 20, fast), t, vec![]);
        assert_eq!(judge(&rollout(), 10, &baseline, &lapsed), Verdict::Step(30));
        // Back: 50 of its 100 requests since the baseline failed.
        let back = at(start(), t, vec![("a", copy(1, ago(60), 10_050, 50))]);
        assert!(matches!(judge(&rollout(), 10, &baseline, &back), Verdict::Rollback(_)));
        // Started again since the baseline (another copy): all of its 20.
        let again = at(start(), t, vec![("a", copy(2, ago(10), 20, 0))]);
        assert_eq!(judge(&rollout(), 10, &baseline, &again), Verdict::Step(30));
        // A copy the baseline missed, started before it: not this interval (its 100 failures
        // may be from before), the next one.
        let mut baseline = baseline;
        let missed = at(start(), t, vec![("b", copy(9, ago(60), 500, 100))]);
        assert_eq!(judge(&rollout(), 10, &baseline, &missed), Verdict::Hold);
        baseline.adopt_new_copies(&missed);
        assert_eq!(baseline.proxies["b"].success, 500);
        assert_eq!(baseline.proxies["a"].success, 10_000, "kept for when it comes back");
        let next = at(start(), t, vec![("b", copy(9, ago(60), 520, 100))]);
        assert_eq!(judge(&rollout(), 10, &baseline, &next), Verdict::Step(30));
        // One started since the baseline is counted whole, and is not taken into it on a hold.
        let new = at(start(), t, vec![("c", copy(3, ago(5), 5, 0))]);
        assert_eq!(judge(&rollout(), 10, &baseline, &new), Verdict::Hold, "5 requests");
        baseline.adopt_new_copies(&new);
        assert!(!baseline.proxies.contains_key("c"));
        let more = at(start(), t, vec![("c", copy(3, ago(5), 12, 0))]);
        assert_eq!(judge(&rollout(), 10, &baseline, &more), Verdict::Step(30));
        // A copy older than the clock can say is older than any baseline.
        let ancient = ProxyServed { started: None, ..copy(4, t, 50, 0) };
        let unknown = at(start(), t, vec![("d", ancient)]);
        assert_eq!(judge(&rollout(), 10, &baseline, &unknown), Verdict::Hold);
        // After a step, a proxy whose report had lapsed keeps its baseline: back, it is
        // judged from there (what it answered while away, in the interval it is back in).
        let mut stepped = at(start(), t, vec![("b", copy(9, ago(60), 600, 100))]);
        stepped.carry_lapsed(&baseline);
        assert_eq!(stepped.proxies["a"].success, 10_000);
        assert_eq!(stepped.proxies["b"].success, 600, "its own count now, not the one before");
        let returned = at(start(), t, vec![("a", copy(1, ago(60), 10_030, 0))]);
        assert_eq!(judge(&rollout(), 10, &stepped, &returned), Verdict::Step(30));
        // Counts near the top of u64 (a report off the network) saturate.
        let huge = at(start(), t, vec![("e", copy(5, ago(1), u64::MAX, u64::MAX))]);
        assert!(matches!(judge(&rollout(), 10, &baseline, &huge), Verdict::Rollback(_)));
    }

    #[test]
    fn a_shadow_agreement_gate_holds_without_enough_rows_and_rolls_back_below_its_bound() {
        let mut gated = rollout();
        gated.min_shadow_agreement = Some(0.9);
        let with = |rows, agreed| Counters {
            shadow_rows: rows,
            shadow_agreed: agreed,
            ..counters(100, 0, Duration::from_millis(1))
        };
        assert_eq!(judge(&gated, 10, &start(), &with(9, 9)), Verdict::Hold, "9 rows, min_requests 10");
        assert_eq!(judge(&gated, 10, &start(), &with(100, 95)), Verdict::Step(30));
        assert_eq!(judge(&gated, 10, &start(), &with(100, 90)), Verdict::Step(30), "at the bound");
        let v = judge(&gated, 10, &start(), &with(100, 60));
        let Verdict::Rollback(why) = v else { panic!("{v:?}") };
        assert_eq!(why, "shadow agreement 60.0% over 100 rows is below min_shadow_agreement 90.0%");
        // Only the interval's rows count.
        assert_eq!(
            judge(&gated, 10, &Counters { shadow_rows: 100, ..start() }, &with(150, 50)),
            Verdict::Step(30)
        );
        // No gate: agreement is not looked at.
        assert_eq!(judge(&rollout(), 10, &start(), &with(100, 0)), Verdict::Step(30));
    }
}
