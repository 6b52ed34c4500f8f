//! A Triton-style model repository: `<repo>/<model>/<version>/model.onnx`, numeric versions,
//! served per a version policy (latest N, all, or specific versions). The repository is a
//! local folder or object storage (`s3://`, `gs://`, `az://`, `file://`); the controller lists
//! and fetches it (`sluice_controller`'s `repository` module). Only a version whose folder holds
//! the ready marker is complete: writers put it last, so a half-uploaded version is never
//! served.

use std::path::PathBuf;

use serde::Deserialize;

use crate::Rollout;

/// Which versions of each model are served.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionPolicy {
    /// The N numerically greatest versions (`{latest: 2}`).
    Latest(u32),
    /// Every version (`all`).
    All,
    /// These versions, when present (`{specific: [1, 3]}`).
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// The versions served out of `versions` (sorted ascending), ascending: the last one is the
    /// model's default version.
    pub fn select(&self, versions: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest(n) => versions.iter().rev().take(*n as usize).rev().copied().collect(),
            VersionPolicy::All => versions.to_vec(),
            VersionPolicy::Specific(wanted) => {
                versions.iter().copied().filter(|v| wanted.contains(v)).collect()
            }
        }
    }
}

/// Where the repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryLocation {
    /// A folder on this machine (on a cluster: on every node, e.g. a shared filesystem).
    Local(PathBuf),
    /// Object storage: `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`.
    Url(String),
}

impl RepositoryLocation {
    /// The scheme of a URL (`s3`), or None for a local folder.
    pub fn scheme(&self) -> Option<&str> {
        match self {
            RepositoryLocation::Local(_) => None,
            RepositoryLocation::Url(u) => u.split_once("://").map(|(s, _)| s),
        }
    }
}

impl std::fmt::Display for RepositoryLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepositoryLocation::Local(p) => write!(f, "{}", p.display()),
            RepositoryLocation::Url(u) => f.write_str(u),
        }
    }
}

/// The URL schemes a repository may use (besides a plain path).
pub const SCHEMES: &[&str] = &["file", "s3", "gs", "az"];

/// `model_repository` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRepository {
    /// The repository: a folder relative to the config file, or a URL (`s3://bucket/prefix`,
    /// `gs://...`, `az://...`, `file:///abs/path`). Resolved by validation into `location`.
    pub path: String,
    /// Where the repository is, once validated.
    #[serde(skip, default = "unresolved")]
    pub location: RepositoryLocation,
    /// How often to look for new or removed versions, seconds; 0 never. Default 10.
    #[serde(default = "default_poll")]
    pub poll_interval_s: f64,
    /// Default: the latest version only (`{latest: 1}`).
    #[serde(default)]
    pub version_policy: VersionPolicy,
    /// Replicas per served version. Default 1.
    #[serde(default = "one")]
    pub num_replicas: u32,
    /// Batching for every repository model (see the deployment field). Default 0.
    #[serde(default)]
    pub max_batch_size: u32,
    /// The file that marks a version folder complete; written last by whoever writes the
    /// version. Default `READY`. Empty: any folder holding `model.onnx` is complete (safe only
    /// when versions appear at once, e.g. a folder renamed into place).
    #[serde(default = "default_marker")]
    pub ready_marker: String,
    /// Where object-storage models are cached on local disk (per node), relative to the
    /// config file. Default `/tmp/sluice-model-cache`.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Largest total size of one version's files, bytes; a larger version is refused, never
    /// downloaded. Default 4 GiB.
    #[serde(default = "default_max_version_bytes")]
    pub max_version_bytes: u64,
    /// How long one call to the object store may take, seconds. Default 30.
    #[serde(default = "default_store_timeout")]
    pub store_timeout_s: f64,
    /// Roll new versions out as canaries (absent: a new version swaps in at once).
    #[serde(default)]
    pub rollout: Option<RepositoryRollout>,
}

/// `model_repository.rollout`: a model's new version starts as a canary at `canary_weight`
/// percent, steps up while within bounds and is promoted by itself at 100 %, or rolled back
/// (and never retried) when it breaks a bound or fails to load.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositoryRollout {
    /// The canary's first share of unpinned traffic, percent. Default 10.
    pub canary_weight: u32,
    /// Weight added per step. Default 10.
    pub step_percent: u32,
    /// Seconds between steps. Default 30.
    pub interval_s: f64,
    /// Largest share of failed canary requests in an interval. Default 0.01.
    pub max_error_rate: f64,
    /// Largest canary p99 latency in an interval, milliseconds. Default: no bound.
    pub max_p99_ms: Option<f64>,
    /// Canary requests an interval needs before it counts. Default 20.
    pub min_requests: u64,
    /// Smallest share of rows on which the canary, shadowing the primary, agrees with it.
    /// Default: no gate.
    pub min_shadow_agreement: Option<f64>,
}

