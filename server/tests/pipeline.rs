//! Pipelines against the real server: tokenizer → encoder (with batching and padding) → mean
//! pool over the project's tiny BERT-style fixture, as an OIP model (REST and gRPC-shaped
//! BYTES input) and as a plain-JSON route; config errors; a step failing at run time named in
//! the error.

mod common;

use common::*;
use serde_json::{Value, json};

const EMBED: &str = r#"
applications:
  - name: embed
    route_prefix: /embed
    deployments:
      - {name: tok, builtin: {tokenizer: {path: tiny-encoder/tokenizer.json}}, max_batch_size: 16, batch_wait_timeout_s: 0.01}
      - name: encoder
        model: tiny-encoder/model.onnx
        max_batch_size: 16
        batch_wait_timeout_s: 0.01
        pad: {input_ids: 0, attention_mask: 0, token_type_ids: 0}
      - {name: pool, builtin: {mean_pool: {normalize: true}}, max_batch_size: 16, pad: {hidden: 0, mask: 0}}
    pipeline:
      name: embeddings
      inputs: [{name: text, datatype: BYTES, shape: [-1]}]
      steps:
        - {name: tokenize, deployment: tok, inputs: {text: text}, outputs: {input_ids: ids, attention_mask: mask, token_type_ids: types}}
        - {name: encode, deployment: encoder, inputs: {input_ids: ids, attention_mask: mask, token_type_ids: types}, outputs: {last_hidden_state: hidden}}
        - {name: pool, deployment: pool, inputs: {hidden: hidden, mask: mask}, outputs: {embedding: embedding}}
      outputs: [embedding]
      route: {request: {text: text}, response: {embeddings: embedding}}
"#;

