//! The Open Inference Protocol REST frontend (axum). Handlers are thin adapters: decode, call
//! the router and deployment, encode. Bodies are read as bytes whatever the Content-Type
//! (tritonclient sends none), up to `http_options.max_body_bytes`, gzip or deflate encoded or
//! not ([`screen`]); responses are compressed when the client's `Accept-Encoding` asks.

mod health;
pub mod infer;
mod intake;
pub use intake::{BodyBudget, IntakeLayer, timed as timed_body};
pub mod json;
mod json_scan;
pub(crate) mod model;
mod proxy;
pub mod route;
pub mod screen;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::future::{BoxFuture, Either};
use sluice_router::Router as RouteTable;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

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
    /// Who may load and unload repository models here (they change what serves).
    pub control: crate::auth::Control,
}

/// The REST routes of the Open Inference Protocol, without the intake ([`frontend`] puts it in
/// front of them).
pub fn router(state: AppState, http: &sluice_config::HttpOptions) -> Router {
    Router::new()
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
        // Most infer requests never get here (see [`Rest`]): those with percent-escapes do.
        .route("/v2/models/{model}/infer", post(infer::infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer::infer))
        .route("/openapi.json", get(crate::openapi::serve_rest))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route::fallback)
        // One layer for every route (each `Router::layer` call boxes the routes again, and
        // axum clones every box per request).
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
        .with_state(state)
}

/// The REST frontend as its listener serves it, outermost first: the request span when
/// something records it (DEBUG or OpenTelemetry); the intake (the screen, the body read
/// timeout, and decompression and compression for the requests that ask for them; gRPC
/// answers on a shared port are left alone: gRPC compresses per message); then [`Rest`]: the
/// infer requests straight to their handler, everything else through `routes`.
pub fn frontend(routes: Router, state: AppState, intake: IntakeLayer) -> Frontend {
    let intake = intake.layer(Rest { routes, state });
    if crate::telemetry::request_spans_recorded() {
        let traced = tower::ServiceBuilder::new()
            .map_response(IntoResponse::into_response)
            .layer(
                tower_http::trace::TraceLayer::new_for_http()
                    .make_span_with(crate::telemetry::request_span::<axum::body::Body>),
            )
            .service(intake);
        Frontend::Traced(BoxCloneSyncService::new(traced))
    } else {
        Frontend::Plain(intake)
    }
}

/// The REST frontend's service ([`frontend`]).
#[derive(Clone)]
pub enum Frontend {
    Plain(intake::Intake<Rest>),
    /// Boxed: the span's layer is only there when spans are recorded.
    Traced(BoxCloneSyncService<Request, Response, Infallible>),
}

impl Service<axum::http::Request<hyper::body::Incoming>> for Frontend {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        <intake::Intake<Rest> as Service<Request>>::Future,
        BoxFuture<'static, Result<Response, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self {
            Frontend::Plain(s) => s.poll_ready(cx),
            Frontend::Traced(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, req: axum::http::Request<hyper::body::Incoming>) -> Self::Future {
        let req = req.map(Body::new);
        match self {
            Frontend::Plain(s) => Either::Left(s.call(req)),
            Frontend::Traced(s) => Either::Right(s.call(req)),
        }
    }
}

/// Behind the intake: `POST /v2/models/{m}[/versions/{v}]/infer` goes straight to its handler
/// ([`infer::serve_matched`]), every other request through the routes. The router's match
/// cost each infer request 15 of its 104 allocations (its path parameters, the extensions map
/// they are stored in, the route's boxed clone and future, the body limit's extension;
/// `scripts/bench_floor.py`).
#[derive(Clone)]
pub struct Rest {
    routes: Router,
    state: AppState,
}

impl Service<Request> for Rest {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        BoxFuture<'static, Result<Response, Infallible>>,
        axum::routing::future::RouteFuture<Infallible>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The routes are always ready (axum's own `Service` impl says so).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if req.method() == Method::POST
            && let Some(names) = infer::Names::of(req.uri().path())
        {
            let state = self.state.clone();
            return Either::Left(Box::pin(async move { Ok(infer::serve_matched(state, req, names).await) }));
        }
        // A name escaped into bytes that are not UTF-8 would get axum's plain-text 400 from the
        // route's path parameters.
        if req.uri().path().contains('%') && !decodes_to_utf8(req.uri().path()) {
            let message = format!("the path `{}` does not decode to UTF-8", req.uri().path());
            let answer = ApiError::new(StatusCode::BAD_REQUEST, message).into_response();
            return Either::Left(Box::pin(std::future::ready(Ok(answer))));
        }
        Either::Right(self.routes.call(req))
    }
}

/// Whether a path's percent escapes decode to UTF-8 (an escape that is not one, `%zz`, stays
/// as written, as axum reads it).
fn decodes_to_utf8(path: &str) -> bool {
    percent_encoding::percent_decode_str(path).decode_utf8().is_ok()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
