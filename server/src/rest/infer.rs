//! `POST /v2/models/{m}[/versions/{v}]/infer`, JSON and the binary tensor extension: with an
//! `Inference-Header-Content-Length: N` header the first N bytes are JSON and the rest holds the
//! binary inputs, in order, each `parameters.binary_data_size` bytes long. Binary inputs are
//! slices of the request body (no copy).

use std::collections::HashMap;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use sluice_deployments::metrics::Protocol;
use sluice_deployments::{InferError, InferRequest, InferResponse, NamedTensor, Tensor};

use super::AppState;
use super::json::{
    InputData, JsonRequest, Params, decode_data, decoded, first_not_utf8, input_header, quote_non_finite,
};
use super::json_scan;
use crate::error::ApiError;

/// The binary extension's header: length of the JSON part of a body.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// The infer routes' path: `/v2/models/{model}[/versions/{version}]/infer`.
#[derive(serde::Deserialize)]
pub struct ModelPath {
    model: String,
    version: Option<String>,
}

/// The headers the infer path reads, named once (a `&str` key is parsed on every lookup).
static VERSION_HEADER: HeaderName = HeaderName::from_static(sluice_router::VERSION_HEADER);
pub(super) static MULTIPLEX_HEADER: HeaderName =
    HeaderName::from_static(sluice_deployments::MULTIPLEX_HEADER);

/// A header's value as text (UTF-8: a multiplexed model's folder may be named `café`), absent
/// or not; one that is not UTF-8 is refused naming it (it was dropped: an unreadable version pin
/// went through the traffic split, an unreadable model id read as none).
pub(super) fn text_header<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("header `{name}` is not UTF-8 text"))),
    }
}
static INFERENCE_HEADER_CONTENT_LENGTH: HeaderName = HeaderName::from_static(HEADER_CONTENT_LENGTH);

/// The infer routes' handler, for the paths [`infer_path`] leaves to the router (those with
/// percent-escapes, which the router decodes).
pub async fn infer(
    State(state): State<AppState>,
    Path(path): Path<ModelPath>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    serve(&state, &path.model, path.version.as_deref(), &parts.headers, body).await
}

/// `(model, version)` of a plain infer path, `/v2/models/{m}/infer` or
/// `/v2/models/{m}/versions/{v}/infer` with no empty segment; `None` for any other path, and
/// for one with percent-escapes (the router decodes those).
pub fn infer_path(path: &str) -> Option<(&str, Option<&str>)> {
    let names = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    if names.contains('%') {
        return None;
    }
    let mut segments = names.split('/');
    match (segments.next(), segments.next(), segments.next(), segments.next()) {
        (Some(m), None, None, None) if !m.is_empty() => Some((m, None)),
        (Some(m), Some("versions"), Some(v), None) if !m.is_empty() && !v.is_empty() => Some((m, Some(v))),
        _ => None,
    }
}

/// Where [`infer_path`] found the names in a path, kept while the request moves into its
/// handler (the path is read once).
#[derive(Clone)]
pub struct Names {
    model: std::ops::Range<usize>,
    version: Option<std::ops::Range<usize>>,
}

impl Names {
    /// The names of `path` when it is a plain infer path.
    pub fn of(path: &str) -> Option<Self> {
        let (model, version) = infer_path(path)?;
        let at = |s: &str| {
            let start = s.as_ptr() as usize - path.as_ptr() as usize;
            start..start + s.len()
        };
        Some(Self { model: at(model), version: version.map(at) })
    }
}

/// Serves a `POST` to the plain infer path whose `names` [`Names::of`] found, without the
/// router (see [`super::Rest`]).
pub async fn serve_matched(state: AppState, request: Request, names: Names) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let version = names.version.map(|v| &path[v]);
    serve(&state, &path[names.model], version, &parts.headers, body).await.into_response()
}

