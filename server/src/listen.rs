//! Accepting and serving connections, plain or TLS, HTTP/1.1 and HTTP/2 (by ALPN under TLS,
//! by the connection preface otherwise), with every wait bounded:
//!
//! - at most `max_connections` open per listener; more wait in the kernel's accept queue;
//! - a connection must complete its TLS handshake and send its first request within
//!   `header_read_timeout`; HTTP/1 requests must send their headers within it (an idle
//!   keep-alive connection is closed after it too); HTTP/2 connections that stop answering
//!   pings are closed;
//! - a write the client takes no bytes of for `write_timeout` (it stopped reading) closes the
//!   connection;
//! - a request whose handler panics is answered 500 (gRPC: INTERNAL), and its connection goes
//!   on ([`crate::catch_panic`]);
//! - on shutdown the listener closes at once, connections finish the requests they carry
//!   (HTTP/1 keep-alive is turned off, HTTP/2 gets GOAWAY), and whatever is still open when
//!   the grace period ends is closed.
//!
//! (axum::serve has none of these bounds: one client holding a connection kept its graceful
//! shutdown waiting forever.)

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::http::Request;
use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use sluice_deployments::Yield;
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
    /// A write that makes no progress for this long fails, and the connection closes.
    pub write_timeout: Duration,
    /// No request started for this long: the connection is closed gracefully. None: never.
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
    /// How long open connections may take to finish once shutdown starts.
    pub grace: Duration,
}

