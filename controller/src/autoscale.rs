//! Autoscaling decisions as plain functions over sampled load, after Ray Serve's default
//! policy: the signal is in-flight + queued requests, averaged over `look_back_period_s`;
//! the desired count is `current × (1 + (load / (target × current) − 1) × factor)`, rounded
//! up, within `min_replicas..=max_replicas`; it must hold for `upscale_delay_s` (or
//! `downscale_delay_s`, or `downscale_to_zero_delay_s` for the last step) before it is acted on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sluice_config::Autoscaling;

/// How often an autoscaled deployment's load is sampled (at most; `metrics_interval_s` when
/// shorter), its decisions made every `metrics_interval_s` on the samples of the look-back
/// window, as Ray Serve records a replica's ongoing requests many times between its reports.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What the autoscaler of one deployment remembers between decisions.
#[derive(Debug, Default)]
pub struct ScaleState {
    samples: VecDeque<(Instant, f64)>,
    /// Since when the desired count has been above the current one.
    above_since: Option<Instant>,
    /// Since when it has been below.
    below_since: Option<Instant>,
}

impl ScaleState {
    /// Records a sample of in-flight + queued requests at `now`.
    pub fn sample(&mut self, now: Instant, load: f64, look_back: Duration) {
        self.samples.push_back((now, load));
        while self.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > look_back) {
            self.samples.pop_front();
        }
    }

    /// When the last sample was taken.
    pub fn last_sampled(&self) -> Option<Instant> {
        self.samples.back().map(|(t, _)| *t)
    }

    /// The average load over the look-back window.
    pub fn average(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().map(|(_, l)| l).sum::<f64>() / self.samples.len() as f64
    }
}

/// The replica count the load asks for, before delays.
pub fn desired(cfg: &Autoscaling, current: u32, load: f64) -> u32 {
    let target = cfg.target_ongoing_requests;
    let raw = if current == 0 {
        if load > 0.0 { (load / target).ceil().max(1.0) } else { 0.0 }
    } else {
        let ratio = load / (target * current as f64);
        let factor = if ratio > 1.0 { cfg.upscaling_factor } else { cfg.downscaling_factor };
        let smoothed = (current as f64 * (1.0 + (ratio - 1.0) * factor)).ceil();
        // Held at `current` by the factor alone (0.5 of one replica rounds up to one) while
        // the load asks for fewer: one fewer, as Ray's policy does, or a downscaling factor
        // below 1 could never reach `min_replicas` (nor zero).
        let stepped = if smoothed == current as f64 && (current as f64 * ratio).ceil() < current as f64 {
            smoothed - 1.0
        } else {
            smoothed
        };
        // Never below what the load needs at the target (while shrinking): a downscaling
        // factor above 1 overshoots, and 0.5 requests on one replica at a target of 2 with a
        // factor of 2 asked for zero replicas, in use (and from four replicas at a load of 3,
        // for one where two are needed).
        stepped.max((load / target).ceil().min(current as f64))
    };
    (raw.max(0.0) as u32).clamp(cfg.min_replicas, cfg.max_replicas)
}

/// Decides the replica count at `now`: the desired count once it has held long enough, else
/// the current one. `cap` bounds growth (replicas the node's free CPUs allow).
pub fn decide(cfg: &Autoscaling, state: &mut ScaleState, current: u32, now: Instant, cap: u32) -> u32 {
    let want = desired(cfg, current, state.average()).min(cap.max(cfg.min_replicas));
    if want > current {
        state.below_since = None;
        let since = *state.above_since.get_or_insert(now);
        if now.duration_since(since) >= Duration::from_secs_f64(cfg.upscale_delay_s) {
            state.above_since = None;
            return want;
        }
    } else if want < current {
        state.above_since = None;
        let since = *state.below_since.get_or_insert(now);
        // Zero is reached from one replica only, after its own delay; from more, the step
        // goes to one at most, after the downscale delay (as Ray's policy does).
        let (want, delay) = match current {
            1 => (want, cfg.downscale_to_zero_delay_s),
            _ => (want.max(1), cfg.downscale_delay_s),
        };
        if now.duration_since(since) >= Duration::from_secs_f64(delay) {
            state.below_since = None;
            return want;
        }
    } else {
        state.above_since = None;
        state.below_since = None;
    }
    current
}

