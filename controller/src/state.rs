//! What the controller holds under its one lock: the running deployments and their versions,
//! the config last applied, the pipelines over them, and the recent events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sluice_config::{Autoscaling, Config, Model, ReplicaSettings, Rollout};
use sluice_deployments::{Deployment, Pipeline};

use crate::autoscale::ScaleState;
use crate::cluster::Placed;
use crate::events::Events;
use crate::rollout::Counters;
use crate::traffic::TrafficWindow;

/// Everything that decides whether a running version can keep serving a config: two equal keys
/// mean the same replicas would be built. Compared whole, so a setting added to
/// [`ReplicaSettings`] can never be left out of the decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VersionKey {
    pub version: String,
    pub model: Model,
    pub settings: ReplicaSettings,
    /// Each file the model is read from as it is now: the model file and, for an ONNX model,
    /// the files its external weights are in.
    pub files: Vec<FileStamp>,
}

impl VersionKey {
    /// The same version, model path and settings, whatever the files hold now.
    pub fn same_but_files(&self, other: &VersionKey) -> bool {
        self.version == other.version && self.model == other.model && self.settings == other.settings
    }
}

/// A file's path and, when it can be read, its size, modification time, inode and
/// status-change time (a rewrite that keeps the size and modification time, as `cp -p` does,
/// moves the last; a file replaced by a rename has another inode).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FileStamp {
    pub path: PathBuf,
    pub seen: Option<(u64, Option<SystemTime>, u64, i64, i64)>,
}

impl VersionKey {
    /// The key of `model` at `version` with `settings`, stamping its files now.
    pub fn new(version: &str, model: &Model, settings: &ReplicaSettings) -> Self {
        use std::os::unix::fs::MetadataExt;
        let mut paths: Vec<PathBuf> = model.files().into_iter().map(PathBuf::from).collect();
        if let Some(onnx) = model.onnx_path() {
            paths.extend(sluice_deployments::weights::external_files(onnx));
        }
        let files = paths
            .into_iter()
            .map(|path| FileStamp {
                seen: std::fs::metadata(&path)
                    .ok()
                    .map(|m| (m.len(), m.modified().ok(), m.ino(), m.ctime(), m.ctime_nsec())),
                path,
            })
            .collect();
        Self { version: version.to_string(), model: model.clone(), settings: settings.clone(), files }
    }
}

/// One running version of a deployment.
#[derive(Clone)]
pub(crate) struct Version {
    pub key: VersionKey,
    pub deployment: Arc<Deployment>,
    /// Where its replicas run.
    pub placed: Placed,
    /// Its recent traffic, sampled by the control loop.
    pub traffic: TrafficWindow,
}

impl Version {
    pub fn new(key: VersionKey, deployment: Arc<Deployment>, placed: Placed) -> Self {
        Self { key, deployment, placed, traffic: TrafficWindow::default() }
    }

    pub fn name(&self) -> &str {
        &self.key.version
    }

    /// Replicas wanted or running.
    pub fn replica_count(&self) -> usize {
        self.placed.count(&self.deployment)
    }

    pub async fn scale_to(&self, n: usize) -> Result<(), sluice_deployments::LoadError> {
        self.placed.scale_to(&self.deployment, n).await
    }
}

/// An automatic rollout in progress.
pub(crate) struct RolloutState {
    pub config: Rollout,
    /// When the current interval ends.
    pub next_step: Instant,
    /// The canary's counters at the start of the interval.
    pub baseline: Counters,
    /// Promote by itself at 100 % (a repository rollout).
    pub auto_promote: bool,
    /// With `min_shadow_agreement`: the primary's requests copied to the canary, for the gate.
    pub mirror: Option<Arc<sluice_deployments::Shadow>>,
}

impl RolloutState {
    /// The canary's counters now, with its agreement as a shadow of the primary, and what
    /// proxies on other nodes have sent it (`remote`, by their reports; shadow copies are the
    /// head's only: proxies do not mirror).
    pub fn counters(&self, canary: &Version, remote: &crate::demand::RemoteDemand) -> Counters {
        let d = &canary.deployment;
        let now = Instant::now();
        let mut counters = Counters::with_shadow(d, self.mirror.as_deref());
        counters.proxies = remote.served(d.name(), d.version(), now);
        counters.taken = Some(now);
        counters
    }
}

