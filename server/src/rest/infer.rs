//! `POST /v2/models/{m}[/versions/{v}]/infer`, JSON and the binary tensor extension: with an
//! `Inference-Header-Content-Length: N` header the first N bytes are JSON and the rest holds the
//! binary inputs, in order, each `parameters.binary_data_size` bytes long. Binary inputs are
//! slices of the request body (no copy).

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::{Map, Value};
use sluice_deployments::metrics::Protocol;
use sluice_deployments::{InferError, InferRequest, InferResponse, NamedTensor, Tensor};

use super::AppState;
use super::json::{JsonData, JsonRequest, decode_data, input_header};
use crate::error::ApiError;

/// The binary extension's header: length of the JSON part of a body.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

pub async fn infer(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let body = body.map_err(|e| super::screen::rejection(&e, state.max_body_bytes))?;
    let pinned = headers.get(sluice_router::VERSION_HEADER).and_then(|v| v.to_str().ok());
    let choice = sluice_router::VersionChoice { exact: path.get("version").map(String::as_str), pinned };
    let deployment = state.routes.route(&path["model"], choice)?;
    let result = match decode_request(&headers, body) {
        Ok((mut request, binary)) => {
            request.model_id = headers
                .get(sluice_deployments::MULTIPLEX_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            deployment.infer(request).await.map(|r| (r, binary))
        }
        Err(e) => Err(e),
    };
    deployment.metrics().request(
        Protocol::Rest,
        result.as_ref().map(|_| ()).map_err(|e| e.kind),
        started.elapsed(),
    );
    let (response, binary_outputs) = result?;
    let _encode = tracing::debug_span!("encode").entered();
    Ok(encode_response(&response, &binary_outputs))
}

/// Which outputs go back binary: `outputs[].parameters.binary_data` over the request's
/// `parameters.binary_data_output`, JSON when neither says.
pub struct BinaryOutputs {
    default: bool,
    per_output: HashMap<String, bool>,
}

impl BinaryOutputs {
    fn is_binary(&self, name: &str) -> bool {
        self.per_output.get(name).copied().unwrap_or(self.default)
    }
}

fn bool_param(params: Option<&Map<String, Value>>, key: &str) -> Result<Option<bool>, InferError> {
    match params.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(InferError::invalid(format!("parameter `{key}` must be a boolean, got {other}"))),
    }
}

