//! The ONNX backend's call path: inputs handed to ONNX Runtime in place when their bytes are
//! aligned and copied when not, only the requested outputs returned, in the order asked.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use sluice_deployments::onnx::{OnnxBackend, OnnxOptions, init_runtime};
use sluice_deployments::{Backend, DataType, NamedTensor, Tensor};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

fn mlp() -> OnnxBackend {
    init_runtime(Path::new(
        &std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (.cargo/config.toml)"),
    ))
    .unwrap();
    OnnxBackend::load(&models().join("mlp/model.onnx"), &OnnxOptions::default()).unwrap()
}

/// The mlp fixture's first case: its input's bytes, and its outputs by name.
fn first_case() -> (Vec<u8>, Vec<(String, Vec<f32>)>) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("mlp/expected.json")).unwrap()).unwrap();
    let case = &expected["cases"][0];
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let input = floats(&case["inputs"][0]["data"]).iter().flat_map(|x| x.to_le_bytes()).collect();
    let outputs = case["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["name"].as_str().unwrap().to_string(), floats(&o["data"])))
        .collect();
    (input, outputs)
}

fn x(data: Bytes) -> Vec<NamedTensor> {
    vec![NamedTensor { name: "x".into(), tensor: Tensor::new(DataType::Fp32, vec![1, 8], data).unwrap() }]
}

fn floats(t: &NamedTensor) -> Vec<f32> {
    t.tensor.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{what}: {got:?} against {want:?}");
    }
}

#[test]
fn aligned_and_unaligned_inputs_give_the_expected_outputs() {
    let mut backend = mlp();
    let (input, want) = first_case();
    let names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();

    let aligned = Bytes::from(input.clone());
    assert_eq!(aligned.as_ptr().align_offset(4), 0, "a fresh allocation is aligned for f32");
    // The same bytes one past an aligned start: ONNX Runtime gets a copy instead.
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&input);
    let unaligned = Bytes::from(shifted).slice(1..);
    assert_ne!(unaligned.as_ptr().align_offset(4), 0);

    for (what, data) in [("aligned", aligned), ("unaligned", unaligned)] {
        let out = backend.infer(x(data.clone()), &names).unwrap();
        assert_eq!(out.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), names, "{what}");
        for (got, (name, want)) in out.iter().zip(&want) {
            assert_eq!(got.tensor.shape(), [1, 4], "{what} {name}");
            assert_close(&floats(got), want, &format!("{what} {name}"));
        }
        // The input is read, never written.
        assert_eq!(&data[..], &input[..], "{what}");
    }
}

#[test]
fn only_the_requested_outputs_come_back_in_the_order_asked() {
    let mut backend = mlp();
    let (input, want) = first_case();
    let data = Bytes::from(input);
    let reversed: Vec<String> = want.iter().rev().map(|(n, _)| n.clone()).collect();
    let out = backend.infer(x(data.clone()), &reversed).unwrap();
    assert_eq!(out.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), reversed);
    for (got, (name, want)) in out.iter().zip(want.iter().rev()) {
        assert_close(&floats(got), want, name);
    }

    let (last, last_want) = want.last().unwrap();
    let out = backend.infer(x(data.clone()), std::slice::from_ref(last)).unwrap();
    assert_eq!(out.len(), 1);
    assert_close(&floats(&out[0]), last_want, last);

    assert!(backend.infer(x(data.clone()), &[]).unwrap().is_empty(), "no outputs asked, none given");

    let e = backend.infer(x(data), &["nope".to_string()]).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn a_wrong_input_is_an_error_and_the_backend_answers_after_it() {
    let mut backend = mlp();
    let (input, want) = first_case();
    let names: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
    let wrong = vec![NamedTensor {
        name: "x".into(),
        tensor: Tensor::new(DataType::Fp32, vec![1, 4], Bytes::from(vec![0u8; 16])).unwrap(),
    }];
    let e = backend.infer(wrong, &names).unwrap_err();
    // ONNX Runtime's own shape check: the client's error.
    assert_eq!(e.kind, sluice_deployments::ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("invalid dimensions"), "{e}");
    let unknown =
        vec![NamedTensor { name: "y".into(), tensor: x(Bytes::from(input.clone())).remove(0).tensor }];
    let e = backend.infer(unknown, &names).unwrap_err();
    assert!(e.to_string().contains('y'), "{e}");
    let out = backend.infer(x(Bytes::from(input)), &names).unwrap();
    assert_close(&floats(&out[0]), &want[0].1, &want[0].0);
}

/// ONNX Runtime refusing the request's values (a token id past the embedding table's end) is
/// the client's error, InvalidArgument (400), not an internal one (which a canary's gate would
/// count); the backend answers the next request.
#[test]
fn values_the_model_refuses_are_the_clients_error() {
    mlp();
    let mut encoder =
        OnnxBackend::load(&models().join("tiny-encoder/model.onnx"), &OnnxOptions::default()).unwrap();
    let ids = |values: [i64; 2]| {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(DataType::Int64, vec![1, 2], Bytes::from(bytes)).unwrap()
    };
    let inputs = |first: [i64; 2]| {
        vec![
            NamedTensor { name: "input_ids".into(), tensor: ids(first) },
            NamedTensor { name: "attention_mask".into(), tensor: ids([1, 1]) },
            NamedTensor { name: "token_type_ids".into(), tensor: ids([0, 0]) },
        ]
    };
    let outputs = ["last_hidden_state".to_string()];
    let e = encoder.infer(inputs([1, 99_999]), &outputs).unwrap_err();
    assert_eq!(e.kind, sluice_deployments::ErrorKind::InvalidArgument, "{e:?}");
    assert!(e.message.contains("out of data bounds"), "{e:?}");
    assert!(encoder.infer(inputs([1, 2]), &outputs).is_ok());
}

