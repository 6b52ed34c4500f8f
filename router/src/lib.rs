//! The route table: model name (and version) to the deployment that serves it. Readers load it
//! through [`arc_swap::ArcSwap`], so the request path takes no lock; a new table is published
//! whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sluice_deployments::{InferError, InferRequest, InferResponse, Pipeline, Servable, Shadow};

/// How many times [`Router::infer`] routes a request again that versions swapped out hand
/// back (each swap after it took the request in).
pub const HANDED_BACK_MAX: usize = 4;

/// The versions of one model.
#[derive(Default)]
pub struct ModelRoute {
    /// Deployments (or a pipeline) by version string.
    pub versions: BTreeMap<String, Servable>,
    /// How requests that name no version are split: (version, weight). Empty: all go to the
    /// default version.
    pub split: Vec<(String, u32)>,
    /// Requests served by this version are also copied to a shadow.
    pub shadow: Option<(String, Arc<Shadow>)>,
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

fn total_weight(split: &[(String, u32)]) -> u64 {
    split.iter().map(|(_, w)| *w as u64).sum()
}

/// The version of `split` that a draw `r` (uniform below the total weight) falls on.
pub fn pick_weighted(split: &[(String, u32)], mut r: u64) -> Option<&str> {
    for (version, weight) in split {
        if r < *weight as u64 {
            return Some(version);
        }
        r -= *weight as u64;
    }
    None
}

/// Where a router's generations start: the microseconds since the Unix epoch when it was made.
/// A proxy reports the generation of the controller's table it has applied, and the controller
/// waits for that to reach the table that retired a version; started again, a controller
/// counting from 0 read a proxy still reporting the generation of the one before it (a larger
/// number, of an older table) as having followed. Counted from the time instead, a controller
/// started later begins above any generation one started earlier can have reached, unless that
/// one published more than one table a microsecond.
fn first_generation() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since_epoch.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

/// Resolves model names to deployments.
pub struct Router {
    table: ArcSwap<RouteTable>,
    /// Grows by one with each table published, so watchers (gRPC health) learn of a new one;
    /// from [`first_generation`].
    published: tokio::sync::watch::Sender<u64>,
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
            published: tokio::sync::watch::Sender::new(first_generation()),
        }
    }

    /// Replaces the whole table at once; requests in flight keep the deployment they resolved.
    pub fn publish(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
        self.published.send_modify(|n| *n += 1);
    }

    /// The generation of the table published last (one more with each). Read before
    /// [`Router::table`], the table read is at least that new (where tables are published one
    /// at a time, as the controller does under its state's lock).
    pub fn generation(&self) -> u64 {
        *self.published.borrow()
    }

    /// Changes whenever a new table is published.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
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
        let found = match (found, &route.shadow) {
            (Some(Servable::Deployment(d)), Some((version, shadow))) if d.version() == version => {
                return Ok(Servable::Shadowed(d.clone(), shadow.clone()));
            }
            (found, _) => found,
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

    /// What serves `model` and `choice` now, when `routed` ([`Routes::route`]'s answer before the
    /// request's body was read and decoded) has been taken out of the table by a swap since
    /// ([`Servable::is_retired`]); `None` while `routed` serves, or when nothing does (the
    /// request then gets its answer from `routed`, served or refused as it is drained).
    pub fn rerouted(&self, routed: &Servable, model: &str, choice: VersionChoice<'_>) -> Option<Servable> {
        if !routed.is_retired() {
            return None;
        }
        self.route(model, choice).ok()
    }

    /// Runs `request` on `servable` (routed for `model` and `choice`). A request the version
    /// hands back, swapped out with no replica while the request waited for one (a proxy's
    /// copy, [`sluice_deployments::Deployment::close_handing_back`]), runs where the table
    /// routes it now, up to [`HANDED_BACK_MAX`] times; it keeps its deadline. Returns the
    /// answer, and what gave it when that is not `servable` (the request is that one's, for
    /// its metrics). Nothing routes it now: the last version's 503.
    pub async fn infer(
        &self,
        servable: &Servable,
        model: &str,
        choice: VersionChoice<'_>,
        request: InferRequest,
    ) -> (Result<InferResponse, InferError>, Option<Servable>) {
        let mut back = None;
        let mut answer = servable.infer_handing_back(request, &mut back).await;
        let mut moved = None;
        for _ in 0..HANDED_BACK_MAX {
            let Some(request) = back.take() else { break };
            let Ok(next) = self.route(model, choice) else { break };
            answer = next.infer_handing_back(request, &mut back).await;
            moved = Some(next);
        }
        (answer, moved)
    }

    /// [`Routes::rerouted`] for the pipeline behind a plain-JSON route.
    pub fn rerouted_json(&self, routed: &Pipeline, path: &str) -> Option<Arc<Pipeline>> {
        if !routed.deployments().any(|d| d.is_retired()) {
            return None;
        }
        self.json_route(path)
    }

    fn weighted<'r>(&self, route: &'r ModelRoute) -> Option<&'r Servable> {
        let total = total_weight(&route.split);
        if total == 0 {
            return None;
        }
        // A thread-local generator seeded from the OS: each process draws its own sequence.
        pick_weighted(&route.split, fastrand::u64(..total)).and_then(|v| route.versions.get(v))
    }

    /// The versions of `model`, in order (empty when unknown).
    pub fn versions(&self, model: &str) -> Vec<String> {
        self.table.load().models.get(model).map(|m| m.versions.keys().cloned().collect()).unwrap_or_default()
    }

    /// The pipeline behind a plain-JSON route.
    pub fn json_route(&self, path: &str) -> Option<Arc<Pipeline>> {
        self.table.load().json_routes.get(path).cloned()
    }

    /// True when every version of every model is ready, or has no ready replica only because
    /// autoscaling took it to zero on purpose ([`Servable::ready_or_at_zero`]): what server
    /// readiness asks. Such a version takes requests (they wait while a replica starts), and
    /// only a request starts one, so a server that reported it unready would never get one.
    pub fn all_ready(&self) -> bool {
        self.table.load().models.values().flat_map(|m| m.versions.values()).all(|d| d.ready_or_at_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::{RouteTable, Router, pick_weighted, total_weight};

    /// Each table published is one generation on, and a router made later (a controller
    /// started again) starts above where one made earlier got to.
    #[test]
    fn generations_grow_and_a_later_router_starts_above_an_earlier_one() {
        let first = Router::new(RouteTable::default());
        let start = first.generation();
        for _ in 0..10 {
            first.publish(RouteTable::default());
        }
        assert_eq!(first.generation(), start + 10);
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(Router::new(RouteTable::default()).generation() > first.generation());
    }

    /// Draws `n` times with a seeded generator; returns how many fell on `version`.
    fn count(split: &[(String, u32)], version: &str, n: u32, seed: u64) -> u32 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let total = total_weight(split);
        (0..n).filter(|_| pick_weighted(split, rng.u64(..total)) == Some(version)).count() as u32
    }

    #[test]
    fn the_split_follows_the_weights_for_every_seed() {
        let split = vec![("1".to_string(), 90), ("2".to_string(), 10)];
        // 10 % of 20,000 draws: mean 2,000, standard deviation ~42; 5 sigma is ±212.
        for seed in [1, 2, 3, 42, 0xDEAD_BEEF, 7_777_777] {
            let canary = count(&split, "2", 20_000, seed);
            assert!((1_788..=2_212).contains(&canary), "seed {seed}: {canary} of 20000 went to the canary");
        }
    }

    #[test]
    fn zero_and_full_weights_are_exact() {
        let none = vec![("1".to_string(), 100), ("2".to_string(), 0)];
        assert_eq!(count(&none, "2", 5_000, 9), 0);
        let all = vec![("1".to_string(), 0), ("2".to_string(), 100)];
        assert_eq!(count(&all, "2", 5_000, 9), 5_000);
    }

    #[test]
    fn draws_map_onto_cumulative_weights() {
        let split = vec![("a".to_string(), 3), ("b".to_string(), 0), ("c".to_string(), 2)];
        let picks: Vec<_> = (0..5).map(|r| pick_weighted(&split, r)).collect();
        assert_eq!(picks, [Some("a"), Some("a"), Some("a"), Some("c"), Some("c")]);
        assert_eq!(pick_weighted(&split, 5), None);
    }
}
