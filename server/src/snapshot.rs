//! The route table as data, for proxies on other nodes (`proxy_location: EveryNode`): the
//! controller answers `GET /api/sluice/routes` with every model, version, traffic split, the
//! replicas behind each version (their addresses and readiness) and the pipelines; a `sluice
//! proxy` polls it and keeps an identical route table of its own, sending requests straight to
//! the same replicas. Decisions stay with the controller; a proxy only follows.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_config::ReplicaSettings;
use sluice_controller::cluster::GrpcReplica;
use sluice_controller::demand::{DemandReport, VersionDemand, VersionServed};
use sluice_controller::rollout::Counters;
use sluice_deployments::pipeline::{JsonMapping, Step};
use sluice_deployments::{
    DataType, Deployment, DeploymentSpec, ModelMetadata, Pipeline, RemoteInfo, Servable, TensorSpec,
};
use sluice_router::{ModelRoute, RouteTable, Router};

/// Every route of the controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The controller's route table is at least this new ([`Router::generation`]): a proxy
    /// reports the one it has applied, so that a retired version's drain knows when every
    /// proxy has followed. 0 from an older controller.
    #[serde(default)]
    pub generation: u64,
    pub models: BTreeMap<String, ModelEntry>,
    pub pipelines: Vec<PipelineEntry>,
    /// A multiplexed deployment's model ids that answer as model names, by that name.
    #[serde(default)]
    pub aliases: BTreeMap<String, AliasEntry>,
}

/// One model of a multiplexed deployment, addressed by its id as the model name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasEntry {
    pub deployment: String,
    pub version: String,
    pub id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub versions: BTreeMap<String, VersionEntry>,
    /// (version, weight) for requests that name no version.
    pub split: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub metadata: Metadata,
    pub settings: ReplicaSettings,
    pub max_replicas: usize,
    /// Whether requests name one of its models.
    #[serde(default)]
    pub multiplexed: bool,
    /// Whether autoscaling may take it to zero replicas (readiness counts it ready there).
    #[serde(default)]
    pub scales_to_zero: bool,
    /// Whether autoscaling has taken it to zero on purpose (`Deployment::at_zero_on_purpose`):
    /// a proxy whose replicas served before counts it ready there too.
    #[serde(default)]
    pub at_zero: bool,
    pub replicas: Vec<ReplicaEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaEntry {
    pub name: String,
    pub addr: String,
    pub node_id: String,
    pub node_ip: String,
    pub pid: u32,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub platform: String,
    pub inputs: Vec<Spec>,
    pub outputs: Vec<Spec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineEntry {
    pub name: String,
    pub inputs: Vec<Spec>,
    pub outputs: Vec<String>,
    /// (name, deployment, step inputs, step outputs) in run order.
    pub steps: Vec<StepEntry>,
    pub json: Option<JsonEntry>,
    pub route_prefix: Option<String>,
}

/// A pipeline's plain-JSON route: request fields → inputs, outputs → response fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonEntry {
    pub request: Vec<(String, String)>,
    pub response: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEntry {
    pub name: String,
    pub deployment: String,
    /// The version of `deployment` the step runs on (the controller's primary); absent from
    /// older controllers' snapshots.
    #[serde(default)]
    pub version: Option<String>,
    pub inputs: Vec<(String, String)>,
    pub outputs: Vec<(String, String)>,
}

fn spec_of(t: &TensorSpec) -> Spec {
    Spec { name: t.name.clone(), datatype: t.dtype.as_str().to_string(), shape: t.shape.clone() }
}

fn tensor_of(s: &Spec) -> Option<TensorSpec> {
    Some(TensorSpec { name: s.name.clone(), dtype: DataType::parse(&s.datatype)?, shape: s.shape.clone() })
}

impl Metadata {
    fn of(m: &ModelMetadata) -> Self {
        Self {
            platform: m.platform.clone(),
            inputs: m.inputs.iter().map(spec_of).collect(),
            outputs: m.outputs.iter().map(spec_of).collect(),
        }
    }

    fn to_model(&self) -> Option<ModelMetadata> {
        Some(ModelMetadata {
            platform: self.platform.clone(),
            inputs: self.inputs.iter().map(tensor_of).collect::<Option<_>>()?,
            outputs: self.outputs.iter().map(tensor_of).collect::<Option<_>>()?,
        })
    }
}

/// The snapshot of `routes` (only remote replicas are listed: proxies cannot reach threads).
pub fn take(routes: &Router) -> Snapshot {
    // Read before the table: the table is at least this new.
    let generation = routes.generation();
    let table = routes.table();
    let mut snapshot = Snapshot { generation, ..Snapshot::default() };
    for (name, route) in &table.models {
        let mut entry = ModelEntry { split: route.split.clone(), ..ModelEntry::default() };
        for (version, servable) in &route.versions {
            if let Servable::Multiplexed(d, id) = servable {
                let alias = AliasEntry {
                    deployment: d.name().into(),
                    version: d.version().into(),
                    id: id.to_string(),
                };
                snapshot.aliases.insert(name.clone(), alias);
                continue;
            }
            let (Servable::Deployment(d) | Servable::Shadowed(d, _)) = servable else { continue };
            let replicas = d
                .remote_replicas()
                .into_iter()
                .map(|(_, ready, r)| ReplicaEntry {
                    name: r.name,
                    addr: r.addr,
                    node_id: r.node_id,
                    node_ip: r.node_ip,
                    pid: r.pid,
                    ready,
                })
                .collect();
            entry.versions.insert(
                version.clone(),
                VersionEntry {
                    metadata: Metadata::of(d.metadata()),
                    settings: d.spec().settings.clone(),
                    max_replicas: d.spec().max_replicas,
                    multiplexed: d.spec().multiplexed,
                    scales_to_zero: d.scales_to_zero(),
                    at_zero: d.at_zero_on_purpose(),
                    replicas,
                },
            );
        }
        if !entry.versions.is_empty() {
            snapshot.models.insert(name.clone(), entry);
        }
    }
    let prefixes: HashMap<&str, &String> = table.json_routes.iter().map(|(p, pl)| (pl.name(), p)).collect();
    for route in table.models.values() {
        for servable in route.versions.values() {
            let Servable::Pipeline(p) = servable else { continue };
            snapshot.pipelines.push(PipelineEntry {
                name: p.name().to_string(),
                inputs: p.metadata().inputs.iter().map(spec_of).collect(),
                outputs: p.metadata().outputs.iter().map(|o| o.name.clone()).collect(),
                steps: p
                    .steps()
                    .iter()
                    .map(|s| StepEntry {
                        name: s.name.clone(),
                        deployment: s.deployment.name().to_string(),
                        version: Some(s.deployment.version().to_string()),
                        inputs: s.inputs.clone(),
                        outputs: s.outputs.clone(),
                    })
                    .collect(),
                json: p
                    .json
                    .as_ref()
                    .map(|j| JsonEntry { request: j.request.clone(), response: j.response.clone() }),
                route_prefix: prefixes.get(p.name()).map(|s| s.to_string()),
            });
        }
    }
    snapshot.pipelines.sort_by(|a, b| a.name.cmp(&b.name));
    snapshot
}

/// One version as a proxy runs it: a deployment of remote replicas, by replica name.
struct Followed {
    entry: VersionEntry,
    deployment: Arc<Deployment>,
    replicas: HashMap<String, usize>,
    /// Which copy this is, across the proxy's starts too ([`VersionServed::copy`]), and when it
    /// started: its counts start at 0 then.
    copy: (u64, std::time::Instant),
}

/// A number no other copy of this proxy, in this process or an earlier one, is likely to have
/// drawn (std's hasher keys are random per process).
fn copy_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.finish()
}

