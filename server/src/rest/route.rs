//! Plain-JSON routes onto pipelines, Ray Serve style: `POST {route_prefix}` with the JSON
//! fields the config maps to pipeline inputs (`{"text": ["..."]}`), answered with the fields it
//! maps from pipeline outputs (`{"embeddings": [[...]]}`), nested by shape.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sluice_deployments::metrics::Protocol;
use sluice_deployments::{InferError, InferRequest, Pipeline, Tensor};

use super::AppState;
use super::json::{JsonData, decode_data, first_not_utf8};
use crate::error::ApiError;

/// Every path no other route takes: a pipeline's JSON route, or 404.
pub async fn fallback(State(state): State<AppState>, req: Request) -> Response {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let route = if path.is_empty() { "/".to_string() } else { path.clone() };
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "Not Found").into_response();
    if state.routes.json_route(&route).is_none() {
        return not_found();
    }
    if req.method() != Method::POST {
        return ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{path} takes POST with a JSON body"))
            .into_response();
    }
    // A pipeline passes the multiplexed model id on to its multiplexed steps, as on its OIP route.
    let model_id = match super::infer::text_header(req.headers(), &super::infer::MULTIPLEX_HEADER) {
        Ok(id) => id.map(str::to_string),
        Err(e) => return e.into_response(),
    };
    let body = match super::screen::read_body(req.into_body(), state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    // Resolved once the body is in: resolved before a slow upload, the pipeline held steps a
    // swap meanwhile had drained (none of its requests were in them yet) and stopped.
    let Some(pipeline) = state.routes.json_route(&route) else { return not_found() };
    let counted = pipeline.metrics().counted(Protocol::Rest, std::time::Instant::now());
    let mut rerouted = None;
    let result = call(&state.routes, &route, &pipeline, &body, model_id, &mut rerouted).await;
    let counted = match &rerouted {
        Some(to) => counted.moved(to.metrics()),
        None => counted,
    };
    counted.answered(result.as_ref().map(|_| ()).map_err(|e| e.kind));
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn call(
    routes: &sluice_router::Router,
    path: &str,
    pipeline: &Pipeline,
    body: &[u8],
    model_id: Option<String>,
    rerouted: &mut Option<std::sync::Arc<Pipeline>>,
) -> Result<Value, InferError> {
    let Some(mapping) = &pipeline.json else {
        return Err(InferError::not_found("this pipeline has no JSON route"));
    };
    // Each field kept as its text, read straight into its tensor: no tree of values (one was
    // built of the whole body, and each mapped field cloned and written out again, about 30
    // times the body in memory).
    let doc: std::collections::HashMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| InferError::invalid(format!("body must be a JSON object: {e}")))?;
    let mut inputs = Vec::new();
    for (field, tensor) in &mapping.request {
        let raw = *doc.get(field).ok_or_else(|| InferError::invalid(format!("missing field `{field}`")))?;
        let spec = pipeline
            .metadata()
            .inputs
            .iter()
            .find(|s| &s.name == tensor)
            .ok_or_else(|| InferError::internal(format!("`{tensor}` is not a pipeline input")))?;
        // A single value is a list of one.
        let wrapped;
        let raw = match raw.get().trim_start().starts_with('[') {
            true => raw,
            false => {
                wrapped = RawValue::from_string(format!("[{}]", raw.get()))
                    .map_err(|e| InferError::invalid(e.to_string()))?;
                &*wrapped
            }
        };
        let shape = shape_of(raw).map_err(|e| InferError::invalid(format!("field `{field}`: {e}")))?;
        let t = decode_data(tensor, spec.dtype, shape, raw)
            .map_err(|e| InferError::invalid(format!("field `{field}`: {e}")))?;
        inputs.push(t);
    }
    let outputs = mapping.response.iter().map(|(_, t)| t.clone()).collect();
    // Routed again if a swap took a step out of the table while the body was decoded (the new
    // pipeline maps the same fields: a route's mapping changes only with its config).
    *rerouted = routes.rerouted_json(pipeline, path);
    let answer = rerouted
        .as_deref()
        .unwrap_or(pipeline)
        .infer(InferRequest { inputs, outputs: Some(outputs), model_id, ..Default::default() })
        .await?;
    let mut out = Map::new();
    for (field, tensor) in &mapping.response {
        if let Some(t) = answer.outputs.iter().find(|o| &o.name == tensor) {
            out.insert(field.clone(), field_value(pipeline.name(), field, tensor, &t.tensor)?);
        }
    }
    Ok(Value::Object(out))
}

