//! Sluice's status in the shape of Ray's `ServeInstanceDetails` (ray/serve/schema.py, Ray 2.60):
//! what `GET /api/serve/applications/` answers, and what `serve status`, `serve config` and
//! KubeRay read. Ray's models forbid unknown fields at most levels, so only Ray's fields appear;
//! each required one is always there.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};
use sluice_controller::{ApplicationState, ApplicationStatus, DeploymentState, DeploymentStatus, Status};

use crate::node::LocalNode;

/// Where this server's frontends listen, for `http_options` and `grpc_options`.
#[derive(Debug, Clone)]
pub struct Frontends {
    pub http_host: String,
    pub http_port: u16,
    /// None when gRPC is off.
    pub grpc_port: Option<u16>,
    /// Where the server's config runs frontends (Ray's words: `HeadOnly`, `EveryNode`).
    pub proxy_location: sluice_config::ProxyLocation,
}

/// `ServeInstanceDetails`.
#[derive(Debug, Serialize)]
pub struct InstanceDetails {
    pub controller_info: ActorDetails,
    pub proxy_location: &'static str,
    pub http_options: Value,
    pub grpc_options: Value,
    pub proxies: BTreeMap<String, ProxyDetails>,
    pub applications: BTreeMap<String, ApplicationDetails>,
    pub target_capacity: Option<f64>,
}

/// `ServeActorDetails`: where a Serve actor runs; here, this process.
#[derive(Debug, Serialize)]
pub struct ActorDetails {
    pub node_id: String,
    pub node_ip: String,
    pub actor_name: String,
}

/// `ProxyDetails`: this process's REST frontend, or a proxy on another node.
#[derive(Debug, Serialize)]
pub struct ProxyDetails {
    #[serde(flatten)]
    pub actor: ActorDetails,
    /// `HEALTHY`; `DRAINING` once shutdown began; `STARTING` for one not listening yet.
    pub status: &'static str,
}

/// `ApplicationDetails`.
#[derive(Debug, Serialize)]
pub struct ApplicationDetails {
    pub name: String,
    /// Where the application answers: its pipeline's JSON route, else its model's OIP path.
    pub route_prefix: Option<String>,
    pub docs_path: Option<String>,
    pub status: ApplicationState,
    pub message: String,
    pub last_deployed_time_s: f64,
    /// The application's entry as a Ray client submitted it; None for one from a Sluice config.
    pub deployed_app_config: Option<Value>,
    pub source: &'static str,
    pub deployments: BTreeMap<String, DeploymentDetails>,
    pub external_scaler_enabled: bool,
}

/// `DeploymentDetails`.
#[derive(Debug, Serialize)]
pub struct DeploymentDetails {
    pub name: String,
    pub status: DeploymentState,
    pub status_trigger: &'static str,
    pub message: String,
    pub deployment_config: Value,
    pub target_num_replicas: usize,
    pub required_resources: Value,
    pub replicas: Vec<ReplicaDetails>,
}

/// `ReplicaDetails`.
#[derive(Debug, Serialize)]
pub struct ReplicaDetails {
    pub replica_id: String,
    pub state: sluice_controller::ReplicaState,
    pub pid: Option<u32>,
    pub node_id: Option<String>,
    pub node_ip: Option<String>,
    pub actor_name: String,
    pub start_time_s: f64,
}

/// Which applications a GET asks for (`?api_type=`); every Sluice application is declarative
/// (deployed from a config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiType {
    All,
    Declarative,
    Imperative,
}

impl ApiType {
    /// Ray's check and message for the query value.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::to_lowercase).as_deref() {
            None | Some("") => Ok(Self::All),
            Some("declarative") => Ok(Self::Declarative),
            Some("imperative") => Ok(Self::Imperative),
            Some(_) => Err(format!(
                "Invalid 'api_type' value: '{}'. Must be one of: imperative, declarative",
                value.unwrap_or_default()
            )),
        }
    }
}

