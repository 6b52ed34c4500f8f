//! The controller: holds the desired state (the config) and the actual state (running
//! deployments, their versions and replica counts), reconciles one into the other, and
//! publishes each new route table whole through the router's `ArcSwap`.
//!
//! - A new deployment is loaded and warmed before it is routed.
//! - A changed model file, version or deployment setting starts a new deployment, warms it,
//!   moves traffic to it in one route-table swap, then drains the old one (requests already
//!   routed to it finish there) and stops it: no request fails because of a swap.
//! - A changed replica count applies in place (`Deployment::scale_to`).
//! - A canary is a second deployment of the same model name; the route table splits traffic
//!   by weight. Weights change through the admin API, or step on a schedule (rollout) and
//!   roll back by themselves when the canary's error rate or p99 breaks its bound.
//! - Autoscaled deployments are resized from their in-flight + queued requests
//!   ([`autoscale`]).

pub mod autoscale;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sluice_config::{Autoscaling, Config, Rollout};
use sluice_deployments::metrics::LatencyBuckets;
use sluice_deployments::pipeline::{JsonMapping, Step, tensor_spec};
use sluice_deployments::{Deployment, Pipeline, Servable};
use sluice_router::{ModelRoute, RouteTable, Router};

use autoscale::ScaleState;

/// How long a new deployment may take to load and warm before an apply gives up on it.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Recent events kept for `status`.
const EVENTS_KEPT: usize = 200;

/// What needs new replicas when it changes: the model file (path, size, modification time) and
/// every setting replicas are built with. Replica counts and autoscaling are not part of it.
fn fingerprint(d: &sluice_config::Deployment, model: &std::path::Path, version: &str) -> String {
    let file = std::fs::metadata(model).ok().map(|m| (m.len(), m.modified().ok()));
    format!(
        "{model:?}|{file:?}|{version}|{}|{}|{}|{:?}|{:?}|{}|{}|{}|{}",
        d.intra_op_threads.value,
        d.max_batch_size.value,
        d.batch_wait_timeout_s.value,
        d.preferred_batch_sizes.value,
        d.pad.value,
        d.request_timeout_s.value,
        d.max_ongoing_requests.value,
        d.max_queued_requests.value,
        d.warmup
    )
}

struct Version {
    version: String,
    model: PathBuf,
    fingerprint: String,
    deployment: Arc<Deployment>,
}

struct CanaryState {
    version: Version,
    weight: u32,
    rollout: Option<RolloutState>,
}

struct RolloutState {
    config: Rollout,
    next_step: Instant,
    /// Canary counters at the start of the interval: (success, fail, latency buckets).
    baseline: (u64, u64, Vec<u64>),
}

struct Managed {
    app: String,
    config: sluice_config::Deployment,
    primary: Version,
    /// Versions served by exact version only (a repository's version policy).
    others: Vec<Version>,
    canary: Option<CanaryState>,
    autoscaling: Option<(Autoscaling, ScaleState, Instant)>,
}

/// What a repository scan found: (model, served version, extra versions) per model.
type RepoSignature = Vec<(String, String, Vec<String>)>;

/// One line of the controller's history.
#[derive(Clone)]
struct Event {
    at: f64,
    deployment: String,
    message: String,
}

/// Reconciles configs into running deployments. Cheap to share (`Arc`).
pub struct Controller {
    routes: Arc<Router>,
    state: tokio::sync::Mutex<BTreeMap<String, Managed>>,
    /// The config last applied (before adding the repository's models), and the repository
    /// models unloaded through the API.
    desired: Mutex<Option<Config>>,
    unloaded: Mutex<std::collections::BTreeSet<String>>,
    /// Pipelines and their JSON route prefixes, rebuilt on every apply.
    pipelines: Mutex<Vec<(Arc<Pipeline>, Option<String>)>>,
    last_poll: Mutex<Option<(Instant, RepoSignature)>>,
    events: Mutex<VecDeque<Event>>,
    grace: Duration,
    node_cpus: f64,
}

fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