/// One infer request: its body read, decoded, routed to the model (`version` from the path,
/// else a pinned version header, else the traffic split), run, encoded.
async fn serve(
    state: &AppState,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = super::screen::read_body(body, state.max_body_bytes).await?;
    // From the body in memory, as gRPC and the JSON routes count: a slow upload is the
    // client's time, not the request's.
    let started = std::time::Instant::now();
    let pinned = text_header(headers, &VERSION_HEADER)?;
    let model_id = text_header(headers, &MULTIPLEX_HEADER)?.map(str::to_string);
    let choice = sluice_router::VersionChoice { exact: version, pinned };
    let deployment = state.routes.route(model, choice)?;
    let (rerouted, handed_on);
    let mut counted = deployment.metrics().counted(Protocol::Rest, started);
    let result = match decode_request(headers, body) {
        Ok((mut request, binary)) => {
            request.model_id = model_id;
            // Routed again if a swap took it out of the table while the body was decoded.
            rerouted = state.routes.rerouted(&deployment, model, choice);
            if let Some(to) = &rerouted {
                counted = counted.moved(to.metrics());
            }
            let deployment = rerouted.as_ref().unwrap_or(&deployment);
            let answer;
            (answer, handed_on) = state.routes.infer(deployment, model, choice, request).await;
            if let Some(to) = &handed_on {
                counted = counted.moved(to.metrics());
            }
            answer.and_then(|r| json_can_carry(&r, &binary).map(|()| (r, binary)))
        }
        Err(e) => Err(e),
    };
    counted.answered(result.as_ref().map(|_| ()).map_err(|e| e.kind));
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

/// A BYTES output answered in JSON must be UTF-8, as a JSON string cannot hold other bytes: one
/// that is not is refused, naming the way to get it, rather than sent altered.
fn json_can_carry(r: &InferResponse, binary: &BinaryOutputs) -> Result<(), InferError> {
    for o in r.outputs.iter().filter(|o| !binary.is_binary(&o.name)) {
        if let Some(i) = first_not_utf8(&o.tensor) {
            return Err(InferError::invalid(format!(
                "output `{0}`: element {i} is not UTF-8, which a JSON answer cannot carry; ask for it \
                 as binary data (\"outputs\": [{{\"name\": \"{0}\", \"parameters\": {{\"binary_data\": true}}}}])",
                o.name
            )));
        }
    }
    Ok(())
}

fn bool_param(params: Option<&Params>, key: &str) -> Result<Option<bool>, InferError> {
    match params.and_then(|p| p.get(key)) {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw.get()).map(Some).map_err(|_| {
            InferError::invalid(format!("parameter `{key}` must be a boolean, got {}", shown(raw)))
        }),
    }
}

