//! `ModelStreamInfer`, Triton's bidirectional stream (tritonclient's `start_stream` and
//! `async_stream_infer`, `perf_analyzer --streaming`): each request on the stream runs as
//! `ModelInfer` would, up to `grpc_options.stream_max_in_flight` of them at once, and each is
//! answered on the stream as it finishes (not in the order sent, unless that bound is 1). A
//! request that fails is answered with its error message and its id, and the stream stays open.
//!
//! The stream ends, after every request read from it is answered: with OK once the client has
//! sent its last request; with the status of a message that cannot be read (too large, not a
//! `ModelInferRequest`, stopped arriving); with UNAVAILABLE when the server shuts down (the
//! requests the client sent after that were not read, and none of them ran), or when reading
//! its next message would pass `http_options.max_body_bytes_in_flight` (the messages that
//! ended before it are read and answered); with UNAVAILABLE when the client took no answers
//! for `http_options.write_timeout_s` after the stream had more for it (its HTTP/2 window
//! shut: see [`watch`]).

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use futures_util::task::AtomicWaker;
use sluice_proto::inference as pb;
use sluice_router::Router as RouteTable;
use tonic::Status;

use super::CallHeaders;

/// The answer's flag a request asks for with `triton_enable_empty_final_response`
/// ([`super::codec::final_response_asked`]): a model here answers each request once, so that
/// answer is the final one.
const FINAL_RESPONSE: &str = "triton_final_response";

type Stopping = Pin<Box<dyn Future<Output = ()> + Send>>;

type Requests = tonic::Streaming<pb::ModelInferRequest>;

/// What a stream's answers share with its [`watch`].
struct Shared {
    /// The client's requests; `None` once no more are read, or once the watch dropped them.
    requests: Mutex<Option<Requests>>,
    /// The waker the stream's polls hand on (kept apart from the requests, which may hold it).
    noted: Arc<Noted>,
}

/// A waker that notes when it was woken, then wakes the last poll's.
struct Noted {
    /// When the stream was woken (a request's bytes, a body timer, an answer ready) with no
    /// poll since (nanoseconds from `base`; 0: none). hyper polls a stream's answers only while
    /// the client's HTTP/2 window has room for what it holds of them.
    woken_since: AtomicU64,
    base: Instant,
    /// The waker of the last poll, woken in turn.
    waker: AtomicWaker,
}

impl std::task::Wake for Noted {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let now = self.base.elapsed().as_nanos().clamp(1, u64::MAX as u128) as u64;
        let _ = self.woken_since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.waker.wake();
    }
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Option<Requests>> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Noted {
    /// How long it has been woken without a poll.
    fn unpolled_for(&self) -> Option<Duration> {
        let since = self.woken_since.load(Ordering::Relaxed);
        (since != 0).then(|| self.base.elapsed().saturating_sub(Duration::from_nanos(since)))
    }
}

/// The answers of one stream, in the order they are ready (see the module's text).
pub struct Answers {
    /// The client's requests, and when the stream was woken; see [`watch`].
    shared: Arc<Shared>,
    /// What the stream's polls hand on: notes the wake in `shared`, then wakes the poll's own.
    noting: std::task::Waker,
    /// Requests are still read (`shared`'s may have been dropped by the watch meanwhile).
    reading: bool,
    /// How long the stream may be woken and not polled before its requests not yet read are
    /// dropped (`http_options.write_timeout_s`).
    held_at_most: Duration,
    running: FuturesUnordered<Running>,
    max_in_flight: usize,
    /// What the stream ends with once `running` is empty, when not OK.
    end: Option<Status>,
    /// Ready once the server shuts down.
    stopping: Stopping,
    routes: Arc<RouteTable>,
    headers: Arc<CallHeaders>,
    /// The call's span: each request's task runs in it, as a unary call's request does.
    span: tracing::Span,
}

impl Answers {
    pub(super) fn new(
        requests: Requests,
        headers: CallHeaders,
        routes: Arc<RouteTable>,
        (max_in_flight, held_at_most): (usize, Duration),
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        // A stop signal gone (the server dropped) stops the stream too.
        let stopping = Box::pin(async move { crate::listen::stopped(&mut stop).await });
        let noted = Arc::new(Noted {
            woken_since: AtomicU64::new(0),
            base: Instant::now(),
            waker: AtomicWaker::new(),
        });
        let noting = std::task::Waker::from(Arc::clone(&noted));
        let shared = Arc::new(Shared { requests: Mutex::new(Some(requests)), noted });
        watch(Arc::downgrade(&shared), held_at_most);
        Self {
            shared,
            noting,
            reading: true,
            held_at_most,
            running: FuturesUnordered::new(),
            max_in_flight: max_in_flight.max(1),
            end: None,
            stopping,
            routes,
            headers: Arc::new(headers),
            span: tracing::Span::current(),
        }
    }