/// `status` (local replicas already filled in with `node`) in Ray's shape. `submitted`: the
/// Ray application entries last deployed, by name; `draining`: shutdown has begun.
pub fn instance_details(
    status: &Status,
    submitted: &BTreeMap<String, Value>,
    node: &LocalNode,
    frontends: &Frontends,
    api_type: ApiType,
    draining: bool,
) -> InstanceDetails {
    let actor = |name: &str| ActorDetails {
        node_id: node.id.clone(),
        node_ip: node.ip.clone(),
        actor_name: name.into(),
    };
    let proxy =
        ProxyDetails { actor: actor("sluice-proxy"), status: if draining { "DRAINING" } else { "HEALTHY" } };
    let mut proxies = BTreeMap::from([(node.id.clone(), proxy)]);
    // Proxies on other nodes (`proxy_location: EveryNode`): healthy once they listen.
    proxies.extend(status.proxies.iter().map(|p| {
        let actor = ActorDetails {
            node_id: p.node_id.clone(),
            node_ip: p.node_ip.clone(),
            actor_name: p.name.clone(),
        };
        let state = if p.addr.is_some() { "HEALTHY" } else { "STARTING" };
        (p.node_id.clone(), ProxyDetails { actor, status: state })
    }));
    let applications = match api_type {
        ApiType::Imperative => BTreeMap::new(),
        ApiType::All | ApiType::Declarative => status
            .applications
            .iter()
            .map(|(name, app)| (name.clone(), application(name, app, submitted.get(name))))
            .collect(),
    };
    InstanceDetails {
        controller_info: actor("sluice-controller"),
        proxy_location: match frontends.proxy_location {
            sluice_config::ProxyLocation::HeadOnly => "HeadOnly",
            sluice_config::ProxyLocation::EveryNode => "EveryNode",
        },
        http_options: json!({"host": frontends.http_host, "port": frontends.http_port}),
        grpc_options: json!({"port": frontends.grpc_port.unwrap_or(0), "grpc_servicer_functions": []}),
        proxies,
        applications,
        target_capacity: None,
    }
}

fn application(name: &str, app: &ApplicationStatus, submitted: Option<&Value>) -> ApplicationDetails {
    let mut message = app.message.clone();
    if !app.ignored.is_empty() {
        let fields: Vec<&str> = app.ignored.iter().map(|i| i.split(':').next().unwrap_or(i)).collect();
        let note = format!("Sluice ignores {} (`sluice status` says why)", fields.join(", "));
        message = if message.is_empty() { note } else { format!("{message}\n{note}") };
    }
    // A single model answers under its OIP path; a pipeline at its JSON route.
    let route_prefix = app.route_prefix.clone().or_else(|| match app.deployments.keys().next() {
        Some(model) if app.deployments.len() == 1 => Some(format!("/v2/models/{model}")),
        _ => None,
    });
    ApplicationDetails {
        name: name.to_string(),
        route_prefix,
        docs_path: None,
        status: app.status,
        message,
        last_deployed_time_s: app.last_deployed_time_s,
        deployed_app_config: submitted.cloned(),
        source: "declarative",
        deployments: app.deployments.iter().map(|(n, d)| (n.clone(), deployment(n, d))).collect(),
        external_scaler_enabled: false,
    }
}

