//! Where the server is in its life, which the readiness endpoints (REST `/v2/health/ready`,
//! gRPC `ServerReady`) and gRPC health follow: not ready while the config's models load, ready
//! while every model version has a ready replica or is autoscaled to zero on purpose (requests
//! to it wait while a replica starts, and only a request starts one: a load balancer that took
//! the server out then would never send it), and not ready again once shutdown starts.

use std::sync::Arc;

use sluice_router::Router;
use tokio::sync::watch;

/// The server's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listening; the config's models are loading.
    Starting,
    Serving,
    /// Shutdown has begun: finishing what was accepted.
    Stopping,
}

/// What readiness answers from: the phase and the route table. Cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    phase: watch::Receiver<Phase>,
    routes: Arc<Router>,
}

impl Readiness {
    pub fn new(phase: watch::Receiver<Phase>, routes: Arc<Router>) -> Self {
        Self { phase, routes }
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Changes with the phase.
    pub fn phase_watch(&self) -> watch::Receiver<Phase> {
        self.phase.clone()
    }

    /// Serving, and every version of every model has a ready replica or is at zero replicas
    /// on purpose ([`Router::all_ready`]).
    pub fn server_ready(&self) -> bool {
        self.phase() == Phase::Serving && self.routes.all_ready()
    }
}
