//! The `sluice` server: loads the deployments a [`sluice_config::Config`] declares, publishes
//! their routes and serves the Open Inference Protocol over REST.
//!
//! ```no_run
//! # async fn demo() -> Result<(), String> {
//! let config = sluice_config::load(std::path::Path::new("examples/iris.yaml")).map_err(|e| e.to_string())?;
//! sluice_server::runtime::init(None)?;
//! let server = sluice_server::start(config).await?;
//! println!("listening on {}", server.http_addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod error;
pub mod rest;
pub mod runtime;

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_deployments::Deployment;
use sluice_router::{RouteTable, Router};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running server.
pub struct Server {
    http_addr: SocketAddr,
    routes: Arc<Router>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// The address the REST frontend listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The route table, for embedding and tests.
    pub fn routes(&self) -> &Arc<Router> {
        &self.routes
    }

    /// Stops accepting, lets requests in flight finish, and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        if let Ok(Err(e)) = self.task.await {
            tracing::warn!("server stopped with an error: {e}");
        }
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        self.shutdown().await;
    }
}

/// Loads every deployment of `config` (ONNX Runtime must be initialised, see [`runtime::init`])
/// and starts serving. Fails with a message naming the deployment and file when one cannot load
/// or the address cannot be bound.
pub async fn start(config: sluice_config::Config) -> Result<Server, String> {
    let mut deployments = Vec::new();
    for app in &config.applications {
        for d in &app.deployments {
            let cfg = d.clone();
            let loaded = tokio::task::spawn_blocking(move || Deployment::load(&cfg))
                .await
                .map_err(|e| format!("loading `{}` failed: {e}", d.name.value))?
                .map_err(|e| format!("deployment `{}`: {e}", d.name.value))?;
            tracing::info!(
                model = %d.name.value,
                version = %d.version.value,
                replicas = d.num_replicas.value,
                "deployment ready"
            );
            deployments.push(Arc::new(loaded));
        }
    }
    let routes = Arc::new(Router::new(RouteTable::from_deployments(deployments)));

    let http = &config.http_options;
    let addr = format!("{}:{}", http.host, http.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let http_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let app = rest::router(
        rest::AppState {
            routes: routes.clone(),
        },
        http.max_body_bytes,
    );
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop.await;
            })
            .await
    });
    tracing::info!("REST frontend listening on http://{http_addr}");
    Ok(Server {
        http_addr,
        routes,
        shutdown,
        task,
    })
}
