//! Requests held by proxies on other nodes (`proxy_location: EveryNode`). A proxy queues and
//! sends requests to the replicas itself, so the controller's own deployments never see them:
//! each proxy reports, with every poll of the route table (and at once when a request waits
//! for a deployment at zero replicas), how many requests each version holds, and the
//! autoscaler adds the fresh reports to the head's own counts. Load that reaches a cluster
//! through a worker's proxy then scales a deployment, from zero too, as load at the head does.
//! The reports also say which route table each proxy has applied and what its copies of
//! versions swapped out still hold: a retired version's replicas stop once the proxies have
//! let go of it (`proxies_let_go`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rollout::ProxyServed;

/// A report older than this no longer counts: its proxy stopped reporting (gone, or cut off).
/// Proxies report every `--poll-s` (0.5 s by default).
pub const REPORT_TTL: Duration = Duration::from_secs(3);

/// How long a proxy waits for the controller's answer to one request (its routes, its report).
pub const PROXY_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long past its TTL a report still says which table its proxy has applied: a proxy whose
/// poll is slow (its two requests each up to [`PROXY_REQUEST_TIMEOUT`]) may still route by the
/// table it last said, and a retired version's drain waits for it meanwhile.
const APPLIED_OUTLIVES: Duration = Duration::from_secs(10);

/// The most proxies whose reports are kept at once; beyond it the oldest report goes.
const MOST_PROXIES: usize = 1024;

/// What one proxy holds now (`POST /api/sluice/demand`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandReport {
    /// The proxy (its address): a newer report from it replaces its older one.
    pub proxy: String,
    /// The versions holding a request at the proxy; an empty list from a proxy that does not
    /// say what it has applied clears its earlier report.
    pub versions: Vec<VersionDemand>,
    /// How long the report counts unless renewed (a proxy polling rarely sends more): absent,
    /// [`REPORT_TTL`]; held to 1 s–60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<f64>,
    /// The controller's route-table generation the proxy has applied (its snapshot's
    /// `generation`): a proxy that says it reports with every poll, holding something or
    /// not, and a retired version's drain waits until each has applied the table without it.
    /// Absent (an older proxy): the drain gives it [`PROXIES_FOLLOW`](crate::cluster::ray::PROXIES_FOLLOW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// What the proxy's copies of versions in a traffic split (a canary's and its primary's)
    /// have answered since they started: a canary rollout's gates judge them with the head's
    /// own. Absent (an older proxy): none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served: Vec<VersionServed>,
}

/// What one version's copy at a proxy has answered since it started (counted as the head
/// counts its own requests, [`crate::rollout::Counters`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionServed {
    pub model: String,
    pub version: String,
    /// Which copy: another one (started again) counts from 0.
    pub copy: u64,
    /// How long the copy has run, in milliseconds: one that started after a rollout interval
    /// began counts whole in it.
    pub age_ms: u64,
    pub success: u64,
    /// Server-side failures (internal errors and deadlines; not bad requests or overload).
    pub failed: u64,
    /// The latency buckets that are not empty, as (bucket, count).
    pub latencies: Vec<(usize, u64)>,
}

impl VersionServed {
    /// `model` `version`'s counters as [`VersionServed`] carries them, for copy `copy` of
    /// age `age`.
    pub fn new(
        model: &str,
        version: &str,
        (copy, age): (u64, Duration),
        counters: &crate::rollout::Counters,
    ) -> Self {
        Self {
            model: model.into(),
            version: version.into(),
            copy,
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            success: counters.success,
            failed: counters.failed,
            latencies: counters.latencies.iter().copied().enumerate().filter(|&(_, n)| n > 0).collect(),
        }
    }
}

/// One version's requests at a proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionDemand {
    pub model: String,
    pub version: String,
    /// Requests inside the version at the proxy: waiting for a replica, or sent to one.
    pub in_system: u64,
    /// Of those, the ones waiting for a replica.
    pub queued: u64,
    /// Held by a copy the proxy's table no longer routes to (the version was swapped out or
    /// deleted): its requests still go to the version's replicas, which the controller keeps
    /// until none is left there (within the drain's grace). Not counted by the autoscaler.
    /// Absent (an older proxy): false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// The last report of each proxy; a handle, cheap to clone (a retired version's drain reads
