//! Encoding cases once per protocol (bodies are cloned per request, not re-encoded) and
//! decoding responses for `--check`.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value, json};
use sluice_proto::inference as pb;

use crate::inputs::{Case, JsonTensor};

/// A case ready to send over every protocol.
pub struct Prepared {
    pub rest_json: Bytes,
    pub rest_binary: Bytes,
    pub rest_binary_header: usize,
    /// The `ModelInferRequest`, encoded and framed as a gRPC message.
    pub grpc: Bytes,
    pub expected: Option<Vec<JsonTensor>>,
    pub tolerance: f64,
    pub rows: u64,
}

/// Little-endian bytes of a JSON tensor.
pub fn tensor_bytes(t: &JsonTensor) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for v in &t.data {
        let n = || v.as_f64().with_context(|| format!("`{}`: {v} is not a number", t.name));
        match t.datatype.as_str() {
            "BOOL" => out.push(v.as_bool().context("BOOL data must be true/false")? as u8),
            "UINT8" => out.push(n()? as u8),
            "UINT16" => out.extend((n()? as u16).to_le_bytes()),
            "UINT32" => out.extend((n()? as u32).to_le_bytes()),
            "UINT64" => out.extend(v.as_u64().context("UINT64")?.to_le_bytes()),
            "INT8" => out.extend((n()? as i8).to_le_bytes()),
            "INT16" => out.extend((n()? as i16).to_le_bytes()),
            "INT32" => out.extend((n()? as i32).to_le_bytes()),
            "INT64" => out.extend(v.as_i64().context("INT64")?.to_le_bytes()),
            "FP16" => out.extend(half::f16::from_f64(n()?).to_le_bytes()),
            "BF16" => out.extend(half::bf16::from_f64(n()?).to_le_bytes()),
            "FP32" => out.extend((n()? as f32).to_le_bytes()),
            "FP64" => out.extend(n()?.to_le_bytes()),
            "BYTES" => {
                let s = v.as_str().context("BYTES data must be strings")?;
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s.as_bytes());
            }
            other => bail!("unknown datatype {other}"),
        }
    }
    Ok(out)
}

/// `case` encoded for every protocol: the sample file's tensor and request `parameters` and
/// its `outputs` list go with it in each encoding. REST binary asks for binary outputs
/// (`binary_data_output`) unless the file's own request parameters say otherwise; a listed
/// output's own `binary_data` decides for that output.
pub fn prepare(case: &Case, model: &str, version: &str) -> Result<Prepared> {
    let outputs = || (!case.requested.is_empty()).then_some(&case.requested);
    let parameters = |p: &Map<String, Value>| (!p.is_empty()).then(|| p.clone());

    let inputs: Vec<Value> = case
        .inputs
        .iter()
        .map(|t| {
            let mut input = json!({"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data});
            if let Some(p) = parameters(&t.parameters) {
                input["parameters"] = Value::Object(p);
            }
            input
        })
        .collect();
    let mut request = json!({ "inputs": inputs });
    if let Some(p) = parameters(&case.parameters) {
        request["parameters"] = Value::Object(p);
    }
    if let Some(o) = outputs() {
        request["outputs"] = serde_json::to_value(o)?;
    }
    let rest_json = Bytes::from(serde_json::to_vec(&request)?);

    let mut blobs = Vec::new();
    let mut binary_inputs = Vec::new();
    for t in &case.inputs {
        let b = tensor_bytes(t)?;
        let mut params = t.parameters.clone();
        params.insert("binary_data_size".into(), b.len().into());
        binary_inputs
            .push(json!({"name": t.name, "datatype": t.datatype, "shape": t.shape, "parameters": params}));
        blobs.push(b);
    }
    let mut params = Map::from_iter([("binary_data_output".to_string(), Value::Bool(true))]);
    params.extend(case.parameters.clone());
    let mut head = json!({"inputs": binary_inputs, "parameters": params});
    if let Some(o) = outputs() {
        head["outputs"] = serde_json::to_value(o)?;
    }
    let header = serde_json::to_vec(&head)?;
    let mut body = BytesMut::with_capacity(header.len() + blobs.iter().map(Vec::len).sum::<usize>());
    body.put_slice(&header);
    for b in &blobs {
        body.put_slice(b);
    }

    let grpc = pb::ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        parameters: grpc_parameters(&case.parameters).context("request parameters")?,
        inputs: case
            .inputs
            .iter()
            .map(|t| {
                Ok(pb::model_infer_request::InferInputTensor {
                    name: t.name.clone(),
                    datatype: t.datatype.clone(),
                    shape: t.shape.iter().map(|&d| d as i64).collect(),
                    parameters: grpc_parameters(&t.parameters)
                        .with_context(|| format!("input `{}`", t.name))?,
                    ..Default::default()
                })
            })
            .collect::<Result<_>>()?,
        outputs: case
            .requested
            .iter()
            .map(|o| {
                Ok(pb::model_infer_request::InferRequestedOutputTensor {
                    name: o.name.clone(),
                    parameters: grpc_parameters(&o.parameters)
                        .with_context(|| format!("output `{}`", o.name))?,
                })
            })
            .collect::<Result<_>>()?,
        raw_input_contents: blobs.into_iter().map(Bytes::from).collect(),
        ..Default::default()
    };
    Ok(Prepared {
        rest_json,
        rest_binary_header: header.len(),
        rest_binary: body.freeze(),
        grpc: crate::grpc::frame(&grpc).map_err(anyhow::Error::msg)?,
        expected: case.outputs.clone(),
        tolerance: case.tolerance,
        rows: case.rows(),
    })
}

/// JSON parameters as gRPC's `InferParameter`s: booleans, strings, integers (signed, or
/// unsigned past `i64`) and other numbers as doubles; anything else has no gRPC form.
fn grpc_parameters(params: &Map<String, Value>) -> Result<HashMap<String, pb::InferParameter>> {
    use pb::infer_parameter::ParameterChoice;
    params
        .iter()
        .map(|(k, v)| {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => ParameterChoice::Int64Param(i),
                    (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                    (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
                    _ => bail!("parameter `{k}`: {n} has no gRPC form"),
                },
                other => bail!("parameter `{k}`: {other} has no gRPC form (a bool, number or string)"),
            };
            Ok((k.clone(), pb::InferParameter { parameter_choice: Some(choice) }))
        })
        .collect()
}

/// Decoded output values: numbers as f64, BYTES as strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Numbers(Vec<f64>),
    Strings(Vec<String>),
}

