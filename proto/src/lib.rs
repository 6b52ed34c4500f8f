//! Generated Open Inference Protocol gRPC types and tonic service (package `inference`), built
//! from `proto/*.proto` without a system `protoc`. Raw tensor contents are `bytes::Bytes`, so a
//! frontend slices them into tensors without copying.

/// Messages and the `GRPCInferenceService` server and client.
#[allow(clippy::all, missing_docs)]
pub mod inference {
    tonic::include_proto!("inference");
}

pub mod guard;

/// Encoded `FileDescriptorSet` of the `inference` package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));