/// Inputs that disagree on a dimension the model names alike in both (the tiny encoder's
/// sequence length `L`, shared by the token ids and their mask) fail inside ONNX Runtime with
/// an internal error (it does not check named dimensions before it runs): the client's error,
/// InvalidArgument (400) naming the inputs and sizes, not an internal one (500, counted against
/// a canary's gate).
#[test]
fn inputs_that_disagree_on_a_shared_dimension_are_the_clients_error() {
    mlp();
    let mut encoder =
        OnnxBackend::load(&models().join("tiny-encoder/model.onnx"), &OnnxOptions::default()).unwrap();
    let zeros =
        |len: usize| Tensor::new(DataType::Int64, vec![1, len], Bytes::from(vec![0u8; 8 * len])).unwrap();
    let inputs = |mask: usize| {
        vec![
            NamedTensor { name: "input_ids".into(), tensor: zeros(3) },
            NamedTensor { name: "attention_mask".into(), tensor: zeros(mask) },
            NamedTensor { name: "token_type_ids".into(), tensor: zeros(3) },
        ]
    };
    let outputs = ["last_hidden_state".to_string()];
    let e = encoder.infer(inputs(4), &outputs).unwrap_err();
    assert_eq!(e.kind, sluice_deployments::ErrorKind::InvalidArgument, "{e:?}");
    assert!(
        e.message.starts_with(
            "inputs `input_ids` (dimension 1: 3) and `attention_mask` (dimension 1: 4) must agree: the model \
             names both `L`"
        ),
        "{e:?}"
    );
    assert!(encoder.infer(inputs(3), &outputs).is_ok());
}

/// Padded into a batch, a request whose token ids and mask disagree on the sequence length the
/// model names alike (`L`) was made as long as the others and answered on pad values (with
/// 200, at the batch's length), where alone the model refuses it: its batch runs each request
/// alone, so it is refused (400 naming the inputs) and the other request is answered as
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_request_whose_inputs_disagree_on_a_shared_dimension_is_refused() {
    use sluice_deployments::{Deployment, DeploymentSpec, ErrorKind, InferRequest};
    mlp();
    let mut spec = DeploymentSpec::new("encoder");
    spec.settings.warmup = false;
    spec.settings.max_batch_size = 16;
    spec.settings.batch_wait_timeout_s = 0.2;
    spec.settings.pad =
        ["input_ids", "attention_mask", "token_type_ids"].map(|n| (n.to_string(), 0.0)).into();
    let model = sluice_config::Model::Onnx(models().join("tiny-encoder/model.onnx"));
    let factory = sluice_deployments::backend_factory(&model, &spec.settings, 1, "encoder").unwrap();
    let d = Deployment::start(spec, factory).unwrap();
    assert!(d.wait_ready(std::time::Duration::from_secs(10)).await);
    let filled = |len: usize, value: i64| {
        Tensor::new(DataType::Int64, vec![1, len], Bytes::from(value.to_le_bytes().repeat(len))).unwrap()
    };
    let request = |ids: usize, mask: usize| InferRequest {
        inputs: vec![
            NamedTensor { name: "input_ids".into(), tensor: filled(ids, 1) },
            NamedTensor { name: "attention_mask".into(), tensor: filled(mask, 1) },
            NamedTensor { name: "token_type_ids".into(), tensor: filled(ids, 0) },
        ],
        ..Default::default()
    };
    let (bad, good) = tokio::join!(d.infer(request(3, 5)), d.infer(request(5, 5)));
    let e = bad.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
    assert!(
        e.message.starts_with(
            "inputs `input_ids` (dimension 1: 3) and `attention_mask` (dimension 1: 5) must agree"
        ),
        "{e:?}"
    );
    assert_eq!(good.unwrap().outputs[0].tensor.shape()[..2], [1, 5]);
}

/// A BYTES input reaches the model byte for byte: NUL bytes, bytes that are not UTF-8 and empty
/// elements (ONNX strings are bytes; `ort`'s constructor made C strings of them and refused
/// both). The `dtypes` fixture's Identity gives each input back.
#[test]
fn bytes_inputs_reach_the_model_byte_for_byte() {
    mlp();
    let mut backend =
        OnnxBackend::load(&models().join("dtypes/model.onnx"), &OnnxOptions::default()).unwrap();
    let elements: [&[u8]; 4] = [b"a\0b", &[0xff, 0xfe, 0x00], b"", "h\u{e9}llo".as_bytes()];
    let mut strings = Vec::new();
    for e in elements {
        sluice_deployments::push_bytes_element(&mut strings, e).unwrap();
    }
    let inputs: Vec<NamedTensor> = DataType::ALL
        .into_iter()
        .filter(|&d| d != DataType::Bf16) // the fixture has every other type
        .map(|dtype| {
            let data = match dtype.byte_size() {
                Some(size) => Bytes::from(vec![0u8; 4 * size]),
                None => Bytes::from(strings.clone()),
            };
            NamedTensor { name: format!("in_{dtype}"), tensor: Tensor::new(dtype, vec![2, 2], data).unwrap() }
        })
        .collect();
    let out = backend.infer(inputs, &["out_BYTES".to_string()]).unwrap();
    assert_eq!(out[0].tensor.shape(), [2, 2]);
    let got: Vec<&[u8]> = out[0].tensor.bytes_elements().collect();
    assert_eq!(got, elements);
}