impl Default for RepositoryRollout {
    fn default() -> Self {
        let r = Rollout::default();
        Self {
            canary_weight: 10,
            step_percent: r.step_percent,
            interval_s: r.interval_s,
            max_error_rate: r.max_error_rate,
            max_p99_ms: r.max_p99_ms,
            min_requests: r.min_requests,
            min_shadow_agreement: r.min_shadow_agreement,
        }
    }
}

impl RepositoryRollout {
    /// The rollout schedule and bounds.
    pub fn rollout(&self) -> Rollout {
        Rollout {
            step_percent: self.step_percent,
            interval_s: self.interval_s,
            max_error_rate: self.max_error_rate,
            max_p99_ms: self.max_p99_ms,
            min_requests: self.min_requests,
            min_shadow_agreement: self.min_shadow_agreement,
        }
    }
}

fn unresolved() -> RepositoryLocation {
    RepositoryLocation::Local(PathBuf::new())
}
fn default_poll() -> f64 {
    10.0
}
fn one() -> u32 {
    1
}
/// The default `ready_marker`: the file that makes a version folder complete.
pub const DEFAULT_READY_MARKER: &str = "READY";

fn default_marker() -> String {
    DEFAULT_READY_MARKER.into()
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("/tmp/sluice-model-cache")
}
fn default_max_version_bytes() -> u64 {
    4 << 30
}
fn default_store_timeout() -> f64 {
    30.0
}

impl ModelRepository {
    /// A local repository with every default (for code and tests).
    pub fn local(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        Self {
            path: path.display().to_string(),
            location: RepositoryLocation::Local(path),
            poll_interval_s: default_poll(),
            version_policy: VersionPolicy::default(),
            num_replicas: 1,
            max_batch_size: 0,
            ready_marker: default_marker(),
            cache_dir: default_cache_dir(),
            max_version_bytes: default_max_version_bytes(),
            store_timeout_s: default_store_timeout(),
            rollout: None,
        }
    }
}

/// What `path` names: a URL with one of [`SCHEMES`] (`file://` becomes a local folder), or a
/// folder relative to `base`. An unknown scheme is an error naming the ones known.
pub fn locate(path: &str, base: &std::path::Path) -> Result<RepositoryLocation, String> {
    match path.split_once("://") {
        Some(("file", rest)) => Ok(RepositoryLocation::Local(PathBuf::from(rest))),
        Some((scheme, rest)) if SCHEMES.contains(&scheme) => {
            let bucket = rest.split('/').next().unwrap_or("");
            if bucket.is_empty() {
                return Err(format!("`{path}` names no bucket or container"));
            }
            Ok(RepositoryLocation::Url(path.trim_end_matches('/').to_string()))
        }
        Some((scheme, _)) => Err(format!(
            "`{scheme}://` is not a supported repository scheme; use a folder or one of {SCHEMES:?}"
        )),
        None => Ok(RepositoryLocation::Local(base.join(path))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn policies_pick_versions_numerically() {
        let versions = [1, 2, 10];
        assert_eq!(VersionPolicy::Latest(1).select(&versions), [10]);
        assert_eq!(VersionPolicy::Latest(2).select(&versions), [2, 10]);
        assert_eq!(VersionPolicy::All.select(&versions), [1, 2, 10]);
        assert_eq!(VersionPolicy::Specific(vec![1, 2, 7]).select(&versions), [1, 2]);
        assert!(VersionPolicy::Latest(1).select(&[]).is_empty());
    }

    #[test]
    fn paths_and_urls_are_located() {
        let base = Path::new("/etc/sluice");
        assert_eq!(locate("repo", base), Ok(RepositoryLocation::Local("/etc/sluice/repo".into())));
        assert_eq!(locate("file:///data/repo", base), Ok(RepositoryLocation::Local("/data/repo".into())));
        assert_eq!(
            locate("s3://bucket/models/", base),
            Ok(RepositoryLocation::Url("s3://bucket/models".into()))
        );
        assert!(locate("s3://", base).unwrap_err().contains("names no bucket"));
        assert!(locate("ftp://x/y", base).unwrap_err().contains("`ftp://` is not a supported"));
    }
}
