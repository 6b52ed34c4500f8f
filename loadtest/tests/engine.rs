//! The load engines against an in-process OIP server with a known service time and known
//! failures: request counts, error accounting, --check mismatches, percentiles and rates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use sluice_loadtest::client::{Client, Protocol};
use sluice_loadtest::codec::prepare;
use sluice_loadtest::inputs::{Case, JsonTensor};
use sluice_loadtest::run::{Limits, Mode, StepOptions, run_step};

const SERVICE: Duration = Duration::from_millis(3);

/// Echoes input `x` as output `y` after SERVICE; every 5th request gets 503, and every 7th
/// answers a wrong value.
async fn serve() -> (String, Arc<AtomicU64>) {
    let (addr, count, _) = serve_with_live().await;
    (addr, count)
}

/// [`serve`], also counting `GET /v2/health/live` calls (answered 200, every 4th 503).
async fn serve_with_live() -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let lives = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let l = lives.clone();
    let live = get(move || {
        let n = l.fetch_add(1, Ordering::SeqCst) + 1;
        async move { if n.is_multiple_of(4) { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK } }
    });
    let app = Router::new().route("/v2/health/live", live).route(
        "/v2/models/m/infer",
        post(move |body: Bytes| {
            let c = c.clone();
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(SERVICE).await;
                if n.is_multiple_of(5) {
                    return (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "busy"}).to_string());
                }
                let req: Value = serde_json::from_slice(&body).unwrap();
                let mut data = req["inputs"][0]["data"].clone();
                if n.is_multiple_of(7) {
                    data = json!([-1.0]);
                }
                let out = json!({"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": data}]});
                (StatusCode::OK, out.to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, count, lives)
}

/// Serves `app` on loopback; a REST JSON client of model `m` on it, and the sample case.
async fn client_of(app: Router) -> (Arc<Client>, Arc<Vec<sluice_loadtest::codec::Prepared>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = Arc::new(Client::connect(Protocol::RestJson, &addr, "m", "").await.unwrap());
    (client, Arc::new(vec![prepare(&case(), "m", "").unwrap()]))
}