/// it from a task of its own).
#[derive(Debug, Default, Clone)]
pub(crate) struct RemoteDemand(Arc<Mutex<Reports>>);

/// By proxy, its last report.
type Reports = HashMap<String, Report>;

#[derive(Debug)]
struct Report {
    /// Until when it counts.
    until: Instant,
    versions: Vec<VersionDemand>,
    applied: Option<u64>,
    served: Vec<VersionServed>,
    /// When it came.
    received: Instant,
}

impl Report {
    /// Until when it is kept: what it says it has applied counts for [`APPLIED_OUTLIVES`] past
    /// its TTL (a slow poll), so it is not dropped before then by another proxy's report.
    fn kept_until(&self) -> Instant {
        if self.applied.is_some() { self.until + APPLIED_OUTLIVES } else { self.until }
    }
}

impl RemoteDemand {
    fn reports(&self) -> std::sync::MutexGuard<'_, Reports> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `report` as its proxy's latest (dropping reports that have expired).
    pub fn record(&self, report: DemandReport, now: Instant) {
        let mut reports = self.reports();
        reports.retain(|_, r| now < r.kept_until());
        // An older proxy's empty report clears its last one; a newer proxy's is kept for what
        // it has applied.
        if report.versions.is_empty() && report.applied.is_none() && report.served.is_empty() {
            reports.remove(&report.proxy);
            return;
        }
        if reports.len() >= MOST_PROXIES && !reports.contains_key(&report.proxy) {
            let soonest = reports.iter().min_by_key(|(_, r)| r.kept_until()).map(|(p, _)| p.clone());
            if let Some(p) = soonest {
                reports.remove(&p);
            }
        }
        let ttl = report
            .ttl_s
            .filter(|t| t.is_finite())
            .map_or(REPORT_TTL, |t| Duration::from_secs_f64(t.clamp(1.0, 60.0)));
        let kept = Report {
            until: now + ttl,
            versions: report.versions,
            applied: report.applied,
            served: report.served,
            received: now,
        };
        reports.insert(report.proxy, kept);
    }

    /// Whether every proxy that says which table it has applied has applied `generation` or a
    /// later one, by its last report, for [`APPLIED_OUTLIVES`] past its TTL (a slow poll).
    pub fn followed(&self, generation: u64, now: Instant) -> bool {
        self.reports().values().all(|r| now >= r.kept_until() || r.applied.is_none_or(|a| a >= generation))
    }

    /// What proxies that do not say which table they have applied (older ones) hold of
    /// `model` `version` at copies they route to: one that has not followed yet, where nothing
    /// of that name serves any more. (Newer proxies are followed by [`RemoteDemand::followed`]:
    /// what they route to may be a successor deployed under the same name meanwhile.)
    pub fn routed_by_older(&self, model: &str, version: &str, now: Instant) -> usize {
        let reports = self.reports();
        let older = reports.values().filter(|r| now < r.until && r.applied.is_none());
        older
            .flat_map(|r| &r.versions)
            .filter(|v| v.model == model && v.version == version && !v.retired)
            .map(|v| usize::try_from(v.in_system).unwrap_or(usize::MAX))
            .fold(0, usize::saturating_add)
    }

    /// (in system, queued) for `model` `version` over the reports still counting, at the
    /// copies proxies route to.
    pub fn of(&self, model: &str, version: &str, now: Instant) -> (usize, usize) {
        self.sum(model, version, false, now)
    }

    /// The requests proxies' retired copies of `model` `version` hold ([`VersionDemand::retired`]).
    pub fn retired(&self, model: &str, version: &str, now: Instant) -> usize {
        self.sum(model, version, true, now).0
    }

