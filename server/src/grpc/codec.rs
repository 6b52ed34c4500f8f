//! `ModelInferRequest` to [`InferRequest`] and [`InferResponse`] to `ModelInferResponse`.
//! `raw_input_contents` become tensors by slicing (`bytes::Bytes`, no copy); typed `*_contents`
//! are converted once. Outputs always go back in `raw_output_contents`, one per output, in
//! order, which is the only form tritonclient reads.

use bytes::{BufMut, Bytes, BytesMut};
use sluice_deployments::{
    DataType, InferError, InferRequest, InferResponse, NamedTensor, Tensor, push_bytes_element,
};
use sluice_proto::inference as pb;

fn shape_of(name: &str, shape: &[i64]) -> Result<Vec<usize>, InferError> {
    shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| {
        InferError::invalid(format!("input `{name}` has a negative dimension in shape {shape:?}"))
    })
}

pub fn decode(req: pb::ModelInferRequest) -> Result<InferRequest, InferError> {
    // First: a client with an input in shared memory sends raw contents for the others only,
    // which the count below would blame on it.
    if let Some(input) = req.inputs.iter().find(|i| i.parameters.contains_key("shared_memory_region")) {
        return Err(sluice_deployments::refuse_shared_memory(&format!("input `{}`", input.name)));
    }
    let raw = req.raw_input_contents;
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(InferError::invalid(format!(
            "{} raw_input_contents for {} inputs; send one per input, in order",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (k, input) in req.inputs.into_iter().enumerate() {
        let dtype = DataType::parse(&input.datatype).ok_or_else(|| {
            InferError::invalid(format!("input `{}` has unknown datatype `{}`", input.name, input.datatype))
        })?;
        let shape = shape_of(&input.name, &input.shape)?;
        let data = match (raw.get(k), input.contents) {
            (Some(_), Some(_)) => {
                return Err(InferError::invalid(format!(
                    "input `{}` has typed contents while raw_input_contents is used; use one form",
                    input.name
                )));
            }
            (Some(bytes), None) => bytes.clone(),
            (None, Some(contents)) => {
                let count = sluice_deployments::element_count(&shape)
                    .map_err(|e| InferError::invalid(format!("input `{}`: {e}", input.name)))?;
                typed_contents(&input.name, dtype, count, contents)?
            }
            (None, None) => {
                return Err(InferError::invalid(format!("input `{}` has no data", input.name)));
            }
        };
        let tensor = Tensor::new(dtype, shape, data)
            .map_err(|e| InferError::invalid(format!("input `{}`: {e}", input.name)))?;
        inputs.push(NamedTensor { name: input.name, tensor });
    }
    let outputs = if req.outputs.is_empty() {
        None
    } else {
        let mut names = Vec::with_capacity(req.outputs.len());
        for o in req.outputs {
            if o.parameters.contains_key("classification") {
                return Err(sluice_deployments::refuse_classification(&o.name));
            }
            if o.parameters.contains_key("shared_memory_region") {
                return Err(sluice_deployments::refuse_shared_memory(&format!("output `{}`", o.name)));
            }
            names.push(o.name);
        }
        Some(names)
    };
    for name in req.parameters.keys() {
        sluice_deployments::check_parameter_name(name)?;
    }
    // Sent with every request by Triton's C++ client and perf_analyzer; it changes nothing for
    // one answer (a stream reads it too, `stream.rs`).
    final_response_asked(&req.parameters)?;
    // 0 is no timeout of the client's own (Triton's reading), as an absent one is.
    let timeout = match req.parameters.get("timeout").and_then(|p| p.parameter_choice.as_ref()) {
        None => None,
        Some(pb::infer_parameter::ParameterChoice::Int64Param(us)) if *us >= 0 => {
            (*us > 0).then(|| std::time::Duration::from_micros(*us as u64))
        }
        Some(pb::infer_parameter::ParameterChoice::Uint64Param(us)) => {
            (*us > 0).then(|| std::time::Duration::from_micros(*us))
        }
        Some(other) => {
            return Err(InferError::invalid(format!(
                "parameter `timeout` must be microseconds (a non-negative integer), got {other:?}"
            )));
        }
    };
    Ok(InferRequest { id: Some(req.id).filter(|s| !s.is_empty()), inputs, outputs, timeout, model_id: None })
}

/// Whether a request asks for the final-response flag (`triton_enable_empty_final_response`,
/// a bool, as Triton takes it).
pub fn final_response_asked(
    parameters: &std::collections::HashMap<String, pb::InferParameter>,
) -> Result<bool, InferError> {
    use pb::infer_parameter::ParameterChoice;
    let name = sluice_deployments::ENABLE_EMPTY_FINAL_RESPONSE;
    match parameters.get(name).map(|p| &p.parameter_choice) {
        None => Ok(false),
        Some(Some(ParameterChoice::BoolParam(asked))) => Ok(*asked),
        Some(other) => Err(InferError::invalid(format!("parameter `{name}` must be a bool, got {other:?}"))),
    }
}

/// The typed contents field that carries `dtype` (None: only raw_input_contents can).
fn contents_field(dtype: DataType) -> Option<&'static str> {
    Some(match dtype {
        DataType::Bool => "bool_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}

/// Each typed contents field and how many values it holds.
fn field_lengths(c: &pb::InferTensorContents) -> [(&'static str, usize); 8] {
    [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ]
}

/// The typed contents fields that hold data.
fn filled_fields(c: &pb::InferTensorContents) -> impl Iterator<Item = &'static str> {
    field_lengths(c).into_iter().filter(|(_, n)| *n > 0).map(|(field, _)| field)
}

/// Little-endian bytes from the typed contents field that fits `dtype`, which must hold the
/// `count` elements of the shape (checked before anything is converted, and the bytes sized
/// once); data in any other field is refused, naming both (it would otherwise read as missing
/// data).
fn typed_contents(
    name: &str,
    dtype: DataType,
    count: usize,
    c: pb::InferTensorContents,
) -> Result<Bytes, InferError> {
    // Refused before anything is sized from the shape: nothing bounds a shape but its own
    // numbers, and FP16 has no field whose length is checked against it (`[2^47]` reserved
    // 256 TiB, and the failed allocation aborted the server).
    if matches!(dtype, DataType::Fp16 | DataType::Bf16) {
        return Err(InferError::invalid(format!(
            "input `{name}`: {dtype} data must be sent in raw_input_contents"
        )));
    }
    if let Some(want) = contents_field(dtype) {
        if let Some(other) = filled_fields(&c).find(|&f| f != want) {
            return Err(InferError::invalid(format!(
                "input `{name}`: {dtype} data goes in contents.{want}, but contents.{other} holds data"
            )));
        }
        let got = field_lengths(&c).iter().find(|(f, _)| *f == want).map_or(0, |(_, n)| *n);
        if got != count {
            return Err(InferError::invalid(format!(
                "input `{name}`: its shape holds {count} elements, contents.{want} holds {got}"
            )));
        }
    }
    let mut out = BytesMut::with_capacity(dtype.byte_size().map_or(0, |size| size.saturating_mul(count)));
    macro_rules! narrow {
        ($src:expr, $t:ty) => {
            for v in $src {
                let x = <$t>::try_from(v).map_err(|_| {
                    InferError::invalid(format!("input `{name}`: {v} is out of range for {dtype}"))
                })?;
                out.put_slice(&x.to_le_bytes());
            }
        };
    }
    match dtype {
        DataType::Bool => c.bool_contents.iter().for_each(|&b| out.put_u8(b as u8)),
        DataType::Uint8 => narrow!(c.uint_contents, u8),
        DataType::Uint16 => narrow!(c.uint_contents, u16),
        DataType::Uint32 => c.uint_contents.iter().for_each(|v| out.put_u32_le(*v)),
        DataType::Uint64 => c.uint64_contents.iter().for_each(|v| out.put_u64_le(*v)),
        DataType::Int8 => narrow!(c.int_contents, i8),
        DataType::Int16 => narrow!(c.int_contents, i16),
        DataType::Int32 => c.int_contents.iter().for_each(|v| out.put_i32_le(*v)),
        DataType::Int64 => c.int64_contents.iter().for_each(|v| out.put_i64_le(*v)),
        DataType::Fp32 => c.fp32_contents.iter().for_each(|v| out.put_f32_le(*v)),
        DataType::Fp64 => c.fp64_contents.iter().for_each(|v| out.put_f64_le(*v)),
        DataType::Bytes => {
            let mut v = Vec::new();
            for item in &c.bytes_contents {
                push_bytes_element(&mut v, item)?;
            }
            out.put_slice(&v);
        }
        DataType::Fp16 | DataType::Bf16 => unreachable!("refused above"),
    }
    Ok(out.freeze())
}

pub fn encode(r: InferResponse) -> pb::ModelInferResponse {
    let mut outputs = Vec::with_capacity(r.outputs.len());
    let mut raw = Vec::with_capacity(r.outputs.len());
    for o in r.outputs {
        outputs.push(pb::model_infer_response::InferOutputTensor {
            name: o.name,
            datatype: o.tensor.dtype().as_str().to_string(),
            shape: o.tensor.shape().iter().map(|&d| d as i64).collect(),
            parameters: Default::default(),
            contents: None,
        });
        raw.push(o.tensor.data().clone());
    }
    pb::ModelInferResponse {
        model_name: r.model_name,
        model_version: r.model_version,
        id: r.id.unwrap_or_default(),
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        dtype: &str,
        shape: Vec<i64>,
        contents: Option<pb::InferTensorContents>,
    ) -> pb::model_infer_request::InferInputTensor {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: dtype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn raw_contents_are_sliced_not_copied() {
        let raw = Bytes::from(vec![0u8; 16]);
        let req = pb::ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![1, 4], None)],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        };
        let decoded = decode(req).unwrap();
        assert_eq!(decoded.inputs[0].tensor.data().as_ptr(), raw.as_ptr());
    }

    #[test]
    fn typed_contents_become_little_endian_bytes() {
        let c = pb::InferTensorContents { int_contents: vec![-1, 2], ..Default::default() };
        let req = pb::ModelInferRequest {
            inputs: vec![input("x", "INT16", vec![2], Some(c))],
            ..Default::default()
        };
        let t = &decode(req).unwrap().inputs[0].tensor;
        assert_eq!(&t.data()[..], &[0xff, 0xff, 2, 0]);
        let c = pb::InferTensorContents {
            bytes_contents: vec![b"ab".to_vec(), b"".to_vec()],
            ..Default::default()
        };
        let req = pb::ModelInferRequest {
            inputs: vec![input("s", "BYTES", vec![2], Some(c))],
            ..Default::default()
        };
        let t = &decode(req).unwrap().inputs[0].tensor;
        assert_eq!(t.bytes_elements().collect::<Vec<_>>(), vec![&b"ab"[..], b""]);
    }

    #[test]
    fn malformed_requests_name_the_problem() {
        let c = pb::InferTensorContents { uint_contents: vec![300], ..Default::default() };
        let req = pb::ModelInferRequest {
            inputs: vec![input("x", "UINT8", vec![1], Some(c))],
            ..Default::default()
        };
        assert!(decode(req).unwrap_err().message.contains("300 is out of range for UINT8"));
        let req =
            pb::ModelInferRequest { inputs: vec![input("x", "FP32", vec![-1], None)], ..Default::default() };
        assert!(decode(req).unwrap_err().message.contains("negative dimension"));
        let req =
            pb::ModelInferRequest { inputs: vec![input("x", "FP32", vec![1], None)], ..Default::default() };
        assert!(decode(req).unwrap_err().message.contains("has no data"));
        let req = pb::ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![1], None), input("y", "FP32", vec![1], None)],
            raw_input_contents: vec![Bytes::from(vec![0u8; 4])],
            ..Default::default()
        };
        assert!(decode(req).unwrap_err().message.contains("1 raw_input_contents for 2 inputs"));
        let c = pb::InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
        let req = pb::ModelInferRequest {
            inputs: vec![input("h", "FP16", vec![1], Some(c))],
            ..Default::default()
        };
        assert!(decode(req).unwrap_err().message.contains("raw_input_contents"));
        // Refused before anything is sized from the shape: `[2^47]` reserved 256 TiB first (the
        // failed allocation aborted the process).
        for dtype in ["FP16", "BF16"] {
            let c = pb::InferTensorContents { fp32_contents: vec![1.0], ..Default::default() };
            let req = pb::ModelInferRequest {
                inputs: vec![input("h", dtype, vec![1 << 47], Some(c))],
                ..Default::default()
            };
            assert!(decode(req).unwrap_err().message.contains("raw_input_contents"), "{dtype}");
        }
        // A count that does not match the shape is refused before any conversion.
        let c = pb::InferTensorContents { int64_contents: vec![1, 2, 3], ..Default::default() };
        let req = pb::ModelInferRequest {
            inputs: vec![input("ids", "INT64", vec![1], Some(c))],
            ..Default::default()
        };
        let msg = decode(req).unwrap_err().message;
        assert!(
            msg.contains("input `ids`: its shape holds 1 elements, contents.int64_contents holds 3"),
            "{msg}"
        );
        // Data in another typed field than the datatype's is named, not read as missing.
        let c = pb::InferTensorContents { int_contents: vec![1, 2], ..Default::default() };
        let req = pb::ModelInferRequest {
            inputs: vec![input("ids", "INT64", vec![2], Some(c))],
            ..Default::default()
        };
        let msg = decode(req).unwrap_err().message;
        assert!(
            msg.contains("input `ids`: INT64 data goes in contents.int64_contents, but contents.int_contents holds data"),
            "{msg}"
        );
        // Shared memory, for an input or an output, is refused (not ignored).
        let shm = || {
            let region = pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam("r".into())),
            };
            [("shared_memory_region".to_string(), region)].into_iter().collect()
        };
        let raw = || vec![Bytes::from(vec![0u8; 4])];
        let mut x = input("x", "FP32", vec![1], None);
        x.parameters = shm();
        let req = pb::ModelInferRequest { inputs: vec![x], raw_input_contents: raw(), ..Default::default() };
        assert!(decode(req).unwrap_err().message.contains("input `x`: shared memory is not supported"));
        let y = pb::model_infer_request::InferRequestedOutputTensor { name: "y".into(), parameters: shm() };
        let req = pb::ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![1], None)],
            raw_input_contents: raw(),
            outputs: vec![y],
            ..Default::default()
        };
        assert!(decode(req).unwrap_err().message.contains("output `y`: shared memory is not supported"));
    }
}