impl Limits {
    pub fn new(http: &sluice_config::HttpOptions, grace: Duration) -> Self {
        Self {
            header_read_timeout: Duration::from_secs_f64(http.header_read_timeout_s),
            write_timeout: Duration::from_secs_f64(http.write_timeout_s),
            idle_timeout: (http.idle_timeout_s > 0.0).then(|| Duration::from_secs_f64(http.idle_timeout_s)),
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
        connections.spawn(PollAgain::new(connection(
            tcp,
            peer,
            tls.clone(),
            app.clone(),
            limits,
            stop.clone(),
            permit,
        )));
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
    let (seen, requests) = (first_request.clone(), Arc::new(AtomicU64::new(0)));
    let started = requests.clone();
    let service =
        crate::catch_panic::CatchPanic(app.map_request(move |req: axum::http::Request<Incoming>| {
            seen.notify_one();
            started.fetch_add(1, Ordering::Relaxed);
            req
        }));
    let stop_serving = stop.clone();
    let serve = async move {
        match tls {
            None => http(tcp, None, service, limits, requests, stop_serving).await,
            Some(tls) => match tls.acceptor().accept(tcp).await {
                Ok(stream) => {
                    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    http(stream, alpn, service, limits, requests, stop_serving).await;
                }
                Err(e) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
            },
        }
    };
    tokio::pin!(serve);
    // Until its first request, a connection (handshake included) is held to the header timeout.
    // In this order: once the first request has come, it is served, and finished gracefully if
    // shutdown began meanwhile (chosen at random when both were ready, a shutdown dropped a
    // request already running: `server/tests/drain.rs` failed 2 times in 150 runs on a busy
    // machine).
    tokio::select! {
        biased;
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

/// An HTTP/2 connection's flow-control window: eight streams' (see `http`).
const CONNECTION_WINDOW: u32 = 8 << 20;

/// How many times a connection's idle timeout looks at its request count per period.
const IDLE_LOOKS: u32 = 4;

/// Serves HTTP on an established stream; `alpn` is the protocol TLS negotiated, if any;
/// `requests` counts the requests started on it (an idle connection is one whose count has not
/// moved for `limits.idle_timeout`: looked at a few times per period, nothing per request).
async fn http<I, S>(
    io: I,
    alpn: Option<Vec<u8>>,
    service: S,
    limits: Limits,
    requests: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) where
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
    // A connection's window is several streams' (hyper's default, 1 MiB each): a
    // `ModelStreamInfer` stream held back at `stream_max_in_flight` leaves its unread requests
    // in both, and with equal windows it stalled every other call on its connection.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let builder = match alpn.as_deref() {
        Some(b"h2") => builder.http2_only(),
        Some(b"http/1.1") => builder.http1_only(),
        _ => builder,
    };
    let io = WriteTimed { io, timeout: limits.write_timeout, stall: Stall::default() };
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    // Looked at four times a period: closed after 1 to 1.25 periods without a request.
    let (mut counted, mut quiet) = (requests.load(Ordering::Relaxed), 0);
    let look_every = limits.idle_timeout.unwrap_or_default() / IDLE_LOOKS;
    loop {
        tokio::select! {
            // The connection first: a request already in its socket when the stop (or the idle
            // close) comes is read and served. Polled second, hyper closed a keep-alive
            // connection it had not read at once, and that request was lost unanswered (a
            // request whose head has only partly arrived still is: `shutdown_delay_s`).
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            () = stopped(&mut stop) => break,
            () = tokio::time::sleep(look_every), if limits.idle_timeout.is_some() => {
                let now = requests.load(Ordering::Relaxed);
                quiet = if now == counted { quiet + 1 } else { 0 };
                if quiet >= IDLE_LOOKS {
                    tracing::debug!("no request for {:?} (idle_timeout_s); closing", limits.idle_timeout);
                    break;
                }
                counted = now;
            }
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// A connection's stream whose writes fail (`TimedOut`) once the client has taken no bytes
/// for `timeout`: a client that stops reading its answers held its connection (and the
/// answers' memory) until shutdown. The timer is armed only while a write waits, and reset,
/// not recreated, when armed again; reads pass through.
struct WriteTimed<I> {
    io: I,
    timeout: Duration,
    stall: Stall,
}

impl<I> WriteTimed<I> {
    /// The outcome of a write call: passed on when ready; when it waits, `TimedOut` once it
    /// has waited `timeout`.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if write.is_ready() {
            let _ = self.stall.disarm();
            return write;
        }
        match self.stall.poll(cx, self.timeout) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took no bytes for {:?} (http_options.write_timeout_s)", self.timeout),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A timer for something that may stall (a write, a request body): armed when it waits,
/// disarmed when it makes progress. Reset, not recreated, when armed again; the clock is read
/// only when it is armed and when a wait ends, and not at all by what never waits.
#[derive(Default)]
pub(crate) struct Stall {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the current wait began.
    since: Option<tokio::time::Instant>,
}

impl Stall {
    /// Progress: the wait (if one was going on) is over; its length.
    pub(crate) fn disarm(&mut self) -> Option<Duration> {
        self.since.take().map(|since| since.elapsed())
    }

    /// Waiting: ready once the wait that began at the first call since [`Self::disarm`] has
    /// lasted `timeout`.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, timeout: Duration) -> Poll<()> {
        let sleep = match (&mut self.sleep, self.since) {
            (Some(sleep), Some(_)) => sleep,
            (slot, None) => {
                let now = tokio::time::Instant::now();
                self.since = Some(now);
                match slot {
                    Some(sleep) => {
                        sleep.as_mut().reset(now + timeout);
                        sleep
                    }
                    none => none.insert(Box::pin(tokio::time::sleep_until(now + timeout))),
                }
            }
            (None, Some(_)) => unreachable!("armed with no timer"),
        };
        sleep.as_mut().poll(cx)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteTimed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteTimed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.io).poll_write(cx, buf);
        self.timed(cx, write)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let write = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.timed(cx, write)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flush = Pin::new(&mut self.io).poll_flush(cx);
        self.timed(cx, flush)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let shutdown = Pin::new(&mut self.io).poll_shutdown(cx);
        self.timed(cx, shutdown)
    }
}

/// How many times [`PollAgain`] polls a connection again within one poll of its task.
const POLL_AGAIN: usize = 1;

/// A connection's future, polled again at once when it wakes itself while being polled,
/// rather than handed back to the scheduler.
///
/// hyper's HTTP/1 connection wakes its own task whenever its handler takes a piece of the
/// request body (the body channel wakes its sender, the connection, on every take), so every
/// request with a body woke the task it ran on. tokio takes a task woken during its own poll
/// for one that yields: it goes to the back of the queue and a parked worker is woken to come
/// and steal it (a system call to wake that thread, which then polls the connection on its
/// CPU). Polling again here does at once what the thief would have done. Wakes from elsewhere
/// (a socket, a replica's answer) reach the task as before. A request that yields on purpose
/// (to let the others the worker has ready join its batch: `sluice_deployments::yielded`) is
/// handed to the scheduler, as is one that wakes itself a second time within the poll (hyper's
/// HTTP/1 connection yields on purpose after 16 turns of its loop: it runs at most twice that
/// long here) or has used up tokio's budget.
struct PollAgain<F> {
    future: Pin<Box<F>>,
    state: Arc<WakeState>,
    /// Wakes through `state`: the waker the connection's future sees.
    waker: Waker,
}

/// [`PollAgain`]'s wake-up state: `IDLE` between polls (a wake goes to the task),
/// `POLLING` during one, `WOKEN` once woken during one (the poll goes again).
struct WakeState {
    state: AtomicU8,
    task: AtomicWaker,
}

const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

impl<F> PollAgain<F> {
    fn new(future: F) -> Self {
        let state = Arc::new(WakeState { state: AtomicU8::new(IDLE), task: AtomicWaker::new() });
        Self { future: Box::pin(future), waker: Waker::from(state.clone()), state }
    }
}

impl Wake for WakeState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // During a poll the poll goes again; a write (not a load) even when already woken,
        // so that the next poll's swap sees whatever this waker's thread wrote before.
        let mut now = self.state.load(Ordering::Acquire);
        while now != IDLE {
            match self.state.compare_exchange_weak(now, WOKEN, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(seen) => now = seen,
            }
        }
        self.task.wake();
    }
}

impl<F: Future> Future for PollAgain<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.state.task.register(cx.waker());
        let mut inner = Context::from_waker(&this.waker);
        // A panic in the connection leaves the state as it was between polls.
        let _idle = IdleOnUnwind(&this.state.state);
        sluice_deployments::yielded();
        for _ in 0..=POLL_AGAIN {
            this.state.state.swap(POLLING, Ordering::AcqRel);
            if let Poll::Ready(out) = this.future.as_mut().poll(&mut inner) {
                this.state.state.store(IDLE, Ordering::Release);
                return Poll::Ready(out);
            }
            if this.state.state.compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Poll::Pending;
            }
            // A request that yields to let others join its batch goes to the scheduler.
            match sluice_deployments::yielded() {
                // Its waker is with the scheduler, which polls it again: nothing to pass on.
                Some(Yield::Defer) => {
                    this.state.state.store(IDLE, Ordering::Release);
                    return Poll::Pending;
                }
                Some(Yield::Requeue) => break,
                None if !tokio::task::coop::has_budget_remaining() => break,
                None => {}
            }
        }
        // Yielding, or still waking itself: the scheduler runs the others first.
        this.state.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Sets [`PollAgain`]'s state back to `IDLE` if the poll unwinds.
