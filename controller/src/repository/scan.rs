//! From a repository listing to what should serve, as plain functions:
//! - [`Listing::parse`]: which versions of which models are complete (the rule: a version
//!   folder `<model>/<version>/` with a numeric name holding `model.onnx` and the ready marker,
//!   which writers put last; without the marker the version is incomplete and never loaded);
//! - [`select`]: per model, the primary version, a canary when a new version rolls out, and
//!   the other versions the policy serves.

use std::collections::{BTreeMap, BTreeSet};

use sluice_config::ModelRepository;

use super::store::StoredFile;

/// The file every version must hold.
pub const MODEL_FILE: &str = "model.onnx";

/// The complete versions of every model, with their files (the marker left out).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    pub models: BTreeMap<String, BTreeMap<u64, Vec<StoredFile>>>,
    /// Versions seen without their marker (or without `model.onnx`): (model, version).
    pub incomplete: Vec<(String, u64)>,
    /// Model folders whose names no model may have ([`sluice_config::valid_name`]: a space,
    /// one of `/ ? # % { }`), never served.
    pub invalid_names: BTreeSet<String>,
}

impl Listing {
    /// Groups a store's objects (`model/version/file`) into complete versions. Objects at other
    /// depths, or under version folders that are not a number written plainly (`7`, not `007`
    /// or `+7`: the folder is found again by the number), are ignored; so are model folders
    /// whose names no model may have, which are listed.
    pub fn parse(files: &[StoredFile], marker: &str) -> Self {
        let mut found: BTreeMap<(String, u64), Vec<StoredFile>> = BTreeMap::new();
        let mut invalid_names = BTreeSet::new();
        for f in files {
            let parts: Vec<&str> = f.key.split('/').collect();
            let [model, version, name] = parts[..] else { continue };
            let Some(v) = version.parse::<u64>().ok().filter(|v| v.to_string() == version) else { continue };
            if model.is_empty() || model.starts_with('.') || name.starts_with('.') {
                continue;
            }
            if !sluice_config::valid_name(model) {
                invalid_names.insert(model.to_string());
                continue;
            }
            found.entry((model.to_string(), v)).or_default().push(f.clone());
        }
        let mut out = Listing { invalid_names, ..Listing::default() };
        for ((model, v), files) in found {
            let has = |n: &str| files.iter().any(|f| f.key.rsplit('/').next() == Some(n));
            if !has(MODEL_FILE) || (!marker.is_empty() && !has(marker)) {
                out.incomplete.push((model, v));
                continue;
            }
            let files =
                files.into_iter().filter(|f| marker.is_empty() || !f.key.ends_with(&format!("/{marker}")));
            out.models.entry(model).or_default().insert(v, files.collect());
        }
        out
    }
}

/// What serves one model now (from the controller's state).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Serving {
    pub primary: Option<u64>,
    pub canary: Option<u64>,
}

/// What should serve one model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPlan {
    pub model: String,
    pub primary: u64,
    /// A new version rolling out (only with `model_repository.rollout`).
    pub canary: Option<u64>,
    /// Further versions the policy serves (by exact version only).
    pub others: Vec<u64>,
}

/// Per model (less `skip`), the versions to serve: the policy's versions among the complete,
/// not rejected ones. Without a rollout the greatest is the primary (a new version swaps in).
/// With one, a model already serving keeps its primary while a greater version becomes the
/// canary.
pub fn select(
    repo: &ModelRepository,
    listing: &Listing,
    skip: &BTreeSet<String>,
    rejected: &BTreeSet<(String, u64)>,
    serving: &BTreeMap<String, Serving>,
) -> Vec<ModelPlan> {
    let mut out = Vec::new();
    for (model, versions) in &listing.models {
        if skip.contains(model) {
            continue;
        }
        let now = serving.get(model).cloned().unwrap_or_default();
        // The version serving stays usable when its files changed under it and were refused:
        // the copy loaded before keeps serving (the plan keeps it running) until the files
        // change again or a newer version comes.
        let usable: Vec<u64> = versions
            .keys()
            .copied()
            .filter(|v| !rejected.contains(&(model.clone(), *v)) || now.primary == Some(*v))
            .collect();
        let mut selected = repo.version_policy.select(&usable);
        let Some(newest) = selected.pop() else { continue };
        let plan = match (repo.rollout.is_some(), now.primary) {
            (true, Some(primary)) if newest > primary && versions.contains_key(&primary) => ModelPlan {
                model: model.clone(),
                primary,
                canary: Some(newest),
                others: selected.into_iter().filter(|v| *v != primary).collect(),
            },
            _ => ModelPlan { model: model.clone(), primary: newest, canary: None, others: selected },
        };
        out.push(plan);
    }
    out
}

