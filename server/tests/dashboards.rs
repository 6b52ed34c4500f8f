//! The Grafana dashboard (deploy/grafana/sluice.json) and the Prometheus alert rules
//! (deploy/prometheus/alerts.yaml) name only metrics the server exports: every `sluice_*` name
//! in their queries is in `/metrics` of a server running a canary, a shadow and a multiplexed
//! deployment. The rules also have the shape Prometheus loads (and pass `promtool check rules`
//! where Debian's prometheus package is installed).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::*;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `sluice_...` metric name in a query.
fn names(expr: &str, out: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("sluice_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
}

/// The metric names a Prometheus text exposition holds (histograms with their series suffixes).
fn exported(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        out.insert(name.to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("dash-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::copy(models_dir().join("iris/model.onnx"), dir.join("a/model.onnx")).unwrap();
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\napplications:\n  - name: app\n    deployments:\n      - {{name: iris, model: iris/model.onnx, max_batch_size: 4, canary: {{model: iris/model.onnx, version: \"2\", weight: 50}}, shadow: {{model: iris-v2/model.onnx, version: \"3\"}}}}\n      - {{name: tenants, multiplex: {{path: {}}}}}\n",
        dir.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("d.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(std::time::Duration::from_secs(60)).await);
    let client = reqwest::Client::new();
    let body = serde_json::json!({"inputs": expected("iris")["cases"][0]["inputs"]});
    for _ in 0..20 {
        client.post(url(&s, "/v2/models/iris/infer")).json(&body).send().await.unwrap();
        client
            .post(url(&s, "/v2/models/tenants/infer"))
            .header("serve_multiplexed_model_id", "a")
            .json(&body)
            .send()
            .await
            .unwrap();
    }
    client.post(url(&s, "/v2/models/nope/infer")).json(&body).send().await.unwrap();
    s.controller().rollback("iris", "test").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let metrics = exported(&reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap());

    let mut used = BTreeSet::new();
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(repo().join("deploy/grafana/sluice.json")).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(
        panels.len() >= 10,
        "a dashboard with rate, errors, latency, queue, batch, replicas, canary panels"
    );
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            names(t["expr"].as_str().unwrap(), &mut used);
        }
    }
    let rules_text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yaml")).unwrap();
    let rules: Value = serde_saphyr::from_str(&rules_text).unwrap();
    let group = &rules["groups"][0];
    assert_eq!(group["name"], "sluice");
    let alerts: Vec<&Value> = group["rules"].as_array().unwrap().iter().collect();
    let alert_names: Vec<&str> = alerts.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for wanted in
        ["SluiceNoReadyReplica", "SluiceSheddingLoad", "SluiceHighErrorRate", "SluiceCanaryRolledBack"]
    {
        assert!(alert_names.contains(&wanted), "{wanted} in {alert_names:?}");
    }
    for r in &alerts {
        assert!(r["expr"].is_string() && r["annotations"]["summary"].is_string(), "{r}");
        names(r["expr"].as_str().unwrap(), &mut used);
    }
    let missing: Vec<&String> = used.iter().filter(|n| !metrics.contains(*n)).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}\nexported: {metrics:?}");
    assert!(used.len() >= 12, "{used:?}");

    // Where promtool is installed: the rules parse, and fire on what their unit tests say
    // (deploy/prometheus/alerts_test.yaml: the canary alert fired for every canary, and the
    // no-ready-replica alert for deployments at zero on purpose).
    for args in [&["check", "rules", "alerts.yaml"][..], &["test", "rules", "alerts_test.yaml"]] {
        let Ok(out) = std::process::Command::new("promtool")
            .args(args)
            .current_dir(repo().join("deploy/prometheus"))
            .output()
        else {
            break;
        };
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.shutdown().await;
}

/// Every range in the dashboard's and the rules' queries holds at least four scrapes at
/// Prometheus's default interval (1 m, which the README's scrape config keeps), or is Grafana's
/// `$__rate_interval`: a `rate(...[1m])` held one sample, and two panels stayed empty.
#[test]
fn every_query_range_holds_several_scrapes() {
    let dashboard = std::fs::read_to_string(repo().join("deploy/grafana/sluice.json")).unwrap();
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yaml")).unwrap();
    let mut ranges = 0;
    for (file, text) in [("sluice.json", &dashboard), ("alerts.yaml", &rules)] {
        for piece in text.split('[').skip(1) {
            // A range: `...}[5m]`, `..._total[5m]`, `[$__rate_interval]` (not YAML's lists).
            let Some(range) = piece.split(']').next().filter(|r| {
                r.starts_with(|c: char| c.is_ascii_digit() || c == '$')
                    && r.chars().all(|c| c.is_ascii_alphanumeric() || c == '$' || c == '_')
            }) else {
                continue;
            };
            ranges += 1;
            if range == "$__rate_interval" {
                continue;
            }
            let (n, unit) = range.split_at(range.len() - 1);
            let seconds = n.parse::<u64>().unwrap_or_else(|_| panic!("{file}: range `{range}`"))
                * match unit {
                    "s" => 1,
                    "m" => 60,
                    "h" => 3600,
                    _ => panic!("{file}: range `{range}`"),
                };
            assert!(
                seconds >= 240,
                "{file}: `[{range}]` holds under four scrapes at Prometheus's default 1m"
            );
        }
    }
    assert!(ranges >= 20, "{ranges} ranges found");
}

/// `sluice_canary_rollbacks_total` is at 0 from a deployment's start, before any canary: the
/// rollback alert takes its increase, and a counter first seen at 1 (registered when a canary
/// started, rolled back before the first scrape after) had none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollback_counter_is_at_zero_before_any_canary() {
    sluice_server::runtime::init(None, None).unwrap();
    let text = "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {enabled: false}\napplications:\n  - name: app\n    deployments:\n      - {name: plain, model: iris/model.onnx}\n";
    let config = sluice_config::parse(text, &models_dir().join("d.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "sluice_canary_rollbacks_total{model=\"plain\"} 0"), "{metrics}");
    // Deleted, it leaves (it stayed for good).
    let empty = sluice_config::parse(
        "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {enabled: false}\n",
        &models_dir().join("d.yaml"),
    )
    .unwrap();
    s.controller().apply(&empty).await.unwrap();
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    assert!(!metrics.contains("sluice_canary_rollbacks_total{model=\"plain\"}"), "{metrics}");
    s.shutdown().await;
}
