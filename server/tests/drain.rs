//! Graceful shutdown of the library server: once shutdown starts, no new connection is
//! accepted, while a request already running finishes with its answer and shutdown waits for
//! it. (The binary's SIGTERM path is tested in cli.rs.)

mod common;

use std::time::{Duration, Instant};

use common::held::{self, Held};
use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_request_finish_and_refuses_new_connections() {
    let held = Held::register("held-drain");
    let s = start("      - {name: slow, builtin: {custom: {name: held-drain}}}\n", "").await;
    let addr = s.http_addr();
    let running = tokio::spawn({
        let infer = url(&s, "/v2/models/slow/infer");
        async move {
            let r = reqwest::Client::new().post(infer).body(held::body(1.0, None)).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    });
    held.started().await;
    let shutdown = tokio::spawn(s.shutdown());
    // Stopped accepting: a new connection is refused.
    let until = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < until, "still accepting connections after shutdown began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!shutdown.is_finished(), "shutdown waits for the running request");
    held.release();
    let (status, answer) = running.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["data"], serde_json::json!([1.0]), "{answer}");
    shutdown.await.unwrap();
}

/// `shutdown_delay_s`: once shutdown starts the server reports not ready at once, yet goes on
/// accepting and answering for the delay (a load balancer takes it out meanwhile); after the
/// delay it stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_delay_keeps_serving_while_not_ready_then_closes() {
    sluice_server::runtime::init(None, None).unwrap();
    // A delay the checks below fit in on a loaded machine (each a new connection, in a debug
    // build).
    let text = "shutdown_delay_s: 5\nhttp_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {enabled: false}\napplications:\n  - name: test\n    deployments:\n      - {name: iris, model: iris/model.onnx}\n";
    let config =
        sluice_config::parse(text, &models_dir().join("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(Duration::from_secs(60)).await);
    let (addr, ready, infer) = (s.http_addr(), url(&s, "/v2/health/ready"), url(&s, "/v2/models/iris/infer"));
    let body = serde_json::json!({"inputs": expected("iris")["cases"][0]["inputs"]}).to_string();
    let began = Instant::now();
    let shutdown = tokio::spawn(s.shutdown());
    let until = Instant::now() + Duration::from_secs(20);
    while reqwest::get(&ready).await.unwrap().status() != 503 {
        assert!(Instant::now() < until, "still ready after shutdown began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Ray's proxy probe (KubeRay's readiness) says draining at once too.
    let healthz = reqwest::get(url_of(addr, "/-/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 503);
    // Within the delay: a new connection (a fresh client) is accepted and answered.
    let r = reqwest::Client::new().post(&infer).body(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(began.elapsed() < Duration::from_secs(5), "the checks ran within the delay");
    // After it: no longer accepting.
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < until, "still accepting connections after the delay");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(began.elapsed() >= Duration::from_secs(5), "closed before the delay ended");
    shutdown.await.unwrap();
}

fn url_of(addr: std::net::SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}
