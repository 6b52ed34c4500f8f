//! Accepting and serving connections, plain or TLS, HTTP/1.1 and HTTP/2 (by ALPN under TLS,
//! by the connection preface otherwise), with every wait bounded:
//!
//! - at most `max_connections` open per listener; more wait in the kernel's accept queue;
//! - a connection must complete its TLS handshake and send its first request within
//!   `header_read_timeout`; HTTP/1 requests must send their headers within it (an idle
//!   keep-alive connection is closed after it too); HTTP/2 connections that stop answering
//!   pings are closed;
//! - on shutdown the listener closes at once, connections finish the requests they carry
//!   (HTTP/1 keep-alive is turned off, HTTP/2 gets GOAWAY), and whatever is still open when
//!   the grace period ends is closed.
//!
//! (axum::serve has none of these bounds: one client holding a connection kept its graceful
//! shutdown waiting forever.)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

use crate::tls::TlsConfig;

/// How long the accept loop pauses after the process ran out of file descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds of one listener (from `http_options`, shared by every listener).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// How long open connections may take to finish once shutdown starts.
    pub grace: Duration,
}

impl Limits {
    pub fn new(http: &sluice_config::HttpOptions, grace: Duration) -> Self {
        Self {
            header_read_timeout: Duration::from_secs_f64(http.header_read_timeout_s),
            max_connections: http.max_connections,
            grace,
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What a listener serves: an axum `Router`, or the REST frontend ([`crate::rest::frontend`]).
pub trait App:
    tower::Service<Request<Incoming>, Response = axum::response::Response, Error = Infallible, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> App for S where
    S: tower::Service<
            Request<Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `app` on `listener` until `stop` turns true, then shuts down within `limits.grace`.
pub fn spawn<S: App>(
    listener: TcpListener,
    tls: Option<Arc<TlsConfig>>,
    app: S,
    limits: Limits,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(accept_loop(listener, tls, app, limits, stop))
}

async fn accept_loop<S: App>(
    listener: TcpListener,
    tls: Option<Arc<TlsConfig>>,
    app: S,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = stopped(&mut stop) => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = stopped(&mut stop) => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if is_exhaustion(&e) {
                    tracing::warn!("cannot accept connections: {e}; pausing {ACCEPT_BACKOFF:?}");
                    tokio::select! {
                        () = stopped(&mut stop) => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                } else {
                    tracing::debug!("accept failed: {e}");
                }
                continue;
            }
        };
        // No Nagle: HTTP/2 (gRPC) writes a response in several frames, and Nagle plus delayed
        // ACKs would hold the last one back for ~40 ms.
        let _ = tcp.set_nodelay(true);
        connections.spawn(connection(tcp, peer, tls.clone(), app.clone(), limits, stop.clone(), permit));
    }
    drop(listener);
    let open = connections.len();
    if open > 0 {
        tracing::debug!("waiting up to {:?} for {open} open connection(s)", limits.grace);
    }
    let drained =
        tokio::time::timeout(limits.grace, async { while connections.join_next().await.is_some() {} });
    if drained.await.is_err() {
        tracing::warn!(
            "{} connection(s) still open after the {:?} grace period; closing them",
            connections.len(),
            limits.grace
        );
        connections.shutdown().await;
    }
}

/// Out of file descriptors or memory: retrying at once would spin.
fn is_exhaustion(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// One connection: TLS handshake (if any), then HTTP until the client closes, the connection
/// breaks a bound, or shutdown.
async fn connection<S: App>(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<TlsConfig>>,
    app: S,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let first_request = Arc::new(Notify::new());
    let seen = first_request.clone();
    let service = app.map_request(move |req: axum::http::Request<Incoming>| {
        seen.notify_one();
        req
    });
    let stop_serving = stop.clone();
    let serve = async move {
        match tls {
            None => http(tcp, None, service, limits, stop_serving).await,
            Some(tls) => match tls.acceptor().accept(tcp).await {
                Ok(stream) => {
                    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    http(stream, alpn, service, limits, stop_serving).await;
                }
                Err(e) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
            },
        }
    };
    tokio::pin!(serve);
    // Until its first request, a connection (handshake included) is held to the header timeout.
    tokio::select! {
        () = &mut serve => return,
        () = first_request.notified() => {}
        () = tokio::time::sleep(limits.header_read_timeout) => {
            tracing::debug!(%peer, "no request within {:?}; closing", limits.header_read_timeout);
            return;
        }
        () = stopped(&mut stop) => return,
    }
    serve.await;
}

/// Serves HTTP on an established stream; `alpn` is the protocol TLS negotiated, if any.
async fn http<I, S>(io: I, alpn: Option<Vec<u8>>, service: S, limits: Limits, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            axum::http::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = match alpn.as_deref() {
        Some(b"h2") => builder.http2_only(),
        Some(b"http/1.1") => builder.http1_only(),
        _ => builder,
    };
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("connection ended: {e}");
            }
        }
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
