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
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The body bytes the server's frontends hold at once (`max_body_bytes_in_flight`).
    pub budget: &'static BodyBudget,
}

impl IntakeLayer {
    /// The bounds of `http`, with the budget every frontend of one server shares.
    pub fn new(http: &sluice_config::HttpOptions, budget: &'static BodyBudget) -> Self {
        Self {
            max_body_bytes: http.max_body_bytes,
            body_read_timeout: Duration::from_secs_f64(http.body_read_timeout_s),
            body_total_timeout: Duration::from_secs_f64(http.body_total_timeout_s),
            budget,
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
        // A compressed body is counted against the budget as it comes out of decompression.
        let compressed = req.headers().contains_key(header::CONTENT_ENCODING);
        let req = timed_counted(req, &self.limits, !compressed);
        if !compressed && !accepts_compression(req.headers()) {
            return Either::Left(self.plain.call(req));
        }
        // Only a compressed body is counted here: an identity one passes through decompression
        // as it is, counted already.
        let budget = compressed.then_some(self.limits.budget);
        let decoded = MapRequest::new(self.plain.clone(), move |req: Request<DecompressionBody<Body>>| {
            req.map(|body| match budget {
                Some(budget) => Body::new(Counted { body, charge: Charge::new(budget) }),
                None => Body::new(body),
            })
        });
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
/// Its bytes are counted against `limits.budget` as they arrive.
pub fn timed(req: Request, limits: &IntakeLayer) -> Request {
    timed_counted(req, limits, true)
}

/// [`timed`], its bytes counted against the budget only when `counted`.
fn timed_counted(req: Request, limits: &IntakeLayer, counted: bool) -> Request {
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
        stream: STREAM_PATHS.contains(&req.uri().path()),
        ..GrpcFraming::default()
    });
    let (timeout, total) = (limits.body_read_timeout, limits.body_total_timeout);
    let charge = counted.then(|| Charge::new(limits.budget));
    // A compressed REST body (the one not counted here) is bounded as sent as well as after
    // decompression: one without `Content-Length` (chunked, or HTTP/2) that decompresses to
    // little (endless empty deflate blocks) was read until `body_total_timeout_s`. A plain one
    // is bounded where it is read; a gRPC body, per message.
    let sent_left = (!counted && framing.is_none()).then_some(limits.max_body_bytes as u64);
    req.map(|body| {
        let mut timed = TimedBody::new(body, timeout, total, framing, charge);
        timed.sent_left = sent_left;
        Body::new(timed)
    })
}

/// The gRPC methods whose request body is a stream of messages; every other call takes one.
const STREAM_PATHS: [&str; 2] = [
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
];

/// Where a gRPC request body is in its framing: each message is a compression flag, a 4-byte
/// big-endian length, and that many bytes.
#[derive(Default)]
struct GrpcFraming {
    /// The longest message accepted (`http_options.max_body_bytes`).
    limit: u64,
    /// A stream of requests: not timed between messages. Any other call carries one message.
    stream: bool,
    /// A message has ended.
    ended: bool,
    /// Bytes of the current message's 5-byte prefix read so far.
    prefix: usize,
    length: [u8; 4],
    /// Bytes of the current message still to come once its prefix is read.
    left: u64,
}

/// A gRPC message refused by [`GrpcFraming::read`], and where in the chunk read it starts (0
/// when its prefix began in an earlier chunk).
#[derive(Debug)]
enum Refused {
    /// Announcing more than the limit: its length.
    OverLimit(u64, usize),
    /// A second message in a call that takes one. tonic reads a unary call's body to its end
    /// after the first message, decoding and dropping what follows: each such message counted
    /// against the budget until the body ended, far past `max_body_bytes` in all.
    Second(usize),
}

impl GrpcFraming {
    /// Follows `data`: where in it the last message that ended in it ends (`None`: none did).
    fn read(&mut self, data: &[u8]) -> Result<Option<usize>, Refused> {
        let mut at = 0;
        let mut start = 0;
        let mut ended = None;
        while at < data.len() {
            if self.left > 0 {
                let n = (data.len() - at).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                at += n;
                if self.left == 0 {
                    ended = Some(at);
                    self.ended = true;
                }
                continue;
            }
            if self.prefix == 0 {
                start = at;
                if self.ended && !self.stream {
                    return Err(Refused::Second(start));
                }
            } else {
                self.length[self.prefix - 1] = data[at];
            }
            self.prefix += 1;
            at += 1;
            if self.prefix == 5 {
                self.prefix = 0;
                self.left = u64::from(u32::from_be_bytes(self.length));
                if self.left > self.limit {
                    return Err(Refused::OverLimit(self.left, start));
                }
                if self.left == 0 {
                    ended = Some(at);
                    self.ended = true;
                }
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

/// The request body bytes one server's frontends hold at once while reading bodies
/// (`http_options.max_body_bytes_in_flight`), REST and gRPC together: each body's bytes are
/// counted as they arrive and given back when it is dropped (once read; its request is decoded
/// in the same step), a gRPC stream's at the end of each message.
pub struct BodyBudget {
    limit: usize,
    held: AtomicUsize,
}

/// Every server's budget in this process (one, but for tests and embedders), for `/metrics`.
static BUDGETS: std::sync::Mutex<Vec<&'static BodyBudget>> = std::sync::Mutex::new(Vec::new());

impl BodyBudget {
    /// A budget for one server, kept for the process's life (a server's frontends share it,
    /// and their bodies may outlive the server's own handles).
    pub fn leaked(limit: usize) -> &'static Self {
        let budget = Box::leak(Box::new(Self { limit, held: AtomicUsize::new(0) }));
        BUDGETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(budget);
        // At 0 from the start: a counter that appears at its first refusal hides that one
        // from `increase()`.
        metrics::counter!(sluice_deployments::metrics::BODIES_REFUSED).increment(0);
        budget
    }

    /// The bytes every budget of the process holds now (`sluice_request_body_bytes_reading`).
    pub fn held_in_process() -> usize {
        let budgets = BUDGETS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        budgets.iter().map(|b| b.held()).sum()
    }

    /// The bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// A body refused for the bytes other bodies hold.
#[derive(Debug, thiserror::Error)]
#[error(
    "the server is overloaded: it is reading {held} bytes of request bodies at once, and {more} \
     more would pass http_options.max_body_bytes_in_flight ({limit}); retry later"
)]
pub struct OverBudget {
    held: usize,
    more: usize,
    limit: usize,
}

/// What one body holds of a [`BodyBudget`], given back when it is dropped.
struct Charge {
    budget: &'static BodyBudget,
    held: usize,
}

impl Charge {
    fn new(budget: &'static BodyBudget) -> Self {
        Self { budget, held: 0 }
    }

    /// Counts `more` bytes, unless the budget has not that many left.
    fn take(&mut self, more: usize) -> Result<(), OverBudget> {
        let budget = self.budget;
        budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|&after| after <= budget.limit)
            })
            .map_err(|held| {
                metrics::counter!(sluice_deployments::metrics::BODIES_REFUSED).increment(1);
                OverBudget { held, more, limit: budget.limit }
            })?;
        self.held += more;
        Ok(())
    }

