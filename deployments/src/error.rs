//! The one error type of the request path. Frontends map [`ErrorKind`] to an HTTP status and a
//! gRPC code in one place each; the message is shown to the client as it is.

/// What kind of failure, which decides the status a client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (bad shape, datatype, missing input...): HTTP 400.
    InvalidArgument,
    /// Unknown model, version or route: HTTP 404.
    NotFound,
    /// Overloaded or not ready; retrying later can work: HTTP 503.
    Unavailable,
    /// The request's deadline passed before it ran: HTTP 504.
    DeadlineExceeded,
    /// The model failed or the server broke: HTTP 500.
    Internal,
    /// The request conflicts with the current state (a rollout action on a deployment with no
    /// canary): HTTP 409.
    Conflict,
    /// The request asks for a protocol extension the server does not implement (shared
    /// memory, classification): HTTP 501, gRPC UNIMPLEMENTED, as Triton answers UNSUPPORTED.
    Unimplemented,
}

/// An error answered to one request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InferError {
    pub kind: ErrorKind,
    pub message: String,
}

impl InferError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn unimplemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unimplemented, message)
    }
}

/// Why a model, step, pipeline or replica could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// ONNX Runtime is not loaded, or failed to start.
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
    /// A model file (or a step's file) cannot be loaded.
    #[error("cannot load model `{}`: {message}", path.display())]
    Model { path: std::path::PathBuf, message: String },
    /// A built-in or custom step cannot be built.
    #[error("{0}")]
    Step(String),
    /// The model does not fit the deployment's settings (batching, padding).
    #[error("{0}")]
    Settings(String),
    /// A pipeline's steps do not fit together.
    #[error("{0}")]
    Pipeline(String),
    /// A replica thread could not start.
    #[error("cannot start a replica thread: {0}")]
    Thread(String),
}

impl LoadError {
    /// Whether the cause is what was asked for (a model, a setting: InvalidArgument) or the
    /// server itself (Internal).
    pub fn kind(&self) -> ErrorKind {
        match self {
            LoadError::Runtime(_) | LoadError::Thread(_) => ErrorKind::Internal,
            LoadError::Model { .. }
            | LoadError::Step(_)
            | LoadError::Settings(_)
            | LoadError::Pipeline(_) => ErrorKind::InvalidArgument,
        }
    }
}
