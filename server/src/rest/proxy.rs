//! Ray Serve's proxy endpoints, so that KubeRay and Serve tooling can probe Sluice's REST
//! frontend as they probe a Serve proxy: `GET /-/healthz` answers `success` (KubeRay's
//! readiness probe greps for it) and `GET /-/routes` the routes by application, both 503
//! "This node is being drained." once shutdown has begun.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;

const DRAINING: &str = "This node is being drained.";

pub async fn healthz(State(state): State<AppState>) -> Response {
    match *state.draining.borrow() {
        true => (StatusCode::SERVICE_UNAVAILABLE, DRAINING).into_response(),
        false => "success".into_response(),
    }
}

/// `{route: application}`: each application's JSON route and each model's OIP path.
pub async fn routes(State(state): State<AppState>) -> Response {
    if *state.draining.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, DRAINING).into_response();
    }
    let mut routes = BTreeMap::new();
    for (app, a) in state.controller.status().applications {
        routes.extend(a.route_prefix.clone().map(|p| (p, app.clone())));
        routes.extend(a.deployments.keys().map(|d| (format!("/v2/models/{d}"), app.clone())));
    }
    let pipelines = state.controller.desired().map(|c| c.applications).unwrap_or_default();
    for a in pipelines {
        routes.extend(a.pipeline.map(|p| (format!("/v2/models/{}", p.name), a.name.clone())));
    }
    Json(routes).into_response()
}
