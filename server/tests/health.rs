//! Readiness through a server's life, on REST and `grpc.health.v1`: not serving while models
//! load, serving once warm, not serving while a model has no ready replica, serving again when
//! it recovers, and not serving once shutdown starts; a deployment autoscaled to zero keeps the
//! server serving (only the model says it has no replica). And every accepted request ends: a
//! model still running at the request's deadline gets the request answered 504 then.
//!
//! The models are custom steps that wait on a gate the test opens, so nothing here depends on
//! timing: each state is reached by an event and observed through a health Watch stream.

mod common;

use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use common::*;
use serde_json::{Value, json};
use sluice_deployments::{Backend, DataType, InferError, ModelMetadata, NamedTensor, Tensor, TensorSpec};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A gate threads wait on until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    /// Threads that came to the gate.
    came: std::sync::atomic::AtomicUsize,
}

impl Gate {
    fn wait(&self) {
        self.came.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn close(&self) {
        *self.open.lock().unwrap() = false;
    }
}

/// `x` FP32 [-1] → `y` = `x`. Waits on `gate` in every call when `gated`, and panics on a
/// negative first value.
struct Step {
    meta: ModelMetadata,
    gate: Option<Arc<Gate>>,
}

impl Step {
    fn new(gate: Option<Arc<Gate>>) -> Self {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: vec![-1] };
        let meta =
            ModelMetadata { platform: "test".into(), inputs: vec![spec("x")], outputs: vec![spec("y")] };
        Self { meta, gate }
    }
}

impl Backend for Step {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
        if let Some(gate) = &self.gate {
            gate.wait();
        }
        let x = &inputs[0].tensor;
        let first = x.data().get(..4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        assert!(first.is_none_or(|v| v >= 0.0), "told to panic");
        let y = Tensor::new(DataType::Fp32, x.shape().to_vec(), Bytes::copy_from_slice(x.data()))?;
        Ok(vec![NamedTensor { name: "y".into(), tensor: y }])
    }
}

/// Registers step `name`: its factory waits on `load_gate` from its `gated_from`-th call on
/// (0: every call), and its calls wait on `infer_gate`.
fn register(name: &str, load_gate: Option<(Arc<Gate>, usize)>, infer_gate: Option<Arc<Gate>>) {
    let made = Arc::new(Mutex::new(0usize));
    sluice_deployments::register_step(
        name,
        Arc::new(move || {
            let n = std::mem::replace(&mut *made.lock().unwrap(), usize::MAX);
            *made.lock().unwrap() = n.saturating_add(1);
            if let Some((gate, from)) = &load_gate
                && n >= *from
            {
                gate.wait();
            }
            Ok(Box::new(Step::new(infer_gate.clone())) as Box<dyn Backend>)
        }),
    );
}

/// A server started on `config(deployments, top)`, its deployments ready.
async fn ready(deployments: &str, top: &str) -> sluice_server::Server {
    let s = sluice_server::start(config(deployments, top), Default::default()).await.unwrap();
    assert!(s.wait_ready(std::time::Duration::from_secs(60)).await);
    s
}

