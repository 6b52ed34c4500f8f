//! `GET /v2/health/live`, `/v2/health/ready` and `/v2` (server metadata).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// 200 when serving and every model is ready (or autoscaled to zero on purpose: requests to it
/// wait while a replica starts); 503 while models load, when one has no ready replica
/// otherwise, and once shutdown starts (clients read the status only).
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let ready = state.readiness.server_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready })))
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": crate::SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": crate::EXTENSIONS,
    }))
}
