//! Built-in pipeline steps that need no ONNX file. Each is a [`Backend`], so it runs on replica
//! threads and batches like any model: tokenizer, mean_pool, softmax, argmax / top_k (with
//! labels), cast, reshape; and steps a Rust program registers ([`register_step`]).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use sluice_config::Builtin;

use crate::{
    Backend, BackendFactory, DataType, InferError, LoadError, ModelMetadata, NamedTensor, Tensor, TensorSpec,
    push_bytes_element,
};

/// A step registered by name for `builtin: {custom: {name: ...}}`.
#[derive(Clone)]
enum Registered {
    Backend(BackendFactory),
    /// Made into a factory when a deployment of it is built, inside the server's runtime (see
    /// [`factory`]).
    Async(Arc<dyn AsyncStep>),
}

/// Steps registered by name for `builtin: {custom: {name: ...}}`.
fn registry() -> &'static RwLock<HashMap<String, Registered>> {
    static REGISTRY: OnceLock<RwLock<HashMap<String, Registered>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn register(name: String, step: Registered) {
    registry().write().unwrap_or_else(|e| e.into_inner()).insert(name, step);
}

/// Registers a custom step (any [`Backend`]) under `name`, for configs to use as
/// `builtin: {custom: {name: NAME}}`. Call before starting the server.
pub fn register_step(name: impl Into<String>, factory: BackendFactory) {
    register(name.into(), Registered::Backend(factory));
}

/// A custom step written as async code (it may await I/O, another service, a timer). It is
/// run on replica threads like any backend — each call blocks that thread on the future, driven
/// by the server's runtime — so it gets replicas, batching and admission like a model.
pub trait AsyncStep: Send + Sync + 'static {
    fn metadata(&self) -> &ModelMetadata;

    fn infer<'a>(
        &'a self,
        inputs: Vec<NamedTensor>,
        outputs: &'a [String],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<NamedTensor>, InferError>> + Send + 'a>>;
}

/// Runs an [`AsyncStep`] as a [`Backend`] on a replica thread.
struct BlockOn {
    step: Arc<dyn AsyncStep>,
    handle: tokio::runtime::Handle,
}

impl Backend for BlockOn {
    fn metadata(&self) -> &ModelMetadata {
        self.step.metadata()
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        // Replica threads are not runtime workers, so blocking one on the future is allowed.
        self.handle.block_on(self.step.infer(inputs, outputs))
    }
}

/// Registers an async custom step under `name` (see [`AsyncStep`]), for
/// `builtin: {custom: {name: NAME}}`. Call before starting the server.
pub fn register_async_step(name: impl Into<String>, step: Arc<dyn AsyncStep>) {
    register(name.into(), Registered::Async(step));
}

/// The factory of a built-in step. An async custom step's factory is made inside the server's
/// tokio runtime (a deployment is built there), whose handle every backend it makes runs on.
pub fn factory(b: &Builtin) -> Result<BackendFactory, LoadError> {
    if let Builtin::Custom { name } = b {
        let registered = registry().read().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        return match registered {
            Some(Registered::Backend(factory)) => Ok(factory),
            Some(Registered::Async(step)) => {
                // Taken here, where the deployment is built inside the server's runtime: a
                // replica that reloads the step after a panic calls the factory on its own
                // thread, outside the runtime, where there is no current handle to find.
                let handle = tokio::runtime::Handle::try_current().map_err(|_| {
                    LoadError::Step("async steps start inside the server's tokio runtime".into())
                })?;
                Ok(Arc::new(move || {
                    Ok(Box::new(BlockOn { step: step.clone(), handle: handle.clone() }) as Box<dyn Backend>)
                }))
            }
            None => Err(LoadError::Step(format!(
                "no custom step `{name}` is registered (sluice_deployments::register_step)"
            ))),
        };
    }
    // Build once now so a bad file fails the deployment, then clone per replica.
    let proto = Builtins::new(b).map_err(LoadError::Step)?;
    Ok(Arc::new(move || Ok(Box::new(proto.clone()) as Box<dyn Backend>)))
}

fn spec(name: &str, dtype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
}

#[derive(Clone)]
enum Kind {
    /// The tokenizer (its own padding off: rows are padded here, once their lengths are known
    /// to fit `max_tokens`), how to pad, the most tokens a call may make and the longest text.
    Tokenizer(Arc<tokenizers::Tokenizer>, tokenizers::PaddingParams, Bounds),
    MeanPool {
        normalize: bool,
    },
    Softmax,
    TopK {
        k: Option<usize>,
        labels: Option<Arc<Vec<String>>>,
    },
    Cast {
        to: DataType,
    },
    Reshape {
        shape: Vec<i64>,
    },
}