/// One autoscaling round over every autoscaled deployment: samples the load of those whose
/// `metrics_interval_s` has passed (at once for one at zero replicas with requests waiting)
/// and decides their counts, growth capped by `node_cpus` free CPUs when given; their canaries
/// too when `canaries`. Returns the changes to make and when the next round is due.
pub(crate) fn step(
    st: &mut crate::state::ControllerState,
    now: Instant,
    node_cpus: Option<f64>,
    busy: &std::collections::HashSet<String>,
    canaries: bool,
) -> (Vec<crate::reconcile::Rescale>, Option<Instant>) {
    // Every running version's replicas take CPUs (canaries, shadows, versions served by
    // number); growth granted below takes them too, before the next deployment is judged.
    // A growth still loading counts at its target: replicas load one at a time, and two
    // deployments growing in turn (each decision seeing the other's replicas loaded so far)
    // together passed the node's CPUs.
    let growing = &st.growing;
    let mut used: f64 = st
        .deployments
        .iter()
        .map(|(name, m)| {
            let at = |canary: bool, v: &crate::state::Version| {
                let target = growing.get(&(name.clone(), canary)).copied().unwrap_or(0);
                v.replica_count().max(target) as f64
            };
            let primary = at(false, &m.primary);
            let canary = m.canary.as_ref().map_or(0.0, |c| at(true, &c.version));
            let others = m.others.iter().chain(m.shadow.as_ref().map(|s| &s.version));
            (primary + canary + others.map(|v| v.replica_count() as f64).sum::<f64>()) * m.config.num_cpus()
        })
        .sum();
    let mut rescale = Vec::new();
    let mut next: Option<Instant> = None;
    let remote = &st.remote_demand;
    for (name, m) in st.deployments.iter_mut() {
        let Some(s) = &mut m.scaling else { continue };
        let d = &m.primary.deployment;
        let current = m.primary.replica_count() as u32;
        // The head's requests and those proxies on other nodes hold for the same version.
        let (remote_in, remote_queued) = remote.of(name, d.version(), now);
        let in_system = d.in_system().saturating_add(remote_in) as f64;
        let from_zero = current == 0 && d.queue_depth().saturating_add(remote_queued) > 0;
        let interval = Duration::from_secs_f64(s.config.metrics_interval_s);
        let look_back = Duration::from_secs_f64(s.config.look_back_period_s);
        let sampled = from_zero || now.duration_since(s.last_decision) >= interval;
        // The load is sampled every SAMPLE_EVERY into the window, decided on every
        // `metrics_interval_s`: one snapshot per interval read steady light traffic (a request
        // in flight 1 % of the time) as none, and scaled the deployment to zero in use.
        let sample_every = SAMPLE_EVERY.min(interval);
        let sample_now =
            sampled || s.window.last_sampled().is_none_or(|t| now.duration_since(t) >= sample_every);
        // Its last change still runs (replicas loading, on Ray up to minutes): judged once that
        // is done, on its load sampled meanwhile (a busy spell longer than the look-back left
        // one sample to decide on, and a light load's instant read as none).
        if busy.contains(name) {
            if sample_now {
                s.window.sample(now, in_system, look_back);
                if let Some(c) = &mut m.canary {
                    let (remote_in, _) = remote.of(name, c.version.deployment.version(), now);
                    c.window.sample(now, canary_load(c).saturating_add(remote_in) as f64, look_back);
                }
            }
            let due = now + sample_every;
            next = Some(next.map_or(due, |n| n.min(due)));
            continue;
        }
        if sample_now && !sampled {
            s.window.sample(now, in_system, look_back);
        }
        let mut primary_changes = false;
        if sampled {
            s.last_decision = now;
            s.window.sample(now, in_system, look_back);
            let cap = growth_cap(current, node_cpus.map(|cpus| cpus - used), m.config.num_cpus());
            // From zero at once, as many as the requests waiting ask for (one at least).
            let mut want = match from_zero {
                true => desired(&s.config, 0, in_system).max(1).min(cap.max(1)),
                false => decide(&s.config, &mut s.window, current, now, cap),
            };
            // A growth that failed (a model that no longer loads) is tried again at its retry
            // time, not at every round: from zero, each failure woke the loop for the next try,
            // as fast as the load failed, while a request waited. A shrink is not held back.
            if want > current && m.scale_failure.as_ref().is_some_and(|f| now < f.retry_at()) {
                want = current;
            }
            if want > current {
                used += f64::from(want - current) * m.config.num_cpus();
            }
            if want != current {
                primary_changes = true;
                rescale.push(crate::reconcile::Rescale {
                    deployment: name.clone(),
                    target: m.primary.clone(),
                    to: want as usize,
                    canary: false,
                });
            }
        }
        if let Some(c) = &mut m.canary {
            if sample_now {
                let (remote_in, _) = remote.of(name, c.version.deployment.version(), now);
                c.window.sample(now, canary_load(c).saturating_add(remote_in) as f64, look_back);
            }
            // One change of a deployment at a time: the canary is judged once the primary's
            // has run (the loop comes back when it ends); one whose last change failed grows
            // again only at its retry time (a load that fails would otherwise be tried every
            // round), while it may shrink at once.
            let failed = c.scale_failure.as_ref().is_some_and(|f| now < f.retry_at());
            if canaries && !primary_changes {
                let current = c.version.replica_count() as u32;
                let cap = growth_cap(current, node_cpus.map(|cpus| cpus - used), m.config.num_cpus());
                let mut want = canary_wants(&s.config, s.window.average(), c, current, now, sampled, cap);
                if failed && want > current {
                    want = current;
                }
                if want > current {
                    used += f64::from(want - current) * m.config.num_cpus();
                }
                if want != current {
                    rescale.push(crate::reconcile::Rescale {
                        deployment: name.clone(),
                        target: c.version.clone(),
                        to: want as usize,
                        canary: true,
                    });
                }
            }
        }
        let due = (s.last_decision + interval).min(now + sample_every);
        next = Some(next.map_or(due, |n| n.min(due)));
    }
    (rescale, next)
}