/// A parameter's JSON text for an error, cut to a readable length.
fn shown(raw: &serde_json::value::RawValue) -> String {
    let text = raw.get();
    match text.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

/// Decodes an infer body (JSON, or JSON + binary tensors when `headers` carry
/// `Inference-Header-Content-Length`) into the internal request. Public for fuzzing.
pub fn decode_request(headers: &HeaderMap, body: Bytes) -> Result<(InferRequest, BinaryOutputs), InferError> {
    let json_len = match headers.get(&INFERENCE_HEADER_CONTENT_LENGTH) {
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
    let quoted: Vec<u8>;
    let parsed = match json_scan::read(&json_part) {
        Some(parsed) => parsed,
        None => match serde_json::from_slice::<JsonRequest<'_>>(&json_part) {
            Ok(parsed) => parsed,
            // NaN and infinities as Triton reads them, which serde's reader does not.
            Err(e) => match quote_non_finite(&json_part) {
                Some(text) => {
                    quoted = text;
                    serde_json::from_slice::<JsonRequest<'_>>(&quoted)
                        .map_err(|e| InferError::invalid(format!("malformed inference request JSON: {e}")))?
                }
                None => return Err(InferError::invalid(format!("malformed inference request JSON: {e}"))),
            },
        },
    };
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in parsed.inputs {
        let (dtype, shape) = input_header(&input)?;
        let params = input.parameters.as_ref();
        if params.is_some_and(|p| p.contains_key("shared_memory_region")) {
            return Err(sluice_deployments::refuse_shared_memory(&format!("input `{}`", input.name)));
        }
        let binary_size = match params.and_then(|p| p.get("binary_data_size")) {
            None => None,
            Some(v) => Some(
                serde_json::from_str::<u64>(v.get()).ok().and_then(|n| usize::try_from(n).ok()).ok_or_else(
                    || {
                        InferError::invalid(format!(
                            "input `{}`: binary_data_size must be a byte count",
                            input.name
                        ))
                    },
                )?,
            ),
        };
        let tensor = match (input.data, binary_size) {
            (Some(_), Some(_)) => {
                return Err(InferError::invalid(format!(
                    "input `{}` has both `data` and `binary_data_size`; give one",
                    input.name
                )));
            }
            (Some(InputData::Raw(raw)), None) => decode_data(&input.name, dtype, shape, raw)?,
            (Some(InputData::Decoded { bytes, count }), None) => {
                let tensor = decoded(&input.name, dtype, shape, bytes, count)?;
                NamedTensor { name: input.name, tensor }
            }
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
                NamedTensor { name: input.name, tensor }
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
    if let Some(name) = parsed.parameters.as_ref().and_then(Params::reserved) {
        sluice_deployments::check_parameter_name(name)?;
    }
    // Taken as Triton takes it (a bool), and changes nothing for one answer.
    bool_param(parsed.parameters.as_ref(), sluice_deployments::ENABLE_EMPTY_FINAL_RESPONSE)?;
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
                return Err(sluice_deployments::refuse_classification(&o.name));
            }
            if o.parameters.as_ref().is_some_and(|p| p.contains_key("shared_memory_region")) {
                return Err(sluice_deployments::refuse_shared_memory(&format!("output `{}`", o.name)));
            }
            names.push(o.name);
        }
        // An empty list asks for every output, as no list does (gRPC's reading, and Triton's).
        outputs = (!names.is_empty()).then_some(names);
    }
    // 0 is no timeout of the client's own (Triton's reading), as an absent one is.
    let timeout = match parsed.parameters.as_ref().and_then(|p| p.get("timeout")) {
        None => None,
        Some(v) => {
            let us = serde_json::from_str::<u64>(v.get()).map_err(|_| {
                InferError::invalid(format!(
                    "parameter `timeout` must be microseconds (an unsigned integer), got {}",
                    shown(v)
                ))
            })?;
            (us > 0).then(|| std::time::Duration::from_micros(us))
        }
    };
    let request =
        InferRequest { id: parsed.id.filter(|id| !id.is_empty()), inputs, outputs, timeout, model_id: None };
    Ok((request, BinaryOutputs { default, per_output }))
}

