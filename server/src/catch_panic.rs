//! A request whose handling panics is answered, and its connection lives on: 500 with the JSON
//! error body every other error has, or gRPC's INTERNAL for a gRPC call. (Without this, a panic
//! ended the connection's task: an HTTP/1 client saw its connection reset, every request on it
//! lost, and an HTTP/2 client a reset stream.) No handler is known to panic; this is the
//! backstop, as a model's panic is caught on its replica.

use std::any::Any;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Request, header};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use futures_util::future::{CatchUnwind, Either, Map};

/// A service whose panics, in `call` or in its future, are answered ([module docs](self)).
#[derive(Clone)]
pub struct CatchPanic<S>(pub S);

type Caught<F> = Map<CatchUnwind<AssertUnwindSafe<F>>, Answer>;
type Answer = fn(std::thread::Result<Result<Response, Infallible>>) -> Result<Response, Infallible>;

impl<S, B> tower::Service<Request<B>> for CatchPanic<S>
where
    S: tower::Service<Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, Caught<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let grpc = is_grpc(&req);
        let answer: Answer = if grpc { grpc_answer } else { http_answer };
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.call(req))) {
            Ok(future) => Either::Right(AssertUnwindSafe(future).catch_unwind().map(answer)),
            Err(panic) => Either::Left(ready(answer(Err(panic)))),
        }
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

const MESSAGE: &str = "the server failed on this request (a panic, logged with its cause); the \
                       connection and the server go on";

fn logged(panic: &(dyn Any + Send)) {
    let cause = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)");
    tracing::error!(cause, "a request's handler panicked; answered as a server error");
}

fn http_answer(caught: std::thread::Result<Result<Response, Infallible>>) -> Result<Response, Infallible> {
    match caught {
        Ok(answered) => answered,
        Err(panic) => {
            logged(&*panic);
            Ok(crate::error::ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, MESSAGE)
                .into_response())
        }
    }
}

/// gRPC's trailers-only answer: status 13 (INTERNAL) in the headers.
fn grpc_answer(caught: std::thread::Result<Result<Response, Infallible>>) -> Result<Response, Infallible> {
    match caught {
        Ok(answered) => answered,
        Err(panic) => {
            logged(&*panic);
            let mut answer = Response::new(axum::body::Body::empty());
            let headers = answer.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from_static("13"));
            headers.insert("grpc-message", HeaderValue::from_static(MESSAGE));
            Ok(answer)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use axum::body::Body;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Panics on `/panic` (in its future) and on `/panic-at-call` (in `call`), answers 200
    /// otherwise.
    #[derive(Clone)]
    struct Fragile;

    impl<B> tower::Service<Request<B>> for Fragile {
        type Response = Response;
        type Error = Infallible;
        type Future = futures_util::future::BoxFuture<'static, Result<Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            let path = req.uri().path().to_string();
            assert_ne!(path, "/panic-at-call", "a handler broken before its future");
            Box::pin(async move {
                tokio::task::yield_now().await;
                assert_ne!(path, "/panic", "a broken handler");
                Ok(Response::new(Body::from("fine")))
            })
        }
    }

    async fn served() -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let limits = crate::listen::Limits {
            header_read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            idle_timeout: None,
            max_connections: 8,
            grace: Duration::from_secs(1),
        };
        crate::listen::spawn(listener, None, Fragile, limits, stopping);
        (addr, stop)
    }

    /// Three requests pipelined on one HTTP/1 connection: the two whose handler panics get the
    /// JSON 500, and the connection lives to answer the third (it was reset at the first, the
    /// other two lost).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_is_answered_500_and_its_connection_goes_on() {
        let (addr, _stop) = served().await;
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let sent = [get("/panic"), get("/panic-at-call"), get("/ok")].concat();
        tcp.write_all(sent.as_bytes()).await.unwrap();
        let mut read = Vec::new();
        let mut buf = [0; 4096];
        while String::from_utf8_lossy(&read).matches("HTTP/1.1 ").count() < 3 || !read.ends_with(b"fine") {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.unwrap().unwrap();
            assert!(n > 0, "the connection closed after: {}", String::from_utf8_lossy(&read));
            read.extend_from_slice(&buf[..n]);
        }
        let read = String::from_utf8(read).unwrap();
        // Each answer starts with its status line (a body ends with no newline).
        let statuses: Vec<&str> = read.split("HTTP/1.1 ").skip(1).map(|a| &a[..3]).collect();
        assert_eq!(statuses, ["500", "500", "200"], "{read}");
        assert_eq!(
            read.matches(r#"{"error":"the server failed on this request (a panic"#).count(),
            2,
            "{read}"
        );
    }

    /// A gRPC call (HTTP/2) whose handler panics ends with status INTERNAL and its message;
    /// the connection serves the next call.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_grpc_call_ends_internal() {
        let (addr, _stop) = served().await;
        let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
        let call = |path: &str| {
            client.post(format!("http://{addr}{path}")).header("content-type", "application/grpc").send()
        };
        let answer = call("/panic").await.unwrap();
        assert_eq!(answer.status(), 200, "gRPC's trailers-only answer");
        assert_eq!(answer.headers()["grpc-status"], "13");
        assert!(answer.headers()["grpc-message"].to_str().unwrap().starts_with("the server failed"));
        let answer = call("/ok").await.unwrap();
        assert_eq!(answer.text().await.unwrap(), "fine");
    }
}
