//! Reconciling a config into running deployments, in three steps:
//! 1. [`plan`] (pure): per deployment, which versions keep running and which must start;
//! 2. [`start`]: load and warm every new version, touching nothing that serves (if one fails,
//!    the ones started are dropped and nothing changed);
//! 3. [`commit`] (pure, under the lock): the new state, what it retires and what it resizes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_config::{Config, Deployment as DeploymentConfig, Model};
use sluice_deployments::DeploymentSpec;
use tokio::sync::Notify;

use crate::ControlError;
use crate::cluster::Cluster;
use crate::demand::RemoteDemand;
use crate::events::Events;
use crate::rollout::Counters;
use crate::state::{
    CanaryState, ControllerState, Managed, RolloutState, ScalingState, ShadowState, Version, VersionKey,
};

/// How long a new version may take to load and warm before an apply gives up on it.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// What happens to one version of a deployment.
pub(crate) enum Change {
    /// The running version with this key fits the config: keep it.
    Keep(VersionKey),
    /// Start this version with this many replicas.
    Start { key: VersionKey, replicas: usize },
    /// Started and warmed, ready to be committed.
    New(Version),
}

/// The plan for one deployment of the config.
pub(crate) struct DeploymentPlan {
    pub app: String,
    pub config: DeploymentConfig,
    pub primary: Change,
    /// None when the config has no canary.
    pub canary: Option<Change>,
    /// None when the config has no shadow.
    pub shadow: Option<Change>,
    /// One per `extra_versions` entry of the config, in its order.
    pub others: Vec<Change>,
    /// Whether the deployment runs already (a new primary then replaces one that serves).
    pub running: bool,
}

/// The plan for a whole config. Deployments running but not in it are removed at commit.
pub(crate) struct Plan {
    pub deployments: Vec<DeploymentPlan>,
}

/// A plan until it is committed: dropped before (a later version failed to start, a pipeline
/// over the new versions failed its check, or the caller went away while replicas loaded), it
/// stops every version it started. Nothing routes to them yet; on Ray their actors would
/// otherwise stay, holding their CPUs and GPUs, until the job ends (locally, dropping a
/// deployment stops its threads anyway).
pub(crate) struct Uncommitted(Option<Plan>);

impl Uncommitted {
    pub fn new(plan: Plan) -> Self {
        Self(Some(plan))
    }

    pub fn plan(&mut self) -> &mut Plan {
        self.0.as_mut().expect("a plan until it is committed")
    }

    /// The plan, to commit: no longer stopped when this is dropped.
    pub fn commit(mut self) -> Plan {
        self.0.take().expect("a plan until it is committed")
    }
}

impl Drop for Uncommitted {
    fn drop(&mut self) {
        if let Some(plan) = self.0.take() {
            plan.discard();
        }
    }
}

impl Plan {
    /// Stops every version the plan started (see [`Uncommitted`]).
    fn discard(self) {
        for p in self.deployments {
            let changes = std::iter::once(p.primary).chain(p.canary).chain(p.shadow).chain(p.others);
            for change in changes {
                if let Change::New(v) = change {
                    v.placed.stop();
                }
            }
        }
    }

    /// The deployment a name will have as primary once committed: a new one if the plan
    /// starts one.
    pub fn new_primary(&self, name: &str) -> Option<&Arc<sluice_deployments::Deployment>> {
        self.deployments.iter().find(|p| p.config.name == name).and_then(|p| match &p.primary {
            Change::New(v) => Some(&v.deployment),
            _ => None,
        })
    }
}

/// A replica count to apply once the commit is published.
pub(crate) struct Rescale {
    pub deployment: String,
    pub target: Version,
    pub to: usize,
    /// Decided for the deployment's canary (else its primary): applied only while `target` is
    /// still that (not once promoted, say).
    pub canary: bool,
}

/// What a commit leaves to do outside the lock.
#[derive(Default)]
pub(crate) struct Commit {
    /// Versions no route points to any more: drain, then stop.
    pub retired: Vec<Version>,
    pub rescale: Vec<Rescale>,
}

