//! What every REST request goes through before its route, in one layer (each `Router::layer`
//! call or `from_fn` middleware adds a box that axum clones per request, which the small
//! requests pay for):
//!
//! - the screen ([`screen::refuse`]): a body announced too large gets 413 and an unknown
//!   `Content-Encoding` 415, before the body is read;
//! - the body read timeout (`http_options.body_read_timeout_s`): armed only while the body is
//!   awaited, so a body that came with its headers (most small requests) never touches a timer,
//!   and a request without a body is not wrapped at all;
//! - compression only for the requests that ask for it. tower-http's layers wrap every request
//!   and response body (the request decompressor also boxes each response), which cost the
//!   small requests that never compress about a fifth of `/v2/health/live`'s throughput at 64
//!   connections (`scripts/bench_floor.py`). A request with a `Content-Encoding` (a compressed
//!   body) or an `Accept-Encoding` naming gzip, deflate or `*` (a client that takes compressed
//!   answers) goes through them; every other request goes straight to the routes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use hyper::body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::util::MapRequest;
use tower::{Layer, Service, ServiceExt};
use tower_http::CompressionLevel;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::{DecompressionBody, RequestDecompressionLayer};

use super::screen;

/// Wraps routes in [`Intake`].
#[derive(Clone, Copy)]
pub struct IntakeLayer {
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
}

impl<S: Clone> Layer<S> for IntakeLayer {
    type Service = Intake<S>;

    fn layer(&self, inner: S) -> Intake<S> {
        Intake { plain: inner, limits: *self }
    }
}

/// The routes. Behind request decompression and response compression only for the requests
/// that ask, built then: axum clones the route stack for every request, and each copy of the
/// routes held here is one more allocation per request.
#[derive(Clone)]
pub struct Intake<S> {
    plain: S,
    limits: IntakeLayer,
}

type Boxed = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for Intake<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<S::Future, Boxed>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.plain.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        if let Some(refusal) = screen::refuse(req.headers_mut(), self.limits.max_body_bytes) {
            return Either::Right(Box::pin(std::future::ready(Ok(refusal.into_response()))));
        }
        let req = timed(req, self.limits.body_read_timeout);
        let headers = req.headers();
        if !headers.contains_key(header::CONTENT_ENCODING) && !accepts_compression(headers) {
            return Either::Left(self.plain.call(req));
        }
        let decoded =
            MapRequest::new(self.plain.clone(), decoded as fn(Request<DecompressionBody<Body>>) -> Request);
        // Routes are always ready (axum's own middleware calls a clone the same way).
        let coded = CompressionLayer::new()
            .quality(CompressionLevel::Fastest)
            .layer(RequestDecompressionLayer::new().layer(decoded))
            .oneshot(req);
        Either::Right(Box::pin(async move { coded.await.map(|r| r.map(Body::new)) }))
    }
}

/// `req` with its body failing when no data arrives for `timeout` (`body_read_timeout_s`). A
/// request without a body (GET, or `Content-Length: 0`) has nothing to time.
pub fn timed(req: Request, timeout: Duration) -> Request {
    if hyper::body::Body::is_end_stream(req.body()) {
        return req;
    }
    req.map(|body| Body::new(TimedBody { body, timeout, sleep: None, armed: false }))
}

/// Whether `Accept-Encoding` names an encoding Sluice compresses with (gzip, deflate, or `*`).
/// Some clients send `identity` alone on every request (Python's http.client does); they get
/// the plain path.
fn accepts_compression(headers: &header::HeaderMap) -> bool {
    headers.get_all(header::ACCEPT_ENCODING).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value.split(',').any(|coding| {
                let coding = coding.split(';').next().unwrap_or_default().trim();
                coding == "*" || coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("deflate")
            })
        })
    })
}

fn decoded(req: Request<DecompressionBody<Body>>) -> Request {
    req.map(Body::new)
}

/// A request body that fails with [`BodyTimeout`] when no data arrives for `timeout`. Unlike
/// tower-http's timeout body, which starts a timer on every poll, the timer is armed only when
/// the body is not there yet (and reset, not recreated, when it is armed again).
struct TimedBody {
    body: Body,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

/// No request data arrived for `http_options.body_read_timeout_s`.
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving")]
pub struct BodyTimeout;

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = Instant::now() + this.timeout;
        let sleep = match (&mut this.sleep, this.armed) {
            (Some(sleep), true) => sleep,
            (Some(sleep), false) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            (none, _) => none.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.armed = true;
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use axum::http::header::{ACCEPT_ENCODING, HeaderValue};

    use super::accepts_compression;

    fn accepts(values: &[&'static str]) -> bool {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(ACCEPT_ENCODING, HeaderValue::from_static(v));
        }
        accepts_compression(&headers)
    }

    #[test]
    fn only_gzip_deflate_or_any_take_the_compressing_path() {
        assert!(!accepts(&[]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["br, zstd"]));
        assert!(accepts(&["gzip"]));
        assert!(accepts(&["identity", "GZIP;q=0.5"]));
        assert!(accepts(&["br, deflate"]));
        assert!(accepts(&["*"]));
    }
}
