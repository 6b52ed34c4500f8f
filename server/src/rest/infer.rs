//! `POST /v2/models/{m}[/versions/{v}]/infer`.

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;
use sluice_deployments::{InferError, InferRequest, InferResponse};

use super::AppState;
use super::json::{JsonData, JsonRequest, decode_data, input_header};
use crate::error::ApiError;

pub async fn infer(
    State(state): State<AppState>,
    Path(path): Path<HashMap<String, String>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let deployment = state
        .routes
        .resolve(&path["model"], path.get("version").map(String::as_str))?;
    let request = decode_request(&body)?;
    let response = deployment.infer(request).await?;
    Ok(encode_response(&response))
}

/// Decodes a JSON infer body into the internal request.
fn decode_request(body: &[u8]) -> Result<InferRequest, InferError> {
    let parsed: JsonRequest<'_> = serde_json::from_slice(body)
        .map_err(|e| InferError::invalid(format!("malformed inference request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in &parsed.inputs {
        let (dtype, shape) = input_header(input)?;
        let Some(raw) = input.data else {
            return Err(InferError::invalid(format!(
                "input `{}` has no `data`",
                input.name
            )));
        };
        inputs.push(decode_data(&input.name, dtype, shape, raw)?);
    }
    let outputs = parsed
        .outputs
        .map(|outs| outs.into_iter().map(|o| o.name).collect());
    Ok(InferRequest {
        id: parsed.id.filter(|id| !id.is_empty()),
        inputs,
        outputs,
    })
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
    data: JsonData<'a>,
}

fn encode_response(r: &InferResponse) -> Response {
    let body = JsonResponse {
        model_name: &r.model_name,
        model_version: &r.model_version,
        id: r.id.as_deref(),
        outputs: r
            .outputs
            .iter()
            .map(|o| JsonOutput {
                name: &o.name,
                datatype: o.tensor.dtype().as_str(),
                shape: o.tensor.shape(),
                data: JsonData(&o.tensor),
            })
            .collect(),
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => {
            let mut response = bytes.into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => ApiError::from(InferError::internal(format!("cannot encode response: {e}")))
            .into_response(),
    }
}