/// The bounds a canary is sized within: its deployment's, but never below one replica (at
/// weight 0 it keeps one, ready for requests pinned to it and for the next rollout).
pub(crate) fn canary_bounds(cfg: &Autoscaling) -> Autoscaling {
    Autoscaling {
        min_replicas: cfg.min_replicas.max(1),
        max_replicas: cfg.max_replicas.max(1),
        ..cfg.clone()
    }
}

/// `to` held to what `config` allows a version of it now: its autoscaling bounds (a canary's,
/// [`canary_bounds`]), or its fixed count (a canary's one at least). A count decided under an
/// earlier config, or kept through an apply, is held to the config in force.
pub(crate) fn held_to_config(config: &sluice_config::Deployment, to: usize, canary: bool) -> usize {
    match (config.autoscaling(), canary) {
        (Some(a), false) => a.bound(to),
        (Some(a), true) => canary_bounds(a).bound(to),
        (None, false) => config.initial_replicas(),
        (None, true) => config.initial_replicas().max(1),
    }
}

/// The canary's requests in the deployment now (in flight and queued): the copies a rollout
/// gated on shadow agreement sends it are not its own traffic, and would size it for all of
/// the primary's.
fn canary_load(c: &crate::state::CanaryState) -> usize {
    let copies = c.rollout.as_ref().and_then(|r| r.mirror.as_ref()).map_or(0, |m| m.in_flight());
    let copies = usize::try_from(copies).unwrap_or(usize::MAX);
    c.version.deployment.in_system().saturating_sub(copies)
}

