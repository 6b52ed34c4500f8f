//! Per-application records: when each application's config was last deployed, whether that
//! deploy is under way or failed (and why), and which fields of its config Sluice ignores.

use std::time::{SystemTime, UNIX_EPOCH};

use sluice_config::Config;

use crate::state::{AppRecord, ControllerState, DeployOutcome};

/// Seconds since the Unix epoch.
pub(crate) fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Every application of `config` is being deployed from now.
pub(crate) fn begin(st: &mut ControllerState, config: &Config) {
    let now = now_s();
    for app in &config.applications {
        let record =
            AppRecord { deployed_at: now, outcome: DeployOutcome::Deploying, ignored: app.ignored.clone() };
        st.apps.insert(app.name.clone(), record);
    }
}

/// `effective` (a config plus its repository's models) now runs: its applications are
/// applied, and the records of applications it no longer has go (unless a deploy of theirs
/// is queued).
pub(crate) fn applied(st: &mut ControllerState, effective: &Config) {
    let now = now_s();
    for app in &effective.applications {
        st.apps
            .entry(app.name.clone())
            .or_insert_with(|| AppRecord {
                deployed_at: now,
                outcome: DeployOutcome::Applied,
                ignored: app.ignored.clone(),
            })
            .outcome = DeployOutcome::Applied;
    }
    st.apps.retain(|name, r| {
        r.outcome == DeployOutcome::Deploying || effective.applications.iter().any(|a| &a.name == name)
    });
}

/// Deploying `config` failed: nothing of it was applied, and each of its applications says why.
pub(crate) fn failed(st: &mut ControllerState, config: &Config, why: &str) {
    let now = now_s();
    for app in &config.applications {
        st.apps
            .entry(app.name.clone())
            .or_insert_with(|| AppRecord {
                deployed_at: now,
                outcome: DeployOutcome::Applied,
                ignored: app.ignored.clone(),
            })
            .outcome = DeployOutcome::Failed(why.to_string());
    }
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

    #[test]
    fn a_deploy_goes_from_deploying_to_applied_and_drops_apps_left_out() {
        let mut st = ControllerState::default();
        let mut first = config(&["a", "b"]);
        first.applications[0].ignored = vec!["runtime_env".into()];
        begin(&mut st, &first);
        assert_eq!(
            outcomes(&st),
            vec![("a".into(), DeployOutcome::Deploying), ("b".into(), DeployOutcome::Deploying)]
        );
        applied(&mut st, &first);
        assert_eq!(st.apps["a"].ignored, vec!["runtime_env".to_string()]);
        // A second config without `b`, while a third (with `c`) waits its turn.
        begin(&mut st, &config(&["c"]));
        applied(&mut st, &config(&["a"]));
        assert_eq!(
            outcomes(&st),
            vec![("a".into(), DeployOutcome::Applied), ("c".into(), DeployOutcome::Deploying)]
        );
    }

    #[test]
    fn a_failed_deploy_marks_each_of_its_apps_with_why() {
        let mut st = ControllerState::default();
        begin(&mut st, &config(&["a"]));
        applied(&mut st, &config(&["a"]));
        let at = st.apps["a"].deployed_at;
        failed(&mut st, &config(&["a", "new"]), "model `x` cannot load");
        let why = DeployOutcome::Failed("model `x` cannot load".into());
        assert_eq!(outcomes(&st), vec![("a".into(), why.clone()), ("new".into(), why)]);
        assert_eq!(st.apps["a"].deployed_at, at, "a failure is not a deploy");
    }
}