/// `field`'s value, from the pipeline's output `tensor`. A JSON string cannot hold bytes that
/// are not UTF-8: refused (400, as on the OIP route, whose binary data can carry them), not
/// sent altered.
fn field_value(pipeline: &str, field: &str, tensor: &str, t: &Tensor) -> Result<Value, InferError> {
    if let Some(i) = first_not_utf8(t) {
        return Err(InferError::invalid(format!(
            "field `{field}`: element {i} of tensor `{tensor}` is not UTF-8, which a JSON answer \
             cannot carry (the OIP route `/v2/models/{pipeline}/infer` can send it as binary data)"
        )));
    }
    Ok(nested(t))
}

/// The shape of nested JSON arrays (following first elements), refused unless every array at
/// one depth has that length and holds arrays alike (flattened, a ragged array would be read
/// as another shape). Read from the text as it streams by, keeping nothing but the shape.
fn shape_of(raw: &RawValue) -> Result<Vec<usize>, String> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut path = Vec::new();
    let shape = Shape { path: &mut path, expect: None }.deserialize(&mut de).map_err(|e| e.to_string())?;
    Ok(shape)
}

/// The shape of the JSON value at `path`, checked against `expect` (the shape of the first
/// element at its depth, when it is not the first).
struct Shape<'a> {
    path: &'a mut Vec<usize>,
    expect: Option<&'a [usize]>,
}