/// One pipeline as a proxy runs it.
struct FollowedPipeline {
    entry: PipelineEntry,
    steps: Vec<Arc<Deployment>>,
    pipeline: Arc<Pipeline>,
}

/// Keeps a proxy's route table equal to the controller's snapshots.
#[derive(Default)]
pub struct Follower {
    versions: HashMap<(String, String), Followed>,
    /// Each pipeline as last built, kept while its entry and its steps' deployments stay the
    /// same: its statistics live in it (a new one on every route change started them at 0).
    pipelines: HashMap<String, FollowedPipeline>,
    /// Woken by a request that waits for a deployment at zero replicas: its demand is
    /// reported at once.
    wake: Arc<tokio::sync::Notify>,
    /// Copies of versions the table no longer routes to that still hold requests (queued
    /// here, sent to a replica, or in an earlier step of a pipeline): reported as retired
    /// until done, so that the controller keeps their replicas until then.
    retired: Vec<Retired>,
    /// The generation of the table applied last ([`Snapshot::generation`]).
    generation: Option<u64>,
    /// After an apply that retired copies: the generation reported until [`RETIRED_KEEP`]
    /// has passed, and since when. A request routed to a copy just before it was retired
    /// enters it in that time, and is reported (retired) before the controller reads the
    /// new generation as followed.
    held_back: Option<(Option<u64>, std::time::Instant)>,
    /// The versions in a model's traffic split (a canary and its primary): what their copies
    /// answer is reported, for the canary's rollout gates ([`Follower::served`]).
    in_split: std::collections::HashSet<(String, String)>,
}

/// A copy the table dropped ([`Follower::retired`]).
struct Retired {
    key: (String, String),
    deployment: Arc<Deployment>,
    since: std::time::Instant,
}

/// How long a retired copy is kept (and reported while it holds a request) even when it reads
/// empty: a request that routed to it just before it was retired enters it in a moment.
const RETIRED_KEEP: Duration = Duration::from_secs(1);

impl Retired {
    /// Requests it holds, those on their way to it ([`Deployment::hold`]) included.
    fn held(&self) -> usize {
        self.deployment.in_system().max(self.deployment.busy())
    }

    fn kept(&self) -> bool {
        self.held() > 0 || self.since.elapsed() < RETIRED_KEEP
    }
}

