//! What the admin API and `sluice status` show: applications, deployments, versions with their
//! replicas and traffic weights, autoscaling, and the recent events — typed, serialized by
//! serde.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::state::{ControllerState, Managed, Version};

/// The whole status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub applications: BTreeMap<String, ApplicationStatus>,
    /// Oldest first.
    pub events: Vec<Event>,
    /// Frontends on other nodes of the cluster (`proxy_location: EveryNode`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proxies: Vec<ProxyStatus>,
    /// The model repository: reachable or not, versions listed, rejected versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<crate::repository::RepositoryStatus>,
}

/// A proxy on a cluster node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub name: String,
    pub node_id: String,
    pub node_ip: String,
    /// Its REST address, once it listens.
    pub addr: Option<String>,
}

/// An application (Ray Serve's status names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplicationStatus {
    pub status: ApplicationState,
    pub deployments: BTreeMap<String, DeploymentStatus>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplicationState {
    Running,
}

/// A deployment and its versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentStatus {
    pub status: DeploymentState,
    /// The primary first, then versions served by exact version only, then the canary.
    pub versions: Vec<VersionStatus>,
    pub autoscaling: Option<AutoscalingStatus>,
    /// For a multiplexed deployment: its models and how often replicas had them loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplex: Option<MultiplexStatus>,
}

/// A multiplexed deployment's model loads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultiplexStatus {
    /// The model ids its folder holds.
    pub models: Vec<String>,
    pub max_models_per_replica: u64,
    /// Batches whose model the replica held, and those that had to load it.
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: Option<f64>,
    pub loads: u64,
    pub evictions: u64,
    /// Mean time to load a model, milliseconds.
    pub mean_load_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeploymentState {
    /// The primary has a ready replica (or is scaled to zero on purpose).
    Healthy,
    /// Replicas are starting.
    Updating,
}

/// One running version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionStatus {
    pub version: String,
    /// The ONNX file, for ONNX models.
    pub model: Option<PathBuf>,
    /// Percent of unpinned traffic.
    pub weight: u32,
    pub replicas: usize,
    pub ready_replicas: usize,
    /// Requests waiting for a replica slot.
    pub queued: usize,
    /// Requests queued or held by replicas.
    pub in_flight: usize,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// For a canary: whether an automatic rollout drives its weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<bool>,
    /// Replicas that wait for a node (on Ray), each with Ray's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
    /// Where replicas in other processes run (on Ray).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<ReplicaNode>,
    /// For a shadow version: what its copies showed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
}

/// A shadow version's copies and how they compare with the primary's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShadowStatus {
    /// Percent of the primary's requests copied.
    pub percent: u32,
    pub sent: u64,
    /// Dropped because the shadow had no free replica slot (never queued).
    pub dropped: u64,
    pub errors: u64,
    pub compared: u64,
    /// Rows compared, and the share that agree (same argmax / same values); None before any.
    pub rows: u64,
    pub agreement: Option<f64>,
    /// Largest absolute difference seen in floating-point outputs.
    pub max_abs_diff: f64,
    /// The shadow's latency on copies, milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// A replica in another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaNode {
    /// Its Ray actor name.
    pub name: String,
    pub node_id: String,
    pub node_ip: String,
    pub pid: u32,
    /// Its internal gRPC address.
    pub addr: String,
    /// Whether it takes requests (it passed its first health check).
    pub ready: bool,
}

/// An autoscaled deployment's bounds and load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscalingStatus {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub target_ongoing_requests: f64,
    /// In-flight + queued requests averaged over the look-back window.
    pub average_load: f64,
}

pub(crate) fn status(state: &ControllerState) -> Status {
    let mut applications: BTreeMap<String, ApplicationStatus> = BTreeMap::new();
    for (name, m) in &state.deployments {
        applications
            .entry(m.app.clone())
            .or_insert_with(|| ApplicationStatus {
                status: ApplicationState::Running,
                deployments: BTreeMap::new(),
            })
            .deployments
            .insert(name.clone(), deployment(m, state.aliases.get(name).map_or(&[][..], Vec::as_slice)));
    }
    Status {
        applications,
        events: state.events.iter().cloned().collect(),
        proxies: Vec::new(),
        repository: None,
    }
}

fn deployment(m: &Managed, aliases: &[String]) -> DeploymentStatus {
    let mut versions = vec![version(&m.primary, m.primary_weight())];
    versions.extend(m.others.iter().map(|o| version(o, 0)));
    if let Some(s) = &m.shadow {
        versions.push(VersionStatus { shadow: Some(shadow(&s.shadow)), ..version(&s.version, 0) });
    }
    if let Some(c) = &m.canary {
        versions.push(VersionStatus {
            canary: true,
            rollout: Some(c.rollout.is_some()),
            ..version(&c.version, c.weight)
        });
    }
    let d = &m.primary.deployment;
    let status = if d.is_ready() || m.primary.replica_count() == 0 {
        DeploymentState::Healthy
    } else {
        DeploymentState::Updating
    };
    let autoscaling = m.scaling.as_ref().map(|s| AutoscalingStatus {
        min_replicas: s.config.min_replicas,
        max_replicas: s.config.max_replicas,
        target_ongoing_requests: s.config.target_ongoing_requests,
        average_load: s.window.average(),
    });
    let multiplex = d.multiplex_stats().map(|s| {
        use std::sync::atomic::Ordering::Relaxed;
        let (hits, misses, loads) = (s.hits.load(Relaxed), s.misses.load(Relaxed), s.loads.load(Relaxed));
        MultiplexStatus {
            models: aliases.to_vec(),
            max_models_per_replica: s.capacity,
            hits,
            misses,
            hit_rate: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            loads,
            evictions: s.evictions.load(Relaxed),
            mean_load_ms: (loads > 0).then(|| s.load_us.load(Relaxed) as f64 / loads as f64 / 1e3),
        }
    });
    DeploymentStatus { status, versions, autoscaling, multiplex }
}

fn version(v: &Version, weight: u32) -> VersionStatus {
    let d = &v.deployment;
    VersionStatus {
        version: v.name().to_string(),
        model: v.key.model.onnx_path().map(PathBuf::from),
        weight,
        replicas: v.replica_count(),
        ready_replicas: d.ready_replicas(),
        queued: d.queue_depth(),
        in_flight: d.in_system(),
        canary: false,
        rollout: None,
        shadow: None,
        waiting: v.placed.waiting(),
        nodes: v
            .placed
            .remote()
            .into_iter()
            .map(|(r, ready)| ReplicaNode {
                name: r.name,
                node_id: r.node_id,
                node_ip: r.node_ip,
                pid: r.pid,
                addr: r.addr,
                ready,
            })
            .collect(),
    }
}

fn shadow(s: &sluice_deployments::Shadow) -> ShadowStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let st = s.stats();
    let latencies = st.latencies.snapshot();
    let zero = vec![0; latencies.len()];
    let ms = |q| {
        sluice_deployments::metrics::LatencyBuckets::quantile(&zero, &latencies, q)
            .map(|d| d.as_secs_f64() * 1e3)
    };
    let rows = st.rows.load(Relaxed);
    ShadowStatus {
        percent: s.percent(),
        sent: st.sent.load(Relaxed),
        dropped: st.dropped.load(Relaxed),
        errors: st.errors.load(Relaxed),
        compared: st.compared.load(Relaxed),
        rows,
        agreement: (rows > 0).then(|| st.rows_agreed.load(Relaxed) as f64 / rows as f64),
        max_abs_diff: st.max_abs_diff(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
    }
}
