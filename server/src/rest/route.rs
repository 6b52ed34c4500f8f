//! Plain-JSON routes onto pipelines, Ray Serve style: `POST {route_prefix}` with the JSON
//! fields the config maps to pipeline inputs (`{"text": ["..."]}`), answered with the fields it
//! maps from pipeline outputs (`{"embeddings": [[...]]}`), nested by shape.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use sluice_deployments::metrics::Protocol;
use sluice_deployments::{InferError, InferRequest, Pipeline, Tensor};

use super::AppState;
use super::json::{JsonData, decode_data};
use crate::error::ApiError;

/// Every path no other route takes: a pipeline's JSON route, or 404.
pub async fn fallback(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let Some(pipeline) = state.routes.json_route(if path.is_empty() { "/" } else { &path }) else {
        return ApiError::new(StatusCode::NOT_FOUND, "Not Found").into_response();
    };
    if req.method() != Method::POST {
        return ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes POST with a JSON body"))
            .into_response();
    }
    let body = match axum::body::to_bytes(req.into_body(), state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return super::screen::body_error(&e, state.max_body_bytes).into_response(),
    };
    let started = std::time::Instant::now();
    let result = call(&pipeline, &body).await;
    pipeline.metrics().request(
        Protocol::Rest,
        result.as_ref().map(|_| ()).map_err(|e| e.kind),
        started.elapsed(),
    );
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn call(pipeline: &Pipeline, body: &[u8]) -> Result<Value, InferError> {
    let Some(mapping) = &pipeline.json else {
        return Err(InferError::not_found("this pipeline has no JSON route"));
    };
    let doc: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| InferError::invalid(format!("body must be a JSON object: {e}")))?;
    let mut inputs = Vec::new();
    for (field, tensor) in &mapping.request {
        let value = doc.get(field).ok_or_else(|| InferError::invalid(format!("missing field `{field}`")))?;
        let spec = pipeline
            .metadata()
            .inputs
            .iter()
            .find(|s| &s.name == tensor)
            .ok_or_else(|| InferError::internal(format!("`{tensor}` is not a pipeline input")))?;
        let value = match value {
            Value::Array(_) => value.clone(),
            scalar => Value::Array(vec![scalar.clone()]),
        };
        let shape = shape_of(&value);
        let raw = serde_json::value::to_raw_value(&value).map_err(|e| InferError::invalid(e.to_string()))?;
        let t = decode_data(tensor, spec.dtype, shape, &raw)
            .map_err(|e| InferError::invalid(format!("field `{field}`: {e}")))?;
        inputs.push(t);
    }
    let outputs = mapping.response.iter().map(|(_, t)| t.clone()).collect();
    let answer =
        pipeline.infer(InferRequest { inputs, outputs: Some(outputs), ..Default::default() }).await?;
    let mut out = Map::new();
    for (field, tensor) in &mapping.response {
        if let Some(t) = answer.outputs.iter().find(|o| &o.name == tensor) {
            out.insert(field.clone(), nested(&t.tensor));
        }
    }
    Ok(Value::Object(out))
}

/// The shape of nested JSON arrays (following first elements).
fn shape_of(v: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    let mut cur = v;
    while let Value::Array(items) = cur {
        shape.push(items.len());
        match items.first() {
            Some(first) => cur = first,
            None => break,
        }
    }
    shape
}

/// A tensor as nested JSON arrays following its shape.
fn nested(t: &Tensor) -> Value {
    let flat = serde_json::to_value(JsonData(t)).unwrap_or(Value::Null);
    let Value::Array(items) = flat else { return flat };
    fn build(items: &[Value], shape: &[usize]) -> Value {
        match shape {
            [] | [_] => Value::Array(items.to_vec()),
            [_, rest @ ..] => {
                let step: usize = rest.iter().product::<usize>().max(1);
                Value::Array(items.chunks(step).map(|c| build(c, rest)).collect())
            }
        }
    }
    if t.shape().is_empty() {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        build(&items, t.shape())
    }
}
