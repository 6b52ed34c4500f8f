//! The one mapping from an internal error to what a client sees. REST answers
//! `{"error": "..."}` with the status below; the gRPC frontend maps the same kinds to codes.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sluice_controller::ControlError;
use sluice_deployments::{ErrorKind, InferError};

use crate::ray_serve::ValidationErrors;

/// An error on its way to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// HTTP status for each error kind.
pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Unimplemented => StatusCode::NOT_IMPLEMENTED,
    }
}

impl From<InferError> for ApiError {
    fn from(e: InferError) -> Self {
        if e.kind == ErrorKind::Internal {
            tracing::warn!("internal error: {}", e.message);
        }
        Self::new(http_status(e.kind), e.message)
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        InferError::new(e.kind(), e.to_string()).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// An error for a client of Ray's dashboard API. Ray answers errors as plain text, which its
/// CLI prints as it is (`Request failed with status code 400: ...`); the status follows the
/// same kinds as [`http_status`].
#[derive(Debug)]
pub struct RayApiError {
    pub status: StatusCode,
    pub text: String,
}

impl RayApiError {
    pub fn bad_request(text: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, text: text.into() }
    }
}

impl From<ValidationErrors> for RayApiError {
    fn from(e: ValidationErrors) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl From<ControlError> for RayApiError {
    fn from(e: ControlError) -> Self {
        let ApiError { status, message } = e.into();
        Self { status, text: message }
    }
}

impl IntoResponse for RayApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.text).into_response();
        response.extensions_mut().insert(RayText);
        response
    }
}

/// Marks an error answered in Ray's plain text on purpose (Ray's clients print it as it is),
/// which the admin API's JSON errors leave alone.
#[derive(Clone, Copy)]
pub struct RayText;

/// gRPC status for a control-plane refusal (repository load and unload).
pub fn grpc_control_status(e: ControlError) -> tonic::Status {
    grpc_status(InferError::new(e.kind(), e.to_string()))
}

/// gRPC status for an error: the same kinds as [`http_status`], as gRPC codes.
pub fn grpc_status(e: InferError) -> tonic::Status {
    let code = match e.kind {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Conflict => tonic::Code::FailedPrecondition,
        ErrorKind::Unimplemented => tonic::Code::Unimplemented,
        ErrorKind::Internal => {
            tracing::warn!("internal error: {}", e.message);
            tonic::Code::Internal
        }
    };
    tonic::Status::new(code, bounded(e.message))
}

/// The most bytes of an error message a gRPC status carries: it travels in the `grpc-message`
/// trailer, and clients cap metadata (grpc C-core, so tritonclient, at 8 KiB by default); a
/// message quoting a huge name from the request would otherwise reach the client as a broken
/// stream instead of its status.
const MAX_GRPC_MESSAGE: usize = 1024;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_GRPC_MESSAGE {
        let mut end = MAX_GRPC_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut)");
    }
    message
}

/// An error with its causes, one after another: reqwest's own says only "error sending request
/// for url (...)" where the cause is a refused connection, a timeout or an untrusted
/// certificate.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // hyper and reqwest repeat a cause's words in their own at times.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
