//! `grpc.health.v1` following readiness: the server (`""`) and `inference.GRPCInferenceService`
//! are SERVING exactly when REST `/v2/health/ready` answers 200 (which counts a deployment
//! autoscaled to zero as ready); each model name is a service too, SERVING while every version
//! of it has a ready replica, as the model's own readiness says (NOT_SERVING at zero replicas;
//! unknown, NOT_FOUND, once the model is gone). Everything turns NOT_SERVING when shutdown
//! starts, and Watch streams end then. The follower wakes on a change (a new route table, a
//! replica's readiness or replica set, the phase), never on a timer.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::{FutureExt, select_all};
use sluice_router::Router;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::readiness::{Phase, Readiness};

/// The inference service's name, as health clients ask for it.
pub const INFERENCE_SERVICE: &str = "inference.GRPCInferenceService";

fn status(ok: bool) -> ServingStatus {
    if ok { ServingStatus::Serving } else { ServingStatus::NotServing }
}

/// Keeps `reporter` in step with readiness until `stop` turns true.
pub async fn follow(
    reporter: HealthReporter,
    readiness: Readiness,
    routes: Arc<Router>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tables = routes.subscribe();
    let mut phase = readiness.phase_watch();
    let mut reported = Reported { reporter, statuses: BTreeMap::new() };
    loop {
        // Marked seen before the table is read: a publish stores its table before it tells
        // the watch, so the table read here is at least the one marked seen (read first, a
        // publish in between was marked seen with the older table in hand).
        tables.borrow_and_update();
        phase.borrow_and_update();
        let table = routes.table();
        // Marked seen before the statuses are read, so a change from here on wakes the wait.
        let mut watches: Vec<watch::Receiver<usize>> =
            table.models.values().flat_map(|m| m.versions.values()).flat_map(|v| v.ready_watches()).collect();
        for w in &mut watches {
            w.borrow_and_update();
        }
        let serving = readiness.phase() == Phase::Serving;
        let overall = status(readiness.server_ready());
        let mut now = BTreeMap::from([(String::new(), overall), (INFERENCE_SERVICE.to_string(), overall)]);
        for (name, route) in &table.models {
            now.insert(name.clone(), status(serving && route.versions.values().all(|v| v.is_ready())));
        }
        reported.update(now).await;
        let replica_change = async {
            if watches.is_empty() {
                std::future::pending::<()>().await;
            }
            let _ = select_all(watches.iter_mut().map(|w| w.changed().boxed())).await;
        };
        // (The table is held while waiting, so its deployments, and their watches, live.)
        let gone = tokio::select! {
            () = crate::listen::stopped(&mut stop) => true,
            changed = tables.changed() => changed.is_err(),
            changed = phase.changed() => changed.is_err(),
            () = replica_change => false,
        };
        if gone {
            break;
        }
    }
    // Whoever still watches hears that it is over, then the Watch streams end (they would
    // otherwise hold their connections, and shutdown, for the whole grace period).
    let over = reported.statuses.keys().map(|name| (name.clone(), ServingStatus::NotServing)).collect();
    reported.update(over).await;
    reported.update(BTreeMap::new()).await;
}

/// What the reporter says now, so that watchers hear of changes only.
struct Reported {
    reporter: HealthReporter,
    statuses: BTreeMap<String, ServingStatus>,
}

impl Reported {
    /// Reports every status that changed, and forgets services that are gone (NOT_FOUND).
    async fn update(&mut self, now: BTreeMap<String, ServingStatus>) {
        for name in self.statuses.keys().filter(|n| !now.contains_key(*n)) {
            self.reporter.clear_service_status(name).await;
        }
        for (name, status) in &now {
            if self.statuses.get(name) != Some(status) {
                self.reporter.set_service_status(name, *status).await;
            }
        }
        self.statuses = now;
    }
}
