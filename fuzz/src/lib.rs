//! Fuzz targets for every decoder that reads untrusted bytes, as plain functions: libFuzzer
//! drives them (`fuzz/libfuzzer`, `scripts/fuzz.sh`), and `tests/regressions.rs` runs the seeds
//! and every saved crash through them on each `cargo test`. A target returns normally for any
//! input, whether it decodes or is refused with an error; it panics only on a bug: a panic in
//! the code under test, or a broken property (a batch that does not split back into its
//! requests, a decoded tensor that does not encode).

mod seeds;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use prost::Message;
use sluice_deployments::{
    BatchPolicy, DataType, InferRequest, InferResponse, ModelMetadata, NamedTensor, Tensor, TensorSpec,
    check_request, run_batched,
};
use sluice_proto::inference as pb;
use sluice_server::grpc::codec;
use sluice_server::rest::infer::{HEADER_CONTENT_LENGTH, decode_request};
use sluice_server::rest::json::JsonData;

pub use seeds::seeds;

/// A fuzz target: any bytes in, a panic only on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name libFuzzer, the seed corpus and the regression folders use.
pub const TARGETS: &[(&str, Target)] = &[
    ("rest_json", rest_json),
    ("rest_binary", rest_binary),
    ("grpc_infer", grpc_infer),
    ("batch", batch),
    ("config", config),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// A decoded request's tensors encode again, as JSON and as a gRPC answer.
fn encodes(request: InferRequest) {
    for input in &request.inputs {
        serde_json::to_vec(&JsonData(&input.tensor)).expect("a decoded tensor encodes as JSON");
    }
    let response = InferResponse {
        model_name: "m".into(),
        model_version: "1".into(),
        id: request.id,
        outputs: request.inputs,
    };
    let encoded = codec::encode(response);
    assert_eq!(encoded.outputs.len(), encoded.raw_output_contents.len());
}

/// The REST infer body, JSON only.
pub fn rest_json(data: &[u8]) {
    if let Ok((request, _)) = decode_request(&HeaderMap::new(), Bytes::copy_from_slice(data)) {
        encodes(request);
    }
}

/// The REST infer body with the binary extension: the first line is the
/// `Inference-Header-Content-Length` value (any text), the rest the body.
pub fn rest_binary(data: &[u8]) {
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(header) {
        headers.insert(HEADER_CONTENT_LENGTH, v);
    }
    if let Ok((request, _)) = decode_request(&headers, Bytes::copy_from_slice(body)) {
        encodes(request);
    }
}

/// A gRPC `ModelInferRequest` message, then its conversion to a request.
pub fn grpc_infer(data: &[u8]) {
    let Ok(message) = pb::ModelInferRequest::decode(Bytes::copy_from_slice(data)) else { return };
    if let Ok(request) = codec::decode(message) {
        encodes(request);
    }
}

/// The config parser and validator, on any UTF-8 text.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice_config::parse(text, Path::new("/nonexistent/fuzz/app.yaml"));
    }
}

/// Bytes read one at a time, zeros once they run out.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

const DTYPES: &[DataType] = &[
    DataType::Bool,
    DataType::Uint8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::Fp16,
    DataType::Fp32,
    DataType::Fp64,
    DataType::Bytes,
];

/// Tensor concatenation and splitting: requests of a model with one or two inputs of a
/// datatype and rank the input chooses, each with shapes and data it chooses, are checked like
/// real requests, then batched through a model that returns its inputs. Every request checked
/// must come back exactly as it went in (padding included: it is cropped off again).
pub fn batch(data: &[u8]) {
    let mut r = Reader(data);
    let dtype = DTYPES[r.byte() as usize % DTYPES.len()];
    let rank = 1 + r.byte() as usize % 3;
    let names: &[&str] = if r.byte() % 2 == 0 { &["a"] } else { &["a", "b"] };
    let max_batch_size = 1 + r.byte() as usize % 8;
    let padded = dtype != DataType::Bytes && r.byte() % 2 == 1;
    let pad: HashMap<String, f64> = if padded {
        names.iter().map(|n| (n.to_string(), f64::from(r.byte()))).collect()
    } else {
        HashMap::new()
    };
    let spec = |n: &&str| TensorSpec { name: n.to_string(), dtype, shape: vec![-1; rank] };
    let meta = ModelMetadata {
        platform: "fuzz".into(),
        inputs: names.iter().map(spec).collect(),
        outputs: names.iter().map(spec).collect(),
    };
    let count = 1 + r.byte() as usize % 8;
    let mut requests = Vec::new();
    for _ in 0..count {
        // One shape for every input of a request, as sequence models have (ids and mask of one
        // length): cropping outputs back to a request's own lengths relies on it.
        let mut shape = vec![r.byte() as usize % 5];
        shape.extend((1..rank).map(|_| r.byte() as usize % 4));
        let mut inputs = Vec::new();
        for name in names {
            if let Some(tensor) = tensor(dtype, shape.clone(), &mut r) {
                inputs.push(NamedTensor { name: name.to_string(), tensor });
            }
        }
        let request = InferRequest { inputs, ..Default::default() };
        if check_request("fuzz", &meta, max_batch_size, &request).is_ok() {
            requests.push(request.inputs);
        }
    }
    let policy = BatchPolicy { max_batch_size, pad: Arc::new(pad), ..Default::default() };
    let outputs: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let answers = run_batched(&policy, requests.clone(), &outputs, &mut |inputs, _| Ok(inputs));
    for (sent, answer) in requests.iter().zip(answers) {
        let got = answer.unwrap_or_else(|e| panic!("a checked request failed in its batch: {e}"));
        assert_eq!(got.len(), sent.len(), "outputs per request");
        for (g, s) in got.iter().zip(sent) {
            assert_eq!(g.name, s.name);
            assert_eq!(g.tensor.shape(), s.tensor.shape(), "`{}` came back in another shape", s.name);
            assert_eq!(g.tensor.data(), s.tensor.data(), "`{}` came back with other data", s.name);
        }
    }
}

/// A tensor of `shape` whose bytes come from `r` (BYTES: elements of 0-3 bytes).
fn tensor(dtype: DataType, shape: Vec<usize>, r: &mut Reader<'_>) -> Option<Tensor> {
    let count: usize = shape.iter().product();
    let data: Vec<u8> = match dtype.byte_size() {
        Some(size) => (0..count * size).map(|_| r.byte()).collect(),
        None => (0..count)
            .flat_map(|_| {
                let len = r.byte() % 4;
                let mut element = (len as u32).to_le_bytes().to_vec();
                element.extend((0..len).map(|_| r.byte()));
                element
            })
            .collect(),
    };
    Tensor::new(dtype, shape, Bytes::from(data)).ok()
}
