//! What the control plane can refuse, typed, each with the [`ErrorKind`] that decides the HTTP
//! status and gRPC code a caller sees (the frontends map kinds once, never message text).

use crate::repository::store::StoreError;
use sluice_deployments::{ErrorKind, LoadError};

/// A control operation that did not happen. Nothing that serves changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("unknown deployment `{0}`")]
    UnknownDeployment(String),
    #[error("unknown application `{0}`")]
    UnknownApplication(String),
    #[error("deployment `{0}` has no canary")]
    NoCanary(String),
    #[error("weight is a percent: 0 to 100, got {0}")]
    InvalidWeight(u32),
    #[error("no model_repository is configured")]
    NoRepository,
    #[error("model `{0}` is not in the model repository")]
    NotInRepository(String),
    #[error("model `{0}` has versions in the repository but none is complete yet (no `{1}` marker)")]
    Incomplete(String, String),
    #[error("model `{0}` is not a loaded repository model")]
    NotLoaded(String),
    #[error("model `{0}` is both in the model repository and in the config")]
    InBoth(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A repository version refused again in one apply (its rejection did not take).
    #[error("{0}")]
    Refused(String),
    /// The version a caller asked about could not be fetched from the store this time.
    #[error("{0}")]
    NotFetched(String),
    #[error("deployment `{deployment}` version {version}: {source}")]
    Load { deployment: String, version: String, source: LoadError },
    #[error("deployment `{deployment}` version {version}: replicas did not become ready within {waited_s} s")]
    NotReady { deployment: String, version: String, waited_s: u64 },
    #[error(
        "deployment `{deployment}` version {version}: its replicas failed to start {failures} times in a row \
         (the last: {why}); not waited for further"
    )]
    StartFailing { deployment: String, version: String, failures: u32, why: String },
    #[error("pipeline `{pipeline}`: {source}")]
    Pipeline { pipeline: String, source: LoadError },
}

impl ControlError {
    /// What kind of refusal this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::UnknownDeployment(_)
            | ControlError::UnknownApplication(_)
            | ControlError::NotInRepository(_)
            | ControlError::NotLoaded(_) => ErrorKind::NotFound,
            ControlError::NoCanary(_) | ControlError::NoRepository | ControlError::Incomplete(..) => {
                ErrorKind::Conflict
            }
            ControlError::InvalidWeight(_) | ControlError::InBoth(_) | ControlError::Refused(_) => {
                ErrorKind::InvalidArgument
            }
            ControlError::Store(StoreError::Config { .. }) => ErrorKind::InvalidArgument,
            ControlError::Store(_)
            | ControlError::NotReady { .. }
            | ControlError::StartFailing { .. }
            | ControlError::NotFetched(_) => ErrorKind::Unavailable,
            ControlError::Load { source, .. } | ControlError::Pipeline { source, .. } => source.kind(),
        }
    }
}