/// The new primaries of `plan` (started, not committed) that must grow before they take the
/// traffic of the versions they replace: each with the count its old version runs now, within
/// the new one's autoscaling bounds, where that is more than it has.
pub(crate) fn growth(plan: &Plan, st: &ControllerState) -> Vec<(Version, usize)> {
    plan.deployments
        .iter()
        .filter_map(|p| {
            let Change::New(v) = &p.primary else { return None };
            let a = p.config.autoscaling()?;
            let old = st.deployments.get(&p.config.name)?;
            let want = a.bound(old.primary.replica_count());
            (want > v.replica_count()).then(|| (v.clone(), want))
        })
        .collect()
}

/// Step 1: what must start for the running state to match `config`.
pub(crate) fn plan(state: &ControllerState, config: &Config) -> Plan {
    let deployments = config
        .applications
        .iter()
        .flat_map(|app| app.deployments.iter().map(move |d| (app.name.as_str(), d)))
        .map(|(app, d)| {
            // A repository version whose files changed under it and then failed to load is
            // rejected; the copy loaded before keeps serving it (see `scan::select`).
            let rejected = app == crate::repository::APPLICATION
                && d.version
                    .parse()
                    .is_ok_and(|v: u64| state.repo.rejected.contains_key(&(d.name.clone(), v)));
            plan_deployment(state.deployments.get(&d.name), app, d, rejected)
        })
        .collect();
    Plan { deployments }
}

/// `files_rejected`: the files `d` names now were refused; a primary running the same version
/// from its earlier files is kept.
fn plan_deployment(
    old: Option<&Managed>,
    app: &str,
    d: &DeploymentConfig,
    files_rejected: bool,
) -> DeploymentPlan {
    let change = |key: VersionKey, running: bool, replicas: usize| match running {
        true => Change::Keep(key),
        false => Change::Start { key, replicas },
    };
    let key = VersionKey::new(&d.version, &d.model, &d.settings);
    let running =
        old.is_some_and(|m| m.primary.key == key || (files_rejected && m.primary.key.same_but_files(&key)));
    let replicas = match d.autoscaling() {
        // A new version takes the traffic the old one's autoscaler sized for, within the new
        // bounds; a fixed count is the config's.
        Some(a) => a.bound(old.map_or(0, |m| m.primary.replica_count()).max(d.initial_replicas())),
        None => d.initial_replicas(),
    };
    let primary = change(key, running, replicas);
    let extra = d.initial_replicas().max(1);
    let canary = d.canary.as_ref().map(|c| {
        let key = VersionKey::new(&c.version, &Model::Onnx(c.model.clone()), &d.settings);
        let running = old.and_then(|m| m.canary.as_ref()).is_some_and(|oc| oc.version.key == key);
        change(key, running, extra)
    });
    let shadow = d.shadow.as_ref().map(|c| {
        let key = VersionKey::new(&c.version, &Model::Onnx(c.model.clone()), &d.settings);
        let running = old.and_then(|m| m.shadow.as_ref()).is_some_and(|os| os.version.key == key);
        change(key, running, extra)
    });
    let others = d
        .extra_versions
        .iter()
        .map(|(version, path)| {
            let key = VersionKey::new(version, &Model::Onnx(path.clone()), &d.settings);
            let running = old.is_some_and(|m| m.others.iter().any(|o| o.key == key));
            change(key, running, extra)
        })
        .collect();
    DeploymentPlan {
        app: app.to_string(),
        config: d.clone(),
        primary,
        canary,
        shadow,
        others,
        running: old.is_some(),
    }
}