fn config(deployments: &str, top: &str) -> sluice_config::Config {
    sluice_server::runtime::init(None, None).expect("ONNX Runtime");
    let text = format!(
        "{top}\nhttp_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{port: 0}}\nadmin_options: {{enabled: false}}\n\
         applications:\n  - name: t\n    deployments:\n{deployments}"
    );
    sluice_config::parse(&text, &models_dir().join("t.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

async fn health(addr: std::net::SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    HealthClient::new(channel)
}

async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<ServingStatus, tonic::Code> {
    match client.check(HealthCheckRequest { service: service.into() }).await {
        Ok(r) => Ok(r.into_inner().status()),
        Err(e) => Err(e.code()),
    }
}

/// The next status a Watch stream reports.
async fn next(stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> ServingStatus {
    stream.message().await.unwrap().expect("the stream goes on").status()
}

/// A Watch stream of `service`, once the health follower has named it (it does so just after
/// the server starts).
async fn watch_named(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match client.watch(HealthCheckRequest { service: service.into() }).await {
            Ok(stream) => return stream.into_inner(),
            Err(e) if e.code() == tonic::Code::NotFound && std::time::Instant::now() < until => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("watch {service}: {e}"),
        }
    }
}

async fn get_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    reqwest::get(format!("http://{addr}{path}")).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn health_is_not_serving_while_the_models_load() {
    let gate = Arc::new(Gate::default());
    register("slow_to_load", Some((gate.clone(), 0)), None);
    let starting = sluice_server::bind(
        config("      - {name: late, builtin: {custom: {name: slow_to_load}}}\n", ""),
        Default::default(),
    )
    .await
    .unwrap();
    let (http, grpc) = (starting.http_addr(), starting.grpc_addr().unwrap());
    let load = tokio::spawn(starting.load());
    let mut client = health(grpc).await;
    assert_eq!(check(&mut client, "").await, Ok(ServingStatus::NotServing));
    assert_eq!(check(&mut client, "inference.GRPCInferenceService").await, Ok(ServingStatus::NotServing));
    assert_eq!(get_status(http, "/v2/health/live").await, 200);
    assert_eq!(get_status(http, "/v2/health/ready").await, 503);
    let mut watch = client.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
    gate.open();
    let server = load.await.unwrap().expect("loads once the gate opens");
    assert_eq!(next(&mut watch).await, ServingStatus::Serving);
    assert_eq!(check(&mut client, "late").await, Ok(ServingStatus::Serving));
    assert_eq!(get_status(http, "/v2/health/ready").await, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn health_follows_a_replica_that_fails_and_recovers_and_ends_at_shutdown() {
    let reload = Arc::new(Gate::default());
    // The first backend loads at once; the replacement after the panic waits for the gate.
    register("flaky", Some((reload.clone(), 1)), None);
    let s = ready(
            "      - {name: flaky, builtin: {custom: {name: flaky}}}\n      - {name: iris, model: iris/model.onnx}\n",
        "graceful_shutdown_timeout_s: 0.5",
    )
    .await;
    let mut client = health(s.grpc_addr().unwrap()).await;
    assert_eq!(check(&mut client, "").await, Ok(ServingStatus::Serving));
    assert_eq!(check(&mut client, "iris").await, Ok(ServingStatus::Serving));
    assert_eq!(check(&mut client, "nope").await, Err(tonic::Code::NotFound));
    let mut server_watch =
        client.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let mut model_watch =
        client.watch(HealthCheckRequest { service: "flaky".into() }).await.unwrap().into_inner();
    assert_eq!(next(&mut server_watch).await, ServingStatus::Serving);
    assert_eq!(next(&mut model_watch).await, ServingStatus::Serving);

    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [-1.0]}]});
    let r = reqwest::Client::new()
        .post(url(&s, "/v2/models/flaky/infer"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(next(&mut model_watch).await, ServingStatus::NotServing);
    assert_eq!(next(&mut server_watch).await, ServingStatus::NotServing);
    assert_eq!(check(&mut client, "iris").await, Ok(ServingStatus::Serving), "other models are unaffected");
    assert_eq!(get_status(s.http_addr(), "/v2/health/ready").await, 503);

    reload.open();
    assert_eq!(next(&mut model_watch).await, ServingStatus::Serving);
    assert_eq!(next(&mut server_watch).await, ServingStatus::Serving);

    let shutdown = tokio::spawn(s.shutdown());
    assert_eq!(next(&mut server_watch).await, ServingStatus::NotServing);
    shutdown.await.unwrap();
}

#[tokio::test]
async fn a_model_still_running_at_the_deadline_is_answered_504_then() {
    let gate = Arc::new(Gate::default());
    register("stuck", None, Some(gate.clone()));
    let s = ready(
        "      - {name: stuck, builtin: {custom: {name: stuck}}, warmup: false, max_ongoing_requests: 1}\n",
        "",
    )
    .await;
    let infer = |timeout_us: u64| {
        let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], "parameters": {"timeout": timeout_us}});
        reqwest::Client::new().post(url(&s, "/v2/models/stuck/infer")).body(body.to_string()).send()
    };
    let r = infer(100_000).await.unwrap();
    assert_eq!(r.status(), 504);
    let error: Value = r.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("did not answer in time"), "{error}");
    // The replica is still busy with it: its one slot comes back only when the model is done.
    gate.open();
    let r = infer(60_000_000).await.unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["outputs"][0]["data"], json!([1.0]));
    s.shutdown().await;
}

