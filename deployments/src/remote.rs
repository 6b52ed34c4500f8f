//! Replicas that run elsewhere — another process, another node — behind the same admission,
//! power-of-two-choices and deadlines as local ones. The deployment only needs to hand such a
//! replica an admitted request and get the answer back on the request's own channel; how it
//! travels (gRPC to a `sluice replica` process on a Ray node) is the implementor's business.

use std::time::Instant;

use tokio::sync::oneshot;

use crate::{InferError, NamedTensor};

/// One admitted request for a remote replica.
pub struct RemoteCall {
    /// Inputs in the model's input order.
    pub inputs: Vec<NamedTensor>,
    /// Outputs to return, in the order the caller asked for them.
    pub outputs: Vec<String>,
    /// When the request must be answered by; the remote side gets what is left of it.
    pub deadline: Instant,
    /// Where the answer goes; the caller may have gone (then the reply is dropped).
    pub reply: oneshot::Sender<Result<Vec<NamedTensor>, InferError>>,
    /// Which model of a multiplexed deployment.
    pub model: Option<std::sync::Arc<str>>,
    /// What admitting the request took: keep it until the answer is sent or the call is
    /// dropped (the replica counts as busy with the request until then).
    pub admission: Option<crate::deployment::Admission>,
    /// Where to hand the call when it never reached the replica (its connection could not be
    /// made); `None` once it has been handed on as often as allowed.
    pub redirect: Option<crate::deployment::Redirect>,
    /// For a multiplexed model's call: where to say which models the replica holds once it
    /// answers (it reports them, [`crate::HELD_MODELS_HEADER_BIN`]), so that requests follow
    /// the models it holds, not those it was once sent.
    pub holder: Option<crate::deployment::Holder>,
}

/// Where a remote replica runs, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteInfo {
    /// Its name in the cluster (the Ray actor name).
    pub name: String,
    pub node_id: String,
    pub node_ip: String,
    /// The replica process's pid on its node.
    pub pid: u32,
    /// Its internal gRPC address.
    pub addr: String,
}

/// A replica in another process. `call` must not block: it starts the call and returns.
pub trait RemoteReplica: Send + Sync + 'static {
    fn call(&self, call: RemoteCall);
    fn info(&self) -> &RemoteInfo;
}
