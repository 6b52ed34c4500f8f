//! Per-application records: when each application's config was last deployed, whether that
//! deploy is under way or failed (and why), and which fields of its config Sluice ignores.

use std::time::{SystemTime, UNIX_EPOCH};

use sluice_config::Config;

use crate::state::{AppRecord, ControllerState, DeployOutcome};

/// Seconds since the Unix epoch.
pub(crate) fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Every application of `config` is being deployed from now; returns the deploy's generation
/// (set [`ControllerState::applying`] to it while it is applied).
pub(crate) fn begin(st: &mut ControllerState, config: &Config) -> u64 {
    let generation = reserve(st);
    begin_as(st, config, generation);
    generation
}

/// The next deploy's generation, taken when it is asked for (it is marked deploying once its
/// turn comes, [`begin_as`]): changes asked for later wait for it.
pub(crate) fn reserve(st: &mut ControllerState) -> u64 {
    st.deploys_begun += 1;
    st.deploys_begun
}

/// [`begin`] with a generation [`reserve`]d before.
pub(crate) fn begin_as(st: &mut ControllerState, config: &Config, generation: u64) {
    let now = now_s();
    for app in &config.applications {
        let record = AppRecord {
            deployed_at: now,
            outcome: DeployOutcome::Deploying,
            ignored: app.ignored.clone(),
            generation,
        };
        st.apps.insert(app.name.clone(), record);
    }
}

/// Whether a deploy begun after `generation` is still to apply `record`'s application.
pub(crate) fn newer_deploying(record: &AppRecord, generation: u64) -> bool {
    record.outcome == DeployOutcome::Deploying && record.generation > generation
}

/// `effective` (a config plus its repository's models) now runs. For the deploy being applied
/// ([`ControllerState::applying`]): its applications are applied, unless a later deploy of
/// theirs is queued (they stay deploying), and the records of applications it no longer has
/// go (unless a deploy of theirs is queued). The repository's models applied on their own (a
/// poll): only the repository's application is marked; how the last deploy went stays.
pub(crate) fn applied(st: &mut ControllerState, effective: &Config) {
    let Some(generation) = st.applying else {
        let repository = effective.applications.iter().find(|a| a.name == crate::repository::APPLICATION);
        if let Some(app) = repository {
            let record = record(st, app, 0);
            if record.outcome != DeployOutcome::Deploying {
                record.outcome = DeployOutcome::Applied;
            }
        }
        return;
    };
    for app in &effective.applications {
        let record = record(st, app, generation);
        if !newer_deploying(record, generation) {
            record.outcome = DeployOutcome::Applied;
        }
    }
    st.apps.retain(|name, r| {
        r.outcome == DeployOutcome::Deploying || effective.applications.iter().any(|a| &a.name == name)
    });
}

/// Deploying `config` (generation `generation`) failed: nothing of it was applied, and each of
/// its applications says why, unless a later deploy of it is queued.
pub(crate) fn failed(st: &mut ControllerState, config: &Config, generation: u64, why: &str) {
    for app in &config.applications {
        let record = record(st, app, generation);
        if !newer_deploying(record, generation) {
            record.outcome = DeployOutcome::Failed(why.to_string());
        }
    }
}

/// `app`'s record, made (applied now, by deploy `generation`) where it has none.
fn record<'a>(
    st: &'a mut ControllerState,
    app: &sluice_config::Application,
    generation: u64,
) -> &'a mut AppRecord {
    st.apps.entry(app.name.clone()).or_insert_with(|| AppRecord {
        deployed_at: now_s(),
        outcome: DeployOutcome::Applied,
        ignored: app.ignored.clone(),
        generation,
    })
}

#[cfg(test)]
mod tests {
    use sluice_config::Application;

    use super::*;

    fn config(apps: &[&str]) -> Config {
        let applications = apps.iter().map(|a| Application::new(*a, Vec::new())).collect();
        Config { applications, ..Config::default() }
    }

    fn outcomes(st: &ControllerState) -> Vec<(String, DeployOutcome)> {
        st.apps.iter().map(|(n, r)| (n.clone(), r.outcome.clone())).collect()
    }

    /// `config` applied as the deploy `generation` (as the controller does around it).
    fn apply(st: &mut ControllerState, generation: u64, config: &Config) {
        st.applying = Some(generation);
        applied(st, config);
        st.applying = None;
    }

    #[test]
    fn a_deploy_goes_from_deploying_to_applied_and_drops_apps_left_out() {
        let mut st = ControllerState::default();
        let mut first = config(&["a", "b"]);
        first.applications[0].ignored = vec!["runtime_env".into()];
        let g1 = begin(&mut st, &first);
        assert_eq!(
            outcomes(&st),
            vec![("a".into(), DeployOutcome::Deploying), ("b".into(), DeployOutcome::Deploying)]
        );
        apply(&mut st, g1, &first);
        assert_eq!(st.apps["a"].ignored, vec!["runtime_env".to_string()]);
        // A second config without `b`, while a third (with `c`) waits its turn.
        let g2 = begin(&mut st, &config(&["a"]));
        begin(&mut st, &config(&["c"]));
        apply(&mut st, g2, &config(&["a"]));
        assert_eq!(
            outcomes(&st),
            vec![("a".into(), DeployOutcome::Applied), ("c".into(), DeployOutcome::Deploying)]
        );
    }

    #[test]
    fn a_failed_deploy_marks_each_of_its_apps_with_why() {
        let mut st = ControllerState::default();
        let g = begin(&mut st, &config(&["a"]));
        apply(&mut st, g, &config(&["a"]));
        let g = begin(&mut st, &config(&["a", "new"]));
        failed(&mut st, &config(&["a", "new"]), g, "model `x` cannot load");
        let why = DeployOutcome::Failed("model `x` cannot load".into());
        assert_eq!(outcomes(&st), vec![("a".into(), why.clone()), ("new".into(), why.clone())]);
        // The repository's models applied on their own (a poll) leave how the deploy went.
        let mut with_repository = config(&["a", crate::repository::APPLICATION]);
        with_repository.applications[1].ignored.clear();
        applied(&mut st, &with_repository);
        assert_eq!(
            outcomes(&st),
            vec![
                ("a".into(), why.clone()),
                ("new".into(), why),
                (crate::repository::APPLICATION.into(), DeployOutcome::Applied)
            ],
            "a poll cleared a failed deploy's records"
        );
    }

    /// An earlier deploy of an application that finishes (or fails) while a later one of it is
    /// queued leaves it deploying: it read as running (or failed) on the earlier config while
    /// the later one loaded.
    #[test]
    fn a_deploy_finishing_leaves_a_later_queued_one_deploying() {
        let mut st = ControllerState::default();
        let first = begin(&mut st, &config(&["a"]));
        begin(&mut st, &config(&["a"]));
        apply(&mut st, first, &config(&["a"]));
        assert_eq!(outcomes(&st), vec![("a".into(), DeployOutcome::Deploying)]);
        failed(&mut st, &config(&["a"]), first, "x");
        assert_eq!(outcomes(&st), vec![("a".into(), DeployOutcome::Deploying)]);
    }
}