/// Decodes an infer body (JSON, or JSON + binary tensors when `headers` carry
/// `Inference-Header-Content-Length`) into the internal request. Public for fuzzing.
pub fn decode_request(headers: &HeaderMap, body: Bytes) -> Result<(InferRequest, BinaryOutputs), InferError> {
    let json_len = match headers.get(HEADER_CONTENT_LENGTH) {
        None => body.len(),
        Some(v) => {
            let n = v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| {
                InferError::invalid(format!("{HEADER_CONTENT_LENGTH} must be a byte count"))
            })?;
            if n > body.len() {
                return Err(InferError::invalid(format!(
                    "{HEADER_CONTENT_LENGTH} is {n} but the body has only {} bytes",
                    body.len()
                )));
            }
            if n == 0 {
                return Err(InferError::invalid(format!(
                    "{HEADER_CONTENT_LENGTH}: 0 (a raw binary request without JSON) is not supported"
                )));
            }
            n
        }
    };
    let json_part = body.slice(..json_len);
    let mut binary = body.slice(json_len..);
    let parsed: JsonRequest<'_> = serde_json::from_slice(&json_part)
        .map_err(|e| InferError::invalid(format!("malformed inference request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in &parsed.inputs {
        let (dtype, shape) = input_header(input)?;
        let params = input.parameters.as_ref();
        if params.is_some_and(|p| p.contains_key("shared_memory_region")) {
            return Err(InferError::invalid(format!(
                "input `{}`: shared memory is not supported; send the data inline",
                input.name
            )));
        }
        let binary_size = match params.and_then(|p| p.get("binary_data_size")) {
            None => None,
            Some(v) => Some(v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                InferError::invalid(format!("input `{}`: binary_data_size must be a byte count", input.name))
            })?),
        };
        let tensor = match (input.data, binary_size) {
            (Some(_), Some(_)) => {
                return Err(InferError::invalid(format!(
                    "input `{}` has both `data` and `binary_data_size`; give one",
                    input.name
                )));
            }
            (Some(raw), None) => decode_data(&input.name, dtype, shape, raw)?,
            (None, Some(size)) => {
                if size > binary.len() {
                    return Err(InferError::invalid(format!(
                        "unexpected size for input `{}`: binary_data_size is {size} but only {} binary \
                         bytes remain",
                        input.name,
                        binary.len()
                    )));
                }
                let data = binary.split_to(size);
                let tensor = Tensor::new(dtype, shape, data)
                    .map_err(|e| InferError::invalid(format!("input `{}`: {e}", input.name)))?;
                NamedTensor { name: input.name.clone(), tensor }
            }
            (None, None) => {
                return Err(InferError::invalid(format!(
                    "input `{}` has no `data` (and no `binary_data_size`)",
                    input.name
                )));
            }
        };
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(InferError::invalid(format!(
            "unexpected additional input data: {} bytes after the last binary input",
            binary.len()
        )));
    }
    let default = bool_param(parsed.parameters.as_ref(), "binary_data_output")?.unwrap_or(false);
    let mut per_output = HashMap::new();
    let mut outputs = None;
    if let Some(requested) = parsed.outputs {
        let mut names = Vec::with_capacity(requested.len());
        for o in requested {
            if let Some(b) = bool_param(o.parameters.as_ref(), "binary_data")? {
                per_output.insert(o.name.clone(), b);
            }
            if o.parameters.as_ref().is_some_and(|p| p.contains_key("classification")) {
                return Err(InferError::invalid(format!(
                    "output `{}`: the classification extension is not supported",
                    o.name
                )));
            }
            names.push(o.name);
        }
        outputs = Some(names);
    }
    let timeout = match parsed.parameters.as_ref().and_then(|p| p.get("timeout")) {
        None => None,
        Some(v) => Some(v.as_u64().map(std::time::Duration::from_micros).ok_or_else(|| {
            InferError::invalid(format!(
                "parameter `timeout` must be microseconds (an unsigned integer), got {v}"
            ))
        })?),
    };
    let request =
        InferRequest { id: parsed.id.filter(|id| !id.is_empty()), inputs, outputs, timeout, model_id: None };
    Ok((request, BinaryOutputs { default, per_output }))
}

#[derive(Serialize)]
struct JsonResponse<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<JsonOutput<'a>>,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinaryParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinaryParameters {
    binary_data_size: usize,
}

fn encode_response(r: &InferResponse, binary: &BinaryOutputs) -> Response {
    let mut blobs: Vec<&Bytes> = Vec::new();
    let outputs = r
        .outputs
        .iter()
        .map(|o| {
            let is_binary = binary.is_binary(&o.name);
            if is_binary {
                blobs.push(o.tensor.data());
            }
            JsonOutput {
                name: &o.name,
                datatype: o.tensor.dtype().as_str(),
                shape: o.tensor.shape(),
                parameters: is_binary.then(|| BinaryParameters { binary_data_size: o.tensor.data().len() }),
                data: (!is_binary).then_some(JsonData(&o.tensor)),
            }
        })
        .collect();
    let body = JsonResponse {
        model_name: &r.model_name,
        model_version: &r.model_version,
        id: r.id.as_deref(),
        outputs,
    };
    let json = match serde_json::to_vec(&body) {
        Ok(json) => json,
        Err(e) => {
            return ApiError::from(InferError::internal(format!("cannot encode response: {e}")))
                .into_response();
        }
    };
    let binary_len: usize = blobs.iter().map(|b| b.len()).sum();
    if binary_len == 0 {
        let mut response = json.into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return response;
    }
    let mut out = BytesMut::with_capacity(json.len() + binary_len);
    out.put_slice(&json);
    for b in blobs {
        out.put_slice(b);
    }
    let mut response = out.freeze().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(HEADER_CONTENT_LENGTH, HeaderValue::from(json.len()));
    response
}
