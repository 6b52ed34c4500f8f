//! The model repository as one more application, `repository`: each scan lists the store
//! ([`store`]: a folder, S3, GCS or Azure Blob), keeps the complete versions ([`scan`]: the ready
//! marker rule), picks per model what serves (a new version swaps in, or with
//! `model_repository.rollout` becomes a canary that promotes or rolls back by itself), fetches
//! those versions into the node's cache ([`cache`]) and applies the result like any config.
//!
//! The repository's health is kept apart from what serves: a store that becomes unreachable
//! changes nothing that runs; status, events and metrics say so until it answers again.

pub mod cache;
mod metrics;
pub mod scan;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sluice_config::{Canary, Config, Deployment, ModelRepository, RepositoryLocation, Scaling};

use self::cache::Cache;
use self::scan::{Listing, MODEL_FILE, ModelPlan, Serving};
use self::store::{Store, StoreEnv, StoreError, StoredFile};

/// The application name repository models are served under.
pub const APPLICATION: &str = sluice_config::REPOSITORY_APPLICATION;

/// Where a repository version's files come from: a replica on another node fetches them into
/// its own node's cache from this (the controller's cache path means nothing there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// The repository URL (`s3://bucket/prefix`).
    pub url: String,
    pub model: String,
    pub version: String,
    pub files: Vec<StoredFile>,
    pub cache_dir: PathBuf,
    pub max_version_bytes: u64,
    pub store_timeout_s: f64,
}

impl Origin {
    /// Fetches the version into this node's cache (what is cached with the same size and tag
    /// is kept) and returns its `model.onnx`.
    pub async fn fetch(&self, env: &StoreEnv) -> Result<PathBuf, StoreError> {
        let location = RepositoryLocation::Url(self.url.clone());
        let store = Store::open_location(&location, env, Duration::from_secs_f64(self.store_timeout_s))?;
        let cache = Cache::new(&self.cache_dir);
        let fetched =
            cache.fetch(&store, &self.model, &self.version, &self.files, self.max_version_bytes).await?;
        Ok(fetched.dir.join(MODEL_FILE))
    }
}

/// A version that will not be served again until its files change: it failed to load, or its
/// canary was rolled back.
#[derive(Debug, Clone)]
pub(crate) struct Rejected {
    pub why: String,
    pub files: Vec<StoredFile>,
}

/// What the controller knows of its repository, under its state lock.
#[derive(Default)]
pub(crate) struct RepoState {
    /// The store of the repository last applied, with the location it was opened for.
    store: Option<(RepositoryLocation, Store)>,
    /// The last successful listing.
    pub listing: Option<Listing>,
    /// When the repository was last listed (successfully or not).
    pub scanned_at: Option<Instant>,
    /// What the last apply served: its plans and their files.
    pub applied: Option<Signature>,
    /// A signature whose apply failed: not retried until something changes.
    pub failed: Option<Signature>,
    /// None while the store answers; else why not and since when (Unix seconds).
    pub unreachable: Option<(String, f64)>,
    pub rejected: BTreeMap<(String, u64), Rejected>,
    /// The cached folders the running versions were loaded from at the last apply.
    pub in_use: BTreeSet<PathBuf>,
    /// Versions the last apply could not fetch (the store refused a file, the connection broke,
    /// the cache could not write), and why: served without, tried again at the next poll.
    pub not_fetched: BTreeMap<(String, u64), String>,
    /// Model file (in this node's cache) → where it came from, for replicas on other nodes.
    pub origins: BTreeMap<PathBuf, Origin>,
    pub downloaded_bytes: u64,
    /// Scan at the next round whatever the poll interval says.
    pub force: bool,
    /// When the folders in use were last checked for a mark of use between polls.
    pub marks_checked_at: Option<Instant>,
    /// The last poll listed no models while some served: they keep serving until a second
    /// poll lists none too (a remounting volume shows an empty folder for a moment).
    pub empty_unconfirmed: bool,
    /// Keeps the series of the repository last scanned in `/metrics`; replaced when it moves,
    /// dropped when the config has none.
    pub series: Option<sluice_deployments::metrics::LabelOwner>,
}

/// What serves (or should): the plans and the files of every version they name.
pub(crate) type Signature = Vec<(ModelPlan, Vec<Vec<StoredFile>>)>;