async fn start_embed() -> sluice_server::Server {
    sluice_server::runtime::init(None, None).unwrap();
    let text =
        format!("http_options: {{port: 0}}\ngrpc_options: {{port: 0}}\nadmin_options: {{port: 0}}\n{EMBED}");
    let config = sluice_config::parse(&text, &models_dir().join("p.yaml")).unwrap_or_else(|e| panic!("{e}"));
    sluice_server::start(config, Default::default()).await.unwrap()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_route_and_the_oip_model_give_the_reference_embeddings() {
    let s = start_embed().await;
    let doc = expected("tiny-encoder");
    let case = &doc["cases"][1];
    let client = reqwest::Client::new();
    // Plain JSON, Ray Serve style.
    let r = client.post(url(&s, "/embed")).json(&json!({"text": case["texts"]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    let got = out["embeddings"].as_array().unwrap();
    assert_eq!(got.len(), 3);
    for (g, w) in got.iter().zip(case["embeddings"].as_array().unwrap()) {
        assert!(cosine(&floats(g), &floats(w)) >= 0.9999, "{g} vs {w}");
    }
    // The same pipeline as an OIP model with a BYTES input.
    let body =
        json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": case["texts"]}]});
    let r = client.post(url(&s, "/v2/models/embeddings/infer")).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["outputs"][0]["shape"], json!([3, 8]));
    let flat = floats(&out["outputs"][0]["data"]);
    for (row, w) in flat.chunks(8).zip(case["embeddings"].as_array().unwrap()) {
        assert!(cosine(row, &floats(w)) >= 0.9999);
    }
    let (status, meta) = get_json(&s, "/v2/models/embeddings").await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["platform"], "ensemble");
    assert_eq!(meta["inputs"][0]["datatype"], "BYTES");
    // Its config names its steps as Triton's ensembles do (perf_analyzer walks them: a config
    // saying `platform: ensemble` without them crashed it), on REST and gRPC alike.
    let (status, config) = get_json(&s, "/v2/models/embeddings/config").await;
    assert_eq!(status, 200, "{config}");
    let steps = config["ensemble_scheduling"]["step"].as_array().unwrap_or_else(|| panic!("{config}"));
    let names: Vec<&str> = steps.iter().map(|s| s["model_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tok", "encoder", "pool"]);
    assert_eq!(
        steps[1]["input_map"],
        json!({"input_ids": "ids", "attention_mask": "mask", "token_type_ids": "types"})
    );
    assert_eq!(steps[1]["output_map"], json!({"last_hidden_state": "hidden"}));
    assert_eq!(steps[1]["model_version"], 1, "the version the step runs");
    let mut grpc = common::grpc::client(&s).await;
    let request =
        sluice_proto::inference::ModelConfigRequest { name: "embeddings".into(), version: String::new() };
    let answer = grpc.model_config(request).await.unwrap().into_inner().config.unwrap();
    use sluice_proto::inference::model_config::SchedulingChoice;
    let Some(SchedulingChoice::EnsembleScheduling(e)) = answer.scheduling_choice else {
        panic!("{answer:?}")
    };
    assert_eq!(e.step.iter().map(|s| s.model_name.as_str()).collect::<Vec<_>>(), ["tok", "encoder", "pool"]);
    assert_eq!(e.step[2].input_map.get("hidden").map(String::as_str), Some("hidden"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pipeline_requests_batch_and_each_gets_its_own_embedding() {
    let s = start_embed().await;
    let doc = expected("tiny-encoder");
    let texts: Vec<String> = doc["cases"][1]["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let want: Vec<Vec<f64>> = doc["cases"][1]["embeddings"].as_array().unwrap().iter().map(floats).collect();
    let client = reqwest::Client::new();
    // Model calls of a deployment so far (the recorder is the process's: other tests' servers
    // may count beside this one, never less).
    let calls_of = |model: &'static str| {
        let s = &s;
        async move {
            let metrics = reqwest::get(url(s, "/metrics")).await.unwrap().text().await.unwrap();
            let prefix = format!("sluice_batch_size_count{{model=\"{model}\"");
            let line = metrics.lines().find(|l| l.starts_with(&prefix));
            line.map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        }
    };
    let tokenized_before = calls_of("tok").await;
    let encoded_before = calls_of("encoder").await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (client, url, text, want) =
            (client.clone(), url(&s, "/embed"), texts[i % 3].clone(), want[i % 3].clone());
        tasks.push(tokio::spawn(async move {
            let out: Value =
                client.post(url).json(&json!({"text": [text]})).send().await.unwrap().json().await.unwrap();
            let got = floats(&out["embeddings"][0]);
            assert!(cosine(&got, &want) >= 0.9999, "{got:?} vs {want:?}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    let calls = calls_of("encoder").await - encoded_before;
    assert!(calls < 24.0, "the encoder batched: {calls} calls for 24 requests");
    // The tokenizer runs each request of its batches alone: 24 calls of their own (its batches
    // read as calls of all their rows).
    let tokenized = calls_of("tok").await - tokenized_before;
    assert!(tokenized >= 24.0, "{tokenized} tokenizer calls for 24 requests");
    // Calls that fail are model calls too (a batch's alone calls that failed were counted
    // nowhere, where a whole batch's failed call is).
    let before = calls_of("tok").await;
    let (body, header_len) = binary_bytes_request(&[0xff, 0xfe, b'a']);
    let bad = (0..4).map(|_| {
        client
            .post(url(&s, "/v2/models/tok/infer"))
            .header("Inference-Header-Content-Length", header_len)
            .body(body.clone())
            .send()
    });
    for r in futures_util::future::join_all(bad).await {
        assert_eq!(r.unwrap().status(), 400);
    }
    let failed = calls_of("tok").await - before;
    assert!(failed >= 4.0, "{failed} tokenizer calls for 4 failing requests");
    // Replica series are the steps' deployments'; a pipeline has none (at 0 it read as "no
    // ready replica" to the shipped alert). The value is not checked: the recorder is the
    // process's, and another test's server with an `encoder` may have just stopped.
    assert!(metrics.lines().any(|l| l.starts_with("sluice_replicas_ready{model=\"encoder\"")), "{metrics}");
    assert!(!metrics.contains("sluice_replicas_ready{model=\"embeddings\""), "{metrics}");
    // Nor model calls: its end-to-end time read as one "model call" of its name.
    assert!(!metrics.contains("sluice_inference_duration_seconds_count{model=\"embeddings\""), "{metrics}");
    assert!(!metrics.contains("sluice_batch_size_count{model=\"embeddings\""), "{metrics}");
    s.shutdown().await;
}

/// A pipeline's statistics count on across an apply that builds it again (every deploy, every
/// repository change): they went back to 0, and perf_analyzer's difference of two readings
/// underflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelines_statistics_survive_an_apply() {
    let s = start_embed().await;
    let client = reqwest::Client::new();
    let count = || async {
        let stats: Value =
            client.get(url(&s, "/v2/models/embeddings/stats")).send().await.unwrap().json().await.unwrap();
        stats["model_stats"][0]["inference_count"].as_u64().unwrap_or_else(|| panic!("{stats}"))
    };
    let r = client.post(url(&s, "/embed")).json(&json!({"text": ["one", "two"]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(count().await, 2);
    let text =
        format!("http_options: {{port: 0}}\ngrpc_options: {{port: 0}}\nadmin_options: {{port: 0}}\n{EMBED}");
    let config = sluice_config::parse(&text, &models_dir().join("p.yaml")).unwrap();
    s.controller().apply(&config).await.unwrap();
    assert_eq!(count().await, 2, "counted on after the apply");
    s.shutdown().await;
}

/// A binary-extension request with one BYTES element holding `raw` (any bytes, UTF-8 or not).
fn binary_bytes_request(raw: &[u8]) -> (Vec<u8>, usize) {
    let mut blob = (raw.len() as u32).to_le_bytes().to_vec();
    blob.extend_from_slice(raw);
    let header = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": blob.len()}}]}).to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&blob);
    (body, header.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_failing_at_run_time_is_named_and_the_pipeline_keeps_serving() {
    let s = start_embed().await;
    let client = reqwest::Client::new();
    // Not UTF-8: the pipeline accepts the BYTES tensor, the tokenizer step fails on it.
    let (body, header_len) = binary_bytes_request(&[0xff, 0xfe, b'a']);
    let r = client
        .post(url(&s, "/v2/models/embeddings/infer"))
        .header("Inference-Header-Content-Length", header_len)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "pipeline `embeddings` step `tokenize` (tok): text is not UTF-8", "{v}");
    // The same request with UTF-8 text runs every step.
    let (body, header_len) = binary_bytes_request("hello world".as_bytes());
    let r = client
        .post(url(&s, "/v2/models/embeddings/infer"))
        .header("Inference-Header-Content-Length", header_len)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Checked before any step runs: a wrong datatype for the pipeline's input, and a plain-JSON
    // body without the route's field.
    let body = json!({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]});
    let r = client.post(url(&s, "/v2/models/embeddings/infer")).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("has datatype FP32 but model `embeddings` expects BYTES"),
        "{v}"
    );
    let r = client.post(url(&s, "/embed")).json(&json!({"txt": ["x"]})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("missing field `text`"));
    let r = client.post(url(&s, "/embed")).json(&json!({"text": ["hello world"]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_failing_at_run_time_in_a_pipeline_is_named_with_its_error() {
    sluice_server::runtime::init(None, None).unwrap();
    // The reshape fixture runs only when x's size fits the requested shape: ONNX Runtime
    // itself fails otherwise, after every check has passed.
    let text = concat!(
        "http_options: {port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {enabled: false}\n",
        "applications:\n  - name: shapes\n    deployments:\n      - {name: r, model: reshape/model.onnx}\n",
        "    pipeline:\n      name: shaped\n",
        "      inputs: [{name: x, datatype: FP32, shape: [-1]}, {name: shape, datatype: INT64, shape: [-1]}]\n",
        "      steps:\n        - {name: reshape, deployment: r, inputs: {x: x, shape: shape}, outputs: {y: y}}\n",
        "      outputs: [y]\n",
    );
    let config = sluice_config::parse(text, &models_dir().join("p.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(std::time::Duration::from_secs(60)).await);
    let client = reqwest::Client::new();
    let request = |shape: [i64; 2]| {
        json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [6], "data": [0, 1, 2, 3, 4, 5]},
            {"name": "shape", "datatype": "INT64", "shape": [2], "data": shape},
        ]})
        .to_string()
    };
    let r = client.post(url(&s, "/v2/models/shaped/infer")).body(request([4, 4])).send().await.unwrap();
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    let e = v["error"].as_str().unwrap();
    assert!(e.starts_with("pipeline `shaped` step `reshape` (r): ONNX Runtime error: "), "{v}");
    let r = client.post(url(&s, "/v2/models/shaped/infer")).body(request([2, 3])).send().await.unwrap();
    assert_eq!(r.status(), 200, "the pipeline keeps serving");
    assert_eq!(r.json::<Value>().await.unwrap()["outputs"][0]["shape"], json!([2, 3]));
    s.shutdown().await;
}

#[test]
fn pipeline_config_errors_name_the_problem_and_location() {
    let broken = EMBED
        .replace("deployment: pool,", "deployment: nope,")
        .replace("inputs: {hidden: hidden, mask: mask}", "inputs: {hidden: hiden, mask: mask}");
    let text = format!("http_options: {{port: 0}}\n{broken}");
    let e = sluice_config::parse(&text, &models_dir().join("p.yaml")).unwrap_err().to_string();
    assert!(e.contains("unknown deployment `nope`"), "{e}");
    assert!(e.contains("tensor `hiden` is neither a pipeline input nor any step's output"), "{e}");
    assert!(e.contains("tensor `hidden` is never used"), "{e}");
    assert!(e.contains("p.yaml:"), "{e}");
    let cyclic = EMBED.replace("inputs: {text: text}", "inputs: {text: embedding}");
    let e =
        sluice_config::parse(&format!("http_options: {{port: 0}}\n{cyclic}"), &models_dir().join("p.yaml"))
            .unwrap_err()
            .to_string();
    assert!(e.contains("steps form a cycle: tokenize → encode → pool"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datatype_conflicts_between_steps_fail_the_load() {
    sluice_server::runtime::init(None, None).unwrap();
    // The pool's INT64 `mask` input fed with the encoder's FP32 output.
    let bad = EMBED.replace("{hidden: hidden, mask: mask}", "{hidden: hidden, mask: hidden}");
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\n{bad}"
    );
    let config = sluice_config::parse(&text, &models_dir().join("p.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let err = sluice_server::start(config, Default::default()).await.err().expect("load fails").to_string();
    assert!(err.contains("pipeline `embeddings`: step `pool`: tensor `hidden` is FP32"), "{err}");
    assert!(err.contains("input `mask` takes INT64"), "{err}");
    // `sluice validate` refuses it as well (it loads each model but starts no deployment).
    let file = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("datatype-conflict.yaml");
    let models = format!("{}/tiny-encoder/", models_dir().display());
    std::fs::write(&file, bad.replace("tiny-encoder/", &models)).unwrap();
    let validate =
        || std::process::Command::new(env!("CARGO_BIN_EXE_sluice")).arg("validate").arg(&file).output();
    let out = validate().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("pipeline `embeddings`: step `pool`: tensor `hidden` is FP32"), "{err}");
    // The same file with the mapping right passes.
    std::fs::write(&file, EMBED.replace("tiny-encoder/", &models)).unwrap();
    let out = validate().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
