//! The gRPC services beside inference, through tonic's own generated clients: health
//! (`grpc.health.v1.Health/Check`), server reflection (v1), and version pinning with the
//! `x-sluice-version` metadata key; and the load tester's gRPC client (liveness mode, checked
//! inference, failures by code, reconnecting); plain HTTP on the gRPC port is refused.
//!
//! Health is checked only for what holds whether or not health follows readiness: SERVING
//! once every model is ready, and NOT_FOUND for a service the server does not have.

mod common;

use std::time::Duration;

use common::*;
use sluice_proto::inference as pb;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const IRIS: &[f32] = &[5.1, 3.5, 1.4, 0.2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_serving_when_ready_and_not_found_for_unknown_services() {
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let mut health = HealthClient::new(grpc::channel(&s).await);
    // Health follows readiness on its own task: it may trail `wait_ready` by a moment.
    for service in ["", "inference.GRPCInferenceService"] {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
            if r.status() == ServingStatus::Serving {
                break;
            }
            assert!(std::time::Instant::now() < until, "service {service:?} still {:?}", r.status());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    let e = health.check(HealthCheckRequest { service: "nope.Service".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    // An HTTP probe sent to the gRPC port by mistake is refused, not answered 200.
    let r = reqwest::get(format!("http://{}/v2/health/ready", s.grpc_addr().unwrap())).await.unwrap();
    assert_eq!(r.status(), 415);
    assert!(r.text().await.unwrap().contains("this port serves gRPC only"));
    s.shutdown().await;
}

/// One reflection request on a fresh stream, and its answer.
async fn reflect(
    s: &sluice_server::Server,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(grpc::channel(s).await);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers = client.server_reflection_info(tokio_stream::iter([req])).await?.into_inner();
    Ok(answers.next().await.expect("an answer")?.message_response.expect("a message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_describes_the_inference_service() {
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let list = reflect(&s, MessageRequest::ListServices(String::new())).await.unwrap();
    let MessageResponse::ListServicesResponse(list) = list else { panic!("not a service list") };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert!(names.contains(&"inference.GRPCInferenceService".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    let symbol = MessageRequest::FileContainingSymbol("inference.GRPCInferenceService".into());
    let MessageResponse::FileDescriptorResponse(files) = reflect(&s, symbol).await.unwrap() else {
        panic!("no file descriptor")
    };
    // Encoded FileDescriptorProtos: names and identifiers travel as plain strings.
    let text: String =
        files.file_descriptor_proto.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(text.contains("grpc_service.proto") && text.contains("ModelInfer"), "{text}");
    let unknown = MessageRequest::FileContainingSymbol("nope.Nothing".into());
    let e = reflect(&s, unknown).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    s.shutdown().await;
}

/// The version that answered one iris inference over gRPC, optionally pinned by metadata.
async fn answered_by(client: &mut grpc::Client, pin: Option<&str>) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(grpc::fp32_request("m", "input", &[1, 4], IRIS));
    if let Some(v) = pin {
        req.metadata_mut().insert("x-sluice-version", v.parse().unwrap());
    }
    Ok(client.model_infer(req).await?.into_inner().model_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_sluice_version_metadata_pins_a_grpc_request_to_a_version() {
    // The canary takes no unpinned traffic, so only a pin reaches it.
    let s = start(
        "      - {name: m, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 0}}\n",
        "",
    )
    .await;
    let mut client = grpc::client(&s).await;
    for _ in 0..20 {
        assert_eq!(answered_by(&mut client, None).await.unwrap(), "1");
        assert_eq!(answered_by(&mut client, Some("2")).await.unwrap(), "2");
        assert_eq!(answered_by(&mut client, Some("1")).await.unwrap(), "1");
    }
    // The version field names one exactly, ahead of a pin.
    let mut req = tonic::Request::new(pb::ModelInferRequest {
        model_version: "1".into(),
        ..grpc::fp32_request("m", "input", &[1, 4], IRIS)
    });
    req.metadata_mut().insert("x-sluice-version", "2".parse().unwrap());
    assert_eq!(client.model_infer(req).await.unwrap().into_inner().model_version, "1");
    let e = answered_by(&mut client, Some("7")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.message(), "unknown version `7` of model `m`; available: 1, 2");
    // A pin that is not UTF-8 is refused naming it (it was dropped: the split answered).
    let mut req = tonic::Request::new(grpc::fp32_request("m", "input", &[1, 4], IRIS));
    let unreadable = tonic::metadata::MetadataValue::try_from(&b"\xff2"[..]).unwrap();
    req.metadata_mut().insert("x-sluice-version", unreadable);
    let e = client.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(e.message(), "metadata `x-sluice-version` is not UTF-8 text");
    s.shutdown().await;
}

/// `sluice-loadtest --health` over gRPC: every call is a `ServerLive` the server answers live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_testers_liveness_mode_calls_server_live() {
    use sluice_loadtest::client::{Client, Protocol};
    use sluice_loadtest::codec::prepare;
    use sluice_loadtest::inputs::Case;
    use sluice_loadtest::run::{Limits, Mode, StepOptions, run_step};

    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let addr = s.grpc_addr().expect("a gRPC port").to_string();
    let client =
        std::sync::Arc::new(Client::connect(Protocol::Grpc, &addr, "", "").await.unwrap().liveness());
    let cases = std::sync::Arc::new(vec![prepare(&Case::no_tensors(), "", "").unwrap()]);
    let limits = Limits { duration: None, requests: Some(30) };
    let r =
        run_step(client, cases, Mode::Closed { concurrency: 3 }, limits, StepOptions::default(), None).await;
    assert_eq!((r.ok, r.error_count()), (30, 0), "{:?}", r.errors);
    // The model was never called: the calls were liveness checks.
    let stats = reqwest::get(format!("http://{}/v2/models/iris/stats", s.http_addr())).await.unwrap();
    let stats: serde_json::Value = stats.json().await.unwrap();
    assert_eq!(stats["model_stats"][0]["inference_count"], 0, "{stats}");
    s.shutdown().await;
}

/// The load tester's gRPC client (h2, pre-encoded requests) against the real server: answers
/// decoded and compared with the model's expected outputs, a wrong answer counted as a
/// mismatch, an unknown model counted by its gRPC code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_testers_grpc_client_checks_answers_and_names_failures() {
    use std::sync::Arc;

    use sluice_loadtest::client::{Client, Protocol};
    use sluice_loadtest::codec::prepare;
    use sluice_loadtest::inputs::load_samples;
    use sluice_loadtest::run::{Limits, Mode, StepOptions, run_step};

    let s = start("      - {name: mlp, model: mlp/model.onnx, num_replicas: 2}\n", "").await;
    let addr = s.grpc_addr().expect("a gRPC port").to_string();
    let client = Arc::new(Client::connect(Protocol::Grpc, &addr, "mlp", "").await.unwrap());
    let cases = load_samples(&models_dir().join("mlp/expected.json"), 1e-5).unwrap();
    let prepared = Arc::new(cases.iter().map(|c| prepare(c, "mlp", "").unwrap()).collect::<Vec<_>>());
    let check = StepOptions { check: true, ..StepOptions::default() };
    let count = |n| Limits { duration: None, requests: Some(n) };

    let r =
        run_step(client.clone(), prepared, Mode::Closed { concurrency: 4 }, count(120), check, None).await;
    assert_eq!((r.ok, r.error_count()), (120, 0), "{:?}", r.errors);

    let mut wrong = cases[0].clone();
    let outputs = wrong.outputs.as_mut().expect("expected outputs");
    outputs[0].data[0] = serde_json::json!(outputs[0].data[0].as_f64().unwrap() + 1.0);
    let wrong = Arc::new(vec![prepare(&wrong, "mlp", "").unwrap()]);
    let r = run_step(client.clone(), wrong, Mode::Closed { concurrency: 2 }, count(10), check, None).await;
    assert_eq!(r.errors.get("mismatch"), Some(&10), "{:?}", r.errors);

    let unknown = Arc::new(vec![prepare(&cases[0], "nope", "").unwrap()]);
    let r =
        run_step(client, unknown, Mode::Open { rate: 200.0, poisson: false }, count(10), check, None).await;
    assert_eq!(r.errors.get("grpc NotFound"), Some(&10), "{:?}", r.errors);
    s.shutdown().await;
}

/// `sluice-loadtest --protocol grpc-stream`: each worker's requests on its own
/// `ModelStreamInfer` stream, answers checked; a failing request is counted and its stream
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_testers_stream_client_checks_answers_and_names_failures() {
    use std::sync::Arc;

    use sluice_loadtest::client::{Client, Protocol};
    use sluice_loadtest::codec::prepare;
    use sluice_loadtest::inputs::load_samples;
    use sluice_loadtest::run::{Limits, Mode, StepOptions, run_step};

    let s = start("      - {name: mlp, model: mlp/model.onnx, num_replicas: 2}\n", "").await;
    let addr = s.grpc_addr().expect("a gRPC port").to_string();
    let client = Arc::new(Client::connect(Protocol::GrpcStream, &addr, "mlp", "").await.unwrap());
    let cases = load_samples(&models_dir().join("mlp/expected.json"), 1e-5).unwrap();
    let prepared = Arc::new(cases.iter().map(|c| prepare(c, "mlp", "").unwrap()).collect::<Vec<_>>());
    let check = StepOptions { check: true, ..StepOptions::default() };
    let count = |n| Limits { duration: None, requests: Some(n) };
    let r =
        run_step(client.clone(), prepared, Mode::Closed { concurrency: 4 }, count(200), check, None).await;
    assert_eq!((r.ok, r.error_count()), (200, 0), "{:?}", r.errors);
    let unknown = Arc::new(vec![prepare(&cases[0], "nope", "").unwrap()]);
    let r = run_step(client, unknown, Mode::Closed { concurrency: 2 }, count(10), check, None).await;
    assert_eq!(r.error_count(), 10, "{:?}", r.errors);
    assert!(r.errors.keys().all(|k| k.starts_with("stream error: unknown model `nope`")), "{:?}", r.errors);
    s.shutdown().await;
}

/// A gRPC connection that breaks under the load tester is replaced by the next call: the calls
/// go through a TCP relay that cuts the first connection after a few calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_testers_grpc_client_reconnects_after_its_connection_breaks() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sluice_loadtest::client::{Client, Protocol};
    use sluice_loadtest::codec::prepare;
    use sluice_loadtest::inputs::Case;

    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let server = s.grpc_addr().expect("a gRPC port");
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    let seen = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = relay.accept().await.unwrap();
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            let mut cut = cut_rx.clone();
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(server).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.wait_for(|c| *c && first) => {}
                }
            });
        }
    });

    let client = Client::connect(Protocol::Grpc, &relay_addr, "", "").await.unwrap().liveness();
    let live = prepare(&Case::no_tensors(), "", "").unwrap();
    for _ in 0..5 {
        client.send(&live, true).await.expect("live through the first connection");
    }
    cut_tx.send(true).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The call that finds the connection gone fails (and is counted); the next one reconnects.
    let outcomes = [client.send(&live, true).await.is_ok(), client.send(&live, true).await.is_ok()];
    assert!(outcomes[1], "a call after the break goes through a new connection: {outcomes:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    s.shutdown().await;
}

/// An error quoting a huge name from the request reaches the client as its status, cut to a
/// bounded length: the message travels in a trailer, which clients cap (a 100 KB one broke
/// the stream instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_quoting_a_huge_name_is_a_bounded_status() {
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let mut client = grpc::client(&s).await;
    let mut req = grpc::fp32_request("iris", "input", &[1, 4], &[5.1, 3.5, 1.4, 0.2]);
    req.inputs[0].datatype = "X".repeat(100_000);
    let e = client.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().len() < 1100 && e.message().ends_with("(cut)"), "{}", e.message().len());
    s.shutdown().await;
}

