//! The OIP `timeout` parameter on both protocols: a request that has to wait behind a request
//! the test holds gets 504 / DEADLINE_EXCEEDED at its own timeout, long before the
//! deployment's `request_timeout_s` (30 s), and never runs.

mod common;

use std::time::Duration;

use common::held::{self, Held};
use common::*;
use serde_json::{Value, json};

/// A server with one held deployment that takes one request at a time.
async fn start_held(step: &str) -> sluice_server::Server {
    start(
        &format!(
            "      - {{name: slow, builtin: {{custom: {{name: {step}}}}}, max_ongoing_requests: 1, request_timeout_s: 30}}\n"
        ),
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oip_timeout_parameter_shortens_the_deadline_on_rest_and_grpc() {
    let held = Held::register("held-timeout");
    let s = start_held("held-timeout").await;
    // Give up long before the deployment's own 30 s, so an ignored `timeout` fails the test.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let infer = url(&s, "/v2/models/slow/infer");
    let first = tokio::spawn({
        let (client, infer) = (client.clone(), infer.clone());
        async move { client.post(infer).body(held::body(1.0, None)).send().await.unwrap().status() }
    });
    held.started().await;

    // REST: the replica is busy; this one waits in the queue until its 50 ms pass.
    let r = client
        .post(&infer)
        .body(held::body(2.0, Some(json!({"timeout": 50_000}))))
        .send()
        .await
        .expect("answered at its own timeout, not the deployment's");
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "request timed out after 50 ms waiting in the queue of model `slow`", "{v}");

    // gRPC: the same parameter as an int64 parameter.
    let mut grpc = grpc::client(&s).await;
    let req = grpc::with_timeout(grpc::fp32_request("slow", "x", &[1], &[2.0]), 50_000);
    let call = tokio::time::timeout(Duration::from_secs(10), grpc.model_infer(req));
    let e = call.await.expect("answered at its own timeout").unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert_eq!(e.message(), "request timed out after 50 ms waiting in the queue of model `slow`");

    // A malformed timeout is the client's error on both protocols.
    let r = client.post(&infer).body(held::body(0.0, Some(json!({"timeout": "soon"})))).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("parameter `timeout` must be microseconds"), "{v}");
    let e = grpc.model_infer(grpc::with_timeout(grpc::fp32_request("slow", "x", &[1], &[0.0]), -1)).await;
    assert_eq!(e.unwrap_err().code(), tonic::Code::InvalidArgument);

    // The held request was never disturbed.
    held.release();
    assert_eq!(first.await.unwrap(), 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_longer_than_request_timeout_s_does_not_lengthen_it() {
    let held = Held::register("held-long-timeout");
    let s = start(
        "      - {name: slow, builtin: {custom: {name: held-long-timeout}}, max_ongoing_requests: 1, request_timeout_s: 0.5}\n",
        "",
    )
    .await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let infer = url(&s, "/v2/models/slow/infer");
    let first = tokio::spawn({
        let (client, infer) = (client.clone(), infer.clone());
        async move { client.post(infer).body(held::body(1.0, None)).send().await.unwrap().status() }
    });
    held.started().await;
    // Asks for an hour; the deployment allows 500 ms (enough for the first request to reach
    // the model on a loaded machine: it has the same deadline).
    let r =
        client.post(&infer).body(held::body(2.0, Some(json!({"timeout": 3_600_000_000u64})))).send().await;
    let r = r.expect("answered at request_timeout_s");
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "request timed out after 500 ms waiting in the queue of model `slow`", "{v}");
    // The held request has the same 500 ms: it is answered at its deadline while the model
    // still runs it (the replica's slot stays taken until the model returns).
    assert_eq!(first.await.unwrap(), 504);
    held.release();
    s.shutdown().await;
}

/// A request the client gives up on (a cancelled gRPC call, a closed HTTP connection) is
/// counted as `cancelled`, with the time it had taken, not left out of the counts, the latency
/// histogram and the Triton statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_client_gives_up_on_are_counted_as_cancelled() {
    let held = Held::register("held-cancelled");
    let s = start(
        "      - {name: gone, builtin: {custom: {name: held-cancelled}}, max_ongoing_requests: 1, request_timeout_s: 30}\n",
        "",
    )
    .await;
    let mut grpc = grpc::client(&s).await;
    // The client gives up once its call runs (a timeout of its own could pass before the call
    // reached the model on a loaded machine).
    let call =
        tokio::spawn(async move { grpc.model_infer(grpc::fp32_request("gone", "x", &[1], &[1.0])).await });
    held.started().await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled(), "the call is still held when the client gives up");
    // REST: the client closes its connection while its request waits behind the held one.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let r = client.post(url(&s, "/v2/models/gone/infer")).body(held::body(2.0, None)).send().await;
    assert!(r.is_err(), "the client gave up");
    held.release();
    let counted = |protocol: &str| {
        let s = &s;
        let protocol = protocol.to_string();
        async move {
            let text = reqwest::get(url(s, "/metrics")).await.unwrap().text().await.unwrap();
            let line = format!(
                r#"sluice_requests_total{{model="gone",version="1",protocol="{protocol}",outcome="cancelled"}} 1"#
            );
            text.lines().any(|l| l == line)
        }
    };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !(counted("grpc").await && counted("rest").await) {
        assert!(std::time::Instant::now() < until, "not counted as cancelled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, stats) = get_json(&s, "/v2/models/gone/stats").await;
    assert_eq!(stats["model_stats"][0]["inference_stats"]["fail"]["count"], 2, "{stats}");
    s.shutdown().await;
}

/// `timeout: 0` is no timeout of the client's own, as in Triton: the request waits behind a
/// held one and is answered once it is let go (it was answered 504 at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_timeout_is_no_timeout() {
    let held = Held::register("held-zero-timeout");
    let s = start_held("held-zero-timeout").await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let infer = url(&s, "/v2/models/slow/infer");
    let first = tokio::spawn({
        let (client, infer) = (client.clone(), infer.clone());
        async move { client.post(infer).body(held::body(1.0, None)).send().await.unwrap().status() }
    });
    held.started().await;
    let rest = tokio::spawn({
        let (client, infer) = (client.clone(), infer.clone());
        async move {
            client
                .post(infer)
                .body(held::body(0.0, Some(json!({"timeout": 0}))))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let mut grpc = grpc::client(&s).await;
    let call = tokio::spawn(async move {
        grpc.model_infer(grpc::with_timeout(grpc::fp32_request("slow", "x", &[1], &[0.0]), 0))
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rest.is_finished() && !call.is_finished(), "both wait behind the held request");
    held.release();
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(rest.await.unwrap(), 200);
    call.await.unwrap().expect("the gRPC call is answered");
    s.shutdown().await;
}
