//! The `Backend` trait: what a replica needs from a model, kept small and synchronous so that a
//! backend runs on its replica's own OS thread.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sluice_config::{Model, ReplicaSettings};

use crate::onnx::{OnnxBackend, OnnxOptions};
use crate::weights::{MIN_SHARED_BYTES, SharedWeights};
use crate::{DataType, InferError, LoadError, NamedTensor};

/// Name, datatype and shape of a model input or output; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

/// What a model takes and gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMetadata {
    /// Backend name as Triton reports it (`onnxruntime_onnx`).
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// A loaded model. `infer` gets inputs already checked against [`ModelMetadata`] and the names
/// of the outputs to return, and returns them in that order.
pub trait Backend: Send + 'static {
    fn metadata(&self) -> &ModelMetadata;

    fn infer(&mut self, inputs: Vec<NamedTensor>, outputs: &[String])
    -> Result<Vec<NamedTensor>, InferError>;

    /// Makes `model` — one of a multiplexed deployment's models — the one the next `infer`
    /// runs, loading it first if needed. A backend that serves one model refuses.
    fn select_model(&mut self, model: &str) -> Result<(), InferError> {
        Err(InferError::invalid(format!("this deployment serves one model; it cannot serve model `{model}`")))
    }

    /// Whether the requests of a batch may go to the model as one call (default true). A
    /// backend whose answer to a request would depend on the others in its call says no (the
    /// tokenizer pads a call's rows to its longest text: one request's long text made every
    /// other's token ids that long), and each request of its batches runs by itself.
    fn merges_requests(&self) -> bool {
        true
    }

    /// Whether a call may run on an async runtime's worker thread (see `run_inline_under_us`):
    /// only for backends known to compute and return, never to block or wait on a runtime
    /// (custom steps may do either). Default false.
    fn inline_safe(&self) -> bool {
        false
    }

    /// Whether axis `axis` of output `output` follows the padded inputs' lengths, so that a
    /// padded batch's output is cut back to each request's own length on it. By default, axes
    /// the metadata declares dynamic: a fixed size (a hidden size of 384) is never a sequence,
    /// even when it equals a batch's padded length.
    fn crops_to_request(&self, output: &str, axis: usize) -> bool {
        declared_dynamic(self.metadata(), output, axis)
    }

    /// Whether `inputs` agree on every dimension the model names alike in more than one input
    /// (a sequence length its token ids and mask share). Padded into a batch, inputs that
    /// disagree would be made as long as each other, and the request answered on pad values
    /// where alone the model decides (it refuses them, or runs them at their own lengths): such
    /// a request's batch runs each request alone. Default true (nothing shared is known).
    fn shared_dims_agree(&self, _inputs: &[NamedTensor]) -> bool {
        true
    }

    /// The models a multiplexed backend holds now, least recently used first.
    fn loaded_models(&self) -> Vec<Arc<str>> {
        Vec::new()
    }

    /// The counters a multiplexed backend shares with its deployment's other replicas.
    fn multiplex_stats(&self) -> Option<Arc<crate::multiplex::MultiplexStats>> {
        None
    }

    /// How long the last successful `infer` spent copying data into and out of the framework
    /// (Triton's `compute_input` and `compute_output`; the rest of the call is
    /// `compute_infer`). Backends that do not measure it report zero.
    fn last_copy_times(&self) -> CopyTimes {
        CopyTimes::default()
    }
}

/// Whether `metadata` declares axis `axis` of output `output` dynamic (or does not say).
pub(crate) fn declared_dynamic(metadata: &ModelMetadata, output: &str, axis: usize) -> bool {
    let declared = metadata.outputs.iter().find(|o| o.name == output);
    declared.and_then(|o| o.shape.get(axis)).is_none_or(|&d| d < 0)
}

/// Time a backend spent moving data in and out of its framework in one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyTimes {
    /// Building the framework's input values from the request tensors.
    pub input: Duration,
    /// Reading the outputs back into Sluice tensors.
    pub output: Duration,
}

/// Makes a fresh backend for a replica (at start, and to replace one that panicked).
pub type BackendFactory = Arc<dyn Fn() -> Result<Box<dyn Backend>, LoadError> + Send + Sync>;

/// The factory for a config deployment's model: an ONNX file with its session settings, or a
/// built-in step. `sluice run` and `sluice validate` both start here. `max_replicas` is the
/// most backends the factory will have alive at once: the replicas of an ONNX model share its
/// weights (`share_weights`) only when it is above 1, since a shared copy costs one replica more
/// than its own (ONNX Runtime keeps the caller's initializers beside their prepacked forms, where
/// it frees its own copy once packed). `deployment` names the deployment in the multiplex
/// metrics.
pub fn backend_factory(
    model: &Model,
    settings: &ReplicaSettings,
    max_replicas: usize,
    deployment: &str,
) -> Result<BackendFactory, LoadError> {
    match model {
        Model::Builtin(b) => crate::builtin::factory(b),
        Model::Onnx(path) => {
            let options = OnnxOptions::from_settings(settings);
            let path = path.clone();
            if !settings.share_weights || max_replicas < 2 {
                return Ok(Arc::new(move || {
                    OnnxBackend::load(&path, &options).map(|b| Box::new(b) as Box<dyn Backend>)
                }));
            }
            // Read when the first replica loads and kept while any replica holds it: a replica
            // started later (scaling up, replacing one that panicked) reuses the same weights,
            // unless the file was replaced since (its session would parse the new file).
            let weights = Mutex::new(Weak::<SharedWeights>::new());
            Ok(Arc::new(move || {
                let shared = {
                    let mut cached = weights.lock().unwrap_or_else(|e| e.into_inner());
                    match cached.upgrade().filter(|shared| shared.is_current(&path)) {
                        Some(shared) => Some(shared),
                        // A file that cannot be read as a model: the session load below says why,
                        // in ONNX Runtime's words.
                        None => SharedWeights::read(&path, MIN_SHARED_BYTES).ok().map(|read| {
                            let shared = Arc::new(read);
                            *cached = Arc::downgrade(&shared);
                            shared
                        }),
                    }
                };
                match shared {
                    // ONNX Runtime reads the file again for the graph: one replaced between
                    // the weights' read and that would make a session of the new graph with
                    // the old weights. Checked after it: such a session is dropped for one of
                    // the new file's own.
                    Some(shared) => OnnxBackend::load_shared(&path, &options, shared.clone()).and_then(|b| {
                        if shared.is_current(&path) { Ok(b) } else { OnnxBackend::load(&path, &options) }
                    }),
                    None => OnnxBackend::load(&path, &options),
                }
                .map(|b| Box::new(b) as Box<dyn Backend>)
            }))
        }
        Model::Multiplexed { dir, max_models_per_replica } => {
            let options = OnnxOptions::from_settings(settings);
            // Labelled with the deployment, as the dashboards read it (the folder's name added
            // up two deployments whose folders share a name).
            let shared =
                crate::multiplex::Shared::new(dir.clone(), *max_models_per_replica, options, deployment);
            let metadata = shared.reference()?;
            Ok(Arc::new(move || {
                Ok(Box::new(crate::multiplex::Multiplexed::new(shared.clone(), metadata.clone()))
                    as Box<dyn Backend>)
            }))
        }
    }
}
