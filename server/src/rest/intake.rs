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
use tower::util::MapRequest;
use tower::{Layer, Service, ServiceExt};
use tower_http::CompressionLevel;
use tower_http::compression::CompressionLayer;
use tower_http::decompression::{DecompressionBody, RequestDecompressionLayer};

use super::screen;

/// Wraps routes in [`Intake`]; the bounds of a request body (from `http_options`), which
/// [`timed`] applies.
#[derive(Clone, Copy)]
pub struct IntakeLayer {
    pub max_body_bytes: usize,
    /// The longest pause while a body arrives (`body_read_timeout_s`).
    pub body_read_timeout: Duration,
    /// The longest the server may wait in all for a body (a gRPC stream's message) to arrive
    /// (`body_total_timeout_s`).
    pub body_total_timeout: Duration,
}

impl IntakeLayer {
    pub fn new(http: &sluice_config::HttpOptions) -> Self {
        Self {
            max_body_bytes: http.max_body_bytes,
            body_read_timeout: Duration::from_secs_f64(http.body_read_timeout_s),
            body_total_timeout: Duration::from_secs_f64(http.body_total_timeout_s),
        }
    }
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
        let req = timed(req, &self.limits);
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

/// `req` with its body failing when no data arrives for `body_read_timeout_s`, or once the
/// server's waits for it add up to `body_total_timeout_s` (a body that trickles in; checked as
/// data arrives, so that a body that comes whole with its headers, as small ones do, never
/// reads the clock). A request without a body (GET, or `Content-Length: 0`) has nothing to
/// time. A gRPC body is read message by message: one whose length prefix announces more than
/// `max_body_bytes` fails
/// with RESOURCE_EXHAUSTED before its bytes arrive (as grpc-go and Triton answer; tonic's own
/// check answers OUT_OF_RANGE), and a stream of requests (`ModelStreamInfer`) is timed only
/// inside a message: between two, its client may pause as long as it likes.
pub fn timed(req: Request, limits: &IntakeLayer) -> Request {
    if hyper::body::Body::is_end_stream(req.body()) {
        return req;
    }
    // gRPC is HTTP/2 only: an HTTP/1 request's headers are not looked at.
    let grpc = req.version() == axum::http::Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let framing = grpc.then(|| GrpcFraming {
        limit: limits.max_body_bytes as u64,
        stream: req.uri().path() == STREAM_PATH,
        ..GrpcFraming::default()
    });
    let (timeout, total) = (limits.body_read_timeout, limits.body_total_timeout);
    req.map(|body| Body::new(TimedBody::new(body, timeout, total, framing)))
}

/// The gRPC method whose request body is a stream of messages.
const STREAM_PATH: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// Where a gRPC request body is in its framing: each message is a compression flag, a 4-byte
/// big-endian length, and that many bytes.
#[derive(Default)]
struct GrpcFraming {
    /// The longest message accepted (`http_options.max_body_bytes`).
    limit: u64,
    /// A stream of requests: not timed between messages.
    stream: bool,
    /// Bytes of the current message's 5-byte prefix read so far.
    prefix: usize,
    length: [u8; 4],
    /// Bytes of the current message still to come once its prefix is read.
    left: u64,
}

impl GrpcFraming {
    /// Follows `data`: whether a message ended in it. A message over the limit: its announced
    /// length, and where in `data` it starts (0 when its prefix began in an earlier chunk).
    fn read(&mut self, data: &[u8]) -> Result<bool, (u64, usize)> {
        let mut at = 0;
        let mut start = 0;
        let mut ended = false;
        while at < data.len() {
            if self.left > 0 {
                let n = (data.len() - at).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                at += n;
                ended |= self.left == 0;
                continue;
            }
            if self.prefix == 0 {
                start = at;
            } else {
                self.length[self.prefix - 1] = data[at];
            }
            self.prefix += 1;
            at += 1;
            if self.prefix == 5 {
                self.prefix = 0;
                self.left = u64::from(u32::from_be_bytes(self.length));
                if self.left > self.limit {
                    return Err((self.left, start));
                }
                ended |= self.left == 0;
            }
        }
        Ok(ended)
    }

