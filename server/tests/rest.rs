//! The REST frontend against the real server on port 0 with the fixture models: exact answers
//! and every bad-input case's status and message.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post(
    server: &sluice_server::Server,
    path: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let r = reqwest::Client::new().post(url(server, path)).body(body).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

async fn get(server: &sluice_server::Server, path: &str) -> (StatusCode, Value) {
    let r = reqwest::get(url(server, path)).await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error field: {v}"))
}

#[tokio::test]
async fn health_and_server_metadata() {
    let s = start(ALL_MODELS, "").await;
    assert_eq!(get(&s, "/v2/health/live").await.0, StatusCode::OK);
    assert_eq!(get(&s, "/v2/health/ready").await.0, StatusCode::OK);
    let (status, meta) = get(&s, "/v2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(meta["name"], "sluice");
    assert!(meta["version"].is_string());
    assert!(meta["extensions"].is_array());
    s.shutdown().await;
}

#[tokio::test]
async fn model_metadata_and_readiness() {
    let s = start(ALL_MODELS, "").await;
    let (status, meta) = get(&s, "/v2/models/iris").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        meta,
        json!({
            "name": "iris", "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
            ]
        })
    );
    assert_eq!(get(&s, "/v2/models/iris/versions/1").await.1, meta);
    assert_eq!(get(&s, "/v2/models/iris/ready").await.0, StatusCode::OK);
    assert_eq!(get(&s, "/v2/models/iris/versions/1/ready").await.0, StatusCode::OK);

    let (status, body) = get(&s, "/v2/models/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("unknown model `nope`"));
    let (status, body) = get(&s, "/v2/models/iris/versions/7/ready").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("unknown version `7` of model `iris`"));

    let (status, meta) = get(&s, "/v2/models/dtypes").await;
    assert_eq!(status, StatusCode::OK);
    let dtypes: Vec<&str> =
        meta["inputs"].as_array().unwrap().iter().map(|i| i["datatype"].as_str().unwrap()).collect();
    assert_eq!(
        dtypes,
        [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
            "FP64", "BYTES"
        ]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn every_fixture_case_matches_onnxruntime_python() {
    let s = start(ALL_MODELS, "").await;
    for model in ["iris", "mlp", "dtypes", "reshape"] {
        let doc = expected(model);
        let tol = doc["tolerance"].as_f64().unwrap();
        for case in doc["cases"].as_array().unwrap() {
            let body = json!({"id": format!("{model}-{}", case["name"].as_str().unwrap()), "inputs": case["inputs"]});
            let (status, out) = post(&s, &format!("/v2/models/{model}/infer"), body.to_string()).await;
            assert_eq!(status, StatusCode::OK, "{model} {}: {out}", case["name"]);
            assert_eq!(out["model_name"], model);
            assert_eq!(out["model_version"], "1");
            assert_eq!(out["id"], body["id"]);
            assert_outputs_match(&out["outputs"], &case["outputs"], tol);
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn nested_data_requested_outputs_and_versions() {
    let s = start(ALL_MODELS, "").await;
    let case = &expected("iris")["cases"][3]; // batch of 8
    let flat = case["inputs"][0]["data"].as_array().unwrap();
    let nested: Vec<Value> = flat.chunks(4).map(|c| Value::from(c.to_vec())).collect();
    let body = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 4], "data": nested}],
        "outputs": [{"name": "probabilities"}]
    });
    let (status, out) = post(&s, "/v2/models/iris/versions/1/infer", body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert!(out.get("id").is_none(), "no id sent, none echoed");
    assert_outputs_match(&out["outputs"], &json!([case["outputs"][1]]), 1e-5);

    // Order follows the request.
    let body = json!({
        "inputs": case["inputs"],
        "outputs": [{"name": "probabilities"}, {"name": "label"}]
    });
    let (_, out) = post(&s, "/v2/models/iris/infer", body.to_string()).await;
    assert_outputs_match(&out["outputs"], &json!([case["outputs"][1], case["outputs"][0]]), 1e-5);

    // An empty list asks for every output, as gRPC reads it (it answered none).
    let body = json!({"inputs": case["inputs"], "outputs": []});
    let (status, out) = post(&s, "/v2/models/iris/infer", body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_outputs_match(&out["outputs"], &case["outputs"], 1e-5);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving() {
    let s = start(ALL_MODELS, ", max_body_bytes: 4096").await;
    let iris = |shape: Value, data: Value| {
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": data}]}).to_string()
    };
    let cases: Vec<(&str, String, StatusCode, &str)> = vec![
        ("iris", "{not json".into(), StatusCode::BAD_REQUEST, "malformed inference request JSON"),
        ("iris", "{}".into(), StatusCode::BAD_REQUEST, "missing field `inputs`"),
        ("nope", iris(json!([1, 4]), json!([1, 2, 3, 4])), StatusCode::NOT_FOUND, "unknown model `nope`"),
        ("iris/versions/3", iris(json!([1, 4]), json!([1, 2, 3, 4])), StatusCode::NOT_FOUND, "unknown version `3`"),
        (
            "iris",
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "unknown input `x` for model `iris`; its inputs are: input",
        ),
        ("iris", json!({"inputs": []}).to_string(), StatusCode::BAD_REQUEST, "missing input `input` for model `iris`"),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "input `input` has datatype INT64 but model `iris` expects FP32",
        ),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "FLOAT", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "unknown datatype `FLOAT`",
        ),
        ("iris", iris(json!([4]), json!([1, 2, 3, 4])), StatusCode::BAD_REQUEST, "has shape [4] but model `iris` expects [-1, 4]"),
        ("iris", iris(json!([1, 4]), json!([1, 2, 3])), StatusCode::BAD_REQUEST, "(4 elements) but its data has 3"),
        ("iris", iris(json!([1, 4]), json!(["a", 2, 3, 4])), StatusCode::BAD_REQUEST, "found string"),
        (
            "iris",
            iris(json!([9223372036854775807u64, 4]), json!([1, 2, 3, 4])),
            StatusCode::BAD_REQUEST,
            "too many elements",
        ),
        ("iris", iris(json!([18446744073709551615u64, 4]), json!([1])), StatusCode::BAD_REQUEST, "larger than"),
        // An empty tensor whose other dimensions a model could allocate (gigabytes).
        ("iris", iris(json!([33554432, 0]), json!([])), StatusCode::BAD_REQUEST, "span more than 16777216 elements"),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "input `input` has no `data`",
        ),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], "outputs": [{"name": "labels"}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "unknown output `labels` for model `iris`",
        ),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], "outputs": [{"name": "probabilities", "parameters": {"shared_memory_region": "r"}}]}).to_string(),
            StatusCode::NOT_IMPLEMENTED,
            "output `probabilities`: shared memory is not supported",
        ),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], "parameters": {"shared_memory_region": "r"}}]}).to_string(),
            StatusCode::NOT_IMPLEMENTED,
            "input `input`: shared memory is not supported",
        ),
        (
            "iris",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}], "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}).to_string(),
            StatusCode::NOT_IMPLEMENTED,
            "output `probabilities`: the classification extension is not supported",
        ),
        (
            "iris",
            json!({"parameters": {"triton_other": true}, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "parameter `triton_other` is reserved",
        ),
        (
            "iris",
            json!({"parameters": {"triton_enable_empty_final_response": "yes"}, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).to_string(),
            StatusCode::BAD_REQUEST,
            "parameter `triton_enable_empty_final_response` must be a boolean",
        ),
        ("iris", "x".repeat(5000), StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded"),
        (
            "reshape",
            json!({"inputs": [
                {"name": "x", "datatype": "FP32", "shape": [5], "data": [1, 2, 3, 4, 5]},
                {"name": "shape", "datatype": "INT64", "shape": [2], "data": [2, 3]}
            ]}).to_string(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "ONNX Runtime error",
        ),
    ];
    for (model, body, want_status, want_message) in cases {
        let (status, out) = post(&s, &format!("/v2/models/{model}/infer"), body).await;
        assert_eq!(status, want_status, "{model}: {out}");
        assert!(error_of(&out).contains(want_message), "{model}: want {want_message:?} in {out}");
        // And the server still answers a good request.
        let (status, _) =
            post(&s, "/v2/models/iris/infer", iris(json!([1, 4]), json!([5.1, 3.5, 1.4, 0.2]))).await;
        assert_eq!(status, StatusCode::OK);
    }
    // The one `triton_` parameter Triton takes, taken.
    let body = json!({"parameters": {"triton_enable_empty_final_response": true}, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]});
    let (status, out) = post(&s, "/v2/models/iris/infer", body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    s.shutdown().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let s = start(ALL_MODELS, "").await;
    let (status, body) = get(&s, "/v3/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body), "Not Found");
    let (status, body) = get(&s, "/v2/models/iris/infer").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!error_of(&body).is_empty());
    s.shutdown().await;
}

#[tokio::test]
async fn model_names_are_percent_decoded() {
    let s = start("      - {name: iris-v1, model: iris/model.onnx}\n", "").await;
    assert_eq!(get(&s, "/v2/models/iris%2Dv1").await.0, StatusCode::OK);
    // Infer paths: plain ones take the frontend's short way, escaped ones the router; both
    // answer the same, with and without a version, and the same paths miss alike.
    let row = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]});
    for path in [
        "/v2/models/iris-v1/infer",
        "/v2/models/iris%2Dv1/infer",
        "/v2/models/iris-v1/versions/1/infer",
        "/v2/models/iris%2dv1/versions/%31/infer",
    ] {
        let (status, body) = post(&s, path, row.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(body["model_name"], "iris-v1", "{path}");
        assert_eq!(body["outputs"][0]["data"], json!([0]), "{path}: {body}");
    }
    for (path, want) in [
        ("/v2/models/iris-v1/versions/2/infer", StatusCode::NOT_FOUND),
        ("/v2/models/iris%2Dv1/versions/2/infer", StatusCode::NOT_FOUND),
        ("/v2/models/nope/infer", StatusCode::NOT_FOUND),
        ("/v2/models//infer", StatusCode::NOT_FOUND),
        ("/v2/models/iris-v1/infer/", StatusCode::NOT_FOUND),
    ] {
        let (status, body) = post(&s, path, row.to_string()).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(!error_of(&body).is_empty(), "{path}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let s = start(ALL_MODELS, "").await;
    let doc = expected("mlp");
    let case = &doc["cases"][1];
    let rows =
        case["inputs"][0]["data"].as_array().unwrap().chunks(8).map(|c| c.to_vec()).collect::<Vec<_>>();
    let want =
        case["outputs"][1]["data"].as_array().unwrap().chunks(4).map(|c| c.to_vec()).collect::<Vec<_>>();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (row, want) = (rows[i % rows.len()].clone(), want[i % want.len()].clone());
        let (client, url) = (client.clone(), url(&s, "/v2/models/mlp/infer"));
        tasks.push(tokio::spawn(async move {
            let body = json!({"id": i.to_string(), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": row}], "outputs": [{"name": "probabilities"}]});
            let out: Value = client.post(url).body(body.to_string()).send().await.unwrap().json().await.unwrap();
            assert_eq!(out["id"], i.to_string());
            let expected = json!([{"name": "probabilities", "datatype": "FP32", "shape": [1, 4], "data": want}]);
            assert_outputs_match(&out["outputs"], &expected, 1e-5);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    s.shutdown().await;
}

/// A body in the binary tensor extension's form: JSON, then the blobs.
fn binary_body(json: &Value, blobs: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut body = json.to_string().into_bytes();
    let n = body.len();
    for b in blobs {
        body.extend_from_slice(b);
    }
    (body, n)
}

async fn post_binary(
    s: &sluice_server::Server,
    model: &str,
    body: Vec<u8>,
    json_len: usize,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(url(s, &format!("/v2/models/{model}/infer")))
        .header("Inference-Header-Content-Length", json_len)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn binary_inputs_and_outputs() {
    let s = start(ALL_MODELS, "").await;
    let case = &expected("iris")["cases"][3];
    let floats: Vec<u8> = case["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| (v.as_f64().unwrap() as f32).to_le_bytes())
        .collect();
    let json = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 4], "parameters": {"binary_data_size": floats.len()}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": true}}, {"name": "probabilities", "parameters": {"binary_data": false}}]
    });
    let (body, n) = binary_body(&json, &[&floats]);
    let r = post_binary(&s, "iris", body, n).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let header_len: usize = r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..header_len]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 64);
    assert!(head["outputs"][0].get("data").is_none());
    let labels: Vec<i64> =
        bytes[header_len..].chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let want: Vec<i64> =
        case["outputs"][0]["data"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(labels, want);
    assert_outputs_match(&json!([head["outputs"][1]]), &json!([case["outputs"][1]]), 1e-5);

    // Request-level binary_data_output applies to outputs that do not say otherwise.
    let json = json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [8, 4], "parameters": {"binary_data_size": floats.len()}}],
        "parameters": {"binary_data_output": true}
    });
    let (body, n) = binary_body(&json, &[&floats]);
    let r = post_binary(&s, "iris", body, n).await;
    let header_len: usize = r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = r.bytes().await.unwrap();
    assert_eq!(bytes.len() - header_len, 8 * 8 + 8 * 3 * 4);
    s.shutdown().await;
}

#[tokio::test]
async fn binary_extension_errors() {
    let s = start(ALL_MODELS, "").await;
    let input = |size: usize| json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": size}}]});
    let cases: Vec<(Vec<u8>, usize, &str)> = vec![
        {
            let (b, n) = binary_body(&input(16), &[&[0u8; 12]]);
            (b, n, "unexpected size for input `input`")
        },
        {
            let (b, n) = binary_body(&input(16), &[&[0u8; 20]]);
            (b, n, "unexpected additional input data: 4 bytes")
        },
        {
            let (b, n) = binary_body(&input(12), &[&[0u8; 12]]);
            (b, n, "needs 16 bytes of data, got 12")
        },
        {
            let j = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4], "parameters": {"binary_data_size": 16}}]});
            let (b, n) = binary_body(&j, &[&[0u8; 16]]);
            (b, n, "both `data` and `binary_data_size`")
        },
        {
            let (b, _) = binary_body(&input(16), &[&[0u8; 16]]);
            let n = b.len() + 1;
            (b, n, "but the body has only")
        },
    ];
    for (body, n, message) in cases {
        let r = post_binary(&s, "iris", body, n).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v: Value = r.json().await.unwrap();
        assert!(error_of(&v).contains(message), "want {message:?} in {v}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn binary_bool_bytes_must_be_0_or_1() {
    let s = start(ALL_MODELS, "").await;
    let case = &expected("dtypes")["cases"][0];
    // `in_BOOL` sent as binary data, the other inputs as JSON.
    let body_with = |bools: &[u8]| {
        let mut inputs = case["inputs"].as_array().unwrap().clone();
        let at = inputs.iter().position(|i| i["name"] == "in_BOOL").unwrap();
        let shape = inputs[at]["shape"].clone();
        inputs[at] = json!({"name": "in_BOOL", "datatype": "BOOL", "shape": shape, "parameters": {"binary_data_size": bools.len()}});
        binary_body(&json!({ "inputs": inputs }), &[bools])
    };
    let want: Vec<u8> =
        case["inputs"][0]["data"].as_array().unwrap().iter().map(|b| b.as_bool().unwrap() as u8).collect();
    assert_eq!(case["inputs"][0]["name"], "in_BOOL");
    let (body, n) = body_with(&want);
    let r = post_binary(&s, "dtypes", body, n).await;
    assert_eq!(r.status(), StatusCode::OK);
    let out: Value = r.json().await.unwrap();
    assert_outputs_match(
        &out["outputs"],
        &case["outputs"],
        expected("dtypes")["tolerance"].as_f64().unwrap(),
    );

    let mut bad = want.clone();
    bad[1] = 2;
    let (body, n) = body_with(&bad);
    let r = post_binary(&s, "dtypes", body, n).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert!(error_of(&v).contains("input `in_BOOL`: BOOL element 1 is the byte 0x02"), "{v}");
    // The server keeps serving.
    let (body, n) = body_with(&want);
    assert_eq!(post_binary(&s, "dtypes", body, n).await.status(), StatusCode::OK);
    s.shutdown().await;
}

#[tokio::test]
async fn model_config_and_repository_index() {
    let s = start(
        "      - {name: iris, model: iris/model.onnx, max_batch_size: 8, num_replicas: 2}\n      - {name: dtypes, model: dtypes/model.onnx}\n",
        "",
    )
    .await;
    let (status, c) = get(&s, "/v2/models/iris/config").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(c["max_batch_size"], 8);
    assert_eq!(
        c["input"][0],
        json!({"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [4], "is_shape_tensor": false, "allow_ragged_batch": false, "optional": false})
    );
    assert_eq!(c["output"][0]["dims"], json!([]));
    assert_eq!(c["output"][1]["dims"], json!([3]));
    assert_eq!(c["instance_group"][0]["count"], 2);
    assert_eq!(c["model_transaction_policy"]["decoupled"], false);
    assert_eq!(c["response_cache"]["enable"], false);
    // Without batching, dims are the whole shape.
    let (_, c) = get(&s, "/v2/models/dtypes/config").await;
    assert_eq!(c["max_batch_size"], 0);
    assert_eq!(c["input"][0]["dims"], json!([-1, 2]));
    let (status, index) = post(&s, "/v2/repository/index", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        index,
        json!([{"name": "dtypes", "version": "1", "state": "READY"}, {"name": "iris", "version": "1", "state": "READY"}])
    );
    // Batch limit is enforced.
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [9, 4], "data": vec![1.0; 36]}]});
    let (status, out) = post(&s, "/v2/models/iris/infer", body.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&out).contains("batch-size must be <= 8"), "{out}");
    s.shutdown().await;
}

