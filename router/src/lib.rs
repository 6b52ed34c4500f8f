//! The route table: model name (and version) to the deployment that serves it. Readers load it
//! through [`arc_swap::ArcSwap`], so the request path takes no lock; a new table is published
//! whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_deployments::{InferError, Pipeline, Servable};

/// The versions of one model.
#[derive(Default)]
pub struct ModelRoute {
    /// Deployments (or a pipeline) by version string.
    pub versions: BTreeMap<String, Servable>,
    /// How requests that name no version are split: (version, weight). Empty: all go to the
    /// default version.
    pub split: Vec<(String, u32)>,
}

impl ModelRoute {
    /// The version a request without one gets: the highest numeric version, else the last by
    /// name (Triton's policy: highest ready).
    pub fn default_version(&self) -> Option<&Servable> {
        self.versions
            .iter()
            .max_by(|(a, _), (b, _)| match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.cmp(b),
            })
            .map(|(_, d)| d)
    }
}

/// Every model the server answers for.
#[derive(Default)]
pub struct RouteTable {
    pub models: HashMap<String, ModelRoute>,
    /// Plain-JSON routes: route prefix → the pipeline behind it.
    pub json_routes: HashMap<String, Arc<Pipeline>>,
}

/// Resolves model names to deployments.
pub struct Router {
    table: ArcSwap<RouteTable>,
    rng: std::sync::atomic::AtomicU64,
}

/// A request's say in which version serves it.
#[derive(Debug, Clone, Copy, Default)]
pub struct VersionChoice<'a> {
    /// The version in the path (`/versions/{v}`, gRPC `model_version`): exactly that one.
    pub exact: Option<&'a str>,
    /// A version pinned by header (`x-sluice-version`): that one, bypassing the split.
    pub pinned: Option<&'a str>,
}

/// The header (and gRPC metadata key) that pins a request to a version.
pub const VERSION_HEADER: &str = "x-sluice-version";

impl Router {
    pub fn new(table: RouteTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
            rng: std::sync::atomic::AtomicU64::new(0x2545_F491_4F6C_DD1D),
        }
    }

    /// Replaces the whole table at once; requests in flight keep the deployment they resolved.
    pub fn publish(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }

    /// The current table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The deployment for `model` at `version` (or the default version), or a NotFound error
    /// naming what is unknown.
    pub fn resolve(&self, model: &str, version: Option<&str>) -> Result<Servable, InferError> {
        self.route(model, VersionChoice { exact: version, pinned: None })
    }

    /// The deployment that serves a request: the exact version when the path names one, else
    /// a pinned version, else a weighted pick by the model's traffic split.
    pub fn route(&self, model: &str, choice: VersionChoice<'_>) -> Result<Servable, InferError> {
        let table = self.table.load();
        let route = table
            .models
            .get(model)
            .ok_or_else(|| InferError::not_found(format!("unknown model `{model}`")))?;
        let wanted = choice.exact.filter(|v| !v.is_empty()).or(choice.pinned.filter(|v| !v.is_empty()));
        let found = match wanted {
            Some(v) => route.versions.get(v),
            None => self.weighted(route).or_else(|| route.default_version()),
        };
        found.cloned().ok_or_else(|| {
            let known: Vec<&str> = route.versions.keys().map(String::as_str).collect();
            InferError::not_found(format!(
                "unknown version `{}` of model `{model}`; available: {}",
                wanted.unwrap_or(""),
                known.join(", ")
            ))
        })
    }

    fn weighted<'r>(&self, route: &'r ModelRoute) -> Option<&'r Servable> {
        let total: u64 = route.split.iter().map(|(_, w)| *w as u64).sum();
        if total == 0 {
            return None;
        }
        let mut z = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let mut pick = (z ^ (z >> 31)) % total;
        for (version, weight) in &route.split {
            if pick < *weight as u64 {
                return route.versions.get(version);
            }
            pick -= *weight as u64;
        }
        None
    }

    /// The versions of `model`, in order (empty when unknown).
    pub fn versions(&self, model: &str) -> Vec<String> {
        self.table.load().models.get(model).map(|m| m.versions.keys().cloned().collect()).unwrap_or_default()
    }

    /// The pipeline behind a plain-JSON route.
    pub fn json_route(&self, path: &str) -> Option<Arc<Pipeline>> {
        self.table.load().json_routes.get(path).cloned()
    }

    /// True when every deployment of every model is ready.
    pub fn all_ready(&self) -> bool {
        self.table.load().models.values().flat_map(|m| m.versions.values()).all(|d| d.is_ready())
    }
}
