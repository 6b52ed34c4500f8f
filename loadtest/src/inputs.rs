//! Request data: cases from an OIP sample file (`{"inputs": [...]}`, or `{"cases": [{"inputs",
//! "outputs"}], "tolerance"}` as in the project's expected.json and shared samples.json), or
//! random tensors generated from a model's metadata.
//!
//! A case's `outputs` are the outputs it should produce when they have `data`; without `data`
//! they are the request's own `outputs` list (names and parameters), sent as they are. Tensor
//! and request `parameters` are sent as well.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A tensor in the OIP JSON form, `data` flattened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JsonTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<u64>,
    pub data: Vec<Value>,
    /// The tensor's `parameters` in the sample file (an input's are sent with it).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
}

/// An entry of a request's `outputs` list: an output to send back, and how.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
}

/// One request to send, and the outputs it should produce when known.
#[derive(Debug, Clone, Default)]
pub struct Case {
    pub inputs: Vec<JsonTensor>,
    /// The outputs to compare answers with (`--check`).
    pub outputs: Option<Vec<JsonTensor>>,
    pub tolerance: f64,
    /// The request's `parameters`.
    pub parameters: Map<String, Value>,
    /// The request's `outputs` list; empty: every output, as the server chooses to send them.
    pub requested: Vec<RequestedOutput>,
}

impl Case {
    /// A request with no tensors: what a liveness client ([`crate::client::Client::liveness`])
    /// is given, since its calls carry none.
    pub fn no_tensors() -> Self {
        Self::default()
    }

    /// Rows along dimension 0 of the first input (1 for scalars).
    pub fn rows(&self) -> u64 {
        self.inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1)
    }
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other.clone()),
    }
}

fn parse_tensors(v: &Value) -> Result<Vec<JsonTensor>> {
    let items = v.as_array().context("expected an array of tensors")?;
    items
        .iter()
        .map(|t| {
            let mut data = Vec::new();
            flatten(t.get("data").context("tensor without data")?, &mut data);
            let name = t["name"].as_str().context("tensor without name")?.to_string();
            Ok(JsonTensor {
                datatype: t["datatype"].as_str().context("tensor without datatype")?.to_string(),
                shape: serde_json::from_value(t["shape"].clone()).context("bad shape")?,
                data,
                parameters: parameters(t).with_context(|| format!("tensor `{name}`"))?,
                name,
            })
        })
        .collect()
}

/// The `parameters` object of `v`, empty when it has none.
fn parameters(v: &Value) -> Result<Map<String, Value>> {
    match v.get("parameters") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(p)) => Ok(p.clone()),
        Some(other) => bail!("`parameters` must be an object, got {other}"),
    }
}

/// A case's `outputs`: the expected outputs when its entries have `data`, else the request's
/// `outputs` list.
fn parse_outputs(v: &Value) -> Result<(Option<Vec<JsonTensor>>, Vec<RequestedOutput>)> {
    let items = v.as_array().context("`outputs` must be an array")?;
    let with_data = items.iter().filter(|o| o.get("data").is_some()).count();
    // An empty list asks for every output and expects none (`--check` would pass anything).
    if with_data == items.len() && !items.is_empty() {
        return Ok((Some(parse_tensors(v)?), Vec::new()));
    }
    if with_data > 0 {
        bail!(
            "`outputs` mixes expected outputs (with `data`) and outputs to request (without): give one kind"
        );
    }
    let requested = items
        .iter()
        .map(|o| {
            let name = o["name"].as_str().context("output without name")?.to_string();
            let parameters = parameters(o).with_context(|| format!("output `{name}`"))?;
            Ok(RequestedOutput { name, parameters })
        })
        .collect::<Result<_>>()?;
    Ok((None, requested))
}

/// Loads the cases of a sample file. A numeric `tolerance` applies to every case; otherwise
/// `default_tolerance`.
pub fn load_samples(path: &Path, default_tolerance: f64) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let tolerance = doc.get("tolerance").and_then(Value::as_f64).unwrap_or(default_tolerance);
    let raw_cases: Vec<&Value> = match (doc.get("cases"), doc.get("inputs")) {
        (Some(Value::Array(cases)), _) => cases.iter().collect(),
        (None, Some(_)) => vec![&doc],
        _ => bail!("{}: expected {{\"inputs\": [...]}} or {{\"cases\": [...]}}", path.display()),
    };
    let mut cases = Vec::new();
    for (k, c) in raw_cases.into_iter().enumerate() {
        let Some(inputs) = c.get("inputs") else { continue };
        let context = || format!("{}: case {k}", path.display());
        let (outputs, requested) = match c.get("outputs") {
            Some(o) => parse_outputs(o).with_context(context)?,
            None => (None, Vec::new()),
        };
        cases.push(Case {
            inputs: parse_tensors(inputs).with_context(context)?,
            outputs,
            tolerance,
            parameters: parameters(c).with_context(context)?,
            requested,
        });
    }
    if cases.is_empty() {
        bail!("{}: no case with inputs", path.display());
    }
    Ok(cases)
}

/// A model input as metadata describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// The most elements a random input may have (about 1.6 GB as JSON values, far past any
/// server's body limit): a larger `--batch` or `--shape` is refused rather than filling memory.
pub const MAX_RANDOM_ELEMENTS: u64 = 100_000_000;

