//! A replica in another `sluice replica` process, reached over the Open Inference Protocol's
//! gRPC `ModelInfer` with raw contents: tensors cross the hop as the same bytes (no JSON, no
//! per-element conversion), on one multiplexed HTTP/2 connection per replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_deployments::{
    DataType, ErrorKind, HeldModels, InferError, NamedTensor, RemoteCall, RemoteInfo, RemoteReplica, Tensor,
};
use sluice_proto::inference as pb;
use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

/// One remote replica of a deployment version.
pub struct GrpcReplica {
    info: RemoteInfo,
    model: String,
    version: String,
    client: GrpcInferenceServiceClient<Channel>,
    runtime: tokio::runtime::Handle,
    /// Notified when a call fails on the hop itself (connection refused or lost): the health
    /// checker looks at once instead of at its next period.
    pub(crate) suspect: Arc<Notify>,
}

impl GrpcReplica {
    /// A replica at `info.addr` serving `model` at `version`. Connects lazily (the first call
    /// or health check opens the connection).
    pub fn new(info: RemoteInfo, model: &str, version: &str) -> Result<Self, InferError> {
        let endpoint = Endpoint::from_shared(format!("http://{}", info.addr))
            .map_err(|e| InferError::internal(format!("replica address `{}`: {e}", info.addr)))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            // A replica's answer lists the models it holds in its metadata (at most
            // `HELD_MODELS_MAX_BYTES`, base64): room for it beside the rest.
            .http2_max_header_list_size(64 * 1024)
            .keep_alive_timeout(Duration::from_secs(20));
        let client = GrpcInferenceServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| InferError::internal("remote replicas are made inside the server's runtime"))?;
        let suspect = Arc::new(Notify::new());
        Ok(Self { info, model: model.to_string(), version: version.to_string(), client, runtime, suspect })
    }

    /// Whether the replica answers `ServerReady` with true within `timeout`.
    pub async fn healthy(&self, timeout: Duration) -> Result<(), String> {
        let mut request = tonic::Request::new(pb::ServerReadyRequest {});
        request.set_timeout(timeout);
        let mut client = self.client.clone();
        match tokio::time::timeout(timeout, client.server_ready(request)).await {
            Ok(Ok(r)) if r.get_ref().ready => Ok(()),
            Ok(Ok(_)) => Err("not ready".into()),
            Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

impl RemoteReplica for GrpcReplica {
    fn call(&self, call: RemoteCall) {
        // The inputs stay until the answer (for a redirect): the request message shares their
        // bytes, so this holds what a local replica's queue would, not a copy.
        let RemoteCall { inputs, outputs, deadline, mut reply, model, admission, redirect, mut holder } =
            call;
        let left = deadline.saturating_duration_since(Instant::now());
        let request = encode(&self.model, &self.version, &inputs, &outputs, left);
        let mut client = self.client.clone();
        let (name, addr) = (self.info.name.clone(), self.info.addr.clone());
        let suspect = self.suspect.clone();
        self.runtime.spawn(async move {
            // Held until the call is answered or dropped: the replica counts as busy until then.
            let mut admission = admission;
            let mut request = tonic::Request::new(request);
            request.set_timeout(left.max(Duration::from_millis(1)));
            // An id outside visible ASCII (a folder named `café`) cannot be an ASCII metadata
            // value: it goes as bytes under the `-bin` key (it was left out, and the replica
            // answered "name a model").
            if let Some(m) = &model {
                match m.parse::<tonic::metadata::MetadataValue<_>>() {
                    Ok(value) => {
                        drop(request.metadata_mut().insert(sluice_deployments::MULTIPLEX_HEADER, value))
                    }
                    Err(_) => {
                        let value = tonic::metadata::MetadataValue::from_bytes(m.as_bytes());
                        request.metadata_mut().insert_bin(sluice_deployments::MULTIPLEX_HEADER_BIN, value);
                    }
                }
            }
            let answer = tokio::select! {
                r = client.model_infer(request) => r,
                // The caller went away: drop the call (h2 resets the stream).
                () = reply.closed() => return,
            };
            let answer = match answer {
                Ok(response) => {
                    if let Some(held) = held_models(response.metadata())
                        && let Some(holder) = holder.take()
                    {
                        holder.holds(held);
                    }
                    decode(response.into_inner(), &outputs)
                }
                Err(status) => {
                    // A failure says what the replica holds too (a model that failed to load is
                    // not held).
                    if let Some(held) = held_models(status.metadata())
                        && let Some(holder) = holder.take()
                    {
                        holder.holds(held);
                    }
                    if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown) {
                        suspect.notify_one();
                    }
                    let error = from_status(&status, &name, &addr);
                    // Nothing reached the replica: another one runs the request.
                    if let Some(redirect) = redirect.filter(|_| never_delivered(&status)) {
                        let admission = admission.take();
                        let call = RemoteCall {
                            inputs,
                            outputs,
                            deadline,
                            reply,
                            model,
                            admission,
                            redirect: None,
                            holder: None,
                        };
                        redirect.send(call, error);
                        return;
                    }
                    Err(error)
                }
            };
            let _ = reply.send(answer);
        });
    }

    fn info(&self) -> &RemoteInfo {
        &self.info
    }
}

/// The models a replica process says it holds ([`sluice_deployments::HELD_MODELS_HEADER_BIN`])
/// and the list's number: None when it says nothing (or nothing readable).
fn held_models(metadata: &tonic::metadata::MetadataMap) -> Option<HeldModels> {
    let bytes = metadata.get_bin(sluice_deployments::HELD_MODELS_HEADER_BIN)?.to_bytes().ok()?;
    let seq = metadata.get(sluice_deployments::HELD_MODELS_SEQ_HEADER)?.to_str().ok()?.parse().ok()?;
    let ids = bytes.split(|b| *b == 0).filter(|id| !id.is_empty());
    let ids = ids.map(|id| std::str::from_utf8(id).ok().map(Arc::from)).collect::<Option<_>>()?;
    Some(HeldModels { seq, ids })
}

/// Whether a call failed before anything reached the replica: its connection could not be
/// made (refused: the process is gone; unreachable; the connect timeout). tonic marks every
/// failure before a byte of a request is written so; a call whose connection broke later may
/// have run there.
fn never_delivered(status: &tonic::Status) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(c) = cause {
        if c.is::<tonic::ConnectError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

fn encode(
    model: &str,
    version: &str,
    inputs: &[NamedTensor],
    outputs: &[String],
    left: Duration,
) -> pb::ModelInferRequest {
    let mut tensors = Vec::with_capacity(inputs.len());
    let mut raw = Vec::with_capacity(inputs.len());
    for input in inputs {
        tensors.push(pb::model_infer_request::InferInputTensor {
            name: input.name.clone(),
            datatype: input.tensor.dtype().as_str().to_string(),
            shape: input.tensor.shape().iter().map(|&d| d as i64).collect(),
            parameters: Default::default(),
            contents: None,
        });
        raw.push(input.tensor.data().clone());
    }
    let timeout = pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::Uint64Param(left.as_micros() as u64)),
    };
    pb::ModelInferRequest {
        model_name: model.to_string(),
        model_version: version.to_string(),
        id: String::new(),
        parameters: [("timeout".to_string(), timeout)].into(),
        inputs: tensors,
        outputs: outputs
            .iter()
            .map(|name| pb::model_infer_request::InferRequestedOutputTensor {
                name: name.clone(),
                parameters: Default::default(),
            })
            .collect(),
        raw_input_contents: raw,
    }
}