/// A request of mostly empty repeated entries (each a few hundred bytes once decoded, for two on
/// the wire) is refused RESOURCE_EXHAUSTED before it is decoded, naming what it holds; the
/// server answers the next one. (A 64 MiB one, 64 KiB gzipped, decoded to some 10 GiB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_would_grow_far_past_its_size_when_decoded_is_refused_first() {
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let mut client = grpc::client(&s).await;
    let mut req = grpc::fp32_request("iris", "input", &[1, 4], IRIS);
    req.inputs.resize(200_000, Default::default());
    let e = client.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("200000 `inputs`"), "{}", e.message());
    let ok = client.model_infer(grpc::fp32_request("iris", "input", &[1, 4], IRIS)).await;
    assert!(ok.is_ok(), "{ok:?}");
    s.shutdown().await;
}

/// A request parameter named like Triton's own is refused, as Triton refuses it, but for the
/// one Triton takes, `triton_enable_empty_final_response` (a bool), which Triton's C++ client
/// and perf_analyzer send with every unary request (each was refused); an extension Sluice does
/// not implement is UNIMPLEMENTED (not the client's mistake), as Triton's UNSUPPORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_parameters_are_refused_and_missing_extensions_unimplemented() {
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let mut client = grpc::client(&s).await;
    let param = |p| pb::InferParameter { parameter_choice: Some(p) };
    let with = |name: &str, value| {
        let mut req = grpc::fp32_request("iris", "input", &[1, 4], &[5.1, 3.5, 1.4, 0.2]);
        req.parameters.insert(name.into(), param(value));
        req
    };
    use pb::infer_parameter::ParameterChoice::{BoolParam, StringParam};
    for asked in [true, false] {
        let answer = client.model_infer(with("triton_enable_empty_final_response", BoolParam(asked))).await;
        assert_eq!(answer.expect("taken, as Triton takes it").into_inner().outputs.len(), 2);
    }
    let e = client.model_infer(with("triton_enable_empty_final_response", StringParam("yes".into()))).await;
    let e = e.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("`triton_enable_empty_final_response` must be a bool"), "{e:?}");
    let e = client.model_infer(with("triton_other", BoolParam(true))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("parameter `triton_other` is reserved"), "{e:?}");
    let mut req = grpc::fp32_request("iris", "input", &[1, 4], &[5.1, 3.5, 1.4, 0.2]);
    let classes = param(pb::infer_parameter::ParameterChoice::Int64Param(2));
    req.outputs = vec![pb::model_infer_request::InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: [("classification".to_string(), classes)].into_iter().collect(),
    }];
    let e = client.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("classification extension is not supported"), "{e:?}");
    // An input in shared memory beside a raw one: one raw content for two inputs, as Triton's
    // clients send it; the shared memory is what is refused, not the count.
    let mut req = grpc::fp32_request("iris", "input", &[1, 4], &[5.1, 3.5, 1.4, 0.2]);
    let region = param(pb::infer_parameter::ParameterChoice::StringParam("r".into()));
    let mut shared = req.inputs[0].clone();
    shared.name = "other".into();
    shared.parameters.insert("shared_memory_region".into(), region);
    req.inputs.insert(0, shared);
    let e = client.model_infer(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("input `other`: shared memory is not supported"), "{e:?}");
    let ok = client.model_infer(grpc::fp32_request("iris", "input", &[1, 4], &[5.1, 3.5, 1.4, 0.2])).await;
    assert!(ok.is_ok(), "{ok:?}");
    s.shutdown().await;
}

