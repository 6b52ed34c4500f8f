//! `GET /api/sluice/metrics/targets`: where Prometheus finds the metrics the head does not
//! serve, in the form of its HTTP service discovery (`http_sd_configs`). On Ray, each replica
//! process serves its queue, model-call, batch and multiplex series on its gRPC address
//! (`GET /metrics`, [`crate::metrics::render_replica`]), and each proxy on another node serves
//! the requests it took on its REST address. Running in this process only, the list is empty:
//! the head's own `/metrics` has everything.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use sluice_controller::Status;

/// One group of Prometheus's HTTP service discovery: one target and the labels its series get.
#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct Target {
    targets: [String; 1],
    labels: Labels,
}

/// Labels named apart from the series' own (`model`, `version`, `replica`), which a target
/// label of the same name would rename.
#[derive(Debug, Serialize, PartialEq)]
struct Labels {
    /// `replica` or `proxy`.
    sluice_role: &'static str,
    /// The Ray actor's name.
    sluice_actor: String,
    sluice_node_ip: String,
}

/// The targets `status` lists: every replica in another process that passed its first health
/// check (one still starting does not serve yet), every proxy that listens.
pub(crate) fn targets(status: &Status) -> Vec<Target> {
    let target = |addr: &str, sluice_role, sluice_actor: &str, sluice_node_ip: &str| Target {
        targets: [addr.to_string()],
        labels: Labels {
            sluice_role,
            sluice_actor: sluice_actor.to_string(),
            sluice_node_ip: sluice_node_ip.to_string(),
        },
    };
    let deployments = status.applications.values().flat_map(|a| a.deployments.values());
    let replicas = deployments.flat_map(|d| &d.versions).flat_map(|v| &v.nodes).filter(|n| n.ready);
    let mut out: Vec<Target> = replicas.map(|n| target(&n.addr, "replica", &n.name, &n.node_ip)).collect();
    let proxies = status.proxies.iter().filter_map(|p| Some((p.addr.as_deref()?, p)));
    out.extend(proxies.map(|(addr, p)| target(addr, "proxy", &p.name, &p.node_ip)));
    // A replica listed under two deployments' statuses (never expected) is scraped once.
    out.sort_by(|a, b| a.targets.cmp(&b.targets));
    out.dedup_by(|a, b| a.targets == b.targets);
    out
}

pub(super) async fn metrics_targets(State(s): State<super::AdminState>) -> Json<Vec<Target>> {
    Json(targets(&s.status()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_replicas_and_listening_proxies_are_listed() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "applications": {"a": {"status": "RUNNING", "deployments": {"m": {
                "status": "HEALTHY",
                "versions": [{
                    "version": "1", "weight": 100, "replicas": 2, "ready_replicas": 1,
                    "queued": 0, "in_flight": 0, "canary": false,
                    "nodes": [
                        {"name": "r-0", "node_id": "n1", "node_ip": "10.0.0.1", "pid": 7, "addr": "10.0.0.1:4100", "ready": true},
                        {"name": "r-1", "node_id": "n2", "node_ip": "10.0.0.2", "pid": 8, "addr": "10.0.0.2:4100", "ready": false}
                    ]
                }]
            }}}},
            "events": [],
            "proxies": [
                {"name": "p-n2", "node_id": "n2", "node_ip": "10.0.0.2", "addr": "10.0.0.2:8000"},
                {"name": "p-n3", "node_id": "n3", "node_ip": "10.0.0.3", "addr": null}
            ]
        }))
        .unwrap();
        let json = serde_json::to_value(targets(&status)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"targets": ["10.0.0.1:4100"], "labels": {"sluice_role": "replica", "sluice_actor": "r-0", "sluice_node_ip": "10.0.0.1"}},
                {"targets": ["10.0.0.2:8000"], "labels": {"sluice_role": "proxy", "sluice_actor": "p-n2", "sluice_node_ip": "10.0.0.2"}}
            ])
        );
    }
}
