//! What happens to a request before a handler reads its body, and how a body that cannot be
//! read is answered:
//!
//! - a `Content-Length` above `http_options.max_body_bytes` gets 413 at once, before the body
//!   arrives (with `Expect: 100-continue` the client is never asked to send it);
//! - a `Content-Encoding` other than gzip, deflate or identity (any case), or more than one
//!   coding, gets 415 with the error named; gzip and deflate
//!   bodies are decompressed as they are read (tower-http), and the body limit applies to the
//!   decompressed size too, so a small compressed bomb gets 413 with bounded memory;
//! - a body that stops arriving for `http_options.body_read_timeout_s` gets 408.

use axum::http::{HeaderMap, StatusCode, header};

use crate::error::ApiError;

/// Content codings a request body may use.
const ENCODINGS: &[&str] = &["gzip", "deflate", "identity"];

/// The refusal of a request, before its body is read, whose body is announced too large or
/// encoded in a way Sluice cannot decode; `None` for every other request. A `Content-Encoding`
/// it accepts is rewritten to the one lowercase coding the decompression layer reads (codings
/// are case-insensitive, and `identity` is no coding), or removed when only `identity` is left.
pub fn refuse(headers: &mut HeaderMap, max_body_bytes: usize) -> Option<ApiError> {
    if let Some(len) = content_length(headers)
        && len > max_body_bytes as u64
    {
        return Some(too_large(Some(len), max_body_bytes));
    }
    if !headers.contains_key(header::CONTENT_ENCODING) {
        return None;
    }
    let mut codings = codings(headers);
    if let Some(coding) = codings.iter().find(|c| !ENCODINGS.contains(&c.as_str())) {
        return Some(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Encoding `{coding}` is not supported; use gzip or deflate"),
        ));
    }
    codings.retain(|c| c != "identity");
    match codings.as_slice() {
        [] => {
            headers.remove(header::CONTENT_ENCODING);
        }
        [one] => {
            headers.insert(
                header::CONTENT_ENCODING,
                header::HeaderValue::from_static(if one == "gzip" { "gzip" } else { "deflate" }),
            );
        }
        several => {
            return Some(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding `{}`: a body may be compressed once (gzip or deflate)",
                    several.join(", ")
                ),
            ));
        }
    }
    None
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn codings(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect()
}

pub fn too_large(len: Option<u64>, max: usize) -> ApiError {
    let size = match len {
        Some(n) => format!("{n} bytes"),
        None => "larger (decompressed bodies count)".to_string(),
    };
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("length limit exceeded: the request body is {size} but http_options.max_body_bytes is {max}"),
    )
}

/// The answer to a body that could not be read: 413 past the limit, 408 when it stopped
/// arriving, 503 past the bytes all bodies may hold at once, else 400 (a broken compressed stream, a connection that broke).
/// Reads a request body whole, up to `max_body_bytes`; a body that cannot be read is answered
/// as [`body_error`] says (JSON, where axum's own extractor answers plain text that clients
/// such as tritonclient cannot read).
pub async fn read_body(body: axum::body::Body, max_body_bytes: usize) -> Result<bytes::Bytes, ApiError> {
    axum::body::to_bytes(body, max_body_bytes).await.map_err(|e| body_error(&e, max_body_bytes))
}

pub fn body_error(e: &(dyn std::error::Error + 'static), max_body_bytes: usize) -> ApiError {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() || c.is::<super::intake::SentTooLarge>() {
            return too_large(None, max_body_bytes);
        }
        if let Some(timeout) = c.downcast_ref::<super::intake::BodyTimeout>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, timeout.to_string());
        }
        if let Some(over) = c.downcast_ref::<super::intake::OverBudget>() {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, over.to_string());
        }
        cause = c.source();
    }
    ApiError::bad_request(format!("cannot read the request body: {e}"))
}