/// Opens a `ModelStreamInfer` stream fed from the returned sender.
async fn open_stream(
    client: &mut grpc::Client,
    metadata: &[(&'static str, &str)],
) -> (tokio::sync::mpsc::Sender<pb::ModelInferRequest>, tonic::Streaming<pb::ModelStreamInferResponse>) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    for (key, value) in metadata {
        req.metadata_mut().insert(*key, value.parse().unwrap());
    }
    let answers = client.model_stream_infer(req).await.expect("the stream opens").into_inner();
    (tx, answers)
}

fn with_id(id: &str, req: pb::ModelInferRequest) -> pb::ModelInferRequest {
    pb::ModelInferRequest { id: id.into(), ..req }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_answers_each_request_once_and_a_failure_does_not_end_it() {
    let s = start(
        "      - {name: m, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 0}}\n",
        "",
    )
    .await;
    let mut client = grpc::client(&s).await;
    let unary =
        client.model_infer(grpc::fp32_request("m", "input", &[1, 4], IRIS)).await.unwrap().into_inner();
    // The metadata pins every request of the stream, as it pins a unary call.
    let (tx, mut answers) = open_stream(&mut client, &[("x-sluice-version", "2")]).await;
    let flag =
        |v| pb::InferParameter { parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(v)) };
    let mut last = with_id("final", grpc::fp32_request("m", "input", &[1, 4], IRIS));
    last.parameters.insert("triton_enable_empty_final_response".into(), flag(true));
    let mut not_a_flag = with_id("not-a-flag", grpc::fp32_request("m", "input", &[1, 4], IRIS));
    not_a_flag.parameters.insert(
        "triton_enable_empty_final_response".into(),
        pb::InferParameter { parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(1)) },
    );
    for req in [
        with_id("ok", grpc::fp32_request("m", "input", &[1, 4], IRIS)),
        with_id("bad-shape", grpc::fp32_request("m", "input", &[1, 3], &IRIS[..3])),
        with_id("unknown", grpc::fp32_request("nope", "input", &[1, 4], IRIS)),
        not_a_flag,
        last,
    ] {
        tx.send(req).await.unwrap();
    }
    drop(tx);
    let mut got = std::collections::BTreeMap::new();
    while let Some(answer) = answers.next().await {
        let answer = answer.expect("the stream ends OK once the client is done");
        let response = answer.infer_response.expect("every answer names its request");
        assert!(
            got.insert(response.id.clone(), (answer.error_message, response)).is_none(),
            "answered twice"
        );
    }
    assert_eq!(
        got.keys().map(String::as_str).collect::<Vec<_>>(),
        ["bad-shape", "final", "not-a-flag", "ok", "unknown"]
    );
    let (error, ok) = &got["ok"];
    assert_eq!(error, "");
    assert_eq!(ok.model_version, "2", "pinned by the stream's metadata");
    assert_eq!(ok.raw_output_contents, unary.raw_output_contents, "the same answer as ModelInfer's");
    assert!(ok.parameters.is_empty(), "{:?}", ok.parameters);
    let (error, fin) = &got["final"];
    assert_eq!(error, "");
    assert_eq!(fin.parameters.get("triton_final_response"), Some(&flag(true)));
    let (error, bad) = &got["bad-shape"];
    assert!(error.contains("has shape [1, 3] but model `m` expects [-1, 4]"), "{error}");
    assert_eq!((bad.model_name.as_str(), bad.outputs.len()), ("m", 0));
    assert!(got["unknown"].0.contains("unknown model `nope`"), "{}", got["unknown"].0);
    assert!(got["not-a-flag"].0.contains("must be a bool"), "{}", got["not-a-flag"].0);
    s.shutdown().await;
}

