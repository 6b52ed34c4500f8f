//! Model multiplexing against the real server: one deployment serving many models of one
//! interface from a folder, each loaded on first use into a per-replica LRU; hits, misses and
//! evictions counted exactly; requests routed to replicas that hold their model; unknown and
//! broken models answered clearly while the rest keep serving.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use serde_json::Value;

const HEADER: &str = "serve_multiplexed_model_id";

/// A folder of models a, b, c (iris copies) and `bad` (not an ONNX file).
fn models(tag: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("multiplex-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for id in ["a", "b", "c"] {
        std::fs::create_dir_all(dir.join(id)).unwrap();
        std::fs::copy(models_dir().join("iris/model.onnx"), dir.join(id).join("model.onnx")).unwrap();
    }
    std::fs::create_dir_all(dir.join("bad")).unwrap();
    std::fs::write(dir.join("bad").join("model.onnx"), b"not a model").unwrap();
    dir
}

async fn start(dir: &std::path::Path, replicas: u32, per_replica: u32) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\napplications:\n  - name: app\n    deployments:\n      - {{name: tenants, num_replicas: {replicas}, multiplex: {{path: {}, max_num_models_per_replica: {per_replica}}}}}\n",
        dir.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("m.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(std::time::Duration::from_secs(60)).await);
    s
}

fn body() -> Value {
    serde_json::json!({"inputs": expected("iris")["cases"][0]["inputs"]})
}