#[derive(Clone)]
struct Builtins {
    kind: Kind,
    meta: ModelMetadata,
}

fn dtype(name: &str) -> Result<DataType, String> {
    DataType::parse(name).ok_or_else(|| format!("unknown datatype `{name}`"))
}

fn read_labels(path: &Option<std::path::PathBuf>) -> Result<Option<Arc<Vec<String>>>, String> {
    path.as_ref()
        .map(|p| {
            std::fs::read_to_string(p)
                .map(|t| Arc::new(t.lines().map(str::to_string).collect()))
                .map_err(|e| format!("labels `{}`: {e}", p.display()))
        })
        .transpose()
}

impl Builtins {
    fn new(b: &Builtin) -> Result<Self, String> {
        use DataType::*;
        let (kind, inputs, outputs) = match b {
            Builtin::Tokenizer { path, max_length, max_tokens, max_text_bytes } => {
                let mut t = tokenizers::Tokenizer::from_file(path)
                    .map_err(|e| format!("tokenizer `{}`: {e}", path.display()))?;
                if let Some(n) = max_length {
                    let mut trunc = t.get_truncation().cloned().unwrap_or_default();
                    trunc.max_length = *n;
                    t.with_truncation(Some(trunc)).map_err(|e| e.to_string())?;
                }
                if *max_tokens == 0 {
                    return Err("tokenizer: max_tokens must be at least 1".into());
                }
                if *max_text_bytes == 0 {
                    return Err("tokenizer: max_text_bytes must be at least 1".into());
                }
                // Padded here to the longest row, after checking the total: the tokenizer's
                // own padding would make rows × the longest first (one long text among 63
                // empty ones: 64 copies of its length).
                let padding = t.get_padding().cloned().unwrap_or_default();
                t.with_padding(None);
                let outs =
                    ["input_ids", "attention_mask", "token_type_ids"].map(|n| spec(n, Int64, &[-1, -1]));
                let bounds = Bounds { max_tokens: *max_tokens, max_text_bytes: *max_text_bytes };
                let kind = Kind::Tokenizer(Arc::new(t), padding, bounds);
                (kind, vec![spec("text", Bytes, &[-1])], outs.to_vec())
            }
            Builtin::MeanPool { normalize } => (
                Kind::MeanPool { normalize: *normalize },
                vec![spec("hidden", Fp32, &[-1, -1, -1]), spec("mask", Int64, &[-1, -1])],
                vec![spec("embedding", Fp32, &[-1, -1])],
            ),
            Builtin::Softmax {} => {
                (Kind::Softmax, vec![spec("x", Fp32, &[-1, -1])], vec![spec("y", Fp32, &[-1, -1])])
            }
            Builtin::Argmax { labels } => {
                let labels = read_labels(labels)?;
                let mut outs = vec![spec("index", Int64, &[-1]), spec("value", Fp32, &[-1])];
                if labels.is_some() {
                    outs.push(spec("label", Bytes, &[-1]));
                }
                (Kind::TopK { k: None, labels }, vec![spec("x", Fp32, &[-1, -1])], outs)
            }
            Builtin::TopK { k, labels } => {
                if *k == 0 {
                    return Err("top_k needs k of at least 1".into());
                }
                let labels = read_labels(labels)?;
                let mut outs =
                    vec![spec("index", Int64, &[-1, *k as i64]), spec("value", Fp32, &[-1, *k as i64])];
                if labels.is_some() {
                    outs.push(spec("label", Bytes, &[-1, *k as i64]));
                }
                (Kind::TopK { k: Some(*k), labels }, vec![spec("x", Fp32, &[-1, -1])], outs)
            }
            Builtin::Cast { from, to } => {
                let (from, to) = (dtype(from)?, dtype(to)?);
                if from == Bytes || to == Bytes {
                    return Err("cast converts between numeric datatypes".into());
                }
                (Kind::Cast { to }, vec![spec("x", from, &[-1, -1])], vec![spec("y", to, &[-1, -1])])
            }
            Builtin::Reshape { datatype, shape } => {
                let d = dtype(datatype)?;
                if shape.iter().filter(|&&x| x == -1).count() > 1 || shape.iter().any(|&x| x < -1 || x == 0) {
                    return Err("reshape: positive dimensions and at most one -1".into());
                }
                let mut out = vec![-1];
                out.extend(shape);
                (
                    Kind::Reshape { shape: shape.clone() },
                    vec![spec("x", d, &[-1, -1])],
                    vec![spec("y", d, &out)],
                )
            }
            Builtin::Custom { .. } => return Err("custom steps come from the registry".into()),
        };
        Ok(Self { kind, meta: ModelMetadata { platform: "sluice_builtin".into(), inputs, outputs } })
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default())).collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default())).collect()
}

