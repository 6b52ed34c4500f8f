//! The Open Inference Protocol REST frontend (axum). Handlers are thin adapters: decode, call
//! the router and deployment, encode. Bodies are read as bytes whatever the Content-Type
//! (tritonclient sends none), up to `http_options.max_body_bytes`, gzip or deflate encoded or
//! not ([`screen`]); responses are compressed when the client's `Accept-Encoding` asks.

mod health;
pub mod infer;
mod intake;
pub mod json;
mod model;
mod proxy;
pub mod route;
pub mod screen;

use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use sluice_router::Router as RouteTable;

use crate::error::ApiError;

/// What every handler shares, behind one `Arc`: axum clones the state into each request's
/// service stack, and one reference count is the cheapest clone there is (the fields' own
/// clones, watch receivers included, cost the hot path about a microsecond per request).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    pub routes: Arc<RouteTable>,
    pub controller: Arc<sluice_controller::Controller>,
    pub readiness: crate::readiness::Readiness,
    pub max_body_bytes: usize,
    /// True once shutdown has begun (Ray's proxy health answers 503 then).
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// The REST routes of the Open Inference Protocol.
pub fn router(state: AppState, http: &sluice_config::HttpOptions) -> Router {
    let max_body_bytes = http.max_body_bytes;
    let routes = Router::new()
        .route("/v2", get(health::server_metadata))
        .route("/v2/health/live", get(health::live))
        .route("/v2/health/ready", get(health::ready))
        .route("/v2/models/{model}", get(model::metadata))
        .route("/v2/models/{model}/versions/{version}", get(model::metadata))
        .route("/v2/models/{model}/ready", get(model::ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model::ready))
        .route("/v2/models/{model}/config", get(model::config))
        .route("/v2/models/{model}/versions/{version}/config", get(model::config))
        .route("/v2/repository/index", post(model::repository_index))
        .route("/v2/repository/models/{model}/load", post(model::load))
        .route("/v2/repository/models/{model}/unload", post(model::unload))
        .route("/v2/models/stats", get(model::stats))
        .route("/v2/models/{model}/stats", get(model::stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(model::stats))
        .route("/metrics", get(crate::metrics::render))
        .route("/-/healthz", get(proxy::healthz))
        .route("/-/routes", get(proxy::routes))
        .route("/v2/models/{model}/infer", post(infer::infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer::infer))
        .route("/openapi.json", get(crate::openapi::serve_rest))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route::fallback)
        // One stack for every route (each `Router::layer` call boxes the routes again, and
        // axum clones every box per request), outermost first:
        .layer(
            tower::ServiceBuilder::new()
                // The screen, the body read timeout, and decompression and compression for
                // the requests that ask for them; gRPC answers (shared port) are left alone:
                // gRPC compresses per message.
                .layer(intake::IntakeLayer {
                    max_body_bytes,
                    body_read_timeout: Duration::from_secs_f64(http.body_read_timeout_s),
                })
                .layer(DefaultBodyLimit::max(max_body_bytes)),
        )
        .with_state(state);
    // A span per HTTP request, outermost, when something records it (DEBUG or OpenTelemetry).
    if crate::telemetry::request_spans_recorded() {
        routes.layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(crate::telemetry::request_span::<axum::body::Body>),
        )
    } else {
        routes
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
