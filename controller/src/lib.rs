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
//!
//! State lives under one lock that is never held across an await; operations that change
//! which versions run (apply, delete, promote, repository load/unload) are serialized by a
//! second, async lock, so that model loading happens outside the state lock.

mod apply;
mod apps;
pub mod autoscale;
mod canary;
pub mod cluster;
pub mod demand;
mod error;
mod events;
mod pipelines;
mod reconcile;
pub mod repository;
pub mod rollout;
mod state;
mod status;
mod traffic;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sluice_deployments::Servable;
use sluice_router::{ModelRoute, RouteTable, Router};
use tokio::sync::Notify;

pub use error::ControlError;
pub use events::Event;
pub use pipelines::check as check_pipeline;
pub use repository::store::{StoreEnv, StoreError};
pub use repository::{APPLICATION as REPOSITORY_APPLICATION, Origin, RepositoryStatus};
pub use status::{
    ApplicationState, ApplicationStatus, AutoscalingStatus, DeploymentState, DeploymentStatus, ReplicaNode,
    ReplicaState, ReplicaStatus, ShadowStatus, Status, VersionStatus,
};
pub use traffic::{Traffic, WINDOW as TRAFFIC_WINDOW};

/// Runs a change to what serves (an apply, a delete, a promote, a load...) on a task of its own
/// and waits for its outcome, so that it runs to its end even when whoever asked goes away: an
/// HTTP handler's future is dropped when its client disconnects, and a change stopped between
/// its steps would leave its applications marked deploying for good, or routes published
/// that the next reconcile, built from what was recorded, quietly takes back.
pub async fn to_the_end<T: Send + 'static>(
    change: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(change).await {
        Ok(outcome) => outcome,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: only when the runtime itself shuts down, and its caller with it.
        Err(_) => std::future::pending().await,
    }
}

use cluster::Cluster;
use reconcile::Rescale;
use rollout::Counters;
use state::{ControllerState, Version};

/// The `sluice_canary_weight_percent` series of a (model, version).
fn canary_weight((model, version): &(String, String)) -> metrics::Gauge {
    let name = sluice_deployments::metrics::CANARY_WEIGHT;
    metrics::gauge!(name, "model" => model.clone(), "version" => version.clone())
}

/// The longest the control loop sleeps when nothing is due (it wakes earlier when anything
/// is, or when a request waits on a deployment with no replica).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// How often a draining version at zero replicas is looked at for requests waiting in it.
const RETIRED_WAKE_CHECK: Duration = Duration::from_millis(100);

/// The longest the repository loop sleeps between looks (a scan asked for is served within it).
const REPOSITORY_CHECK: Duration = Duration::from_millis(250);

/// How often the folders of multiplexed deployments are rescanned for new model ids.
const ALIAS_SCAN: Duration = Duration::from_secs(5);

/// Reconciles configs into running deployments. Cheap to share (`Arc`).
pub struct Controller {
    routes: Arc<Router>,
    state: Mutex<ControllerState>,
    /// Held by operations that change which versions run, for their whole length.
    changes: Arc<tokio::sync::Mutex<()>>,
    /// What proxies on other nodes hold (the state's handle too: the autoscaler reads it
    /// there), recorded without the state's lock.
    remote: demand::RemoteDemand,
    /// Background deploys ([`Controller::deploy`]) in the order they were asked for, applied
    /// in that order by whichever change next holds `changes` (a task spawned later may reach
    /// the lock first: the last config sent must be the one that stays).
    deploys: Mutex<std::collections::VecDeque<(u64, sluice_config::Config)>>,
    /// One wake-up for the control loop, shared with every deployment.
    wake: Arc<Notify>,
    /// Deployments whose rescale or promotion the control loop started and that still runs.
    busy: Mutex<std::collections::HashSet<String>>,
    grace: Duration,
    node_cpus: f64,
    cluster: Cluster,
    /// Cloud credentials and settings for an object-storage model repository.
    store_env: repository::store::StoreEnv,
}

/// A rescale job's target in [`state::ControllerState::growing`] while the job runs: taken out
/// when it ends, however it ends (a count left there would hold the CPUs for good).
struct Growing {
    controller: std::sync::Weak<Controller>,
    key: (String, bool),
}