/// A deployment that autoscaling took to zero replicas (`min_replicas: 0`) takes requests:
/// they wait while a replica starts. So the server stays ready (REST, `ServerReady` and gRPC
/// health), or a load balancer would take it out and never send the request that scales the
/// deployment up again. The model itself says honestly that no replica is ready, at zero and
/// while its first replica warms up. A request starts a replica and is answered, and the
/// deployment goes back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_scaled_to_zero_keeps_the_server_ready_and_a_request_wakes_it() {
    let warm_up = Arc::new(Gate::default());
    register("cold", None, Some(warm_up.clone()));
    let s = ready(
            "      - name: cold\n        builtin: {custom: {name: cold}}\n        autoscaling_config: {min_replicas: 0, max_replicas: 1, metrics_interval_s: 0.05,\n          look_back_period_s: 0.1, downscale_delay_s: 0.2}\n",
        "",
    )
    .await;
    let replicas = || s.routes().resolve("cold", None).unwrap().deployment().unwrap().replica_count();
    let http = s.http_addr();
    let mut client = health(s.grpc_addr().unwrap()).await;
    let mut inference = common::grpc::client(&s).await;
    let mut model_watch = watch_named(&mut client, "cold").await;
    // The server's entry is reported before the model's, in the same round.
    let server_ready = |client: &mut HealthClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            (
                get_status(http, "/v2/health/ready").await,
                check(&mut client, "").await,
                check(&mut client, "inference.GRPCInferenceService").await,
            )
        }
    };
    let serving = (200, Ok(ServingStatus::Serving), Ok(ServingStatus::Serving));
    // (sluice_replicas, sluice_replicas_ready) as /metrics has them: the shipped alert on no
    // ready replica fires only where the first is above 0, not at zero on purpose.
    let gauges = || async {
        let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
        let read = |name: &str| {
            let series = format!("{name}{{model=\"cold\",version=\"1\"}} ");
            text.lines().find_map(|l| l.strip_prefix(series.as_str())).map(|v| v.parse::<f64>().unwrap())
        };
        (read("sluice_replicas"), read("sluice_replicas_ready"))
    };

    assert_eq!(next(&mut model_watch).await, ServingStatus::NotServing);
    assert_eq!(replicas(), 0, "started at zero");
    assert_eq!(gauges().await, (Some(0.0), Some(0.0)), "at zero on purpose");
    assert_eq!(server_ready(&mut client).await, serving, "at zero");
    let ready = inference.server_ready(sluice_proto::inference::ServerReadyRequest {}).await.unwrap();
    assert!(ready.into_inner().ready, "gRPC ServerReady at zero");
    assert_eq!(get_status(http, "/v2/models/cold/ready").await, 503, "the model has no replica");

    // A request starts a replica, whose warm-up waits on the gate: still no ready replica.
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]});
    let send =
        || tokio::spawn(reqwest::Client::new().post(url(&s, "/v2/models/cold/infer")).json(&body).send());
    // Until the request sent has started a replica.
    let started = || async {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while replicas() == 0 {
            assert!(std::time::Instant::now() < until, "the request started no replica");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let request = send();
    started().await;
    assert_eq!(server_ready(&mut client).await, serving, "while the first replica warms up");
    assert_eq!(get_status(http, "/v2/models/cold/ready").await, 503, "warming up");
    assert_eq!(gauges().await, (Some(1.0), Some(0.0)), "one replica, not ready yet");

    warm_up.open();
    let r = request.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["outputs"][0]["data"], json!([2.0]));
    assert_eq!(next(&mut model_watch).await, ServingStatus::Serving);

    // Idle: back to zero, and the server stays ready.
    assert_eq!(next(&mut model_watch).await, ServingStatus::NotServing);
    assert_eq!(replicas(), 0, "scaled back to zero");
    assert_eq!(gauges().await, (Some(0.0), Some(0.0)), "back at zero");
    assert_eq!(server_ready(&mut client).await, serving, "back at zero");
    assert_eq!(get_status(http, "/v2/models/cold/ready").await, 503);

    // Woken again, having served: its status says it is starting (UPDATING), not that the
    // replicas it had are failing (UNHEALTHY; Ray Serve's HEALTH_CHECK_FAILED to KubeRay).
    warm_up.close();
    let request = send();
    started().await;
    let status = serde_json::to_value(s.controller().status()).unwrap();
    let cold = &status["applications"]["t"]["deployments"]["cold"];
    assert_eq!(cold["status"], "UPDATING", "{cold}");
    assert_eq!(cold["message"], "1 replica(s) starting from zero", "{cold}");
    warm_up.open();
    assert_eq!(request.await.unwrap().unwrap().status(), 200);
    s.shutdown().await;
}

