//! Starting and stopping the server: listeners first (so liveness answers while models load,
//! and readiness says they are loading), then the config's deployments; on shutdown, readiness
//! turns false, listeners close, and open connections get the grace period to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_controller::{ControlError, Controller};
use sluice_router::{RouteTable, Router};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::listen::{self, Limits};
use crate::readiness::{Phase, Readiness};
use crate::tls::{TlsConfig, TlsError};
use crate::{admin, auth, grpc, metrics, node, ray_serve, rest};

/// A running server.
pub struct Server {
    http_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    controller: Arc<Controller>,
    grace: Duration,
    /// `shutdown_delay_s`: how long to keep serving, not ready, before the listeners close.
    delay: Duration,
    routes: Arc<Router>,
    phase: watch::Sender<Phase>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// The request body bytes its frontends read at once (`max_body_bytes_in_flight`).
    bodies: &'static rest::BodyBudget,
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

    /// The request body bytes the frontends hold now while reading bodies (counted against
    /// `http_options.max_body_bytes_in_flight`).
    pub fn body_bytes_reading(&self) -> usize {
        self.bodies.held()
    }

    /// Waits until every replica of every deployment has warmed up; false on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
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

    /// Pages out the code and read-only data of the program files this process maps
    /// ([`crate::memory::page_out_code`]: what loading ONNX Runtime touched and a request does
    /// not run), then runs the warm-up batch of each deployment with a replica here again
    /// (each once, on one replica: [`sluice_deployments::Deployment::warm_again`]), so that the
    /// code a model call runs is read back now rather than by the first request, and drops from
    /// the page cache what the read-ahead of that brought back unmapped. What `sluice run` does
    /// once every deployment is ready, where the config's `release_startup_memory` says so (the
    /// default). On a blocking thread. Returns what was paged out (`after`: the resident memory
    /// once the warm-ups ran) and how many deployments warmed up again.
    pub async fn release_startup_memory(&self) -> std::io::Result<(crate::memory::PagedOut, usize)> {
        let table = self.routes.table();
        let work = move || {
            let paged = crate::memory::page_out_code()?;
            // A pipeline's steps are routes of their own too, and a multiplexed deployment is
            // one route per model: each deployment warms up once.
            let mut seen = std::collections::HashSet::new();
            let warmed = table
                .models
                .values()
                .flat_map(|m| m.versions.values())
                .flat_map(|s| s.deployments().into_iter().cloned())
                .filter(|d| seen.insert(Arc::as_ptr(d)))
                .filter(|d| d.warm_again())
                .count();
            crate::memory::drop_unmapped_cache(&paged);
            // Models loaded from now on hand back what their load touched too.
            crate::memory::release_after_loads();
            Ok((crate::memory::PagedOut { after: crate::memory::resident_bytes()?, ..paged }, warmed))
        };
        tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)?
    }

    /// The route table, for embedding and tests.
    pub fn routes(&self) -> &Arc<Router> {
        &self.routes
    }

    /// Stops accepting, lets requests in flight and queued finish within
    /// `graceful_shutdown_timeout_s`, closes the connections still open then, and returns.
    /// Readiness turns false first (gRPC health watchers hear NOT_SERVING), and the server goes
    /// on accepting and serving for `shutdown_delay_s` before it stops: a load balancer that
    /// polls readiness takes it out meanwhile, so connections it still sends are not refused.
    pub async fn shutdown(self) {
        self.stop(true).await
    }

    /// [`Self::shutdown`]; `delay`: wait `shutdown_delay_s` first (not when the start failed:
    /// nothing was ever ready to be taken out of a load balancer).
    async fn stop(self, delay: bool) {
        self.phase.send_replace(Phase::Stopping);
        if delay && !self.delay.is_zero() {
            tracing::info!("not ready; serving for {:?} more (shutdown_delay_s) before closing", self.delay);
            tokio::time::sleep(self.delay).await;
        }
        self.shutdown.send_replace(true);
        // Each listener closes what is left when the grace period ends; the extra second only
        // covers their own wind-down.
        let aborts: Vec<_> = self.tasks.iter().map(JoinHandle::abort_handle).collect();
        let finish = async {
            for task in self.tasks {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(self.grace + Duration::from_secs(1), finish).await.is_err() {
            tracing::warn!("listeners still busy after the {:?} grace period; stopping them", self.grace);
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
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
    /// The config as its file says, before the command line's overrides (ports, host): what a
    /// deployed config's server settings are compared with, so that deploying the same file
    /// lists none as changed. None: the config started with.
    pub as_written: Option<sluice_config::Config>,
    /// The route table comes from a controller elsewhere (`sluice proxy`): followed from the
    /// start, and the server is not ready (its start not done) until the first table is in.
    pub follow: Option<crate::snapshot::Follow>,
    /// A `sluice replica` process: its gRPC port also answers `GET /metrics` with the series of
    /// what runs inside it ([`crate::metrics::render_replica`]), for Prometheus to scrape
    /// where the head lists it (`GET /api/sluice/metrics/targets`).
    pub replica: bool,
    /// The admin API may listen beyond loopback without a token or client certificates (a job
    /// on Ray: the cluster network is the boundary Ray's dashboard draws). Unlike
    /// `admin_options.allow_unauthenticated`, repository load and unload on the inference ports
    /// (often exposed beyond the cluster) stay closed without a token.
    pub admin_open_on_cluster: bool,
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
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(
        "refusing to serve the admin API on {addr} without authentication: set a token (the variable \
         admin_options.token_env names), require client certificates (admin_options.tls.client_ca_file), \
         bind a loopback address, or set admin_options.allow_unauthenticated: true"
    )]
    UnauthenticatedAdmin { addr: SocketAddr },
}

/// Loads every deployment of `config` (ONNX Runtime must be initialised, see
/// [`crate::runtime::init`]) and starts serving: [`bind`], then [`Starting::load`]. Fails with a
/// message naming the deployment and file when one cannot load, or the address, file or
/// setting at fault.
pub async fn start(config: sluice_config::Config, options: StartOptions) -> Result<Server, StartError> {
    bind(config, options).await?.load().await
}

/// A server that listens (liveness answers, readiness says not ready) and has not loaded its
/// config's deployments yet.
pub struct Starting {
    server: Server,
    config: sluice_config::Config,
    follow: Option<crate::snapshot::Follow>,
    /// Log lines for when the server is ready.
    announce: Vec<String>,
}

impl Starting {
    pub fn http_addr(&self) -> SocketAddr {
        self.server.http_addr
    }

    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.server.grpc_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr
    }

    /// Loads and warms every deployment of the config, then reports ready. On failure the
    /// listeners close before the error returns.
    pub async fn load(self) -> Result<Server, StartError> {
        let Self { server, config, follow, announce } = self;
        if let Err(e) = server.controller.apply(&config).await {
            server.stop(false).await;
            return Err(e.into());
        }
        server.controller.spawn_loop();
        if let Some(follow) = follow {
            // Not ready, and not announced, before the controller's table is in: a proxy that
            // cannot read it (unreachable, or refused) would answer 404 for every model.
            let (first, followed) = tokio::sync::oneshot::channel();
            // The address alone could be two proxies' (`--host 0.0.0.0` on two machines).
            let name = format!("{} (pid {})", server.http_addr, std::process::id());
            let routes = server.routes.clone();
            // Follows for as long as the runtime runs (the listeners' tasks are the ones a
            // shutdown waits for).
            tokio::spawn(crate::snapshot::follow(routes, follow, name, first));
            let _ = followed.await;
        }
        server.phase.send_replace(Phase::Serving);
        for line in announce {
            tracing::info!("{line}");
        }
        Ok(server)
    }
}

/// Binds every listener of `config` and starts serving on them, before any model loads.
/// Fails when an address cannot be bound, a TLS file cannot be loaded, or the admin API would
/// be exposed without authentication.
pub async fn bind(config: sluice_config::Config, options: StartOptions) -> Result<Starting, StartError> {
    metrics::install();
    let routes = Arc::new(Router::new(RouteTable::default()));
    let grace = Duration::from_secs_f64(config.graceful_shutdown_timeout_s);
    let controller =
        Controller::new(routes.clone(), grace, options.cluster.clone(), options.store_env.clone());
    let (phase, phase_rx) = watch::channel(Phase::Starting);
    let (shutdown, stop_rx) = watch::channel(false);
    let readiness = Readiness::new(phase_rx, routes.clone());
    let listeners = bind_all(&config, &options).await?;
    let (http, grpc, admin) = (&config.http_options, &config.grpc_options, &config.admin_options);
    let limits = Limits::new(http, grace);
    let intake = rest::IntakeLayer::new(http, rest::BodyBudget::leaked(http.max_body_bytes_in_flight));
    let tls = |t: &Option<sluice_config::TlsOptions>| {
        t.as_ref().map(|t| TlsConfig::start(t, stop_rx.clone())).transpose()
    };
    let (http_tls, grpc_tls, admin_tls) = (tls(&http.tls)?, tls(&grpc.tls)?, tls(&admin.tls)?);

    let control_token: Option<Arc<str>> =
        options.admin_token.as_deref().filter(|t| !t.is_empty()).map(Arc::from);
    let state = rest::AppState::new(rest::Shared {
        routes: routes.clone(),
        controller: controller.clone(),
        readiness: readiness.clone(),
        max_body_bytes: http.max_body_bytes,
        draining: stop_rx.clone(),
        control: auth::Control::for_port(control_token.as_ref(), admin, listeners.http.1),
    });
    let mut app = rest::router(state.clone(), http);
    let state_for_frontend = state.clone();
    let mut tasks = Vec::new();
    let grpc_addr = listeners.grpc.as_ref().map(|(_, a)| *a);
    if grpc.enabled {
        let grpc_app = grpc::routes(
            routes.clone(),
            controller.clone(),
            readiness,
            grpc::Limits {
                max_message_bytes: http.max_body_bytes,
                stream_max_in_flight: grpc.stream_max_in_flight,
                stream_answer_wait: Duration::from_secs_f64(http.write_timeout_s),
            },
            stop_rx.clone(),
            auth::Control::for_port(
                control_token.as_ref(),
                admin,
                listeners.grpc.as_ref().map_or(listeners.http.1, |(_, a)| *a),
            ),
            grpc::Role { traced: listeners.grpc.is_some(), replica: options.replica },
        )
        .await?;
        let grpc_app = match options.replica {
            true => grpc_app.route("/metrics", axum::routing::get(crate::metrics::render_replica)),
            false => grpc_app,
        };
        match listeners.grpc {
            Some((listener, _)) => {
                // The REST intake's body read timeout, which a shared port has from the REST
                // frontend: a stream whose message stops arriving held its connection for good.
                let bounds = intake;
                let grpc_app =
                    grpc_app.layer(tower::util::MapRequestLayer::new(move |req: axum::extract::Request| {
                        rest::timed_body(req, &bounds)
                    }));
                tasks.push(listen::spawn(listener, grpc_tls, grpc_app, limits, stop_rx.clone()))
            }
            None => {
                app = app.fallback(move |req: axum::extract::Request| {
                    share_port(grpc_app.clone(), state.clone(), req)
                })
            }
        }
    }
    let (listener, http_addr) = listeners.http;
    let app = rest::frontend(app, state_for_frontend, intake);
    tasks.push(listen::spawn(listener, http_tls, app, limits, stop_rx.clone()));
    let grpc_addr = grpc_addr.or(grpc.enabled.then_some(http_addr));
    tracing::info!("accepting connections on {http_addr} while the models load (not ready yet)");
    // Announced once the models are loaded: scripts wait for these lines before sending work.
    let scheme = if http.tls.is_some() { "https" } else { "http" };
    let mut announce = vec![format!("REST frontend listening on {scheme}://{http_addr}")];
    if let Some(addr) = grpc_addr {
        let shared = if addr == http_addr { " (shared with REST)" } else { "" };
        announce.push(format!("gRPC frontend listening on {addr}{shared}"));
    }
    let admin_addr = listeners.admin.as_ref().map(|(_, a)| *a);
    if let Some((listener, addr)) = listeners.admin {
        let token = options.admin_token.filter(|t| !t.is_empty());
        let scheme = if admin.tls.is_some() { "https" } else { "http" };
        let how = match (&token, admin_tls.as_ref().is_some_and(|t| t.requires_client_certificates())) {
            (Some(_), _) => " (bearer token required)",
            (None, true) => " (client certificate required)",
            (None, false) => "",
        };
        announce.push(format!("admin API listening on {scheme}://{addr}{how}"));
        let frontends = ray_serve::details::Frontends {
            http_host: http_addr.ip().to_string(),
            http_port: http_addr.port(),
            grpc_port: grpc_addr.map(|a| a.port()),
            proxy_location: config.proxy_location,
        };
        let node = node::LocalNode::of_this_process(http_addr);
        let as_written = options.as_written.as_ref().unwrap_or(&config);
        let state = admin::AdminState::new(
            controller.clone(),
            &config,
            as_written,
            node,
            frontends,
            phase.subscribe(),
        );
        tasks.push(listen::spawn(listener, admin_tls, admin::router(state, token, addr), limits, stop_rx));
    }
    let delay = Duration::from_secs_f64(config.shutdown_delay_s);
    let server = Server {
        http_addr,
        grpc_addr,
        admin_addr,
        routes,
        controller,
        shutdown,
        phase,
        tasks,
        grace,
        delay,
        bodies: intake.budget,
    };
    Ok(Starting { server, config, follow: options.follow, announce })
}

/// The bound listeners: REST, gRPC on its own port (none when disabled or sharing REST's), admin.
struct Listeners {
    http: (TcpListener, SocketAddr),
    grpc: Option<(TcpListener, SocketAddr)>,
    admin: Option<(TcpListener, SocketAddr)>,
}

async fn bind_all(config: &sluice_config::Config, options: &StartOptions) -> Result<Listeners, StartError> {
    let (http, grpc, admin) = (&config.http_options, &config.grpc_options, &config.admin_options);
    let backlog = u32::try_from(http.max_connections).unwrap_or(u32::MAX);
    let shared_port = grpc.enabled && grpc.port == http.port && grpc.host == http.host && http.port != 0;
    let grpc = match grpc.enabled && !shared_port {
        true => Some(bind_one(&grpc.host, grpc.port, backlog).await?),
        false => None,
    };
    let admin = match admin.enabled {
        true => {
            let (listener, addr) = bind_one(&admin.host, admin.port, backlog).await?;
            if !options.admin_open_on_cluster {
                auth::check_admin_exposure(admin, options.admin_token.as_deref(), addr)?;
            }
            Some((listener, addr))
        }
        false => None,
    };
    Ok(Listeners { http: bind_one(&http.host, http.port, backlog).await?, grpc, admin })
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

/// Binds `host:port` with an accept queue of `backlog` connections (the kernel caps it at
/// `net.core.somaxconn`): connections beyond `max_connections` wait there rather than being
/// refused or reset when a burst arrives.
async fn bind_one(host: &str, port: u16, backlog: u32) -> Result<(TcpListener, SocketAddr), StartError> {
    let addr = format!("{host}:{port}");
    let bound = async {
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the host resolves to no address");
        for candidate in tokio::net::lookup_host(&addr).await? {
            let socket = if candidate.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.set_reuseaddr(true)?;
            match socket.bind(candidate).and_then(|()| socket.listen(backlog)) {
                Ok(listener) => return listener.local_addr().map(|a| (listener, a)),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    bound.await.map_err(|source| StartError::Bind { addr, source })
}