/// A canary version and its share of the traffic.
pub(crate) struct CanaryState {
    pub version: Version,
    pub weight: u32,
    /// The weight the config last gave it: a later config with the same weight leaves `weight`
    /// as a rollout, a rollback or a hand set it since.
    pub config_weight: u32,
    /// The rollout the config last gave it: a later config with another one (added, removed
    /// or with other bounds) replaces the running rollout; the same one leaves it as it is.
    pub config_rollout: Option<Rollout>,
    pub rollout: Option<RolloutState>,
    /// Its own load, sampled with its deployment's autoscaler (an autoscaled deployment's
    /// canary is sized by it, [`crate::autoscale::step`]).
    pub window: crate::autoscale::ScaleState,
    /// Its last change of replica count failed: tried again at the failure's retry time.
    pub scale_failure: Option<ScaleFailure>,
}

/// A shadow version and the copies it gets.
pub(crate) struct ShadowState {
    pub version: Version,
    pub shadow: Arc<sluice_deployments::Shadow>,
}

/// The autoscaler of one deployment.
pub(crate) struct ScalingState {
    pub config: Autoscaling,
    pub window: ScaleState,
    /// When the load was last sampled and a decision made.
    pub last_decision: Instant,
}

/// A deployment as the controller runs it.
pub(crate) struct Managed {
    pub app: String,
    pub config: sluice_config::Deployment,
    pub primary: Version,
    /// Versions served by exact version only (a repository's version policy).
    pub others: Vec<Version>,
    pub canary: Option<CanaryState>,
    pub shadow: Option<ShadowState>,
    pub scaling: Option<ScalingState>,
    /// The primary's last change of replica count failed (a replica did not load): shown in
    /// status while it has fewer replicas than its config's count, and tried again.
    pub scale_failure: Option<ScaleFailure>,
    /// When the primary was last asked to grow from zero replicas (the status reads a wake
    /// that has had no ready replica for long as unhealthy).
    pub woken_at: Option<Instant>,
    /// Keeps the series labelled by its name alone (`sluice_canary_rollbacks_total`) in
    /// `/metrics` while it is deployed: a deleted deployment's stayed for good.
    pub series: std::sync::Arc<sluice_deployments::metrics::LabelOwner>,
}

/// A failed change of the primary's replica count ([`Managed::scale_failure`]).
#[derive(Debug, Clone)]
pub(crate) struct ScaleFailure {
    pub message: String,
    pub at: Instant,
    /// Failures in a row: each waits longer before the next try.
    pub failures: u32,
}

impl ScaleFailure {
    /// When to try again: 5 s after the first failure, doubling to 5 minutes.
    pub fn retry_at(&self) -> Instant {
        let wait = std::time::Duration::from_secs(5 * 2u64.pow(self.failures.saturating_sub(1).min(6)));
        self.at + wait.min(std::time::Duration::from_secs(300))
    }
}

impl Managed {
    /// The failure that left a fixed replica count short: (it, replicas running, the count),
    /// while the primary has fewer replicas than its config's count.
    pub fn short_of_count(&self) -> Option<(&ScaleFailure, usize, usize)> {
        let f = self.scale_failure.as_ref().filter(|_| self.scaling.is_none())?;
        let (running, wanted) = (self.primary.replica_count(), self.config.initial_replicas());
        (running < wanted).then_some((f, running, wanted))
    }

    /// The same for a canary of a fixed replica count (an autoscaled one's failure is retried
    /// by the autoscaler): (its failure, the canary, the count).
    pub fn canary_short_of_count(&self) -> Option<(&ScaleFailure, &Version, usize)> {
        let c = self.canary.as_ref()?;
        let f = c.scale_failure.as_ref().filter(|_| self.scaling.is_none())?;
        let wanted = self.config.initial_replicas().max(1);
        (c.version.replica_count() < wanted).then_some((f, &c.version, wanted))
    }

    /// Every running version: primary, others, canary.
    pub fn versions(&self) -> impl Iterator<Item = &Version> {
        std::iter::once(&self.primary).chain(&self.others).chain(self.canary.as_ref().map(|c| &c.version))
    }

