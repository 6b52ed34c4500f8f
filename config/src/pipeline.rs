//! Built-in steps and pipelines in the config: an application composes its deployments into a
//! DAG with named tensors (each step maps its inputs from, and its outputs to, pipeline
//! tensors), served as one model, and optionally as a plain-JSON route under the
//! application's `route_prefix`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

/// [`Builtin::Tokenizer`]'s `max_tokens` unless set.
pub const DEFAULT_MAX_TOKENS: usize = 16 * 1024 * 1024;

fn default_max_tokens() -> usize {
    DEFAULT_MAX_TOKENS
}

/// [`Builtin::Tokenizer`]'s `max_text_bytes` unless set.
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1024 * 1024;

fn default_max_text_bytes() -> usize {
    DEFAULT_MAX_TEXT_BYTES
}

/// A step that needs no ONNX file (`builtin:` on a deployment). Each batches like any
/// deployment.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Builtin {
    /// Hugging Face tokenizer (tokenizer.json): `text` (BYTES) → `input_ids`,
    /// `attention_mask`, `token_type_ids` (INT64), padded to the request's longest text.
    Tokenizer {
        /// tokenizer.json, relative to the config file.
        path: PathBuf,
        /// Truncate to this many tokens (default: the file's own setting).
        #[serde(default)]
        max_length: Option<usize>,
        /// The most tokens one call may produce, padding included (rows × the longest row):
        /// more is refused with 400 before the outputs are made. Default 16,777,216 (each
        /// output then at most 128 MiB).
        #[serde(default = "default_max_tokens")]
        max_tokens: usize,
        /// The longest text accepted, in bytes: a longer one is refused with 400 before it is
        /// tokenized (the tokenizer holds some hundred bytes per word of a text while it
        /// encodes it, and truncates to `max_length` only after). Default 1,048,576.
        #[serde(default = "default_max_text_bytes")]
        max_text_bytes: usize,
    },
    /// `hidden` [N, L, H] and `mask` [N, L] → `embedding` [N, H]: the mask-weighted mean,
    /// optionally L2-normalized.
    MeanPool {
        #[serde(default)]
        normalize: bool,
    },
    /// `x` [N, C] (FP32) → `y`: softmax over the last dimension.
    Softmax {},
    /// `x` [N, C] (FP32) → `index` [N] (INT64), `value` [N], and `label` [N] (BYTES) when a
    /// labels file (one name per line) is given.
    Argmax {
        #[serde(default)]
        labels: Option<PathBuf>,
    },
    /// `x` [N, C] → the `k` largest: `index` [N, k], `value` [N, k], `label` [N, k] with labels.
    TopK {
        k: usize,
        #[serde(default)]
        labels: Option<PathBuf>,
    },
    /// `x` → `y` converted from datatype `from` to `to` (numeric datatypes).
    Cast { from: String, to: String },
    /// `x` → `y` with each row reshaped to `shape` (one dimension may be -1).
    Reshape { datatype: String, shape: Vec<i64> },
    /// A step registered in Rust by the program embedding Sluice (`register_step`).
    Custom { name: String },
}

impl Builtin {
    /// The files the step reads (tokenizer, labels).
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Builtin::Tokenizer { path, .. }
            | Builtin::Argmax { labels: Some(path) }
            | Builtin::TopK { labels: Some(path), .. } => vec![path.as_path()],
            _ => Vec::new(),
        }
    }

    /// The files the step reads, to rewrite (made absolute, or relative to a working dir).
    pub fn files_mut(&mut self) -> Vec<&mut PathBuf> {
        match self {
            Builtin::Tokenizer { path, .. }
            | Builtin::Argmax { labels: Some(path) }
            | Builtin::TopK { labels: Some(path), .. } => vec![path],
            _ => Vec::new(),
        }
    }
}

/// A tensor a pipeline takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// One step: a deployment of the same application, its inputs taken from pipeline tensors and
/// its outputs named as pipeline tensors.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PipelineStep {
    pub name: Spanned<String>,
    pub deployment: Spanned<String>,
    /// Step input name → pipeline tensor.
    pub inputs: BTreeMap<String, String>,
    /// Step output name → pipeline tensor.
    pub outputs: BTreeMap<String, String>,
}

/// A plain-JSON route: request fields to pipeline inputs, pipeline outputs to response fields.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRoute {
    /// JSON field → pipeline input.
    pub request: BTreeMap<String, String>,
    /// JSON field → pipeline output.
    pub response: BTreeMap<String, String>,
}

