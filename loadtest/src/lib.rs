//! `sluice-loadtest`: a load generator for any Open Inference Protocol server (Sluice, Triton,
//! MLServer, KServe) in the spirit of perf_analyzer. REST JSON, REST binary and gRPC; closed
//! loop at fixed concurrency or open loop at a fixed rate; HDR-histogram percentiles; JSON,
//! Markdown and SVG reports. Every run is bounded by duration or request count.

pub mod client;
pub mod codec;
pub mod grpc;
pub mod inputs;
pub mod report;
pub mod run;
pub mod stats;