    /// Every running version, the shadow too, to change.
    pub fn versions_mut(&mut self) -> impl Iterator<Item = &mut Version> {
        std::iter::once(&mut self.primary)
            .chain(&mut self.others)
            .chain(self.canary.as_mut().map(|c| &mut c.version))
            .chain(self.shadow.as_mut().map(|s| &mut s.version))
    }

    /// The primary's share of unpinned traffic.
    pub fn primary_weight(&self) -> u32 {
        self.canary.as_ref().map_or(100, |c| 100 - c.weight.min(100))
    }

    /// Every version of this deployment, to retire.
    pub fn into_versions(self) -> Vec<Version> {
        let mut out = vec![self.primary];
        out.extend(self.others);
        out.extend(self.canary.map(|c| c.version));
        out.extend(self.shadow.map(|s| s.version));
        out
    }
}

/// A running pipeline and where its plain-JSON route answers.
pub(crate) struct PipelineRoute {
    /// The application it belongs to.
    pub app: String,
    pub pipeline: Arc<Pipeline>,
    pub route_prefix: Option<String>,
}

/// How the last change to an application's config went.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DeployOutcome {
    /// Applied (its deployments tell how they are doing).
    Applied,
    /// Being applied now: new versions load and warm up.
    Deploying,
    /// Refused or failed to load, with why; what ran before keeps running.
    Failed(String),
}

/// What the controller remembers of one application's config, beyond its deployments.
#[derive(Debug, Clone)]
pub(crate) struct AppRecord {
    /// When its config was last deployed, seconds since the Unix epoch.
    pub deployed_at: f64,
    pub outcome: DeployOutcome,
    /// Fields of the submitted config that Sluice does not act on.
    pub ignored: Vec<String>,
    /// The deploy that last set `outcome` ([`crate::apps::begin`]): an earlier one finishing
    /// later leaves a newer one's `Deploying` alone.
    pub generation: u64,
}

/// The controller's state, under one lock.
#[derive(Default)]
pub(crate) struct ControllerState {
    pub deployments: BTreeMap<String, Managed>,
    /// The config last applied (before the repository's models were added).
    pub desired: Option<Config>,
    /// Repository models unloaded through the API.
    pub unloaded: BTreeSet<String>,
    pub pipelines: Vec<PipelineRoute>,
    /// The model repository: last listing, health, rejected versions.
    pub repo: crate::repository::RepoState,
    pub events: Events,
    /// The model ids each multiplexed deployment's folder holds, routed by name too.
    pub aliases: BTreeMap<String, Vec<String>>,
    pub aliases_scanned: Option<Instant>,
    /// Per application (every one in the config, and those whose deploy failed).
    pub apps: BTreeMap<String, AppRecord>,
    /// The (model, version) of every canary at the last publish: their weight gauges, set to 0
    /// once the canary is gone.
    pub canary_weights: BTreeSet<(String, String)>,
    /// What proxies on other nodes hold, by their last reports.
    pub remote_demand: crate::demand::RemoteDemand,
    /// Deploys begun so far (the last one's generation).
    pub deploys_begun: u64,
    /// The generation of the deploy being applied now; None while the model repository's
    /// models are applied on their own (a poll, `notify`, a load or unload).
    pub applying: Option<u64>,
    /// Of each change waiting for its turn (an apply, a delete): the first deploy generation
    /// asked for after it. Queued deploys from there on wait for that change.
    pub waiting: Vec<u64>,
    /// The replica counts autoscaling jobs still running grow versions to, by (deployment,
    /// canary): the CPUs they will take count as taken while their replicas load
    /// ([`crate::autoscale::step`]).
    pub growing: std::collections::HashMap<(String, bool), usize>,
}

impl ControllerState {
    /// Rescans the folders of multiplexed deployments; true when the ids changed.
    pub fn refresh_aliases(&mut self) -> bool {
        let mut aliases = BTreeMap::new();
        for (name, m) in &self.deployments {
            let Model::Multiplexed { dir, .. } = &m.primary.key.model else { continue };
            let mut ids: Vec<String> = std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.path().join("model.onnx").is_file())
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect()
                })
                .unwrap_or_default();
            ids.sort();
            aliases.insert(name.clone(), ids);
        }
        self.aliases_scanned = Some(Instant::now());
        let changed = aliases != self.aliases;
        self.aliases = aliases;
        changed
    }
}