/// Step 2: loads and warms every version the plan starts, where `cluster` runs replicas.
/// `wake` is the controller's shared wake-up (a request waiting on a deployment with no
/// replica notifies it).
/// `origins`: where object-storage versions come from, by the model file they are cached at.
pub(crate) async fn start(
    plan: &mut Plan,
    cluster: &Cluster,
    wake: &Arc<Notify>,
    origins: &BTreeMap<std::path::PathBuf, crate::repository::Origin>,
) -> Result<(), ControlError> {
    for p in &mut plan.deployments {
        // A version that takes traffic from one that serves must have a replica up first; a
        // brand-new deployment may wait for Ray to find nodes (its status says so).
        let changes = std::iter::once((&mut p.primary, p.running))
            .chain(p.canary.as_mut().map(|c| (c, true)))
            .chain(p.shadow.as_mut().map(|c| (c, true)))
            .chain(p.others.iter_mut().map(|o| (o, true)));
        for (change, need_one) in changes {
            let Change::Start { key, replicas } = change else { continue };
            let spec = DeploymentSpec {
                name: p.config.name.clone(),
                version: key.version.clone(),
                num_replicas: *replicas,
                max_replicas: p.config.max_replicas(),
                settings: key.settings.clone(),
                wake: wake.clone(),
                multiplexed: matches!(key.model, sluice_config::Model::Multiplexed { .. }),
            };
            let origin = key.model.onnx_path().and_then(|p| origins.get(p)).cloned();
            let (deployment, placed) =
                cluster.start(spec, key.model.clone(), origin, need_one, READY_TIMEOUT).await?;
            *change = Change::New(Version::new(key.clone(), deployment, placed));
        }
    }
    Ok(())
}

/// Step 3: the state the started plan makes, recorded in the events.
pub(crate) fn commit(state: &mut ControllerState, plan: Plan) -> Commit {
    let mut out = Commit::default();
    let mut next = BTreeMap::new();
    for p in plan.deployments {
        let name = p.config.name.clone();
        let old = state.deployments.remove(&name);
        if let Some(m) = commit_deployment(&mut state.events, &state.remote_demand, p, old, &mut out) {
            next.insert(name, m);
        }
    }
    for (name, gone) in std::mem::take(&mut state.deployments) {
        state.events.push(&name, "removed");
        out.retired.extend(gone.into_versions());
    }
    state.deployments = next;
    out
}

fn commit_deployment(
    events: &mut Events,
    remote: &RemoteDemand,
    p: DeploymentPlan,
    old: Option<Managed>,
    out: &mut Commit,
) -> Option<Managed> {
    let name = p.config.name.clone();
    // A kept primary keeps its last failed change and the time it was woken from zero: status
    // says a deployment still failing to start from zero is failing, not "starting from zero"
    // anew after any apply (a deploy of another application, a repository change).
    let mut kept = (None, None);
    let (primary, old_canary, old_shadow, old_scaling, old_others, series) = match (p.primary, old) {
        (Change::New(v), Some(m)) => {
            events
                .push(&name, format!("new model or settings: version {} warmed up and swapped in", v.name()));
            // Sized when the swap was planned: the autoscaler may have grown the old version
            // while the new one loaded. It takes the old one's count now, within its bounds.
            if let Some(a) = p.config.autoscaling() {
                let want = a.bound(m.primary.replica_count());
                if want > v.replica_count() {
                    out.rescale.push(Rescale {
                        deployment: name.clone(),
                        target: v.clone(),
                        to: want,
                        canary: false,
                    });
                }
            }
            out.retired.push(m.primary);
            (v, m.canary, m.shadow, m.scaling, m.others, m.series)
        }
        (Change::New(v), None) => {
            let n = v.replica_count();
            events.push(&name, format!("started version {} with {n} replica(s)", v.name()));
            // At 0 from the start: an alert on its increase sees a first rollback that comes
            // before Prometheus has scraped the canary (registered when the canary started,
            // its first sample could already be 1, an increase of none).
            metrics::counter!(sluice_deployments::metrics::ROLLBACKS, "model" => name.clone()).absolute(0);
            let series = std::sync::Arc::new(sluice_deployments::metrics::LabelOwner::new("model", &name));
            (v, None, None, None, Vec::new(), series)
        }
        (Change::Keep(_), Some(m)) => {
            let current = m.primary.replica_count();
            let want = crate::autoscale::held_to_config(&p.config, current, false);
            if want != current {
                out.rescale.push(Rescale {
                    deployment: name.clone(),
                    target: m.primary.clone(),
                    to: want,
                    canary: false,
                });
            }
            kept = (m.scale_failure, m.woken_at);
            (m.primary, m.canary, m.shadow, m.scaling, m.others, m.series)
        }
        (Change::Keep(_) | Change::Start { .. }, old) => {
            // Only possible if the plan was not started or the deployment vanished meanwhile.
            tracing::error!(deployment = %name, "commit without a started primary; keeping what runs");
            return old;
        }
    };
    let canary = commit_canary(events, remote, &p.config, p.canary, old_canary, out);
    let shadow = commit_shadow(events, &p.config, p.shadow, old_shadow, out);
    let others = commit_others(events, &name, p.others, old_others, out);
    // The samples and the time of the last decision carry over: an apply (every repository
    // change, a deploy loop) does not hold the next decision back.
    let scaling = p.config.autoscaling().map(|a| {
        let (window, last_decision) =
            old_scaling.map_or_else(|| (Default::default(), Instant::now()), |s| (s.window, s.last_decision));
        ScalingState { config: a.clone(), window, last_decision }
    });
    Some(Managed {
        app: p.app,
        config: p.config,
        primary,
        others,
        canary,
        shadow,
        scaling,
        scale_failure: kept.0,
        woken_at: kept.1,
        series,
    })
}