/// An autoscaled deployment whose scale from zero fails (its model no longer loads) says so in
/// its status, UNHEALTHY with the failure: it read HEALTHY while every request waited for its
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_from_zero_that_fails_shows_in_the_status() {
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    sluice_deployments::register_step(
        "wakes_broken",
        Arc::new(move || match made.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            // The start's load reads the model's metadata; the replicas' fail.
            0 => Ok(Box::new(Step::new(None)) as Box<dyn Backend>),
            _ => Err(sluice_deployments::LoadError::Step("the weights are gone".into())),
        }),
    );
    let s = ready(
            "      - {name: broken, builtin: {custom: {name: wakes_broken}}, autoscaling_config: {min_replicas: 0, max_replicas: 1, metrics_interval_s: 0.05, look_back_period_s: 0.1}}\n",
        "",
    )
    .await;
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}], "parameters": {"timeout": 300_000}});
    let r = reqwest::Client::new().post(url(&s, "/v2/models/broken/infer")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 504);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = serde_json::to_value(s.controller().status()).unwrap();
        let broken = &status["applications"]["t"]["deployments"]["broken"];
        if broken["status"] == "UNHEALTHY" {
            let message = broken["message"].as_str().unwrap();
            assert!(message.starts_with("no replica is ready: "), "{message}");
            assert!(message.contains("the weights are gone"), "{message}");
            break;
        }
        assert!(std::time::Instant::now() < until, "{broken}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.shutdown().await;
}

/// One deployment's replica loading (here held by a gate) holds up no other deployment's
/// scale from zero: the control loop ran each change to its end before looking again, so a
/// request to the other waited for that load, or its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_load_holds_up_no_other_deployments_scale_from_zero() {
    let gate = Arc::new(Gate::default());
    // Load 0 is the start's (the model's metadata); the replica loads after it wait.
    register("slow-load", Some((gate.clone(), 1)), None);
    register("quick-load", None, None);
    let zero = "autoscaling_config: {min_replicas: 0, max_replicas: 1, metrics_interval_s: 0.05, look_back_period_s: 0.1}";
    let s = sluice_server::start(
        config(
            &format!(
                "      - {{name: slow, builtin: {{custom: {{name: slow-load}}}}, {zero}}}\n      - {{name: quick, builtin: {{custom: {{name: quick-load}}}}, {zero}}}\n"
            ),
            "",
        ),
        Default::default(),
    )
    .await
    .unwrap();
    // Opened however the test ends: a load held for good would hold the runtime's end too.
    struct OpenAtEnd(Arc<Gate>);
    impl Drop for OpenAtEnd {
        fn drop(&mut self) {
            self.0.open();
        }
    }
    let _open_at_end = OpenAtEnd(gate.clone());
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]});
    let slow = tokio::spawn(reqwest::Client::new().post(url(&s, "/v2/models/slow/infer")).json(&body).send());
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while gate.came.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < until, "the request started no replica load");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The slow replica's load waits on the gate; the other deployment scales from zero.
    let r = reqwest::Client::new().post(url(&s, "/v2/models/quick/infer")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(!slow.is_finished(), "the slow load was still held");
    gate.open();
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    s.shutdown().await;
}

