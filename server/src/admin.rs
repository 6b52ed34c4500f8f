//! The admin API, on its own port (127.0.0.1:8265 by default), in Ray Serve's shape:
//! `PUT /api/serve/applications` takes a whole config (YAML or JSON) declaratively,
//! `GET` reports applications, deployments, versions, replicas, weights and recent events,
//! `DELETE` removes every application (`/api/serve/applications/{app}`: one). Rollouts:
//! `POST /api/serve/deployments/{d}/canary {"weight": N}`, `.../promote`, `.../rollback`.
//! Model repository: `POST /api/sluice/repository/{model}/notify` scans it now.
//! With a bearer token configured (env `admin_options.token_env`), every call must carry it.

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use sluice_controller::{Controller, Status};

use crate::error::ApiError;

/// The header that tells the server where relative model paths of a PUT config start
/// (`sluice deploy` sends the config file's folder).
pub const BASE_DIR_HEADER: &str = "x-sluice-base-dir";

#[derive(Clone)]
struct AdminState {
    controller: Arc<Controller>,
    base_dir: PathBuf,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The admin routes. `token`: the bearer token every request must carry, if any.
pub fn router(controller: Arc<Controller>, base_dir: PathBuf, token: Option<String>) -> Router {
    let state = AdminState { controller, base_dir };
    Router::new()
        .route("/api/serve/applications", put(deploy).get(status).delete(delete_all))
        .route("/api/serve/applications/", put(deploy).get(status).delete(delete_all))
        .route("/api/serve/applications/{app}", axum::routing::delete(delete_one))
        .route("/api/serve/deployments/{name}/canary", post(set_weight))
        .route("/api/serve/deployments/{name}/promote", post(promote))
        .route("/api/serve/deployments/{name}/rollback", post(rollback))
        .route("/api/sluice/routes", get(routes_snapshot))
        .route("/api/sluice/repository/{model}/notify", post(notify_repository))
        .route("/-/healthz", get(|| async { "ok" }))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(crate::telemetry::request_span::<axum::body::Body>),
        )
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let token = token.clone();
            async move {
                if let Some(t) = token
                    && !crate::auth::bearer_matches(req.headers().get(header::AUTHORIZATION), &t)
                {
                    return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                }
                next.run(req).await
            }
        }))
        .with_state(state)
}

async fn deploy(State(s): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "the config must be UTF-8 YAML or JSON");
    };
    // On a cluster, paths resolve in the job's working dir, never the client's folder.
    let base = headers
        .get(BASE_DIR_HEADER)
        .filter(|_| !s.controller.on_cluster())
        .and_then(|v| v.to_str().ok())
        .map(PathBuf::from)
        .unwrap_or_else(|| s.base_dir.clone());
    let config = match sluice_config::parse(text, &base.join("deployed-config.yaml")) {
        Ok(c) => c,
        Err(errors) => {
            let list: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid config; nothing changed", "errors": list})),
            )
                .into_response();
        }
    };
    match s.controller.apply(&config).await {
        Ok(()) => Json(s.controller.status()).into_response(),
        Err(e) => {
            let mut e = ApiError::from(e);
            e.message.push_str("; nothing changed");
            e.into_response()
        }
    }
}

/// The status after a change, or why the change was refused.
type Answer = Result<Json<Status>, ApiError>;

/// The route table as data, for proxies on other nodes ([`crate::snapshot`]).
async fn routes_snapshot(State(s): State<AdminState>) -> Json<crate::snapshot::Snapshot> {
    Json(crate::snapshot::take(s.controller.routes()))
}

async fn status(State(s): State<AdminState>) -> Json<Status> {
    Json(s.controller.status())
}

async fn delete_all(State(s): State<AdminState>) -> Answer {
    s.controller.delete(None).await?;
    Ok(Json(s.controller.status()))
}

async fn delete_one(State(s): State<AdminState>, Path(app): Path<String>) -> Answer {
    s.controller.delete(Some(&app)).await?;
    Ok(Json(s.controller.status()))
}

async fn set_weight(State(s): State<AdminState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let weight = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["weight"].as_u64());
    let Some(weight) = weight.and_then(|w| u32::try_from(w).ok()) else {
        return Err(ApiError::bad_request("body must be {\"weight\": 0..100}"));
    };
    s.controller.set_weight(&name, weight).await?;
    Ok(Json(s.controller.status()))
}

async fn promote(State(s): State<AdminState>, Path(name): Path<String>) -> Answer {
    s.controller.promote(&name).await?;
    Ok(Json(s.controller.status()))
}

async fn rollback(State(s): State<AdminState>, Path(name): Path<String>) -> Answer {
    s.controller.rollback(&name, "rolled back by hand").await?;
    Ok(Json(s.controller.status()))
}

/// A training job wrote a version of `model`: scan the repository now (rather than at the next
/// poll) and apply what changed.
async fn notify_repository(State(s): State<AdminState>, Path(model): Path<String>) -> Answer {
    s.controller.notify_repository(&model).await?;
    Ok(Json(s.controller.status()))
}