/// Decodes little-endian bytes of `datatype`: a length that is not a whole number of elements,
/// or a BYTES element whose length runs past the data, is an error (not values read from what
/// is there).
pub fn decode_bytes(datatype: &str, raw: &[u8]) -> Result<Values> {
    macro_rules! nums {
        ($t:ty, $n:literal, $f:expr) => {{
            if !raw.len().is_multiple_of($n) {
                bail!("{} bytes of {datatype}, not a whole number of {}-byte elements", raw.len(), $n);
            }
            Values::Numbers(
                raw.chunks_exact($n).map(|c| $f(<$t>::from_le_bytes(c.try_into().unwrap()))).collect(),
            )
        }};
    }
    Ok(match datatype {
        "BOOL" => Values::Numbers(raw.iter().map(|&b| (b != 0) as u8 as f64).collect()),
        "UINT8" => nums!(u8, 1, |v| v as f64),
        "UINT16" => nums!(u16, 2, |v| v as f64),
        "UINT32" => nums!(u32, 4, |v| v as f64),
        "UINT64" => nums!(u64, 8, |v| v as f64),
        "INT8" => nums!(i8, 1, |v| v as f64),
        "INT16" => nums!(i16, 2, |v| v as f64),
        "INT32" => nums!(i32, 4, |v| v as f64),
        "INT64" => nums!(i64, 8, |v| v as f64),
        "FP16" => nums!(half::f16, 2, |v: half::f16| v.to_f64()),
        "BF16" => nums!(half::bf16, 2, |v: half::bf16| v.to_f64()),
        "FP32" => nums!(f32, 4, |v| v as f64),
        "FP64" => nums!(f64, 8, |v| v),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                let Some(len) = rest.first_chunk::<4>() else {
                    bail!("BYTES: {} bytes left, too few for an element's length", rest.len());
                };
                let n = u32::from_le_bytes(*len) as usize;
                let Some(element) = rest.get(4..4 + n) else {
                    bail!("BYTES: an element of {n} bytes, with {} left", rest.len() - 4);
                };
                out.push(String::from_utf8_lossy(element).into_owned());
                rest = &rest[4 + n..];
            }
            Values::Strings(out)
        }
        other => bail!("unknown datatype {other}"),
    })
}

fn json_values(datatype: &str, data: &[Value]) -> Values {
    if datatype == "BYTES" {
        Values::Strings(data.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect())
    } else {
        Values::Numbers(
            data.iter()
                .map(|v| v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64)).unwrap_or(f64::NAN))
                .collect(),
        )
    }
}

/// One output of a response, as the check compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub values: Values,
}