fn tensor_f32(name: &str, shape: Vec<usize>, v: &[f32]) -> Result<NamedTensor, InferError> {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(NamedTensor { name: name.into(), tensor: Tensor::new(DataType::Fp32, shape, Bytes::from(data))? })
}

/// What one tokenizer call may hold: `max_tokens` and `max_text_bytes` of its config.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    max_tokens: usize,
    max_text_bytes: usize,
}

/// A tokenizer call's rows, unpadded and end to end (the tokenizer's own `Encoding` per text
/// costs some 600 bytes besides its tokens: a body of 16 million empty texts would have taken
/// gigabytes before `max_tokens` was checked).
struct Rows {
    ids: Vec<u32>,
    mask: Vec<u32>,
    types: Vec<u32>,
    /// Where each row ends in the three.
    ends: Vec<usize>,
    /// Each row's length once padded.
    len: usize,
    left: bool,
}

impl Rows {
    /// Texts encoded at a time, at most: the `Encoding`s alive at once.
    const CHUNK: usize = 1024;
    /// A chunk ends once its texts hold this many bytes (the tokenizer's working memory while it
    /// encodes them is some hundred times their size).
    const CHUNK_BYTES: usize = 1024 * 1024;

    /// Encodes `text`'s elements a chunk at a time, refusing a text past `max_text_bytes`
    /// before it is encoded, and the call as soon as its rows, padded to the longest so far,
    /// pass `max_tokens`.
    fn encode(
        t: &tokenizers::Tokenizer,
        padding: &tokenizers::PaddingParams,
        bounds: Bounds,
        text: &Tensor,
    ) -> Result<Self, InferError> {
        let Bounds { max_tokens, max_text_bytes } = bounds;
        let n = text.bytes_elements().count();
        let padded_len = |longest: usize| {
            // A file that pads to a fixed length (a model whose sequence is fixed) pads to it.
            let longest = match padding.strategy {
                tokenizers::PaddingStrategy::Fixed(n) => longest.max(n),
                tokenizers::PaddingStrategy::BatchLongest => longest,
            };
            match padding.pad_to_multiple_of {
                Some(m) if m > 1 => longest.div_ceil(m).saturating_mul(m),
                _ => longest,
            }
        };
        let left = matches!(padding.direction, tokenizers::PaddingDirection::Left);
        let mut rows =
            Self { ids: Vec::new(), mask: Vec::new(), types: Vec::new(), ends: Vec::new(), len: 0, left };
        let mut longest = 0;
        let mut elements = text.bytes_elements();
        loop {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            while chunk.len() < Self::CHUNK && bytes < Self::CHUNK_BYTES {
                let Some(b) = elements.next() else { break };
                if b.len() > max_text_bytes {
                    return Err(InferError::invalid(format!(
                        "tokenizer: text {} is {} bytes, more than max_text_bytes ({max_text_bytes})",
                        rows.ends.len() + chunk.len(),
                        b.len()
                    )));
                }
                bytes += b.len();
                chunk.push(std::str::from_utf8(b).map_err(|_| InferError::invalid("text is not UTF-8"))?);
            }
            let enc =
                t.encode_batch(chunk, true).map_err(|e| InferError::invalid(format!("tokenizer: {e}")))?;
            for e in &enc {
                rows.ids.extend_from_slice(e.get_ids());
                rows.mask.extend_from_slice(e.get_attention_mask());
                rows.types.extend_from_slice(e.get_type_ids());
                rows.ends.push(rows.ids.len());
                longest = longest.max(e.len());
            }
            rows.len = padded_len(longest);
            if n.saturating_mul(rows.len) > max_tokens {
                return Err(InferError::invalid(format!(
                    "tokenizer: {n} texts padded to the longest, {} tokens, make {} tokens, more than \
                     max_tokens ({max_tokens}); send fewer or shorter texts, or set max_length",
                    rows.len,
                    n.saturating_mul(rows.len)
                )));
            }
            if rows.ends.len() == n {
                break;
            }
        }
        Ok(rows)
    }

