//! Valid inputs each target starts from (libFuzzer mutates them; the regression test runs
//! them), made in code so that they follow the formats as they change.

use bytes::Bytes;
use prost::Message;
use serde_json::json;
use sluice_proto::inference as pb;

/// The seed inputs of target `name` (empty for an unknown one).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "rest_json" => rest_json(),
        "rest_binary" => rest_binary(),
        "grpc_infer" => grpc_infer(),
        "batch" => batch(),
        "config" => config(),
        _ => Vec::new(),
    }
}

fn rest_json() -> Vec<Vec<u8>> {
    [
        json!({"id": "1", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}),
        json!({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}], "outputs": [{"name": "y", "parameters": {"binary_data": true}}]}),
        json!({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a", "héllo"]}], "parameters": {"timeout": 1000}}),
        json!({"inputs": [{"name": "b", "datatype": "BOOL", "shape": [3], "data": [true, false, true]},
                          {"name": "h", "datatype": "FP16", "shape": [1], "data": [0.5]},
                          {"name": "u", "datatype": "UINT8", "shape": [2], "data": [0, 255]}]}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .collect()
}

fn rest_binary() -> Vec<Vec<u8>> {
    let head = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}],
                      "parameters": {"binary_data_output": true}})
    .to_string();
    let mut one = format!("{}\n{head}", head.len()).into_bytes();
    one.extend([1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()));
    let bytes_head = json!({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]}).to_string();
    let mut two = format!("{}\n{bytes_head}", bytes_head.len()).into_bytes();
    two.extend(3u32.to_le_bytes());
    two.extend(b"abc");
    vec![one, two]
}

fn grpc_infer() -> Vec<Vec<u8>> {
    let input = |name: &str, datatype: &str, shape: Vec<i64>, contents: Option<pb::InferTensorContents>| {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    };
    let raw = pb::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![input("input", "FP32", vec![1, 4], None)],
        raw_input_contents: vec![Bytes::from(
            [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>(),
        )],
        outputs: vec![pb::model_infer_request::InferRequestedOutputTensor {
            name: "label".into(),
            parameters: Default::default(),
        }],
        ..Default::default()
    };
    let typed = pb::ModelInferRequest {
        model_name: "m".into(),
        id: "7".into(),
        inputs: vec![
            input(
                "i",
                "INT32",
                vec![2],
                Some(pb::InferTensorContents { int_contents: vec![1, -2], ..Default::default() }),
            ),
            input(
                "s",
                "BYTES",
                vec![1],
                Some(pb::InferTensorContents {
                    bytes_contents: vec![b"text".to_vec()],
                    ..Default::default()
                }),
            ),
            input(
                "d",
                "FP64",
                vec![1],
                Some(pb::InferTensorContents { fp64_contents: vec![0.25], ..Default::default() }),
            ),
        ],
        ..Default::default()
    };
    vec![raw.encode_to_vec(), typed.encode_to_vec()]
}

fn batch() -> Vec<Vec<u8>> {
    vec![
        // FP32, rank 2, one input, batch 8, unpadded, 3 requests.
        vec![
            6, 1, 0, 7, 0, 2, 1, 2, 10, 20, 30, 40, 50, 60, 70, 80, 2, 2, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 9, 9,
            9, 9, 9, 9, 9, 9,
        ],
        // INT64, rank 3, two inputs, padded with 1, 4 requests of other lengths.
        vec![
            4, 2, 1, 7, 1, 1, 1, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 2, 1, 3, 11, 12, 13, 14, 15, 16, 3, 1, 1,
            17, 18, 19,
        ],
        // BYTES, rank 1, one input.
        vec![8, 0, 0, 3, 0, 2, 2, 3, b'a', b'b', b'c', 1, b'z', 1, 0],
    ]
}

fn config() -> Vec<Vec<u8>> {
    [
        "http_options: {host: 127.0.0.1, port: 8000, max_body_bytes: 1024, tls: {cert_file: c.pem, key_file: k.pem}}\n\
         applications:\n  - name: a\n    deployments:\n      - {name: m, model: m.onnx, num_replicas: 2, max_batch_size: 8}\n",
        "applications:\n  - name: a\n    deployments:\n      - name: m\n        model: m.onnx\n        num_replicas: auto\n        \
         autoscaling_config: {min_replicas: 0, max_replicas: 4}\n        canary: {model: m2.onnx, version: \"2\", weight: 10}\n",
        "applications:\n  - name: e\n    route_prefix: /embed\n    deployments:\n      - {name: tok, builtin: {tokenizer: {path: t.json}}}\n    \
         pipeline:\n      name: p\n      inputs: [{name: text, datatype: BYTES, shape: [-1]}]\n      \
         steps: [{name: s, deployment: tok, inputs: {text: text}, outputs: {input_ids: ids}}]\n      outputs: [ids]\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
