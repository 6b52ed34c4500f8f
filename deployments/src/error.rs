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
}