/// Outputs of a REST response body (JSON, or JSON + binary when the header says so).
pub fn decode_rest(body: &[u8], header_len: Option<usize>) -> Result<Vec<Output>> {
    let json_len = header_len.unwrap_or(body.len()).min(body.len());
    let head: Value = serde_json::from_slice(&body[..json_len]).context("response JSON")?;
    let mut offset = json_len;
    let mut out = Vec::new();
    for o in head["outputs"].as_array().context("response without outputs")? {
        let name = o["name"].as_str().unwrap_or_default().to_string();
        let datatype = o["datatype"].as_str().unwrap_or_default().to_string();
        let shape = o["shape"]
            .as_array()
            .and_then(|dims| dims.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .with_context(|| format!("output `{name}` without a shape"))?;
        let values = if let Some(size) = o["parameters"]["binary_data_size"].as_u64() {
            let end = usize::try_from(size).ok().and_then(|size| offset.checked_add(size));
            let Some(end) = end.filter(|&end| end <= body.len()) else {
                bail!("binary output `{name}` runs past the body");
            };
            let values = decode_bytes(&datatype, &body[offset..end])?;
            offset = end;
            values
        } else {
            let mut data = Vec::new();
            flatten_into(&o["data"], &mut data);
            json_values(&datatype, &data)
        };
        out.push(Output { name, datatype, shape, values });
    }
    Ok(out)
}

fn flatten_into(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten_into(x, out)),
        other => out.push(other.clone()),
    }
}

/// Outputs of a gRPC response: each from `raw_output_contents` when the server sent raw
/// contents (as Sluice and Triton do), else from the output's typed `contents`.
pub fn decode_grpc(r: &pb::ModelInferResponse) -> Result<Vec<Output>> {
    if !r.raw_output_contents.is_empty() && r.raw_output_contents.len() != r.outputs.len() {
        bail!("{} raw_output_contents for {} outputs", r.raw_output_contents.len(), r.outputs.len());
    }
    r.outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let values = match r.raw_output_contents.get(i) {
                Some(raw) => decode_bytes(&o.datatype, raw)?,
                None => typed_values(&o.datatype, o.contents.as_ref())
                    .with_context(|| format!("output `{}` has neither raw nor typed contents", o.name))?,
            };
            Ok(Output { name: o.name.clone(), datatype: o.datatype.clone(), shape: o.shape.clone(), values })
        })
        .collect()
}

/// The values of an output's typed `contents`: the field its datatype uses.
fn typed_values(datatype: &str, c: Option<&pb::InferTensorContents>) -> Option<Values> {
    let c = c?;
    let nums = |v: Vec<f64>| Some(Values::Numbers(v));
    match datatype {
        "BOOL" => nums(c.bool_contents.iter().map(|&b| f64::from(u8::from(b))).collect()),
        "INT8" | "INT16" | "INT32" => nums(c.int_contents.iter().map(|&v| f64::from(v)).collect()),
        "INT64" => nums(c.int64_contents.iter().map(|&v| v as f64).collect()),
        "UINT8" | "UINT16" | "UINT32" => nums(c.uint_contents.iter().map(|&v| f64::from(v)).collect()),
        "UINT64" => nums(c.uint64_contents.iter().map(|&v| v as f64).collect()),
        "FP32" => nums(c.fp32_contents.iter().map(|&v| f64::from(v)).collect()),
        "FP64" => nums(c.fp64_contents.clone()),
        "BYTES" => Some(Values::Strings(
            c.bytes_contents.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect(),
        )),
        // FP16 and BF16 have no typed field: raw contents only.
        _ => None,
    }
}