async fn start_version(
    config: &sluice_config::Deployment,
    model: PathBuf,
    version: String,
    replicas: usize,
) -> Result<Version, String> {
    let mut cfg = config.clone();
    cfg.model.value = model.clone();
    cfg.version.value = version.clone();
    let name = cfg.name.value.clone();
    let fp = fingerprint(&cfg, &model, &version);
    let deployment = tokio::task::spawn_blocking(move || {
        let mut spec = sluice_deployments::DeploymentSpec::from_config(&cfg);
        spec.num_replicas = replicas;
        Deployment::load_spec(&cfg, spec)
    })
    .await
    .map_err(|e| format!("deployment `{name}`: loading failed: {e}"))?
    .map_err(|e| format!("deployment `{name}` version {version}: {e}"))?;
    let deployment = Arc::new(deployment);
    if replicas > 0 && !deployment.wait_ready(READY_TIMEOUT).await {
        return Err(format!("deployment `{name}` version {version}: replicas did not become ready"));
    }
    Ok(Version { version, model, fingerprint: fp, deployment })
}

impl Controller {
    pub fn new(routes: Arc<Router>, grace: Duration) -> Arc<Self> {
        let node_cpus = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
        Arc::new(Self {
            routes,
            state: tokio::sync::Mutex::new(BTreeMap::new()),
            desired: Mutex::new(None),
            unloaded: Mutex::new(Default::default()),
            pipelines: Mutex::new(Vec::new()),
            last_poll: Mutex::new(None),
            events: Mutex::new(VecDeque::new()),
            grace,
            node_cpus,
        })
    }

    pub fn routes(&self) -> &Arc<Router> {
        &self.routes
    }

    fn event(&self, deployment: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(deployment, "{message}");
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push_back(Event { at: now_unix(), deployment: deployment.to_string(), message });
        while events.len() > EVENTS_KEPT {
            events.pop_front();
        }
    }

    /// Makes the running state match `config` (every application in it, and the models of
    /// its model repository as the application `repository`; applications not in it are
    /// removed). New versions are loaded and warmed first; if any fails, nothing already
    /// serving changes.
    pub async fn apply(&self, config: &Config) -> Result<(), String> {
        let effective = self.with_repository(config)?;
        self.apply_effective(&effective).await?;
        *self.desired.lock().unwrap_or_else(|e| e.into_inner()) = Some(config.clone());
        Ok(())
    }

