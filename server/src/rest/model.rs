//! `GET /v2/models/{m}[/versions/{v}]` (metadata) and `.../ready`.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};
use sluice_deployments::TensorSpec;

use super::AppState;
use crate::error::ApiError;

pub async fn metadata(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let model = &path["model"];
    let d = state.routes.resolve(model, path.get("version").map(String::as_str))?;
    let table = state.routes.table();
    // A multiplexed model's versions are its deployment's.
    let versions: Vec<&String> =
        table.models.get(d.name()).map(|m| m.versions.keys().collect()).unwrap_or_default();
    let meta = d.metadata();
    let tensors = |specs: &[TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.dtype.as_str(), "shape": s.shape }))
            .collect()
    };
    Ok(Json(json!({
        // The name asked for: a multiplexed model's id, not its deployment's.
        "name": model,
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
    let d = state.routes.resolve(&path["model"], path.get("version").map(String::as_str))?;
    let ready = d.is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((status, Json(json!({ "name": d.name(), "ready": ready }))))
}

/// `GET /v2/models/{m}[/versions/{v}]/config`: the Triton-style model configuration.
pub async fn config(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let d = state.routes.resolve(&path["model"], path.get("version").map(String::as_str))?;
    let policy = crate::model_config::version_policy(&state.routes, &state.controller, d.name());
    Ok(Json(crate::model_config::to_json(&crate::model_config::build(&d, policy))))
}

#[derive(serde::Deserialize, Default)]
pub struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// `POST /v2/repository/index` (body `{"ready": bool}` or empty): a bare JSON array.
pub async fn repository_index(
    State(state): State<AppState>,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let body = super::screen::read_body(body, state.max_body_bytes).await?;
    let req: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed repository index request: {e}")))?
    };
    let models: Vec<Value> = crate::repository_index(&state.routes, &state.controller, req.ready)
        .into_iter()
        .map(|m| {
            let mut entry = json!({"name": m.name, "state": m.state()});
            if !m.version.is_empty() {
                entry["version"] = json!(m.version);
            }
            if !m.reason.is_empty() {
                entry["reason"] = json!(m.reason);
            }
            entry
        })
        .collect();
    Ok(Json(Value::Array(models)))
}

/// `GET /v2/models[/{m}[/versions/{v}]]/stats`: Triton's cumulative statistics
/// ([`crate::model_stats`]).
pub async fn stats(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let model = path.get("model").map(String::as_str);
    let deployments =
        crate::model_stats::asked(&state.routes, model, path.get("version").map(String::as_str))?;
    Ok(Json(crate::model_stats::to_json(&crate::model_stats::build(&deployments))))
}

/// `POST /v2/repository/models/{m}/load`: (re)load a repository model now. A load that carries
/// a model config or files (Triton's `config` and `file:` parameters) is refused: the model
/// loads from the repository as it is there, and answering OK would say the override applied.
pub async fn load(
    State(state): State<AppState>,
    Path(model): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<StatusCode, ApiError> {
    may_control(&state, &headers, &uri)?;
    let body = super::screen::read_body(body, state.max_body_bytes).await?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("the load request's body must be JSON: {e}"))
        })?;
        let keys = doc.get("parameters").and_then(|p| p.as_object()).into_iter().flat_map(|p| p.keys());
        refuse_overrides(keys.map(String::as_str)).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    }
    let controller = state.controller.clone();
    sluice_controller::to_the_end(async move { controller.load_model(&model).await }).await?;
    Ok(StatusCode::OK)
}

/// Refuses a repository load that names a model config or files to load with (`config`,
/// `file:PATH`), naming the first.
pub fn refuse_overrides<'a>(mut keys: impl Iterator<Item = &'a str>) -> Result<(), String> {
    match keys.find(|k| *k == "config" || k.starts_with("file:")) {
        None => Ok(()),
        Some(k) => Err(format!(
            "load parameter `{k}` is not supported: a repository model loads from its folder as it is \
             there (write the config or files to the repository, then load)"
        )),
    }
}

/// Refuses a repository load or unload the port's [`crate::auth::Control`] does not allow, and
/// one a web page could have made a browser send ([`crate::auth::browser_refusal`]: a page the
/// user visits could unload the models of a server on localhost with a form).
fn may_control(state: &AppState, headers: &HeaderMap, uri: &axum::http::Uri) -> Result<(), ApiError> {
    use crate::auth::{CONTROL_CLOSED, CONTROL_NEEDS_TOKEN, Control, Refused};
    let hosts = match state.control {
        Control::Open { hosts } => hosts,
        Control::Token(_) | Control::Closed => crate::auth::Hosts::Any,
    };
    let authority = uri.authority().map(|a| a.as_str());
    let what = "repository load and unload on this port";
    if let Some(refusal) = crate::auth::browser_refusal(headers, authority, true, hosts, what) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, refusal));
    }
    state.control.check(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes())).map_err(|r| match r {
        Refused::NeedsToken => ApiError::new(StatusCode::UNAUTHORIZED, CONTROL_NEEDS_TOKEN),
        Refused::Closed => ApiError::new(StatusCode::FORBIDDEN, CONTROL_CLOSED),
    })
}

/// `POST /v2/repository/models/{m}/unload`: stop serving a repository model.
pub async fn unload(
    State(state): State<AppState>,
    Path(model): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    may_control(&state, &headers, &uri)?;
    let controller = state.controller.clone();
    sluice_controller::to_the_end(async move { controller.unload_model(&model).await }).await?;
    Ok(StatusCode::OK)
}