impl Follower {
    /// Makes `routes` serve `snapshot`: new versions start, replicas join or leave, readiness
    /// follows, and the table is published whole.
    pub fn apply(&mut self, snapshot: &Snapshot, routes: &Router) {
        let reported = self.applied();
        let mut keep = HashMap::new();
        // Versions this table no longer serves here, or serves by another deployment: marked
        // retired once it is published, so that a request routed to one while its body was
        // decoded is routed again, as on the controller's node.
        let mut left = Vec::new();
        for (model, entry) in &snapshot.models {
            for (version, v) in &entry.versions {
                let key = (model.clone(), version.clone());
                let followed = match self.versions.remove(&key) {
                    // The same deployment unless what it was started from changed (its
                    // replicas and scaling to zero follow in `sync`): one that became
                    // multiplexed under the same version name was kept serving one model.
                    Some(f)
                        if f.entry.settings == v.settings
                            && f.entry.metadata == v.metadata
                            && f.entry.multiplexed == v.multiplexed
                            && f.entry.max_replicas == v.max_replicas =>
                    {
                        f
                    }
                    replaced => {
                        left.extend(replaced.map(|f| (key.clone(), f.deployment)));
                        match start(model, version, v, &self.wake) {
                            Some(f) => f,
                            None => continue,
                        }
                    }
                };
                keep.insert(key, sync(followed, v));
            }
        }
        left.extend(
            std::mem::replace(&mut self.versions, keep).into_iter().map(|(key, f)| (key, f.deployment)),
        );
        let mut table = RouteTable::default();
        for (model, entry) in &snapshot.models {
            let mut route = ModelRoute { split: entry.split.clone(), ..ModelRoute::default() };
            for version in entry.versions.keys() {
                if let Some(f) = self.versions.get(&(model.clone(), version.clone())) {
                    route.versions.insert(version.clone(), Servable::Deployment(f.deployment.clone()));
                }
            }
            table.models.insert(model.clone(), route);
        }
        for (name, a) in &snapshot.aliases {
            if table.models.contains_key(name) {
                continue;
            }
            if let Some(f) = self.versions.get(&(a.deployment.clone(), a.version.clone())) {
                let mut route = ModelRoute::default();
                let servable = Servable::Multiplexed(f.deployment.clone(), Arc::from(a.id.as_str()));
                route.versions.insert(a.version.clone(), servable);
                table.models.insert(name.clone(), route);
            }
        }
        let mut built = std::mem::take(&mut self.pipelines);
        for p in &snapshot.pipelines {
            match self.pipeline(p, snapshot, &mut built) {
                Some(pipeline) => {
                    let mut route = ModelRoute::default();
                    route.versions.insert("1".into(), Servable::Pipeline(pipeline.clone()));
                    table.models.insert(p.name.clone(), route);
                    if let Some(prefix) = &p.route_prefix {
                        table.json_routes.insert(prefix.clone(), pipeline);
                    }
                }
                None => tracing::warn!(pipeline = %p.name, "cannot follow this pipeline yet"),
            }
        }
        routes.publish(table);
        self.in_split = snapshot
            .models
            .iter()
            .filter(|(_, entry)| entry.split.len() > 1)
            .flat_map(|(model, entry)| {
                entry.split.iter().map(move |(version, _)| (model.clone(), version.clone()))
            })
            .collect();
        // One instant for both: the generation is held back exactly as long as the copies
        // retired here are kept however empty they read.
        let now = std::time::Instant::now();
        if !left.is_empty() {
            self.held_back = Some((reported, now));
        }
        self.generation = Some(snapshot.generation);
        for (key, deployment) in left {
            deployment.mark_retired();
            // With no replica, none comes (the controller starts none for a proxy's requests
            // to a retired version): those waiting are handed back to their frontends now, which
            // run them where the table routes them now (503 where nothing does).
            if deployment.replica_count() == 0 {
                deployment.close_handing_back();
            }
            self.retired.push(Retired { key, deployment, since: now });
        }
        self.retired.retain(Retired::kept);
    }

    /// The route-table generation to report as applied: the last one applied, or, for
    /// [`RETIRED_KEEP`] after an apply that retired copies, the one reported before it.
    pub fn applied(&self) -> Option<u64> {
        match self.held_back {
            Some((before, since)) if since.elapsed() < RETIRED_KEEP => before,
            _ => self.generation,
        }
    }

    /// The versions holding requests here now: for the controller's autoscaler, and (those of
    /// retired copies) for its drain of a retired version.
    pub fn demand(&mut self) -> Vec<VersionDemand> {
        self.retired.retain(Retired::kept);
        let demand =
            |(model, version): &(String, String), in_system: usize, d: &Deployment, retired| VersionDemand {
                model: model.clone(),
                version: version.clone(),
                in_system: in_system as u64,
                queued: d.queue_depth() as u64,
                retired,
            };
        let serving =
            self.versions.iter().map(|(key, f)| demand(key, f.deployment.in_system(), &f.deployment, false));
        let retired = self.retired.iter().map(|r| demand(&r.key, r.held(), &r.deployment, true));
        let mut held: Vec<VersionDemand> =
            serving.chain(retired).filter(|v| v.in_system > 0 || v.queued > 0).collect();
        held.sort_by(|a, b| (&a.model, &a.version, a.retired).cmp(&(&b.model, &b.version, b.retired)));
        held
    }

    /// What the copies of versions in a traffic split have answered since they started (none
    /// yet too: a copy left out reads as a lapsed report, whose requests are not judged until
    /// it is back), counted as the controller counts its own: a canary's rollout judges
    /// the requests that reach it through this proxy too (with every request entering the
    /// cluster here, it saw none and held at its weight for good).
    pub fn served(&self) -> Vec<VersionServed> {
        let mut served: Vec<VersionServed> = self
            .in_split
            .iter()
            .filter_map(|key| Some((key, self.versions.get(key)?)))
            .map(|((model, version), f)| {
                let (copy, since) = f.copy;
                VersionServed::new(model, version, (copy, since.elapsed()), &Counters::of(&f.deployment))
            })
            .collect();
        served.sort_by(|a, b| (&a.model, &a.version).cmp(&(&b.model, &b.version)));
        served
    }

