//! The admin API, on its own port (127.0.0.1:8265 by default: Ray's dashboard port).
//!
//! Sluice's own API: `PUT /api/serve/applications` takes a whole Sluice config (YAML or JSON),
//! applies it and answers the status; `GET /api/sluice/status` reports applications,
//! deployments, versions, replicas, weights, recent traffic and events;
//! `DELETE /api/serve/applications/{app}` removes one application. Rollouts:
//! `POST /api/serve/deployments/{d}/canary {"weight": N}`, `.../promote`, `.../rollback`.
//! Model repository: `POST /api/sluice/repository/{model}/notify` scans it now.
//!
//! Ray's dashboard API ([`ray`]), for `serve deploy/status/config/shutdown` and KubeRay: the
//! same PUT takes Ray's `ServeDeploySchema` (told apart by its content, see
//! [`crate::ray_serve::schema::is_ray_config`]), `GET` and `DELETE /api/serve/applications/`
//! answer Ray's shapes, and `GET /api/ray/version` and `/api/version` Ray's version check.
//!
//! With a bearer token configured (env `admin_options.token_env`), every call must carry it, in
//! `Authorization` or (as KubeRay sends it) `X-Ray-Authorization`, or in the cookie the status
//! page's login sets ([`page`]).
//!
//! `GET /` is the status page ([`page`]); `GET /openapi.json` this API's OpenAPI document.

mod page;
mod ray;
mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use sluice_controller::{Controller, Status};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::node::LocalNode;
use crate::ray_serve::details::Frontends;

/// The header that tells the server where relative model paths of a PUT config start
/// (`sluice deploy` sends the config file's folder).
pub const BASE_DIR_HEADER: &str = "x-sluice-base-dir";

/// What a client escapes in [`BASE_DIR_HEADER`]'s path (besides every byte past ASCII): the
/// server percent-decodes it.
pub const BASE_DIR_ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    controller: Arc<Controller>,
    /// Where relative paths of a deployed config start unless the request says otherwise.
    base_dir: PathBuf,
    started: Arc<sluice_config::Config>,
    /// The started config as its file says (before command-line overrides): what a deployed
    /// config's server settings are compared with.
    as_written: Arc<sluice_config::Config>,
    node: LocalNode,
    frontends: Frontends,
    /// The server's phase: shutdown has begun once it is `Stopping`.
    phase: watch::Receiver<crate::readiness::Phase>,
    /// The application entries last deployed through Ray's API, by name (`deployed_app_config`).
    submitted: Arc<Mutex<Submitted>>,
}

/// What Ray's API last deployed ([`AdminState::submitted`]), and the controller's generation
/// of that deploy ([`Controller::deploy`]).
#[derive(Default)]
pub(crate) struct Submitted {
    pub(crate) apps: BTreeMap<String, Value>,
    generation: u64,
}

impl Submitted {
    /// A Ray deploy's entries (the controller's deploy `generation`) replace the others.
    pub(crate) fn replace(&mut self, apps: BTreeMap<String, Value>, generation: u64) {
        self.apps = apps;
        self.generation = generation;
    }

    /// Forgets `app` (every application with `None`) once a delete or a native apply that
    /// replaced the deploys below generation `before` is done, unless the entries come from a
    /// deploy at or after it (asked for while the change waited for its turn, applied after
    /// it: a shutdown wiped them, and `serve config` found none for a running application).
    pub(crate) fn forget(&mut self, app: Option<&str>, before: u64) {
        if self.generation >= before {
            return;
        }
        match app {
            Some(app) => {
                self.apps.remove(app);
            }
            None => self.apps.clear(),
        }
    }
}

impl AdminState {
    /// `started`: the config the server started with (its server settings are the ones in
    /// effect); `as_written`: the same before the command line's overrides.
    pub fn new(
        controller: Arc<Controller>,
        started: &sluice_config::Config,
        as_written: &sluice_config::Config,
        node: LocalNode,
        frontends: Frontends,
        phase: watch::Receiver<crate::readiness::Phase>,
    ) -> Self {
        let base_dir = started.source.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let (started, as_written) = (Arc::new(started.clone()), Arc::new(as_written.clone()));
        Self { controller, base_dir, started, as_written, node, frontends, phase, submitted: Arc::default() }
    }

    /// Sluice's status, with the replicas of this process named by its node.
    fn status(&self) -> Status {
        let mut status = self.controller.status();
        self.node.fill(&mut status);
        status
    }

