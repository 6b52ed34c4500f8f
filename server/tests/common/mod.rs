//! Shared test harness: fixture paths, a server on port 0, expected-output comparison.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// The example models made by examples/make_models.py (committed as fixtures).
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

/// The expected cases of a fixture model.
pub fn expected(model: &str) -> Value {
    let path = models_dir().join(model).join("expected.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Starts a server from YAML `deployments:` entries (model paths relative to examples/models),
/// on a free port.
pub async fn start(deployments_yaml: &str, extra_http: &str) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).expect("ONNX Runtime (run scripts/install-onnxruntime.sh)");
    let text = format!(
        "http_options: {{host: 127.0.0.1, port: 0{extra_http}}}\ngrpc_options: {{port: 0}}\nadmin_options: {{port: 0}}\napplications:\n  - name: test\n    deployments:\n{deployments_yaml}"
    );
    let config =
        sluice_config::parse(&text, &models_dir().join("test.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let server = sluice_server::start(config, Default::default()).await.expect("server starts");
    assert!(server.wait_ready(std::time::Duration::from_secs(60)).await, "deployments warm up");
    server
}

/// Deployments for every fixture model.
pub const ALL_MODELS: &str = "      - {name: iris, model: iris/model.onnx}
      - {name: mlp, model: mlp/model.onnx, num_replicas: 2, max_queued_requests: 200}
      - {name: dtypes, model: dtypes/model.onnx}
      - {name: reshape, model: reshape/model.onnx}
";

pub fn url(server: &sluice_server::Server, path: &str) -> String {
    format!("http://{}{path}", server.http_addr())
}

/// GETs `path` on the REST port: the status and the JSON body.
pub async fn get_json(server: &sluice_server::Server, path: &str) -> (u16, Value) {
    let r = reqwest::get(url(server, path)).await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}")))
}

/// Asserts that `got` (response outputs) equals `want` (expected outputs), names, datatypes and
/// shapes exactly and data within `tolerance` (relative for large values).
pub fn assert_outputs_match(got: &Value, want: &Value, tolerance: f64) {
    let got = got.as_array().expect("outputs array");
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "output count: {got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["name"], w["name"]);
        assert_eq!(g["datatype"], w["datatype"], "{}", w["name"]);
        assert_eq!(g["shape"], w["shape"], "{}", w["name"]);
        let (gd, wd) = (g["data"].as_array().unwrap(), w["data"].as_array().unwrap());
        assert_eq!(gd.len(), wd.len(), "{}", w["name"]);
        for (a, b) in gd.iter().zip(wd) {
            match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) if a.is_f64() || b.is_f64() => {
                    let tol = tolerance.max(1e-6) * y.abs().max(1.0);
                    assert!((x - y).abs() <= tol, "{}: {x} vs {y}", w["name"]);
                }
                _ => assert_eq!(a, b, "{}", w["name"]),
            }
        }
    }
}

pub mod grpc;
pub mod held;
