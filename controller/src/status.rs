//! What the admin API and `sluice status` show: applications (with Ray Serve's status names),
//! deployments, versions with their replicas, traffic weights and recent traffic, autoscaling,
//! and the recent events — typed, serialized by serde.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::state::{AppRecord, ControllerState, DeployOutcome, Managed, Version};
use crate::traffic::Traffic;

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

/// An application.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplicationStatus {
    pub status: ApplicationState,
    /// Why the application is not running (a failed deploy's error, ...); empty when it is.
    #[serde(default)]
    pub message: String,
    /// Where its pipeline's plain-JSON route answers, if it has one.
    #[serde(default)]
    pub route_prefix: Option<String>,
    /// When its config was last deployed, seconds since the Unix epoch (0: unknown).
    #[serde(default)]
    pub last_deployed_time_s: f64,
    /// Fields of the submitted config Sluice accepted but does not act on, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<String>,
    pub deployments: BTreeMap<String, DeploymentStatus>,
}

/// Ray Serve's application status names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApplicationState {
    /// Every deployment serves.
    Running,
    /// A deploy is under way, or a deployment's replicas are starting.
    Deploying,
    /// The last deploy failed (`message` says why); what ran before keeps running.
    DeployFailed,
    /// A deployment that served has no ready replica (they are restarting).
    Unhealthy,
}

/// A deployment and its versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentStatus {
    pub status: DeploymentState,
    /// What is going on when it is not healthy; empty when it is.
    #[serde(default)]
    pub message: String,
    /// The primary first, then versions served by exact version only, then the canary.
    pub versions: Vec<VersionStatus>,
    pub autoscaling: Option<AutoscalingStatus>,
    /// For a multiplexed deployment: its models and how often replicas had them loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplex: Option<MultiplexStatus>,
    /// Requests one replica takes at a time (`max_ongoing_requests`, resolved).
    #[serde(default)]
    pub max_ongoing_requests: usize,
    /// Requests that may wait for a replica slot before more are refused.
    #[serde(default)]
    pub max_queued_requests: u32,
    /// CPUs one replica takes.
    #[serde(default)]
    pub num_cpus: f64,
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

/// Ray Serve's deployment status names (of the primary version).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeploymentState {
    /// Every replica is ready (or the deployment is scaled to zero on purpose).
    Healthy,
    /// No replica is ready yet: they are starting.
    Updating,
    /// Some replicas serve while others start (added by scaling, or reloading a model).
    Upscaling,
    /// It served before and now no replica is ready: they are restarting.
    Unhealthy,
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
    /// For a shadow version, or a canary gated on its agreement with the primary: what the
    /// copies it was sent showed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStatus>,
    /// Each replica.
    #[serde(default)]
    pub replica_details: Vec<ReplicaStatus>,
    /// Requests per second and p50/p99 over the last [`crate::TRAFFIC_WINDOW`]; None until the
    /// control loop has two snapshots of the version.
    #[serde(default)]
    pub traffic: Option<Traffic>,
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
    /// Largest absolute difference seen in floating-point outputs; None once outputs could
    /// not be compared value by value (their shapes differed: infinitely far apart, which
    /// JSON cannot write, and `sluice status` could not read the status back).
    pub max_abs_diff: Option<f64>,
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

/// One replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// Unique within its version.
    pub id: usize,
    pub state: ReplicaState,
    /// When it was started, seconds since the Unix epoch.
    pub started_at_s: f64,
    /// The node it runs on; None for a replica thread of the serving process.
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub node_ip: Option<String>,
    /// The process hosting it; None for a replica thread of the serving process.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// Ray Serve's replica state names (the ones Sluice's replicas go through).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplicaState {
    /// Loading or warming its model.
    Starting,
    /// Taking requests.
    Running,
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
            .or_insert_with(|| application(state, &m.app))
            .deployments
            .insert(name.clone(), deployment(m, state.aliases.get(name).map_or(&[][..], Vec::as_slice)));
    }
    // Applications whose first deploy is under way or failed have no deployment yet.
    for name in state.apps.keys() {
        applications.entry(name.clone()).or_insert_with(|| application(state, name));
    }
    for (name, app) in applications.iter_mut() {
        app.status = app_state(state.apps.get(name), app);
    }
    Status {
        applications,
        events: state.events.iter().cloned().collect(),
        proxies: Vec::new(),
        repository: None,
    }
}

/// What every application status starts from, before its deployments are in.
fn application(state: &ControllerState, name: &str) -> ApplicationStatus {
    let record = state.apps.get(name);
    let route_prefix = state
        .desired
        .as_ref()
        .and_then(|c| c.applications.iter().find(|a| a.name == name))
        .and_then(|a| a.route_prefix.clone());
    ApplicationStatus {
        status: ApplicationState::Running,
        message: match record.map(|r| &r.outcome) {
            Some(DeployOutcome::Failed(why)) => why.clone(),
            Some(DeployOutcome::Deploying) => "deploying: new versions load and warm up".into(),
            _ => String::new(),
        },
        route_prefix,
        last_deployed_time_s: record.map_or(0.0, |r| r.deployed_at),
        ignored: record.map(|r| r.ignored.clone()).unwrap_or_default(),
        deployments: BTreeMap::new(),
    }
}