/// True when every expected output is present with the expected datatype and shape, and its
/// values equal: floating-point ones within `tol` (relative above 1; never tighter than 1e-6,
/// the noise of an FP32 answer written in decimal), integers and booleans exactly.
pub fn matches(got: &[Output], expected: &[JsonTensor], tol: f64) -> bool {
    expected.iter().all(|want| {
        let Some(out) = got.iter().find(|o| o.name == want.name) else { return false };
        let shape_ok = out.shape.len() == want.shape.len()
            && out.shape.iter().zip(&want.shape).all(|(&g, &w)| u64::try_from(g) == Ok(w));
        if out.datatype != want.datatype || !shape_ok {
            return false;
        }
        match (&out.values, json_values(&want.datatype, &want.data)) {
            (Values::Numbers(g), Values::Numbers(w)) => {
                let exact = !matches!(want.datatype.as_str(), "FP16" | "BF16" | "FP32" | "FP64");
                g.len() == w.len()
                    && g.iter().zip(&w).all(|(a, b)| match exact {
                        true => a == b,
                        false => (a - b).abs() <= tol.max(1e-6) * b.abs().max(1.0),
                    })
            }
            (Values::Strings(g), Values::Strings(w)) => g == &w,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::RequestedOutput;

    fn want(datatype: &str, shape: Vec<u64>, data: Vec<Value>) -> JsonTensor {
        JsonTensor { name: "y".into(), datatype: datatype.into(), shape, data, ..Default::default() }
    }

    fn rest(output: Value) -> Vec<Output> {
        decode_rest(json!({"outputs": [output]}).to_string().as_bytes(), None).unwrap()
    }

    #[test]
    fn the_check_compares_datatype_and_shape_as_well_as_values() {
        let expected = [want("FP32", vec![1, 2], vec![json!(1.0), json!(2.0)])];
        let right = rest(json!({"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}));
        assert!(matches(&right, &expected, 1e-6));
        let flat = rest(json!({"name": "y", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}));
        assert!(!matches(&flat, &expected, 1e-6), "same values, another shape");
        let wide = rest(json!({"name": "y", "datatype": "FP64", "shape": [1, 2], "data": [1.0, 2.0]}));
        assert!(!matches(&wide, &expected, 1e-6), "same values, another datatype");
        let off = rest(json!({"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.5]}));
        assert!(!matches(&off, &expected, 1e-6));
        let shapeless = json!({"outputs": [{"name": "y", "datatype": "FP32", "data": [1.0]}]}).to_string();
        assert!(decode_rest(shapeless.as_bytes(), None).is_err());
    }

    /// Integers and booleans compare exactly: a token id of 50,000 is not 50,003 within a
    /// relative tolerance. Floating-point values within it.
    #[test]
    fn integers_compare_exactly_and_floats_within_the_tolerance() {
        let expected = [want("INT64", vec![1], vec![json!(50_000)])];
        let near = rest(json!({"name": "y", "datatype": "INT64", "shape": [1], "data": [50_003]}));
        assert!(!matches(&near, &expected, 1e-4));
        let same = rest(json!({"name": "y", "datatype": "INT64", "shape": [1], "data": [50_000]}));
        assert!(matches(&same, &expected, 1e-4));
        let expected = [want("FP32", vec![1], vec![json!(50_000.0)])];
        let near = rest(json!({"name": "y", "datatype": "FP32", "shape": [1], "data": [50_003.0]}));
        assert!(matches(&near, &expected, 1e-4));
    }

    /// A binary output whose announced size runs past the body, however large, is refused (a
    /// size near 2^64 overflowed the end's sum and panicked the request's task).
    #[test]
    fn a_binary_size_past_the_body_is_refused_not_a_panic() {
        for size in [9u64, u64::MAX, u64::MAX - 10] {
            let head = json!({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2],
                              "parameters": {"binary_data_size": size}}]})
            .to_string();
            let body = [head.as_bytes(), &[0; 8]].concat();
            let e = decode_rest(&body, Some(head.len())).unwrap_err();
            assert!(e.to_string().contains("runs past the body"), "{size}: {e}");
        }
    }

    /// Raw contents that are not whole elements, or a BYTES element longer than what is left,
    /// are a bad answer: they were read as the values that fit (9 bytes as two FP32s, a
    /// 10-byte element holding `abc` as `abc`) and could pass `--check`.
    #[test]
    fn raw_contents_cut_short_are_refused() {
        assert!(decode_bytes("FP32", &[0; 9]).unwrap_err().to_string().contains("not a whole number"));
        assert_eq!(decode_bytes("FP32", &[0; 8]).unwrap(), Values::Numbers(vec![0.0, 0.0]));
        let long = [&10u32.to_le_bytes()[..], b"abc"].concat();
        assert!(decode_bytes("BYTES", &long).unwrap_err().to_string().contains("an element of 10 bytes"));
        let tail = [&3u32.to_le_bytes()[..], b"abc", &[1, 0]].concat();
        assert!(decode_bytes("BYTES", &tail).is_err(), "two bytes too few for a length");
        let two = [&3u32.to_le_bytes()[..], b"abc", &0u32.to_le_bytes()].concat();
        assert_eq!(decode_bytes("BYTES", &two).unwrap(), Values::Strings(vec!["abc".into(), String::new()]));
    }

    #[test]
    fn grpc_outputs_are_read_from_raw_or_typed_contents() {
        let tensor = |contents| pb::model_infer_response::InferOutputTensor {
            name: "y".into(),
            datatype: "INT64".into(),
            shape: vec![1, 2],
            contents,
            ..Default::default()
        };
        let expected = [want("INT64", vec![1, 2], vec![json!(3), json!(-4)])];
        let raw = pb::ModelInferResponse {
            outputs: vec![tensor(None)],
            raw_output_contents: vec![[3i64.to_le_bytes(), (-4i64).to_le_bytes()].concat().into()],
            ..Default::default()
        };
        assert!(matches(&decode_grpc(&raw).unwrap(), &expected, 0.0));
        let typed = pb::ModelInferResponse {
            outputs: vec![tensor(Some(pb::InferTensorContents {
                int64_contents: vec![3, -4],
                ..Default::default()
            }))],
            ..Default::default()
        };
        assert!(matches(&decode_grpc(&typed).unwrap(), &expected, 0.0));
        let empty = pb::ModelInferResponse { outputs: vec![tensor(None)], ..Default::default() };
        assert!(decode_grpc(&empty).is_err());
    }

    /// The sample file's tensor and request parameters and its outputs list go out in every
    /// encoding; REST binary's own parameters (binary_data_size, binary_data_output) beside
    /// them, the file's listed outputs keeping their own binary_data.
    #[test]
    fn parameters_and_the_outputs_list_are_sent_in_every_encoding() {
        let params = |v: Value| v.as_object().unwrap().clone();
        let case = Case {
            inputs: vec![JsonTensor {
                name: "x".into(),
                datatype: "INT32".into(),
                shape: vec![1, 2],
                data: vec![json!(1), json!(2)],
                parameters: params(json!({"layout": "NC"})),
            }],
            parameters: params(json!({"priority": 2, "sequence_start": true, "scale": 0.5})),
            requested: vec![
                RequestedOutput { name: "y".into(), parameters: params(json!({"binary_data": false})) },
                RequestedOutput { name: "z".into(), ..Default::default() },
            ],
            ..Default::default()
        };
        let p = prepare(&case, "m", "").unwrap();
        let outputs = json!([{"name": "y", "parameters": {"binary_data": false}}, {"name": "z"}]);

        let rest: Value = serde_json::from_slice(&p.rest_json).unwrap();
        assert_eq!(rest["inputs"][0]["parameters"], json!({"layout": "NC"}));
        assert_eq!(rest["parameters"], json!({"priority": 2, "sequence_start": true, "scale": 0.5}));
        assert_eq!(rest["outputs"], outputs);

        let head: Value = serde_json::from_slice(&p.rest_binary[..p.rest_binary_header]).unwrap();
        assert_eq!(head["inputs"][0]["parameters"], json!({"layout": "NC", "binary_data_size": 8}));
        assert_eq!(
            head["parameters"],
            json!({"binary_data_output": true, "priority": 2, "sequence_start": true, "scale": 0.5})
        );
        assert_eq!(head["outputs"], outputs);

        let message = crate::grpc::unframe(p.grpc.clone()).unwrap();
        let grpc = <pb::ModelInferRequest as prost::Message>::decode(message).unwrap();
        use pb::infer_parameter::ParameterChoice as C;
        let choice =
            |m: &HashMap<String, pb::InferParameter>, k: &str| m[k].parameter_choice.clone().unwrap();
        assert_eq!(choice(&grpc.inputs[0].parameters, "layout"), C::StringParam("NC".into()));
        assert_eq!(choice(&grpc.parameters, "priority"), C::Int64Param(2));
        assert_eq!(choice(&grpc.parameters, "sequence_start"), C::BoolParam(true));
        assert_eq!(choice(&grpc.parameters, "scale"), C::DoubleParam(0.5));
        let names: Vec<&str> = grpc.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["y", "z"]);
        assert_eq!(choice(&grpc.outputs[0].parameters, "binary_data"), C::BoolParam(false));
        assert!(grpc.outputs[1].parameters.is_empty());

        // Without any, the requests are as before: no parameters or outputs keys of their own.
        let plain = prepare(&Case { inputs: case.inputs.clone(), ..Default::default() }, "m", "").unwrap();
        let rest: Value = serde_json::from_slice(&plain.rest_json).unwrap();
        assert_eq!(rest.as_object().unwrap().keys().collect::<Vec<_>>(), ["inputs"]);
        let head: Value = serde_json::from_slice(&plain.rest_binary[..plain.rest_binary_header]).unwrap();
        assert_eq!(head["parameters"], json!({"binary_data_output": true}));
        assert!(head.get("outputs").is_none());

        // A parameter with no gRPC form is refused when the case is prepared.
        let nested = Case { parameters: params(json!({"nested": {"a": 1}})), ..case };
        let e = prepare(&nested, "m", "").err().unwrap();
        assert!(format!("{e:#}").contains("parameter `nested`"), "{e:#}");
    }
}
