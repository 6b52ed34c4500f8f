//! Sluice's model side: [`Tensor`], the [`Backend`] trait and its ONNX Runtime implementation,
//! replicas (one backend per OS thread) and [`Deployment`]s that spread requests over them.
//! Nothing here knows about HTTP or gRPC.

mod backend;
mod batch;
mod concat;
mod deployment;
mod error;
pub mod metrics;
pub mod onnx;
mod replica;
mod request;
mod tensor;

pub use backend::{Backend, ModelMetadata, TensorSpec};
pub use batch::BatchPolicy;
pub use deployment::{Deployment, DeploymentSpec};
pub use error::{ErrorKind, InferError};
pub use replica::BackendFactory;
pub use request::{InferRequest, InferResponse, check_request};
pub use tensor::{BytesElements, DataType, NamedTensor, Tensor, element_count, push_bytes_element};
