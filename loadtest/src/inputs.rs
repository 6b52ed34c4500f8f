//! Request data: cases from an OIP sample file (`{"inputs": [...]}`, or `{"cases": [{"inputs",
//! "outputs"}], "tolerance"}` as in the project's expected.json and shared samples.json), or
//! random tensors generated from a model's metadata.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A tensor in the OIP JSON form, `data` flattened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JsonTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<u64>,
    pub data: Vec<Value>,
}

/// One request to send, and the outputs it should produce when known.
#[derive(Debug, Clone)]
pub struct Case {
    pub inputs: Vec<JsonTensor>,
    pub outputs: Option<Vec<JsonTensor>>,
    pub tolerance: f64,
}

impl Case {
    /// A request with no tensors: what a liveness client ([`crate::client::Client::liveness`])
    /// is given, since its calls carry none.
    pub fn no_tensors() -> Self {
        Self { inputs: Vec::new(), outputs: None, tolerance: 0.0 }
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
            Ok(JsonTensor {
                name: t["name"].as_str().context("tensor without name")?.to_string(),
                datatype: t["datatype"].as_str().context("tensor without datatype")?.to_string(),
                shape: serde_json::from_value(t["shape"].clone()).context("bad shape")?,
                data,
            })
        })
        .collect()
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
    for c in raw_cases {
        let Some(inputs) = c.get("inputs") else { continue };
        cases.push(Case {
            inputs: parse_tensors(inputs)?,
            outputs: c.get("outputs").map(parse_tensors).transpose()?,
            tolerance,
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
        let count: u64 = shape.iter().product();
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
        tensors.push(JsonTensor { name: spec.name.clone(), datatype: spec.datatype.clone(), shape, data });
    }
    Ok(Case { inputs: tensors, outputs: None, tolerance: 0.0 })
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