    /// `p` as a pipeline over the followed deployments: the one in `built` when nothing it was
    /// built from changed (kept in `self.pipelines` again), else a new one.
    fn pipeline(
        &mut self,
        p: &PipelineEntry,
        snapshot: &Snapshot,
        built: &mut HashMap<String, FollowedPipeline>,
    ) -> Option<Arc<Pipeline>> {
        let mut deployments = Vec::new();
        for s in &p.steps {
            // A step runs on the version the controller's pipeline runs it on (its primary).
            let entry = snapshot.models.get(&s.deployment)?;
            let version = s.version.as_ref().or_else(|| primary_guess(entry))?;
            deployments.push(self.versions.get(&(s.deployment.clone(), version.clone()))?.deployment.clone());
        }
        let same = |f: &FollowedPipeline| {
            f.entry == *p
                && f.steps.len() == deployments.len()
                && f.steps.iter().zip(&deployments).all(|(a, b)| Arc::ptr_eq(a, b))
        };
        let pipeline = match built.remove(&p.name) {
            Some(f) if same(&f) => f.pipeline,
            old => {
                let steps = p
                    .steps
                    .iter()
                    .zip(&deployments)
                    .map(|(s, d)| Step {
                        name: s.name.clone(),
                        deployment: d.clone(),
                        inputs: s.inputs.clone(),
                        outputs: s.outputs.clone(),
                    })
                    .collect();
                let inputs = p.inputs.iter().map(tensor_of).collect::<Option<Vec<_>>>()?;
                let json = p.json.clone().map(|j| JsonMapping { request: j.request, response: j.response });
                let pipeline = Pipeline::new(&p.name, inputs, steps, &p.outputs, json).ok()?;
                // Counting on in the statistics of the one it replaces, as the controller's.
                Arc::new(match old {
                    Some(old) => pipeline.keeping_stats_of(&old.pipeline),
                    None => pipeline,
                })
            }
        };
        let followed = FollowedPipeline { entry: p.clone(), steps: deployments, pipeline: pipeline.clone() };
        self.pipelines.insert(p.name.clone(), followed);
        Some(pipeline)
    }
}

/// A step's version where an older controller did not say it: the split's first (the
/// primary), else the only version, else the last by name.
fn primary_guess(entry: &ModelEntry) -> Option<&String> {
    entry
        .split
        .first()
        .and_then(|(v, _)| entry.versions.get_key_value(v).map(|(k, _)| k))
        .or_else(|| entry.versions.keys().next_back())
}

fn start(model: &str, version: &str, v: &VersionEntry, wake: &Arc<tokio::sync::Notify>) -> Option<Followed> {
    let metadata = v.metadata.to_model()?;
    let spec = DeploymentSpec {
        name: model.to_string(),
        version: version.to_string(),
        num_replicas: 0,
        max_replicas: v.max_replicas,
        settings: v.settings.clone(),
        wake: wake.clone(),
        multiplexed: v.multiplexed,
    };
    match Deployment::start_remote(spec, metadata) {
        Ok(d) => Some(Followed {
            entry: v.clone(),
            deployment: Arc::new(d),
            replicas: HashMap::new(),
            copy: (copy_id(), std::time::Instant::now()),
        }),
        Err(e) => {
            tracing::warn!(model, version, "cannot follow: {e}");
            None
        }
    }
}

/// Adds replicas the controller lists, removes those it no longer does, and copies readiness.
fn sync(mut f: Followed, v: &VersionEntry) -> Followed {
    let listed: HashMap<&str, &ReplicaEntry> = v.replicas.iter().map(|r| (r.name.as_str(), r)).collect();
    let gone: Vec<String> = f.replicas.keys().filter(|n| !listed.contains_key(n.as_str())).cloned().collect();
    for name in gone {
        if let Some(id) = f.replicas.remove(&name) {
            f.deployment.remove_replica(id);
        }
    }
    for r in &v.replicas {
        let id = match f.replicas.get(&r.name) {
            Some(&id) => id,
            None => {
                let info = RemoteInfo {
                    name: r.name.clone(),
                    node_id: r.node_id.clone(),
                    node_ip: r.node_ip.clone(),
                    pid: r.pid,
                    addr: r.addr.clone(),
                };
                let Ok(replica) = GrpcReplica::new(info, f.deployment.name(), f.deployment.version()) else {
                    continue;
                };
                let id = f.deployment.add_remote(Arc::new(replica));
                f.replicas.insert(r.name.clone(), id);
                id
            }
        };
        f.deployment.set_replica_ready(id, r.ready);
    }
    f.deployment.set_scales_to_zero(v.scales_to_zero);
    // The controller took it to zero on purpose: so does this copy (whose replicas served, so
    // it would read as failing, and the proxy as not ready, where no request then arrives to
    // wake it).
    if v.at_zero && !f.deployment.at_zero_on_purpose() {
        f.deployment.scaled_to_zero();
    }
    f.entry = v.clone();
    f
}

/// Where a proxy's route table comes from ([`crate::StartOptions::follow`]).
#[derive(Debug, Clone)]
pub struct Follow {
    /// The controller's admin API (`http://HEAD:8266`).
    pub controller: String,
    /// The admin API's bearer token, if it needs one.
    pub token: Option<String>,
    /// How often to poll.
    pub every: Duration,
}

