//! Requests held by proxies on other nodes (`proxy_location: EveryNode`). A proxy queues and
//! sends requests to the replicas itself, so the controller's own deployments never see them:
//! each proxy reports, with every poll of the route table (and at once when a request waits
//! for a deployment at zero replicas), how many requests each version holds, and the
//! autoscaler adds the fresh reports to the head's own counts. Load that reaches a cluster
//! through a worker's proxy then scales a deployment, from zero too, as load at the head does.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A report older than this no longer counts: its proxy stopped reporting (gone, or cut off).
/// Proxies report every `--poll-s` (0.5 s by default).
pub const REPORT_TTL: Duration = Duration::from_secs(3);

/// The most proxies whose reports are kept at once; beyond it the oldest report goes.
const MOST_PROXIES: usize = 1024;

/// What one proxy holds now (`POST /api/sluice/demand`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DemandReport {
    /// The proxy (its address): a newer report from it replaces its older one.
    pub proxy: String,
    /// The versions holding a request at the proxy; an empty list clears its earlier report.
    pub versions: Vec<VersionDemand>,
    /// How long the report counts unless renewed (a proxy polling rarely sends more): absent,
    /// [`REPORT_TTL`]; held to 1 s–60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<f64>,
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
}

/// The last report of each proxy.
#[derive(Debug, Default)]
pub(crate) struct RemoteDemand {
    /// By proxy: until when its report counts, and the report.
    reports: HashMap<String, (Instant, Vec<VersionDemand>)>,
}

impl RemoteDemand {
    /// Keeps `report` as its proxy's latest (dropping reports that have expired).
    pub fn record(&mut self, report: DemandReport, now: Instant) {
        self.reports.retain(|_, (until, _)| now < *until);
        if report.versions.is_empty() {
            self.reports.remove(&report.proxy);
            return;
        }
        if self.reports.len() >= MOST_PROXIES && !self.reports.contains_key(&report.proxy) {
            let soonest = self.reports.iter().min_by_key(|(_, (until, _))| *until).map(|(p, _)| p.clone());
            if let Some(p) = soonest {
                self.reports.remove(&p);
            }
        }
        let ttl = report
            .ttl_s
            .filter(|t| t.is_finite())
            .map_or(REPORT_TTL, |t| Duration::from_secs_f64(t.clamp(1.0, 60.0)));
        self.reports.insert(report.proxy, (now + ttl, report.versions));
    }

    /// (in system, queued) for `model` `version` over the reports still counting.
    pub fn of(&self, model: &str, version: &str, now: Instant) -> (usize, usize) {
        let mut sum = (0u64, 0u64);
        for (until, versions) in self.reports.values() {
            if now >= *until {
                continue;
            }
            for v in versions.iter().filter(|v| v.model == model && v.version == version) {
                sum.0 = sum.0.saturating_add(v.in_system);
                sum.1 = sum.1.saturating_add(v.queued);
            }
        }
        let clamp = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        (clamp(sum.0), clamp(sum.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(proxy: &str, in_system: u64, queued: u64) -> DemandReport {
        DemandReport {
            proxy: proxy.into(),
            versions: vec![VersionDemand { model: "m".into(), version: "1".into(), in_system, queued }],
            ttl_s: None,
        }
    }

    /// Proxies' reports add up; a newer one replaces its proxy's older one, an empty one clears
    /// it, and one not renewed within the TTL stops counting.
    #[test]
    fn reports_add_up_replace_and_expire() {
        let t = Instant::now();
        let mut d = RemoteDemand::default();
        d.record(report("a:8000", 3, 1), t);
        d.record(report("b:8000", 2, 2), t);
        assert_eq!(d.of("m", "1", t), (5, 3));
        assert_eq!(d.of("m", "2", t), (0, 0));
        d.record(report("a:8000", 1, 0), t);
        assert_eq!(d.of("m", "1", t), (3, 2));
        d.record(DemandReport { proxy: "b:8000".into(), versions: vec![], ttl_s: None }, t);
        assert_eq!(d.of("m", "1", t), (1, 0));
        assert_eq!(d.of("m", "1", t + REPORT_TTL), (0, 0), "expired");
        // A proxy that polls every 5 s says its reports live 15 s.
        d.record(DemandReport { ttl_s: Some(15.0), ..report("c:8000", 2, 0) }, t);
        assert_eq!(d.of("m", "1", t + Duration::from_secs(10)), (2, 0));
        assert_eq!(d.of("m", "1", t + Duration::from_secs(15)), (0, 0));
    }
}
