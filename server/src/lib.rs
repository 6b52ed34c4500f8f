//! The `sluice` server: loads the deployments a [`sluice_config::Config`] declares, publishes
//! their routes and serves the Open Inference Protocol over REST.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = sluice_config::load(std::path::Path::new("examples/iris.yaml"))?;
//! sluice_server::runtime::init(None, None)?;
//! let server = sluice_server::start(config, sluice_server::StartOptions::default()).await?;
//! println!("listening on {}", server.http_addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod model_config;
pub mod node;
pub mod ray_jobs;
pub mod ray_serve;
pub mod rest;
pub mod runtime;
pub mod snapshot;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_controller::{ControlError, Controller};
use sluice_router::{RouteTable, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Name reported by server metadata on both protocols.
pub const SERVER_NAME: &str = "sluice";

/// Protocol extensions this server implements, advertised by server metadata (only these:
/// perf_analyzer and clients change behaviour on what is listed).
pub const EXTENSIONS: &[&str] = &["binary_tensor_data", "model_configuration", "model_repository"];

/// One row of the repository index.
pub struct IndexEntry {
    pub name: String,
    /// Empty for a model that is not loaded.
    pub version: String,
    pub ready: bool,
    /// Why a model is unavailable (`unloaded`), else empty.
    pub reason: &'static str,
}

impl IndexEntry {
    /// Triton's state names.
    pub fn state(&self) -> &'static str {
        if self.ready { "READY" } else { "UNAVAILABLE" }
    }
}

/// Every model version the server routes, sorted by name then version, then (unless
/// `ready_only`) the repository models unloaded through the API. REST and gRPC both answer
/// from this.
pub fn repository_index(routes: &Router, controller: &Controller, ready_only: bool) -> Vec<IndexEntry> {
    let table = routes.table();
    let mut out: Vec<IndexEntry> = table
        .models
        .iter()
        .flat_map(|(name, m)| {
            m.versions.iter().map(move |(v, d)| IndexEntry {
                name: name.clone(),
                version: v.clone(),
                ready: d.is_ready(),
                reason: "",
            })
        })
        .filter(|m| !ready_only || m.ready)
        .collect();
    out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    if !ready_only {
        out.extend(controller.unloaded().into_iter().map(|name| IndexEntry {
            name,
            version: String::new(),
            ready: false,
            reason: "unloaded",
        }));
    }
    out
}

/// A running server.
pub struct Server {
    http_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    controller: Arc<Controller>,
    grace: std::time::Duration,
    routes: Arc<Router>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// The address the REST frontend listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address the gRPC frontend listens on, if enabled (the REST address when shared).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// Waits until every replica of every deployment has warmed up; false on timeout.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let table = self.routes.table();
        for d in table.models.values().flat_map(|m| m.versions.values()) {
            if !d.wait_ready(timeout).await {
                return false;
            }
        }
        true
    }

    /// The admin API's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The controller, for embedding and tests.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// The route table, for embedding and tests.
    pub fn routes(&self) -> &Arc<Router> {
        &self.routes
    }

    /// Stops accepting, lets requests in flight and queued finish within
    /// `graceful_shutdown_timeout_s`, and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let finish = async {
            for task in self.tasks {
                if let Ok(Err(e)) = task.await {
                    tracing::warn!("server stopped with an error: {e}");
                }
            }
        };
        if tokio::time::timeout(self.grace, finish).await.is_err() {
            tracing::warn!("requests still running after the {:?} grace period; stopping anyway", self.grace);
        }
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// What [`start`] takes besides the config: values the binary reads from its environment
/// (the library itself never reads it).
#[derive(Clone, Default)]
pub struct StartOptions {
    /// The bearer token the admin API requires (from the variable `admin_options.token_env`
    /// names); `None` requires none.
    pub admin_token: Option<String>,
    /// Where replicas run: this process (default) or a Ray cluster.
    pub cluster: sluice_controller::cluster::Cluster,
    /// Cloud variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`) an object-storage model repository is
    /// opened with.
    pub store_env: sluice_controller::StoreEnv,
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A deployment or pipeline of the config could not be started.
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC reflection: {0}")]
    Reflection(String),
}