    /// One of the outputs, `[rows, len]`: each row of `of` padded to `len` with `pad` (the
    /// tokenizer's padding side and values).
    fn padded(&self, name: &str, of: &[u32], pad: u32) -> Result<NamedTensor, InferError> {
        let mut out = Vec::with_capacity(self.ends.len() * self.len);
        let mut start = 0;
        for &end in &self.ends {
            let row = of[start..end].iter().map(|&x| i64::from(x));
            let fill = std::iter::repeat_n(i64::from(pad), self.len - (end - start));
            if self.left {
                out.extend(fill.chain(row));
            } else {
                out.extend(row.chain(fill));
            }
            start = end;
        }
        tensor_i64(name, vec![self.ends.len(), self.len], &out)
    }
}

fn tensor_i64(name: &str, shape: Vec<usize>, v: &[i64]) -> Result<NamedTensor, InferError> {
    let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(NamedTensor { name: name.into(), tensor: Tensor::new(DataType::Int64, shape, Bytes::from(data))? })
}

fn input<'a>(inputs: &'a [NamedTensor], name: &str) -> Result<&'a Tensor, InferError> {
    inputs
        .iter()
        .find(|t| t.name == name)
        .map(|t| &t.tensor)
        .ok_or_else(|| InferError::invalid(format!("missing input `{name}`")))
}

impl Backend for Builtins {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn inline_safe(&self) -> bool {
        true
    }

    fn merges_requests(&self) -> bool {
        // Its rows are padded to the longest text of the call.
        !matches!(self.kind, Kind::Tokenizer(..))
    }

    fn shared_dims_agree(&self, inputs: &[NamedTensor]) -> bool {
        // `mean_pool`'s hidden states and mask share their sequence (dimension 1).
        let length = |name| inputs.iter().find(|i| i.name == name).map(|i| i.tensor.shape().get(1));
        !matches!(self.kind, Kind::MeanPool { .. }) || length("hidden") == length("mask")
    }

