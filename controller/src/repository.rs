//! The model repository as one more application, `repository`: each scan turns its folders
//! into deployments (less the models unloaded through the API), and a changed scan is applied
//! like any config.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sluice_config::{Application, Config};

use crate::ControlError;
use crate::state::{RepoScan, RepoSignature};

/// The application name repository models are served under.
pub const APPLICATION: &str = "repository";

/// `config` with its repository's models added, and what the scan found (None without a
/// repository).
pub(crate) fn effective(
    config: &Config,
    unloaded: &BTreeSet<String>,
) -> Result<(Config, Option<RepoSignature>), ControlError> {
    let Some(repo) = &config.model_repository else { return Ok((config.clone(), None)) };
    let skip: Vec<String> = unloaded.iter().cloned().collect();
    let models = repo.scan(&skip)?;
    let configured =
        |name: &str| config.applications.iter().flat_map(|a| &a.deployments).any(|d| d.name == name);
    if let Some(d) = models.iter().find(|d| configured(&d.name)) {
        return Err(ControlError::InBoth(d.name.clone()));
    }
    let signature = models
        .iter()
        .map(|d| {
            (d.name.clone(), (d.version.clone(), d.extra_versions.iter().map(|(v, _)| v.clone()).collect()))
        })
        .collect();
    let mut effective = config.clone();
    if !models.is_empty() {
        effective.applications.push(Application::new(APPLICATION, models));
    }
    Ok((effective, Some(signature)))
}

/// Whether the repository of `config` is due for a scan at `now`.
pub(crate) fn due(config: &Config, last: Option<&RepoScan>, now: Instant) -> bool {
    let Some(repo) = &config.model_repository else { return false };
    if repo.poll_interval_s <= 0.0 {
        return false;
    }
    last.is_none_or(|s| now.duration_since(s.at) >= Duration::from_secs_f64(repo.poll_interval_s))
}

/// When the next scan is due, if polling is on.
pub(crate) fn next_due(config: &Config, last: Option<&RepoScan>) -> Option<Instant> {
    let repo = config.model_repository.as_ref().filter(|r| r.poll_interval_s > 0.0)?;
    Some(last.map_or_else(Instant::now, |s| s.at + Duration::from_secs_f64(repo.poll_interval_s)))
}
