//! Plain-JSON routes onto pipelines, Ray Serve style: `POST {route_prefix}` with the JSON
//! fields the config maps to pipeline inputs (`{"text": ["..."]}`), answered with the fields it
//! maps from pipeline outputs (`{"embeddings": [[...]]}`), nested by shape.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::value::RawValue;
use sluice_deployments::metrics::Protocol;
use sluice_deployments::{DataType, InferError, InferRequest, Pipeline, Tensor};

use super::AppState;
use super::json::{decode_data, first_not_utf8, write_data};
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
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
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
) -> Result<Vec<u8>, InferError> {
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
    // Written straight into the answer's bytes: a tree of values took some 16 times an
    // output's size (a `Value` per number) before a byte was written.
    let mut out = vec![b'{'];
    for (field, tensor) in &mapping.response {
        if let Some(t) = answer.outputs.iter().find(|o| &o.name == tensor) {
            if out.len() > 1 {
                out.push(b',');
            }
            // A key needs escaping: serde_json's own writer (into a Vec, which cannot fail).
            let _ = serde_json::to_writer(&mut out, field);
            out.push(b':');
            field_value(&mut out, pipeline.name(), field, tensor, &t.tensor)?;
        }
    }
    out.push(b'}');
    Ok(out)
}

/// `field`'s value, from the pipeline's output `tensor`. A JSON string cannot hold bytes that
/// are not UTF-8: refused (400, as on the OIP route, whose binary data can carry them), not
/// sent altered.
fn field_value(
    out: &mut Vec<u8>,
    pipeline: &str,
    field: &str,
    tensor: &str,
    t: &Tensor,
) -> Result<(), InferError> {
    if let Some(i) = first_not_utf8(t) {
        return Err(InferError::invalid(format!(
            "field `{field}`: element {i} of tensor `{tensor}` is not UTF-8, which a JSON answer \
             cannot carry (the OIP route `/v2/models/{pipeline}/infer` can send it as binary data)"
        )));
    }
    write_nested(out, t)
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

/// Writes `t` as nested JSON arrays following its shape, driven by the shape, not the data
/// (`[2, 0]` is `[[], []]`; a scalar is its element alone): each innermost row by
/// [`write_data`], the brackets between rows from where each row starts.
fn write_nested(out: &mut Vec<u8>, t: &Tensor) -> Result<(), InferError> {
    let Some((&width, outer)) = t.shape().split_last() else {
        // A scalar: its one element, without the brackets.
        let start = out.len();
        write_row(out, t);
        out.pop();
        out.remove(start);
        return Ok(());
    };
    let rows: usize = outer.iter().product();
    if rows == 0 {
        write_empty(out, outer);
        return Ok(());
    }
    out.extend(std::iter::repeat_n(b'[', outer.len()));
    let data = t.data();
    let mut bytes = t.bytes_elements();
    let mut at = 0;
    for row in 0..rows {
        if row > 0 {
            // The outer dimensions this row starts anew: each closed and opened again.
            let mut span = 1;
            let new = outer.iter().rev().take_while(|&&d| {
                span *= d;
                row % span == 0
            });
            let new = new.count();
            out.extend(std::iter::repeat_n(b']', new));
            out.push(b',');
            out.extend(std::iter::repeat_n(b'[', new));
        }
        let end = match t.dtype().byte_size() {
            Some(size) => at + width * size,
            // A BYTES row ends where its last element does (each is a length and its bytes).
            None => bytes
                .by_ref()
                .take(width)
                .last()
                .map_or(at, |e| e.as_ptr() as usize + e.len() - data.as_ptr() as usize),
        };
        // A row of no width written as it is (`[2^24, 0]` makes as many rows). A row of the
        // tensor's own holds what its shape says: the tensor was made whole.
        match width {
            0 => out.extend_from_slice(b"[]"),
            _ => write_row(out, &Tensor::new(t.dtype(), vec![width], data.slice(at..end))?),
        }
        at = end;
    }
    out.extend(std::iter::repeat_n(b']', outer.len()));
    Ok(())
}

/// [`write_data`], with `null` for NaN and the infinities: plain JSON has no words for them
/// (the OIP route writes Triton's, `NaN` and `Infinity`, which Python's `json` reads and
/// JavaScript's `JSON.parse` and strict readers refuse), and this route answers plain JSON.
fn write_row(out: &mut Vec<u8>, row: &Tensor) {
    let start = out.len();
    write_data(out, row);
    let float = matches!(row.dtype(), DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64);
    // Numbers are written with digits, `-`, `.`, `e` and `+` only.
    if !float || !out[start..].iter().any(|&b| b == b'N' || b == b'I') {
        return;
    }
    let written = out.split_off(start);
    let numbers = &written[1..written.len() - 1];
    out.push(b'[');
    for (i, number) in numbers.split(|&b| b == b',').enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match number {
            b"NaN" | b"Infinity" | b"-Infinity" => out.extend_from_slice(b"null"),
            _ => out.extend_from_slice(number),
        }
    }
    out.push(b']');
}

/// Nested empty arrays of `shape`, which holds a 0 (`[2, 0]`: `[[],[]]`): only the dimensions
/// before its first 0 are written out (an empty tensor's dimensions are bounded).
fn write_empty(out: &mut Vec<u8>, shape: &[usize]) {
    out.push(b'[');
    if let [n, rest @ ..] = shape
        && !rest.is_empty()
    {
        for i in 0..*n {
            if i > 0 {
                out.push(b',');
            }
            write_empty(out, rest);
        }
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use bytes::Bytes;
    use sluice_deployments::{DataType, Tensor};

    use super::{field_value, shape_of, write_nested};

    /// `t` as `write_nested` writes it, read back.
    fn nested(t: &Tensor) -> serde_json::Value {
        let mut out = Vec::new();
        write_nested(&mut out, t).unwrap();
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

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
        // Plain JSON: no words for NaN and the infinities; floats in their shortest form.
        let odd = t(vec![2, 2], vec![f32::NAN, 0.1, f32::NEG_INFINITY, f32::INFINITY]);
        let mut out = Vec::new();
        super::write_nested(&mut out, &odd).unwrap();
        assert_eq!(out, b"[[null,0.1],[null,null]]");
        let mut out = Vec::new();
        super::write_nested(&mut out, &t(vec![], vec![f32::NAN])).unwrap();
        assert_eq!(out, b"null");
        // Text rows end where their last element does (each a length and its bytes).
        let mut strings = Vec::new();
        for s in ["a", "", "c,\"d", "é"] {
            sluice_deployments::push_bytes_element(&mut strings, s.as_bytes()).unwrap();
        }
        let texts = Tensor::new(DataType::Bytes, vec![2, 2], Bytes::from(strings)).unwrap();
        assert_eq!(nested(&texts), json!([["a", ""], ["c,\"d", "é"]]));
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
        let e = field_value(&mut Vec::new(), "p", "texts", "out", &t).unwrap_err();
        assert_eq!(e.kind, sluice_deployments::ErrorKind::InvalidArgument);
        assert!(
            e.message.starts_with("field `texts`: element 1 of tensor `out` is not UTF-8"),
            "{}",
            e.message
        );
        assert!(e.message.contains("`/v2/models/p/infer`"), "{}", e.message);
        let ok = Tensor::new(DataType::Bytes, vec![1], Bytes::from(b"\x02\0\0\0ok".to_vec())).unwrap();
        let mut out = Vec::new();
        field_value(&mut out, "p", "texts", "out", &ok).unwrap();
        assert_eq!(out, br#"["ok"]"#);
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