    /// `config` plus its repository's models (less those unloaded through the API).
    fn with_repository(&self, config: &Config) -> Result<Config, String> {
        let Some(repo) = &config.model_repository else { return Ok(config.clone()) };
        let skip: Vec<String> =
            self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        let models = repo.scan(&skip)?;
        let signature = models
            .iter()
            .map(|d| {
                (
                    d.name.value.clone(),
                    d.version.value.clone(),
                    d.extra_versions.iter().map(|(v, _)| v.clone()).collect(),
                )
            })
            .collect();
        *self.last_poll.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), signature));
        let mut effective = config.clone();
        for d in &models {
            if config.applications.iter().flat_map(|a| &a.deployments).any(|c| c.name.value == d.name.value) {
                return Err(format!(
                    "model `{}` is both in the model repository and in the config",
                    d.name.value
                ));
            }
        }
        if !models.is_empty() {
            effective.applications.push(sluice_config::Application::new("repository", models));
        }
        Ok(effective)
    }

    /// Rescans the model repository when its poll interval has passed, and applies what
    /// changed (new versions swap in, removed ones drain).
    async fn poll_repository(&self) {
        let Some(config) = self.desired.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let Some(repo) = &config.model_repository else { return };
        if repo.poll_interval_s <= 0.0 {
            return;
        }
        let previous = self.last_poll.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if previous
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs_f64(repo.poll_interval_s))
        {
            return;
        }
        let before = previous.map(|(_, s)| s);
        match self.with_repository(&config) {
            Ok(effective) => {
                let now = self.last_poll.lock().unwrap_or_else(|e| e.into_inner()).clone().map(|(_, s)| s);
                if now != before {
                    self.event("repository", "model repository changed; applying");
                    if let Err(e) = self.apply_effective(&effective).await {
                        self.event("repository", format!("applying the repository failed: {e}"));
                    }
                }
            }
            Err(e) => self.event("repository", format!("scanning the repository failed: {e}")),
        }
    }

    /// Loads (or reloads) a repository model now, undoing an unload.
    pub async fn load_model(&self, name: &str) -> Result<(), String> {
        let config = self.desired.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        if config.model_repository.is_none() {
            return Err("no model_repository is configured".into());
        }
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        let effective = self.with_repository(&config)?;
        if !effective.applications.iter().flat_map(|a| &a.deployments).any(|d| d.name.value == name) {
            return Err(format!("model `{name}` is not in the model repository"));
        }
        self.apply_effective(&effective).await
    }

    /// Stops serving a repository model until it is loaded again.
    pub async fn unload_model(&self, name: &str) -> Result<(), String> {
        let config = self.desired.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        let in_repo = self.state.lock().await.get(name).is_some_and(|m| m.app == "repository");
        if !in_repo {
            return Err(format!("model `{name}` is not a loaded repository model"));
        }
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        let effective = self.with_repository(&config)?;
        self.apply_effective(&effective).await
    }

    /// Repository models unloaded through the API.
    pub fn unloaded(&self) -> Vec<String> {
        self.unloaded.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    async fn apply_effective(&self, config: &Config) -> Result<(), String> {
        let mut state = self.state.lock().await;
        // 1. Start every version that is new or changed, touching nothing that serves.
        let mut plans = Vec::new();
        for app in &config.applications {
            for d in &app.deployments {
                let name = &d.name.value;
                let old = state.get(name);
                let fp = fingerprint(d, &d.model.value, &d.version.value);
                let primary = match old {
                    Some(m) if m.primary.fingerprint == fp => None,
                    _ => {
                        let replicas =
                            old.map_or(0, |m| m.primary.deployment.replica_count()).max(d.initial_replicas());
                        Some(
                            start_version(d, d.model.value.clone(), d.version.value.clone(), replicas)
                                .await?,
                        )
                    }
                };
                let canary = match &d.canary {
                    Some(c) => {
                        let cfp = fingerprint(d, &c.model.value, &c.version.value);
                        let same = old
                            .and_then(|m| m.canary.as_ref())
                            .is_some_and(|oc| oc.version.fingerprint == cfp);
                        if same {
                            None
                        } else {
                            let replicas = d.initial_replicas().max(1);
                            Some(
                                start_version(d, c.model.value.clone(), c.version.value.clone(), replicas)
                                    .await?,
                            )
                        }
                    }
                    None => None,
                };
                let mut others = Vec::new();
                for (version, model) in &d.extra_versions {
                    let ofp = fingerprint(d, model, version);
                    let running = old.is_some_and(|m| m.others.iter().any(|o| o.fingerprint == ofp));
                    if !running {
                        others.push(
                            start_version(d, model.clone(), version.clone(), d.initial_replicas().max(1))
                                .await?,
                        );
                    }
                }
                plans.push((app.name.value.clone(), d.clone(), primary, canary, others));
            }
        }
        // 1b. Build the pipelines over the deployments the new state will hold (checking that
        //     tensors agree between steps), still touching nothing that serves.
        let mut pipelines = Vec::new();
        for app in &config.applications {
            let Some(p) = &app.pipeline else { continue };
            let lookup = |name: &str| -> Option<Arc<Deployment>> {
                plans
                    .iter()
                    .find(|(_, d, ..)| d.name.value == name)
                    .and_then(|(_, _, new, ..)| new.as_ref().map(|v| v.deployment.clone()))
                    .or_else(|| state.get(name).map(|m| m.primary.deployment.clone()))
            };
            pipelines.push((build_pipeline(p, lookup)?, app.route_prefix.as_ref().map(|r| r.value.clone())));
        }
        // 2. Commit: build the new state, publish it in one swap, retire what it replaced.
        let mut retired: Vec<Arc<Deployment>> = Vec::new();
        let mut scale: Vec<(String, Arc<Deployment>, usize)> = Vec::new();
        let mut next = BTreeMap::new();
        for (app, d, new_primary, new_canary, new_others) in plans {
            let name = d.name.value.clone();
            let mut old = state.remove(&name);
            // Extra versions: keep the running ones still wanted, add new ones, retire the rest.
            let mut others = new_others;
            for o in old.as_mut().map(|m| std::mem::take(&mut m.others)).unwrap_or_default() {
                let wanted = d.extra_versions.iter().any(|(v, m)| fingerprint(&d, m, v) == o.fingerprint);
                if wanted {
                    others.push(o);
                } else {
                    self.event(&name, format!("version {} retired", o.version));
                    retired.push(o.deployment);
                }
            }
            let autoscaling = d.autoscaling();
            let (primary, old_canary, old_scaling) = match (new_primary, old) {
                (Some(v), Some(m)) => {
                    self.event(
                        &name,
                        format!("new model or settings: version {} warmed up and swapped in", v.version),
                    );
                    retired.push(m.primary.deployment);
                    (v, m.canary, m.autoscaling)
                }
                (Some(v), None) => {
                    self.event(
                        &name,
                        format!(
                            "started version {} with {} replica(s)",
                            v.version,
                            v.deployment.replica_count()
                        ),
                    );
                    (v, None, None)
                }
                (None, Some(m)) => {
                    let current = m.primary.deployment.replica_count();
                    let want = match &autoscaling {
                        Some(a) => current.clamp(a.min_replicas as usize, a.max_replicas as usize),
                        None => d.initial_replicas(),
                    };
                    if want != current {
                        scale.push((name.clone(), m.primary.deployment.clone(), want));
                    }
                    (m.primary, m.canary, m.autoscaling)
                }
                (None, None) => unreachable!("a new deployment always gets a primary in step 1"),
            };
            let canary = match (&d.canary, new_canary, old_canary) {
                (None, _, old) => {
                    if let Some(oc) = old {
                        self.event(&name, format!("canary version {} removed", oc.version.version));
                        retired.push(oc.version.deployment);
                    }
                    None
                }
                (Some(c), Some(v), old) => {
                    if let Some(oc) = old {
                        retired.push(oc.version.deployment);
                    }
                    self.event(&name, format!("canary version {} started at {}%", v.version, c.weight.value));
                    let rollout = c.rollout.clone().map(|r| RolloutState {
                        next_step: Instant::now() + Duration::from_secs_f64(r.interval_s),
                        baseline: counters(&v.deployment),
                        config: r,
                    });
                    Some(CanaryState { version: v, weight: c.weight.value, rollout })
                }
                (Some(c), None, Some(mut oc)) => {
                    // Same canary: a weight in the config applies unless a rollout drives it.
                    if oc.rollout.is_none() && oc.weight != c.weight.value {
                        self.event(&name, format!("canary weight set to {}%", c.weight.value));
                        oc.weight = c.weight.value;
                    }
                    Some(oc)
                }
                (Some(_), None, None) => None,
            };
            let autoscaling =
                autoscaling.map(|a| (a, old_scaling.map(|(_, s, _)| s).unwrap_or_default(), Instant::now()));
            next.insert(name, Managed { app, config: d, primary, others, canary, autoscaling });
        }
        for (name, gone) in std::mem::take(&mut *state) {
            self.event(&name, "removed");
            retired.push(gone.primary.deployment);
            retired.extend(gone.others.into_iter().map(|o| o.deployment));
            if let Some(c) = gone.canary {
                retired.push(c.version.deployment);
            }
        }
        *state = next;
        *self.pipelines.lock().unwrap_or_else(|e| e.into_inner()) = pipelines;
        self.publish(&state);
        drop(state);
        self.drain(retired);
        for (name, d, want) in scale {
            let from = d.replica_count();
            match d.scale_to(want).await {
                Ok(()) => self.event(&name, format!("scaled from {from} to {want} replicas")),
                Err(e) => self.event(&name, format!("scaling to {want} replicas failed: {e}")),
            }
        }
        Ok(())
    }

    /// Publishes the route table for `state`.
    fn publish(&self, state: &BTreeMap<String, Managed>) {
        let mut table = RouteTable::default();
        for (p, prefix) in self.pipelines.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let mut route = ModelRoute::default();
            route.versions.insert("1".into(), Servable::Pipeline(p.clone()));
            table.models.insert(p.name().to_string(), route);
            if let Some(prefix) = prefix {
                table.json_routes.insert(prefix.clone(), p.clone());
            }
        }
        for (name, m) in state {
            let mut route = ModelRoute::default();
            route
                .versions
                .insert(m.primary.version.clone(), Servable::Deployment(m.primary.deployment.clone()));
            for o in &m.others {
                route.versions.insert(o.version.clone(), Servable::Deployment(o.deployment.clone()));
            }
            if let Some(c) = &m.canary {
                route
                    .versions
                    .insert(c.version.version.clone(), Servable::Deployment(c.version.deployment.clone()));
                route.split = vec![
                    (m.primary.version.clone(), 100 - c.weight.min(100)),
                    (c.version.version.clone(), c.weight.min(100)),
                ];
            }
            table.models.insert(name.clone(), route);
        }
        self.routes.publish(table);
    }

    /// Stops retired deployments once the requests already routed to them are done (or the
    /// grace timeout passes).
    fn drain(&self, retired: Vec<Arc<Deployment>>) {
        let grace = self.grace;
        for d in retired {
            tokio::spawn(async move {
                let until = Instant::now() + grace;
                while d.in_system() > 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tracing::info!(deployment = d.name(), version = d.version(), "drained and stopped");
                drop(d);
            });
        }
    }

    /// Removes one application (or every one, with `None`).
    pub async fn delete(&self, app: Option<&str>) -> Result<(), String> {
        let mut state = self.state.lock().await;
        if let Some(a) = app
            && !state.values().any(|m| m.app == a)
        {
            return Err(format!("unknown application `{a}`"));
        }
        let names: Vec<String> =
            state.iter().filter(|(_, m)| app.is_none_or(|a| m.app == a)).map(|(n, _)| n.clone()).collect();
        let mut retired = Vec::new();
        for n in names {
            if let Some(m) = state.remove(&n) {
                self.event(&n, "deleted");
                retired.push(m.primary.deployment);
                retired.extend(m.others.into_iter().map(|o| o.deployment));
                if let Some(c) = m.canary {
                    retired.push(c.version.deployment);
                }
            }
        }
        self.publish(&state);
        drop(state);
        self.drain(retired);
        Ok(())
    }

    /// Sets a canary's weight by hand (stops an automatic rollout).
    pub async fn set_weight(&self, deployment: &str, weight: u32) -> Result<(), String> {
        let mut state = self.state.lock().await;
        let m = state.get_mut(deployment).ok_or_else(|| format!("unknown deployment `{deployment}`"))?;
        let c = m.canary.as_mut().ok_or_else(|| format!("deployment `{deployment}` has no canary"))?;
        if weight > 100 {
            return Err("weight is a percent: 0 to 100".into());
        }
        c.weight = weight;
        c.rollout = None;
        self.event(deployment, format!("canary weight set to {weight}%"));
        self.publish(&state);
        Ok(())
    }

    /// Makes the canary the primary version; the old primary drains and stops.
    pub async fn promote(&self, deployment: &str) -> Result<(), String> {
        let mut state = self.state.lock().await;
        let m = state.get_mut(deployment).ok_or_else(|| format!("unknown deployment `{deployment}`"))?;
        let c = m.canary.take().ok_or_else(|| format!("deployment `{deployment}` has no canary"))?;
        let old = std::mem::replace(&mut m.primary, c.version);
        m.config.model.value = m.primary.model.clone();
        m.config.version.value = m.primary.version.clone();
        m.config.canary = None;
        self.event(deployment, format!("promoted version {} (was {})", m.primary.version, old.version));
        self.publish(&state);
        drop(state);
        self.drain(vec![old.deployment]);
        Ok(())
    }

    /// Sends no more traffic to the canary (weight 0) and stops its rollout.
    pub async fn rollback(&self, deployment: &str, why: &str) -> Result<(), String> {
        let mut state = self.state.lock().await;
        self.rollback_locked(&mut state, deployment, why)
    }

    fn rollback_locked(
        &self,
        state: &mut BTreeMap<String, Managed>,
        deployment: &str,
        why: &str,
    ) -> Result<(), String> {
        let m = state.get_mut(deployment).ok_or_else(|| format!("unknown deployment `{deployment}`"))?;
        let c = m.canary.as_mut().ok_or_else(|| format!("deployment `{deployment}` has no canary"))?;
        c.weight = 0;
        c.rollout = None;
        self.event(deployment, format!("rolled back canary version {}: {why}", c.version.version));
        self.publish(state);
        Ok(())
    }

    /// One round of autoscaling and rollout decisions; called every `tick` by [`run`].
    pub async fn tick(&self) {
        self.poll_repository().await;
        let now = Instant::now();
        let mut state = self.state.lock().await;
        let used_cpus: f64 = state
            .values()
            .map(|m| m.primary.deployment.replica_count() as f64 * m.config.cpus_per_replica())
            .sum();
        let mut scale = Vec::new();
        for (name, m) in state.iter_mut() {
            let d = &m.primary.deployment;
            let cpus = m.config.cpus_per_replica();
            if let Some((cfg, s, last)) = &mut m.autoscaling {
                let current = d.replica_count() as u32;
                let from_zero = current == 0 && d.queue_depth() > 0;
                let interval = Duration::from_secs_f64(cfg.metrics_interval_s);
                if from_zero || now.duration_since(*last) >= interval {
                    *last = now;
                    s.sample(now, d.in_system() as f64, Duration::from_secs_f64(cfg.look_back_period_s));
                    let free = ((self.node_cpus - used_cpus) / cpus).floor().max(0.0) as u32;
                    let want =
                        if from_zero { 1 } else { autoscale::decide(cfg, s, current, now, current + free) };
                    if want != current {
                        scale.push((name.clone(), d.clone(), current, want));
                    }
                }
            }
        }
        let mut rollbacks = Vec::new();
        let mut steps = false;
        for (name, m) in state.iter_mut() {
            let Some(c) = &mut m.canary else { continue };
            let Some(r) = &mut c.rollout else { continue };
            if now < r.next_step {
                continue;
            }
            let after = counters(&c.version.deployment);
            let (ok, failed) = (after.0 - r.baseline.0, after.1 - r.baseline.1);
            let total = ok + failed;
            let p99 = LatencyBuckets::quantile(&r.baseline.2, &after.2, 0.99);
            r.next_step = now + Duration::from_secs_f64(r.config.interval_s);
            if total < r.config.min_requests {
                continue;
            }
            r.baseline = after;
            let error_rate = failed as f64 / total as f64;
            if error_rate > r.config.max_error_rate {
                rollbacks.push((
                    name.clone(),
                    format!(
                        "error rate {:.1}% over {total} requests is above max_error_rate {:.1}%",
                        error_rate * 100.0,
                        r.config.max_error_rate * 100.0
                    ),
                ));
                continue;
            }
            if let (Some(bound), Some(p99)) = (r.config.max_p99_ms, p99)
                && p99.as_secs_f64() * 1000.0 > bound
            {
                rollbacks.push((
                    name.clone(),
                    format!("p99 {:.1} ms is above max_p99_ms {bound} ms", p99.as_secs_f64() * 1000.0),
                ));
                continue;
            }
            let next = (c.weight + r.config.step_percent).min(100);
            if next != c.weight {
                c.weight = next;
                steps = true;
                self.event(
                    name,
                    format!(
                        "rollout: canary at {next}% (error rate {:.2}% over {total} requests)",
                        error_rate * 100.0
                    ),
                );
            }
            if next == 100 {
                c.rollout = None;
                self.event(
                    name,
                    "rollout complete: canary takes all traffic; promote it to retire the old version",
                );
            }
        }
        for (name, why) in rollbacks {
            let _ = self.rollback_locked(&mut state, &name, &why);
        }
        if steps {
            self.publish(&state);
        }
        drop(state);
        for (name, d, from, to) in scale {
            match d.scale_to(to as usize).await {
                Ok(()) => self.event(&name, format!("autoscaled from {from} to {to} replicas")),
                Err(e) => self.event(&name, format!("autoscaling to {to} replicas failed: {e}")),
            }
        }
    }

    /// Runs autoscaling and rollouts until the controller is dropped; wakes at once when a
    /// request waits on a deployment with no replica.
    pub fn spawn_loop(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                let hints: Vec<_> = c
                    .routes
                    .table()
                    .models
                    .values()
                    .flat_map(|m| m.versions.values().filter_map(|d| d.deployment().map(|d| d.scale_hint())))
                    .collect();
                c.tick().await;
                drop(c);
                let any_hint = async {
                    let waits: Vec<_> = hints.iter().map(|h| Box::pin(h.notified())).collect();
                    if !waits.is_empty() {
                        futures_select_all(waits).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = any_hint => {}
                }
            }
        });
    }

    /// The status the admin API and `sluice status` show.
    pub async fn status(&self) -> Value {
        let state = self.state.lock().await;
        let mut apps: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for (name, m) in state.iter() {
            let version = |v: &Version, weight: u32| {
                json!({
                    "version": v.version,
                    "model": v.model,
                    "weight": weight,
                    "replicas": v.deployment.replica_count(),
                    "ready_replicas": v.deployment.ready_replicas(),
                    "queued": v.deployment.queue_depth(),
                    "in_flight": v.deployment.in_system(),
                })
            };
            let primary_weight = m.canary.as_ref().map_or(100, |c| 100 - c.weight.min(100));
            let mut versions = vec![version(&m.primary, primary_weight)];
            versions.extend(m.others.iter().map(|o| version(o, 0)));
            if let Some(c) = &m.canary {
                let mut v = version(&c.version, c.weight);
                v["canary"] = json!(true);
                v["rollout"] = json!(c.rollout.is_some());
                versions.push(v);
            }
            let status = if m.primary.deployment.is_ready() || m.primary.deployment.replica_count() == 0 {
                "HEALTHY"
            } else {
                "UPDATING"
            };
            let autoscaling = m.autoscaling.as_ref().map(|(a, s, _)| {
                json!({"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                       "target_ongoing_requests": a.target_ongoing_requests, "average_load": s.average()})
            });
            apps.entry(m.app.clone()).or_default().insert(
                name.clone(),
                json!({"status": status, "versions": versions, "autoscaling": autoscaling}),
            );
        }
        let events: Vec<Value> = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|e| json!({"time": e.at, "deployment": e.deployment, "message": e.message}))
            .collect();
        let applications: serde_json::Map<String, Value> = apps
            .into_iter()
            .map(|(app, deployments)| (app, json!({"status": "RUNNING", "deployments": deployments})))
            .collect();
        json!({"applications": applications, "events": events})
    }
}