    /// By proxy, what its copy of `model` `version` has answered, by the reports still
    /// counting ([`crate::rollout::Counters::proxies`]).
    pub fn served(&self, model: &str, version: &str, now: Instant) -> BTreeMap<String, ProxyServed> {
        let mut served = BTreeMap::new();
        for (proxy, r) in self.reports().iter().filter(|(_, r)| now < r.until) {
            if let Some(v) = r.served.iter().find(|v| v.model == model && v.version == version) {
                let age = Duration::from_millis(v.age_ms);
                let p = ProxyServed {
                    copy: v.copy,
                    started: r.received.checked_sub(age),
                    success: v.success,
                    failed: v.failed,
                    latencies: v.latencies.clone(),
                };
                served.insert(proxy.clone(), p);
            }
        }
        served
    }

    fn sum(&self, model: &str, version: &str, retired: bool, now: Instant) -> (usize, usize) {
        let mut sum = (0u64, 0u64);
        for r in self.reports().values() {
            if now >= r.until {
                continue;
            }
            for v in
                r.versions.iter().filter(|v| v.model == model && v.version == version && v.retired == retired)
            {
                sum.0 = sum.0.saturating_add(v.in_system);
                sum.1 = sum.1.saturating_add(v.queued);
            }
        }
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        (clamp(sum.0), clamp(sum.1))
    }
}

/// How often a retired version's drain looks again at what proxies' retired copies hold.
const RETIRED_CHECK: Duration = Duration::from_millis(100);

/// A retired version's place in the route table, for [`proxies_let_go`].
pub(crate) struct Retiring<'a> {
    pub model: &'a str,
    pub version: &'a str,
    /// The route table's generation without it (or a later one).
    pub generation: u64,
    /// No successor of the same version name serves: a copy a proxy still routes to is one
    /// that has not followed.
    pub unserved: bool,
}