/// A stream whose client takes no answers holds none of its deployment's room: its requests
/// run to their answers without the stream (answered at once, or on a task of their own when
/// they wait for a replica's thread) and let their admission go, so calls beside it are served
/// while the answers wait for the client, every one of them. The client's stream window holds
/// about two answers; each deployment has one slot, so a call beside the stream waits for the
/// stream's requests ahead of it to finish (for good, when they are held back with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_takes_no_answers_holds_no_room() {
    let room = "max_ongoing_requests: 1, max_queued_requests: 64";
    let s = start(
        &format!(
            "      - {{name: inline, model: iris/model.onnx, {room}}}\n      - {{name: threaded, model: iris/model.onnx, {room}, run_inline_under_us: 0}}\n"
        ),
        "",
    )
    .await;
    let addr = s.grpc_addr().unwrap();
    let stingy = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(Some(200))
        .connect()
        .await
        .unwrap();
    let mut stalled = pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(stingy);
    let mut client = grpc::client(&s).await;
    for model in ["inline", "threaded"] {
        let (tx, mut answers) = open_stream(&mut stalled, &[]).await;
        for k in 0..20 {
            tx.send(with_id(&k.to_string(), grpc::fp32_request(model, "input", &[1, 4], IRIS)))
                .await
                .unwrap();
        }
        // Calls beside the stream, one at a time, each given 5 s.
        for _ in 0..10 {
            let mut req = tonic::Request::new(grpc::fp32_request(model, "input", &[1, 4], IRIS));
            req.set_timeout(Duration::from_secs(5));
            let answered = client.model_infer(req).await;
            assert!(answered.is_ok(), "{model}: the stream holds the room: {answered:?}");
        }
        drop(tx);
        let mut ids = Vec::new();
        while let Some(answer) = answers.next().await {
            let answer = answer.expect("the stream ends OK");
            assert_eq!(answer.error_message, "", "{model}");
            ids.push(answer.infer_response.unwrap().id.parse::<u32>().unwrap());
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..20).collect::<Vec<_>>(), "{model}: every request answered once");
    }
    s.shutdown().await;
}