impl RepoState {
    /// The store for `repo`, opened once per location and `store_timeout_s` (a redeploy that
    /// changed only the timeout kept the old one for the controller's listings and fetches).
    pub fn store(&mut self, repo: &ModelRepository, env: &StoreEnv) -> Result<Store, StoreError> {
        if let Some((location, store)) = &self.store
            && *location == repo.location
            && store.timeout() == std::time::Duration::from_secs_f64(repo.store_timeout_s)
        {
            return Ok(store.clone());
        }
        let store = Store::open(repo, env)?;
        self.store = Some((repo.location.clone(), store.clone()));
        Ok(store)
    }

    /// Rejected versions whose files are still the ones rejected (a version written again
    /// gets another chance). A version gone from the repository is forgotten; one seen
    /// incomplete (being written again) stays rejected until it is complete.
    pub fn rejected_keys(&mut self, listing: &Listing) -> BTreeSet<(String, u64)> {
        self.rejected.retain(|(model, v), r| match listing.models.get(model).and_then(|vs| vs.get(v)) {
            Some(files) => *files == r.files,
            None => listing.incomplete.iter().any(|(m, iv)| m == model && iv == v),
        });
        self.rejected.keys().cloned().collect()
    }

    /// Marks a version rejected; returns false when it was already.
    pub fn reject(&mut self, model: &str, version: u64, why: String) -> bool {
        let files = self
            .listing
            .as_ref()
            .and_then(|l| l.models.get(model))
            .and_then(|vs| vs.get(&version))
            .cloned()
            .unwrap_or_default();
        self.force = true;
        let new = self.rejected.insert((model.to_string(), version), Rejected { why, files }).is_none();
        // Counted once per version, however often it is refused again (a rollback repeated).
        if new {
            metrics::rejected(model);
        }
        new
    }

    /// The repository at `url` is the one whose series `/metrics` shows.
    fn scanned(&mut self, url: &str) {
        if self.series.as_ref().is_none_or(|s| s.value() != url) {
            self.series = Some(sluice_deployments::metrics::LabelOwner::new("repository", url));
        }
    }

    /// Records a listing that failed; true when the repository was reachable until now.
    pub fn unreachable(&mut self, url: &str, error: &StoreError) -> bool {
        self.scanned(url);
        metrics::scanned(url, false);
        self.scanned_at = Some(Instant::now());
        let first = self.unreachable.is_none();
        let since = self.unreachable.as_ref().map_or_else(now_s, |(_, since)| *since);
        self.unreachable = Some((error.to_string(), since));
        first
    }

    /// Records a listing; true when the repository was unreachable until now.
    pub fn reachable(&mut self, url: &str, listing: Listing) -> bool {
        self.scanned(url);
        metrics::scanned(url, true);
        self.scanned_at = Some(Instant::now());
        let before = self.listing.as_ref().map(|l| &l.invalid_names);
        for name in listing.invalid_names.iter().filter(|n| before.is_none_or(|b| !b.contains(*n))) {
            tracing::warn!(
                repository = url,
                folder = %name,
                "model folder not served: a model's name is {}",
                sluice_config::NAME_RULE
            );
        }
        self.listing = Some(listing);
        self.unreachable.take().is_some()
    }
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The repository's part of `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepositoryStatus {
    /// The repository's folder or URL.
    pub url: String,
    /// Whether the last listing succeeded.
    pub reachable: bool,
    /// Why the store does not answer, since when (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<f64>,
    /// Seconds since the last listing.
    pub last_scan_s: Option<f64>,
    /// Complete versions per model, as last listed.
    pub models: BTreeMap<String, Vec<u64>>,
    /// Versions present but without their ready marker (not loaded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub incomplete: Vec<String>,
    /// Model folders not served because no model may have their names (a space, or one of
    /// `/ ? # % { }`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_names: Vec<String>,
    /// Versions never served again until their files change, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedVersion>,
    /// Versions the last apply could not fetch, and why: tried again at the next poll.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_fetched: Vec<RejectedVersion>,
    /// Bytes fetched from the store into this node's cache since start.
    pub downloaded_bytes: u64,
}

/// A rejected version in status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectedVersion {
    pub model: String,
    pub version: u64,
    pub why: String,
}

pub(crate) fn status(repo: &ModelRepository, st: &RepoState) -> RepositoryStatus {
    let listing = st.listing.clone().unwrap_or_default();
    RepositoryStatus {
        url: repo.location.to_string(),
        reachable: st.unreachable.is_none() && st.listing.is_some(),
        error: st.unreachable.as_ref().map(|(e, _)| e.clone()),
        unreachable_since: st.unreachable.as_ref().map(|(_, s)| *s),
        last_scan_s: st.scanned_at.map(|t| t.elapsed().as_secs_f64()),
        models: listing.models.iter().map(|(m, vs)| (m.clone(), vs.keys().copied().collect())).collect(),
        incomplete: listing.incomplete.iter().map(|(m, v)| format!("{m}/{v}")).collect(),
        invalid_names: listing.invalid_names.iter().cloned().collect(),
        rejected: st
            .rejected
            .iter()
            .map(|((model, version), r)| RejectedVersion {
                model: model.clone(),
                version: *version,
                why: r.why.clone(),
            })
            .collect(),
        not_fetched: st
            .not_fetched
            .iter()
            .map(|((model, version), why)| RejectedVersion {
                model: model.clone(),
                version: *version,
                why: why.clone(),
            })
            .collect(),
        downloaded_bytes: st.downloaded_bytes,
    }
}