    fn submitted(&self) -> MutexGuard<'_, Submitted> {
        // Only whole-map replacements happen under it: a panic cannot leave it half-changed.
        self.submitted.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The admin routes. `token`: the bearer token every request must carry, if any; `bound`: the
/// address the admin API listens on.
///
/// Around them, outermost first: errors as JSON ([`json_errors`]), what browsers could be made
/// to send refused ([`browser_guard`]), the token ([`authorize`]), the body read within
/// `http_options.body_read_timeout_s` and `max_body_bytes` ([`read_body`]).
pub fn router(state: AdminState, token: Option<String>, bound: std::net::SocketAddr) -> Router {
    let http = &state.started.http_options;
    let body = BodyLimits {
        max_bytes: http.max_body_bytes,
        timeout: std::time::Duration::from_secs_f64(http.body_read_timeout_s),
        total: std::time::Duration::from_secs_f64(http.body_total_timeout_s),
    };
    // Without a token, only the host names DNS rebinding cannot use (`Hosts`).
    let hosts = match token {
        None => crate::auth::Hosts::without_token(bound),
        Some(_) => crate::auth::Hosts::Any,
    };
    let secure_cookie = state.started.admin_options.tls.is_some();
    Router::new()
        .route("/api/serve/applications", put(deploy).get(ray::details).delete(ray::delete_all))
        .route("/api/serve/applications/", put(deploy).get(ray::details).delete(ray::delete_all))
        .route("/api/serve/applications/{app}", axum::routing::delete(delete_one))
        .route("/api/sluice/status", get(status))
        .route("/api/ray/version", get(ray::version))
        .route("/api/version", get(ray::version))
        .route("/api/serve/deployments/{name}/canary", post(set_weight))
        .route("/api/serve/deployments/{name}/promote", post(promote))
        .route("/api/serve/deployments/{name}/rollback", post(rollback))
        .route("/api/sluice/routes", get(routes_snapshot))
        .route("/api/sluice/metrics/targets", get(targets::metrics_targets))
        .route("/api/sluice/demand", post(demand))
        .route("/api/sluice/repository/{model}/notify", post(notify_repository))
        .route("/-/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(crate::openapi::serve_admin))
        .route("/", get(page::page))
        .fallback(|req: Request| async move {
            error(StatusCode::NOT_FOUND, format!("no admin API route `{}`", req.uri().path()))
        })
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(crate::telemetry::request_span::<axum::body::Body>),
        )
        .layer(middleware::from_fn(move |req: Request, next: Next| read_body(body, req, next)))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            authorize(token.clone(), secure_cookie, req, next)
        }))
        .layer(middleware::from_fn(move |req: Request, next: Next| browser_guard(hosts, req, next)))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(no_framing))
        .with_state(state)
}

/// Every admin answer may not be framed by another page (the status page's promote and
/// rollback buttons, clicked through an invisible frame on any site), sniffed as another type,
/// or kept in a cache (the status page and the status JSON hold what serves).
async fn no_framing(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.entry(name).or_insert(axum::http::HeaderValue::from_static(value));
    }
    response
}

/// How much of a request body the admin API reads, and for how long (`http_options`'
/// `max_body_bytes` and `body_read_timeout_s`, as the inference ports).
#[derive(Clone, Copy)]
struct BodyLimits {
    max_bytes: usize,
    timeout: std::time::Duration,
    /// `body_total_timeout_s`: how long the whole body may take.
    total: std::time::Duration,
}

/// Reads the whole body before the handler runs: at most `max_bytes` (413, at once when
/// `Content-Length` announces more), with no pause longer than `timeout` between its pieces
/// and within `total` in all (408; a client that sends its headers and then nothing, or a byte
/// now and then, would otherwise hold its connection for good), as the inference ports read
/// theirs.
async fn read_body(limits: BodyLimits, req: Request, next: Next) -> Response {
    use crate::rest::screen::{body_error, content_length, too_large};
    use http_body_util::BodyExt;
    if let Some(len) = content_length(req.headers()).filter(|&n| n > limits.max_bytes as u64) {
        return too_large(Some(len), limits.max_bytes).into_response();
    }
    let (parts, mut body) = req.into_parts();
    let mut read = Vec::new();
    let deadline = tokio::time::Instant::now() + limits.total;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(limits.timeout.min(left), body.frame()).await {
            Err(_) if left <= limits.timeout => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body took longer than http_options.body_total_timeout_s to arrive",
                );
            }
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stopped arriving (http_options.body_read_timeout_s passed without data)",
                );
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return body_error(&e, limits.max_bytes).into_response(),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                if read.len() + data.len() > limits.max_bytes {
                    return too_large(None, limits.max_bytes).into_response();
                }
                read.extend_from_slice(&data);
            }
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(read))).await
}