/// A message over the limit ends the stream with RESOURCE_EXHAUSTED (grpc-go's and Triton's
/// code), after the requests read before it are answered; a pause between two messages is not
/// timed (`body_read_timeout_s` is 0.3 s here), a pause inside one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_timed_and_limited_per_message() {
    let s = start(
        "      - {name: iris, model: iris/model.onnx}\n",
        ", max_body_bytes: 1000, body_read_timeout_s: 0.3",
    )
    .await;
    let mut client = grpc::client(&s).await;
    let (tx, mut answers) = open_stream(&mut client, &[]).await;
    for k in 0..2 {
        tx.send(with_id(&k.to_string(), grpc::fp32_request("iris", "input", &[1, 4], IRIS))).await.unwrap();
        let answer = answers.next().await.expect("an answer").expect("the stream still open");
        assert_eq!((answer.error_message.as_str(), answer.infer_response.unwrap().id), ("", k.to_string()));
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    tx.send(with_id("small", grpc::fp32_request("iris", "input", &[1, 4], IRIS))).await.unwrap();
    tx.send(with_id("big", grpc::fp32_request("iris", "input", &[100, 4], &[0.5; 400]))).await.unwrap();
    let answer = answers.next().await.expect("the small one's answer").expect("answered before the end");
    assert_eq!(answer.infer_response.unwrap().id, "small");
    let end = answers.next().await.expect("the end").unwrap_err();
    assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("over the limit of 1000 bytes (http_options.max_body_bytes)"), "{end:?}");
    // A unary call over the limit: the same code and message.
    let e =
        client.model_infer(grpc::fp32_request("iris", "input", &[100, 4], &[0.5; 400])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("over the limit of 1000 bytes"), "{e:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_unavailable_when_the_server_shuts_down() {
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let mut client = grpc::client(&s).await;
    let (tx, mut answers) = open_stream(&mut client, &[]).await;
    tx.send(with_id("before", grpc::fp32_request("iris", "input", &[1, 4], IRIS))).await.unwrap();
    let answer = answers.next().await.unwrap().unwrap();
    assert_eq!(answer.infer_response.unwrap().id, "before");
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(s.shutdown());
    let end = tokio::time::timeout(Duration::from_secs(20), answers.next()).await.expect("the stream ended");
    let status = end.expect("a status").unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    stopping.await.unwrap();
    // It ended the stream at once rather than holding shutdown to its drain timeout.
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    drop(tx);
}