fn commit_canary(
    events: &mut Events,
    remote: &RemoteDemand,
    d: &DeploymentConfig,
    change: Option<Change>,
    old: Option<CanaryState>,
    out: &mut Commit,
) -> Option<CanaryState> {
    let name = &d.name;
    match (&d.canary, change, old) {
        (None, _, old) => {
            if let Some(oc) = old {
                events.push(name, format!("canary version {} removed", oc.version.name()));
                out.retired.push(oc.version);
            }
            None
        }
        (Some(c), Some(Change::New(v)), old) => {
            out.retired.extend(old.map(|oc| oc.version));
            events.push(name, format!("canary version {} started at {}%", v.name(), c.weight));
            let rollout = c.rollout.clone().map(|r| start_rollout(r, c.auto_promote, &v, remote));
            Some(CanaryState {
                version: v,
                weight: c.weight,
                config_weight: c.weight,
                config_rollout: c.rollout.clone(),
                rollout,
                window: Default::default(),
                scale_failure: None,
            })
        }
        (Some(c), Some(Change::Keep(_)), Some(mut oc)) => {
            // Its count held to the config in force, as the primary's is.
            let current = oc.version.replica_count();
            let want = crate::autoscale::held_to_config(d, current, true);
            if want != current {
                out.rescale.push(Rescale {
                    deployment: name.clone(),
                    target: oc.version.clone(),
                    to: want,
                    canary: true,
                });
            }
            // Same canary: a weight the config changes applies unless a rollout drives it. An
            // unchanged one leaves what happened since (a rollback's 0, a completed rollout's
            // 100, a weight set by hand): the same config applied again, or a repository
            // change that reconciles it, must not undo them.
            if oc.rollout.is_none() && c.weight != oc.config_weight && oc.weight != c.weight {
                events.push(name, format!("canary weight set to {}%", c.weight));
                oc.weight = c.weight;
            }
            oc.config_weight = c.weight;
            // A rollout the config changes (added, removed, other bounds) takes over from the
            // current weight, judged from now; an unchanged one goes on (or stays ended).
            if c.rollout != oc.config_rollout {
                oc.rollout = c.rollout.clone().map(|r| start_rollout(r, c.auto_promote, &oc.version, remote));
                let what = match &oc.rollout {
                    Some(_) => format!("canary rollout (re)started by the config at {}%", oc.weight),
                    None => "canary rollout stopped by the config".to_string(),
                };
                events.push(name, what);
                oc.config_rollout = c.rollout.clone();
            }
            Some(oc)
        }
        (Some(_), _, old) => old,
    }
}

/// A rollout of canary `v` starting now, its first interval's counts from now on.
fn start_rollout(
    r: sluice_config::Rollout,
    auto_promote: bool,
    v: &Version,
    remote: &RemoteDemand,
) -> RolloutState {
    // The gate's copies: every request the primary serves, onto a free canary slot.
    let mirror = r
        .min_shadow_agreement
        .map(|_| std::sync::Arc::new(sluice_deployments::Shadow::new(v.deployment.clone(), 100)));
    let mut rollout = RolloutState {
        next_step: Instant::now() + Duration::from_secs_f64(r.interval_s),
        baseline: Counters::default(),
        config: r,
        auto_promote,
        mirror,
    };
    rollout.baseline = rollout.counters(v, remote);
    rollout
}