fn deployment(name: &str, d: &DeploymentStatus) -> DeploymentDetails {
    let primary = d.versions.first();
    let mut config = json!({
        "name": name,
        "max_ongoing_requests": d.max_ongoing_requests.max(1),
        "max_queued_requests": d.max_queued_requests.max(1),
        "ray_actor_options": {"num_cpus": d.num_cpus},
    });
    match &d.autoscaling {
        Some(a) => {
            config["autoscaling_config"] = json!({
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
            })
        }
        None => config["num_replicas"] = json!(primary.map_or(1, |v| v.replicas.max(1))),
    }
    let replicas = d
        .versions
        .iter()
        .flat_map(|v| {
            v.replica_details.iter().map(move |r| ReplicaDetails {
                replica_id: format!("{name}-v{}-{}", v.version, r.id),
                state: r.state,
                pid: r.pid,
                node_id: r.node_id.clone(),
                node_ip: r.node_ip.clone(),
                actor_name: format!("sluice:{name}:{}#{}", v.version, r.id),
                start_time_s: r.started_at_s,
            })
        })
        .collect();
    DeploymentDetails {
        name: name.to_string(),
        status: d.status,
        status_trigger: match d.status {
            DeploymentState::Healthy => "CONFIG_UPDATE_COMPLETED",
            DeploymentState::Updating => "CONFIG_UPDATE_STARTED",
            DeploymentState::Upscaling => "AUTOSCALING",
            DeploymentState::Unhealthy => "HEALTH_CHECK_FAILED",
        },
        message: d.message.clone(),
        deployment_config: config,
        target_num_replicas: d.versions.iter().map(|v| v.replicas).sum(),
        required_resources: json!({"CPU": d.num_cpus}),
        replicas,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_proxy_and_replica_is_named_in_rays_fields() {
        let status: Status = serde_json::from_value(json!({
            "applications": {"a": {"status": "RUNNING", "deployments": {"m": {
                "status": "UPSCALING", "message": "1 of 2 replicas ready; the others are starting",
                "autoscaling": null, "max_ongoing_requests": 5, "max_queued_requests": 64, "num_cpus": 2.0,
                "versions": [{"version": "3", "model": null, "weight": 100, "replicas": 2, "ready_replicas": 1,
                    "queued": 0, "in_flight": 0, "replica_details": [
                        {"id": 0, "state": "RUNNING", "started_at_s": 5.0, "node_id": "w1", "node_ip": "10.0.0.2", "pid": 42},
                        {"id": 1, "state": "STARTING", "started_at_s": 6.0}]}]}}}},
            "events": [],
            "proxies": [{"name": "sluice-proxy:w1", "node_id": "w1", "node_ip": "10.0.0.2", "addr": "10.0.0.2:8000"},
                        {"name": "sluice-proxy:w2", "node_id": "w2", "node_ip": "10.0.0.3", "addr": null}]
        }))
        .unwrap();
        let node = LocalNode { id: "head".into(), ip: "10.0.0.1".into(), pid: 7 };
        let frontends = Frontends {
            http_host: "0.0.0.0".into(),
            http_port: 8000,
            grpc_port: None,
            proxy_location: sluice_config::ProxyLocation::EveryNode,
        };
        let d = instance_details(&status, &BTreeMap::new(), &node, &frontends, ApiType::Declarative, false);
        let d = serde_json::to_value(d).unwrap();
        let proxies: Vec<(&str, &str)> = ["head", "w1", "w2"]
            .iter()
            .map(|n| {
                (d["proxies"][*n]["node_ip"].as_str().unwrap(), d["proxies"][*n]["status"].as_str().unwrap())
            })
            .collect();
        assert_eq!(proxies, [("10.0.0.1", "HEALTHY"), ("10.0.0.2", "HEALTHY"), ("10.0.0.3", "STARTING")]);
        assert_eq!(d["proxy_location"], "EveryNode", "the server's config's, not always HeadOnly");
        let app = &d["applications"]["a"];
        assert_eq!((app["docs_path"].clone(), app["source"].clone()), (Value::Null, json!("declarative")));
        assert_eq!(app["route_prefix"], "/v2/models/m");
        let m = &app["deployments"]["m"];
        assert_eq!(
            (m["status"].as_str(), m["status_trigger"].as_str()),
            (Some("UPSCALING"), Some("AUTOSCALING"))
        );
        assert_eq!(m["deployment_config"]["num_replicas"], 2);
        assert_eq!(m["required_resources"], json!({"CPU": 2.0}));
        assert_eq!(m["replicas"][0]["replica_id"], "m-v3-0");
        assert_eq!(
            (m["replicas"][0]["pid"].as_u64(), m["replicas"][1]["state"].as_str()),
            (Some(42), Some("STARTING"))
        );
        let imperative =
            instance_details(&status, &BTreeMap::new(), &node, &frontends, ApiType::Imperative, true);
        assert!(imperative.applications.is_empty());
        assert_eq!(imperative.proxies["head"].status, "DRAINING");
    }
}