/// A canary's replica count: what its own load asks for (sampled with its deployment's, with
/// the same delays), and at once no fewer than its share of the whole deployment's load asks
/// for (that load times its weight, over `target_ongoing_requests`, within its bounds and
/// `cap`): a rollout that moves a share of the traffic to the canary would otherwise leave that
/// share on the replicas it started with until the upscale delay passed, and the requests
/// they cannot take in time count against its gate. At weight 0 with no rollout (rolled back,
/// or set so) it has no share to hold: it shrinks at once to what its own load (requests pinned
/// to it) asks for. `primary_load` is the primary's average.
fn canary_wants(
    cfg: &Autoscaling,
    primary_load: f64,
    c: &mut crate::state::CanaryState,
    current: u32,
    now: Instant,
    sampled: bool,
    cap: u32,
) -> u32 {
    let cfg = canary_bounds(cfg);
    let at_once = |load: f64| {
        let n = (load / cfg.target_ongoing_requests).ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
        n.clamp(cfg.min_replicas, cfg.max_replicas).min(cap.max(cfg.min_replicas))
    };
    let own = match sampled {
        true => decide(&cfg, &mut c.window, current, now, cap),
        false => current,
    };
    let want = match c.weight == 0 && c.rollout.is_none() {
        true => own.min(at_once(c.window.average())),
        false => own.max(at_once((primary_load + c.window.average()) * f64::from(c.weight.min(100)) / 100.0)),
    };
    // Bounds a config applied since lowered hold at once, as they do for the primary.
    want.clamp(cfg.min_replicas, cfg.max_replicas)
}