/// A remote replica whose connection cannot be made (its process is gone: nothing listens)
/// hands each call it could not deliver to another ready replica it has not tried, which
/// answers it; they were answered 503 ("replica ... failed; retry") until its health check took
/// it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_a_remote_replica_cannot_deliver_goes_to_another() {
    use sluice_deployments::{
        DataType, Deployment, DeploymentSpec, ErrorKind, InferRequest, NamedTensor, RemoteInfo, Tensor,
    };
    let s = start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let metadata = s.routes().resolve("iris", None).unwrap().metadata().clone();
    // Bound and not listening: connections to it are refused, and no other test can take it.
    let closed = |_| {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    };
    let (_held, gone) = closed(0);
    let (_held_too, gone_too) = closed(1);
    let d = Deployment::start_remote(DeploymentSpec::new("iris"), metadata).unwrap();
    let replica = |name: &str, addr: std::net::SocketAddr| {
        let info = RemoteInfo { name: name.into(), addr: addr.to_string(), ..Default::default() };
        std::sync::Arc::new(sluice_controller::cluster::GrpcReplica::new(info, "iris", "1").unwrap())
    };
    let request = || {
        let data: Vec<u8> = IRIS.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = Tensor::new(DataType::Fp32, vec![1, 4], data.into()).unwrap();
        InferRequest { inputs: vec![NamedTensor { name: "input".into(), tensor }], ..Default::default() }
    };
    // Two replicas gone and one up: a call is tried on each at most once (the dead ones, with
    // nothing in flight, look the least loaded), in sequence and 16 at once.
    let up = d.add_remote(replica("up", s.grpc_addr().unwrap()));
    for (name, addr) in [("gone", gone), ("gone too", gone_too)] {
        let id = d.add_remote(replica(name, addr));
        d.set_replica_ready(id, true);
    }
    d.set_replica_ready(up, true);
    for k in 0..30 {
        let answer = d.infer(request()).await;
        assert!(answer.is_ok(), "request {k}: {answer:?}");
    }
    let together = futures_util::future::join_all((0..16).map(|_| d.infer(request()))).await;
    assert!(together.iter().all(Result::is_ok), "{together:?}");
    // With no replica up: the error names one that could not be reached, at once (a bounded
    // number of hand-offs, not back and forth until the deadline).
    assert!(d.remove_replica(up));
    let started = std::time::Instant::now();
    let e = d.infer(request()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
    assert!(e.message.contains("replica gone"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    d.close();
    s.shutdown().await;
}