/// One request to `model` on the deployment (by header) or, with `path`, by the model's id as
/// the model name. Returns (status, body).
async fn infer(s: &sluice_server::Server, model: Option<&str>, path: Option<&str>) -> (u16, Value) {
    let target = path.unwrap_or("tenants");
    let mut req = reqwest::Client::new().post(url(s, &format!("/v2/models/{target}/infer"))).json(&body());
    if let Some(m) = model {
        req = req.header(HEADER, m);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn multiplex(s: &sluice_server::Server) -> Value {
    let status = serde_json::to_value(s.controller().status()).unwrap();
    status["applications"]["app"]["deployments"]["tenants"]["multiplex"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_models_than_the_lru_holds_are_counted_exactly() {
    let dir = models("lru");
    let s = start(&dir, 1, 2).await;
    let want = &expected("iris")["cases"][0]["outputs"];
    // a, b (two loads), a (hit), c (load, evicts b), b (load, evicts a).
    for m in ["a", "b", "a", "c", "b"] {
        let (status, got) = infer(&s, Some(m), None).await;
        assert_eq!(status, 200, "{got}");
        assert_outputs_match(&got["outputs"], want, 1e-5);
    }
    let mx = multiplex(&s);
    assert_eq!((mx["misses"].as_u64(), mx["hits"].as_u64()), (Some(4), Some(1)), "{mx}");
    assert_eq!((mx["loads"].as_u64(), mx["evictions"].as_u64()), (Some(4), Some(2)), "{mx}");
    assert_eq!(mx["models"], serde_json::json!(["a", "b", "bad", "c"]));
    // A model's id also answers as a model name; c is still loaded (hit).
    let (status, got) = infer(&s, None, Some("c")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(multiplex(&s)["hits"].as_u64(), Some(2));
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    // Labelled with the deployment (the folder's name added up deployments whose folders
    // share a name, and matched none of the other series).
    assert!(metrics.contains(r#"sluice_multiplex_evictions_total{deployment="tenants"} 2"#), "{metrics}");
    // Triton's statistics list the deployment once, not once per model id it routes, and
    // count every request it served.
    let stats: Value = reqwest::get(url(&s, "/v2/models/stats")).await.unwrap().json().await.unwrap();
    let rows = stats["model_stats"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{stats}");
    assert_eq!(
        (rows[0]["name"].as_str(), rows[0]["inference_count"].as_u64()),
        (Some("tenants"), Some(6)),
        "{stats}"
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_replicas_that_hold_their_model() {
    let dir = models("pref");
    let s = start(&dir, 2, 2).await;
    // Alternating models: with the holder preferred, each model is loaded exactly once, on
    // whichever replica first took it.
    for i in 0..20 {
        let (status, got) = infer(&s, Some(["a", "b"][i % 2]), None).await;
        assert_eq!(status, 200, "{got}");
    }
    let mx = multiplex(&s);
    assert_eq!((mx["misses"].as_u64(), mx["hits"].as_u64()), (Some(2), Some(18)), "{mx}");
    // Under concurrency every request still succeeds (saturated holders let others load).
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (client, url) = (reqwest::Client::new(), url(&s, "/v2/models/tenants/infer"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let r = client
                    .post(&url)
                    .header(HEADER, ["a", "b", "c"][i % 3])
                    .json(&body())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    s.shutdown().await;
}

/// Requests for a model no replica holds, sent together, load it once: the replica chosen for
/// the first counts as holding it while it loads, and the others follow it there (each went to
/// the less loaded replica, so both loaded it, each evicting what it held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_a_model_being_loaded_follow_it() {
    let dir = models("follow");
    let s = start(&dir, 2, 1).await;
    // Connected first, then sent at once.
    let go = Arc::new(tokio::sync::Barrier::new(4));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let live = url(&s, "/v2/health/live");
        let (client, url) = (reqwest::Client::new(), url(&s, "/v2/models/tenants/infer"));
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            client.get(&live).send().await.unwrap();
            go.wait().await;
            client.post(&url).header(HEADER, "a").json(&body()).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let mx = multiplex(&s);
    assert_eq!((mx["loads"].as_u64(), mx["evictions"].as_u64()), (Some(1), Some(0)), "{mx}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_broken_models_are_named_and_the_others_keep_serving() {
    let dir = models("bad");
    let s = start(&dir, 1, 2).await;
    let (status, got) = infer(&s, Some("zz"), None).await;
    assert_eq!(status, 404, "{got}");
    assert!(got["error"].as_str().unwrap().starts_with("unknown model `zz`"), "{got}");
    let (status, got) = infer(&s, None, Some("zz")).await;
    assert_eq!((status, got["error"].as_str()), (404, Some("unknown model `zz`")));
    let (status, got) = infer(&s, Some("bad"), None).await;
    assert_eq!(status, 500, "{got}");
    assert!(got["error"].as_str().unwrap().contains("model `bad` failed to load"), "{got}");
    // Not loaded again while its file stays as it was; loaded once it changes.
    let (status, got) = infer(&s, Some("bad"), None).await;
    assert_eq!(status, 500, "{got}");
    assert!(
        got["error"].as_str().unwrap().ends_with("(not loaded again until its files change, or for 60 s)"),
        "{got}"
    );
    std::fs::write(dir.join("bad/model.onnx"), b"still not a model, longer").unwrap();
    let (status, got) = infer(&s, Some("bad"), None).await;
    assert_eq!(status, 500, "{got}");
    assert!(!got["error"].as_str().unwrap().contains("not loaded again"), "tried again: {got}");
    let (status, got) = infer(&s, Some("../a"), None).await;
    assert_eq!(status, 404, "no way out of the folder: {got}");
    let (status, got) = infer(&s, None, None).await;
    assert_eq!(status, 400, "{got}");
    assert!(got["error"].as_str().unwrap().contains("serves many models"), "{got}");
    let (status, _) = infer(&s, Some("a"), None).await;
    assert_eq!(status, 200, "the replica keeps serving its other models");
    // A model's metadata, asked for by its id, names it (perf_analyzer sends its requests to the
    // name it reads there: it read the deployment's, which serves no request without an id).
    let stats: Value = reqwest::get(url(&s, "/v2/models/a/stats")).await.unwrap().json().await.unwrap();
    assert_eq!(stats["model_stats"][0]["name"], "a", "its statistics, by the name asked: {stats}");
    let meta: Value = reqwest::get(url(&s, "/v2/models/a")).await.unwrap().json().await.unwrap();
    assert_eq!(
        (&meta["name"], &meta["versions"]),
        (&serde_json::json!("a"), &serde_json::json!(["1"])),
        "{meta}"
    );

    // The path and the header naming different models: refused, not one silently chosen.
    let (status, got) = infer(&s, Some("b"), Some("a")).await;
    assert_eq!(status, 400, "{got}");
    assert!(got["error"].as_str().unwrap().contains("the path names model `a` but the"), "{got}");
    assert_eq!(infer(&s, Some("a"), Some("a")).await.0, 200, "the same model twice is fine");
    // Unknown and broken ids are neither hits nor misses: `a` loaded once, then found.
    let mx = multiplex(&s);
    assert_eq!(
        (mx["misses"].as_u64(), mx["hits"].as_u64(), mx["loads"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{mx}"
    );
    s.shutdown().await;
}

/// A pipeline step that is a multiplexed deployment runs the model the request names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexed_pipeline_step_runs_the_model_the_request_names() {
    let dir = models("pipeline");
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}
applications:
  - name: app
    route_prefix: /pc
    deployments:
      - {{name: tenants, multiplex: {{path: {}, max_num_models_per_replica: 2}}}}
      - {{name: pick, builtin: {{argmax: {{}}}}}}
      - {{name: iris, model: iris/model.onnx}}
    pipeline:
      name: pc
      inputs: [{{name: f, datatype: FP32, shape: [-1, 4]}}]
      steps:
        - {{name: m, deployment: tenants, inputs: {{input: f}}, outputs: {{probabilities: p}}}}
        - {{name: pick, deployment: pick, inputs: {{x: p}}, outputs: {{index: i}}}}
      outputs: [i]
      route: {{request: {{features: f}}, response: {{class: i}}}}
  - name: plain
    deployments:
      - {{name: pick2, builtin: {{argmax: {{}}}}}}
    pipeline:
      name: pp
      inputs: [{{name: x, datatype: FP32, shape: [-1, 3]}}]
      steps: [{{name: pick, deployment: pick2, inputs: {{x: x}}, outputs: {{index: i}}}}]
      outputs: [i]
",
        dir.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("m.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(std::time::Duration::from_secs(60)).await);
    let iris = &expected("iris")["cases"][0]["inputs"][0];
    let body = serde_json::json!({"inputs": [{"name": "f", "datatype": "FP32", "shape": iris["shape"], "data": iris["data"]}]});
    let client = reqwest::Client::new();
    let post = |path: &str, model: Option<&str>, body: &Value| {
        let mut req = client.post(url(&s, path)).json(body);
        if let Some(m) = model {
            req = req.header(HEADER, m);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, out) = post("/v2/models/pc/infer", Some("b"), &body).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outputs"][0]["data"], serde_json::json!([0]), "{out}");
    assert_eq!(multiplex(&s)["loads"], 1, "the step loaded the model named: {}", multiplex(&s));
    // Without the header the step cannot choose; a pipeline with no multiplexed step refuses one.
    let (status, out) = post("/v2/models/pc/infer", None, &body).await;
    assert_eq!(status, 400);
    assert!(out["error"].as_str().unwrap().contains("serves many models"), "{out}");
    // The pipeline's JSON route passes the header on too.
    let features =
        serde_json::json!({"features": iris["data"].as_array().unwrap().chunks(4).collect::<Vec<_>>()});
    let (status, out) = post("/pc", Some("b"), &features).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out, serde_json::json!({"class": [0]}));
    assert_eq!(post("/pc", None, &features).await.0, 400);
    let x = serde_json::json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [0.1, 0.7, 0.2]}]});
    let (status, out) = post("/v2/models/pp/infer", Some("b"), &x).await;
    assert_eq!(status, 400);
    assert!(out["error"].as_str().unwrap().contains("has no multiplexed step"), "{out}");
    assert_eq!(post("/v2/models/pp/infer", None, &x).await.0, 200);
    s.shutdown().await;
}

/// A broken model that sorts first does not keep the deployment from starting: the interface
/// comes from the first model that loads, and the broken one is answered as a failed load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_model_first_in_the_folder_keeps_no_other_from_serving() {
    let dir = models("first-bad");
    std::fs::create_dir_all(dir.join("0bad")).unwrap();
    std::fs::write(dir.join("0bad").join("model.onnx"), b"not a model").unwrap();
    let s = start(&dir, 1, 2).await;
    let (status, got) = infer(&s, Some("a"), None).await;
    assert_eq!(status, 200, "{got}");
    let (status, got) = infer(&s, Some("0bad"), None).await;
    assert_eq!(status, 500, "{got}");
    assert!(got["error"].as_str().unwrap().contains("model `0bad` failed to load"), "{got}");
    s.shutdown().await;
}

/// A model a replica holds is looked at again (at most every second): rewritten in place (a
/// new fine-tune), the next request runs the new files; its folder removed (the tenant left),
/// 404. The replica served the copy it loaded first for as long as it held it, while replicas
/// loading it later served the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_model_rewritten_or_removed_is_followed() {
    let dir = models("rewritten");
    let s = start(&dir, 1, 2).await;
    let (status, first) = infer(&s, Some("a"), None).await;
    assert_eq!(status, 200, "{first}");
    assert_outputs_match(&first["outputs"], &expected("iris")["cases"][0]["outputs"], 1e-5);
    // iris-v2 answers the same row with other probabilities.
    std::fs::copy(models_dir().join("iris-v2/model.onnx"), dir.join("a/model.onnx")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (status, got) = infer(&s, Some("a"), None).await;
    assert_eq!(status, 200, "{got}");
    assert_outputs_match(&got["outputs"], &expected("iris-v2")["cases"][0]["outputs"], 1e-5);
    std::fs::remove_dir_all(dir.join("a")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (status, got) = infer(&s, Some("a"), None).await;
    assert_eq!(status, 404, "{got}");
    s.shutdown().await;
}

/// A model id outside visible ASCII (a folder named `café`) reaches a multiplexed deployment
/// over gRPC as bytes, under `serve_multiplexed_model_id-bin` (how a proxy on Ray passes it to
/// the replica's process: an ASCII metadata value cannot hold it, and it was left out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_id_outside_ascii_travels_as_bytes_over_grpc() {
    let dir = models("bin");
    std::fs::create_dir_all(dir.join("café")).unwrap();
    std::fs::copy(models_dir().join("iris/model.onnx"), dir.join("café/model.onnx")).unwrap();
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{host: 127.0.0.1, port: 0}}\nadmin_options: {{enabled: false}}\napplications:\n  - name: app\n    deployments:\n      - {{name: tenants, multiplex: {{path: {}, max_num_models_per_replica: 2}}}}\n",
        dir.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("m.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let mut client = grpc::client(&s).await;
    let mut request =
        tonic::Request::new(grpc::fp32_request("tenants", "input", &[1, 4], &[5.1, 3.5, 1.4, 0.2]));
    let id = tonic::metadata::MetadataValue::from_bytes("café".as_bytes());
    request.metadata_mut().insert_bin("serve_multiplexed_model_id-bin", id);
    let answer = client.model_infer(request).await;
    assert!(answer.is_ok(), "{answer:?}");
    // Which models are loaded is a replica process's word to its controller, not a client's.
    let held = answer.unwrap().metadata().get_bin(sluice_deployments::HELD_MODELS_HEADER_BIN).is_some();
    assert!(!held, "a client was told which models the server holds");
    assert_eq!(multiplex(&s)["models"], serde_json::json!(["a", "b", "bad", "c", "café"]));
    // A model's gRPC metadata, asked for by its id, names it (perf_analyzer sends its requests
    // to the name it reads there).
    let asked =
        sluice_proto::inference::ModelMetadataRequest { name: "café".into(), version: String::new() };
    let meta = client.model_metadata(asked).await.unwrap().into_inner();
    assert_eq!((meta.name.as_str(), meta.versions), ("café", vec!["1".to_string()]));
    s.shutdown().await;
}

/// Over REST a model id is read as UTF-8 (a folder named `café` sent as its bytes: it was read
/// as no id, 400 "name a model"); a header that is not UTF-8 is refused naming it (a version
/// pin that could not be read went through the traffic split).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_headers_are_read_as_utf8_and_others_refused() {
    let dir = models("utf8");
    std::fs::create_dir_all(dir.join("café")).unwrap();
    std::fs::copy(models_dir().join("iris/model.onnx"), dir.join("café/model.onnx")).unwrap();
    let s = start(&dir, 1, 2).await;
    let send = |name: &'static str, value: &'static [u8]| {
        let value = reqwest::header::HeaderValue::from_bytes(value).unwrap();
        reqwest::Client::new()
            .post(url(&s, "/v2/models/tenants/infer"))
            .json(&body())
            .header(name, value)
            .send()
    };
    let r = send(HEADER, "café".as_bytes()).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    for name in [HEADER, "x-sluice-version"] {
        let r = send(name, b"caf\xe9").await.unwrap();
        assert_eq!(r.status(), 400);
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"], format!("header `{name}` is not UTF-8 text"));
    }
    s.shutdown().await;
}

/// A multiplexed deployment deleted takes its series (labelled by deployment, not by model and
/// version) out of `/metrics` once drained: they stayed for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_multiplexed_deployments_series_leave_the_metrics() {
    let dir = models("deleted");
    // A name of its own: the recorder is the process's, and other tests' `tenants` run beside.
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\napplications:\n  - name: app\n    deployments:\n      - {{name: leaving, multiplex: {{path: {}, max_num_models_per_replica: 2}}}}\n",
        dir.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("m.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(std::time::Duration::from_secs(60)).await);
    let (status, got) = infer(&s, Some("a"), Some("leaving")).await;
    assert_eq!(status, 200, "{got}");
    let metrics = || async { reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap() };
    let series = "sluice_multiplex_loads_total{deployment=\"leaving\"}";
    assert!(metrics().await.contains(series));
    let text = "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {port: 0}\napplications:\n  - name: app\n    deployments:\n      - {name: other, builtin: {softmax: {}}}\n";
    let config = sluice_config::parse(text, &models_dir().join("m.yaml")).unwrap();
    s.controller().apply(&config).await.unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metrics().await.contains(series) {
        assert!(std::time::Instant::now() < until, "the deleted deployment's series stay");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    s.shutdown().await;
}