    fn crops_to_request(&self, output: &str, axis: usize) -> bool {
        // A pooled embedding's second axis is the hidden size, never the sequence it pooled.
        !matches!(self.kind, Kind::MeanPool { .. })
            && crate::backend::declared_dynamic(&self.meta, output, axis)
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        let mut out = match &self.kind {
            Kind::Tokenizer(t, padding, bounds) => {
                let rows = Rows::encode(t, padding, *bounds, input(&inputs, "text")?)?;
                vec![
                    rows.padded("input_ids", &rows.ids, padding.pad_id)?,
                    rows.padded("attention_mask", &rows.mask, 0)?,
                    rows.padded("token_type_ids", &rows.types, padding.pad_type_id)?,
                ]
            }
            Kind::MeanPool { normalize } => {
                let (hidden, mask) = (input(&inputs, "hidden")?, input(&inputs, "mask")?);
                let &[n, l, h] = hidden.shape() else {
                    return Err(InferError::invalid("hidden must be [N, L, H]"));
                };
                if mask.shape() != [n, l] {
                    return Err(InferError::invalid(format!(
                        "mask has shape {:?} but hidden is {:?}: they must agree on [N, L]",
                        mask.shape(),
                        hidden.shape()
                    )));
                }
                // An empty `hidden` may name any sizes (`[1, 0, 2^36]` holds no data): the output's
                // [N, H] is only bounded by the data when there is some.
                if l == 0 && n > 0 && h > 0 {
                    return Err(InferError::invalid(format!(
                        "hidden has shape {:?}: no tokens to pool (L = 0)",
                        hidden.shape()
                    )));
                }
                // No rows or no width: an empty embedding, without a pass over `n` rows that the
                // data does not bound (`[2^62, 0, 0]` holds none and would loop for years).
                if n == 0 || h == 0 {
                    return Ok(vec![tensor_f32("embedding", vec![n, h], &[])?]);
                }
                let (hv, mv) = (f32s(hidden), i64s(mask));
                let mut emb = vec![0f32; n * h];
                for b in 0..n {
                    let row = &mut emb[b * h..(b + 1) * h];
                    let mut count = 0f32;
                    for t in 0..l {
                        if mv[b * l + t] != 0 {
                            count += 1.0;
                            for (e, x) in row.iter_mut().zip(&hv[(b * l + t) * h..(b * l + t + 1) * h]) {
                                *e += x;
                            }
                        }
                    }
                    let count = count.max(1e-9);
                    row.iter_mut().for_each(|e| *e /= count);
                    if *normalize {
                        let norm = row.iter().map(|e| e * e).sum::<f32>().sqrt().max(1e-12);
                        row.iter_mut().for_each(|e| *e /= norm);
                    }
                }
                vec![tensor_f32("embedding", vec![n, h], &emb)?]
            }
            Kind::Softmax => {
                let x = input(&inputs, "x")?;
                let c = x.shape().last().copied().unwrap_or(1).max(1);
                let mut v = f32s(x);
                for row in v.chunks_mut(c) {
                    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    row.iter_mut().for_each(|e| *e = (*e - max).exp());
                    let sum: f32 = row.iter().sum();
                    row.iter_mut().for_each(|e| *e /= sum);
                }
                vec![tensor_f32("y", x.shape().to_vec(), &v)?]
            }
            Kind::TopK { k, labels } => {
                let x = input(&inputs, "x")?;
                let &[n, c] = x.shape() else { return Err(InferError::invalid("x must be [N, C]")) };
                // As top_k does elsewhere (torch.topk, tf.math.top_k): fewer classes than k is an
                // error, not fewer columns than the step declares.
                let kk = k.unwrap_or(1);
                if c < kk {
                    let what =
                        if k.is_some() { format!("top_k takes {kk}") } else { "argmax takes 1".into() };
                    return Err(InferError::invalid(format!("x has {c} classes per row but {what}")));
                }
                let v = f32s(x);
                let (mut idx, mut val) = (Vec::with_capacity(n * kk), Vec::with_capacity(n * kk));
                for row in v.chunks(c.max(1)).take(n) {
                    let mut order: Vec<usize> = (0..c).collect();
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                    for &i in order.iter().take(kk) {
                        idx.push(i as i64);
                        val.push(row[i]);
                    }
                }
                let shape = if k.is_some() { vec![n, kk] } else { vec![n] };
                let mut out = vec![
                    tensor_i64("index", shape.clone(), &idx)?,
                    tensor_f32("value", shape.clone(), &val)?,
                ];
                if let Some(labels) = labels {
                    let mut data = Vec::new();
                    for &i in &idx {
                        let name = labels.get(i as usize).map_or_else(|| i.to_string(), Clone::clone);
                        push_bytes_element(&mut data, name.as_bytes())?;
                    }
                    out.push(NamedTensor {
                        name: "label".into(),
                        tensor: Tensor::new(DataType::Bytes, shape, Bytes::from(data))?,
                    });
                }
                out
            }
            Kind::Cast { to } => {
                let x = input(&inputs, "x")?;
                vec![NamedTensor { name: "y".into(), tensor: crate::convert::cast(x, *to)? }]
            }
            Kind::Reshape { shape } => {
                let x = input(&inputs, "x")?;
                let n = x.shape().first().copied().unwrap_or(0);
                // From the shape, not the data: an empty batch (`[0, 6]`) still has rows of 6.
                let per_row = x.shape().iter().skip(1).try_fold(1usize, |p, &d| p.checked_mul(d));
                let Some(per_row) = per_row else {
                    return Err(InferError::invalid(format!(
                        "x has shape {:?}: too many elements",
                        x.shape()
                    )));
                };
                let known: i64 = shape.iter().filter(|&&d| d > 0).product();
                let dims: Vec<usize> = shape
                    .iter()
                    .map(|&d| if d == -1 { per_row / known.max(1) as usize } else { d as usize })
                    .collect();
                if dims.iter().product::<usize>() != per_row {
                    return Err(InferError::invalid(format!(
                        "cannot reshape rows of {per_row} elements to {shape:?}"
                    )));
                }
                let mut full = vec![n];
                full.extend(dims);
                vec![NamedTensor {
                    name: "y".into(),
                    tensor: Tensor::new(x.dtype(), full, x.data().clone())?,
                }]
            }
        };
        out.retain(|o| outputs.contains(&o.name));
        out.sort_by_key(|o| outputs.iter().position(|n| n == &o.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: Builtin, inputs: Vec<NamedTensor>) -> Vec<NamedTensor> {
        let mut s = Builtins::new(&b).unwrap();
        let outs: Vec<String> = s.meta.outputs.iter().map(|o| o.name.clone()).collect();
        s.infer(inputs, &outs).unwrap()
    }

    #[test]
    fn mean_pool_respects_the_mask_and_normalizes() {
        let hidden = tensor_f32("hidden", vec![1, 3, 2], &[1.0, 2.0, 3.0, 4.0, 100.0, 100.0]).unwrap();
        let mask = tensor_i64("mask", vec![1, 3], &[1, 1, 0]).unwrap();
        let out = run(Builtin::MeanPool { normalize: false }, vec![hidden.clone(), mask.clone()]);
        assert_eq!(f32s(&out[0].tensor), vec![2.0, 3.0]);
        let out = run(Builtin::MeanPool { normalize: true }, vec![hidden, mask]);
        let v = f32s(&out[0].tensor);
        assert!(((v[0] * v[0] + v[1] * v[1]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_argmax_and_top_k() {
        let x = tensor_f32("x", vec![2, 3], &[1.0, 3.0, 2.0, 0.0, 0.0, 5.0]).unwrap();
        let y = run(Builtin::Softmax {}, vec![x.clone()]);
        let v = f32s(&y[0].tensor);
        assert!((v[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let a = run(Builtin::Argmax { labels: None }, vec![x.clone()]);
        assert_eq!(i64s(&a[0].tensor), vec![1, 2]);
        let t = run(Builtin::TopK { k: 2, labels: None }, vec![x.clone()]);
        assert_eq!(t[0].tensor.shape(), &[2, 2]);
        assert_eq!(i64s(&t[0].tensor), vec![1, 2, 2, 0]);
        // k above the class count: refused, not answered with fewer columns than declared.
        let mut s = Builtins::new(&Builtin::TopK { k: 4, labels: None }).unwrap();
        assert_eq!(s.meta.outputs[0].shape, vec![-1, 4]);
        let e = s.infer(vec![x], &["index".into()]).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidArgument);
        assert!(e.message.contains("x has 3 classes per row but top_k takes 4"), "{}", e.message);
        let empty = tensor_f32("x", vec![2, 0], &[]).unwrap();
        let mut s = Builtins::new(&Builtin::Argmax { labels: None }).unwrap();
        let e = s.infer(vec![empty], &["index".into()]).unwrap_err();
        assert!(e.message.contains("x has 0 classes per row but argmax takes 1"), "{}", e.message);
    }

    /// `y = x`, except that its first call panics, as a model with a bug on one path would.
    struct PanicsOnce {
        meta: ModelMetadata,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl AsyncStep for PanicsOnce {
        fn metadata(&self) -> &ModelMetadata {
            &self.meta
        }

        fn infer<'a>(
            &'a self,
            inputs: Vec<NamedTensor>,
            _: &'a [String],
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Vec<NamedTensor>, InferError>> + Send + 'a>,
        > {
            Box::pin(async move {
                tokio::task::yield_now().await;
                if self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                    panic!("the step's first call panics");
                }
                Ok(vec![NamedTensor { name: "y".into(), tensor: inputs[0].tensor.clone() }])
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_async_step_that_panicked_is_reloaded_and_serves_again() {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: vec![-1, 1] };
        let meta =
            ModelMetadata { platform: "test".into(), inputs: vec![spec("x")], outputs: vec![spec("y")] };
        register_async_step("panics_once", Arc::new(PanicsOnce { meta, calls: Default::default() }));
        let factory = factory(&Builtin::Custom { name: "panics_once".into() }).unwrap();
        let mut spec = crate::DeploymentSpec::new("panics_once");
        spec.settings.warmup = false;
        let deployment = crate::Deployment::start(spec, factory).unwrap();
        let request = || crate::InferRequest {
            inputs: vec![tensor_f32("x", vec![1, 1], &[7.0]).unwrap()],
            timeout: Some(std::time::Duration::from_secs(10)),
            ..Default::default()
        };
        let e = deployment.infer(request()).await.unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Internal, "{e}");
        // The replica reloads the step on its own thread, outside the runtime, and serves again.
        let answer = deployment.infer(request()).await.unwrap();
        assert_eq!(f32s(&answer.outputs[0].tensor), vec![7.0]);
    }

    #[test]
    fn cast_and_reshape() {
        let x = tensor_f32("x", vec![1, 4], &[1.6, -2.0, 3.0, 4.0]).unwrap();
        let y = run(Builtin::Cast { from: "FP32".into(), to: "INT64".into() }, vec![x.clone()]);
        assert_eq!(i64s(&y[0].tensor), vec![1, -2, 3, 4]);
        let r = run(Builtin::Reshape { datatype: "FP32".into(), shape: vec![2, -1] }, vec![x]);
        assert_eq!(r[0].tensor.shape(), &[1, 2, 2]);
        // An empty batch keeps its rows' size.
        let empty = Tensor::new(DataType::Fp32, vec![0, 6], Bytes::new()).unwrap();
        let r = run(
            Builtin::Reshape { datatype: "FP32".into(), shape: vec![2, 3] },
            vec![NamedTensor { name: "x".into(), tensor: empty }],
        );
        assert_eq!(r[0].tensor.shape(), &[0, 2, 3]);
    }

    fn texts(texts: &[&str]) -> NamedTensor {
        let mut data = Vec::new();
        for t in texts {
            push_bytes_element(&mut data, t.as_bytes()).unwrap();
        }
        NamedTensor {
            name: "text".into(),
            tensor: Tensor::new(DataType::Bytes, vec![texts.len()], Bytes::from(data)).unwrap(),
        }
    }

    /// Rows are padded to the longest (attention 0 where padded), and a call whose padded
    /// tokens pass `max_tokens` is refused before any output is made.
    #[test]
    fn the_tokenizer_pads_to_the_longest_and_bounds_the_tokens_of_a_call() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models/tiny-encoder/tokenizer.json");
        let tokenizer = |max_tokens| Builtin::Tokenizer {
            path: path.clone(),
            max_length: None,
            max_tokens,
            max_text_bytes: sluice_config::DEFAULT_MAX_TEXT_BYTES,
        };
        let out = run(tokenizer(1 << 20), vec![texts(&["a b c d e", "a"])]);
        let [n, len] = out[0].tensor.shape() else { panic!("{:?}", out[0].tensor.shape()) };
        assert_eq!(*n, 2);
        let mask = i64s(&out[1].tensor);
        let short = &mask[*len..];
        assert_eq!(mask[..*len].iter().sum::<i64>() as usize, *len, "the longest row has no padding");
        assert!(
            short.iter().sum::<i64>() < *len as i64 && short.ends_with(&[0]),
            "the short row is padded: {mask:?}"
        );
        let mut s = Builtins::new(&tokenizer(*len)).unwrap();
        let e = s.infer(vec![texts(&["a b c d e", "a"])], &["input_ids".to_string()]).unwrap_err();
        assert!(e.message.contains("max_tokens"), "{e:?}");
    }

    /// Texts are encoded a chunk at a time (the rows kept end to end, not as the tokenizer's
    /// encodings): a call over several chunks, its longest text in the last, gives what the
    /// tokenizers library's own batch padding gives.
    #[test]
    fn rows_over_several_chunks_are_those_of_the_library() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models/tiny-encoder/tokenizer.json");
        let words = ["a", "b c", "", "d e f g", "h"];
        let mut owned: Vec<String> =
            (0..2 * Rows::CHUNK + 52).map(|i| words[i % words.len()].to_string()).collect();
        *owned.last_mut().unwrap() = "a b c d e f g h a b c d".into();
        let all: Vec<&str> = owned.iter().map(String::as_str).collect();
        let out = run(
            Builtin::Tokenizer {
                path: path.clone(),
                max_length: None,
                max_tokens: 1 << 20,
                max_text_bytes: 1 << 20,
            },
            vec![texts(&all)],
        );

        let mut library = tokenizers::Tokenizer::from_file(&path).unwrap();
        let mut padding = library.get_padding().cloned().unwrap_or_default();
        padding.strategy = tokenizers::PaddingStrategy::BatchLongest;
        library.with_padding(Some(padding));
        let enc = library.encode_batch(all.clone(), true).unwrap();
        let len = enc[0].len();
        assert_eq!(out[0].tensor.shape(), [all.len(), len]);
        let flat = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<i64> {
            enc.iter().flat_map(|e| f(e).iter().map(|&x| i64::from(x))).collect()
        };
        assert_eq!(i64s(&out[0].tensor), flat(tokenizers::Encoding::get_ids));
        assert_eq!(i64s(&out[1].tensor), flat(tokenizers::Encoding::get_attention_mask));
        assert_eq!(i64s(&out[2].tensor), flat(tokenizers::Encoding::get_type_ids));

        // A text past `max_text_bytes` is refused before it is encoded, naming it.
        let mut s = Builtins::new(&Builtin::Tokenizer {
            path: path.clone(),
            max_length: None,
            max_tokens: 1 << 20,
            max_text_bytes: 20,
        })
        .unwrap();
        let e = s
            .infer(vec![texts(&["a b", "a b c d e f g h i j k l"])], &["input_ids".to_string()])
            .unwrap_err();
        assert!(e.message.contains("text 1 is 23 bytes, more than max_text_bytes (20)"), "{e:?}");

        // Refused at once, naming the bound, when the first chunk already passes it.
        let mut s = Builtins::new(&Builtin::Tokenizer {
            path,
            max_length: None,
            max_tokens: all.len(),
            max_text_bytes: 1 << 20,
        })
        .unwrap();
        let e = s.infer(vec![texts(&all)], &["input_ids".to_string()]).unwrap_err();
        assert!(e.message.contains("max_tokens"), "{e:?}");
    }

    /// A tokenizer file that pads to a fixed length (for a model with a fixed sequence) pads
    /// to it, as the tokenizers library does; its strategy was ignored, and a model of fixed
    /// length refused every request as the client's fault.
    #[test]
    fn a_fixed_padding_length_in_the_file_is_kept() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models/tiny-encoder/tokenizer.json");
        let mut file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        file["padding"]["strategy"] = serde_json::json!({"Fixed": 12});
        let fixed = std::env::temp_dir().join(format!("tokenizer-fixed-{}.json", std::process::id()));
        std::fs::write(&fixed, file.to_string()).unwrap();
        let tokenizer = Builtin::Tokenizer {
            path: fixed.clone(),
            max_length: None,
            max_tokens: 1 << 20,
            max_text_bytes: 1 << 20,
        };
        let out = run(tokenizer, vec![texts(&["a b", "a"])]);
        assert_eq!(out[0].tensor.shape(), &[2, 12]);
        let _ = std::fs::remove_file(&fixed);
    }

    /// An empty `hidden` may name large sizes: `[1, 0, 2^36]` would have made the step allocate
    /// 256 GiB (and the process abort; such a tensor is refused when it is made now); the step
    /// refuses no tokens whatever their width.
    #[test]
    fn mean_pool_refuses_no_tokens_of_any_width() {
        assert!(Tensor::new(DataType::Fp32, vec![1, 0, 1 << 36], Bytes::new()).is_err());
        let hidden = Tensor::new(DataType::Fp32, vec![1, 0, 1 << 24], Bytes::new()).unwrap();
        let mask = Tensor::new(DataType::Int64, vec![1, 0], Bytes::new()).unwrap();
        let inputs = vec![
            NamedTensor { name: "hidden".into(), tensor: hidden },
            NamedTensor { name: "mask".into(), tensor: mask },
        ];
        let mut s = Builtins::new(&Builtin::MeanPool { normalize: true }).unwrap();
        let e = s.infer(inputs, &["embedding".to_string()]).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidArgument, "{e:?}");
    }

    /// Rows of no width hold no data however many: `[2^62, 0, 0]` made the step loop over 2^62
    /// rows (a thread held for years; such a tensor is refused when it is made now, its rows past
    /// `MAX_EMPTY_TENSOR_SPAN`); the embedding is empty at once.
    #[test]
    fn mean_pool_of_no_width_answers_at_once() {
        let n = crate::tensor::MAX_EMPTY_TENSOR_SPAN;
        assert!(Tensor::new(DataType::Fp32, vec![1 << 62, 0, 0], Bytes::new()).is_err());
        let hidden = Tensor::new(DataType::Fp32, vec![n, 0, 0], Bytes::new()).unwrap();
        let mask = Tensor::new(DataType::Int64, vec![n, 0], Bytes::new()).unwrap();
        let inputs = vec![
            NamedTensor { name: "hidden".into(), tensor: hidden },
            NamedTensor { name: "mask".into(), tensor: mask },
        ];
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = Builtins::new(&Builtin::MeanPool { normalize: false }).unwrap();
            let _ = tx.send(s.infer(inputs, &["embedding".to_string()]));
        });
        let out =
            rx.recv_timeout(std::time::Duration::from_secs(10)).expect("mean_pool did not answer").unwrap();
        assert_eq!(out[0].tensor.shape(), [n, 0]);
    }
}
