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
//! ended before it are read and answered).

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, Stream, StreamExt};
use sluice_proto::inference as pb;
use sluice_router::Router as RouteTable;
use tonic::Status;

use super::CallHeaders;

/// The answer's flag a request asks for with `triton_enable_empty_final_response`
/// ([`super::codec::final_response_asked`]): a model here answers each request once, so that
/// answer is the final one.
const FINAL_RESPONSE: &str = "triton_final_response";

type Stopping = Pin<Box<dyn Future<Output = ()> + Send>>;

type Read = Result<pb::ModelInferRequest, Status>;

/// The answers of one stream, in the order they are ready (see the module's text).
pub struct Answers {
    /// The client's requests, as [`read_on_a_task`] reads them; `None` once no more are read.
    requests: Option<tokio::sync::mpsc::Receiver<Read>>,
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
        requests: tonic::Streaming<pb::ModelInferRequest>,
        headers: CallHeaders,
        routes: Arc<RouteTable>,
        max_in_flight: usize,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        // A stop signal gone (the server dropped) stops the stream too.
        let stopping = Box::pin(async move { crate::listen::stopped(&mut stop).await });
        Self {
            requests: Some(read_on_a_task(requests)),
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
        self.requests = None;
        self.end = end;
    }
}

impl Stream for Answers {
    type Item = Result<pb::ModelStreamInferResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.requests.is_some() && this.stopping.as_mut().poll(cx).is_ready() {
            this.stop_reading(Some(Status::unavailable(
                "the server is shutting down: requests sent on this stream after the answers \
                 received were not run; send them to the server again",
            )));
        }
        // One request per poll runs here: a burst read at once goes on tasks that run in
        // parallel (each inline one ran before the next was looked at, and none was answered
        // until the last had run).
        let mut inline = true;
        while this.running.len() < this.max_in_flight {
            let Some(requests) = this.requests.as_mut() else { break };
            match requests.poll_recv(cx) {
                Poll::Ready(Some(Ok(req))) => {
                    let answer = this.start(req, inline, cx);
                    inline = false;
                    this.running.push(answer);
                }
                Poll::Ready(Some(Err(status))) => this.stop_reading(Some(status)),
                Poll::Ready(None) => this.stop_reading(None),
                Poll::Pending => break,
            }
        }
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(Ok(answer))),
            // Nothing running and nothing more to read: the end.
            Poll::Ready(None) if this.requests.is_none() => Poll::Ready(this.end.take().map(Err)),
            _ => Poll::Pending,
        }
    }
}

/// Reads a stream's requests on a task of its own, each once the one before it is taken: the
/// request body's timers (`body_read_timeout_s`, `body_total_timeout_s`) and its share of
/// `max_body_bytes_in_flight` then act whether or not the stream's answers are being taken.
/// hyper stops polling an answer the client's HTTP/2 window has no room for, and the requests
/// were read only from those polls: a client that kept its window shut and sent half a message
/// held that message's bytes of the budget until the server shut down. Holds at most one request
/// not yet taken, and what of the next came in the same frame. Ends when the requests end, after
/// passing on an error, or once the stream's answers are dropped (the receiver closed).
fn read_on_a_task(
    mut requests: tonic::Streaming<pb::ModelInferRequest>,
) -> tokio::sync::mpsc::Receiver<Read> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let Ok(room) = tx.reserve().await else { return };
            let next = tokio::select! {
                biased;
                () = tx.closed() => return,
                next = requests.next() => next,
            };
            let Some(next) = next else { return };
            let failed = next.is_err();
            room.send(next);
            if failed {
                return;
            }
        }
    });
    rx
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
