//! The custom step end to end: registered, composed with a built-in step in a pipeline, served
//! over the JSON route and the OIP endpoint.

use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_rust_step_serves_in_a_pipeline() {
    sluice_example_custom_step::register();
    sluice_server::runtime::init(None, None).unwrap();
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\n{}",
        sluice_example_custom_step::CONFIG
    );
    let config = sluice_config::parse(&text, std::path::Path::new("custom-step.yaml")).unwrap();
    let server = sluice_server::start(config, Default::default()).await.unwrap();
    let base = format!("http://{}", server.http_addr());
    let client = reqwest::Client::new();
    let out: Value = client
        .post(format!("{base}/weather"))
        .json(&json!({"celsius": [0.0, 100.0, -40.0]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        out,
        json!({"fahrenheit": [[32.0], [212.0], [-40.0]], "whole_degrees": [[32.0], [212.0], [-40.0]]})
    );
    let out: Value = client
        .post(format!("{base}/weather"))
        .json(&json!({"celsius": [36.6]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(out["whole_degrees"], json!([[98.0]]), "{out}");
    let body = json!({"inputs": [{"name": "celsius", "datatype": "FP32", "shape": [1], "data": [37.0]}]});
    let out: Value = client
        .post(format!("{base}/v2/models/forecast/infer"))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let f = out["outputs"][0]["data"][0].as_f64().unwrap();
    assert!((f - 98.6).abs() < 1e-4, "{out}");
    server.shutdown().await;
}

#[test]
fn an_unregistered_custom_step_is_a_clear_error() {
    let b = sluice_config::Builtin::Custom { name: "nope".into() };
    let err = sluice_deployments::builtin::factory(&b).err().unwrap();
    assert!(err.to_string().contains("no custom step `nope` is registered"), "{err}");
    assert_eq!(err.kind(), sluice_deployments::ErrorKind::InvalidArgument);
}