/// A failed or running deploy decides; otherwise the deployments do (Ray Serve's rules).
fn app_state(record: Option<&AppRecord>, app: &ApplicationStatus) -> ApplicationState {
    match record.map(|r| &r.outcome) {
        Some(DeployOutcome::Failed(_)) => return ApplicationState::DeployFailed,
        Some(DeployOutcome::Deploying) => return ApplicationState::Deploying,
        _ => {}
    }
    let states = || app.deployments.values().map(|d| d.status);
    if states().any(|s| s == DeploymentState::Unhealthy) {
        ApplicationState::Unhealthy
    } else if states().any(|s| s == DeploymentState::Updating) {
        ApplicationState::Deploying
    } else {
        ApplicationState::Running
    }
}

fn deployment(m: &Managed, aliases: &[String]) -> DeploymentStatus {
    let mut versions = vec![version(&m.primary, m.primary_weight())];
    versions.extend(m.others.iter().map(|o| version(o, 0)));
    if let Some(s) = &m.shadow {
        versions.push(VersionStatus { shadow: Some(shadow(&s.shadow)), ..version(&s.version, 0) });
    }
    if let Some(c) = &m.canary {
        let mirror = c.rollout.as_ref().and_then(|r| r.mirror.as_deref());
        versions.push(VersionStatus {
            canary: true,
            rollout: Some(c.rollout.is_some()),
            shadow: mirror.map(shadow),
            ..version(&c.version, c.weight)
        });
    }
    let d = &m.primary.deployment;
    let (status, message) = match m.short_of_count() {
        // Fewer replicas than its config's count: the last try to add them failed.
        Some((f, running, wanted)) => (
            DeploymentState::Unhealthy,
            format!("{running} of {wanted} replicas: {}; tried again", f.message),
        ),
        // An autoscaled one whose last change of count failed (cleared once one succeeds):
        // said beside its replicas' state, and unhealthy with none ready (a scale from zero
        // that fails leaves every request to its deadline).
        None => match (&m.scaling, &m.scale_failure) {
            (Some(_), Some(f)) if d.ready_replicas() == 0 => {
                (DeploymentState::Unhealthy, format!("no replica is ready: {}; tried again", f.message))
            }
            (Some(_), Some(f)) => {
                let (state, message) = deployment_state(&m.primary, m.woken_at);
                let sep = if message.is_empty() { "" } else { "; " };
                (state, format!("{message}{sep}{}; tried again", f.message))
            }
            _ => deployment_state(&m.primary, m.woken_at),
        },
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
    DeploymentStatus {
        status,
        message,
        versions,
        autoscaling,
        multiplex,
        max_ongoing_requests: d.spec().ongoing_limit(),
        max_queued_requests: d.spec().settings.max_queued_requests,
        num_cpus: m.config.num_cpus(),
    }
}

/// How long a deployment woken from zero reads as starting (`UPDATING`) with no ready replica;
/// past it, as unhealthy (a replica that fails to start over and over, on Ray, records no
/// failed scale).
const WAKE_GRACE: std::time::Duration = std::time::Duration::from_secs(300);

/// The primary version's replicas decide (those waiting for a node count as wanted); `woken`:
/// when it was last asked to grow from zero.
fn deployment_state(v: &Version, woken: Option<std::time::Instant>) -> (DeploymentState, String) {
    let d = &v.deployment;
    let (count, ready) = (v.replica_count(), d.ready_replicas());
    if ready >= count {
        (DeploymentState::Healthy, String::new())
    } else if ready > 0 {
        (DeploymentState::Upscaling, format!("{ready} of {count} replicas ready; the others are starting"))
    } else if d.at_zero_on_purpose() && woken.is_none_or(|t| t.elapsed() < WAKE_GRACE) {
        // Woken from zero (scaled there, not failed there): its first replica is loading.
        (DeploymentState::Updating, format!("{count} replica(s) starting from zero"))
    } else if d.at_zero_on_purpose() {
        let waited = woken.map_or(0, |t| t.elapsed().as_secs());
        (
            DeploymentState::Unhealthy,
            format!("none of its {count} replicas is ready {waited} s after it was woken from zero"),
        )
    } else if d.metrics().stats.success.count.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        (DeploymentState::Unhealthy, format!("none of its {count} replicas is ready; they are restarting"))
    } else {
        (DeploymentState::Updating, format!("{count} replica(s) starting"))
    }
}

fn version(v: &Version, weight: u32) -> VersionStatus {
    let d = &v.deployment;
    let replica_details = d
        .replicas()
        .into_iter()
        .map(|r| ReplicaStatus {
            id: r.id,
            state: if r.ready { ReplicaState::Running } else { ReplicaState::Starting },
            started_at_s: r.started_at.duration_since(UNIX_EPOCH).map(|t| t.as_secs_f64()).unwrap_or(0.0),
            node_id: r.node_id,
            node_ip: r.node_ip,
            pid: r.pid,
        })
        .collect();
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
        replica_details,
        traffic: v.traffic.traffic(),
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
        max_abs_diff: Some(st.max_abs_diff()).filter(|d| d.is_finite()),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
    }
}