/// Refuses what a web page could make a browser send here ([`crate::auth::browser_refusal`]):
/// 403.
async fn browser_guard(hosts: crate::auth::Hosts, req: Request, next: Next) -> Response {
    let changes = !matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    let authority = req.uri().authority().map(|a| a.as_str());
    let refusal = crate::auth::browser_refusal(req.headers(), authority, changes, hosts, "the admin API");
    match refusal {
        Some(message) => error(StatusCode::FORBIDDEN, message),
        None => next.run(req).await,
    }
}

/// Answers errors as JSON `{"error": ...}`, as every admin route does: the ones axum writes
/// itself (a path that does not decode, a wrong method, a body it could not take) come as
/// plain text or empty.
async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let plain =
        response.headers().get(header::CONTENT_TYPE).is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    let rays = response.extensions().get::<crate::error::RayText>().is_some();
    if !(status.is_client_error() || status.is_server_error()) || !plain || rays {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 1024 * 1024).await.unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        said => said.to_string(),
    };
    let mut json = error(status, message);
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    json.headers_mut().extend(parts.headers);
    json
}

/// Lets a request through when no token is configured, or it carries the token (bearer
/// header, or the status page's cookie), or it is `GET /-/healthz`. The status page itself answers its login form
/// instead of a JSON 401, and `GET /?token=T` with the right token logs in.
async fn authorize(token: Option<String>, secure_cookie: bool, req: Request, next: Next) -> Response {
    let Some(t) = token else { return next.run(req).await };
    // Health probes (a Kubernetes liveness probe, KubeRay's) carry no token, and the answer
    // tells nothing but that the API answers.
    if req.uri().path() == "/-/healthz" && req.method() == axum::http::Method::GET {
        return next.run(req).await;
    }
    // Ray's clients send the token as `X-Ray-Authorization` (behind a proxy that takes
    // `Authorization` for itself); either header will do, or the status page's cookie.
    let headers = req.headers();
    let authorized = [header::AUTHORIZATION.as_str(), "x-ray-authorization"]
        .into_iter()
        .any(|h| crate::auth::bearer_matches(headers.get(h), &t))
        || page::cookie_token(headers).is_some_and(|c| crate::auth::token_matches(c.as_bytes(), &t));
    let is_page = req.uri().path() == "/";
    // Behind a TLS proxy (`X-Forwarded-Proto: https`, which can only add the restriction) the
    // cookie is never to be sent over plain HTTP either.
    let secure = secure_cookie
        || headers.get("x-forwarded-proto").is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let login = |given: Option<String>| match given {
        Some(given) if crate::auth::token_matches(given.as_bytes(), &t) => page::logged_in(&t, secure),
        _ => page::login(),
    };
    // The login form posts the token (a query's lands in proxies' access logs and the
    // browser's history); `?token=` is still taken, for scripts.
    if is_page && req.method() == axum::http::Method::POST {
        let body = axum::body::to_bytes(req.into_body(), page::LOGIN_MAX_BYTES).await.unwrap_or_default();
        return login(page::query_token(std::str::from_utf8(&body).ok()));
    }
    if is_page && let Some(given) = page::query_token(req.uri().query()) {
        return login(Some(given));
    }
    match (authorized, is_page) {
        (true, _) => next.run(req).await,
        (false, true) => page::login(),
        (false, false) => {
            let mut answer = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            answer.headers_mut().insert(header::WWW_AUTHENTICATE, BEARER_CHALLENGE.clone());
            answer
        }
    }
}

/// How config errors name the config a client sent: `request body:LINE:COLUMN: FIELD: MESSAGE`.
const REQUEST_BODY: &str = "request body";

/// What a 401 asks for (RFC 7235: a 401 names its scheme).
pub(crate) static BEARER_CHALLENGE: axum::http::HeaderValue =
    axum::http::HeaderValue::from_static("Bearer realm=\"sluice\"");