/// What serves each repository model now.
pub(crate) fn serving(deployments: &BTreeMap<String, crate::state::Managed>) -> BTreeMap<String, Serving> {
    deployments
        .iter()
        .filter(|(_, m)| m.app == APPLICATION)
        .map(|(name, m)| {
            let canary = m.canary.as_ref().filter(|c| c.weight > 0 || c.rollout.is_some());
            let s = Serving {
                primary: m.primary.name().parse().ok(),
                canary: canary.and_then(|c| c.version.name().parse().ok()),
            };
            (name.clone(), s)
        })
        .collect()
}

/// The folders the running repository versions were loaded from: those of `model` `version`
/// alone, or every one's.
pub(crate) fn running_dirs(
    deployments: &BTreeMap<String, crate::state::Managed>,
    only: Option<(&str, u64)>,
) -> BTreeSet<PathBuf> {
    deployments
        .iter()
        .filter(|(name, m)| m.app == APPLICATION && only.is_none_or(|(model, _)| model == name.as_str()))
        .flat_map(|(_, m)| m.versions())
        .filter(|v| only.is_none_or(|(_, version)| v.name() == version.to_string()))
        .filter_map(|v| Some(v.key.model.onnx_path()?.parent()?.to_path_buf()))
        .collect()
}

/// The signature of `plans` over `listing`.
pub(crate) fn signature(plans: &[ModelPlan], listing: &Listing) -> Signature {
    plans
        .iter()
        .map(|p| {
            let files = versions_of(p)
                .map(|v| listing.models.get(&p.model).and_then(|vs| vs.get(&v)).cloned().unwrap_or_default())
                .collect();
            (p.clone(), files)
        })
        .collect()
}

/// Every version a plan serves: primary, canary, others.
pub(crate) fn versions_of(p: &ModelPlan) -> impl Iterator<Item = u64> + '_ {
    std::iter::once(p.primary).chain(p.canary).chain(p.others.iter().copied())
}

/// The deployments `plans` make, their model files at `path(model, version)`.
pub(crate) fn deployments(
    repo: &ModelRepository,
    plans: &[ModelPlan],
    path: impl Fn(&str, u64) -> PathBuf,
) -> Vec<Deployment> {
    plans
        .iter()
        .map(|p| {
            let mut d = Deployment::onnx(&p.model, path(&p.model, p.primary));
            d.version = p.primary.to_string();
            d.scaling = Scaling::Fixed(repo.num_replicas.max(1));
            d.settings.max_batch_size = repo.max_batch_size;
            d.extra_versions = p.others.iter().map(|&v| (v.to_string(), path(&p.model, v))).collect();
            d.canary = p.canary.zip(repo.rollout.as_ref()).map(|(v, r)| Canary {
                model: path(&p.model, v),
                version: v.to_string(),
                weight: r.canary_weight,
                rollout: Some(r.rollout()),
                auto_promote: true,
            });
            d
        })
        .collect()
}

/// Whether `config` serves `name` itself: a deployment's or a pipeline's name (a repository
/// model of that name would take its route).
fn configured(config: &Config, name: &str) -> bool {
    config.applications.iter().any(|a| {
        a.deployments.iter().any(|d| d.name == name) || a.pipeline.as_ref().is_some_and(|p| p.name == name)
    })
}

/// `config` with `models` added as the application `repository`; a model both in the
/// repository and in the config (a deployment or a pipeline of that name) is refused
/// (`sluice validate` checks the same).
pub fn effective(config: &Config, models: Vec<Deployment>) -> Result<Config, crate::ControlError> {
    if let Some(d) = models.iter().find(|d| configured(config, &d.name)) {
        return Err(crate::ControlError::InBoth(d.name.clone()));
    }
    let mut effective = config.clone();
    if !models.is_empty() {
        effective.applications.push(sluice_config::Application::new(APPLICATION, models));
    }
    Ok(effective)
}

