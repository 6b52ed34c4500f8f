//! A Triton-style model repository: `<repo>/<model>/<version>/model.onnx`, numeric versions,
//! served per a version policy (latest N, all, or specific versions). Scanning it yields
//! ordinary deployments, one per model, whose extra versions are addressable by version.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Deployment, Scaling};

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

/// `model_repository` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRepository {
    /// The repository folder, relative to the config file.
    pub path: PathBuf,
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
}

fn default_poll() -> f64 {
    10.0
}
fn one() -> u32 {
    1
}

impl ModelRepository {
    /// The deployments the repository holds now: one per model folder with at least one
    /// version folder holding `model.onnx`; the greatest selected version is the deployment's
    /// own, the others are extra versions. Models in `skip` are left out.
    pub fn scan(&self, skip: &[String]) -> Result<Vec<Deployment>, RepositoryError> {
        let entries = std::fs::read_dir(&self.path)
            .map_err(|source| RepositoryError { path: self.path.clone(), source })?;
        let mut models: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
            .filter(|(name, _)| !skip.contains(name))
            .collect();
        models.sort();
        let mut out = Vec::new();
        for (name, dir) in models {
            let mut versions = versions_in(&dir);
            versions.sort_unstable();
            let selected: Vec<u64> = match &self.version_policy {
                VersionPolicy::Latest(n) => versions.iter().rev().take(*n as usize).rev().copied().collect(),
                VersionPolicy::All => versions.clone(),
                VersionPolicy::Specific(wanted) => {
                    versions.iter().copied().filter(|v| wanted.contains(v)).collect()
                }
            };
            let Some((&primary, rest)) = selected.split_last() else { continue };
            let model = |v: u64| dir.join(v.to_string()).join("model.onnx");
            let mut d = Deployment::onnx(&name, model(primary));
            d.version = primary.to_string();
            d.scaling = Scaling::Fixed(self.num_replicas.max(1));
            d.settings.max_batch_size = self.max_batch_size;
            d.extra_versions = rest.iter().map(|&v| (v.to_string(), model(v))).collect();
            out.push(d);
        }
        Ok(out)
    }
}

/// The repository folder cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("model repository `{}`: {source}", path.display())]
pub struct RepositoryError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn versions_in(dir: &Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().join("model.onnx").is_file())
                .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-repo-test-{}", std::process::id()));
        for (model, version) in [("a", 1), ("a", 2), ("a", 10), ("b", 3)] {
            let d = dir.join(model).join(version.to_string());
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("model.onnx"), b"").unwrap();
        }
        std::fs::create_dir_all(dir.join("a").join("notaversion")).unwrap();
        std::fs::create_dir_all(dir.join("empty")).unwrap();
        dir
    }

    fn scan(policy: VersionPolicy) -> Vec<(String, String, Vec<String>)> {
        let r = ModelRepository {
            path: repo(),
            poll_interval_s: 0.0,
            version_policy: policy,
            num_replicas: 1,
            max_batch_size: 0,
        };
        r.scan(&[])
            .unwrap()
            .into_iter()
            .map(|d| (d.name, d.version, d.extra_versions.into_iter().map(|(v, _)| v).collect()))
            .collect()
    }

    #[test]
    fn policies_pick_versions_numerically() {
        assert_eq!(
            scan(VersionPolicy::Latest(1)),
            vec![("a".into(), "10".into(), vec![]), ("b".into(), "3".into(), vec![])]
        );
        assert_eq!(scan(VersionPolicy::Latest(2))[0], ("a".into(), "10".into(), vec!["2".into()]));
        assert_eq!(scan(VersionPolicy::All)[0], ("a".into(), "10".into(), vec!["1".into(), "2".into()]));
        assert_eq!(
            scan(VersionPolicy::Specific(vec![1, 2])),
            vec![("a".into(), "2".into(), vec!["1".into()])]
        );
    }
}
