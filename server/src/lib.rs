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
pub mod alloc;
pub mod auth;
mod catch_panic;
pub mod error;
pub mod grpc;
pub mod listen;
pub mod memory;
pub mod metrics;
pub mod model_config;
pub mod model_stats;
pub mod node;
pub mod openapi;
pub mod ray_jobs;
pub mod ray_serve;
pub mod readiness;
pub mod rest;
pub mod runtime;
mod server;
pub mod snapshot;
pub mod telemetry;
pub mod tls;

pub use server::{Server, StartError, StartOptions, Starting, bind, start};

use sluice_controller::Controller;
use sluice_router::Router;

/// Name reported by server metadata on both protocols.
pub const SERVER_NAME: &str = "sluice";

/// Protocol extensions this server implements, advertised by server metadata (only these:
/// perf_analyzer and clients change behaviour on what is listed).
pub const EXTENSIONS: &[&str] =
    &["binary_tensor_data", "model_configuration", "model_repository", "statistics"];

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

/// The admin port on a Ray head: Ray's dashboard holds 8265 there, so the default moves to
/// 8266 (a port set in the config is kept).
pub fn ray_admin_port(config: &sluice_config::Config) -> u16 {
    let default = sluice_config::AdminOptions::default().port;
    if config.admin_options.port == default { default + 1 } else { config.admin_options.port }
}
