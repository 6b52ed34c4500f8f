//! Canaries end to end: an automatic rollout rolled back on p99 (and one within its bound
//! stepping up instead), and the admin API's canary weight, rollback and promote endpoints
//! changing which version answers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const IRIS_BODY: &str =
    r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

fn app_config(deployments: &str) -> sluice_config::Config {
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\napplications:\n  - name: app\n    deployments:\n{deployments}"
    );
    sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap()
}

async fn start_app(deployments: &str) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).unwrap();
    let s = sluice_server::start(app_config(deployments), Default::default()).await.unwrap();
    assert!(s.wait_ready(Duration::from_secs(60)).await);
    s
}

fn status(s: &sluice_server::Server) -> Value {
    serde_json::to_value(s.controller().status()).unwrap()
}

/// The events of `status` as (deployment, message), and the one rollback among them.
fn the_one_rollback(status: &Value) -> (Vec<(String, String)>, (String, String)) {
    let events: Vec<(String, String)> = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["deployment"].as_str().unwrap().into(), e["message"].as_str().unwrap().into()))
        .collect();
    let rolled_back: Vec<&(String, String)> =
        events.iter().filter(|(_, m)| m.contains("rolled back")).collect();
    assert_eq!(rolled_back.len(), 1, "{events:?}");
    let one = rolled_back[0].clone();
    (events, one)
}