fn commit_shadow(
    events: &mut Events,
    d: &DeploymentConfig,
    change: Option<Change>,
    old: Option<ShadowState>,
    out: &mut Commit,
) -> Option<ShadowState> {
    let name = &d.name;
    match (&d.shadow, change, old) {
        (None, _, old) => {
            if let Some(os) = old {
                events.push(name, format!("shadow version {} removed", os.version.name()));
                out.retired.push(os.version);
            }
            None
        }
        (Some(c), Some(Change::New(v)), old) => {
            out.retired.extend(old.map(|os| os.version));
            events.push(
                name,
                format!(
                    "shadow version {} started: it gets copies of {}% of the requests",
                    v.name(),
                    c.percent
                ),
            );
            let shadow =
                std::sync::Arc::new(sluice_deployments::Shadow::new(v.deployment.clone(), c.percent));
            Some(ShadowState { version: v, shadow })
        }
        (Some(c), Some(Change::Keep(_)), Some(os)) => {
            if os.shadow.percent() != c.percent {
                events.push(name, format!("shadow now gets copies of {}% of the requests", c.percent));
                os.shadow.set_percent(c.percent);
            }
            Some(os)
        }
        (Some(_), _, old) => old,
    }
}

fn commit_others(
    events: &mut Events,
    name: &str,
    changes: Vec<Change>,
    mut old: Vec<Version>,
    out: &mut Commit,
) -> Vec<Version> {
    let mut others = Vec::new();
    for change in changes {
        match change {
            Change::New(v) => others.push(v),
            Change::Keep(key) => {
                if let Some(i) = old.iter().position(|o| o.key == key) {
                    others.push(old.remove(i));
                }
            }
            Change::Start { .. } => tracing::error!(deployment = %name, "commit of a version never started"),
        }
    }
    for o in old {
        events.push(name, format!("version {} retired", o.name()));
        out.retired.push(o);
    }
    others
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use sluice_config::{Application, Canary, Config, Deployment as DeploymentConfig, Model};
    use sluice_deployments::Deployment;

    use super::*;

    /// A config of ONNX deployments (the files need not exist: planning only stamps them).
    fn config(deployments: Vec<DeploymentConfig>) -> Config {
        Config { applications: vec![Application::new("app", deployments)], ..Config::default() }
    }

    fn onnx(name: &str) -> DeploymentConfig {
        DeploymentConfig::onnx(name, PathBuf::from(format!("/nonexistent/{name}.onnx")))
    }

    fn starts(c: &Change) -> Option<(&str, usize)> {
        match c {
            Change::Start { key, replicas } => Some((key.version.as_str(), *replicas)),
            _ => None,
        }
    }

    #[test]
    fn an_empty_state_starts_every_version_of_the_config() {
        let mut d = onnx("m");
        d.scaling = sluice_config::Scaling::Fixed(3);
        d.canary = Some(Canary {
            model: "/nonexistent/c.onnx".into(),
            version: "2".into(),
            weight: 10,
            rollout: None,
            auto_promote: false,
        });
        d.extra_versions = vec![("0".into(), "/nonexistent/old.onnx".into())];
        let plan = plan(&ControllerState::default(), &config(vec![d, onnx("n")]));
        assert_eq!(plan.deployments.len(), 2);
        let m = &plan.deployments[0];
        assert_eq!(m.app, "app");
        assert_eq!(starts(&m.primary), Some(("1", 3)));
        assert_eq!(m.canary.as_ref().and_then(starts), Some(("2", 3)));
        assert_eq!(m.others.iter().map(starts).collect::<Vec<_>>(), [Some(("0", 3))]);
        assert!(plan.deployments[1].canary.is_none());
    }

    #[test]
    fn every_replica_setting_and_builtin_field_is_part_of_the_key() {
        let base = VersionKey::new("1", &Model::Onnx("/x.onnx".into()), &Default::default());
        let mut settings = sluice_config::ReplicaSettings::default();
        settings.max_queued_requests += 1;
        assert_ne!(base, VersionKey::new("1", &Model::Onnx("/x.onnx".into()), &settings));
        assert_ne!(base, VersionKey::new("2", &Model::Onnx("/x.onnx".into()), &Default::default()));
        let top = |k| Model::Builtin(sluice_config::Builtin::TopK { k, labels: None });
        assert_ne!(
            VersionKey::new("1", &top(3), &Default::default()),
            VersionKey::new("1", &top(5), &Default::default()),
            "a changed built-in step setting needs new replicas"
        );
    }

    /// A running deployment of `d` (a stand-in backend that only has metadata), as the state
    /// would hold it after a commit.
    fn running(d: &DeploymentConfig) -> Managed {
        use sluice_deployments::{Backend, BackendFactory, InferError, ModelMetadata, NamedTensor};
        struct Idle(ModelMetadata);
        impl Backend for Idle {
            fn metadata(&self) -> &ModelMetadata {
                &self.0
            }
            fn infer(&mut self, _: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
                Ok(Vec::new())
            }
        }
        let factory: BackendFactory = std::sync::Arc::new(|| {
            Ok(Box::new(Idle(ModelMetadata { platform: "test".into(), inputs: vec![], outputs: vec![] }))
                as _)
        });
        let mut spec = DeploymentSpec::from_config(d);
        spec.num_replicas = 0;
        let deployment = std::sync::Arc::new(Deployment::start(spec, factory).unwrap());
        let key = VersionKey::new(&d.version, &d.model, &d.settings);
        Managed {
            app: "app".into(),
            config: d.clone(),
            primary: Version::new(key, deployment, crate::cluster::Placed::Local),
            others: Vec::new(),
            canary: None,
            shadow: None,
            scaling: None,
            scale_failure: None,
            woken_at: None,
            series: std::sync::Arc::new(sluice_deployments::metrics::LabelOwner::new("model", &d.name)),
        }
    }

    #[test]
    fn an_unchanged_deployment_is_kept_and_a_changed_one_restarts() {
        let (same, changed, count_only) = (onnx("same"), onnx("changed"), onnx("count"));
        let mut state = ControllerState::default();
        for d in [&same, &changed, &count_only] {
            state.deployments.insert(d.name.clone(), running(d));
        }
        let mut changed = changed;
        changed.settings.request_timeout_s = 5.0;
        let mut count_only = count_only;
        count_only.scaling = sluice_config::Scaling::Fixed(4);
        let plan = plan(&state, &config(vec![same, changed, count_only]));
        assert!(matches!(plan.deployments[0].primary, Change::Keep(_)), "same settings: kept");
        assert_eq!(starts(&plan.deployments[1].primary), Some(("1", 1)), "a setting changed: new replicas");
        assert!(matches!(plan.deployments[2].primary, Change::Keep(_)), "a replica count applies in place");
    }

    #[test]
    fn a_commit_removes_what_the_config_leaves_out_and_resizes_in_place() {
        let (kept, gone) = (onnx("kept"), onnx("gone"));
        let mut state = ControllerState::default();
        state.deployments.insert("kept".into(), running(&kept));
        state.deployments.insert("gone".into(), running(&gone));
        let mut kept = kept;
        kept.scaling = sluice_config::Scaling::Fixed(2);
        let plan = plan(&state, &config(vec![kept]));
        let commit = commit(&mut state, plan);
        assert_eq!(state.deployments.keys().collect::<Vec<_>>(), ["kept"]);
        assert_eq!(commit.retired.len(), 1);
        assert_eq!(commit.retired[0].deployment.name(), "gone");
        assert_eq!(
            commit.rescale.iter().map(|r| (r.deployment.as_str(), r.to)).collect::<Vec<_>>(),
            [("kept", 2)]
        );
        let events: Vec<_> =
            state.events.iter().map(|e| (e.deployment.as_str(), e.message.as_str())).collect();
        assert_eq!(events, [("gone", "removed")]);
    }

    #[test]
    fn a_changed_file_changes_the_key() {
        let dir = std::env::temp_dir().join(format!("sluice-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("m.onnx");
        std::fs::write(&file, b"one").unwrap();
        let model = Model::Onnx(file.clone());
        let before = VersionKey::new("1", &model, &Default::default());
        assert_eq!(before, VersionKey::new("1", &model, &Default::default()));
        std::fs::write(&file, b"three").unwrap();
        assert_ne!(before, VersionKey::new("1", &model, &Default::default()), "size changed");
        let _ = std::fs::remove_dir_all(dir);
    }
}
