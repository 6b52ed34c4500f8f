//! Shadow traffic against the real server: copies of the primary's requests go to a candidate;
//! clients only ever get the primary's answers; the candidate's agreement, errors and drops are
//! counted exactly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The candidate takes 64 copies at once: a copy waits for its turn on a busy machine (the
/// test processes share two CPUs), and at 5, the default, the sequential tests' exact counts
/// met drops now and then.
fn config(shadow_model: &str, percent: u32) -> String {
    format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\napplications:\n  - name: app\n    deployments:\n      - {{name: iris, model: iris/model.onnx, max_ongoing_requests: 64, shadow: {{model: {shadow_model}/model.onnx, version: \"2\", percent: {percent}}}}}\n"
    )
}

async fn start(shadow_model: &str, percent: u32) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).unwrap();
    let config = sluice_config::parse(&config(shadow_model, percent), &models_dir().join("s.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(Duration::from_secs(60)).await);
    // The server is ready once the primary is; the candidate's replica may still be warming up
    // (every copy sent to it then is dropped: no free slot), which made the exact counts below
    // depend on how busy the machine was.
    let until = Instant::now() + Duration::from_secs(60);
    while version_two(&s)["ready_replicas"].as_u64() != Some(1) {
        assert!(Instant::now() < until, "the shadow never got ready: {}", version_two(&s));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s
}

fn version_two(s: &sluice_server::Server) -> Value {
    let status = serde_json::to_value(s.controller().status()).unwrap();
    let versions = status["applications"]["app"]["deployments"]["iris"]["versions"].clone();
    versions.as_array().unwrap().iter().find(|v| v["version"] == "2").unwrap().clone()
}

/// The shadow's status entry.
fn shadow(s: &sluice_server::Server) -> Value {
    version_two(s)["shadow"].clone()
}

/// Waits until every copy sent is accounted for (compared, dropped or failed).
async fn settled(s: &sluice_server::Server) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let sh = shadow(s);
        let done = sh["compared"].as_u64().unwrap()
            + sh["dropped"].as_u64().unwrap()
            + sh["errors"].as_u64().unwrap();
        if done == sh["sent"].as_u64().unwrap() {
            return sh;
        }
        assert!(Instant::now() < until, "copies still unaccounted for: {sh}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends every single-row case of iris's expected.json `rounds` times, checking each answer is
/// the primary's (iris), never the shadow's.
async fn send_cases(s: &sluice_server::Server, rounds: usize) -> u64 {
    let cases = expected("iris")["cases"].as_array().unwrap().clone();
    let client = reqwest::Client::new();
    let mut sent = 0;
    for _ in 0..rounds {
        for case in cases.iter().filter(|c| c["inputs"][0]["shape"][0] == 1) {
            let body = serde_json::json!({"inputs": case["inputs"]});
            let r = client.post(url(s, "/v2/models/iris/infer")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let got: Value = r.json().await.unwrap();
            assert_eq!(got["model_version"], "1", "the client gets the primary");
            assert_outputs_match(&got["outputs"], &case["outputs"], 1e-5);
            sent += 1;
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_that_differs_is_compared_and_the_client_gets_the_primary() {
    let s = start("iris-v2", 100).await;
    let n = send_cases(&s, 5).await;
    let sh = settled(&s).await;
    assert_eq!(sh["percent"], 100);
    assert_eq!(
        (sh["sent"].as_u64(), sh["compared"].as_u64(), sh["errors"].as_u64()),
        (Some(n), Some(n), Some(0)),
        "{sh}"
    );
    // iris-v2 answers another class for one of the three rows (see examples/models/*/expected.json).
    assert_eq!(sh["rows"].as_u64(), Some(n));
    let agreement = sh["agreement"].as_f64().unwrap();
    assert!((agreement - 2.0 / 3.0).abs() < 1e-9, "{sh}");
    assert!(sh["max_abs_diff"].as_f64().unwrap() > 0.05, "{sh}");
    assert!(sh["p99_ms"].as_f64().unwrap() > 0.0, "{sh}");
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"sluice_shadow_rows_total{model="iris",version="2",agree="false"}"#),
        "{metrics}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shadow_never_reaches_the_client() {
    let s = start("broken", 100).await;
    let n = send_cases(&s, 4).await;
    let sh = settled(&s).await;
    assert_eq!(
        (sh["sent"].as_u64(), sh["errors"].as_u64(), sh["compared"].as_u64()),
        (Some(n), Some(n), Some(0)),
        "{sh}"
    );
    s.shutdown().await;
}

/// A request the primary refuses too (the client's mistake) says nothing of the candidate: its
/// copy counts as dropped, not as the candidate's error (a client sending bad requests made a
/// good candidate look faulty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_both_refuse_is_not_the_shadows_error() {
    let s = start("iris-v2", 100).await;
    let bad = r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}"#;
    let r = reqwest::Client::new().post(url(&s, "/v2/models/iris/infer")).body(bad).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let sh = settled(&s).await;
    assert_eq!(
        (sh["sent"].as_u64(), sh["errors"].as_u64(), sh["dropped"].as_u64()),
        (Some(1), Some(0), Some(1)),
        "{sh}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_shadow_copies_about_its_share_and_a_busy_one_drops_rather_than_queues() {
    let s = start("iris-v2", 30).await;
    let n = send_cases(&s, 100).await;
    let sh = settled(&s).await;
    let sent = sh["sent"].as_u64().unwrap();
    // 30 % of 300: mean 90, sd ~8; 5 sd either way.
    assert!((50..=130).contains(&sent), "{sent} of {n} copied: {sh}");
    // Under concurrency the shadow's single replica is often busy: what it cannot take now is
    // dropped and counted, every copy is accounted for, and every client still gets a 200.
    let client = reqwest::Client::new();
    let body = serde_json::json!({"inputs": expected("iris")["cases"][0]["inputs"]});
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (client, url, body) = (client.clone(), url(&s, "/v2/models/iris/infer"), body.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                assert_eq!(client.post(&url).json(&body).send().await.unwrap().status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sh = settled(&s).await;
    assert_eq!(sh["errors"], 0, "{sh}");
    s.shutdown().await;
}