fn case() -> Case {
    let t = |name: &str| JsonTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 1],
        data: vec![json!(0.5)],
        ..Default::default()
    };
    Case { inputs: vec![t("x")], outputs: Some(vec![t("y")]), tolerance: 1e-6, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_every_request_and_classifies_failures() {
    let (addr, served) = serve().await;
    let client = Arc::new(Client::connect(Protocol::RestJson, &addr, "m", "").await.unwrap());
    let cases = Arc::new(vec![prepare(&case(), "m", "").unwrap()]);
    let limits = Limits { duration: None, requests: Some(140) };
    let options = StepOptions { check: true, request_log: true, timeout: None };
    let r = run_step(client, cases, Mode::Closed { concurrency: 4 }, limits, options, None).await;
    assert_eq!(served.load(Ordering::SeqCst), 140, "exactly the requested count was sent");
    let busy = r.errors.get("http 503").copied().unwrap_or(0);
    let mismatch = r.errors.get("mismatch").copied().unwrap_or(0);
    assert_eq!(busy, 28, "{:?}", r.errors);
    // Every 7th answer is wrong, except those that were 503s (multiples of 35).
    assert_eq!(mismatch, 20 - 4, "{:?}", r.errors);
    assert_eq!(r.ok + r.error_count(), 140);
    // The request log holds each request once, with the same outcomes.
    assert_eq!(r.requests.len(), 140);
    assert_eq!(r.requests.iter().filter(|q| q.error.is_none()).count() as u64, r.ok);
    assert_eq!(r.requests.iter().filter(|q| q.error.as_deref() == Some("http 503")).count() as u64, busy);
    assert_eq!(r.requests.iter().filter(|q| q.error.as_deref() == Some("mismatch")).count() as u64, mismatch);
    assert!(r.started_unix_s > 0.0);
    assert!(r.latency_us.p50 >= SERVICE.as_micros() as f64, "{:?}", r.latency_us);
    assert!(r.latency_us.p50 <= r.latency_us.p90 && r.latency_us.p90 <= r.latency_us.p99);
    assert!(r.latency_us.p99 <= r.latency_us.max);
    assert!(r.throughput > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_on_schedule_and_stops_by_count() {
    let (addr, served) = serve().await;
    let client = Arc::new(Client::connect(Protocol::RestJson, &addr, "m", "").await.unwrap());
    let cases = Arc::new(vec![prepare(&case(), "m", "").unwrap()]);
    let limits = Limits { duration: Some(Duration::from_secs(30)), requests: Some(50) };
    let options = StepOptions { request_log: true, ..StepOptions::default() };
    let r = run_step(client, cases, Mode::Open { rate: 500.0, poisson: false }, limits, options, None).await;
    assert_eq!(served.load(Ordering::SeqCst), 50);
    assert_eq!(r.ok + r.error_count(), 50);
    assert_eq!(r.errors.get("http 503"), Some(&10));
    // Open loop: each request is logged from its scheduled time, 2 ms apart at 500/s.
    let mut sent: Vec<Duration> = r.requests.iter().map(|q| q.sent).collect();
    sent.sort();
    assert_eq!(sent.len(), 50);
    assert_eq!(sent[49] - sent[0], Duration::from_millis(98), "{sent:?}");
    // 50 sends at 500/s take about 0.1 s; the step cannot end before the last send.
    assert!(r.seconds >= 0.09, "{}", r.seconds);
}

#[tokio::test]
async fn a_server_that_is_not_there_is_a_transport_error() {
    let client = Arc::new(Client::connect(Protocol::RestJson, "127.0.0.1:1", "m", "").await.unwrap());
    let cases = Arc::new(vec![prepare(&case(), "m", "").unwrap()]);
    let limits = Limits { duration: None, requests: Some(3) };
    let r =
        run_step(client, cases, Mode::Closed { concurrency: 1 }, limits, StepOptions::default(), None).await;
    assert!(r.requests.is_empty(), "no log unless asked");
    assert_eq!(r.ok, 0);
    assert_eq!(r.error_count(), 3);
    assert!(r.errors.keys().all(|k| k.starts_with("transport")), "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liveness_client_sends_only_liveness_calls_and_counts_their_failures() {
    let (addr, infers, lives) = serve_with_live().await;
    let client = Client::connect(Protocol::RestJson, &addr, "", "").await.unwrap().liveness();
    let client = Arc::new(client);
    let cases = Arc::new(vec![prepare(&Case::no_tensors(), "", "").unwrap()]);
    let limits = Limits { duration: None, requests: Some(40) };
    let r =
        run_step(client, cases, Mode::Closed { concurrency: 2 }, limits, StepOptions::default(), None).await;
    assert_eq!(lives.load(Ordering::SeqCst), 40, "every call went to /v2/health/live");
    assert_eq!(infers.load(Ordering::SeqCst), 0, "no inference was sent");
    assert_eq!(r.ok, 30);
    assert_eq!(r.errors.get("http 503"), Some(&10), "{:?}", r.errors);
}

/// A server that never answers cannot hold a step: each request ends as a `timeout` error at
/// the step's timeout, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_server_never_answers_end_as_timeouts() {
    let app = Router::new().route(
        "/v2/models/m/infer",
        post(|| async {
            std::future::pending::<()>().await;
            StatusCode::OK
        }),
    );
    let (client, cases) = client_of(app).await;
    let limits = Limits { duration: Some(Duration::from_secs(30)), requests: Some(4) };
    let options = StepOptions { timeout: Some(Duration::from_millis(200)), ..StepOptions::default() };
    for mode in [Mode::Closed { concurrency: 2 }, Mode::Open { rate: 100.0, poisson: false }] {
        let r = run_step(client.clone(), cases.clone(), mode, limits, options, None).await;
        assert_eq!((r.ok, r.errors.get("timeout")), (0, Some(&4)), "{mode:?}: {:?}", r.errors);
    }
}

/// A step bound by its duration is rated over that duration: a request the server holds past
/// the step's end (here the first, 3 s against a 1 s step: room for a loaded machine) drains
/// after it, counted as answered but not dividing the others' rate by the time it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_step_is_rated_over_its_duration_not_its_drain() {
    let served = Arc::new(AtomicU64::new(0));
    let s = served.clone();
    let app = Router::new().route(
        "/v2/models/m/infer",
        post(move || {
            let n = s.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(if n == 0 { Duration::from_secs(3) } else { SERVICE }).await;
                StatusCode::OK
            }
        }),
    );
    let (client, cases) = client_of(app).await;
    let limits = Limits { duration: Some(Duration::from_secs(1)), requests: None };
    for mode in [Mode::Closed { concurrency: 2 }, Mode::Open { rate: 100.0, poisson: false }] {
        served.store(0, Ordering::SeqCst);
        let r = run_step(client.clone(), cases.clone(), mode, limits, StepOptions::default(), None).await;
        assert_eq!(r.seconds, 1.0, "{mode:?}");
        assert!(r.drain_seconds >= 1.5, "{mode:?}: the held request drained after the step: {r:?}");
        let in_window = (r.throughput * r.seconds).round() as u64;
        assert!(in_window >= 1 && in_window < r.ok, "{mode:?}: {in_window} in the window of {}", r.ok);
        assert_eq!(r.ok, served.load(Ordering::SeqCst), "{mode:?}: every answer counted");
    }
}
