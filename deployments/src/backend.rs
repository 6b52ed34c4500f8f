//! The `Backend` trait: what a replica needs from a model, kept small and synchronous so that a
//! backend runs on its replica's own OS thread.

use crate::{DataType, InferError, NamedTensor};

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