/// The most replicas a deployment may grow to: `current` and as many more as `free_cpus` fit
/// at `per_replica` CPUs each; no bound without a node size, or for replicas that ask for no
/// CPU (Ray's `num_cpus: 0`). Saturating: a CPU count near 0 fits "all" replicas, never wraps.
fn growth_cap(current: u32, free_cpus: Option<f64>, per_replica: f64) -> u32 {
    let fits = match free_cpus {
        // `as` saturates: a quotient past u32::MAX (or infinite) reads u32::MAX.
        Some(free) if per_replica > 0.0 => (free / per_replica).floor().max(0.0) as u32,
        _ => u32::MAX,
    };
    current.saturating_add(fits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deployment whose replicas ask for no CPU (or nearly none) is not bounded by the
    /// node's CPUs; the sum never wraps (it did: `current + u32::MAX` read as `current - 1`, so
    /// such a deployment could never grow).
    #[test]
    fn the_growth_cap_fits_free_cpus_and_never_wraps() {
        assert_eq!(growth_cap(3, Some(2.5), 1.0), 5);
        assert_eq!(growth_cap(3, Some(-1.0), 1.0), 3, "more CPUs used than the node has");
        assert_eq!(growth_cap(3, None, 1.0), u32::MAX);
        assert_eq!(growth_cap(3, Some(2.0), 0.0), u32::MAX);
        assert_eq!(growth_cap(3, Some(2.0), 1e-12), u32::MAX);
        let c = cfg(1, 10, 0.0, 0.0);
        let t0 = Instant::now();
        let mut s = ScaleState::default();
        s.sample(t0, 40.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 3, t0, growth_cap(3, Some(2.0), 0.0)), 10, "grows to max_replicas");
    }

    fn cfg(min: u32, max: u32, up: f64, down: f64) -> Autoscaling {
        sluice_config::AutoscalingConfig {
            min_replicas: Some(min),
            max_replicas: Some(max),
            upscale_delay_s: Some(up),
            downscale_delay_s: Some(down),
            look_back_period_s: Some(10.0),
            ..Default::default()
        }
        .resolve(false)
    }

    #[test]
    fn desired_follows_load_over_target() {
        let c = cfg(1, 10, 0.0, 0.0);
        assert_eq!(desired(&c, 1, 2.0), 1, "at target");
        assert_eq!(desired(&c, 1, 8.0), 4, "4x the target on one replica");
        assert_eq!(desired(&c, 2, 1.0), 1, "half the target on two replicas");
        assert_eq!(desired(&c, 1, 100.0), 10, "capped at max");
        assert_eq!(desired(&c, 3, 0.0), 1, "floored at min");
        let zero = cfg(0, 4, 0.0, 0.0);
        assert_eq!(desired(&zero, 0, 0.0), 0);
        assert_eq!(desired(&zero, 0, 1.0), 1, "a request arriving at zero asks for one");
    }

    /// A downscaling factor below 1 rounds one replica's half back up to one: without the
    /// step Ray's policy takes then, the count never reached `min_replicas` or zero.
    #[test]
    fn a_small_downscaling_factor_still_reaches_the_minimum() {
        let mut c = cfg(0, 10, 0.0, 0.0);
        c.downscaling_factor = 0.5;
        assert_eq!(desired(&c, 1, 0.0), 0, "ceil(1 x 0.5) is 1");
        c.downscaling_factor = 0.1;
        assert_eq!(desired(&c, 9, 0.0), 8, "ceil(9 x 0.9) is 9");
        assert_eq!(desired(&c, 4, 8.0), 4, "at target: no step");
        assert_eq!(desired(&c, 4, 7.9), 4, "ceil(4 x 0.99) is 4: the load asks for 4");
    }

    /// A downscaling factor above 1 steps past what the load needs: never below it, and never
    /// to zero while there is load.
    #[test]
    fn a_large_downscaling_factor_never_asks_below_the_load() {
        let mut c = cfg(0, 10, 0.0, 0.0);
        c.downscaling_factor = 2.0;
        assert_eq!(desired(&c, 1, 0.5), 1, "ceil(1 x (1 - 0.75 x 2)) is 0, with a request in");
        assert_eq!(desired(&c, 4, 3.0), 2, "ceil(4 x (1 - 0.625 x 2)) is -1; the load needs 2");
        assert_eq!(desired(&c, 4, 0.0), 0, "no load");
        assert_eq!(desired(&c, 10, 2.0), 1);
    }

    #[test]
    fn smoothing_factor_damps_steps() {
        let mut c = cfg(1, 100, 0.0, 0.0);
        c.upscaling_factor = 0.5;
        // Ratio 4 on 2 replicas: 2 * (1 + 3 * 0.5) = 5.
        assert_eq!(desired(&c, 2, 16.0), 5);
    }

    #[test]
    fn upscale_waits_for_its_delay() {
        let c = cfg(1, 10, 5.0, 600.0);
        let t0 = Instant::now();
        let mut s = ScaleState::default();
        s.sample(t0, 8.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 1, t0, 10), 1, "the delay starts now");
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(4), 10), 1);
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(5), 10), 4);
    }

    #[test]
    fn a_dip_resets_the_upscale_delay() {
        let c = cfg(1, 10, 5.0, 600.0);
        let t0 = Instant::now();
        let look = Duration::from_secs(1);
        let mut s = ScaleState::default();
        s.sample(t0, 8.0, look);
        decide(&c, &mut s, 1, t0, 10);
        s.sample(t0 + Duration::from_secs(3), 2.0, look);
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(3), 10), 1, "back at target");
        s.sample(t0 + Duration::from_secs(6), 8.0, look);
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(6), 10), 1, "delay restarted");
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(11), 10), 4);
    }

    #[test]
    fn downscale_waits_longer_and_zero_has_its_own_delay() {
        let mut c = cfg(0, 10, 0.0, 60.0);
        c.downscale_to_zero_delay_s = 300.0;
        let t0 = Instant::now();
        let mut s = ScaleState::default();
        s.sample(t0, 2.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 4, t0, 10), 4);
        assert_eq!(decide(&c, &mut s, 4, t0 + Duration::from_secs(59), 10), 4);
        assert_eq!(decide(&c, &mut s, 4, t0 + Duration::from_secs(60), 10), 1);
        let mut s = ScaleState::default();
        s.sample(t0, 0.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 1, t0, 10), 1);
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(299), 10), 1);
        assert_eq!(decide(&c, &mut s, 1, t0 + Duration::from_secs(300), 10), 0);
        // No load on four replicas: to one after the downscale delay, not to zero after the
        // longer delay to zero (nor to zero before the downscale delay when that one is
        // shorter); then from one to zero after its own.
        let mut s = ScaleState::default();
        s.sample(t0, 0.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 4, t0, 10), 4);
        assert_eq!(decide(&c, &mut s, 4, t0 + Duration::from_secs(60), 10), 1);
        c.downscale_to_zero_delay_s = 10.0;
        let mut s = ScaleState::default();
        s.sample(t0, 0.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 4, t0, 10), 4);
        assert_eq!(decide(&c, &mut s, 4, t0 + Duration::from_secs(10), 10), 4);
        assert_eq!(decide(&c, &mut s, 4, t0 + Duration::from_secs(60), 10), 1);
    }

    #[test]
    fn growth_is_capped_by_free_cpus_but_not_below_min() {
        let c = cfg(2, 10, 0.0, 0.0);
        let t0 = Instant::now();
        let mut s = ScaleState::default();
        s.sample(t0, 40.0, Duration::from_secs(10));
        assert_eq!(decide(&c, &mut s, 2, t0, 3), 3);
        assert_eq!(decide(&c, &mut s, 2, t0, 1), 2);
    }

    #[test]
    fn the_average_covers_the_look_back_window_only() {
        let t0 = Instant::now();
        let mut s = ScaleState::default();
        let look = Duration::from_secs(10);
        s.sample(t0, 100.0, look);
        s.sample(t0 + Duration::from_secs(5), 2.0, look);
        assert_eq!(s.average(), 51.0);
        s.sample(t0 + Duration::from_secs(11), 4.0, look);
        assert_eq!(s.average(), 3.0, "the first sample fell out of the window");
    }
}