/// A scale-up under way when an apply tightens the deployment's bounds ends within them: the
/// apply compared its bounds with the replicas loaded so far (1, within a new `max_replicas`
/// of 1), and the scale went on to 4, held there until `downscale_delay_s` (600 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_up_under_way_when_the_bounds_tighten_ends_within_them() {
    let load = Arc::new(Gate::default());
    let infer = Arc::new(Gate::default());
    // Load 0 is the first replica's (its metadata read from it); later ones wait.
    register("tightened", Some((load.clone(), 1)), Some(infer.clone()));
    let deployment = |max: u32| {
        format!(
            "      - {{name: tight, builtin: {{custom: {{name: tightened}}}}, warmup: false, num_cpus: 0.25, autoscaling_config: \
             {{min_replicas: 1, max_replicas: {max}, target_ongoing_requests: 1, metrics_interval_s: 0.05, \
             look_back_period_s: 0.1, upscale_delay_s: 0, downscale_delay_s: 600}}}}\n"
        )
    };
    let s = ready(&deployment(4), "").await;
    struct OpenAtEnd(Vec<Arc<Gate>>);
    impl Drop for OpenAtEnd {
        fn drop(&mut self) {
            self.0.iter().for_each(|g| g.open());
        }
    }
    let _open_at_end = OpenAtEnd(vec![load.clone(), infer.clone()]);
    let replicas = || s.routes().resolve("tight", None).unwrap().deployment().unwrap().replica_count();
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]});
    let held: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(reqwest::Client::new().post(url(&s, "/v2/models/tight/infer")).json(&body).send())
        })
        .collect();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while load.came.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < until,
            "four requests held started no scale-up: {}",
            serde_json::to_value(s.controller().status()).unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let controller = s.controller().clone();
    let tightened = config(&deployment(1), "");
    let apply = tokio::spawn(async move { controller.apply(&tightened).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    load.open();
    infer.open();
    apply.await.unwrap().unwrap();
    for r in held {
        assert_eq!(r.await.unwrap().unwrap().status(), 200);
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while replicas() != 1 {
        let status = serde_json::to_value(s.controller().status()).unwrap();
        assert!(
            std::time::Instant::now() < until,
            "{} replicas, max_replicas 1: {}",
            replicas(),
            status["events"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.shutdown().await;
}

/// The weight of `version` of deployment `name` of application `app` in the status.
fn weight_of(s: &sluice_server::Server, app: &str, name: &str, version: &str) -> Option<u64> {
    let st = serde_json::to_value(s.controller().status()).unwrap();
    st["applications"][app]["deployments"][name]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["version"] == version)
        .and_then(|v| v["weight"].as_u64())
}

/// A repository rollout that completes while another change runs waits for it to be promoted;
/// a canary rolled back meanwhile is not promoted when its turn comes (it was: the promotion
/// took whatever canary the deployment had by then, and cleared its rejection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_rolled_back_while_its_promotion_waits_is_not_promoted() {
    let gate = Arc::new(Gate::default());
    register("holds_the_apply", Some((gate.clone(), 0)), None);
    let repo = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("held-promotion-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    let put = |version: u32, fixture: &str| {
        let d = repo.join("flowers").join(version.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(models_dir().join(fixture).join("model.onnx"), d.join("model.onnx")).unwrap();
        std::fs::write(d.join("READY"), b"").unwrap();
    };
    put(1, "iris");
    let top = format!(
        "model_repository:\n  path: {}\n  poll_interval_s: 0\n  rollout: {{canary_weight: 50, step_percent: 50, interval_s: 0.2, min_requests: 1}}",
        repo.display()
    );
    let other = "      - {name: other, model: iris/model.onnx}\n";
    let s = sluice_server::start(config(other, &top), Default::default()).await.unwrap();
    put(2, "iris-v2");
    s.controller().notify_repository("flowers").await.unwrap();
    assert_eq!(weight_of(&s, "repository", "flowers", "2"), Some(50));
    // A change that holds the controller's changes: it adds a deployment whose load waits.
    let held = config(
        &format!("{other}      - {{name: held, builtin: {{custom: {{name: holds_the_apply}}}}}}\n"),
        &top,
    );
    let controller = s.controller().clone();
    let apply = tokio::spawn(async move { controller.apply(&held).await });
    while gate.came.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let client = reqwest::Client::new();
    let body = r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}"#;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while weight_of(&s, "repository", "flowers", "2") != Some(100) {
        assert!(std::time::Instant::now() < until, "the rollout never completed");
        let r = client.post(url(&s, "/v2/models/flowers/infer")).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    s.controller().rollback("flowers", "by the test").await.unwrap();
    gate.open();
    apply.await.unwrap().unwrap();
    let events = || serde_json::to_value(s.controller().status()).unwrap()["events"].to_string();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !events().contains("not promoted") {
        assert!(std::time::Instant::now() < until, "no word of the promotion: {}", events());
        assert!(!events().contains("promoted version 2"), "{}", events());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(weight_of(&s, "repository", "flowers", "1"), Some(100), "{}", events());
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&repo);
}

/// A version swapped in for an autoscaled one grows to the replicas the old one runs at the
/// moment of the swap before any traffic goes to it: the autoscaler grew the old one from 1 to
/// 3 while the new one loaded, and the new one took all of the traffic with the 1 replica
/// planned before its load (the rest loaded after, one by one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_in_version_grows_to_the_old_ones_count_before_it_takes_the_traffic() {
    use sluice_deployments::Servable;
    let gate = Arc::new(Gate::default());
    register("grows_old", None, None);
    register("grows_new", Some((gate.clone(), 0)), None);
    let scaled = |step: &str| {
        format!(
            "      - {{name: grows, builtin: {{custom: {{name: {step}}}}}, autoscaling_config: {{min_replicas: 1, max_replicas: 4, initial_replicas: 1}}}}\n"
        )
    };
    let s = sluice_server::start(config(&scaled("grows_old"), ""), Default::default()).await.unwrap();
    let primary =
        |router: &sluice_router::Router| match router.table().models.get("grows")?.default_version()? {
            Servable::Deployment(d) => Some(d.clone()),
            _ => None,
        };
    let old = primary(s.controller().routes()).unwrap();
    let controller = s.controller().clone();
    let new_config = config(&scaled("grows_new"), "");
    let apply = tokio::spawn(async move { controller.apply(&new_config).await });
    while gate.came.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // What the autoscaler does under load while the new version loads.
    old.scale_to(3).await.unwrap();
    // The first table that routes to the new version: its replicas then (loaded; the last may
    // still be warming up on its thread).
    let router = s.controller().routes().clone();
    let mut tables = router.subscribe();
    let first_table = tokio::spawn(async move {
        loop {
            tables.changed().await.unwrap();
            if let Some(d) = primary(&router).filter(|d| !Arc::ptr_eq(d, &old)) {
                return d.replica_count();
            }
        }
    });
    gate.open();
    apply.await.unwrap().unwrap();
    assert_eq!(first_table.await.unwrap(), 3);
    s.shutdown().await;
}

/// A pipeline request that reaches a step swapped out meanwhile, left at zero replicas, is
/// served: the retired version gets a replica for the requests waiting in it (the autoscaler
/// sizes only the versions that serve, and the request waited for its deadline, 504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_request_reaching_a_retired_step_at_zero_is_served() {
    let first = Arc::new(Gate::default());
    register("before_the_retired", None, Some(first.clone()));
    register("retired_at_zero", None, None);
    let deployments = |version: &str| {
        format!(
            "      - {{name: first, builtin: {{custom: {{name: before_the_retired}}}}, warmup: false, num_cpus: 0.25}}\n\
             \x20     - {{name: second, version: \"{version}\", builtin: {{custom: {{name: retired_at_zero}}}}, num_cpus: 0.25, \
             request_timeout_s: 20, autoscaling_config: {{min_replicas: 0, max_replicas: 1, metrics_interval_s: 0.05, \
             look_back_period_s: 0.1, downscale_delay_s: 0.2}}}}\n\
             \x20   pipeline:\n\
             \x20     name: p\n\
             \x20     inputs: [{{name: x, datatype: FP32, shape: [-1]}}]\n\
             \x20     steps:\n\
             \x20       - {{name: a, deployment: first, inputs: {{x: x}}, outputs: {{y: mid}}}}\n\
             \x20       - {{name: b, deployment: second, inputs: {{x: mid}}, outputs: {{y: out}}}}\n\
             \x20     outputs: [out]\n"
        )
    };
    let s = ready(&deployments("1"), "").await;
    let at_zero = || s.routes().resolve("second", None).unwrap().deployment().unwrap().replica_count() == 0;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !at_zero() {
        assert!(std::time::Instant::now() < until, "`second` never scaled to zero");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]});
    let started = std::time::Instant::now();
    let request = tokio::spawn(reqwest::Client::new().post(url(&s, "/v2/models/p/infer")).json(&body).send());
    while first.came.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the request never reached the first step"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The second step swapped for another version while the request is in the first.
    s.controller().apply(&config(&deployments("2"), "")).await.unwrap();
    first.open();
    let answer = request.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "served only after {:?}",
        started.elapsed()
    );
    s.shutdown().await;
}