impl Growing {
    fn new(controller: &Arc<Controller>, key: (String, bool), to: usize) -> Self {
        controller.lock().growing.insert(key.clone(), to);
        Self { controller: Arc::downgrade(controller), key }
    }
}

impl Drop for Growing {
    fn drop(&mut self) {
        if let Some(c) = self.controller.upgrade() {
            c.lock().growing.remove(&self.key);
        }
    }
}

impl Controller {
    /// A controller publishing into `routes`, running replicas where `cluster` says; retired
    /// deployments drain for at most `grace`; an object-storage repository is opened with
    /// `store_env`.
    pub fn new(
        routes: Arc<Router>,
        grace: Duration,
        cluster: Cluster,
        store_env: repository::store::StoreEnv,
    ) -> Arc<Self> {
        let node_cpus = std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0);
        let remote = demand::RemoteDemand::default();
        Arc::new(Self {
            routes,
            state: Mutex::new(ControllerState {
                remote_demand: remote.clone(),
                ..ControllerState::default()
            }),
            remote,
            changes: Arc::new(tokio::sync::Mutex::new(())),
            deploys: Mutex::new(std::collections::VecDeque::new()),
            wake: Arc::new(Notify::new()),
            busy: Mutex::new(Default::default()),
            grace,
            node_cpus,
            cluster,
            store_env,
        })
    }

    pub fn routes(&self) -> &Arc<Router> {
        &self.routes
    }

    /// Whether replicas run on a cluster (Ray) rather than in this process.
    pub fn on_cluster(&self) -> bool {
        matches!(self.cluster, Cluster::Ray(_))
    }

    /// The state. A panic while it was held cannot leave it half-changed in a way that
    /// matters more than stopping the control plane would, so a poisoned lock is recovered.
    fn lock(&self) -> MutexGuard<'_, ControllerState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the admin API and `sluice status` show.
    pub fn status(&self) -> Status {
        let st = self.lock();
        let mut status = status::status(&st);
        status.repository = st
            .desired
            .as_ref()
            .and_then(|c| c.model_repository.as_ref())
            .map(|r| repository::status(r, &st.repo));
        drop(st);
        if let Cluster::Ray(ray) = &self.cluster {
            status.proxies = ray
                .proxies()
                .into_iter()
                .map(|p| status::ProxyStatus {
                    name: p.name,
                    node_id: p.node_id,
                    node_ip: p.node_ip,
                    addr: p.addr,
                })
                .collect();
        }
        status
    }

    /// Keeps what a proxy on another node holds ([`demand`]): the autoscaler counts it beside
    /// the head's own requests. A request waiting there for a deployment at zero replicas wakes
    /// the control loop at once, which starts one.
    pub fn report_demand(&self, report: demand::DemandReport) {
        // The state is looked at only for a request waiting there (most reports, sent with every
        // poll, hold none).
        let waiting = |v: &&demand::VersionDemand| !v.retired && v.queued > 0;
        let from_zero = report.versions.iter().any(|v| waiting(&v)) && {
            let st = self.lock();
            report.versions.iter().filter(waiting).any(|v| {
                st.deployments.get(&v.model).is_some_and(|m| {
                    m.primary.deployment.version() == v.version && m.primary.replica_count() == 0
                })
            })
        };
        self.remote.record(report, Instant::now());
        if from_zero {
            self.wake.notify_one();
        }
    }

    /// Removes one application (or every one, with `None`). Returns the first deploy
    /// generation it kept ([`Controller::deploy`]): those asked for after it, applied after it.
    pub async fn delete(&self, app: Option<&str>) -> Result<u64, ControlError> {
        // Deploys asked for after this delete wait for it, and are kept by it.
        let after = self.lock().deploys_begun + 1;
        let _turn = self.take_turn(after).await;
        match app {
            // Deploys asked for before this delete-all would be deleted with the rest.
            None => self.abandon_deploys(after),
            Some(_) => self.run_deploys(Some(after)).await,
        }
        let retired = {
            let mut st = self.lock();
            if let Some(a) = app
                && !st.deployments.values().any(|m| m.app == a)
                && !st.apps.contains_key(a)
            {
                return Err(ControlError::UnknownApplication(a.to_string()));
            }
            let names: Vec<String> = st
                .deployments
                .iter()
                .filter(|(_, m)| app.is_none_or(|a| m.app == a))
                .map(|(n, _)| n.clone())
                .collect();
            let mut retired = Vec::new();
            for n in names {
                if let Some(m) = st.deployments.remove(&n) {
                    st.events.push(&n, "deleted");
                    retired.extend(m.into_versions());
                }
            }
            // Gone from the desired state too, so that a later repository change does not
            // bring it back; deleting the repository's application (or everything) stops
            // polling the repository until a config names one again.
            let gone = |name: &str| app.is_none_or(|a| a == name);
            st.apps.retain(|name, r| !gone(name) || apps::newer_deploying(r, after - 1));
            st.pipelines.retain(|p| !gone(&p.app));
            if let Some(desired) = &mut st.desired {
                desired.applications.retain(|a| !gone(&a.name));
                if gone(repository::APPLICATION) {
                    desired.model_repository = None;
                }
            }
            if gone(repository::APPLICATION) {
                st.repo.applied = None;
            }
            self.publish(&mut st);
            retired
        };
        // Deleted: its waiting requests are not served by a replica started for them.
        self.drain(retired, false);
        Ok(after)
    }

    /// Publishes the route table for `st`, and what goes with it: the canary weight gauges,
    /// and which deployments autoscaling may take to zero replicas (readiness counts those
    /// ready at zero).
    fn publish(&self, st: &mut ControllerState) {
        let mut table = RouteTable::default();
        for p in &st.pipelines {
            let mut route = ModelRoute::default();
            route.versions.insert("1".into(), Servable::Pipeline(p.pipeline.clone()));
            table.models.insert(p.pipeline.name().to_string(), route);
            if let Some(prefix) = &p.route_prefix {
                table.json_routes.insert(prefix.clone(), p.pipeline.clone());
            }
        }
        let mut canaries = BTreeSet::new();
        for (name, m) in &st.deployments {
            let mut route = ModelRoute::default();
            // Only the primary scales to zero (a canary keeps one replica at least).
            let to_zero = m.scaling.as_ref().is_some_and(|s| s.config.min_replicas == 0);
            for v in m.versions() {
                v.deployment.set_scales_to_zero(to_zero && std::ptr::eq(v, &m.primary));
                route.versions.insert(v.name().to_string(), Servable::Deployment(v.deployment.clone()));
            }
            let gate = m.canary.as_ref().and_then(|c| c.rollout.as_ref()?.mirror.clone());
            if let Some(shadow) = m.shadow.as_ref().map(|s| s.shadow.clone()).or(gate) {
                route.shadow = Some((m.primary.name().to_string(), shadow));
            }
            if let Some(c) = &m.canary {
                let series = (name.clone(), c.version.name().to_string());
                canary_weight(&series).set(f64::from(c.weight.min(100)));
                canaries.insert(series);
                route.split = vec![
                    (m.primary.name().to_string(), m.primary_weight()),
                    (c.version.name().to_string(), c.weight.min(100)),
                ];
            }
            table.models.insert(name.clone(), route);
        }
        // A multiplexed model's id answers as a model name, unless a deployment has it.
        for (deployment, ids) in &st.aliases {
            let Some(m) = st.deployments.get(deployment) else { continue };
            for id in ids {
                if table.models.contains_key(id) {
                    continue;
                }
                let mut route = ModelRoute::default();
                let servable = Servable::Multiplexed(m.primary.deployment.clone(), Arc::from(id.as_str()));
                route.versions.insert(m.primary.name().to_string(), servable);
                table.models.insert(id.clone(), route);
            }
        }
        // A canary gone (promoted: its version is the primary now; removed; deleted with its
        // deployment) reads 0, as a rolled-back one does: the alerts pick canaries by a weight
        // above 0 (SluiceCanaryErrors), and would otherwise judge a promoted version by the
        // canary's bound for good.
        for gone in st.canary_weights.difference(&canaries) {
            canary_weight(gone).set(0.0);
        }
        st.canary_weights = canaries;
        self.routes.publish(table);
    }

    /// Stops retired deployments once the requests already routed to them are done (or the
    /// grace timeout passes). With `serve_waiting` (a version swapped out, not deleted), a
    /// request waiting in a retired version at zero replicas (a pipeline's later step, swapped
    /// out while the request was in an earlier one) gets one replica to serve it: the autoscaler
    /// sizes only the versions that serve, and it waited for its deadline. With proxies on
    /// other nodes, it also waits until they have followed the change and what their retired
    /// copies hold is done ([`demand::proxies_let_go`]): they send those requests to its replicas.
    fn drain(&self, retired: Vec<Version>, serve_waiting: bool) {
        let grace = self.grace;
        // The table without them is published: this generation or a later one.
        let generation = self.routes.generation();
        let proxies =
            self.cluster.proxies_follow().map(|follow| (follow, self.remote.clone(), self.routes.clone()));
        for v in retired {
            let proxies = proxies.clone();
            tokio::spawn(async move {
                let d = &v.deployment;
                d.mark_retired();
                let published = tokio::time::Instant::now();
                // No successor of the same name serves it (the table is published): a proxy
                // still reporting it as routed has not followed yet.
                let proxies = proxies.map(|(follow, remote, routes)| {
                    (follow, remote, routes.resolve(d.name(), Some(d.version())).is_err())
                });
                let drained = async {
                    let mut woken = !serve_waiting;
                    let settled = d.settled();
                    tokio::pin!(settled);
                    loop {
                        tokio::select! {
                            () = &mut settled => return,
                            () = tokio::time::sleep(RETIRED_WAKE_CHECK) => {}
                        }
                        if !woken && v.replica_count() == 0 && d.queue_depth() > 0 {
                            woken = true;
                            // On a task of its own: on Ray the growth waits for its actor, and
                            // the drain goes on meanwhile.
                            let v = v.clone();
                            tokio::spawn(async move {
                                if let Err(e) = v.scale_to(1).await {
                                    tracing::warn!(
                                        deployment = v.deployment.name(),
                                        version = v.deployment.version(),
                                        "a retired version's waiting requests got no replica: {e}"
                                    );
                                }
                            });
                        }
                    }
                };
                let drained = async {
                    drained.await;
                    if let Some((follow, remote, unserved)) = proxies {
                        let retiring =
                            demand::Retiring { model: d.name(), version: d.version(), generation, unserved };
                        demand::proxies_let_go(&remote, retiring, published + follow).await;
                    }
                };
                if tokio::time::timeout(grace, drained).await.is_err() {
                    tracing::warn!(
                        deployment = d.name(),
                        version = d.version(),
                        "still busy after {grace:?}; stopping"
                    );
                }
                // Closed first: on Ray the stop removes each replica from the deployment, which
                // would otherwise set the (model, version) series a successor at the same
                // version shares to 0.
                d.close();
                v.placed.stop();
                tracing::info!(deployment = d.name(), version = d.version(), "drained and stopped");
            });
        }
    }

    /// Applies replica counts decided elsewhere (outside the state lock: new replicas load).
    async fn rescale(&self, jobs: Vec<Rescale>, why: &str) {
        for job in jobs {
            // A version no longer primary (a canary promoted over it since the decision, in
            // the same control round) is left to drain; the new primary is judged next round.
            // Likewise a canary no longer the canary (promoted, replaced or removed). The count
            // is held to the bounds of the config in force now: a decision made under the
            // config before can land after an apply that changed them.
            let is_target =
                |v: &state::Version| std::sync::Arc::ptr_eq(&v.deployment, &job.target.deployment);
            let bound_now = |to: usize| {
                let st = self.lock();
                let m = st.deployments.get(&job.deployment)?;
                let still = match job.canary {
                    false => is_target(&m.primary),
                    true => m.canary.as_ref().is_some_and(|c| is_target(&c.version)),
                };
                still.then(|| autoscale::held_to_config(&m.config, to, job.canary))
            };
            let Some(mut to) = bound_now(job.to) else { continue };
            let from = job.target.replica_count();
            if from == 0 && to > 0 && !job.canary {
                let mut st = self.lock();
                if let Some(m) = st.deployments.get_mut(&job.deployment) {
                    m.woken_at = Some(Instant::now());
                }
            }
            let mut outcome = job.target.scale_to(to).await;
            // An apply while the replicas loaded compared its bounds with the replicas loaded
            // so far (a scale to 8 at 3 when `max_replicas: 4` came): held to them again.
            for _ in 0..3 {
                match bound_now(to) {
                    Some(again) if outcome.is_ok() && again != to => {
                        to = again;
                        outcome = job.target.scale_to(to).await;
                    }
                    _ => break,
                }
            }
            let why = match job.canary {
                false => why.to_string(),
                true => format!("canary version {} {why}", job.target.name()),
            };
            let message = match &outcome {
                Ok(()) if to == 0 => {
                    // On purpose: readiness counts it ready at zero (its first request wakes it).
                    job.target.deployment.scaled_to_zero();
                    format!("{why} from {from} to 0 replicas")
                }
                Ok(()) => format!("{why} from {from} to {to} replicas"),
                Err(e) => format!("{why} to {to} replicas failed: {e}"),
            };
            let mut st = self.lock();
            let failure = |last: &Option<state::ScaleFailure>| match outcome {
                Ok(()) => None,
                Err(_) => Some(state::ScaleFailure {
                    message: message.clone(),
                    at: Instant::now(),
                    failures: last.as_ref().map_or(1, |f| f.failures.saturating_add(1)),
                }),
            };
            if let Some(m) = st.deployments.get_mut(&job.deployment) {
                match job.canary {
                    false if is_target(&m.primary) => m.scale_failure = failure(&m.scale_failure),
                    true => {
                        if let Some(c) = m.canary.as_mut().filter(|c| is_target(&c.version)) {
                            c.scale_failure = failure(&c.scale_failure);
                        }
                    }
                    false => {}
                }
            }
            st.events.push(&job.deployment, message);
        }
    }

    /// One round of autoscaling and rollout decisions; returns when the next round is due.
    /// (The model repository is polled by a loop of its own, [`Controller::spawn_loop`].) The
    /// changes decided run on tasks of their own, so that one deployment's replicas loading
    /// (or a promotion waiting for a repository apply) holds up no other deployment's scaling
    /// from zero or rollout; a deployment whose change still runs is judged after it.
    pub fn tick(self: &Arc<Self>) -> Instant {
        let now = Instant::now();
        let busy = self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let (rescale, retry, promote, mut next, turn) = {
            let mut st = self.lock();
            for m in st.deployments.values_mut() {
                for v in m.versions_mut() {
                    let d = v.deployment.clone();
                    v.traffic.sample(now, || Counters::of(&d));
                    // On Ray, replicas join the set only once serving: those starting or
                    // waiting for a node count in `sluice_replicas` too.
                    d.set_placed_elsewhere(v.replica_count().saturating_sub(d.replica_count()));
                }
            }
            if let Cluster::Ray(ray) = &self.cluster {
                for (deployment, message) in ray.take_notes() {
                    st.events.push(&deployment, message);
                }
                ray.reconcile_proxies();
            }
            // On Ray, Ray decides what fits where (a replica that does not fit waits); here,
            // growth stops at this machine's free CPUs.
            let cpus = matches!(self.cluster, Cluster::Local).then_some(self.node_cpus);
            // A canary's resize is one of the controller's changes, run while no other runs (a
            // promotion, which grows its canary first, must not interleave with it): canaries
            // are judged only when this round takes the turn, which every canary job of the
            // round then holds (let go when the last ends). While a change runs (a deploy
            // loading models, a promotion, a repository scan) they are not judged at all:
            // their jobs would wait for it with their deployments held busy.
            // Taken only where there is a canary (a repository scan that meets it skips to its
            // next poll).
            let canaries = st.deployments.values().any(|m| m.canary.is_some());
            let turn = canaries.then(|| self.changes.clone().try_lock_owned().ok().map(Arc::new)).flatten();
            let (rescale, next_scale) = autoscale::step(&mut st, now, cpus, &busy, turn.is_some());
            let mut retry = Vec::new();
            // A fixed replica count that failed to load a replica is tried again (the
            // autoscaler decides again on its own).
            let mut next_retry: Option<Instant> = None;
            // So is its canary's, with the turn (one change of a deployment a round: the
            // primary's first).
            for (name, m) in st.deployments.iter().filter(|(name, _)| !busy.contains(*name)) {
                let short = m.short_of_count().map(|(f, _, wanted)| (f, &m.primary, wanted, false));
                let canary = || m.canary_short_of_count().filter(|_| turn.is_some());
                let short = short.or_else(|| canary().map(|(f, v, wanted)| (f, v, wanted, true)));
                let Some((f, target, wanted, canary)) = short else { continue };
                if now >= f.retry_at() {
                    retry.push(Rescale {
                        deployment: name.clone(),
                        target: target.clone(),
                        to: wanted,
                        canary,
                    });
                } else {
                    next_retry = Some(next_retry.map_or(f.retry_at(), |n| n.min(f.retry_at())));
                }
            }
            // A change decided this round makes its deployment busy too: a promotion started
            // beside it would run at the same time.
            let mut busy_now = busy.clone();
            busy_now.extend(rescale.iter().chain(&retry).map(|r| r.deployment.clone()));
            let (next_rollout, promote) = self.step_rollouts(&mut st, now, &busy_now);
            if st.aliases_scanned.is_none_or(|t| now.duration_since(t) >= ALIAS_SCAN) && st.refresh_aliases()
            {
                self.publish(&mut st);
            }
            let next = [next_scale, next_rollout, next_retry].into_iter().flatten().min();
            (rescale, retry, promote, next.unwrap_or(now + IDLE_TICK), turn)
        };
        let jobs = rescale
            .into_iter()
            .map(|j| (j, "autoscaled"))
            .chain(retry.into_iter().map(|j| (j, "scaled again")));
        for (job, why) in jobs {
            // Only decided with the turn (above).
            let turn = turn.as_ref().filter(|_| job.canary).cloned();
            let growing = Growing::new(self, (job.deployment.clone(), job.canary), job.to);
            let c = self.clone();
            self.run_busy(job.deployment.clone(), async move {
                let (_turn, _growing) = (turn, growing);
                c.rescale(vec![job], why).await
            });
        }
        for (deployment, canary) in promote {
            let c = self.clone();
            self.run_busy(deployment.clone(), async move {
                if let Err(e) = c.promote_as(&deployment, "rollout complete: promoted", Some(canary)).await {
                    c.lock().events.push(&deployment, format!("promoting the canary failed: {e}"));
                }
            });
        }
        next = next.clamp(now + Duration::from_millis(1), now + IDLE_TICK);
        next
    }

    /// Runs `change` on a task of its own with `deployment` marked busy meanwhile; the loop
    /// looks again when it ends.
    fn run_busy(self: &Arc<Self>, deployment: String, change: impl Future<Output = ()> + Send + 'static) {
        self.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(deployment.clone());
        let c = self.clone();
        tokio::spawn(async move {
            change.await;
            c.busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&deployment);
            c.wake.notify_one();
        });
    }

    /// When the repository loop looks again: when a scan is due, and at least every
    /// [`REPOSITORY_CHECK`] (a scan asked for, or a config that gained a repository).
    fn next_repository_poll(&self) -> Instant {
        let now = Instant::now();
        let st = self.lock();
        let due = st.desired.as_ref().and_then(|c| repository::next_due(c, &st.repo));
        due.map_or(now + REPOSITORY_CHECK, |d| d.min(now + REPOSITORY_CHECK))
            .max(now + Duration::from_millis(10))
    }

    /// Runs autoscaling, rollouts and repository polling until the controller is dropped.
    pub fn spawn_loop(self: &Arc<Self>) {
        // The repository on its own: a scan that fetches and loads a new version (minutes for
        // a large one) holds up no autoscaling, scaling from zero or rollout step meanwhile.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                c.poll_repository().await;
                let next = c.next_repository_poll();
                drop(c);
                tokio::time::sleep_until(next.into()).await;
            }
        });
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(async move {
            loop {
                let Some(c) = weak.upgrade() else { return };
                let next = c.tick();
                drop(c);
                tokio::select! {
                    () = tokio::time::sleep_until(next.into()) => {}
                    () = wake.notified() => {}
                }
            }
        });
    }
}
