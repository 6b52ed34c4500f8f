//! The model repository loop against a real server: a version appears in the repository, is
//! loaded only once complete (its ready marker), rolls out as a canary and is promoted by
//! itself; a version that errors is rolled back by itself and never retried; a version that
//! does not load never takes traffic; a repository that goes away leaves what serves alone and
//! says so in status and metrics. (Object storage: tests/repository_s3.rs.)

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const IRIS_BODY: &str =
    r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}"#;

/// Writes `model` version `version` from a fixture's model (or `bytes`), with or without its
/// ready marker.
fn put(repo: &Path, model: &str, version: u32, fixture: Option<&str>, marker: bool) {
    let d = repo.join(model).join(version.to_string());
    std::fs::create_dir_all(&d).unwrap();
    match fixture {
        Some(f) => {
            std::fs::copy(models_dir().join(f).join("model.onnx"), d.join("model.onnx")).map(drop).unwrap()
        }
        None => std::fs::write(d.join("model.onnx"), b"not an onnx model").unwrap(),
    }
    if marker {
        std::fs::write(d.join("READY"), b"").unwrap();
    }
}

struct Env {
    server: sluice_server::Server,
    client: reqwest::Client,
    admin: String,
}

impl Env {
    async fn infer(&self) -> (u16, Value) {
        let url = url(&self.server, "/v2/models/flowers/infer");
        let r = self.client.post(url).body(IRIS_BODY).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self) -> Value {
        self.client
            .get(format!("{}/api/sluice/status", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn events(&self) -> String {
        let s = self.status().await;
        s["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| format!("{}: {}\n", e["deployment"], e["message"]))
            .collect()
    }

    async fn versions(&self) -> Vec<(String, u64)> {
        let s = self.status().await;
        s["applications"]["repository"]["deployments"]["flowers"]["versions"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .map(|v| (v["version"].as_str().unwrap().to_string(), v["weight"].as_u64().unwrap()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends requests until `done` holds (checked after every batch of 20); returns the
    /// versions that answered and the error statuses seen.
    async fn traffic_until<F, Fut>(&self, what: &str, done: F) -> (Vec<String>, Vec<u16>)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let until = Instant::now() + Duration::from_secs(60);
        let (mut versions, mut errors) = (Vec::new(), Vec::new());
        loop {
            for _ in 0..20 {
                let (status, v) = self.infer().await;
                match status {
                    200 => versions.push(v["model_version"].as_str().unwrap().to_string()),
                    s => errors.push(s),
                }
            }
            if done().await {
                return (versions, errors);
            }
            assert!(Instant::now() < until, "{what} never happened; events:\n{}", self.events().await);
        }
    }
}

async fn start(repo: &Path) -> Env {
    start_polling(repo, 0.2).await
}

async fn start_polling(repo: &Path, poll_interval_s: f64) -> Env {
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\n\
         model_repository:\n  path: {}\n  poll_interval_s: {poll_interval_s}\n  rollout: {{canary_weight: 10, \
         step_percent: 45, interval_s: 0.3, min_requests: 5, max_error_rate: 0.05}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let server = sluice_server::start(config, Default::default()).await.unwrap();
    let admin = format!("http://{}", server.admin_addr().unwrap());
    Env { server, client: reqwest::Client::new(), admin }
}

fn fresh_repo(name: &str) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).unwrap();
    repo
}

/// With `version_policy: {latest: 2}`, a promoted canary's old primary stays served by its
/// exact version through the promotion: it was dropped (404) until the next scan loaded it
/// again, cold; with no polling, until a notify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_latest_two_the_old_primary_answers_through_a_promotion() {
    let repo = fresh_repo("repo-latest2");
    put(&repo, "flowers", 1, Some("iris"), true);
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\n\
         model_repository:\n  path: {}\n  poll_interval_s: 0\n  version_policy: {{latest: 2}}\n  \
         rollout: {{canary_weight: 10, step_percent: 45, interval_s: 0.3, min_requests: 5, max_error_rate: 0.05}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let server = sluice_server::start(config, Default::default()).await.unwrap();
    let env = Env {
        admin: format!("http://{}", server.admin_addr().unwrap()),
        server,
        client: reqwest::Client::new(),
    };
    put(&repo, "flowers", 2, Some("iris"), true);
    let r =
        env.client.post(format!("{}/api/sluice/repository/flowers/notify", env.admin)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The status it answers is the status call's: local replicas named by their node.
    let answered: Value = r.json().await.unwrap();
    let replica = &answered["applications"]["repository"]["deployments"]["flowers"]["versions"][0]["replica_details"]
        [0];
    assert!(replica["node_id"].is_string(), "{replica}");
    let (_, errors) = env
        .traffic_until("the promotion of version 2", || async {
            env.versions().await.first() == Some(&("2".to_string(), 100))
        })
        .await;
    assert!(errors.is_empty(), "{errors:?}");
    let exact = url(&env.server, "/v2/models/flowers/versions/1/infer");
    for _ in 0..20 {
        let r = env.client.post(&exact).body(IRIS_BODY).send().await.unwrap();
        assert_eq!(r.status(), 200, "version 1 by its exact version right after the promotion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.versions().await, [("2".to_string(), 100), ("1".to_string(), 0)]);
    env.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_rolls_out_as_a_canary_and_is_promoted_and_a_bad_one_rolls_back() {
    let repo = fresh_repo("repo-loop");
    put(&repo, "flowers", 1, Some("iris"), true);
    let env = start(&repo).await;
    assert_eq!(env.infer().await.1["model_version"], "1");

    // Half-uploaded: model.onnx without its marker is seen and never loaded.
    put(&repo, "flowers", 2, Some("iris"), false);
    let until = Instant::now() + Duration::from_secs(20);
    while env.status().await["repository"]["incomplete"] != serde_json::json!(["flowers/2"]) {
        assert!(Instant::now() < until, "version 2 never listed as incomplete: {}", env.status().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.versions().await, [("1".to_string(), 100)]);
    assert_eq!(env.infer().await.1["model_version"], "1");

    // The marker lands: version 2 starts as a canary at 10 %, steps up and is promoted.
    std::fs::write(repo.join("flowers/2/READY"), b"").unwrap();
    let (versions, errors) = env
        .traffic_until("the promotion of version 2", || async {
            env.versions().await == [("2".to_string(), 100)]
        })
        .await;
    assert!(errors.is_empty(), "no request failed during the rollout: {errors:?}");
    assert!(versions.iter().any(|v| v == "1") && versions.iter().any(|v| v == "2"), "both versions served");
    let events = env.events().await;
    assert!(events.contains("canary version 2 started at 10%"), "{events}");
    assert!(events.contains("rollout: canary at 55%"), "{events}");
    assert!(events.contains("rollout complete: promoted version 2 (was 1)"), "{events}");

    // A version that errors at run time: canary, rolled back by itself, never retried.
    put(&repo, "flowers", 3, Some("broken"), true);
    let r =
        env.client.post(format!("{}/api/sluice/repository/flowers/notify", env.admin)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, errors) = env
        .traffic_until("the rollback of version 3", || async {
            env.status().await["repository"]["rejected"].as_array().is_some_and(|r| !r.is_empty())
                && env.versions().await == [("2".to_string(), 100)]
        })
        .await;
    assert!(!errors.is_empty() && errors.iter().all(|s| *s == 500), "the canary's errors: {errors:?}");
    let events = env.events().await;
    assert!(events.contains("rolled back canary version 3: error rate"), "{events}");
    let rejected = &env.status().await["repository"]["rejected"][0];
    assert_eq!((rejected["model"].as_str(), rejected["version"].as_u64()), (Some("flowers"), Some(3)));
    assert!(rejected["why"].as_str().unwrap().contains("canary rolled back"), "{rejected}");
    for _ in 0..20 {
        assert_eq!(env.infer().await.1["model_version"], "2", "version 3 takes no traffic any more");
    }

    // A version whose model does not load: reported (the notice that asked for it fails,
    // naming why), never takes traffic.
    put(&repo, "flowers", 4, None, true);
    let r =
        env.client.post(format!("{}/api/sluice/repository/flowers/notify", env.admin)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let error = r.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_string();
    assert!(error.starts_with("version 4 of `flowers` was rejected: failed to load"), "{error}");
    let events = env.events().await;
    assert!(events.contains("version 4 never takes traffic"), "{events}");
    assert_eq!(env.versions().await, [("2".to_string(), 100)]);
    let metrics = env.client.get(url(&env.server, "/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"sluice_repository_rejected_versions_total{model="flowers"} 2"#), "{metrics}");

    // notify names what is wrong.
    let r = env.client.post(format!("{}/api/sluice/repository/nope/notify", env.admin)).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "model `nope` is not in the model repository");
    env.server.shutdown().await;
    let _ = std::fs::remove_dir_all(&repo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_repository_keeps_the_versions_serving_and_says_so() {
    let repo = fresh_repo("repo-gone");
    put(&repo, "flowers", 1, Some("iris"), true);
    let env = start(&repo).await;
    let moved = repo.with_extension("moved");
    std::fs::rename(&repo, &moved).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while env.status().await["repository"]["reachable"] != false {
        assert!(Instant::now() < until, "never reported unreachable: {}", env.status().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = env.status().await;
    assert!(st["repository"]["error"].as_str().unwrap().contains(&repo.display().to_string()), "{st}");
    assert_eq!(env.infer().await, (200, env.infer().await.1), "still serving");
    assert_eq!(env.infer().await.1["model_version"], "1");
    let metrics = env.client.get(url(&env.server, "/metrics")).send().await.unwrap().text().await.unwrap();
    let up = format!("sluice_repository_up{{repository=\"{}\"}} 0", repo.display());
    assert!(metrics.contains(&up), "{up} in\n{metrics}");
    assert!(env.events().await.contains("the versions serving keep serving"));
    std::fs::rename(&moved, &repo).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while env.status().await["repository"]["reachable"] != true {
        assert!(Instant::now() < until, "never reachable again: {}", env.status().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env.events().await.contains("answers again"));
    env.server.shutdown().await;
    let _ = std::fs::remove_dir_all(&repo);
}

/// A repository that lists no models for one poll (a volume remounting) unloads nothing; one
/// that lists none for two polls in a row unloads its models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_lists_empty_once_unloads_nothing() {
    let repo = fresh_repo("repo-blink");
    put(&repo, "flowers", 1, Some("iris"), true);
    // Polls far enough apart that the test puts the folder back between two of them.
    let env = start_polling(&repo, 2.0).await;
    assert_eq!(env.infer().await.0, 200);
    let aside = repo.with_extension("aside");
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::create_dir_all(&aside).unwrap();
    let empty_events = |events: &str| events.matches("lists no models").count();

    std::fs::rename(repo.join("flowers"), aside.join("flowers")).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while empty_events(&env.events().await) == 0 {
        assert!(Instant::now() < until, "no empty listing seen: {}", env.events().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.infer().await.0, 200, "unloaded on the first empty listing: {}", env.events().await);
    std::fs::rename(aside.join("flowers"), repo.join("flowers")).unwrap();
    // Two more polls: the model is listed again and nothing changes.
    let scanned = |s: &Value| s["repository"]["last_scan_s"].as_f64().unwrap_or(f64::MAX);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let st = env.status().await;
        if st["repository"]["models"]["flowers"].is_array() && scanned(&st) < 1.0 {
            break;
        }
        assert!(Instant::now() < until, "the model never listed again: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = env.infer().await;
    assert_eq!((status, body["model_version"].as_str()), (200, Some("1")), "{}", env.events().await);
    assert_eq!(env.versions().await, [("1".to_string(), 100)]);

    // Empty for two polls in a row: unloaded.
    std::fs::rename(repo.join("flowers"), aside.join("flowers")).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while env.infer().await.0 != 404 {
        assert!(Instant::now() < until, "never unloaded: {}", env.events().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(empty_events(&env.events().await), 2, "{}", env.events().await);
    env.server.shutdown().await;
    let _ = std::fs::remove_dir_all(&repo);
    let _ = std::fs::remove_dir_all(&aside);
}

/// A model whose weights are in a file beside it (ONNX external data): the weights rewritten in
/// place, the model file untouched, are served after the next scan. The version's key stamped
/// the model file alone, so the change was seen and the copy loaded before kept serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_weights_rewritten_in_place_are_served() {
    let repo = fresh_repo("repo-external");
    let d = repo.join("flowers").join("1");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["model.onnx", "weights.bin"] {
        std::fs::copy(models_dir().join("mlp-external").join(f), d.join(f)).unwrap();
    }
    std::fs::write(d.join("READY"), b"").unwrap();
    let env = start(&repo).await;
    let body = r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}"#;
    let logits = || async {
        let r =
            env.client.post(url(&env.server, "/v2/models/flowers/infer")).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let out = v["outputs"].as_array().unwrap().iter().find(|o| o["name"] == "logits").unwrap().clone();
        out["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()
    };
    assert!(logits().await.iter().any(|&x| x != 0.0), "the fixture's weights answer");
    let size = std::fs::metadata(d.join("weights.bin")).unwrap().len() as usize;
    std::fs::write(d.join("weights.bin"), vec![0u8; size]).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while logits().await != [0.0; 4] {
        assert!(Instant::now() < until, "the new weights never served: {}", env.events().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.server.shutdown().await;
    let _ = std::fs::remove_dir_all(&repo);
}
