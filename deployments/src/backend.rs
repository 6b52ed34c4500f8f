//! The `Backend` trait: what a replica needs from a model, kept small and synchronous so that a
//! backend runs on its replica's own OS thread.

use std::sync::Arc;

use sluice_config::{Model, ReplicaSettings};

use crate::onnx::{OnnxBackend, OnnxOptions};
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
}

/// Makes a fresh backend for a replica (at start, and to replace one that panicked).
pub type BackendFactory = Arc<dyn Fn() -> Result<Box<dyn Backend>, LoadError> + Send + Sync>;

/// The factory for a config deployment's model: an ONNX file with its session settings, or a
/// built-in step. `sluice run` and `sluice validate` both start here.
pub fn backend_factory(model: &Model, settings: &ReplicaSettings) -> Result<BackendFactory, LoadError> {
    match model {
        Model::Builtin(b) => crate::builtin::factory(b),
        Model::Onnx(path) => {
            let options = OnnxOptions { intra_op_threads: settings.intra_op_threads as usize };
            let path = path.clone();
            Ok(Arc::new(move || OnnxBackend::load(&path, &options).map(|b| Box::new(b) as Box<dyn Backend>)))
        }
    }
}
