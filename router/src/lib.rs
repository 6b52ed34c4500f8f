//! The route table: model name (and version) to the deployment that serves it. Readers load it
//! through [`arc_swap::ArcSwap`], so the request path takes no lock; a new table is published
//! whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_deployments::{Deployment, InferError};

/// The versions of one model.
#[derive(Default)]
pub struct ModelRoute {
    /// Deployments by version string.
    pub versions: BTreeMap<String, Arc<Deployment>>,
}

impl ModelRoute {
    /// The version a request without one gets: the highest numeric version, else the last by
    /// name (Triton's policy: highest ready).
    pub fn default_version(&self) -> Option<&Arc<Deployment>> {
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
}

impl RouteTable {
    /// Builds a table from deployments; each is routed under its name and version.
    pub fn from_deployments(deployments: impl IntoIterator<Item = Arc<Deployment>>) -> Self {
        let mut models: HashMap<String, ModelRoute> = HashMap::new();
        for d in deployments {
            models.entry(d.name().to_string()).or_default().versions.insert(d.version().to_string(), d);
        }
        Self { models }
    }
}

/// Resolves model names to deployments.
pub struct Router {
    table: ArcSwap<RouteTable>,
}

impl Router {
    pub fn new(table: RouteTable) -> Self {
        Self { table: ArcSwap::from_pointee(table) }
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
    pub fn resolve(&self, model: &str, version: Option<&str>) -> Result<Arc<Deployment>, InferError> {
        let table = self.table.load();
        let route = table
            .models
            .get(model)
            .ok_or_else(|| InferError::not_found(format!("unknown model `{model}`")))?;
        let found = match version {
            Some(v) if !v.is_empty() => route.versions.get(v),
            _ => route.default_version(),
        };
        found.cloned().ok_or_else(|| {
            let known: Vec<&str> = route.versions.keys().map(String::as_str).collect();
            InferError::not_found(format!(
                "unknown version `{}` of model `{model}`; available: {}",
                version.unwrap_or(""),
                known.join(", ")
            ))
        })
    }

    /// The versions of `model`, in order (empty when unknown).
    pub fn versions(&self, model: &str) -> Vec<String> {
        self.table.load().models.get(model).map(|m| m.versions.keys().cloned().collect()).unwrap_or_default()
    }

    /// True when every deployment of every model is ready.
    pub fn all_ready(&self) -> bool {
        self.table.load().models.values().flat_map(|m| m.versions.values()).all(|d| d.is_ready())
    }
}