    /// Runs `req` to its answer: when `inline`, polled here once first (a request that is
    /// answered at once, as a lone caller of a cheap model is, costs no task), then, when it
    /// has to wait (or is not `inline`), on a task of its own, where it runs to its answer (and
    /// lets its admission go) whether or not the stream's answers are being taken, which a
    /// client that stops opening its flow-control window would otherwise hold up.
    fn start(&self, req: pb::ModelInferRequest, inline: bool, cx: &mut Context<'_>) -> Running {
        let routes = Arc::clone(&self.routes);
        let headers = Arc::clone(&self.headers);
        // Kept for an error's answer, which names the request it is for.
        let named = pb::ModelInferResponse {
            model_name: req.model_name.clone(),
            model_version: req.model_version.clone(),
            id: req.id.clone(),
            ..Default::default()
        };
        let mut answer: Answering = Box::pin(tracing::Instrument::instrument(
            async move {
                let started = std::time::Instant::now();
                let asked =
                    super::codec::final_response_asked(&req.parameters).map_err(crate::error::grpc_status)?;
                let mut response = super::infer(&routes, &headers, started, req).await?;
                if asked {
                    response.parameters.insert(FINAL_RESPONSE.into(), flag(true));
                }
                Ok(response)
            },
            self.span.clone(),
        ));
        if !inline {
            return Running { state: State::Running(tokio::spawn(answer)), named: Some(named) };
        }
        let state = match catch_unwind(AssertUnwindSafe(|| answer.as_mut().poll(cx))) {
            Ok(Poll::Ready(answered)) => State::Answered(Some(answered.map_err(|s| s.message().to_string()))),
            Ok(Poll::Pending) => State::Running(tokio::spawn(answer)),
            Err(_) => State::Answered(Some(Err(PANICKED.to_string()))),
        };
        Running { state, named: Some(named) }
    }

    /// Stops reading requests; the stream ends with `end` (OK when `None`) once every request
    /// read is answered.
    fn stop_reading(&mut self, end: Option<Status>) {
        self.shared.requests().take();
        self.reading = false;
        self.end = end;
    }
}

/// Drops a stream's requests not yet read (the request body, with its share of
/// `max_body_bytes_in_flight`) once the stream has been woken and not polled for
/// `held_at_most`. hyper stops polling a stream's answers while the client's HTTP/2 window has
/// no room for what it holds of them, and the requests are read only from those polls: a client
/// that kept its window shut after sending half a message held that half of the budget until
/// the server shut down (a few such clients held all of it). The half's read timeout, or an
/// answer coming ready, wakes the stream, and hyper does not poll it. Ends with the stream's
/// answers, or once no more requests are read.
fn watch(shared: Weak<Shared>, held_at_most: Duration) {
    tokio::spawn(async move {
        let every = (held_at_most / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let Some(shared) = shared.upgrade() else { return };
            let mut requests = shared.requests();
            if requests.is_none() {
                return;
            }
            if shared.noted.unpolled_for().is_some_and(|unpolled| unpolled >= held_at_most) {
                requests.take();
                return;
            }
        }
    });
}

impl Stream for Answers {
    type Item = Result<pb::ModelStreamInferResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let noted = &this.shared.noted;
        noted.woken_since.store(0, Ordering::Relaxed);
        noted.waker.register(cx.waker());
        let noting = this.noting.clone();
        let cx = &mut Context::from_waker(&noting);
        if this.reading && this.stopping.as_mut().poll(cx).is_ready() {
            this.stop_reading(Some(Status::unavailable(
                "the server is shutting down: requests sent on this stream after the answers \
                 received were not run; send them to the server again",
            )));
        }
        // One request per poll runs here: a burst read at once goes on tasks that run in
        // parallel (each inline one ran before the next was looked at, and none was answered
        // until the last had run).
        let mut inline = true;
        let mut ended = None;
        if this.reading {
            let shared = Arc::clone(&this.shared);
            let mut requests = shared.requests();
            while this.running.len() < this.max_in_flight {
                let Some(reading) = requests.as_mut() else {
                    ended = Some(Some(Status::unavailable(format!(
                        "the client took no answer on this stream for {:?} (http_options.write_timeout_s): \
                         the requests it sent after were not read, and none of them ran",
                        this.held_at_most
                    ))));
                    break;
                };
                match reading.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(req))) => {
                        let answer = this.start(req, inline, cx);
                        inline = false;
                        this.running.push(answer);
                    }
                    Poll::Ready(Some(Err(status))) => {
                        ended = Some(Some(status));
                        break;
                    }
                    Poll::Ready(None) => {
                        ended = Some(None);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if let Some(end) = ended {
            this.stop_reading(end);
        }
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(Ok(answer))),
            // Nothing running and nothing more to read: the end.
            Poll::Ready(None) if !this.reading => Poll::Ready(this.end.take().map(Err)),
            _ => Poll::Pending,
        }
    }
}

type Answering = Pin<Box<dyn Future<Output = Result<pb::ModelInferResponse, Status>> + Send>>;

/// A request's answer when its handling panicked.
const PANICKED: &str = "the request failed in the server";

/// One request of a stream: answered, or on its task; the task is stopped when the stream is
/// dropped (the client went away).
struct Running {
    state: State,
    /// The request's names, for its answer when it fails.
    named: Option<pb::ModelInferResponse>,
}

enum State {
    /// Answered at its first poll (taken once).
    Answered(Option<Result<pb::ModelInferResponse, String>>),
    Running(tokio::task::JoinHandle<Result<pb::ModelInferResponse, Status>>),
}

impl Future for Running {
    type Output = pb::ModelStreamInferResponse;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answered = match &mut self.state {
            State::Answered(answered) => {
                answered.take().expect("a stream's answer polled after it was given")
            }
            State::Running(task) => match std::task::ready!(Pin::new(task).poll(cx)) {
                Ok(answered) => answered.map_err(|status| status.message().to_string()),
                Err(e) => Err(format!("{PANICKED}: {e}")),
            },
        };
        Poll::Ready(match answered {
            Ok(response) => {
                pb::ModelStreamInferResponse { error_message: String::new(), infer_response: Some(response) }
            }
            Err(error_message) => {
                pb::ModelStreamInferResponse { error_message, infer_response: self.named.take() }
            }
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let State::Running(task) = &self.state {
            task.abort();
        }
    }
}

fn flag(value: bool) -> pb::InferParameter {
    pb::InferParameter { parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(value)) }
}