/// Loads every deployment of `config` (ONNX Runtime must be initialised, see [`runtime::init`])
/// and starts serving. Fails with a message naming the deployment and file when one cannot load
/// or the address cannot be bound.
pub async fn start(config: sluice_config::Config, options: StartOptions) -> Result<Server, StartError> {
    metrics::install();
    let routes = Arc::new(Router::new(RouteTable::default()));
    let grace = std::time::Duration::from_secs_f64(config.graceful_shutdown_timeout_s);
    let controller =
        Controller::new(routes.clone(), grace, options.cluster.clone(), options.store_env.clone());
    controller.apply(&config).await?;
    controller.spawn_loop();

    let http = &config.http_options;
    let grpc = &config.grpc_options;
    let (shutdown, stop) = watch::channel(false);
    let mut rest = rest::router(
        rest::AppState {
            routes: routes.clone(),
            controller: controller.clone(),
            max_body_bytes: http.max_body_bytes,
            draining: stop.clone(),
        },
        http.max_body_bytes,
    );
    let shared_port = grpc.enabled && grpc.port == http.port && grpc.host == http.host && http.port != 0;
    let mut tasks = Vec::new();
    let mut grpc_addr = None;
    if grpc.enabled {
        let grpc_router = grpc::routes(routes.clone(), controller.clone(), http.max_body_bytes).await?;
        if shared_port {
            let state = rest::AppState {
                routes: routes.clone(),
                controller: controller.clone(),
                max_body_bytes: http.max_body_bytes,
                draining: stop.clone(),
            };
            rest = rest.fallback(move |req: axum::extract::Request| {
                share_port(grpc_router.clone(), state.clone(), req)
            });
        } else {
            let (listener, addr) = bind(&grpc.host, grpc.port).await?;
            tracing::info!("gRPC frontend listening on {addr}");
            grpc_addr = Some(addr);
            tasks.push(serve(listener, grpc_router, stop.clone()));
        }
    }
    let (listener, http_addr) = bind(&http.host, http.port).await?;
    if shared_port {
        grpc_addr = Some(http_addr);
        tracing::info!("gRPC frontend listening on {http_addr} (shared with REST)");
    }
    tasks.push(serve(listener, rest, stop.clone()));
    tracing::info!("REST frontend listening on http://{http_addr}");
    let mut admin_addr = None;
    let admin = &config.admin_options;
    if admin.enabled {
        let token = options.admin_token.filter(|t| !t.is_empty());
        let base = config.source.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        let (listener, addr) = bind(&admin.host, admin.port).await?;
        tracing::info!(
            "admin API listening on http://{addr}{}",
            if token.is_some() { " (bearer token required)" } else { "" }
        );
        admin_addr = Some(addr);
        let frontends = ray_serve::details::Frontends {
            http_host: http_addr.ip().to_string(),
            http_port: http_addr.port(),
            grpc_port: grpc_addr.map(|a| a.port()),
        };
        let node = node::LocalNode::of_this_process(http_addr);
        let state = admin::AdminState::new(controller.clone(), base, node, frontends, stop.clone());
        tasks.push(serve(listener, admin::router(state, token), stop));
    }
    Ok(Server { http_addr, grpc_addr, admin_addr, routes, controller, shutdown, tasks, grace })
}

/// On a shared port, requests REST does not route go to gRPC when they are gRPC, and to the
/// JSON routes (or REST's JSON 404) otherwise.
async fn share_port(
    grpc: axum::Router,
    state: rest::AppState,
    req: axum::extract::Request,
) -> axum::response::Response {
    use tower::ServiceExt;
    let is_grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !is_grpc {
        return rest::route::fallback(axum::extract::State(state), req).await;
    }
    match grpc.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

async fn bind(host: &str, port: u16) -> Result<(TcpListener, SocketAddr), StartError> {
    let addr = format!("{host}:{port}");
    let bound = match TcpListener::bind(&addr).await {
        Ok(listener) => listener.local_addr().map(|a| (listener, a)),
        Err(e) => Err(e),
    };
    bound.map_err(|source| StartError::Bind { addr, source })
}

/// Serves HTTP/1 and HTTP/2 (gRPC needs the latter) until `stop` turns true.
fn serve(
    listener: TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    use axum::serve::ListenerExt;
    // No Nagle: HTTP/2 (gRPC) writes a response in several frames, and Nagle plus delayed
    // ACKs would hold the last one back for ~40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    })
}

/// The admin port on a Ray head: Ray's dashboard holds 8265 there, so the default moves to
/// 8266 (a port set in the config is kept).
pub fn ray_admin_port(config: &sluice_config::Config) -> u16 {
    let default = sluice_config::AdminOptions::default().port;
    if config.admin_options.port == default { default + 1 } else { config.admin_options.port }
}