/// Polls the controller for its snapshot every `every` and follows it, until the task is
/// dropped; `first` hears when the first one is in. With each poll, and at once when a request
/// waits for a deployment at zero replicas, reports what this proxy (`name`, its address)
/// holds ([`sluice_controller::demand`]).
pub async fn follow(
    routes: Arc<Router>,
    follow: Follow,
    name: String,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let Follow { controller, token, every } = follow;
    let mut first = Some(first);
    let http = reqwest::Client::builder()
        .timeout(sluice_controller::demand::PROXY_REQUEST_TIMEOUT)
        .build()
        .unwrap_or_default();
    let base = controller.trim_end_matches('/');
    let (routes_url, demand_url) = (format!("{base}/api/sluice/routes"), format!("{base}/api/sluice/demand"));
    let authorized = |req: reqwest::RequestBuilder| match &token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let mut follower = Follower::default();
    let wake = follower.wake.clone();
    let mut last: Option<Snapshot> = None;
    // The last failure to report, logged once until it changes (an older controller answers
    // 404 at every poll).
    let mut report_failed: Option<String> = None;
    // A report lives as long as three polls, at least `REPORT_TTL`.
    let ttl_s = (3.0 * every.as_secs_f64()).max(sluice_controller::demand::REPORT_TTL.as_secs_f64());
    let mut poll_due = true;
    let mut next_poll = tokio::time::Instant::now();
    loop {
        if poll_due {
            next_poll = tokio::time::Instant::now() + every;
            match authorized(http.get(&routes_url)).send().await {
                Ok(r) if r.status().is_success() => match r.json::<Snapshot>().await {
                    Ok(snapshot) => {
                        if last.as_ref() != Some(&snapshot) {
                            follower.apply(&snapshot, &routes);
                            last = Some(snapshot);
                        }
                        if let Some(first) = first.take() {
                            let _ = first.send(());
                        }
                    }
                    Err(e) => tracing::warn!("the controller's routes do not parse: {e}"),
                },
                Ok(r) => tracing::warn!("the controller answered {} for its routes", r.status()),
                Err(e) => tracing::warn!("cannot reach the controller at {routes_url}: {e}"),
            }
        }
        // Reported with every poll once the first table is in, holding something or not: the
        // table applied here is news too (the controller waits for it before it stops a
        // retired version's replicas).
        // What it has applied is read first: a copy whose keep time ends between the two reads
        // is then reported (or was empty when dropped) in the same report that stops holding
        // its generation back.
        let applied = follower.applied();
        let versions = follower.demand();
        if !versions.is_empty() || last.is_some() {
            let served = follower.served();
            let report = DemandReport { proxy: name.clone(), versions, ttl_s: Some(ttl_s), applied, served };
            let failed = match authorized(http.post(&demand_url)).json(&report).send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("the controller answered {} for this proxy's demand", r.status())),
                Err(e) => Some(format!("cannot report this proxy's demand to {demand_url}: {e}")),
            };
            if let Some(f) = &failed
                && report_failed.as_ref() != Some(f)
            {
                tracing::warn!("{f}");
            }
            report_failed = failed;
        }
        // A request waiting for a deployment at zero reports at once, without fetching the
        // table again, and wakes at most one report per `WAKE_GAP` (every queued request
        // wakes it).
        poll_due = tokio::select! {
            () = tokio::time::sleep_until(next_poll) => true,
            () = async {
                wake.notified().await;
                tokio::time::sleep(WAKE_GAP).await;
            } => tokio::time::Instant::now() >= next_poll,
        };
    }
}