/// A random case for `inputs`: dimension 0 when dynamic is `batch`, other dynamic dimensions
/// come from `shapes` (`--shape name:d1,d2`, the full shape without the batch dimension or
/// with it) or are an error.
pub fn random_case(
    inputs: &[InputSpec],
    shapes: &HashMap<String, Vec<u64>>,
    batch: u64,
    seed: u64,
) -> Result<Case> {
    let mut rng = seed.max(1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut tensors = Vec::new();
    for spec in inputs {
        let shape: Vec<u64> = match shapes.get(&spec.name) {
            Some(s) if s.len() == spec.shape.len() => s.clone(),
            Some(s) if s.len() + 1 == spec.shape.len() => {
                std::iter::once(batch).chain(s.iter().copied()).collect()
            }
            Some(s) => bail!("--shape {}:{s:?} does not fit the model's shape {:?}", spec.name, spec.shape),
            None => spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match (i, d) {
                    (_, d) if d >= 0 => Ok(d as u64),
                    (0, _) => Ok(batch),
                    _ => bail!(
                        "input `{}` has a dynamic dimension {i} ({:?}): give --shape {}:...",
                        spec.name,
                        spec.shape,
                        spec.name
                    ),
                })
                .collect::<Result<_>>()?,
        };
        let count = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= MAX_RANDOM_ELEMENTS)
            .with_context(|| {
                format!(
                    "input `{}` of shape {shape:?} (--batch, --shape) has more than {MAX_RANDOM_ELEMENTS} elements",
                    spec.name
                )
            })?;
        let data = (0..count)
            .map(|_| {
                let r = next();
                match spec.datatype.as_str() {
                    "BOOL" => Value::Bool(r & 1 == 1),
                    "BYTES" => Value::String(format!("s{}", r % 1000)),
                    "FP16" | "BF16" | "FP32" | "FP64" => Value::from((r % 2000) as f64 / 1000.0 - 1.0),
                    "INT8" | "UINT8" => Value::from(r % 100),
                    _ => Value::from(r % 1000),
                }
            })
            .collect();
        tensors.push(JsonTensor {
            name: spec.name.clone(),
            datatype: spec.datatype.clone(),
            shape,
            data,
            ..Default::default()
        });
    }
    Ok(Case { inputs: tensors, ..Default::default() })
}

/// Parses `--shape name:d1,d2,...`.
pub fn parse_shape(arg: &str) -> Result<(String, Vec<u64>)> {
    let (name, dims) = arg.rsplit_once(':').context("--shape takes name:d1,d2,...")?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .context("--shape dims")?;
    Ok((name.to_string(), dims))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A batch or shape whose element count passes the cap, or overflows, is refused naming
    /// the input (it filled memory, or panicked on the product).
    #[test]
    fn random_inputs_past_the_cap_are_refused() {
        let spec = |shape: Vec<i64>| InputSpec { name: "x".into(), datatype: "FP32".into(), shape };
        let shapes = HashMap::new();
        let e = random_case(&[spec(vec![-1, 4])], &shapes, 1_000_000_000, 1).unwrap_err().to_string();
        assert!(e.contains("input `x`") && e.contains("more than 100000000 elements"), "{e}");
        let e = random_case(&[spec(vec![-1, 4])], &shapes, u64::MAX, 1).unwrap_err().to_string();
        assert!(e.contains("input `x`"), "{e}");
        let huge: HashMap<String, Vec<u64>> = [("x".to_string(), vec![1 << 40, 1 << 40])].into();
        assert!(random_case(&[spec(vec![-1, -1])], &huge, 1, 1).is_err());
        assert_eq!(random_case(&[spec(vec![-1, 4])], &shapes, 3, 1).unwrap().inputs[0].data.len(), 12);
    }

    fn load(doc: Value) -> Result<Vec<Case>> {
        let path = std::env::temp_dir().join(format!(
            "loadtest-inputs-{}-{}.json",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::write(&path, doc.to_string()).unwrap();
        let cases = load_samples(&path, 1e-4);
        let _ = std::fs::remove_file(&path);
        cases
    }

    /// A plain OIP request body: its parameters and its outputs list (no data: what to send
    /// back, not what to expect) are kept, where they were dropped or refused.
    #[test]
    fn parameters_and_an_outputs_list_are_kept() {
        let cases = load(json!({
            "parameters": {"priority": 1},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0],
                        "parameters": {"layout": "N"}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}, {"name": "z"}],
        }))
        .unwrap();
        let c = &cases[0];
        assert_eq!(c.parameters, *json!({"priority": 1}).as_object().unwrap());
        assert_eq!(c.inputs[0].parameters, *json!({"layout": "N"}).as_object().unwrap());
        assert!(c.outputs.is_none(), "an outputs list is nothing to check against");
        let names: Vec<&str> = c.requested.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["y", "z"]);
        assert_eq!(c.requested[0].parameters, *json!({"binary_data": true}).as_object().unwrap());
    }

    #[test]
    fn expected_outputs_are_still_expected_and_a_mix_is_refused() {
        let input = json!([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]);
        let expected = json!({"name": "y", "datatype": "FP32", "shape": [1], "data": [2.0]});
        let cases = load(json!({"cases": [{"inputs": input, "outputs": [expected]}]})).unwrap();
        assert_eq!(cases[0].outputs.as_ref().map(Vec::len), Some(1));
        assert!(cases[0].requested.is_empty());
        let mixed = load(json!({"inputs": input, "outputs": [expected, {"name": "z"}]})).unwrap_err();
        assert!(format!("{mixed:#}").contains("`outputs` mixes"), "{mixed:#}");
        let bad = load(json!({"inputs": input, "parameters": [1]})).unwrap_err();
        assert!(format!("{bad:#}").contains("`parameters` must be an object"), "{bad:#}");
    }
}