#[tokio::test]
async fn batching_needs_a_dynamic_first_dimension() {
    sluice_server::runtime::init(None, None).unwrap();
    let text = "grpc_options: {enabled: false}\nadmin_options: {enabled: false}\nhttp_options: {port: 0}\napplications:\n  - name: t\n    deployments: [{name: r, model: reshape/model.onnx, max_batch_size: 4}]\n";
    let config = sluice_config::parse(text, &models_dir().join("t.yaml")).unwrap();
    let err = sluice_server::start(config, Default::default()).await.err().expect("start fails");
    let sluice_server::StartError::Control(e) = &err else { panic!("{err}") };
    assert_eq!(e.kind(), sluice_deployments::ErrorKind::InvalidArgument, "{err}");
    assert!(err.to_string().contains("deployment `r` version 1: max_batch_size is 4"), "{err}");
    assert!(err.to_string().contains("batching needs a dynamic first dimension"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_on_the_real_model() {
    let s = start(
        "      - {name: mlp-batched, model: mlp/model.onnx, max_batch_size: 32, batch_wait_timeout_s: 0.05}\n",
        "",
    )
    .await;
    let doc = expected("mlp");
    let case = &doc["cases"][1];
    let rows =
        case["inputs"][0]["data"].as_array().unwrap().chunks(8).map(|c| c.to_vec()).collect::<Vec<_>>();
    let want =
        case["outputs"][1]["data"].as_array().unwrap().chunks(4).map(|c| c.to_vec()).collect::<Vec<_>>();
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (row, want) = (rows[i % 5].clone(), want[i % 5].clone());
        let (client, url) = (client.clone(), url(&s, "/v2/models/mlp-batched/infer"));
        tasks.push(tokio::spawn(async move {
            let body = json!({"id": i.to_string(), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": row}], "outputs": [{"name": "probabilities"}]});
            let out: Value = client.post(url).body(body.to_string()).send().await.unwrap().json().await.unwrap();
            assert_eq!(out["id"], i.to_string());
            let expected = json!([{"name": "probabilities", "datatype": "FP32", "shape": [1, 4], "data": want}]);
            assert_outputs_match(&out["outputs"], &expected, 1e-5);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The batch-size histogram saw batches of more than one row.
    let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    let metric = |name: &str| -> f64 {
        let prefix = format!("{name}{{model=\"mlp-batched\",version=\"1\"}} ");
        let line =
            text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix} in {text}"));
        line[prefix.len()..].parse().unwrap()
    };
    let (sum, count) = (metric("sluice_batch_size_sum"), metric("sluice_batch_size_count"));
    assert_eq!(sum, 24.0, "every row ran once");
    assert!(count < 24.0, "{count} model calls for 24 requests: batched");
    assert!(text.contains("# HELP sluice_requests_total"), "described");
    assert!(text.contains(
        r#"sluice_requests_total{model="mlp-batched",version="1",protocol="rest",outcome="success"} 24"#
    ));
    // Triton-style statistics from the same counters.
    let (_, stats) = get(&s, "/v2/models/mlp-batched/stats").await;
    let m = &stats["model_stats"][0];
    assert_eq!(m["inference_count"], 24);
    assert_eq!(m["execution_count"].as_f64().unwrap(), count);
    assert_eq!(m["inference_stats"]["success"]["count"], 24);
    s.shutdown().await;
}

/// The request duration counts from the body in memory, as on gRPC and the JSON routes: a
/// client that takes a second to upload its body does not make the request read a second slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_counted_in_the_request_duration() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start("      - {name: iris-slow-upload, model: iris/model.onnx}\n", "").await;
    let body = r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}"#;
    let mut conn = tokio::net::TcpStream::connect(s.http_addr()).await.unwrap();
    let head = format!(
        "POST /v2/models/iris-slow-upload/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    conn.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let text = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    let prefix =
        r#"sluice_request_duration_seconds_sum{model="iris-slow-upload",version="1",protocol="rest"} "#;
    let line =
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in {text}"));
    let seconds: f64 = line[prefix.len()..].parse().unwrap();
    assert!(seconds < 0.5, "{seconds} s counted for a request whose upload took 1 s");
    s.shutdown().await;
}
