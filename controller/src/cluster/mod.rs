//! Where replicas run. `Local`: threads of this process (the default; one machine, no Python,
//! no Ray). `Ray`: each replica a `sluice replica` process in a Ray actor, placed by Ray on any
//! node of the cluster that ran training ([`ray`]). Reconcile, autoscaling, swaps and canaries
//! are written once against [`Cluster`] and [`Placed`].

pub mod bridge;
pub mod ray;
mod remote;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_config::{Model, ReplicaSettings};
use sluice_deployments::{Deployment, DeploymentSpec, LoadError, backend_factory};

use crate::ControlError;

pub use ray::{ProxyOptions, RayCluster, RayOptions};
pub use remote::GrpcReplica;

/// What a `sluice replica` process serves: one replica of one deployment version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub deployment: String,
    pub version: String,
    pub model: Model,
    pub settings: ReplicaSettings,
    /// For a version of an object-storage repository: fetch it into this node's cache first
    /// and serve that copy (`model` is the controller's own cache path, which need not exist on
    /// the replica's node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<crate::repository::Origin>,
}

impl ReplicaSpec {
    /// Makes the model's file paths relative to `dir` where they are inside it.
    fn relative_to(&mut self, dir: &Path) {
        let rel = |p: &mut std::path::PathBuf| {
            if let Ok(r) = p.strip_prefix(dir) {
                *p = r.to_path_buf();
            }
        };
        match &mut self.model {
            Model::Onnx(path) | Model::Multiplexed { dir: path, .. } => rel(path),
            Model::Builtin(b) => {
                for path in b.files_mut() {
                    rel(path);
                }
            }
        }
    }
}

/// The most of a replica's spec one `--spec` argument carries. Linux refuses to start a process
/// with any one argument over 128 KiB (`MAX_ARG_STRLEN`), and a spec can pass that: an
/// object-storage version lists every file it fetches, and a model saved with each tensor's
/// weights in a file of its own has hundreds to thousands.
pub const SPEC_ARG_BYTES: usize = 96 * 1024;

/// `spec_json` as `sluice replica` arguments: `--spec=` and a piece of it, as many times as
/// it takes pieces of at most [`SPEC_ARG_BYTES`] (cut between characters); the replica joins
/// them in order. The piece is attached: one that begins with `-` (a cut before a negative
/// number, or a name's hyphen) as an argument of its own reads as a flag.
pub fn spec_args(spec_json: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut rest = spec_json;
    loop {
        let cut = rest.floor_char_boundary(SPEC_ARG_BYTES.min(rest.len()));
        let (piece, after) = rest.split_at(cut);
        args.push(format!("--spec={piece}"));
        if after.is_empty() {
            return args;
        }
        rest = after;
    }
}

/// How long growing a version on Ray waits for its new replicas beyond one replica's start
/// timeout (`cluster.ray.replica_start_timeout_s`): room for a node to be found.
const GROW_MARGIN: Duration = Duration::from_secs(60);

/// Where the replicas of this controller run.
#[derive(Clone, Default)]
pub enum Cluster {
    #[default]
    Local,
    Ray(Arc<RayCluster>),
}

/// How one running version's replicas are placed, to resize and stop them.
#[derive(Clone)]
pub(crate) enum Placed {
    Local,
    Ray(Arc<ray::RayReplicas>),
}

impl Cluster {
    /// With proxies on the nodes (`proxy_location: EveryNode`), how long they may take to
    /// follow a change of the route table ([`ray::PROXIES_FOLLOW`]); none without.
    pub(crate) fn proxies_follow(&self) -> Option<Duration> {
        match self {
            Cluster::Ray(ray) => ray.proxies_follow(),
            Cluster::Local => None,
        }
    }