struct IdleOnUnwind<'a>(&'a AtomicU8);

impl Drop for IdleOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(IDLE, Ordering::Release);
        }
    }
}

/// Raises the process's soft open-file limit to its hard one (the usual soft limit, 1024, is
/// below one listener's default `max_connections`) and says when `wanted` descriptors (the
/// listeners' `max_connections` added up, and some for models and files) still do not fit:
/// connections past the limit fail at accept (EMFILE), and so would the other listeners',
/// model loads and TLS reloads. None where the limit cannot be read.
#[allow(unsafe_code)] // getrlimit and setrlimit on a local struct
pub fn raise_open_files(wanted: u64) -> Option<String> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a valid, writable rlimit for the call's duration.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    // The hard limit may read unlimited, which Linux refuses for this resource: at most 2^20.
    let most = limit.rlim_max.min(1 << 20);
    if limit.rlim_cur < most {
        let raised = libc::rlimit { rlim_cur: most, rlim_max: limit.rlim_max };
        // SAFETY: `raised` is a valid rlimit that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = most;
        }
    }
    (wanted > limit.rlim_cur).then(|| {
        format!(
            "the open-file limit is {} (ulimit -n), below the {wanted} the listeners' max_connections and \
             the server's own files take: connections past it fail at accept; raise the limit or lower \
             max_connections",
            limit.rlim_cur
        )
    })
}

#[cfg(test)]
mod tests {

    /// The soft limit is raised to the hard one; a want past it is said, one within it not.
    #[test]
    fn the_open_file_limit_is_raised_and_a_want_past_it_said() {
        assert!(super::raise_open_files(16).is_none());
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        #[allow(unsafe_code)]
        // SAFETY: a valid, writable rlimit.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(read, 0);
        assert_eq!(limit.rlim_cur, limit.rlim_max.min(1 << 20), "raised to the hard limit");
        let said = super::raise_open_files(u64::MAX).expect("past any limit");
        assert!(said.contains("max_connections"), "{said}");
    }
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts the wakes the scheduler would get.
    #[derive(Default)]
    struct Count(AtomicUsize);