/// An application's pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pipeline {
    /// The model name the pipeline answers to on `/v2/models/{name}`.
    pub name: Spanned<String>,
    pub inputs: Vec<PipelineTensor>,
    pub steps: Vec<PipelineStep>,
    /// Pipeline tensors returned.
    pub outputs: Vec<String>,
    /// Plain-JSON route at the application's `route_prefix`.
    #[serde(default)]
    pub route: Option<JsonRoute>,
}

impl Pipeline {
    /// Structural checks: steps name deployments of `deployments`; every step input is a
    /// pipeline input or another step's output; no tensor has two producers; no cycle; every
    /// produced tensor is used; every output exists. Returns the steps in run order, or the
    /// problems (location, field, message).
    pub fn check(&self, deployments: &[String]) -> Result<Vec<usize>, Vec<(Location, String, String)>> {
        let mut problems = Vec::new();
        let mut producer: HashMap<&str, usize> = HashMap::new();
        let inputs: HashSet<&str> = self.inputs.iter().map(|t| t.name.as_str()).collect();
        // A name listed twice: two specs of one input (a request checked against the first,
        // the steps typed against the last), or one output answered twice (the second found
        // taken by the first at every request).
        let mut seen = HashSet::new();
        for (i, t) in self.inputs.iter().enumerate() {
            if !seen.insert(t.name.as_str()) {
                let message = format!("input `{}` is listed more than once", t.name);
                problems.push((self.name.referenced, format!("inputs[{i}]"), message));
            }
        }
        let mut seen = HashSet::new();
        for (i, out) in self.outputs.iter().enumerate() {
            if !seen.insert(out.as_str()) {
                let message = format!("output `{out}` is listed more than once");
                problems.push((self.name.referenced, format!("outputs[{i}]"), message));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            if !deployments.contains(&step.deployment.value) {
                problems.push((
                    step.deployment.referenced,
                    format!("steps[{i}].deployment"),
                    format!("unknown deployment `{}` (not in this application)", step.deployment.value),
                ));
            }
            for tensor in step.outputs.values() {
                if inputs.contains(tensor.as_str()) || producer.insert(tensor.as_str(), i).is_some() {
                    problems.push((
                        step.name.referenced,
                        format!("steps[{i}].outputs"),
                        format!("tensor `{tensor}` has more than one producer"),
                    ));
                }
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            for tensor in step.inputs.values() {
                if !inputs.contains(tensor.as_str()) && !producer.contains_key(tensor.as_str()) {
                    problems.push((
                        step.name.referenced,
                        format!("steps[{i}].inputs"),
                        format!("tensor `{tensor}` is neither a pipeline input nor any step's output"),
                    ));
                }
            }
        }
        let used: HashSet<&str> = self
            .steps
            .iter()
            .flat_map(|s| s.inputs.values())
            .chain(&self.outputs)
            .map(String::as_str)
            .collect();
        for (i, step) in self.steps.iter().enumerate() {
            for tensor in step.outputs.values() {
                if !used.contains(tensor.as_str()) {
                    problems.push((
                        step.name.referenced,
                        format!("steps[{i}].outputs"),
                        format!("tensor `{tensor}` is never used"),
                    ));
                }
            }
        }
        for out in &self.outputs {
            if !producer.contains_key(out.as_str()) && !inputs.contains(out.as_str()) {
                problems.push((
                    self.name.referenced,
                    "outputs".into(),
                    format!("output `{out}` is not produced by any step"),
                ));
            }
        }
        // Kahn's algorithm over "step j needs a tensor step i produces".
        let n = self.steps.len();
        let mut needs: Vec<HashSet<usize>> = vec![HashSet::new(); n];
        for (j, step) in self.steps.iter().enumerate() {
            for tensor in step.inputs.values() {
                if let Some(&i) = producer.get(tensor.as_str()) {
                    needs[j].insert(i);
                }
            }
        }
        let mut order = Vec::new();
        let mut done = vec![false; n];
        while order.len() < n {
            let Some(next) = (0..n).find(|&j| !done[j] && needs[j].iter().all(|&i| done[i])) else {
                let stuck: Vec<&str> =
                    (0..n).filter(|&j| !done[j]).map(|j| self.steps[j].name.value.as_str()).collect();
                problems.push((
                    self.name.referenced,
                    "steps".into(),
                    format!("steps form a cycle: {}", stuck.join(" → ")),
                ));
                break;
            };
            done[next] = true;
            order.push(next);
        }
        if problems.is_empty() { Ok(order) } else { Err(problems) }
    }
}