    fn give_back(&mut self) {
        if self.held > 0 {
            self.budget.held.fetch_sub(std::mem::take(&mut self.held), Ordering::AcqRel);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// A decompressed REST body, its bytes counted against the budget as they come.
struct Counted<B> {
    body: B,
    charge: Charge,
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes, Error = axum::BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))
            && let Some(data) = data
        {
            this.charge.take(data.len())?;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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
    /// What this body holds of the budget (none for a compressed REST body: its decompressed
    /// bytes are counted instead).
    charge: Option<Charge>,
    /// The bytes a REST body may still bring as sent (`max_body_bytes`): past them it fails
    /// with [`SentTooLarge`], answered 413.
    sent_left: Option<u64>,
}

/// A REST body that brought more than `max_body_bytes` as sent (compressed).
#[derive(Debug, thiserror::Error)]
#[error("the request body, as sent, is over http_options.max_body_bytes")]
pub struct SentTooLarge;

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
            let data = match &frame {
                Some(Ok(frame)) => frame.data_ref(),
                _ => None,
            };
            // The bytes of this chunk the body holds from now on.
            let mut counted = data.map_or(0, Bytes::len);
            if let Some(left) = &mut this.sent_left {
                match left.checked_sub(counted as u64) {
                    Some(l) => *left = l,
                    None => return Poll::Ready(Some(Err(Box::new(SentTooLarge)))),
                }
            }
            if let (Some(framing), Some(data)) = (&mut this.framing, data) {
                match framing.read(data) {
                    // A stream's next message is timed on its own, and holds the budget on its
                    // own (the messages read are decoded): only what follows the last one's end.
                    Ok(Some(end)) if framing.stream => {
                        this.waited = Duration::ZERO;
                        if let Some(charge) = &mut this.charge {
                            charge.give_back();
                        }
                        counted = data.len() - end;
                    }
                    Ok(_) => {}
                    // The messages before it are read and answered first.
                    Err(Refused::OverLimit(length, start)) => {
                        let message = format!(
                            "a message of {length} bytes is over the limit of {} bytes (http_options.max_body_bytes)",
                            framing.limit
                        );
                        let status = tonic::Status::resource_exhausted(message);
                        return this.refuse_after(status, Some(data), start);
                    }
                    Err(Refused::Second(start)) => {
                        let status = tonic::Status::invalid_argument(
                            "a second request message in a call that takes one (a stream of requests goes to \
                             ModelStreamInfer)",
                        );
                        return this.refuse_after(status, Some(data), start);
                    }
                }
            }
            if let Some(charge) = &mut this.charge
                && let Err(over) = charge.take(counted)
            {
                if this.framing.is_none() {
                    return Poll::Ready(Some(Err(over.into())));
                }
                // A stream's messages that ended in this chunk are read and answered first.
                let whole = data.map_or(0, |data| data.len() - counted);
                return this.refuse_after(tonic::Status::unavailable(over.to_string()), data, whole);
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
    fn new(
        body: Body,
        timeout: Duration,
        total: Duration,
        framing: Option<GrpcFraming>,
        charge: Option<Charge>,
    ) -> Self {
        Self {
            body,
            timeout,
            total,
            waited: Duration::ZERO,
            stall: Default::default(),
            framing,
            refused: None,
            charge,
            sent_left: None,
        }
    }

    /// Refuses the body with `refused` once `data[..passed]` (the messages that ended before
    /// what is refused) is passed on, at once when there is none.
    fn refuse_after(
        &mut self,
        refused: tonic::Status,
        data: Option<&Bytes>,
        passed: usize,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        match data {
            Some(data) if passed > 0 => {
                self.refused = Some(refused);
                Poll::Ready(Some(Ok(Frame::data(data.slice(..passed)))))
            }
            _ => Poll::Ready(Some(Err(Box::new(refused)))),
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

    use super::{GrpcFraming, Refused, TimedBody, accepts_compression};

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
            (tx, TimedBody::new(body, Duration::from_secs(1), Duration::from_secs(3), framing, None))
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
            // One message of 100 bytes, 5 at a time, one chunk every 0.5 s.
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 100])))).await;
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(&[7; 5])))).await;
                }
            });
            let e = read_all(body).await.unwrap_err();
            assert!(e.contains("body_total_timeout_s"), "{e}");
        }

        /// A call that takes one message is refused at the start of a second (tonic reads and
        /// drops what follows the first, each message counted against the budget), once the
        /// first is passed on.
        #[tokio::test(start_paused = true)]
        async fn a_unary_call_is_refused_a_second_message() {
            let (tx, mut unary) = body(Some(GrpcFraming { limit: 100, ..GrpcFraming::default() }));
            tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 1, 7, 0, 0])))).await.unwrap();
            let passed = unary.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&passed[..], &[0, 0, 0, 0, 1, 7], "the first message");
            let e = unary.frame().await.unwrap().unwrap_err().downcast::<tonic::Status>().unwrap();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("second request message"), "{e:?}");
            let (tx, stream) = body(Some(GrpcFraming { limit: 100, stream: true, ..GrpcFraming::default() }));
            trickle(tx);
            assert_eq!(read_all(stream).await, Ok(21), "a stream takes many");
        }

        /// A stream holds the budget for the message it is reading only (the ones read are
        /// decoded and given back); a unary call for its whole body, given back when dropped.
        #[tokio::test(start_paused = true)]
        async fn a_stream_holds_the_budget_one_message_at_a_time() {
            let budget = super::super::BodyBudget::leaked(100);
            let charged = |stream| {
                let (tx, body) = body(Some(GrpcFraming { limit: 100, stream, ..GrpcFraming::default() }));
                (tx, TimedBody { charge: Some(super::super::Charge::new(budget)), ..body })
            };
            let (tx, stream) = charged(true);
            trickle(tx);
            assert_eq!(read_all(stream).await, Ok(21), "227 bytes, 11 at a time");
            assert_eq!(budget.held(), 0);
            // Between two messages a stream holds nothing but what it read of the next.
            let (tx, mut idle) = charged(true);
            tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 2, 7, 7, 0, 0])))).await.unwrap();
            idle.frame().await.unwrap().unwrap();
            assert_eq!(budget.held(), 2, "the next message's first two bytes");
            tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 1, 9])))).await.unwrap();
            idle.frame().await.unwrap().unwrap();
            assert_eq!(budget.held(), 0, "an idle stream holds nothing");
            // A chunk that ends a message and starts one past the budget: the message that
            // ended is passed on, then the stream is refused.
            let mut chunk = vec![0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 99];
            chunk.resize(chunk.len() + 96, 7);
            tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.unwrap();
            let passed = idle.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&passed[..], &[0, 0, 0, 0, 1, 7], "the whole message");
            let e = idle.frame().await.unwrap().unwrap_err().downcast::<tonic::Status>().unwrap();
            assert_eq!(e.code(), tonic::Code::Unavailable);
            drop(idle);
            let (tx, mut unary) = charged(false);
            // A message of 96 bytes, its first 99 with the prefix in 9 chunks of 11, then the rest.
            tx.send(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 96, 7, 7, 7, 7, 7, 7])))).await.unwrap();
            unary.frame().await.unwrap().unwrap();
            for _ in 0..8 {
                tx.send(Ok(Frame::data(Bytes::from_static(&[7; 11])))).await.unwrap();
                unary.frame().await.unwrap().unwrap();
            }
            assert_eq!(budget.held(), 99);
            tx.send(Ok(Frame::data(Bytes::from_static(&[7; 2])))).await.unwrap();
            let e = unary.frame().await.unwrap().unwrap_err();
            let status = e.downcast::<tonic::Status>().unwrap();
            assert_eq!(status.code(), tonic::Code::Unavailable);
            assert!(status.message().contains("max_body_bytes_in_flight (100)"), "{status:?}");
            drop(unary);
            assert_eq!(budget.held(), 0, "given back when the body is dropped");
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
        let (inside, ended): (Vec<bool>, Vec<Option<usize>>) = stream
            .iter()
            .map(|data| {
                let ended = f.read(data).unwrap();
                (f.inside_a_message(), ended)
            })
            .unzip();
        assert_eq!(inside, [true, true, true, true, false]);
        assert_eq!(ended, [None, None, Some(7), None, Some(1)], "where the last message ended in each read");
        assert!(!f.timed(), "a stream between two messages");
        f.read(&[1, 0, 0, 1, 0]).unwrap();
        assert!(f.inside_a_message() && f.timed(), "a prefix announcing 256 bytes");
        f.read(&[0; 256]).unwrap();
        assert!(!f.inside_a_message());
        let long = f.read(&[0, 0, 0, 0, 1, 9, 0, 0, 0, 1, 1]);
        assert!(matches!(long, Err(Refused::OverLimit(257, 6))), "where the long one starts");
        let mut unary = GrpcFraming { limit: 256, ..GrpcFraming::default() };
        assert!(unary.timed(), "a unary call's body is timed until it ends");
        assert_eq!(unary.read(&[0, 0, 0, 0, 1]).ok(), Some(None));
        let second = unary.read(&[9, 0]);
        assert!(matches!(second, Err(Refused::Second(1))), "where the second one starts");
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