/// The repository models named like a deployment or pipeline of `config`: the config's
/// serves; these are not loaded while it has that name.
pub(crate) fn named_in_config(config: &Config, listing: &Listing) -> BTreeSet<String> {
    listing.models.keys().filter(|m| configured(config, m)).cloned().collect()
}

/// The repository models an apply leaves out: those `unloaded`, and those `named` like a
/// deployment of the config.
pub(crate) fn skipped(unloaded: &BTreeSet<String>, named: &BTreeSet<String>) -> BTreeSet<String> {
    unloaded.union(named).cloned().collect()
}

/// Whether the repository of `config` is due for a scan at `now`.
pub(crate) fn due(config: &Config, st: &RepoState, now: Instant) -> bool {
    let Some(repo) = &config.model_repository else { return false };
    if st.force {
        return true;
    }
    if repo.poll_interval_s <= 0.0 {
        return false;
    }
    st.scanned_at.is_none_or(|at| now.duration_since(at) >= Duration::from_secs_f64(repo.poll_interval_s))
}

/// When the next scan is due, if polling is on.
pub(crate) fn next_due(config: &Config, st: &RepoState) -> Option<Instant> {
    let repo = config.model_repository.as_ref().filter(|r| r.poll_interval_s > 0.0)?;
    Some(st.scanned_at.map_or_else(Instant::now, |at| at + Duration::from_secs_f64(repo.poll_interval_s)))
}

/// Lists `repo` once and fetches what its policy serves: the deployments it holds now, for
/// `sluice validate` (no controller, no rollout).
pub async fn scan_once(repo: &ModelRepository, env: &StoreEnv) -> Result<Vec<Deployment>, StoreError> {
    let store = Store::open(repo, env)?;
    let listing = Listing::parse(&store.list("").await?, &repo.ready_marker);
    let mut plain = repo.clone();
    plain.rollout = None;
    let plans = scan::select(&plain, &listing, &BTreeSet::new(), &BTreeSet::new(), &BTreeMap::new());
    let cache = Cache::new(&repo.cache_dir);
    let mut dirs = BTreeMap::new();
    for p in &plans {
        for v in versions_of(p) {
            let files = &listing.models[&p.model][&v];
            let fetched =
                cache.fetch(&store, &p.model, &v.to_string(), files, repo.max_version_bytes).await?;
            dirs.insert((p.model.clone(), v), fetched.dir);
        }
    }
    Ok(deployments(&plain, &plans, |m, v| dirs[&(m.to_string(), v)].join(MODEL_FILE)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(keys: &[&str]) -> Listing {
        let files: Vec<StoredFile> =
            keys.iter().map(|k| StoredFile { key: k.to_string(), size: 1, etag: Some("e".into()) }).collect();
        Listing::parse(&files, "")
    }

    /// The store is opened again when `store_timeout_s` changes, not only its location (a
    /// redeploy that changed the timeout alone kept the old one).
    #[test]
    fn the_store_follows_its_timeout() {
        let repo = |timeout: f64| {
            let text =
                format!("model_repository: {{path: \"s3://bucket/models\", store_timeout_s: {timeout}}}\n");
            let config = sluice_config::parse(&text, std::path::Path::new("/c.yaml")).unwrap();
            config.model_repository.unwrap()
        };
        let mut st = RepoState::default();
        let env = StoreEnv::default();
        assert_eq!(st.store(&repo(5.0), &env).unwrap().timeout(), std::time::Duration::from_secs(5));
        assert_eq!(st.store(&repo(5.0), &env).unwrap().timeout(), std::time::Duration::from_secs(5));
        assert_eq!(st.store(&repo(20.0), &env).unwrap().timeout(), std::time::Duration::from_secs(20));
    }

    #[test]
    fn a_rejection_lasts_while_its_files_do() {
        let mut st = RepoState::default();
        let first = listing(&["m/1/model.onnx", "m/2/model.onnx", "n/1/model.onnx"]);
        st.listing = Some(first.clone());
        assert!(st.reject("m", 2, "fails to load".into()));
        assert!(st.reject("n", 1, "too big".into()));
        assert_eq!(st.rejected_keys(&first).len(), 2);
        // m/2 half-written again (no model.onnx yet): still rejected. n deleted: forgotten.
        let later = listing(&["m/1/model.onnx", "m/2/notes.txt"]);
        let keys = st.rejected_keys(&later);
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), [("m".to_string(), 2)]);
        // m/2 complete with other files: another chance.
        let rewritten = listing(&["m/1/model.onnx", "m/2/model.onnx", "m/2/notes.txt"]);
        assert!(st.rejected_keys(&rewritten).is_empty());
    }
}
