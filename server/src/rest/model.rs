//! `GET /v2/models/{m}[/versions/{v}]` (metadata) and `.../ready`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use sluice_deployments::TensorSpec;

use super::AppState;
use crate::error::ApiError;

pub async fn metadata(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let model = &path["model"];
    let d = state
        .routes
        .resolve(model, path.get("version").map(String::as_str))?;
    let table = state.routes.table();
    let versions: Vec<&String> = table
        .models
        .get(model)
        .map(|m| m.versions.keys().collect())
        .unwrap_or_default();
    let meta = d.metadata();
    let tensors = |specs: &[TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.dtype.as_str(), "shape": s.shape }))
            .collect()
    };
    Ok(Json(json!({
        "name": d.name(),
        "versions": versions,
        "platform": meta.platform,
        "inputs": tensors(&meta.inputs),
        "outputs": tensors(&meta.outputs),
    })))
}

pub async fn ready(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let d = state
        .routes
        .resolve(&path["model"], path.get("version").map(String::as_str))?;
    let ready = d.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(json!({ "name": d.name(), "ready": ready }))))
}
