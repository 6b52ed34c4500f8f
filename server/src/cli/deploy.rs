//! `sluice deploy CONFIG`: PUTs the file (Sluice's config, or a Ray Serve config) to the admin
//! API, telling the server where relative paths start, then (unless `--no-wait`) follows
//! `/api/sluice/status` until every deployment is ready, printing a line each time a
//! deployment's count of ready replicas changes.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sluice_controller::{ApplicationState, Status};

use super::admin::{AdminArgs, pretty, request};

/// How `sluice deploy` waits.
#[derive(clap::Args)]
pub struct WaitArgs {
    /// Give up waiting after SECONDS: exit 1 naming the deployments not ready (the deploy
    /// itself stays; the server keeps bringing them up). 0: wait as long as it takes.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "SLUICE_DEPLOY_TIMEOUT",
        default_value_t = 300.0,
        value_parser = super::seconds
    )]
    pub timeout: f64,
    /// Return once the server accepted the config, printing its answer (the status), without
    /// waiting for replicas.
    #[arg(long)]
    pub no_wait: bool,
}

/// How often the status is read while waiting.
const POLL: Duration = Duration::from_millis(500);

pub fn deploy(config: &Path, admin: &AdminArgs, wait: &WaitArgs) -> ExitCode {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", config.display());
            return ExitCode::FAILURE;
        }
    };
    let base = std::fs::canonicalize(config)
        .ok()
        .and_then(|p| p.parent().map(|d| d.display().to_string()))
        .unwrap_or_default();
    // The deploy itself (a Sluice config is applied before the answer) within --timeout; 0:
    // no deadline (it was the moment of the call: the first status not all ready failed).
    let deadline = (wait.timeout > 0.0).then(|| Instant::now() + Duration::from_secs_f64(wait.timeout));
    let unbounded = Duration::from_secs_f64(sluice_config::MAX_SECONDS);
    let put_timeout = Some(deadline.map_or(unbounded, |_| Duration::from_secs_f64(wait.timeout)));
    let path = "/api/serve/applications";
    let answer = match request(admin, reqwest::Method::PUT, path, Some(text), Some(base), put_timeout) {
        Ok(answer) => answer,
        Err(code) => return code,
    };
    // Server settings the running server does not change live (a Sluice config's answer).
    for item in not_applied(&answer) {
        eprintln!("warning: not applied: {item}");
    }
    if wait.no_wait {
        // A Ray Serve config deploys in the background, as with `serve deploy`.
        if answer.is_empty() {
            outln!("accepted; `sluice status` shows how the deploy goes");
        } else {
            outln!("{}", pretty(answer));
        }
        return ExitCode::SUCCESS;
    }
    let mut shown: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut warned = std::collections::BTreeSet::new();
    loop {
        let left = deadline
            .map_or(unbounded, |d| d.saturating_duration_since(Instant::now()))
            .max(Duration::from_secs(1));
        let timeout = Some(admin.request_limit().map_or(left, |limit| left.min(limit)));
        let text = match request(admin, reqwest::Method::GET, "/api/sluice/status", None, None, timeout) {
            Ok(t) => t,
            Err(code) => return code,
        };
        let status = match serde_json::from_str::<Status>(&text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: the admin API answered something else than a status ({e}): {text}");
                return ExitCode::FAILURE;
            }
        };
        // Fields of a Ray Serve config accepted but not acted on, once each.
        for (app, a) in &status.applications {
            for item in &a.ignored {
                if warned.insert((app.clone(), item.clone())) {
                    eprintln!("warning: application `{app}`: ignored: {item}");
                }
            }
        }
        let progress = Progress::of(&status);
        for (name, counts) in &progress.deployments {
            if shown.get(name) != Some(counts) {
                outln!("{name}: {}/{} replicas ready", counts.0, counts.1);
                shown.insert(name.clone(), *counts);
            }
        }
        if !progress.failed.is_empty() {
            for (app, message) in &progress.failed {
                eprintln!("error: application `{app}` failed to deploy: {message}");
            }
            return ExitCode::FAILURE;
        }
        let waiting = progress.not_ready();
        if waiting.is_empty() {
            outln!("deployed: {} deployment(s) ready", progress.deployments.len());
            return ExitCode::SUCCESS;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!(
                "error: not ready after {}s: {} (the deploy stays; `sluice status` follows it)",
                wait.timeout,
                waiting.join(", ")
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(deadline.map_or(POLL, |d| POLL.min(d.saturating_duration_since(Instant::now()))));
    }
}

/// The `ignored` list of a deploy's answer: settings it accepted and did not apply.
fn not_applied(answer: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v.get("ignored")?.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|item| item.as_str().map(str::to_string))
        .collect()
}

/// Where a deploy stands, from one status.
#[derive(Debug, Default, PartialEq)]
struct Progress {
    /// `app/deployment` → (ready, wanted) replicas, over its versions.
    deployments: BTreeMap<String, (usize, usize)>,
    /// Applications still deploying (a Ray Serve config is applied in the background).
    deploying: Vec<String>,
    /// Applications whose deploy failed, with why.
    failed: Vec<(String, String)>,
}

impl Progress {
    fn of(status: &Status) -> Self {
        let mut p = Progress::default();
        for (app, a) in &status.applications {
            match a.status {
                ApplicationState::DeployFailed => p.failed.push((app.clone(), a.message.clone())),
                ApplicationState::Deploying => p.deploying.push(app.clone()),
                ApplicationState::Running | ApplicationState::Unhealthy => {}
            }
            for (name, d) in &a.deployments {
                let ready = d.versions.iter().map(|v| v.ready_replicas.min(v.replicas)).sum();
                let wanted = d.versions.iter().map(|v| v.replicas).sum();
                p.deployments.insert(format!("{app}/{name}"), (ready, wanted));
            }
        }
        p
    }

    /// What is not ready yet, each with its counts.
    fn not_ready(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .deployments
            .iter()
            .filter(|(_, (ready, wanted))| ready < wanted)
            .map(|(name, (ready, wanted))| format!("{name} ({ready}/{wanted} replicas ready)"))
            .collect();
        out.extend(self.deploying.iter().map(|app| format!("{app} (deploying)")));
        out
    }
}
