//! Sluice's model side: [`Tensor`], the [`Backend`] trait and its ONNX Runtime implementation,
//! replicas (one backend per OS thread) and [`Deployment`]s that spread requests over them.
//! Nothing here knows about HTTP or gRPC.

mod backend;
mod batch;
pub mod builtin;
mod concat;
mod convert;
mod deployment;
mod error;
pub mod metrics;
pub mod multiplex;
pub mod onnx;
mod onnx_call;
pub mod pipeline;
mod remote;
mod replica;
mod request;
mod servable;
pub mod shadow;
mod tensor;
pub mod weights;

pub use backend::{Backend, BackendFactory, CopyTimes, ModelMetadata, TensorSpec, backend_factory};
pub use batch::BatchPolicy;
pub use builtin::{AsyncStep, register_async_step, register_step};
pub use concat::{ModelCall, run_batched};
pub use deployment::{
    Admission, DRAIN_SETTLE, Deployment, DeploymentSpec, HELD_MODELS_HEADER_BIN, HELD_MODELS_MAX_BYTES,
    HELD_MODELS_SEQ_HEADER, HeldModels, Holder, INLINE_MAX_BYTES, MULTIPLEX_HEADER, MULTIPLEX_HEADER_BIN,
    Redirect, ReplicaInfo, Yield, YieldOnce, check_fits, yield_once, yielded,
};
pub use error::{ErrorKind, InferError, LoadError};
pub use pipeline::Pipeline;
pub use remote::{RemoteCall, RemoteInfo, RemoteReplica};
pub use request::{
    ENABLE_EMPTY_FINAL_RESPONSE, InferRequest, InferResponse, check_parameter_name, check_request,
    refuse_classification, refuse_shared_memory, validate_request,
};
pub use servable::Servable;
pub use shadow::Shadow;
pub use tensor::{BytesElements, DataType, NamedTensor, Tensor, element_count, push_bytes_element};
