//! The control plane against the real server: a live swap under continuous load with no failed
//! request, a changed built-in step setting swapped in, a canary's traffic share, a promoted
//! canary taking over the pipelines over its deployment, an automatic rollback of an erroring canary, autoscaling
//! up and down, and the admin API's validation and token.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const IRIS_BODY: &str =
    r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

fn config_text(deployments: &str) -> String {
    format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\napplications:\n  - name: app\n    deployments:\n{deployments}"
    )
}

async fn start_with(deployments: &str) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).unwrap();
    let config = sluice_config::parse(&config_text(deployments), &models_dir().join("c.yaml")).unwrap();
    sluice_server::start(config, Default::default()).await.unwrap()
}

async fn apply(s: &sluice_server::Server, deployments: &str) {
    let config = sluice_config::parse(&config_text(deployments), &models_dir().join("c.yaml")).unwrap();
    s.controller().apply(&config).await.unwrap();
}

/// Sends requests from `clients` loops until `stop`; counts successes and failures and which
/// versions answered.
fn load(
    s: &sluice_server::Server,
    model: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    let url = url(s, &format!("/v2/models/{model}/infer"));
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (client, url, stop, ok, failed, versions) =
                (client.clone(), url.clone(), stop.clone(), ok.clone(), failed.clone(), versions.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.post(&url).body(IRIS_BODY).send().await {
                        Ok(r) if r.status().is_success() => {
                            let v: Value = r.json().await.unwrap();
                            versions.lock().unwrap().push(v["model_version"].as_str().unwrap().to_string());
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let v = versions.lock().unwrap().clone();
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed), v)
    })
}