/// A whole config: Ray's `ServeDeploySchema` (JSON as Ray's clients send it, or YAML) is
/// deployed in the background the way Ray does; Sluice's own config is applied before the
/// answer.
async fn deploy(State(s): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "the config must be UTF-8 YAML or JSON");
    };
    // On a cluster, paths resolve in the job's working dir, never the client's folder.
    let base = match headers.get(BASE_DIR_HEADER).filter(|_| !s.controller.on_cluster()) {
        None => s.base_dir.clone(),
        // Percent-encoded (`sluice deploy` escapes what is not visible ASCII, and `%`).
        Some(v) => match percent_encoding::percent_decode(v.as_bytes()).decode_utf8() {
            Ok(path) => PathBuf::from(path.as_ref()),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{BASE_DIR_HEADER} must be a UTF-8 path, percent-encoded"),
                );
            }
        },
    };
    let doc = serde_json::from_str::<Value>(text).ok().or_else(|| serde_saphyr::from_str::<Value>(text).ok());
    if let Some(doc) = &doc
        && crate::ray_serve::schema::is_ray_config(doc)
    {
        return ray::deploy(&s, doc, &base);
    }
    // An empty document (a wrong file, a lost heredoc) would otherwise remove every application.
    let names_nothing = match &doc {
        Some(d) => d.get("applications").is_none() && d.get("model_repository").is_none(),
        None => text.lines().all(|l| matches!(l.trim().chars().next(), None | Some('#'))),
    };
    if names_nothing {
        return error(
            StatusCode::BAD_REQUEST,
            "the config names no `applications`; nothing changed (to remove every application, send `applications: []`)",
        );
    }
    let config = match sluice_config::parse_to_deploy(text, &base.join("deployed-config.yaml")) {
        Ok(c) => c,
        Err(mut errors) => {
            // Located in what the client sent (the file name above exists only to place
            // relative paths).
            errors.0.iter_mut().for_each(|e| e.file = PathBuf::from(REQUEST_BODY));
            let list: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid config; nothing changed", "errors": list})),
            )
                .into_response();
        }
    };
    let state = s.clone();
    let applied = sluice_controller::to_the_end(async move {
        let generation = state.controller.apply(&config).await?;
        // Every application now comes from this config, none from a Ray client (but a Ray
        // deploy sent meanwhile, applied after this one).
        state.submitted().forget(None, generation + 1);
        Ok::<_, sluice_controller::ControlError>(config)
    });
    match applied.await {
        Ok(config) => {
            let at_start = s.as_written.server_settings_changed(&config);
            if at_start.is_empty() {
                return Json(s.status()).into_response();
            }
            tracing::warn!(
                "deployed config: {} changed; server settings apply at the next start, not live",
                at_start.join(", ")
            );
            let mut answer = serde_json::to_value(s.status()).unwrap_or_default();
            answer["ignored"] = json!(
                at_start
                    .iter()
                    .map(|k| format!("{k}: a server setting, read at start; restart to change it"))
                    .collect::<Vec<_>>()
            );
            Json(answer).into_response()
        }
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

/// What a proxy on another node holds, for the autoscaler ([`sluice_controller::demand`]).
async fn demand(State(s): State<AdminState>, body: Bytes) -> Result<StatusCode, ApiError> {
    let report = serde_json::from_slice::<sluice_controller::demand::DemandReport>(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body must be {{\"proxy\": \"HOST:PORT\", \"versions\": [{{\"model\", \"version\", \"in_system\", \"queued\", \"retired\"}}], \"ttl_s\", \"applied\"}}: {e}"
        ))
    })?;
    s.controller.report_demand(report);
    Ok(StatusCode::OK)
}

async fn status(State(s): State<AdminState>) -> Json<Status> {
    Json(s.status())
}

async fn delete_one(State(s): State<AdminState>, Path(app): Path<String>) -> Answer {
    let state = s.clone();
    sluice_controller::to_the_end(async move {
        let kept = state.controller.delete(Some(&app)).await?;
        state.submitted().forget(Some(&app), kept);
        Ok::<_, sluice_controller::ControlError>(())
    })
    .await?;
    Ok(Json(s.status()))
}

async fn set_weight(State(s): State<AdminState>, Path(name): Path<String>, body: Bytes) -> Answer {
    let weight = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["weight"].as_u64());
    let Some(weight) = weight.and_then(|w| u32::try_from(w).ok()) else {
        return Err(ApiError::bad_request("body must be {\"weight\": 0..100}"));
    };
    let controller = s.controller.clone();
    sluice_controller::to_the_end(async move { controller.set_weight(&name, weight).await }).await?;
    Ok(Json(s.status()))
}

async fn promote(State(s): State<AdminState>, Path(name): Path<String>) -> Answer {
    let controller = s.controller.clone();
    sluice_controller::to_the_end(async move { controller.promote(&name).await }).await?;
    Ok(Json(s.status()))
}

async fn rollback(State(s): State<AdminState>, Path(name): Path<String>) -> Answer {
    let controller = s.controller.clone();
    sluice_controller::to_the_end(async move { controller.rollback(&name, "rolled back by hand").await })
        .await?;
    Ok(Json(s.status()))
}

/// A training job wrote a version of `model`: scan the repository now (rather than at the next
/// poll) and apply what changed.
async fn notify_repository(State(s): State<AdminState>, Path(model): Path<String>) -> Answer {
    let controller = s.controller.clone();
    sluice_controller::to_the_end(async move { controller.notify_repository(&model).await }).await?;
    Ok(Json(s.status()))
}