/// The version that answered one unpinned iris request to `model`.
async fn answered_by(client: &reqwest::Client, s: &sluice_server::Server, model: &str) -> String {
    let r = client.post(url(s, &format!("/v2/models/{model}/infer"))).body(IRIS_BODY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["model_version"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_whose_p99_breaks_its_bound_is_rolled_back_and_one_within_it_steps_up() {
    // Two healthy canaries: `m` allows a p99 of 1 µs, which no request over HTTP meets; `n`
    // allows a minute. Only the p99 bound can tell them apart.
    let rollout = |p99_ms: &str| {
        format!(
            "        canary:\n          model: iris/model.onnx\n          version: \"2\"\n          weight: 50\n          rollout: {{step_percent: 10, interval_s: 0.2, max_p99_ms: {p99_ms}, min_requests: 5}}\n"
        )
    };
    let s = start_app(&format!(
        "      - name: m\n        model: iris/model.onnx\n{}      - name: n\n        model: iris/model.onnx\n{}",
        rollout("0.001"),
        rollout("60000")
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for model in ["m", "n", "m", "n"] {
        let (stop, failed, infer) =
            (stop.clone(), failed.clone(), url(&s, &format!("/v2/models/{model}/infer")));
        clients.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let ok =
                    client.post(&infer).body(IRIS_BODY).send().await.is_ok_and(|r| r.status().is_success());
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let events = status(&s)["events"].to_string();
        if events.contains("rolled back canary version 2") && events.contains("rollout: canary at 60%") {
            break;
        }
        assert!(Instant::now() < until, "no p99 rollback and step: {events}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "healthy canaries: no request failed");
    let st = status(&s);
    let (events, (who, why)) = the_one_rollback(&st);
    assert_eq!(who, "m");
    assert!(
        why.starts_with("rolled back canary version 2: p99 ")
            && why.ends_with(" ms is above max_p99_ms 0.001 ms"),
        "{why}"
    );
    assert!(events.iter().any(|(d, m)| d == "n" && m == "rollout: canary at 60%"), "{events:?}");
    assert_eq!(st["applications"]["app"]["deployments"]["m"]["versions"][1]["weight"], 0, "{st}");
    // Rolled back: every unpinned request goes to version 1.
    let client = reqwest::Client::new();
    for _ in 0..20 {
        assert_eq!(answered_by(&client, &s, "m").await, "1");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_sets_the_canary_weight_rolls_back_and_promotes() {
    let s = start_app(
        "      - {name: hand, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 0}}\n",
    )
    .await;
    let admin = format!("http://{}/api/serve/deployments/hand", s.admin_addr().unwrap());
    let client = reqwest::Client::new();
    let post = |path: &str, body: &str| client.post(format!("{admin}/{path}")).body(body.to_string()).send();

    // Weight 100: every unpinned request goes to the canary.
    let r = post("canary", r#"{"weight": 100}"#).await.unwrap();
    assert_eq!(r.status(), 200);
    let st: Value = r.json().await.unwrap();
    let versions = &st["applications"]["app"]["deployments"]["hand"]["versions"];
    assert_eq!(
        (versions[1]["version"].clone(), versions[1]["weight"].clone()),
        (json!("2"), json!(100)),
        "{st}"
    );
    for _ in 0..20 {
        assert_eq!(answered_by(&client, &s, "hand").await, "2");
    }
    for (body, message) in [
        (r#"{"weight": 101}"#, "weight is a percent: 0 to 100, got 101"),
        (r#"{"weight": "half"}"#, r#"body must be {"weight": 0..100}"#),
    ] {
        let r = post("canary", body).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], message);
    }

    // Rollback: back to version 1, the canary kept at weight 0.
    let r = post("rollback", "").await.unwrap();
    assert_eq!(r.status(), 200);
    for _ in 0..20 {
        assert_eq!(answered_by(&client, &s, "hand").await, "1");
    }
    assert!(status(&s)["events"].to_string().contains("rolled back canary version 2: rolled back by hand"));
    // Again: nothing changes, and it is counted once (the rollback alert fired again). (The
    // deployment's name is this test's alone: the metrics are the process's under cargo test.)
    let r = post("rollback", "").await.unwrap();
    assert_eq!(r.status(), 200);
    let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l == r#"sluice_canary_rollbacks_total{model="hand"} 1"#), "{text}");
    assert_eq!(status(&s)["events"].to_string().matches("rolled back canary version 2").count(), 1);

    // Promote: version 2 is the only version; version 1 is no longer routed.
    let r = post("promote", "").await.unwrap();
    assert_eq!(r.status(), 200);
    let st: Value = r.json().await.unwrap();
    let versions = st["applications"]["app"]["deployments"]["hand"]["versions"].as_array().unwrap().clone();
    assert_eq!(versions.len(), 1, "{st}");
    assert_eq!(versions[0]["version"], "2");
    for _ in 0..20 {
        assert_eq!(answered_by(&client, &s, "hand").await, "2");
    }
    let r = client.post(url(&s, "/v2/models/hand/versions/1/infer")).body(IRIS_BODY).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(status(&s)["events"].to_string().contains("promoted version 2 (was 1)"));
    // Nothing left to promote or roll back.
    for path in ["promote", "rollback"] {
        let r = post(path, "").await.unwrap();
        assert_eq!(r.status(), 409, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "deployment `hand` has no canary", "{path}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_agreement_gate_rolls_back_a_canary_that_answers_differently_and_steps_up_one_that_agrees() {
    // `a`'s canary is iris-v2, which answers another class for one of iris's three single-row
    // cases; `b`'s canary is the same model as its primary. Neither fails nor is slow: only
    // the shadowed comparison tells them apart.
    let gated = |model: &str| {
        format!(
            "        canary:\n          model: {model}/model.onnx\n          version: \"2\"\n          weight: 10\n          rollout: {{step_percent: 10, interval_s: 0.2, min_requests: 5, min_shadow_agreement: 0.99}}\n"
        )
    };
    let s = start_app(&format!(
        "      - name: a\n        model: iris/model.onnx\n{}      - name: b\n        model: iris/model.onnx\n{}",
        gated("iris-v2"),
        gated("iris")
    ))
    .await;
    let cases: Vec<Value> = expected("iris")["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["inputs"][0]["shape"][0] == 1)
        .map(|c| json!({"inputs": c["inputs"]}))
        .collect();
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    'sending: loop {
        for model in ["a", "b"] {
            for body in &cases {
                let r = client
                    .post(url(&s, &format!("/v2/models/{model}/infer")))
                    .json(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "{model}");
            }
        }
        let events = status(&s)["events"].to_string();
        if events.contains("rolled back canary version 2") && events.contains("rollout: canary at 20%") {
            break 'sending;
        }
        assert!(Instant::now() < until, "no agreement rollback and step: {events}");
    }
    let st = status(&s);
    let (events, (who, why)) = the_one_rollback(&st);
    assert_eq!(who, "a");
    assert!(
        why.starts_with("rolled back canary version 2: shadow agreement ")
            && why.ends_with(" is below min_shadow_agreement 99.0%"),
        "{why}"
    );
    assert!(events.iter().any(|(d, m)| d == "b" && m == "rollout: canary at 20%"), "{events:?}");
    // The gate's comparison shows in the canary's status, as a shadow's does.
    let b = &st["applications"]["app"]["deployments"]["b"]["versions"][1];
    assert!(b["shadow"]["compared"].as_u64().unwrap() >= 5, "{b}");
    assert_eq!(st["applications"]["app"]["deployments"]["a"]["versions"][1]["weight"], 0, "{st}");
    s.shutdown().await;
}

/// `sluice_canary_weight_percent` of `model`'s `version` in `/metrics`, if exported.
async fn canary_weight(s: &sluice_server::Server, model: &str, version: &str) -> Option<f64> {
    let text = reqwest::get(url(s, "/metrics")).await.unwrap().text().await.unwrap();
    let series = format!("sluice_canary_weight_percent{{model=\"{model}\",version=\"{version}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(series.as_str())).map(|v| v.parse().unwrap())
}

/// A canary that is no more reads weight 0 (or, once its version is retired, has no series),
/// as a rolled-back one does: the shipped alerts pick
/// canaries by a weight above 0 (SluiceCanaryErrors), and a promoted version left at its
/// canary weight was judged by the canary's error bound for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_weight_gauge_reads_zero_once_the_canary_is_promoted_or_removed() {
    // Model names no other test here uses: the metrics are the process's.
    let canary = "canary: {model: iris/model.onnx, version: \"2\", weight: 30}";
    let s = start_app(&format!(
        "      - {{name: promoted, model: iris/model.onnx, {canary}}}\n      - {{name: removed, model: iris/model.onnx, {canary}}}\n"
    ))
    .await;
    assert_eq!(canary_weight(&s, "promoted", "2").await, Some(30.0));
    assert_eq!(canary_weight(&s, "removed", "2").await, Some(30.0));

    s.controller().promote("promoted").await.unwrap();
    assert_eq!(canary_weight(&s, "promoted", "2").await, Some(0.0), "version 2 is the primary now");
    assert_eq!(canary_weight(&s, "removed", "2").await, Some(30.0), "another model's canary is kept");

    // The config again, `promoted` as it is now and `removed` without its canary.
    let config = app_config(
        "      - {name: promoted, model: iris/model.onnx, version: \"2\"}\n      - {name: removed, model: iris/model.onnx}\n",
    );
    s.controller().apply(&config).await.unwrap();
    // A removed canary's version is retired: its series reads 0, or is gone once it drained.
    let removed = canary_weight(&s, "removed", "2").await;
    assert!(matches!(removed, None | Some(0.0)), "the canary was removed: {removed:?}");
    assert_eq!(canary_weight(&s, "promoted", "2").await, Some(0.0));
    let st = status(&s);
    for model in ["promoted", "removed"] {
        let versions = st["applications"]["app"]["deployments"][model]["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1, "{model}: {st}");
    }
    s.shutdown().await;
}

/// The weight of canary `version` of `model` in the status.
fn weight_in_status(s: &sluice_server::Server, model: &str, version: &str) -> Option<u64> {
    status(s)["applications"]["app"]["deployments"][model]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["version"] == version)
        .and_then(|v| v["weight"].as_u64())
}

/// A rollout the config adds to a canary already serving starts (it was ignored: the canary's
/// key holds its model, not its rollout, so the same canary kept no rollout), and one the
/// config removes stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_the_config_adds_or_removes_on_a_serving_canary_applies() {
    let plain = "      - {name: ro, model: iris/model.onnx, canary: {model: iris-v2/model.onnx, version: \"2\", weight: 50}}\n";
    let s = start_app(plain).await;
    let rolling = "      - {name: ro, model: iris/model.onnx, canary: {model: iris-v2/model.onnx, version: \"2\", weight: 50, \
                   rollout: {step_percent: 25, interval_s: 0.2, min_requests: 1}}}\n";
    s.controller().apply(&app_config(rolling)).await.unwrap();
    let client = reqwest::Client::new();
    let until = Instant::now() + Duration::from_secs(30);
    while weight_in_status(&s, "ro", "2") == Some(50) {
        assert!(Instant::now() < until, "the rollout never stepped: {}", status(&s)["events"]);
        answered_by(&client, &s, "ro").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(weight_in_status(&s, "ro", "2") >= Some(75), "{}", status(&s)["events"]);
    s.controller().apply(&app_config(plain)).await.unwrap();
    assert!(status(&s)["events"].to_string().contains("canary rollout stopped by the config"));
    let stopped_at = weight_in_status(&s, "ro", "2");
    for _ in 0..20 {
        answered_by(&client, &s, "ro").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(weight_in_status(&s, "ro", "2"), stopped_at, "no rollout steps it any more");
    s.shutdown().await;
}