/// The shortest time between two reports woken by requests waiting at zero replicas.
const WAKE_GAP: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(name: &str, version: &str, multiplexed: bool) -> Arc<Deployment> {
        let spec = DeploymentSpec {
            name: name.into(),
            version: version.into(),
            num_replicas: 0,
            max_replicas: 2,
            settings: ReplicaSettings::default(),
            wake: Default::default(),
            multiplexed,
        };
        let tensor = |n: &str| TensorSpec { name: n.into(), dtype: DataType::Fp32, shape: vec![-1, 4] };
        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".into(),
            inputs: vec![tensor("in")],
            outputs: vec![tensor("out")],
        };
        Arc::new(Deployment::start_remote(spec, metadata).unwrap())
    }

    /// A proxy runs a pipeline's steps on the version the controller runs them on (the
    /// primary, "1" here, not the canary "2", which sorts last), and answers a
    /// multiplexed model's id as a model name, as the controller does.
    #[test]
    fn a_proxy_follows_the_step_versions_and_the_multiplexed_ids() {
        let (primary, canary) = (remote("enc", "1", false), remote("enc", "2", false));
        primary.set_scales_to_zero(true);
        let step = Step {
            name: "encode".into(),
            deployment: primary.clone(),
            inputs: vec![("in".into(), "x".into())],
            outputs: vec![("out".into(), "y".into())],
        };
        let x = TensorSpec { name: "x".into(), dtype: DataType::Fp32, shape: vec![-1, 4] };
        let pipeline = Arc::new(Pipeline::new("p", vec![x], vec![step], &["y".into()], None).unwrap());
        let tenants = remote("tenants", "1", true);
        let mut table = sluice_router::RouteTable::default();
        let mut enc = ModelRoute { split: vec![("1".into(), 90), ("2".into(), 10)], ..ModelRoute::default() };
        enc.versions.insert("1".into(), Servable::Deployment(primary));
        enc.versions.insert("2".into(), Servable::Deployment(canary));
        table.models.insert("enc".into(), enc);
        let mut p = ModelRoute::default();
        p.versions.insert("1".into(), Servable::Pipeline(pipeline));
        table.models.insert("p".into(), p);
        let mut t = ModelRoute::default();
        t.versions.insert("1".into(), Servable::Deployment(tenants.clone()));
        table.models.insert("tenants".into(), t);
        let mut alias = ModelRoute::default();
        alias.versions.insert("1".into(), Servable::Multiplexed(tenants, Arc::from("acme")));
        table.models.insert("acme".into(), alias);
        let controller = Router::new(table);

        // Through JSON, as a proxy gets it.
        let json = serde_json::to_string(&take(&controller)).unwrap();
        let snapshot: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(snapshot.pipelines[0].steps[0].version.as_deref(), Some("1"));
        let proxy = Router::new(sluice_router::RouteTable::default());
        Follower::default().apply(&snapshot, &proxy);

        let Servable::Pipeline(p) = proxy.resolve("p", None).unwrap() else { panic!("not a pipeline") };
        assert_eq!(p.steps()[0].deployment.version(), "1");
        assert!(p.steps()[0].deployment.scales_to_zero(), "a proxy's readiness counts it ready at zero too");
        match proxy.resolve("acme", None).unwrap() {
            Servable::Multiplexed(d, id) => {
                assert_eq!((d.name(), d.version(), &*id), ("tenants", "1", "acme"))
            }
            _ => panic!("acme is not a multiplexed model"),
        }

        // A version that becomes multiplexed under the same name is started again as such
        // (the proxy kept the one-model deployment, and every request got a 400).
        let mut follower = Follower::default();
        follower.apply(&snapshot, &proxy);
        let pipeline = || match proxy.resolve("p", None).unwrap() {
            Servable::Pipeline(p) => p,
            _ => panic!("not a pipeline"),
        };
        // A change that leaves the pipeline as it was keeps it (its statistics live in it: they
        // went back to 0 with every route change).
        let before = pipeline();
        let mut moved = snapshot.clone();
        moved.models.get_mut("enc").unwrap().split = vec![("1".into(), 80), ("2".into(), 20)];
        follower.apply(&moved, &proxy);
        assert!(Arc::ptr_eq(&before, &pipeline()), "the same pipeline after a split change");
        let moved_enc = proxy.resolve("enc", Some("1")).unwrap();
        let mut flipped = snapshot.clone();
        flipped.models.get_mut("enc").unwrap().versions.get_mut("1").unwrap().multiplexed = true;
        follower.apply(&flipped, &proxy);
        let Servable::Deployment(d) = proxy.resolve("enc", Some("1")).unwrap() else {
            panic!("not a deployment")
        };
        assert!(d.spec().multiplexed, "the proxy follows the version's multiplexing");
        let replaced = match moved_enc {
            Servable::Deployment(d) => d,
            _ => panic!("not a deployment"),
        };
        assert!(
            replaced.is_retired(),
            "the deployment it replaced is retired: what was routed to it goes again"
        );
        assert!(!d.is_retired());
        // A version the table drops is retired too.
        let Servable::Deployment(canary) = proxy.resolve("enc", Some("2")).unwrap() else {
            panic!("not a deployment")
        };
        let mut dropped = flipped.clone();
        let enc = dropped.models.get_mut("enc").unwrap();
        enc.versions.remove("2");
        enc.split = vec![("1".into(), 100)];
        follower.apply(&dropped, &proxy);
        assert!(canary.is_retired() && !d.is_retired());
        assert!(!Arc::ptr_eq(&before, &pipeline()), "a step's deployment started again: a new pipeline");
        // Counting on in the old one's statistics (its Triton `/stats` went back to 0).
        assert!(std::ptr::eq(before.metrics(), pipeline().metrics()), "the same statistics");

        // A version that served through the proxy and was then scaled to zero on purpose reads
        // as at zero there too (it read as failing: the proxy said not ready, and no request
        // came to wake it).
        let mut served = snapshot.clone();
        let tenants = served.models.get_mut("tenants").unwrap().versions.get_mut("1").unwrap();
        tenants.scales_to_zero = true;
        tenants.replicas = vec![ReplicaEntry {
            name: "r-0".into(),
            addr: "127.0.0.1:9".into(),
            node_id: "w".into(),
            node_ip: "127.0.0.1".into(),
            pid: 7,
            ready: true,
        }];
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _in_runtime = runtime.enter(); // the replica's channel
        let mut follower = Follower::default();
        follower.apply(&served, &proxy);
        let tenants_here = || match proxy.resolve("tenants", Some("1")).unwrap() {
            Servable::Deployment(d) => d,
            _ => panic!("not a deployment"),
        };
        assert!(!tenants_here().at_zero_on_purpose(), "serving");
        let version = served.models.get_mut("tenants").unwrap().versions.get_mut("1").unwrap();
        version.replicas.clear();
        version.at_zero = true;
        follower.apply(&served, &proxy);
        assert!(tenants_here().at_zero_on_purpose(), "at zero on purpose, as the controller says");
        assert!(tenants_here().ready_or_at_zero(), "what readiness counts");

        // An older controller's snapshot (no step version) still runs the step on the primary.
        let mut old = snapshot.clone();
        old.pipelines[0].steps[0].version = None;
        Follower::default().apply(&old, &proxy);
        let Servable::Pipeline(p) = proxy.resolve("p", None).unwrap() else { panic!("not a pipeline") };
        assert_eq!(p.steps()[0].deployment.version(), "1");
    }

    /// A copy the table drops while it holds a request is reported, as retired, until the
    /// request is done (a pipeline's request still in an earlier step included): the
    /// controller keeps the version's replicas until then (it stopped them a second after its
    /// own drain, and the requests queued here went to replicas told to stop). A dropped copy
    /// with no replica refuses what waits in it at once: none comes.
    #[tokio::test]
    async fn a_retired_copy_is_reported_while_it_holds_requests() {
        let mut table = sluice_router::RouteTable::default();
        for model in ["m", "zero"] {
            let mut route = ModelRoute::default();
            route.versions.insert("1".into(), Servable::Deployment(remote(model, "1", false)));
            table.models.insert(model.into(), route);
        }
        let mut snapshot = take(&Router::new(table));
        snapshot.generation = 3;
        // `m` has a replica, not ready: a request waits in the copy for it.
        snapshot.models.get_mut("m").unwrap().versions.get_mut("1").unwrap().replicas = vec![ReplicaEntry {
            name: "r-0".into(),
            addr: "127.0.0.1:9".into(),
            node_id: "w".into(),
            node_ip: "127.0.0.1".into(),
            pid: 7,
            ready: false,
        }];
        let proxy = Router::new(sluice_router::RouteTable::default());
        let mut follower = Follower::default();
        assert_eq!(follower.applied(), None);
        follower.apply(&snapshot, &proxy);
        assert_eq!(follower.applied(), Some(3), "nothing retired: at once");
        let copy = |model: &str| match proxy.resolve(model, Some("1")).unwrap() {
            Servable::Deployment(d) => d,
            _ => panic!("not a deployment"),
        };
        let (m, zero) = (copy("m"), copy("zero"));
        assert!(follower.demand().is_empty());
        let request = || {
            let tensor =
                sluice_deployments::Tensor::new(DataType::Fp32, vec![1, 4], vec![0u8; 16].into()).unwrap();
            sluice_deployments::InferRequest {
                inputs: vec![sluice_deployments::NamedTensor { name: "in".into(), tensor }],
                ..Default::default()
            }
        };
        let waiting = tokio::spawn({
            let (m, request) = (m.clone(), request());
            async move { m.infer(request).await }
        });
        let at_zero = tokio::spawn({
            let (zero, request) = (zero.clone(), request());
            async move { zero.infer(request).await }
        });
        while follower.demand().len() < 2 {
            tokio::task::yield_now().await;
        }
        let held = |model: &str, in_system, queued, retired| VersionDemand {
            model: model.into(),
            version: "1".into(),
            in_system,
            queued,
            retired,
        };
        assert_eq!(follower.demand(), [held("m", 1, 1, false), held("zero", 1, 1, false)]);
        // The controller swaps both out (its table generation 4). Until a request routed to a
        // retired copy just before has had the time to enter it, the table before is reported.
        follower.apply(&Snapshot { generation: 4, ..Snapshot::default() }, &proxy);
        assert_eq!(follower.applied(), Some(3), "held back while a request may still enter");
        assert!(proxy.resolve("m", Some("1")).is_err());
        let refused = tokio::time::timeout(Duration::from_secs(5), at_zero).await.unwrap().unwrap();
        assert_eq!(refused.unwrap_err().kind, sluice_deployments::ErrorKind::Unavailable, "none comes");
        assert_eq!(follower.demand(), [held("m", 1, 1, true)], "held by a retired copy");
        // A pipeline request on its way to it (in an earlier step) counts too.
        let on_its_way = m.hold();
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(follower.demand(), [held("m", 1, 0, true)], "on its way");
        drop(on_its_way);
        assert!(follower.demand().is_empty(), "done: nothing held");
        // Let go once empty for a moment (a request routed to it just before it was retired
        // enters it within that).
        tokio::time::sleep(RETIRED_KEEP).await;
        assert!(follower.demand().is_empty());
        assert_eq!(follower.applied(), Some(4));
        assert!(follower.retired.is_empty(), "the copies let go");
    }

    /// A request waiting in a proxy's copy at zero replicas when its version is swapped out
    /// runs on the version that replaced it, as sent, with what is left of its time (it was
    /// answered 503, though the new version could serve it); with nothing in its place, 503.
    #[tokio::test]
    async fn a_request_waiting_in_a_copy_swapped_out_at_zero_goes_to_its_successor() {
        let mut route = ModelRoute::default();
        route.versions.insert("1".into(), Servable::Deployment(remote("zero", "1", false)));
        let mut table = sluice_router::RouteTable::default();
        table.models.insert("zero".into(), route);
        let first = take(&Router::new(table));
        // The same model at version 2 only.
        let mut second = first.clone();
        let entry = second.models.get_mut("zero").unwrap();
        let v = entry.versions.remove("1").unwrap();
        entry.versions.insert("2".into(), v);
        let proxy = Arc::new(Router::new(sluice_router::RouteTable::default()));
        let mut follower = Follower::default();
        follower.apply(&first, &proxy);
        let request = || {
            let tensor =
                sluice_deployments::Tensor::new(DataType::Fp32, vec![1, 4], vec![0u8; 16].into()).unwrap();
            sluice_deployments::InferRequest {
                id: Some("r-1".into()),
                inputs: vec![sluice_deployments::NamedTensor { name: "in".into(), tensor }],
                outputs: Some(vec!["out".into()]),
                timeout: Some(Duration::from_secs(10)),
                model_id: None,
            }
        };
        let held = |version: &str| VersionDemand {
            model: "zero".into(),
            version: version.into(),
            in_system: 1,
            queued: 1,
            retired: false,
        };
        // What a copy hands back: the request as sent, its timeout what was left of it.
        let copy = proxy.resolve("zero", None).unwrap();
        let handed = tokio::spawn(async move {
            let mut back = None;
            let answer = copy.infer_handing_back(request(), &mut back).await;
            (answer, back)
        });
        while follower.demand().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(follower.demand(), [held("1")]);
        follower.apply(&second, &proxy);
        let (answer, back) = tokio::time::timeout(Duration::from_secs(5), handed).await.unwrap().unwrap();
        assert_eq!(answer.unwrap_err().kind, sluice_deployments::ErrorKind::Unavailable);
        let back = back.expect("handed back");
        let sent = request();
        assert_eq!((&back.id, &back.outputs, &back.model_id), (&sent.id, &sent.outputs, &sent.model_id));
        assert_eq!(back.inputs.len(), 1);
        assert_eq!((&*back.inputs[0].name, back.inputs[0].tensor.shape()), ("in", &[1usize, 4][..]));
        let left = back.timeout.unwrap();
        assert!(left > Duration::from_secs(5) && left < Duration::from_secs(10), "what was left: {left:?}");

        // The frontends' path: the request waits in version 1, is handed back at the swap and
        // waits in version 2, which then answers it (here: 503 once it is removed in turn).
        follower.apply(&first, &proxy);
        let copy = proxy.resolve("zero", None).unwrap();
        let waiting = tokio::spawn({
            let proxy = proxy.clone();
            async move { proxy.infer(&copy, "zero", sluice_router::VersionChoice::default(), request()).await }
        });
        while follower.demand() != [held("1")] {
            tokio::task::yield_now().await;
        }
        follower.apply(&second, &proxy);
        let moved = tokio::time::timeout(Duration::from_secs(5), async {
            while follower.demand() != [held("2")] {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        moved.await.expect("the request waits in version 2");
        assert!(!waiting.is_finished());
        follower.apply(&Snapshot::default(), &proxy);
        let (answer, served_by) =
            tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
        assert_eq!(
            answer.unwrap_err().kind,
            sluice_deployments::ErrorKind::Unavailable,
            "nothing routes it now"
        );
        assert_eq!(
            served_by.and_then(|s| s.deployment().map(|d| d.version().to_string())).as_deref(),
            Some("2")
        );
    }

    /// A request a multiplexed model's route hands back carries the model id only where its
    /// caller sent one: the id the route added is the route's (routed again, to a deployment
    /// that is not multiplexed, it was refused for naming one).
    #[tokio::test]
    async fn a_handed_back_request_carries_the_model_id_its_caller_sent() {
        for sent in [None, Some("acme".to_string())] {
            let d = remote("tenants", "1", true);
            let route = Servable::Multiplexed(d.clone(), Arc::from("acme"));
            let tensor =
                sluice_deployments::Tensor::new(DataType::Fp32, vec![1, 4], vec![0u8; 16].into()).unwrap();
            let request = sluice_deployments::InferRequest {
                inputs: vec![sluice_deployments::NamedTensor { name: "in".into(), tensor }],
                model_id: sent.clone(),
                ..Default::default()
            };
            let handed = tokio::spawn(async move {
                let mut back = None;
                let _ = route.infer_handing_back(request, &mut back).await;
                back
            });
            while d.queue_depth() == 0 {
                tokio::task::yield_now().await;
            }
            d.mark_retired();
            d.close_handing_back();
            let back = tokio::time::timeout(Duration::from_secs(5), handed).await.unwrap().unwrap();
            assert_eq!(back.expect("handed back").model_id, sent);
        }
    }

    /// What the copies of versions in a traffic split answer is reported (for a canary's
    /// rollout at the controller), counted as the frontends count it; a model with one version
    /// sends nothing.
    #[test]
    fn what_a_canary_and_its_primary_answered_here_is_reported() {
        let mut table = sluice_router::RouteTable::default();
        let mut split =
            ModelRoute { split: vec![("1".into(), 90), ("2".into(), 10)], ..ModelRoute::default() };
        for v in ["1", "2"] {
            split.versions.insert(v.into(), Servable::Deployment(remote("m", v, false)));
        }
        table.models.insert("m".into(), split);
        let mut solo = ModelRoute::default();
        solo.versions.insert("1".into(), Servable::Deployment(remote("solo", "1", false)));
        table.models.insert("solo".into(), solo);
        let snapshot = take(&Router::new(table));
        let proxy = Router::new(sluice_router::RouteTable::default());
        let mut follower = Follower::default();
        follower.apply(&snapshot, &proxy);
        let zero = follower.served();
        assert_eq!(
            zero.iter().map(|v| (&*v.version, v.success + v.failed)).collect::<Vec<_>>(),
            [("1", 0), ("2", 0)]
        );
        let rest = sluice_deployments::metrics::Protocol::Rest;
        for (model, version, result) in [
            ("m", "2", Ok(())),
            ("m", "2", Err(sluice_deployments::ErrorKind::Internal)),
            ("m", "2", Err(sluice_deployments::ErrorKind::InvalidArgument)),
            ("solo", "1", Ok(())),
        ] {
            let copy = proxy.resolve(model, Some(version)).unwrap();
            copy.metrics().request(rest, result, Duration::from_millis(3));
        }
        let served = follower.served();
        assert_eq!(served.len(), 2, "the split's two versions, not `solo`: {served:?}");
        assert_eq!(served[0].copy, zero[0].copy, "the same copy");
        assert_ne!(served[0].copy, served[1].copy);
        let v = &served[1];
        assert_eq!(
            (&*v.model, &*v.version, v.success, v.failed),
            ("m", "2", 1, 1),
            "a bad request is not the canary's failure"
        );
        assert_eq!(v.latencies.iter().map(|(_, n)| n).sum::<u64>(), 3);
    }

    /// A snapshot says which table generation it is at least as new as (read before the
    /// table); one from an older controller, without it, reads as 0.
    #[test]
    fn a_snapshot_says_its_generation() {
        let routes = Router::new(sluice_router::RouteTable::default());
        let first = take(&routes).generation;
        assert_eq!(first, routes.generation());
        routes.publish(sluice_router::RouteTable::default());
        assert_eq!(take(&routes).generation, first + 1);
        let old: Snapshot = serde_json::from_str(r#"{"models": {}, "pipelines": []}"#).unwrap();
        assert_eq!(old.generation, 0);
    }
}