    /// Starts `replicas` replicas of a deployment version. Locally: loads and warms them here.
    /// On Ray: creates the actors and waits until they are up, or until those that are not
    /// wait for a node Ray cannot find yet (and at least one is up when `need_one`).
    pub(crate) async fn start(
        &self,
        spec: DeploymentSpec,
        model: Model,
        origin: Option<crate::repository::Origin>,
        need_one: bool,
        ready_timeout: Duration,
    ) -> Result<(Arc<Deployment>, Placed), ControlError> {
        let (name, version) = (spec.name.clone(), spec.version.clone());
        let failed =
            |source| ControlError::Load { deployment: name.clone(), version: version.clone(), source };
        let replicas = spec.num_replicas;
        match self {
            Cluster::Local => {
                let m = model.clone();
                let deployment = tokio::task::spawn_blocking(move || {
                    let factory = backend_factory(&m, &spec.settings, spec.max_replicas, &spec.name)?;
                    Deployment::start(spec, factory)
                })
                .await
                .map_err(|e| failed(LoadError::Thread(e.to_string())))?
                .map_err(failed)?;
                let deployment = Arc::new(deployment);
                if replicas > 0 && !deployment.wait_ready(ready_timeout).await {
                    return Err(not_ready(&name, &version, ready_timeout));
                }
                Ok((deployment, Placed::Local))
            }
            Cluster::Ray(cluster) => {
                // The model's metadata, read here (the head has the working dir too); the
                // replicas themselves load on their nodes.
                let (m, settings, label) = (model.clone(), spec.settings.clone(), spec.name.clone());
                let metadata = tokio::task::spawn_blocking(move || {
                    let backend = backend_factory(&m, &settings, 1, &label)?()?;
                    Ok::<_, LoadError>(backend.metadata().clone())
                })
                .await
                .map_err(|e| failed(LoadError::Thread(e.to_string())))?
                .map_err(failed)?;
                let replica = ReplicaSpec {
                    deployment: name.clone(),
                    version: version.clone(),
                    model,
                    settings: spec.settings.clone(),
                    fetch: origin,
                };
                let deployment = Arc::new(Deployment::start_remote(spec, metadata).map_err(failed)?);
                let replicas_handle = cluster.replicas(replica, deployment.clone(), replicas);
                let min_up = usize::from(need_one && replicas > 0);
                let ready_timeout = on_ray(ready_timeout, replicas_handle.startup_timeout());
                if !replicas_handle.settled(min_up, ready_timeout).await {
                    replicas_handle.stop();
                    return Err(match replicas_handle.failing() {
                        Some((failures, why)) => ControlError::StartFailing {
                            deployment: name.clone(),
                            version: version.clone(),
                            failures,
                            why,
                        },
                        None => not_ready(&name, &version, ready_timeout),
                    });
                }
                Ok((deployment, Placed::Ray(replicas_handle)))
            }
        }
    }
}

/// How long a new version's replicas on Ray have to come up: the caller's wait, but never
/// less than each replica's own start timeout (`replica_start_timeout_s`, which counts a
/// model's fetch and load) and a margin: a version whose replicas took longer than a fixed
/// 300 s was given up while they still loaded, whatever that setting said.
fn on_ray(wait: Duration, startup_timeout: Duration) -> Duration {
    wait.max(startup_timeout + GROW_MARGIN)
}

fn not_ready(name: &str, version: &str, timeout: Duration) -> ControlError {
    ControlError::NotReady { deployment: name.into(), version: version.into(), waited_s: timeout.as_secs() }
}

impl Placed {
    /// Replicas wanted or running (on Ray, those Ray is still placing count).
    pub fn count(&self, d: &Deployment) -> usize {
        match self {
            Placed::Local => d.replica_count(),
            Placed::Ray(r) => r.count(),
        }
    }

    pub async fn scale_to(&self, d: &Deployment, n: usize) -> Result<(), LoadError> {
        match self {
            Placed::Local => d.scale_to(n).await,
            Placed::Ray(r) => {
                let ready = d.ready_replicas();
                r.scale_to(n);
                // Growth returns once the new replicas are up, or wait for a node Ray says they
                // need, as a local scale-up returns once its models loaded: a promotion or a swap
                // that grows a version first went on at once, onto the replicas already up.
                let grow_timeout = r.startup_timeout() + GROW_MARGIN;
                if n > ready && !r.settled(ready, grow_timeout).await {
                    tracing::warn!(
                        "{}: {n} replica(s) not up within {grow_timeout:?}; going on with {}",
                        d.name(),
                        d.ready_replicas()
                    );
                }
                Ok(())
            }
        }
    }

    /// Stops every replica (the version is retired and drained).
    pub fn stop(&self) {
        if let Placed::Ray(r) = self {
            r.stop();
        }
    }

    /// Why replicas wait, one line each (Ray only).
    pub fn waiting(&self) -> Vec<String> {
        match self {
            Placed::Local => Vec::new(),
            Placed::Ray(r) => r.waiting(),
        }
    }

    /// Where the remote replicas run, and whether each takes requests.
    pub fn remote(&self) -> Vec<(sluice_deployments::RemoteInfo, bool)> {
        match self {
            Placed::Local => Vec::new(),
            Placed::Ray(r) => r.placed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{SPEC_ARG_BYTES, on_ray, spec_args};

    /// A new version's replicas on Ray have their own start timeout and a margin, at least:
    /// one raised for a large model's fetch is not cut short by the controller's fixed wait.
    #[test]
    fn a_version_on_ray_waits_as_long_as_its_replicas_may_start() {
        let secs = Duration::from_secs;
        assert_eq!(on_ray(secs(300), secs(1800)), secs(1860));
        assert_eq!(on_ray(secs(300), secs(120)), secs(300));
    }

    /// A spec longer than one argument may be goes in pieces, each within the limit and cut
    /// between characters, that join back to it; a short one is one piece.
    #[test]
    fn a_long_spec_goes_in_pieces_that_join_back() {
        assert_eq!(spec_args("{}"), ["--spec={}"]);
        // Three-byte characters, so that a cut at the byte limit would split one.
        let long = format!("{{\"x\": \"{}\"}}", "€".repeat(SPEC_ARG_BYTES));
        let args = spec_args(&long);
        assert!(args.len() >= 4, "{} arguments", args.len());
        let pieces: Vec<&str> = args.iter().map(|a| a.strip_prefix("--spec=").unwrap()).collect();
        assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= SPEC_ARG_BYTES));
        assert_eq!(pieces.concat(), long);
    }
}