/// Writes the response JSON by hand into one buffer sized up front: the keys are constants
/// (no escaping, no serializer state per field), and only names, ids and the data arrays go
/// through serde_json. The same document serde would write for the OIP response struct.
fn encode_response(r: &InferResponse, binary: &BinaryOutputs) -> Response {
    let mut blobs: Vec<&Bytes> = Vec::new();
    // Names, datatypes and shapes are short; a JSON number takes about 12 bytes (the buffer
    // grows past the estimate when they are longer). Binary outputs add nothing here.
    let estimate = 64
        + r.id.as_ref().map_or(0, |id| id.len() + 8)
        + r.outputs
            .iter()
            .map(|o| {
                let data = if binary.is_binary(&o.name) { 0 } else { o.tensor.len().min(1 << 20) * 12 };
                96 + o.name.len() + data
            })
            .sum::<usize>();
    let mut json = Vec::with_capacity(estimate);
    let written = (|| -> serde_json::Result<()> {
        json.extend_from_slice(b"{\"model_name\":");
        serde_json::to_writer(&mut json, &*r.model_name)?;
        json.extend_from_slice(b",\"model_version\":");
        serde_json::to_writer(&mut json, &*r.model_version)?;
        if let Some(id) = &r.id {
            json.extend_from_slice(b",\"id\":");
            serde_json::to_writer(&mut json, id)?;
        }
        json.extend_from_slice(b",\"outputs\":[");
        for (i, o) in r.outputs.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(b"{\"name\":");
            serde_json::to_writer(&mut json, &o.name)?;
            json.extend_from_slice(b",\"datatype\":\"");
            json.extend_from_slice(o.tensor.dtype().as_str().as_bytes());
            json.extend_from_slice(b"\",\"shape\":");
            serde_json::to_writer(&mut json, o.tensor.shape())?;
            if binary.is_binary(&o.name) {
                blobs.push(o.tensor.data());
                json.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
                serde_json::to_writer(&mut json, &o.tensor.data().len())?;
                json.push(b'}');
            } else {
                json.extend_from_slice(b",\"data\":");
                super::json::write_data(&mut json, &o.tensor);
            }
            json.push(b'}');
        }
        json.extend_from_slice(b"]}");
        Ok(())
    })();
    if let Err(e) = written {
        return ApiError::from(InferError::internal(format!("cannot encode response: {e}"))).into_response();
    }
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

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use sluice_deployments::{DataType, push_bytes_element};

    use super::*;

    #[test]
    fn only_plain_infer_paths_take_the_short_way() {
        let path = "/v2/models/m/versions/3/infer";
        let names = Names::of(path).unwrap();
        assert_eq!((&path[names.model], names.version.map(|v| &path[v])), ("m", Some("3")));
        assert_eq!(infer_path("/v2/models/m/infer"), Some(("m", None)));
        assert_eq!(infer_path("/v2/models/m/versions/3/infer"), Some(("m", Some("3"))));
        // A model may be called `versions`; the router reads such a path the same way.
        assert_eq!(infer_path("/v2/models/versions/infer"), Some(("versions", None)));
        for other in [
            "/v2/models/m%2D1/infer",
            "/v2/models//infer",
            "/v2/models/m/infer/",
            "/v2/models/m/versions//infer",
            "/v2/models/m/versions/infer",
            "/v2/models/m/x/3/infer",
            "/v2/models/m/versions/3/4/infer",
            "/v2/models/m/ready",
            "/v2/models/infer",
            "/prefix/v2/models/m/infer",
        ] {
            assert_eq!(infer_path(other), None, "{other}");
        }
    }

    fn tensor(dtype: DataType, shape: Vec<usize>, data: Vec<u8>) -> Tensor {
        Tensor::new(dtype, shape, Bytes::from(data)).unwrap()
    }

    async fn body(response: Response) -> Bytes {
        axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap()
    }

    /// Parameters Sluice does not read are read past, not built (a `serde_json::Value` tree took
    /// some 16 times a large one's size); those it reads are checked as before, an error quoting a
    /// value cut short; a reserved name is refused wherever it comes among the others.
    #[test]
    fn parameters_are_read_for_what_sluice_takes() {
        let decode = |params: &str| {
            let body = format!(
                r#"{{"parameters":{params},"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[1]}}]}}"#
            );
            decode_request(&HeaderMap::new(), Bytes::from(body))
        };
        let big = format!("[{}0]", "0,".repeat(100_000));
        let (r, binary) =
            decode(&format!(r#"{{"other":{big},"timeout":5,"binary_data_output":true,"more":{{"a":[1]}}}}"#))
                .unwrap();
        assert_eq!(r.timeout, Some(std::time::Duration::from_micros(5)));
        assert!(binary.default);
        let fails = |params: &str| decode(params).err().expect("refused");
        let e = fails(&format!(r#"{{"timeout":{big}}}"#));
        assert!(
            e.message
                .starts_with("parameter `timeout` must be microseconds (an unsigned integer), got [0,0,"),
            "{}",
            e.message
        );
        assert!(e.message.len() < 200, "{}", e.message);
        let e = fails(r#"{"a":1,"triton_x":2,"b":3}"#);
        assert!(e.message.contains("parameter `triton_x` is reserved"), "{}", e.message);
        let e = fails(r#"{"binary_data_output":"yes"}"#);
        assert_eq!(e.message, r#"parameter `binary_data_output` must be a boolean, got "yes""#);
    }

    /// JSON strings hold UTF-8 only: a BYTES output that is not UTF-8 is refused in a JSON
    /// answer, naming the output and how to get it (it was sent with U+FFFD in place of the
    /// bytes); asked for as binary data, it goes back as it is. (ONNX Runtime's string tensors
    /// take UTF-8 only here, so no fixture model answers other bytes.)
    #[tokio::test]
    async fn a_bytes_output_that_is_not_utf8_is_refused_in_json_not_altered() {
        let mut strings = Vec::new();
        push_bytes_element(&mut strings, b"ok").unwrap();
        push_bytes_element(&mut strings, &[0xff, 0xfe]).unwrap();
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![NamedTensor {
                name: "text".into(),
                tensor: tensor(DataType::Bytes, vec![2], strings.clone()),
            }],
        };
        let json = BinaryOutputs { default: false, per_output: HashMap::new() };
        let e = json_can_carry(&response, &json).unwrap_err();
        assert_eq!(e.kind, sluice_deployments::ErrorKind::InvalidArgument);
        assert!(e.message.starts_with("output `text`: element 1 is not UTF-8"), "{}", e.message);
        assert!(e.message.contains(r#""parameters": {"binary_data": true}"#), "{}", e.message);
        let binary =
            BinaryOutputs { default: false, per_output: HashMap::from([("text".to_string(), true)]) };
        assert!(json_can_carry(&response, &binary).is_ok());
        let r = encode_response(&response, &binary);
        let header_len: usize =
            r.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
        assert_eq!(&body(r).await[header_len..], &strings[..], "the bytes as they are");
    }

    #[tokio::test]
    async fn the_response_is_the_oip_document_with_names_escaped() {
        let mut strings = Vec::new();
        push_bytes_element(&mut strings, "a \"quoted\"\nline".as_bytes()).unwrap();
        let floats: Vec<u8> = [0.5f32, -2.0, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        let response = InferResponse {
            model_name: "m\"1".into(),
            model_version: "7".into(),
            id: Some("req\\1".into()),
            outputs: vec![
                NamedTensor { name: "y".into(), tensor: tensor(DataType::Fp32, vec![1, 3], floats) },
                NamedTensor { name: "text".into(), tensor: tensor(DataType::Bytes, vec![1], strings) },
            ],
        };
        let json = BinaryOutputs { default: false, per_output: HashMap::new() };
        let text = String::from_utf8(body(encode_response(&response, &json)).await.to_vec()).unwrap();
        assert!(text.contains("[0.5,-2.0,NaN]"), "Triton's word for NaN: {text}");
        let got: Value = serde_json::from_str(&text.replace(",NaN]", ",\"NaN\"]")).unwrap();
        let want = serde_json::json!({
            "model_name": "m\"1", "model_version": "7", "id": "req\\1",
            "outputs": [
                {"name": "y", "datatype": "FP32", "shape": [1, 3], "data": [0.5, -2.0, "NaN"]},
                {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a \"quoted\"\nline"]},
            ],
        });
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn binary_outputs_follow_the_json_part() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: None,
            outputs: vec![
                NamedTensor { name: "a".into(), tensor: tensor(DataType::Uint8, vec![2], vec![7, 8]) },
                NamedTensor {
                    name: "b".into(),
                    tensor: tensor(DataType::Int32, vec![1], 5i32.to_le_bytes().to_vec()),
                },
            ],
        };
        let per_output = HashMap::from([("a".to_string(), true)]);
        let r = encode_response(&response, &BinaryOutputs { default: false, per_output });
        let json_len: usize = r.headers()[HEADER_CONTENT_LENGTH].to_str().unwrap().parse().unwrap();
        let bytes = body(r).await;
        assert_eq!(&bytes[json_len..], &[7, 8]);
        let got: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
        let want = serde_json::json!({
            "model_name": "m", "model_version": "1",
            "outputs": [
                {"name": "a", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}},
                {"name": "b", "datatype": "INT32", "shape": [1], "data": [5]},
            ],
        });
        assert_eq!(got, want);
    }
}
