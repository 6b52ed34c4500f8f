//! A gRPC client for the tests: tonic's generated `GRPCInferenceService` client on a plain
//! HTTP/2 channel, and request builders.

use std::collections::HashMap;

use sluice_proto::inference as pb;
use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::transport::Channel;

pub type Client = GrpcInferenceServiceClient<Channel>;

/// A channel to the server's gRPC port.
pub async fn channel(server: &sluice_server::Server) -> Channel {
    let addr = server.grpc_addr().expect("gRPC enabled");
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("gRPC connects")
}

pub async fn client(server: &sluice_server::Server) -> Client {
    GrpcInferenceServiceClient::new(channel(server).await)
}

/// A request for `model` with one FP32 input in `raw_input_contents`.
pub fn fp32_request(model: &str, input: &str, shape: &[i64], data: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: input.into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()],
        ..Default::default()
    }
}

/// The OIP `timeout` parameter (µs), as gRPC clients send it.
pub fn with_timeout(mut req: pb::ModelInferRequest, micros: i64) -> pb::ModelInferRequest {
    let p = pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(micros)),
    };
    req.parameters = HashMap::from([("timeout".to_string(), p)]);
    req
}