#[cfg(test)]
mod tests {
    use sluice_config::{RepositoryRollout, VersionPolicy};

    use super::*;

    fn file(key: &str) -> StoredFile {
        StoredFile { key: key.into(), size: 1, etag: Some("e".into()) }
    }

    fn listing(keys: &[&str]) -> Listing {
        Listing::parse(&keys.iter().map(|k| file(k)).collect::<Vec<_>>(), "READY")
    }

    #[test]
    fn a_version_without_its_marker_is_incomplete_and_never_listed() {
        let l = listing(&[
            "iris/1/model.onnx",
            "iris/1/READY",
            "iris/2/model.onnx", // still uploading: no marker yet
            "iris/3/READY",      // marker without a model
            "iris/x/model.onnx",
            "iris/4/sub/model.onnx",
            "iris/007/model.onnx", // version 7 would be looked for in `7/`
            "iris/007/READY",
            "iris/+8/model.onnx",
            "iris/+8/READY",
            "top.txt",
        ]);
        assert_eq!(l.models["iris"].keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(l.models["iris"][&1], [file("iris/1/model.onnx")], "the marker is not fetched");
        assert_eq!(l.incomplete, [("iris".to_string(), 2), ("iris".to_string(), 3)]);
        let no_marker = Listing::parse(&[file("iris/2/model.onnx")], "");
        assert_eq!(no_marker.models["iris"].keys().copied().collect::<Vec<_>>(), [2]);
    }

    /// A model folder whose name no model may have is listed apart and never served; the
    /// others are unaffected.
    #[test]
    fn model_folders_with_names_no_model_may_have_are_not_served() {
        let l = listing(&[
            "iris/1/model.onnx",
            "iris/1/READY",
            "a#b/1/model.onnx",
            "a#b/1/READY",
            "two words/1/model.onnx",
            "two words/1/READY",
            "50%/1/model.onnx",
        ]);
        assert_eq!(l.models.keys().collect::<Vec<_>>(), ["iris"]);
        assert_eq!(l.invalid_names.iter().collect::<Vec<_>>(), ["50%", "a#b", "two words"]);
        assert!(l.incomplete.is_empty(), "{:?}", l.incomplete);
    }

    fn repo(rollout: bool) -> ModelRepository {
        let mut r = ModelRepository::local("/r");
        r.rollout = rollout.then(RepositoryRollout::default);
        r
    }

    fn three() -> Listing {
        listing(&[
            "m/1/model.onnx",
            "m/1/READY",
            "m/2/model.onnx",
            "m/2/READY",
            "m/3/model.onnx",
            "m/3/READY",
        ])
    }

    #[test]
    fn without_a_rollout_the_newest_swaps_in() {
        let serving = [("m".to_string(), Serving { primary: Some(1), canary: None })].into();
        let plans = select(&repo(false), &three(), &BTreeSet::new(), &BTreeSet::new(), &serving);
        assert_eq!(plans, [ModelPlan { model: "m".into(), primary: 3, canary: None, others: vec![] }]);
    }

    #[test]
    fn with_a_rollout_a_newer_version_is_a_canary_beside_the_primary() {
        let serving = [("m".to_string(), Serving { primary: Some(2), canary: None })].into();
        let plans = select(&repo(true), &three(), &BTreeSet::new(), &BTreeSet::new(), &serving);
        assert_eq!(plans[0], ModelPlan { model: "m".into(), primary: 2, canary: Some(3), others: vec![] });
        // A model not serving yet starts on its newest version, no canary.
        let plans = select(&repo(true), &three(), &BTreeSet::new(), &BTreeSet::new(), &BTreeMap::new());
        assert_eq!((plans[0].primary, plans[0].canary), (3, None));
        // A rejected version is skipped: the primary stays, no canary.
        let rejected = [("m".to_string(), 3)].into();
        let plans = select(&repo(true), &three(), &BTreeSet::new(), &rejected, &serving);
        assert_eq!((plans[0].primary, plans[0].canary), (2, None));
        // Other versions of the policy are kept beside both.
        let mut all = repo(true);
        all.version_policy = VersionPolicy::All;
        let plans = select(&all, &three(), &BTreeSet::new(), &BTreeSet::new(), &serving);
        assert_eq!(plans[0], ModelPlan { model: "m".into(), primary: 2, canary: Some(3), others: vec![1] });
        // Unloaded models are left out.
        let skip = ["m".to_string()].into();
        assert!(select(&all, &three(), &skip, &BTreeSet::new(), &serving).is_empty());
    }
}