/// The outputs of a response, checked against what was asked for.
fn decode(r: pb::ModelInferResponse, wanted: &[String]) -> Result<Vec<NamedTensor>, InferError> {
    if r.outputs.len() != r.raw_output_contents.len() {
        return Err(InferError::internal(format!(
            "replica answered {} outputs with {} raw contents",
            r.outputs.len(),
            r.raw_output_contents.len()
        )));
    }
    let mut out = Vec::with_capacity(r.outputs.len());
    for (o, data) in r.outputs.into_iter().zip(r.raw_output_contents) {
        let dtype = DataType::parse(&o.datatype)
            .ok_or_else(|| InferError::internal(format!("replica answered datatype `{}`", o.datatype)))?;
        let shape = o
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| InferError::internal(format!("replica answered shape {:?}", o.shape)))?;
        let tensor = Tensor::new(dtype, shape, data)
            .map_err(|e| InferError::internal(format!("replica output `{}`: {e}", o.name)))?;
        out.push(NamedTensor { name: o.name, tensor });
    }
    if out.len() != wanted.len() || out.iter().zip(wanted).any(|(o, w)| &o.name != w) {
        return Err(InferError::internal("replica answered other outputs than asked for"));
    }
    Ok(out)
}

/// The kind a replica's gRPC status stands for. A failure of the hop itself (connection lost,
/// the replica died) names the replica, so a client sees which one failed.
fn from_status(status: &tonic::Status, name: &str, addr: &str) -> InferError {
    let message = status.message();
    match status.code() {
        // The request's own fault: the same request fails again anywhere, so no "retry".
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => InferError::invalid(message),
        tonic::Code::NotFound => InferError::new(ErrorKind::NotFound, message),
        tonic::Code::Unimplemented => InferError::new(ErrorKind::Unimplemented, message),
        tonic::Code::DeadlineExceeded => InferError::new(ErrorKind::DeadlineExceeded, message),
        tonic::Code::ResourceExhausted | tonic::Code::Unavailable if message.contains("overloaded") => {
            InferError::unavailable(message)
        }
        // A message past the replica's limit (older replicas answered it OUT_OF_RANGE, tonic's);
        // not the connection's own RESOURCE_EXHAUSTED (h2's ENHANCE_YOUR_CALM), which is the
        // replica's to retry elsewhere.
        tonic::Code::ResourceExhausted
            if message.contains("max_body_bytes") || message.contains("size limit") =>
        {
            InferError::invalid(message)
        }
        tonic::Code::Internal => InferError::internal(message),
        code => InferError::unavailable(format!("replica {name} ({addr}) failed: {code}: {message}; retry")),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn the_models_a_replica_holds_are_read_from_its_answer() {
        let numbered = |bytes: &[u8], seq: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert_bin(
                sluice_deployments::HELD_MODELS_HEADER_BIN,
                tonic::metadata::MetadataValue::from_bytes(bytes),
            );
            m.insert(sluice_deployments::HELD_MODELS_SEQ_HEADER, seq.parse().unwrap());
            held_models(&m)
        };
        let with = |bytes: &[u8]| numbered(bytes, "7");
        let ids =
            |v: &[&str]| Some(HeldModels { seq: 7, ids: v.iter().map(|s| Arc::<str>::from(*s)).collect() });
        assert_eq!(with("a\0café\0".as_bytes()), ids(&["a", "café"]));
        assert_eq!(with(b""), ids(&[]), "holding nothing is news too");
        assert_eq!(with(b"a\0\xff\0"), None, "an id that is not UTF-8: nothing believed");
        assert_eq!(numbered(b"a\0", "x"), None, "a list without its number: nothing believed");
        let mut unnumbered = tonic::metadata::MetadataMap::new();
        unnumbered.insert_bin(
            sluice_deployments::HELD_MODELS_HEADER_BIN,
            tonic::metadata::MetadataValue::from_bytes(b"a\0"),
        );
        assert_eq!(held_models(&unnumbered), None);
        assert_eq!(held_models(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn a_request_crosses_as_the_same_bytes_and_back() {
        let data = Bytes::from(vec![1u8, 0, 0, 0, 2, 0, 0, 0]);
        let tensor = Tensor::new(DataType::Int32, vec![1, 2], data.clone()).unwrap();
        let req = encode(
            "m",
            "3",
            &[NamedTensor { name: "x".into(), tensor }],
            &["y".into()],
            Duration::from_millis(7),
        );
        assert_eq!(req.raw_input_contents[0].as_ptr(), data.as_ptr(), "no copy into the request");
        assert_eq!(req.inputs[0].shape, vec![1, 2]);
        assert_eq!((req.model_name.as_str(), req.model_version.as_str()), ("m", "3"));
        let timeout = &req.parameters["timeout"].parameter_choice;
        assert_eq!(timeout, &Some(pb::infer_parameter::ParameterChoice::Uint64Param(7000)));
        let response = pb::ModelInferResponse {
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: "y".into(),
                datatype: "INT32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_output_contents: vec![data.clone()],
            ..Default::default()
        };
        let out = decode(response, &["y".into()]).unwrap();
        assert_eq!(out[0].tensor.data(), &data);
    }

    #[test]
    fn a_lost_replica_is_named_and_retryable_while_client_errors_pass_through() {
        let lost = from_status(&tonic::Status::unavailable("connection reset"), "sluice:m:1", "10.0.0.2:41");
        assert_eq!(lost.kind, ErrorKind::Unavailable);
        assert!(lost.message.contains("replica sluice:m:1 (10.0.0.2:41) failed"), "{}", lost.message);
        let bad = from_status(&tonic::Status::invalid_argument("input `x` has shape [3]"), "r", "a");
        assert_eq!((bad.kind, bad.message.as_str()), (ErrorKind::InvalidArgument, "input `x` has shape [3]"));
        let late = from_status(&tonic::Status::deadline_exceeded("timed out"), "r", "a");
        assert_eq!(late.kind, ErrorKind::DeadlineExceeded);
        // A message past the replica's limit fails anywhere: the client's, not "retry".
        for big in [
            tonic::Status::out_of_range("decoded message length too large"),
            tonic::Status::resource_exhausted(
                "a message of 900 bytes is over the limit of 800 bytes (http_options.max_body_bytes)",
            ),
        ] {
            assert_eq!(from_status(&big, "r", "a").kind, ErrorKind::InvalidArgument, "{big:?}");
        }
        let calm =
            from_status(&tonic::Status::resource_exhausted("h2 protocol error: enhance your calm"), "r", "a");
        assert_eq!(calm.kind, ErrorKind::Unavailable, "{calm:?}");
        let unknown = from_status(&tonic::Status::not_found("unknown model `x`"), "r", "a");
        assert_eq!(unknown.kind, ErrorKind::NotFound);
    }
}