#[cfg(test)]
mod growth_after_failure {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use sluice_router::{RouteTable, Router};

    use crate::{Cluster, Controller};

    const YAML: &str = "applications:\n  - name: a\n    deployments:\n      - {name: soft, builtin: {softmax: {}}, num_cpus: 0.01, autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 1, upscale_delay_s: 0}}\n";

    /// A controller running `YAML`'s autoscaled deployment `soft`.
    async fn soft() -> Arc<Controller> {
        let routes = Arc::new(Router::new(RouteTable::default()));
        let c = Controller::new(routes, Duration::from_secs(1), Cluster::Local, Default::default());
        let config = sluice_config::parse(YAML, std::path::Path::new("/nowhere/c.yaml")).unwrap();
        c.apply(&config).await.unwrap();
        c
    }

    /// The load is sampled every second between decisions, made every `metrics_interval_s`
    /// (10 s by default): one snapshot per interval read steady light traffic (a request in
    /// flight 1 % of the time) as none, and scaled the deployment to zero while in use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_load_is_sampled_every_second_and_decided_on_the_interval() {
        let c = soft().await;
        let now = Instant::now();
        let t0 = now + Duration::from_secs(3600);
        {
            let mut st = c.lock();
            let m = st.deployments.get_mut("soft").unwrap();
            m.scale_failure = None;
            let s = m.scaling.as_mut().unwrap();
            (s.window, s.last_decision) = (Default::default(), t0);
        }
        let round = |at: Instant| {
            let mut st = c.lock();
            let next = super::step(&mut st, at, Some(2.0), &HashSet::new(), false).1;
            let s = st.deployments["soft"].scaling.as_ref().unwrap();
            (s.window.samples.len(), s.last_decision, next)
        };
        let secs = |n: f64| Duration::from_secs_f64(n);
        assert_eq!(
            round(t0 + secs(1.0)),
            (1, t0, Some(t0 + secs(2.0))),
            "sampled, not decided; back in a second"
        );
        assert_eq!(round(t0 + secs(1.5)).0, 1, "not twice within a second");
        assert_eq!(round(t0 + secs(2.0)).0, 2);
        let (samples, decided, _) = round(t0 + secs(10.0));
        assert_eq!((samples, decided), (3, t0 + secs(10.0)), "decided on the interval, on every sample");
        // While its last change runs (busy), sampled still, not decided: a busy spell longer
        // than the look-back (30 s) left one sample to decide on after it.
        let busy: HashSet<String> = ["soft".to_string()].into();
        for n in 11..=50 {
            let mut st = c.lock();
            let next = super::step(&mut st, t0 + secs(f64::from(n)), Some(2.0), &busy, false).1;
            assert_eq!(next, Some(t0 + secs(f64::from(n + 1))), "back in a second while busy");
        }
        let (samples, decided, _) = round(t0 + secs(51.0));
        assert!(samples >= 30, "{samples} samples in the window after the busy spell");
        assert_eq!(decided, t0 + secs(51.0));
    }

    /// A growth still loading takes the CPUs it grows to: two deployments growing in turn on
    /// an 8-CPU node (each decision seeing only the other's replicas loaded so far) together
    /// passed its CPUs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_growth_still_loading_counts_against_the_nodes_cpus() {
        let routes = Arc::new(Router::new(RouteTable::default()));
        let c = Controller::new(routes, Duration::from_secs(1), Cluster::Local, Default::default());
        let scaling = "autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 1, upscale_delay_s: 0}";
        let yaml = format!(
            "applications:\n  - name: a\n    deployments:\n      - {{name: a, builtin: {{softmax: {{}}}}, num_cpus: 1, {scaling}}}\n      - {{name: b, builtin: {{softmax: {{}}}}, num_cpus: 1, {scaling}}}\n"
        );
        let config = sluice_config::parse(&yaml, std::path::Path::new("/nowhere/c.yaml")).unwrap();
        c.apply(&config).await.unwrap();
        let now = Instant::now();
        let mut st = c.lock();
        let s = st.deployments.get_mut("b").unwrap().scaling.as_mut().unwrap();
        s.window = Default::default();
        s.window.sample(now - Duration::from_secs(1), 7.0, Duration::from_secs(30));
        s.last_decision = now - Duration::from_secs(60);
        // `a` was told to grow to 7 and has loaded none of them yet.
        st.growing.insert(("a".into(), false), 7);
        let busy: HashSet<String> = ["a".to_string()].into();
        let jobs = super::step(&mut st, now, Some(8.0), &busy, false).0;
        let b: Vec<usize> = jobs.iter().filter(|j| j.deployment == "b").map(|j| j.to).collect();
        assert!(b.iter().all(|&to| to <= 1), "b grew to {b:?} with 7 of 8 CPUs promised to a");
        st.growing.clear();
        let later = now + Duration::from_secs(60);
        let s = st.deployments.get_mut("b").unwrap().scaling.as_mut().unwrap();
        s.window = Default::default();
        s.window.sample(later - Duration::from_secs(1), 7.0, Duration::from_secs(30));
        s.last_decision = now - Duration::from_secs(60);
        let jobs = super::step(&mut st, later, Some(8.0), &busy, false).0;
        assert!(jobs.iter().any(|j| j.deployment == "b" && j.to > 1), "with the CPUs free, b grows");
    }

    /// A primary whose last growth failed (a model that no longer loads) grows again only at
    /// the failure's retry time: from zero with a request waiting, each failure woke the loop
    /// for the next try, as fast as the load failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_growth_that_failed_waits_for_its_retry_time() {
        let c = soft().await;
        let yaml = YAML;
        let now = Instant::now();
        let growth = |failed_at: Option<Instant>| {
            let mut st = c.lock();
            let m = st.deployments.get_mut("soft").unwrap();
            m.scale_failure =
                failed_at.map(|at| crate::state::ScaleFailure { message: "no".into(), at, failures: 1 });
            let s = m.scaling.as_mut().unwrap();
            s.window = Default::default();
            s.window.sample(now - Duration::from_secs(1), 6.0, Duration::from_secs(30));
            s.last_decision = now - Duration::from_secs(60);
            let jobs = super::step(&mut st, now, Some(2.0), &HashSet::new(), false).0;
            jobs.iter().filter(|j| !j.canary).map(|j| j.to).collect::<Vec<_>>()
        };
        assert!(matches!(growth(None)[..], [n] if n > 1), "a load of 6 grows it");
        assert!(growth(Some(now)).is_empty(), "a failed growth tried again at once");
        assert!(!growth(Some(now - Duration::from_secs(60))).is_empty(), "tried again at its retry time");

        // An apply that keeps the version (another application deployed) keeps its failure and
        // the time it was woken from zero: status said "starting from zero" anew.
        {
            let mut st = c.lock();
            let m = st.deployments.get_mut("soft").unwrap();
            m.scale_failure = Some(crate::state::ScaleFailure { message: "no".into(), at: now, failures: 2 });
            m.woken_at = Some(now);
        }
        let more = format!(
            "{yaml}  - name: b\n    deployments:\n      - {{name: other, builtin: {{softmax: {{}}}}}}\n"
        );
        c.apply(&sluice_config::parse(&more, std::path::Path::new("/nowhere/c.yaml")).unwrap())
            .await
            .unwrap();
        let st = c.lock();
        let m = &st.deployments["soft"];
        assert_eq!(m.scale_failure.as_ref().map(|f| f.failures), Some(2));
        assert_eq!(m.woken_at, Some(now));
    }
}