/// Successes, server-side failures (not bad requests, overload or client deadlines) and
/// latency buckets of a deployment now.
fn counters(d: &Deployment) -> (u64, u64, Vec<u64>) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &d.metrics().stats;
    (s.success.count.load(Relaxed), s.server_errors.load(Relaxed), d.metrics().latencies.snapshot())
}

/// Resolves when any of `futures` does.
async fn futures_select_all<F: std::future::Future<Output = ()> + Unpin>(mut futures: Vec<F>) {
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// A running pipeline from its config, over the deployments `lookup` finds.
fn build_pipeline(
    p: &sluice_config::Pipeline,
    lookup: impl Fn(&str) -> Option<Arc<Deployment>>,
) -> Result<Arc<Pipeline>, String> {
    let name = &p.name.value;
    let all: Vec<String> = p.steps.iter().map(|s| s.deployment.value.clone()).collect();
    let order = p.check(&all).map_err(|problems| {
        problems
            .into_iter()
            .map(|(_, f, m)| format!("pipeline `{name}` {f}: {m}"))
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let inputs = p
        .inputs
        .iter()
        .map(|t| tensor_spec(&t.name, &t.datatype, &t.shape))
        .collect::<Result<Vec<_>, _>>()?;
    let mut steps = Vec::new();
    for i in order {
        let s = &p.steps[i];
        let deployment = lookup(&s.deployment.value).ok_or_else(|| {
            format!("pipeline `{name}` step `{}`: unknown deployment `{}`", s.name.value, s.deployment.value)
        })?;
        steps.push(Step {
            name: s.name.value.clone(),
            deployment,
            inputs: s.inputs.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            outputs: s.outputs.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
        });
    }
    let json = p.route.as_ref().map(|r| JsonMapping {
        request: r.request.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
        response: r.response.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
    });
    Pipeline::new(name, inputs, steps, &p.outputs, json)
        .map(Arc::new)
        .map_err(|e| format!("pipeline `{name}`: {e}"))
}