    /// A task's waker that counts its wakes.
    fn counting() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        (count.clone(), Waker::from(count))
    }

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Pending until polled `ready_at` times; wakes itself in its first `self_wakes` polls; keeps
    /// the last waker it was given.
    struct Probe {
        polls: usize,
        self_wakes: usize,
        ready_at: usize,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls >= self.ready_at {
                return Poll::Ready(self.polls);
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.polls <= self.self_wakes {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    fn probe(self_wakes: usize, ready_at: usize) -> (PollAgain<Probe>, Arc<std::sync::Mutex<Option<Waker>>>) {
        let waker = Arc::new(std::sync::Mutex::new(None));
        (PollAgain::new(Probe { polls: 0, self_wakes, ready_at, waker: waker.clone() }), waker)
    }

    #[tokio::test]
    async fn a_future_that_wakes_itself_is_polled_again_at_once_not_rescheduled() {
        let (count, task) = counting();
        let mut cx = Context::from_waker(&task);
        // Woken once while polled: the second poll comes at once and is ready.
        let (mut once, _) = probe(1, 2);
        assert_eq!(Pin::new(&mut once).poll(&mut cx), Poll::Ready(2));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "the task was not woken");
        // Woken once, then pending: no wake reaches the task.
        let (mut pending, _) = probe(1, usize::MAX);
        assert!(Pin::new(&mut pending).poll(&mut cx).is_pending());
        assert_eq!(pending.future.polls, 2);
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "the task was not woken");
    }

    #[tokio::test]
    async fn a_future_that_keeps_waking_itself_is_handed_back_to_the_scheduler() {
        let (count, task) = counting();
        let (mut spinning, _) = probe(usize::MAX, usize::MAX);
        assert!(Pin::new(&mut spinning).poll(&mut Context::from_waker(&task)).is_pending());
        assert_eq!(spinning.future.polls, POLL_AGAIN + 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task was woken to run again later");
    }

    #[tokio::test]
    async fn a_request_that_yields_to_join_a_batch_is_left_to_the_scheduler() {
        let (count, task) = counting();
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = polls.clone();
        let mut yielding = PollAgain::new(async move {
            seen.fetch_add(1, Ordering::SeqCst);
            sluice_deployments::yield_once(Yield::Requeue).await;
            seen.fetch_add(1, Ordering::SeqCst);
        });
        assert!(Pin::new(&mut yielding).poll(&mut Context::from_waker(&task)).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled again at once");
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the task was woken to run after the others");
        assert!(Pin::new(&mut yielding).poll(&mut Context::from_waker(&task)).is_ready());
    }

    /// Woken from another thread while being polled (a replica's answer): polled again at once.
    struct WokenElsewhere {
        polls: usize,
    }

    impl Future for WokenElsewhere {
        type Output = usize;

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            if self.polls > 1 {
                return Poll::Ready(self.polls);
            }
            let waker = cx.waker().clone();
            std::thread::spawn(move || waker.wake()).join().unwrap();
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_wake_from_another_thread_during_a_poll_is_not_lost() {
        let (count, task) = counting();
        let mut woken = PollAgain::new(WokenElsewhere { polls: 0 });
        assert_eq!(Pin::new(&mut woken).poll(&mut Context::from_waker(&task)), Poll::Ready(2));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn after_a_panic_in_a_poll_wakes_reach_the_task() {
        let (count, task) = counting();
        let kept = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let keep = kept.clone();
        let mut panicking = PollAgain::new(std::future::poll_fn(move |cx| -> Poll<()> {
            *keep.lock().unwrap() = Some(cx.waker().clone());
            panic!("a broken connection");
        }));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = Pin::new(&mut panicking).poll(&mut Context::from_waker(&task));
        }));
        assert!(unwound.is_err());
        kept.lock().unwrap().clone().unwrap().wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "not absorbed as a wake during a poll");
    }

    #[tokio::test]
    async fn a_deferred_yield_is_left_to_the_scheduler_with_no_wake_passed_on() {
        let (count, task) = counting();
        let polls = Arc::new(AtomicUsize::new(0));
        let seen = polls.clone();
        let mut yielding = PollAgain::new(async move {
            seen.fetch_add(1, Ordering::SeqCst);
            // Woken during this poll too (as hyper's body does), then the deferred yield.
            std::future::poll_fn(|cx| {
                cx.waker().wake_by_ref();
                Poll::Ready(())
            })
            .await;
            sluice_deployments::yield_once(Yield::Defer).await;
            seen.fetch_add(1, Ordering::SeqCst);
        });
        assert!(Pin::new(&mut yielding).poll(&mut Context::from_waker(&task)).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled again at once");
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "no wake of its own");
        // The scheduler wakes it once this worker has nothing else to run.
        tokio::task::yield_now().await;
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken by the scheduler");
        assert!(Pin::new(&mut yielding).poll(&mut Context::from_waker(&task)).is_ready());
    }

    #[tokio::test]
    async fn wakes_between_polls_reach_the_task() {
        let (count, task) = counting();
        let (mut waiting, kept) = probe(0, usize::MAX);
        assert!(Pin::new(&mut waiting).poll(&mut Context::from_waker(&task)).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // A socket or a replica's answer, from another thread.
        let waker = kept.lock().unwrap().clone().unwrap();
        std::thread::spawn(move || waker.wake()).join().unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Polled again (as the scheduler does), the future registers again and is woken again.
        assert!(Pin::new(&mut waiting).poll(&mut Context::from_waker(&task)).is_pending());
        kept.lock().unwrap().clone().unwrap().wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }
}