/// Resolves once proxies have let go of a retired version: after `followed` (by when an older
/// proxy, which does not say what it has applied, has polled the route table without it and
/// reported what its copy of it still holds), once every proxy reporting has applied the
/// table without it, no report still counting says a retired copy of it holds a request,
/// nor, where it is `unserved`, a copy the proxy still routes to. Its replicas are stopped
/// after this: a proxy's requests queued for it, sent to them after its replicas were told to
/// stop, were refused ("replica failed; retry"). A proxy that stops reporting stops counting
/// after its report's TTL. The caller bounds the wait (the drain's grace).
pub(crate) async fn proxies_let_go(
    remote: &RemoteDemand,
    retiring: Retiring<'_>,
    followed: tokio::time::Instant,
) {
    tokio::time::sleep_until(followed).await;
    let Retiring { model, version, generation, unserved } = retiring;
    let held = || {
        let now = Instant::now();
        let routed = if unserved { remote.routed_by_older(model, version, now) } else { 0 };
        !remote.followed(generation, now) || remote.retired(model, version, now) + routed > 0
    };
    while held() {
        tokio::time::sleep(RETIRED_CHECK).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Counters;

    fn report(proxy: &str, in_system: u64, queued: u64) -> DemandReport {
        DemandReport {
            proxy: proxy.into(),
            versions: vec![VersionDemand {
                model: "m".into(),
                version: "1".into(),
                in_system,
                queued,
                retired: false,
            }],
            ttl_s: None,
            applied: None,
            served: vec![],
        }
    }

    /// A report of nothing held: an older proxy's (clears its last one), or a newer proxy's
    /// with the table it has applied.
    fn empty(proxy: &str, applied: Option<u64>) -> DemandReport {
        DemandReport { proxy: proxy.into(), versions: vec![], ttl_s: None, applied, served: vec![] }
    }

    /// Proxies' reports add up; a newer one replaces its proxy's older one, an empty one clears
    /// it, and one not renewed within the TTL stops counting.
    #[test]
    fn reports_add_up_replace_and_expire() {
        let t = Instant::now();
        let d = RemoteDemand::default();
        d.record(report("a:8000", 3, 1), t);
        d.record(report("b:8000", 2, 2), t);
        assert_eq!(d.of("m", "1", t), (5, 3));
        assert_eq!(d.of("m", "2", t), (0, 0));
        d.record(report("a:8000", 1, 0), t);
        assert_eq!(d.of("m", "1", t), (3, 2));
        d.record(empty("b:8000", None), t);
        assert_eq!(d.of("m", "1", t), (1, 0));
        assert_eq!(d.of("m", "1", t + REPORT_TTL), (0, 0), "expired");
        // A proxy that polls every 5 s says its reports live 15 s.
        d.record(DemandReport { ttl_s: Some(15.0), ..report("c:8000", 2, 0) }, t);
        assert_eq!(d.of("m", "1", t + Duration::from_secs(10)), (2, 0));
        assert_eq!(d.of("m", "1", t + Duration::from_secs(15)), (0, 0));
    }

    /// What proxies' copies answered is read by proxy, with when each copy started (the
    /// report's arrival less its age), and stops counting with its report; a proxy's newer
    /// report replaces what it said before.
    #[test]
    fn what_proxies_served_is_read_by_proxy_and_expires() {
        let t = Instant::now();
        let d = RemoteDemand::default();
        let served = |proxy: &str, success, age_ms| DemandReport {
            served: vec![VersionServed {
                model: "m".into(),
                version: "1".into(),
                copy: 7,
                age_ms,
                success,
                failed: 1,
                latencies: vec![(2, success + 1)],
            }],
            ..empty(proxy, Some(1))
        };
        d.record(served("a:8000", 5, 2_000), t);
        d.record(served("b:8000", 3, 0), t);
        let read = d.served("m", "1", t);
        assert_eq!(read.keys().collect::<Vec<_>>(), ["a:8000", "b:8000"]);
        let a = &read["a:8000"];
        let age = a.started.map(|s| t.duration_since(s));
        assert_eq!(
            (a.copy, age, a.success, a.failed, &a.latencies[..]),
            (7, Some(Duration::from_secs(2)), 5, 1, &[(2, 6)][..])
        );
        assert!(d.served("m", "2", t).is_empty());
        d.record(served("a:8000", 6, 2_500), t);
        assert_eq!(d.served("m", "1", t)["a:8000"].success, 6);
        assert!(d.served("m", "1", t + REPORT_TTL).is_empty(), "expired");
        // The counters of a deployment carried whole, the empty buckets left out.
        let counters = Counters { success: 3, failed: 1, latencies: vec![0, 2, 0, 2], ..Counters::default() };
        let v = VersionServed::new("m", "1", (7, Duration::from_millis(1500)), &counters);
        assert_eq!((v.copy, v.age_ms, &v.latencies[..]), (7, 1500, &[(1, 2), (3, 2)][..]));
    }

    /// What a proxy's retired copy holds counts apart: not as load on the version (the
    /// autoscaler sizes those that serve), but for the retired version's drain; a report
    /// without the field (an older proxy) is of copies it routes to.
    #[test]
    fn retired_copies_count_apart() {
        let t = Instant::now();
        let d = RemoteDemand::default();
        let mut r = report("a:8000", 3, 1);
        r.versions.push(VersionDemand { retired: true, ..r.versions[0].clone() });
        r.versions[1].in_system = 5;
        d.record(r, t);
        assert_eq!(d.of("m", "1", t), (3, 1));
        assert_eq!(d.retired("m", "1", t), 5);
        assert_eq!(d.retired("m", "2", t), 0);
        let old: DemandReport = serde_json::from_str(
            r#"{"proxy": "b:8000", "versions": [{"model": "m", "version": "1", "in_system": 2, "queued": 0}]}"#,
        )
        .unwrap();
        assert!(!old.versions[0].retired && old.applied.is_none());
        d.record(old, t);
        assert_eq!((d.of("m", "1", t), d.retired("m", "1", t)), ((5, 1), 5));
        let sent = serde_json::to_value(report("c:8000", 1, 0)).unwrap();
        assert!(sent["versions"][0].get("retired").is_none(), "left out when false: {sent}");
        assert!(sent.get("applied").is_none(), "left out when unknown: {sent}");
    }

    /// A proxy that says which table it has applied is kept with nothing held, and is
    /// followed once it has applied the one asked for or a later one, or once its report no
    /// longer counts (10 s past its TTL); an older proxy (which does not say) is followed by
    /// the time alone. What a newer proxy routes to is not read as not followed: a successor
    /// may have been deployed under the same name.
    #[test]
    fn proxies_follow_by_the_table_they_applied() {
        let t = Instant::now();
        let d = RemoteDemand::default();
        assert!(d.followed(7, t), "no proxy");
        d.record(empty("old:8000", None), t);
        d.record(report("old:8000", 1, 0), t);
        assert!(d.followed(7, t), "an older proxy does not say");
        d.record(empty("a:8000", Some(6)), t);
        assert!(!d.followed(7, t) && d.followed(6, t));
        // A slow poll (two requests of up to 5 s each) is waited for past the report's TTL.
        assert!(!d.followed(7, t + REPORT_TTL), "a slow poll");
        assert!(d.followed(7, t + REPORT_TTL + APPLIED_OUTLIVES), "its report no longer counts");
        d.record(empty("a:8000", Some(8)), t);
        assert!(d.followed(7, t));
        d.record(DemandReport { applied: Some(8), ..report("a:8000", 2, 0) }, t);
        assert_eq!(d.routed_by_older("m", "1", t), 1, "the older proxy's only");
    }

    /// Another proxy's report, past the first one's TTL, keeps what the first said it applied:
    /// it was dropped with the reports that had lapsed, and its proxy read as followed at once.
    #[test]
    fn a_slow_poll_is_waited_for_while_other_proxies_report() {
        let t = Instant::now();
        let d = RemoteDemand::default();
        d.record(empty("a:8000", Some(6)), t);
        d.record(empty("b:8000", Some(7)), t + REPORT_TTL);
        assert!(!d.followed(7, t + REPORT_TTL), "a slow poll, after another proxy reported");
        d.record(empty("b:8000", Some(7)), t + REPORT_TTL + APPLIED_OUTLIVES);
        assert!(d.followed(7, t + REPORT_TTL + APPLIED_OUTLIVES), "its report no longer counts");
    }

    /// A retired version's drain waits for the proxies to follow, then for their retired
    /// copies' requests to be done.
    #[tokio::test]
    async fn the_drain_waits_for_proxies_retired_copies() {
        let d = RemoteDemand::default();
        let start = tokio::time::Instant::now();
        let follow = Duration::from_millis(200);
        let retiring = |unserved| Retiring { model: "m", version: "1", generation: 5, unserved };
        // Nothing reported: done once the proxies have had the time to follow.
        proxies_let_go(&d, retiring(true), start + follow).await;
        assert!(start.elapsed() >= follow);
        let mut held = report("a:8000", 2, 1);
        held.versions[0].retired = true;
        d.record(held, Instant::now());
        let let_go = |unserved| {
            let d = d.clone();
            tokio::spawn(
                async move { proxies_let_go(&d, retiring(unserved), tokio::time::Instant::now()).await },
            )
        };
        let waiting = let_go(false);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!waiting.is_finished(), "a proxy's retired copy still holds requests");
        // The same proxy's next report: its copy is done.
        d.record(empty("a:8000", None), Instant::now());
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        // A proxy that has not followed yet reports the version as one it routes to: waited
        // for where the head no longer serves it, not where a successor of the same name does.
        d.record(report("b:8000", 1, 0), Instant::now());
        let successor = let_go(false);
        let unserved = let_go(true);
        tokio::time::timeout(Duration::from_secs(5), successor).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!unserved.is_finished(), "a proxy that has not followed still holds requests");
        d.record(empty("b:8000", None), Instant::now());
        tokio::time::timeout(Duration::from_secs(5), unserved).await.unwrap().unwrap();
        // A proxy that holds nothing and has not applied the table without it yet.
        d.record(empty("c:8000", Some(4)), Instant::now());
        let behind = let_go(false);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!behind.is_finished(), "a proxy that has not applied the table");
        d.record(empty("c:8000", Some(5)), Instant::now());
        tokio::time::timeout(Duration::from_secs(5), behind).await.unwrap().unwrap();
    }
}