/// `clients` tasks sending one-row requests to the mlp deployment `m` back to back until `stop`,
/// each request asserted to succeed.
fn mlp_load(
    s: &sluice_server::Server,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}).to_string();
    (0..clients)
        .map(|_| {
            let (url, stop, body) = (url(s, "/v2/models/m/infer"), stop.clone(), body.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    assert!(client.post(&url).body(body.clone()).send().await.unwrap().status().is_success());
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_swap_under_load_fails_no_request() {
    let s = start_with("      - {name: m, model: iris/model.onnx, num_replicas: 2}\n").await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&s, "m", 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new model version: new replicas load and warm, traffic moves, old ones drain.
    apply(&s, "      - {name: m, model: iris/model.onnx, version: \"2\", num_replicas: 2}\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, versions) = traffic.await.unwrap();
    assert_eq!(failed, 0, "{ok} succeeded");
    assert!(versions.iter().any(|v| v == "1") && versions.iter().any(|v| v == "2"));
    assert_eq!(versions.last().unwrap(), "2", "traffic moved to the new version");
    let status = serde_json::to_value(s.controller().status()).unwrap();
    assert!(status["events"].to_string().contains("swapped in"), "{status}");
    // A new version with fewer replicas runs the config's count, not the old one's.
    apply(&s, "      - {name: m, model: iris/model.onnx, version: \"3\", num_replicas: 1}\n").await;
    let m = |s: &sluice_server::Server| {
        let d = s.routes().resolve("m", None).unwrap().deployment().unwrap().clone();
        (d.version().to_string(), d.replica_count())
    };
    assert_eq!(m(&s), ("3".into(), 1));
    // Autoscaled: the old count, within the new bounds.
    apply(&s, "      - {name: m, model: iris/model.onnx, version: \"4\", num_replicas: 3}\n").await;
    apply(
        &s,
        "      - {name: m, model: iris/model.onnx, version: \"5\", num_replicas: auto, autoscaling_config: {min_replicas: 1, max_replicas: 2}}\n",
    )
    .await;
    assert_eq!(m(&s), ("5".into(), 2));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_builtin_step_setting_swaps_in() {
    let s = start_with("      - {name: top, builtin: {top_k: {k: 1}}}\n").await;
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.7, 0.2, 0.0]}], "outputs": [{"name": "index"}]}).to_string();
    let top = |s: &sluice_server::Server| {
        let (url, body) = (url(s, "/v2/models/top/infer"), body.clone());
        async move {
            let r = reqwest::Client::new().post(url).body(body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            (v["outputs"][0]["shape"].clone(), v["outputs"][0]["data"].clone())
        }
    };
    assert_eq!(top(&s).await, (json!([1, 1]), json!([1])));
    // Only the step's setting changes: the same version, now with k = 3.
    apply(&s, "      - {name: top, builtin: {top_k: {k: 3}}}\n").await;
    assert_eq!(top(&s).await, (json!([1, 3]), json!([1, 2, 0])), "the new setting serves");
    let status = serde_json::to_value(s.controller().status()).unwrap();
    assert!(
        status["events"].to_string().contains("new model or settings: version 1 warmed up and swapped in"),
        "{status}"
    );
    s.shutdown().await;
}

/// The version that answered one iris request, optionally pinned by header.
async fn answered_by(client: &reqwest::Client, url: &str, pin: Option<&str>) -> String {
    let mut req = client.post(url).body(IRIS_BODY);
    if let Some(v) = pin {
        req = req.header("x-sluice-version", v);
    }
    let v: Value = req.send().await.unwrap().json().await.unwrap();
    v["model_version"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_at_ten_percent_gets_ten_percent_and_pins_work() {
    let s = start_with(
        "      - {name: m, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 10}}\n",
    )
    .await;
    let client = reqwest::Client::new();
    let total = 5000;
    let canary = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (client, url, canary) = (client.clone(), url(&s, "/v2/models/m/infer"), canary.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / 16 {
                let v: Value = client.post(&url).body(IRIS_BODY).send().await.unwrap().json().await.unwrap();
                if v["model_version"] == "2" {
                    canary.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let share = canary.load(Ordering::Relaxed) as f64 / (total / 16 * 16) as f64;
    assert!((share - 0.10).abs() <= 0.02, "canary share {share:.3}");
    // A header pins a version; the version path addresses one exactly.
    for _ in 0..20 {
        assert_eq!(answered_by(&client, &url(&s, "/v2/models/m/infer"), Some("2")).await, "2");
        assert_eq!(answered_by(&client, &url(&s, "/v2/models/m/versions/1/infer"), None).await, "1");
    }
    // Weights change through the controller (the admin API and `sluice rollout` call it).
    s.controller().set_weight("m", 0).await.unwrap();
    for _ in 0..50 {
        assert_eq!(answered_by(&client, &url(&s, "/v2/models/m/infer"), None).await, "1");
    }
    s.shutdown().await;
}

/// Promoting a canary moves the pipelines over its deployment to the new version (they kept
/// the old one, which drains and stops), and a canary a pipeline cannot use (another model's
/// tensors) is refused, the pipeline and the primary left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoting_a_canary_moves_the_pipelines_over_it() {
    let s = start_with(concat!(
        "      - {name: m, model: iris/model.onnx, canary: {model: iris-v2/model.onnx, version: \"2\", weight: 0}}\n",
        "      - {name: n, model: iris/model.onnx, canary: {model: mlp/model.onnx, version: \"2\", weight: 0}}\n",
        "    pipeline:\n",
        "      name: both\n",
        "      inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\n",
        "      steps:\n",
        "        - {name: a, deployment: m, inputs: {input: x}, outputs: {probabilities: pm}}\n",
        "        - {name: b, deployment: n, inputs: {input: x}, outputs: {probabilities: pn}}\n",
        "      outputs: [pm, pn]\n",
    ))
    .await;
    let client = reqwest::Client::new();
    let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;
    let first_probability = |v: &Value, output: usize| v["outputs"][output]["data"][0].as_f64().unwrap();
    let infer = || async {
        let r = client.post(url(&s, "/v2/models/both/infer")).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    // iris answers 0.985 for the first class of this row, iris-v2 0.784.
    let before = infer().await;
    assert!((first_probability(&before, 0) - 0.985).abs() < 1e-3, "{before}");

    let refused = s.controller().promote("n").await;
    assert!(refused.is_err(), "mlp's tensors do not fit the pipeline's step");
    let status = serde_json::to_value(s.controller().status()).unwrap();
    let n = &status["applications"]["app"]["deployments"]["n"]["versions"];
    assert_eq!(n.as_array().map(Vec::len), Some(2), "the canary is kept: {status}");

    s.controller().promote("m").await.unwrap();
    let after = infer().await;
    assert!(
        (first_probability(&after, 0) - 0.784).abs() < 1e-3,
        "the pipeline runs the promoted version: {after}"
    );
    assert!((first_probability(&after, 1) - 0.985).abs() < 1e-3, "{after}");
    assert_eq!(answered_by(&client, &url(&s, "/v2/models/m/infer"), None).await, "2");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erroring_canary_is_rolled_back_automatically() {
    let s = start_with(concat!(
        "      - name: m\n",
        "        model: iris/model.onnx\n",
        "        canary:\n",
        "          model: broken/model.onnx\n",
        "          version: \"2\"\n",
        "          weight: 30\n",
        "          rollout: {step_percent: 10, interval_s: 0.3, max_error_rate: 0.05, min_requests: 5}\n",
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&s, "m", 4, stop.clone());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let status = serde_json::to_value(s.controller().status()).unwrap();
        if status["events"].to_string().contains("rolled back canary version 2: error rate") {
            break;
        }
        assert!(Instant::now() < until, "no rollback: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // After the rollback, every request succeeds.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let (_, failed_during, _) = traffic.await.unwrap();
    assert!(failed_during > 0, "the canary did fail requests before the rollback");
    let stop = Arc::new(AtomicBool::new(false));
    let after = load(&s, "m", 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, _) = after.await.unwrap();
    assert_eq!(failed, 0, "{ok} succeeded after the rollback");
    let status = serde_json::to_value(s.controller().status()).unwrap();
    assert_eq!(status["applications"]["app"]["deployments"]["m"]["versions"][1]["weight"], 0, "{status}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_adds_a_replica_under_load_and_removes_it_after() {
    let s = start_with(concat!(
        "      - name: m\n",
        "        model: mlp/model.onnx\n",
        "        num_replicas: auto\n",
        "        autoscaling_config: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, upscale_delay_s: 0,\n",
        "          downscale_delay_s: 0.5, metrics_interval_s: 0.05, look_back_period_s: 0.2}\n",
    ))
    .await;
    let replicas = |s: &sluice_server::Server| {
        s.routes().resolve("m", None).unwrap().deployment().unwrap().replica_count()
    };
    assert_eq!(replicas(&s), 1);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = mlp_load(&s, 12, stop.clone());
    let until = Instant::now() + Duration::from_secs(10);
    while replicas(&s) < 2 {
        assert!(
            Instant::now() < until,
            "no scale-up: {}",
            serde_json::to_value(s.controller().status()).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // The replica count drops when the extra replica leaves the routing set; the event is
    // recorded once it has drained, so wait for both.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let status = serde_json::to_value(s.controller().status()).unwrap();
        if replicas(&s) == 1 && status["events"].to_string().contains("autoscaled from 2 to 1") {
            assert!(status["events"].to_string().contains("autoscaled from 1 to 2"), "{status}");
            break;
        }
        assert!(Instant::now() < until, "no scale-down: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The removed replica's series leaves /metrics (each scale-up added one under a new id,
    // and they piled up at 0 for as long as the version served).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
        let series = text.lines().filter(|l| l.starts_with(r#"sluice_replica_in_flight{model="m""#)).count();
        if series == 1 {
            break;
        }
        assert!(Instant::now() < until, "{series} in-flight series for one replica: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.shutdown().await;
}

/// Requests a proxy on another node holds (`proxy_location: EveryNode`, reported through the
/// admin API's `POST /api/sluice/demand`) scale a deployment as the head's own do: from zero at
/// once, up beyond one, and back down once the proxy reports nothing. The proxies' queues were
/// invisible, so a request sent to a worker's proxy for a deployment at zero waited for its
/// deadline (504) and no load through proxies ever grew a deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_reported_by_proxies_scales_a_deployment() {
    let s = start_with(concat!(
        "      - name: far\n",
        "        model: mlp/model.onnx\n",
        "        num_replicas: auto\n",
        "        ray_actor_options: {num_cpus: 0}\n",
        "        autoscaling_config: {min_replicas: 0, max_replicas: 3, target_ongoing_requests: 1, upscale_delay_s: 0,\n",
        "          downscale_delay_s: 0.3, metrics_interval_s: 0.05, look_back_period_s: 0.2}\n",
    ))
    .await;
    let replicas = |s: &sluice_server::Server| {
        s.routes().resolve("far", None).unwrap().deployment().unwrap().replica_count()
    };
    let demand = format!("http://{}/api/sluice/demand", s.admin_addr().unwrap());
    let report = |in_system: u64, queued: u64| {
        let versions = if in_system == 0 {
            json!([])
        } else {
            json!([{"model": "far", "version": "1", "in_system": in_system, "queued": queued}])
        };
        let body = json!({"proxy": "10.0.0.9:8000", "versions": versions});
        let demand = demand.clone();
        async move {
            let r = reqwest::Client::new().post(demand).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        }
    };
    let wait_for = |want: usize, what: &'static str| {
        let s = &s;
        async move {
            let until = Instant::now() + Duration::from_secs(20);
            while replicas(s) != want {
                assert!(
                    Instant::now() < until,
                    "{what}: {}",
                    serde_json::to_value(s.controller().status()).unwrap()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(replicas(&s), 0);
    // A request waits at a proxy: one replica, with no request at the head.
    report(1, 1).await;
    wait_for(1, "a request waiting at a proxy started no replica").await;
    // Three in flight there (reported again and again, as a proxy does with each poll): three.
    let until = Instant::now() + Duration::from_secs(20);
    while replicas(&s) < 3 {
        assert!(
            Instant::now() < until,
            "no scale-up: {}",
            serde_json::to_value(s.controller().status()).unwrap()
        );
        report(3, 0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The proxy holds nothing now: back to zero.
    report(0, 0).await;
    wait_for(0, "no scale-down").await;
    // A malformed report is refused, naming what it must be.
    let r = reqwest::Client::new().post(&demand).body("{\"proxy\": 1}").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("versions"));
    s.shutdown().await;
}

/// A fixed replica count raised where the new replica fails to load: the deployment says so
/// (UNHEALTHY, why) while it has fewer replicas than its config's count, and the count is tried
/// again until it is reached. It read HEALTHY with fewer replicas, never tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_count_that_failed_to_load_is_shown_and_tried_again() {
    use sluice_deployments::{
        Backend, DataType, InferError, LoadError, ModelMetadata, NamedTensor, TensorSpec,
    };
    struct Echo(ModelMetadata);
    impl Backend for Echo {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }
        fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
            Ok(inputs)
        }
    }
    let failing = Arc::new(AtomicBool::new(false));
    let fail = failing.clone();
    sluice_deployments::register_step(
        "flaky-load",
        Arc::new(move || {
            if fail.load(Ordering::SeqCst) {
                return Err(LoadError::Step("out of memory (the test's)".into()));
            }
            let x = TensorSpec { name: "x".into(), dtype: DataType::Fp32, shape: vec![-1] };
            let meta = ModelMetadata { platform: "test".into(), inputs: vec![x.clone()], outputs: vec![x] };
            Ok(Box::new(Echo(meta)) as Box<dyn Backend>)
        }),
    );
    let text = |n: u32| {
        format!(
            "      - {{name: flaky, builtin: {{custom: {{name: flaky-load}}}}, num_replicas: {n}, ray_actor_options: {{num_cpus: 0}}}}\n"
        )
    };
    let s = start_with(&text(1)).await;
    let status = |s: &sluice_server::Server| {
        let v = serde_json::to_value(s.controller().status()).unwrap();
        v["applications"]["app"]["deployments"]["flaky"].clone()
    };
    failing.store(true, Ordering::SeqCst);
    apply(&s, &text(2)).await;
    let d = status(&s);
    assert_eq!(d["status"], "UNHEALTHY", "{d}");
    let message = d["message"].as_str().unwrap();
    assert!(message.contains("1 of 2 replicas") && message.contains("out of memory (the test's)"), "{d}");
    failing.store(false, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(30);
    while status(&s)["versions"][0]["replicas"] != 2 || status(&s)["status"] != "HEALTHY" {
        assert!(
            Instant::now() < until,
            "not tried again: {}",
            serde_json::to_value(s.controller().status()).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = serde_json::to_value(s.controller().status()).unwrap()["events"].to_string();
    assert!(events.contains("scaled again from 1 to 2 replicas"), "{events}");
    s.shutdown().await;
}

/// A canary promoted while the autoscaler has grown the primary takes the primary's replica
/// count first: it was promoted at the one replica it started with, and that one took all of
/// the traffic the primary's three were serving, while they drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_canary_takes_the_autoscaled_primarys_replica_count() {
    let s = start_with(concat!(
        "      - name: m\n",
        "        model: mlp/model.onnx\n",
        "        num_replicas: auto\n",
        "        ray_actor_options: {num_cpus: 0}\n",
        "        autoscaling_config: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 0.2, upscale_delay_s: 0,\n",
        "          downscale_delay_s: 600, metrics_interval_s: 0.05, look_back_period_s: 0.2}\n",
        "        canary: {model: mlp/model.onnx, version: \"2\", weight: 0}\n",
    ))
    .await;
    let replicas = |version: usize| {
        let status = serde_json::to_value(s.controller().status()).unwrap();
        status["applications"]["app"]["deployments"]["m"]["versions"][version]["replicas"].as_u64().unwrap()
    };
    assert_eq!((replicas(0), replicas(1)), (1, 1));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = mlp_load(&s, 12, stop.clone());
    let until = Instant::now() + Duration::from_secs(20);
    while replicas(0) < 3 {
        assert!(
            Instant::now() < until,
            "no scale-up: {}",
            serde_json::to_value(s.controller().status()).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    s.controller().promote("m").await.unwrap();
    let status = serde_json::to_value(s.controller().status()).unwrap();
    let m = &status["applications"]["app"]["deployments"]["m"]["versions"][0];
    assert_eq!((m["version"].as_str(), m["replicas"].as_u64()), (Some("2"), Some(3)), "{status}");
    assert!(status["events"].to_string().contains("canary version 2 grown from 1 to 3 replicas"), "{status}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_validates_authenticates_and_deletes() {
    sluice_server::runtime::init(None, None).unwrap();
    let text = config_text("      - {name: m, model: iris/model.onnx}\n");
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let options = sluice_server::StartOptions { admin_token: Some("s3cret".into()), ..Default::default() };
    let s = sluice_server::start(config, options).await.unwrap();
    let admin = format!("http://{}/api/serve/applications", s.admin_addr().unwrap());
    let sluice_status = format!("http://{}/api/sluice/status", s.admin_addr().unwrap());
    let client = reqwest::Client::new();
    let r = client.get(&sluice_status).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"sluice\"", "a 401 names its scheme");
    assert_eq!(client.get(&admin).bearer_auth("wrong").send().await.unwrap().status(), 401, "wrong token");
    // A health probe needs no token (KubeRay's and Kubernetes' probes carry none).
    let healthz = format!("http://{}/-/healthz", s.admin_addr().unwrap());
    let r = client.get(&healthz).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.text().await.unwrap().as_str()), (200, "ok"));
    assert_eq!(client.post(&healthz).send().await.unwrap().status(), 401, "only its GET");
    // KubeRay sends the token in its own header.
    let r = client.get(&admin).header("x-ray-authorization", "Bearer s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let status: Value =
        client.get(&sluice_status).bearer_auth("s3cret").send().await.unwrap().json().await.unwrap();
    assert_eq!(status["applications"]["app"]["deployments"]["m"]["versions"][0]["version"], "1");
    // A config that fails validation changes nothing and lists every error.
    let bad = "applications:\n  - name: app\n    deployments:\n      - {name: m, model: nope.onnx, num_replicas: 0}\n";
    let r = client
        .put(&admin)
        .bearer_auth("s3cret")
        .header("x-sluice-base-dir", models_dir().display().to_string())
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"].as_array().unwrap().len(), 2, "{body}");
    // Located in the body sent, not in a file that does not exist.
    let first = body["errors"][0].as_str().unwrap();
    assert!(first.starts_with("request body:4:"), "{body}");
    // An empty document is refused, not read as "no applications".
    for empty in ["", "# only a comment\n", "{}", "http_options: {port: 1}\n"] {
        let r = client.put(&admin).bearer_auth("s3cret").body(empty).send().await.unwrap();
        assert_eq!(r.status(), 400, "{empty:?}");
        assert!(r.text().await.unwrap().contains("names no `applications`"), "{empty:?}");
    }
    assert!(
        reqwest::Client::new()
            .post(url(&s, "/v2/models/m/infer"))
            .body(IRIS_BODY)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    // A good one is applied: a second model appears.
    let good = "applications:\n  - name: app\n    deployments:\n      - {name: m, model: iris/model.onnx}\n      - {name: n, model: mlp/model.onnx}\n";
    let r = client
        .put(&admin)
        .bearer_auth("s3cret")
        .header("x-sluice-base-dir", models_dir().display().to_string())
        .body(good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(s.routes().resolve("n", None).is_ok());
    // Its server settings (here the defaults, not the ports the server started on) are named
    // as applying at the next start.
    let answer: Value = r.json().await.unwrap();
    let ignored = answer["ignored"].to_string();
    assert!(
        ignored.contains("http_options: a server setting, read at start")
            && ignored.contains("admin_options"),
        "{answer}"
    );
    // The same server settings as at start: nothing to name.
    let same =
        config_text("      - {name: m, model: iris/model.onnx}\n      - {name: n, model: mlp/model.onnx}\n");
    let r = client
        .put(&admin)
        .bearer_auth("s3cret")
        .header("x-sluice-base-dir", models_dir().display().to_string())
        .body(same)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert!(answer.get("ignored").is_none(), "{answer}");
    // Delete the application: its models are gone.
    let r = client.delete(format!("{admin}/app")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(s.routes().resolve("m", None).is_err());
    let r = client.delete(format!("{admin}/nope")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown application `nope`");
    // An unknown deployment is 404 on every rollout endpoint too, not 400.
    let base = admin.replace("/applications", "/deployments/nope");
    for (path, body) in [("canary", r#"{"weight": 5}"#), ("promote", ""), ("rollback", "")] {
        let r = client.post(format!("{base}/{path}")).bearer_auth("s3cret").body(body).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown deployment `nope`", "{path}");
    }
    s.shutdown().await;
}

/// An empty model repository folder of this test process, `name` in the test target folder.
fn empty_repository(name: &str) -> std::path::PathBuf {
    let repo =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    repo
}

/// Version `version` of `model` in `repo`: the model file of fixture `fixture`, complete.
fn put_version(repo: &std::path::Path, model: &str, version: u32, fixture: &str) {
    let d = repo.join(model).join(version.to_string());
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(models_dir().join(fixture).join("model.onnx"), d.join("model.onnx")).unwrap();
    std::fs::write(d.join("READY"), b"").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_repository_is_polled_and_loads_and_unloads() {
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo");
    let put = |model: &str, version: u32, fixture: &str| put_version(&repo, model, version, fixture);
    put("flowers", 1, "iris");
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\nmodel_repository: {{path: {}, poll_interval_s: 0.1}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let client = reqwest::Client::new();
    let infer = |s: &sluice_server::Server| {
        let (client, url) = (client.clone(), url(s, "/v2/models/flowers/infer"));
        async move {
            let r = client.post(url).body(IRIS_BODY).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(infer(&s).await.1["model_version"], "1");
    // A new version appears: the poll swaps it in (latest 1 by default).
    put("flowers", 2, "iris");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = infer(&s).await;
        assert!(status.is_success(), "{v}");
        if v["model_version"] == "2" {
            break;
        }
        assert!(Instant::now() < until, "version 2 never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Unload through the Triton-style endpoint: gone, listed as unavailable.
    let r = client.post(url(&s, "/v2/repository/models/flowers/unload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(infer(&s).await.0, 404);
    let index: Value =
        client.post(url(&s, "/v2/repository/index")).send().await.unwrap().json().await.unwrap();
    assert!(
        index.to_string().contains(r#""name":"flowers","reason":"unloaded","state":"UNAVAILABLE""#),
        "{index}"
    );
    // Asked again (a retry): done already, not an error.
    let r = client.post(url(&s, "/v2/repository/models/flowers/unload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = client.post(url(&s, "/v2/repository/models/nope/unload")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // A load that carries a config or files (Triton's override) is refused, not answered OK.
    let body = r#"{"parameters": {"config": "{\"max_batch_size\": 8}"}}"#;
    let r = client.post(url(&s, "/v2/repository/models/flowers/load")).body(body).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"].as_str().unwrap().contains("load parameter `config` is not supported"), "{v}");
    assert_eq!(infer(&s).await.0, 404, "not loaded");
    // Load it back.
    let r = client.post(url(&s, "/v2/repository/models/flowers/load")).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(infer(&s).await.1["model_version"], "2");
    let r = client.post(url(&s, "/v2/repository/models/nope/load")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    s.shutdown().await;
}

/// Repository load and unload on a loopback inference port without a token (the default)
/// refuse what a web page could make the user's browser send, as the admin API does: a call
/// from a page of another origin (a form posted to localhost unloaded the models), and one by a
/// host name that is not loopback's (DNS rebinding). 403 naming why; the server's own clients
/// (no `Origin`, a loopback name) are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_control_refuses_what_a_web_page_could_send() {
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo-browser");
    put_version(&repo, "flowers", 1, "iris");
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\nmodel_repository: {{path: {}, poll_interval_s: 0}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let client = reqwest::Client::new();
    let unload = url(&s, "/v2/repository/models/flowers/unload");
    let refused = |r: reqwest::Response| async move {
        assert_eq!(r.status(), 403);
        r.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_string()
    };
    let e =
        refused(client.post(&unload).header("Origin", "https://evil.example").send().await.unwrap()).await;
    assert!(e.contains("a call from another origin (`https://evil.example`) is refused"), "{e}");
    let e = refused(client.post(&unload).header("Host", "rebound.example:8000").send().await.unwrap()).await;
    assert!(e.contains("host `rebound.example:8000` refused"), "{e}");
    let infer = || client.post(url(&s, "/v2/models/flowers/infer")).body(IRIS_BODY).send();
    assert_eq!(infer().await.unwrap().status(), 200, "still served");
    let same_origin = format!("http://{}", s.http_addr());
    let r = client.post(&unload).header("Origin", same_origin).send().await.unwrap();
    assert_eq!(r.status(), 200, "a page of the server's own origin");
    assert_eq!(infer().await.unwrap().status(), 404);
    s.shutdown().await;
}

/// With an admin token set, repository load and unload on the inference ports need it too
/// (REST `Authorization: Bearer`, gRPC metadata `authorization`): they change what serves, and
/// any inference client could unload every repository model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_load_and_unload_need_the_admin_token_when_one_is_set() {
    use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    use sluice_proto::inference::{RepositoryModelLoadRequest, RepositoryModelUnloadRequest};
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo-token");
    put_version(&repo, "flowers", 1, "iris");
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{port: 0}}\nadmin_options: {{port: 0}}\nmodel_repository: {{path: {}, poll_interval_s: 0}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let options = sluice_server::StartOptions { admin_token: Some("s3cret".into()), ..Default::default() };
    let s = sluice_server::start(config, options).await.unwrap();
    let client = reqwest::Client::new();
    let unload = url(&s, "/v2/repository/models/flowers/unload");
    for token in [None, Some("Bearer wrong")] {
        let mut r = client.post(&unload);
        if let Some(t) = token {
            r = r.header("Authorization", t);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert!(v["error"].as_str().unwrap().contains("needs the admin token"), "{v}");
    }
    let infer = || client.post(url(&s, "/v2/models/flowers/infer")).body(IRIS_BODY).send();
    assert_eq!(infer().await.unwrap().status(), 200, "still served");
    let r = client.post(&unload).header("Authorization", "Bearer s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(infer().await.unwrap().status(), 404);

    let mut grpc =
        GrpcInferenceServiceClient::connect(format!("http://{}", s.grpc_addr().unwrap())).await.unwrap();
    let load = || RepositoryModelLoadRequest { model_name: "flowers".into(), ..Default::default() };
    let e = grpc.repository_model_load(load()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut req = tonic::Request::new(load());
    req.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    grpc.repository_model_load(req).await.unwrap();
    assert_eq!(infer().await.unwrap().status(), 200, "loaded again");
    // gRPC: files to load with are refused.
    let mut with_file = load();
    with_file.parameters.insert("file:1/model.onnx".into(), Default::default());
    let mut req = tonic::Request::new(with_file);
    req.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    let e = grpc.repository_model_load(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("`file:1/model.onnx` is not supported"), "{e:?}");
    let unload = RepositoryModelUnloadRequest { model_name: "flowers".into(), ..Default::default() };
    let e = grpc.repository_model_unload(unload).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // Reading stays open: the index, as /v2/models.
    let r = client.post(url(&s, "/v2/repository/index")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

/// What happens to a canary at run time stays when something reconciles the config again (a
/// repository change, the same config applied again): a rollback's weight 0 is not put back
/// to the config's weight, and a promoted version stays the primary (the old one was started
/// again as the primary, the promoted one as a new canary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_and_a_promote_survive_a_later_reconcile() {
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo-canary");
    put_version(&repo, "flowers", 1, "iris");
    let text = format!(
        "{}model_repository: {{path: {}, poll_interval_s: 0}}\n",
        config_text(
            "      - {name: m, model: iris/model.onnx, canary: {model: iris-v2/model.onnx, version: \"2\", weight: 10}}\n"
        ),
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let s = sluice_server::start(config.clone(), Default::default()).await.unwrap();
    let versions = |s: &sluice_server::Server| {
        let status = serde_json::to_value(s.controller().status()).unwrap();
        let list = status["applications"]["app"]["deployments"]["m"]["versions"].as_array().unwrap().clone();
        list.iter()
            .map(|v| (v["version"].as_str().unwrap().to_string(), v["weight"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(versions(&s), [("1".to_string(), 90), ("2".to_string(), 10)]);
    s.controller().rollback("m", "by the test").await.unwrap();
    put_version(&repo, "flowers", 2, "iris");
    s.controller().notify_repository("flowers").await.unwrap();
    assert_eq!(versions(&s), [("1".to_string(), 100), ("2".to_string(), 0)], "after a repository change");
    s.controller().apply(&config).await.unwrap();
    assert_eq!(versions(&s), [("1".to_string(), 100), ("2".to_string(), 0)], "after the same config again");

    s.controller().promote("m").await.unwrap();
    put_version(&repo, "flowers", 3, "iris");
    s.controller().notify_repository("flowers").await.unwrap();
    assert_eq!(versions(&s), [("2".to_string(), 100)], "the promoted version stays the primary");
    let client = reqwest::Client::new();
    assert_eq!(answered_by(&client, &url(&s, "/v2/models/m/infer"), None).await, "2");
    s.shutdown().await;
}

/// A deploy whose client goes away while its models load (a Ctrl-C, a client timeout) still
/// runs to its end: the application is RUNNING and serves once the load finishes, not left
/// DEPLOYING with the change half made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_whose_client_leaves_runs_to_its_end() {
    let held = common::held::Held::register_load("held-load-deploy");
    let s = start_with("      - {name: m, model: iris/model.onnx}\n").await;
    let admin = format!("http://{}/api/serve/applications", s.admin_addr().unwrap());
    let text = config_text(
        "      - {name: m, model: iris/model.onnx}\n      - {name: slow, builtin: {custom: {name: held-load-deploy}}}\n",
    );
    let put = reqwest::Client::new()
        .put(&admin)
        .header(sluice_server::admin::BASE_DIR_HEADER, models_dir().display().to_string())
        .body(text)
        .timeout(Duration::from_secs(30))
        .send();
    let put = tokio::spawn(put);
    held.started().await;
    put.abort();
    let _ = put.await;
    held.release();
    let status = format!("http://{}/api/sluice/status", s.admin_addr().unwrap());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = reqwest::get(&status).await.unwrap().json().await.unwrap();
        if v["applications"]["app"]["status"] == "RUNNING"
            && !v["applications"]["app"]["deployments"]["slow"].is_null()
        {
            break;
        }
        assert!(Instant::now() < until, "the deploy never finished: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .post(url(&s, "/v2/models/slow/infer"))
        .body(common::held::body(0.0, None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the new deployment serves");
    s.shutdown().await;
}

/// Without an admin token, repository load and unload on inference ports reachable beyond
/// loopback are refused (403, `PERMISSION_DENIED`), as the admin API itself would be, unless
/// `admin_options.allow_unauthenticated` says otherwise; inference and the index stay open. A
/// job on Ray, whose admin API listens on the cluster network without a token, keeps them
/// closed (they were open on its inference ports, often exposed beyond the cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_control_beyond_loopback_needs_a_token_or_allow_unauthenticated() {
    use sluice_proto::inference::RepositoryModelUnloadRequest;
    use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo-open");
    put_version(&repo, "flowers", 1, "iris");
    for (allow, on_ray) in [(false, false), (true, false), (false, true)] {
        let admin_host = if on_ray { "0.0.0.0" } else { "127.0.0.1" };
        let text = format!(
            "http_options: {{host: 0.0.0.0, port: 0}}\ngrpc_options: {{host: 0.0.0.0, port: 0}}\nadmin_options: {{host: {admin_host}, port: 0, allow_unauthenticated: {allow}}}\nmodel_repository: {{path: {}, poll_interval_s: 0}}\n",
            repo.display()
        );
        let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
        let options = sluice_server::StartOptions { admin_open_on_cluster: on_ray, ..Default::default() };
        let s = sluice_server::start(config, options).await.unwrap();
        let client = reqwest::Client::new();
        let local = |path: &str| format!("http://127.0.0.1:{}{path}", s.http_addr().port());
        let infer = || client.post(local("/v2/models/flowers/infer")).body(IRIS_BODY).send();
        assert_eq!(infer().await.unwrap().status(), 200);
        let mut grpc = GrpcInferenceServiceClient::connect(format!(
            "http://127.0.0.1:{}",
            s.grpc_addr().unwrap().port()
        ))
        .await
        .unwrap();
        let unload = || RepositoryModelUnloadRequest { model_name: "flowers".into(), ..Default::default() };
        let r = client.post(local("/v2/repository/models/flowers/unload")).send().await.unwrap();
        if allow {
            assert_eq!(r.status(), 200);
            assert_eq!(infer().await.unwrap().status(), 404, "unloaded");
        } else {
            assert_eq!(r.status(), 403);
            let v: Value = r.json().await.unwrap();
            assert!(v["error"].as_str().unwrap().contains("allow_unauthenticated"), "{v}");
            let e = grpc.repository_model_unload(unload()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
            assert_eq!(infer().await.unwrap().status(), 200, "still served");
            assert_eq!(client.post(local("/v2/repository/index")).send().await.unwrap().status(), 200);
        }
        s.shutdown().await;
    }
}

/// A repository model that cannot serve (here: named like a deployment of the config) is
/// refused alone: the server starts, the config's deployment serves, and the other models'
/// new versions still swap in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_repository_model_refused_holds_back_no_other() {
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo-alone");
    let put = |model: &str, version: u32, fixture: &str| put_version(&repo, model, version, fixture);
    put("flowers", 1, "iris");
    put("m", 1, "mlp");
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\nmodel_repository: {{path: {}, poll_interval_s: 0.1}}\napplications:\n  - name: app\n    deployments:\n      - {{name: m, model: iris/model.onnx}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let client = reqwest::Client::new();
    let infer = |model: &str| {
        let (client, url) = (client.clone(), url(&s, &format!("/v2/models/{model}/infer")));
        async move {
            let r = client.post(url).body(IRIS_BODY).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, m) = infer("m").await;
    assert_eq!(status, 200, "the config's `m` (iris) serves: {m}");
    assert_eq!(infer("flowers").await.1["model_version"], "1");
    put("flowers", 2, "iris");
    let until = Instant::now() + Duration::from_secs(10);
    while infer("flowers").await.1["model_version"] != "2" {
        assert!(Instant::now() < until, "version 2 never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The serving version's file rewritten in place, unreadable for a while: the copy loaded
    // before keeps serving (the model was removed: 404 until the file was whole again).
    let file = repo.join("flowers/2/model.onnx");
    std::fs::write(&file, b"half a model").unwrap();
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        let (status, v) = infer("flowers").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["model_version"], "2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::copy(models_dir().join("iris/model.onnx"), &file).unwrap();
    // A model whose only version cannot load: loading it is an error naming why (200 before),
    // and so is a notice about it.
    let bad = repo.join("bad/1");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model.onnx"), b"not a model").unwrap();
    std::fs::write(bad.join("READY"), b"").unwrap();
    let r = client.post(url(&s, "/v2/repository/models/bad/load")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("version 1 of `bad` was rejected"), "{text}");
    let e = s.controller().notify_repository("bad").await.unwrap_err().to_string();
    assert!(e.contains("version 1 of `bad` was rejected"), "{e}");
    // Deleting the repository's application stops the polling: a new version does not bring
    // it back (Ray's `serve shutdown` deletes every application the same way).
    s.controller().delete(Some("repository")).await.unwrap();
    assert_eq!(infer("flowers").await.0, 404);
    put("flowers", 3, "iris");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(infer("flowers").await.0, 404, "the repository came back");
    assert_eq!(infer("m").await.0, 200, "the config's application stays");
    s.shutdown().await;
}

/// Many repository models that cannot load (an ONNX Runtime that dropped an operator, say)
/// are each rejected, and the one that loads serves: eight failures gave the whole apply up,
/// and at start the server did not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_broken_repository_models_hold_back_no_good_one() {
    sluice_server::runtime::init(None, None).unwrap();
    let repo = empty_repository("repo-many-broken");
    put_version(&repo, "good", 1, "iris");
    for k in 0..10 {
        let bad = repo.join(format!("bad{k}/1"));
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("model.onnx"), b"not a model").unwrap();
        std::fs::write(bad.join("READY"), b"").unwrap();
    }
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\nmodel_repository: {{path: {}, poll_interval_s: 0}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let r =
        reqwest::Client::new().post(url(&s, "/v2/models/good/infer")).body(IRIS_BODY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let status = serde_json::to_value(s.controller().status()).unwrap();
    let rejected = status["repository"]["rejected"].as_array().map_or(0, Vec::len);
    assert_eq!(rejected, 10, "{status}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_replicas_and_recent_traffic() {
    let s = start_with("      - {name: m, model: iris/model.onnx, num_replicas: 2}\n").await;
    assert!(s.wait_ready(Duration::from_secs(60)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&s, "m", 2, stop.clone());
    let admin = format!("http://{}/api/sluice/status", s.admin_addr().unwrap());
    let client = reqwest::Client::new();
    // The control loop snapshots counters about once a second: wait for two with requests
    // between them.
    let until = Instant::now() + Duration::from_secs(30);
    let version = loop {
        let status: Value = client.get(&admin).send().await.unwrap().json().await.unwrap();
        let v = status["applications"]["app"]["deployments"]["m"]["versions"][0].clone();
        if v["traffic"]["requests_per_s"].as_f64().is_some_and(|r| r > 0.0) {
            break v;
        }
        assert!(Instant::now() < until, "no traffic reported: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let t = &version["traffic"];
    let (p50, p99) = (t["p50_ms"].as_f64().unwrap(), t["p99_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{t}");
    assert!(t["window_s"].as_f64().unwrap() >= 1.0, "{t}");
    let replicas = version["replica_details"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{version:#}");
    for r in replicas {
        assert_eq!(r["state"], "RUNNING");
        assert_eq!(r["pid"], std::process::id(), "named as this process: {r}");
        assert!(r["node_id"].is_string() && r["node_ip"] == "127.0.0.1", "{r}");
    }
    s.shutdown().await;
}

/// Once a version is swapped out and drained, its series leave `/metrics` (its
/// `sluice_replicas_ready` at 0 fired the shipped no-ready-replica alert for good); the new
/// version's are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_versions_series_leave_the_metrics() {
    let s = start_with("      - {name: retiring, model: iris/model.onnx}\n").await;
    let metrics = || async { reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap() };
    assert!(metrics().await.contains(r#"sluice_replicas_ready{model="retiring",version="1"} 1"#));
    apply(&s, "      - {name: retiring, model: iris/model.onnx, version: \"2\"}\n").await;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = metrics().await;
        if !text.contains(r#"model="retiring",version="1""#) {
            assert!(text.contains(r#"sluice_replicas_ready{model="retiring",version="2"} 1"#), "{text}");
            break;
        }
        assert!(std::time::Instant::now() < until, "version 1's series stay: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.shutdown().await;
}

/// Two replica sets of one (model, version) (a swap at the same version, the old one still
/// serving) each add their own counts to its replica gauges, and take them back when they go:
/// the newer set overwrote the serving one's, and one that went without committing (a failed
/// swap) left its own count behind. Replicas placed elsewhere and not in a set yet (on Ray,
/// starting or waiting for a node) count in `sluice_replicas`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sets_of_one_version_add_to_its_gauges() {
    use sluice_deployments::{Deployment, DeploymentSpec};
    let s = start_with("      - {name: other, builtin: {softmax: {}}}\n").await;
    let read = || async {
        let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{series}{{model=\"shared\",version=\"1\"}} ")))
                .map(str::to_string)
        };
        (value("sluice_replicas_ready"), value("sluice_replicas"))
    };
    let start = |replicas: usize| {
        let settings = sluice_config::ReplicaSettings::default();
        let model = sluice_config::Model::Builtin(sluice_config::Builtin::Softmax {});
        let factory = sluice_deployments::backend_factory(&model, &settings, 1, "shared").unwrap();
        let spec = DeploymentSpec {
            name: "shared".into(),
            version: "1".into(),
            num_replicas: replicas,
            max_replicas: replicas,
            settings,
            wake: Default::default(),
            multiplexed: false,
        };
        Arc::new(Deployment::start(spec, factory).unwrap())
    };
    let serving = start(2);
    assert!(serving.wait_ready(Duration::from_secs(10)).await);
    assert_eq!(read().await, (Some("2".into()), Some("2".into())));
    let swapped_in = start(1);
    assert!(swapped_in.wait_ready(Duration::from_secs(10)).await);
    assert_eq!(read().await, (Some("3".into()), Some("3".into())));
    swapped_in.set_placed_elsewhere(2);
    assert_eq!(read().await, (Some("3".into()), Some("5".into())));
    drop(swapped_in);
    assert_eq!(read().await, (Some("2".into()), Some("2".into())), "the set that went left its counts");
    serving.close();
    assert_eq!(read().await, (Some("0".into()), Some("0".into())));
    s.shutdown().await;
}

/// A deployment swapped for one at the same version (a changed setting) shares its metric
/// series: the old one's replicas stopping leave `sluice_replicas_ready` at the new one's
/// count (they set it to 0, and the no-ready-replica alert fired on a healthy deployment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_version_swap_leaves_the_ready_gauge_at_the_new_count() {
    let s = start_with("      - {name: resized, model: iris/model.onnx, max_batch_size: 4}\n").await;
    let ready_series = r#"sluice_replicas_ready{model="resized",version="1"} "#;
    let gauge = || async {
        let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(ready_series)).map(str::to_string)
    };
    assert_eq!(gauge().await.as_deref(), Some("1"));
    apply(&s, "      - {name: resized, model: iris/model.onnx, max_batch_size: 8}\n").await;
    // The old deployment drains and its replica threads stop (within a second here, on an
    // idle machine): the gauge reads the new count meanwhile, and still after.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while gauge().await.as_deref() != Some("1") {
        assert!(std::time::Instant::now() < until, "the gauge never read the new count: {:?}", gauge().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(gauge().await.as_deref(), Some("1"));
    s.shutdown().await;
}