    fn inside_a_message(&self) -> bool {
        self.prefix > 0 || self.left > 0
    }

    /// Whether a pause here is timed.
    fn timed(&self) -> bool {
        !self.stream || self.inside_a_message()
    }
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
    total: Duration,
    /// How long the server has waited for this body's data so far (a stream's: for its
    /// current message): time it spent not reading (busy, or holding a stream back) is not
    /// counted.
    waited: Duration,
    stall: crate::listen::Stall,
    /// For a gRPC body: where it is in its messages.
    framing: Option<GrpcFraming>,
    /// A message over the limit, refused once the messages before it are passed on.
    refused: Option<tonic::Status>,
}

/// A request body that took too long.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("the request body stopped arriving (http_options.body_read_timeout_s passed without data)")]
    Stalled,
    #[error("the request body was still arriving after http_options.body_total_timeout_s")]
    TooLong,
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(refused) = this.refused.take() {
            return Poll::Ready(Some(Err(Box::new(refused))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            if let Some(waited) = this.stall.disarm() {
                this.waited += waited;
                if this.waited > this.total {
                    return Poll::Ready(Some(Err(this.timed_out(BodyTimeout::TooLong))));
                }
            }
            if let (Some(framing), Some(Ok(frame))) = (&mut this.framing, &frame)
                && let Some(data) = frame.data_ref()
            {
                match framing.read(data) {
                    // A stream's next message is timed on its own.
                    Ok(ended) if ended && framing.stream => this.waited = Duration::ZERO,
                    Ok(_) => {}
                    Err((length, start)) => {
                        let message = format!(
                            "a message of {length} bytes is over the limit of {} bytes (http_options.max_body_bytes)",
                            framing.limit
                        );
                        let refused = tonic::Status::resource_exhausted(message);
                        if start == 0 {
                            return Poll::Ready(Some(Err(Box::new(refused))));
                        }
                        // The messages before it are read and answered first.
                        this.refused = Some(refused);
                        return Poll::Ready(Some(Ok(Frame::data(data.slice(..start)))));
                    }
                }
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.framing.as_ref().is_some_and(|f| !f.timed()) {
            return Poll::Pending;
        }
        match this.stall.poll(cx, this.timeout) {
            Poll::Ready(()) => Poll::Ready(Some(Err(this.timed_out(BodyTimeout::Stalled)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.refused.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl TimedBody {
    fn new(body: Body, timeout: Duration, total: Duration, framing: Option<GrpcFraming>) -> Self {
        Self {
            body,
            timeout,
            total,
            waited: Duration::ZERO,
            stall: Default::default(),
            framing,
            refused: None,
        }
    }

    /// The error a body that took too long ends with: a REST handler answers it 408; a gRPC
    /// call ends DEADLINE_EXCEEDED (tonic would read any other error as UNKNOWN).
    fn timed_out(&self, timeout: BodyTimeout) -> axum::BoxError {
        match self.framing {
            Some(_) => Box::new(tonic::Status::deadline_exceeded(timeout.to_string())),
            None => timeout.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderMap;
    use axum::http::header::{ACCEPT_ENCODING, HeaderValue};

    use super::{GrpcFraming, TimedBody, accepts_compression};

    mod timed {
        use std::time::Duration;

        use axum::body::{Body, Bytes};
        use http_body_util::BodyExt;
        use hyper::body::Frame;

        use super::{GrpcFraming, TimedBody};

        type Sent = Result<Frame<Bytes>, std::convert::Infallible>;

        /// A body fed from the returned sender, timed 1 s per pause and 3 s in all.
        fn body(framing: Option<GrpcFraming>) -> (tokio::sync::mpsc::Sender<Sent>, TimedBody) {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let body =
                Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
            (tx, TimedBody::new(body, Duration::from_secs(1), Duration::from_secs(3), framing))
        }

        /// Sends 20 chunks, one every 0.5 s (10 s in all): each ends a 6-byte message and
        /// begins the next (as gRPC clients pack messages into frames).
        fn trickle(tx: tokio::sync::mpsc::Sender<Sent>) {
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 6, 1, 2])))).await;
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let chunk = Bytes::from_static(&[3, 4, 5, 6, 0, 0, 0, 0, 6, 1, 2]);
                    let _ = tx.send(Ok(Frame::data(chunk))).await;
                }
            });
        }

        async fn read_all(mut body: TimedBody) -> Result<usize, String> {
            let mut chunks = 0;
            while let Some(frame) = body.frame().await {
                frame.map_err(|e| e.to_string())?;
                chunks += 1;
            }
            Ok(chunks)
        }

        #[tokio::test(start_paused = true)]
        async fn a_stream_times_each_message_on_its_own() {
            let (tx, body) = body(Some(GrpcFraming { limit: 100, stream: true, ..GrpcFraming::default() }));
            trickle(tx);
            assert_eq!(read_all(body).await, Ok(21), "10 s of messages, each in 0.5 s");
        }

        #[tokio::test(start_paused = true)]
        async fn a_unary_call_is_timed_in_all() {
            let (tx, body) = body(Some(GrpcFraming { limit: 100, ..GrpcFraming::default() }));
            trickle(tx);
            let e = read_all(body).await.unwrap_err();
            assert!(e.contains("body_total_timeout_s"), "{e}");
        }

        /// Time the server spends not reading (busy, or holding a stream back) is not the
        /// client's: only its waits for data count.
        #[tokio::test(start_paused = true)]
        async fn only_waiting_for_the_client_counts() {
            let (tx, mut body) = body(None);
            let first = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                first.send(Ok(Frame::data(Bytes::from_static(b"data")))).await.unwrap();
            });
            body.frame().await.unwrap().unwrap();
            for _ in 0..4 {
                tx.send(Ok(Frame::data(Bytes::from_static(b"data")))).await.unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
                body.frame().await.unwrap().unwrap();
            }
            drop(tx);
            assert!(body.frame().await.is_none());
        }
    }

    #[test]
    fn grpc_framing_knows_when_a_message_is_half_read_and_refuses_one_too_long() {
        let mut f = GrpcFraming { limit: 256, stream: true, ..GrpcFraming::default() };
        assert!(!f.inside_a_message());
        // Two messages (3 bytes, then 0) and the start of a third, split across reads.
        let stream = [&[0u8, 0, 0][..], &[0, 3, 7], &[8, 9, 0, 0, 0, 0, 0, 1, 0, 0], &[0, 2, 1], &[2]];
        let (inside, ended): (Vec<bool>, Vec<bool>) = stream
            .iter()
            .map(|data| {
                let ended = f.read(data).unwrap();
                (f.inside_a_message(), ended)
            })
            .unzip();
        assert_eq!(inside, [true, true, true, true, false]);
        assert_eq!(ended, [false, false, true, false, true], "which reads ended a message");
        assert!(!f.timed(), "a stream between two messages");
        f.read(&[1, 0, 0, 1, 0]).unwrap();
        assert!(f.inside_a_message() && f.timed(), "a prefix announcing 256 bytes");
        f.read(&[0; 256]).unwrap();
        assert!(!f.inside_a_message());
        assert_eq!(f.read(&[0, 0, 0, 0, 1, 9, 0, 0, 0, 1, 1]), Err((257, 6)), "where the long one starts");
        let unary = GrpcFraming { limit: 256, ..GrpcFraming::default() };
        assert!(unary.timed(), "a unary call's body is timed until it ends");
    }

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
