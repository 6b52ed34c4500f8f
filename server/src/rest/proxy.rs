//! Ray Serve's proxy endpoints, so that KubeRay and Serve tooling can probe Sluice's REST
//! frontend as they probe a Serve proxy: `GET /-/healthz` answers `success` (KubeRay's
//! readiness probe greps for it) and `GET /-/routes` the routes by application, both 503
//! "This node is being drained." once shutdown has begun (from its first moment: during
//! `shutdown_delay_s` too, while the listeners still accept).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;

const DRAINING: &str = "This node is being drained.";

/// Shutdown has begun.
fn draining(state: &AppState) -> bool {
    state.readiness.phase() == crate::readiness::Phase::Stopping || *state.draining.borrow()
}

pub async fn healthz(State(state): State<AppState>) -> Response {
    match draining(&state) {
        true => (StatusCode::SERVICE_UNAVAILABLE, DRAINING).into_response(),
        false => "success".into_response(),
    }
}

/// `{route: application}` for every route this frontend serves: each pipeline's JSON route and
/// each model's OIP path. The application is the controller's name for it when this process
/// runs the controller, else (a proxy on another node, which only follows the route table)
/// the model's or pipeline's own name.
pub async fn routes(State(state): State<AppState>) -> Response {
    if draining(&state) {
        return (StatusCode::SERVICE_UNAVAILABLE, DRAINING).into_response();
    }
    let mut app_of: BTreeMap<String, String> = BTreeMap::new();
    for (app, a) in state.controller.status().applications {
        app_of.extend(a.deployments.into_keys().map(|d| (d, app.clone())));
    }
    for a in state.controller.desired().map(|c| c.applications).unwrap_or_default() {
        app_of.extend(a.pipeline.map(|p| (p.name, a.name.clone())));
    }
    let app = |name: &str| app_of.get(name).cloned().unwrap_or_else(|| name.to_string());
    let table = state.routes.table();
    let mut routes = BTreeMap::new();
    routes.extend(table.json_routes.iter().map(|(prefix, p)| (prefix.clone(), app(p.name()))));
    routes.extend(table.models.keys().map(|m| (format!("/v2/models/{m}"), app(m))));
    Json(routes).into_response()
}
