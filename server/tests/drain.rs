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