impl Shape<'_> {
    fn at(&self) -> String {
        self.path.iter().map(|i| format!("[{i}]")).collect()
    }

    fn not_rectangular<E: serde::de::Error>(&self, what: std::fmt::Arguments<'_>) -> E {
        E::custom(format!("the nested arrays are not rectangular: `{}` {what}", self.at()))
    }

    /// A value that is not an array (a number, a string, an object).
    fn leaf<E: serde::de::Error>(self) -> Result<Vec<usize>, E> {
        match self.expect {
            Some([_, ..]) => {
                Err(self
                    .not_rectangular(format_args!("is not an array where the first element at its depth is")))
            }
            _ => Ok(Vec::new()),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Shape<'_> {
    type Value = Vec<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<usize>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Shape<'_> {
    type Value = Vec<usize>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<usize>, A::Error> {
        if let Some([]) = self.expect {
            return Err(
                self.not_rectangular(format_args!("is an array where the first element at its depth is not"))
            );
        }
        let mut n = 0;
        let mut first: Option<Vec<usize>> = None;
        loop {
            // Each element's shape is the first's: the one expected of this array's elements,
            // or, for the first array at its depth, its own first element's.
            let expect = match (self.expect, &first) {
                (Some([_, rest @ ..]), _) => Some(rest),
                (_, Some(f)) => Some(f.as_slice()),
                _ => None,
            };
            self.path.push(n);
            let element = seq.next_element_seed(Shape { path: &mut *self.path, expect })?;
            self.path.pop();
            let Some(shape) = element else { break };
            if first.is_none() {
                first = Some(shape);
            }
            n += 1;
        }
        if let Some(&[len, ..]) = self.expect
            && len != n
        {
            return Err(self.not_rectangular(format_args!(
                "has length {n} where the first array at its depth has length {len}"
            )));
        }
        let mut shape = vec![n];
        shape.extend(first.unwrap_or_default());
        Ok(shape)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Vec<usize>, A::Error> {
        while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
        self.leaf()
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Vec<usize>, E> {
        self.leaf()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Vec<usize>, E> {
        self.leaf()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Vec<usize>, E> {
        self.leaf()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Vec<usize>, E> {
        self.leaf()
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Vec<usize>, E> {
        self.leaf()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<usize>, E> {
        self.leaf()
    }
}

/// A tensor as nested JSON arrays following its shape.
fn nested(t: &Tensor) -> Value {
    let flat = serde_json::to_value(JsonData(t)).unwrap_or(Value::Null);
    let Value::Array(items) = flat else { return flat };
    // Driven by the shape, not the items: `[2, 0]` is `[[], []]`, not `[]`.
    fn build(items: &[Value], shape: &[usize]) -> Value {
        match shape {
            [] | [_] => Value::Array(items.to_vec()),
            [n, rest @ ..] => {
                let step: usize = rest.iter().product();
                Value::Array(
                    (0..*n)
                        .map(|i| build(items.get(i * step..(i + 1) * step).unwrap_or(&[]), rest))
                        .collect(),
                )
            }
        }
    }
    if t.shape().is_empty() {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        build(&items, t.shape())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use bytes::Bytes;
    use sluice_deployments::{DataType, Tensor};

    use super::{field_value, nested, shape_of};

    #[test]
    fn outputs_nest_by_their_shape_also_when_empty() {
        let t = |shape: Vec<usize>, data: Vec<f32>| {
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            Tensor::new(DataType::Fp32, shape, Bytes::from(bytes)).unwrap()
        };
        assert_eq!(nested(&t(vec![2, 3], vec![1., 2., 3., 4., 5., 6.])), json!([[1., 2., 3.], [4., 5., 6.]]));
        assert_eq!(nested(&t(vec![2, 0], vec![])), json!([[], []]));
        assert_eq!(nested(&t(vec![2, 1, 0], vec![])), json!([[[]], [[]]]));
        assert_eq!(nested(&t(vec![0, 3], vec![])), json!([]));
        assert_eq!(nested(&t(vec![], vec![7.])), json!(7.));
    }

    /// A BYTES output that is not UTF-8 is the request's to fix (by the OIP route's binary
    /// data), as on that route: 400, naming the field, the tensor and the way.
    #[test]
    fn a_bytes_output_that_is_not_utf8_is_refused_naming_the_oip_route() {
        let mut strings = Vec::new();
        for s in [&b"ok"[..], &[0xff, 0xfe]] {
            strings.extend_from_slice(&(s.len() as u32).to_le_bytes());
            strings.extend_from_slice(s);
        }
        let t = Tensor::new(DataType::Bytes, vec![2], Bytes::from(strings)).unwrap();
        let e = field_value("p", "texts", "out", &t).unwrap_err();
        assert_eq!(e.kind, sluice_deployments::ErrorKind::InvalidArgument);
        assert!(
            e.message.starts_with("field `texts`: element 1 of tensor `out` is not UTF-8"),
            "{}",
            e.message
        );
        assert!(e.message.contains("`/v2/models/p/infer`"), "{}", e.message);
        let ok = Tensor::new(DataType::Bytes, vec![1], Bytes::from(b"\x02\0\0\0ok".to_vec())).unwrap();
        assert_eq!(field_value("p", "texts", "out", &ok).unwrap(), json!(["ok"]));
    }

    /// Flattened, a ragged array would be read as another shape (`[[1, 2], [3], [4, 5, 6]]` as
    /// 3×2): it is refused, naming the array that differs.
    #[test]
    fn ragged_nested_arrays_are_refused_naming_where() {
        let shape_of = |v: serde_json::Value| shape_of(&serde_json::value::to_raw_value(&v).unwrap());
        assert_eq!(shape_of(json!([[1, 2], [3, 4], [5, 6]])), Ok(vec![3, 2]));
        assert_eq!(shape_of(json!([[], []])), Ok(vec![2, 0]));
        assert_eq!(shape_of(json!(["a", "b"])), Ok(vec![2]));
        assert_eq!(
            shape_of(json!([[{"a": [1]}], [2]])),
            Ok(vec![2, 1]),
            "an object is a value (refused later)"
        );
        let e = shape_of(json!([[1, 2], [3], [4, 5, 6]])).unwrap_err();
        assert!(e.contains("`[1]` has length 1 where the first array at its depth has length 2"), "{e}");
        let e = shape_of(json!([[[1], [2]], [[3], [4, 5]]])).unwrap_err();
        assert!(e.contains("`[1][1]` has length 2"), "{e}");
        let e = shape_of(json!([[[1, 2]], [[3]]])).unwrap_err();
        assert!(e.contains("`[1][0]` has length 1 where the first array at its depth has length 2"), "{e}");
        let e = shape_of(json!([[], [1]])).unwrap_err();
        assert!(e.contains("`[1]` has length 1 where the first array at its depth has length 0"), "{e}");
        let e = shape_of(json!([[1, 2], 3])).unwrap_err();
        assert!(e.contains("`[1]` is not an array"), "{e}");
        let e = shape_of(json!([1, [2]])).unwrap_err();
        assert!(e.contains("`[1]` is an array"), "{e}");
    }
}
