//! OpenTelemetry traces, received by a real OTLP/gRPC collector started by the test: a REST and
//! a gRPC request that carry a W3C `traceparent` become children of the caller's span, with the
//! request path's spans below them (request → infer → queue, model; encode), and a pipeline's
//! steps are child spans of its request.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const CONFIG: &str = "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {port: 0}\nadmin_options: {enabled: false}\napplications:
  - name: app
    deployments:
      - {name: iris, model: iris/model.onnx, max_batch_size: 8}
  - name: named
    route_prefix: /iris
    deployments:
      - {name: iris-model, model: iris/model.onnx, max_batch_size: 8}
      - {name: iris-label, builtin: {argmax: {labels: iris/labels.txt}}, max_batch_size: 8}
    pipeline:
      name: iris-classifier
      inputs: [{name: features, datatype: FP32, shape: [-1, 4]}]
      steps:
        - {name: classify, deployment: iris-model, inputs: {input: features}, outputs: {probabilities: probabilities}}
        - {name: name-it, deployment: iris-label, inputs: {x: probabilities}, outputs: {label: label}}
      outputs: [label]
      route: {request: {features: features}, response: {label: label}}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_become_traces_joined_to_the_callers_with_the_request_path_inside() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let router = tonic::service::Routes::new(TraceServiceServer::new(collector.clone())).into_axum_router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let tracing = sluice_config::TracingOptions { otlp_endpoint: Some(endpoint), ..Default::default() };
    let telemetry =
        sluice_server::telemetry::init("warn".parse().unwrap(), Default::default(), &tracing).unwrap();

    sluice_server::runtime::init(None, None).unwrap();
    let config =
        sluice_config::parse(CONFIG, &models_dir().join("otel.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    assert!(s.wait_ready(Duration::from_secs(60)).await);

    let rest_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = reqwest::Client::new()
        .post(url(&s, "/v2/models/iris/infer"))
        .header("traceparent", format!("00-{rest_trace}-00f067aa0ba902b7-01"))
        .body(r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    grpc_infer(s.grpc_addr().unwrap(), grpc_trace, "b7ad6b7169203331").await;
    let stream_trace = "55555555555555555555555555555555";
    grpc_stream_infer(s.grpc_addr().unwrap(), stream_trace, "6666666666666666").await;

    // gRPC on the REST port: one `request` span, not one from each frontend's layer.
    // The port is picked here and bound by the server after: another process can take it in
    // between, so a start that finds it taken tries another.
    let mut tries = 0;
    let shared = loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let shared_config = CONFIG.replace(
            "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {port: 0}",
            &format!(
                "http_options: {{host: 127.0.0.1, port: {port}}}\ngrpc_options: {{host: 127.0.0.1, port: {port}}}"
            ),
        );
        let config = sluice_config::parse(&shared_config, &models_dir().join("otel.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        match sluice_server::start(config, Default::default()).await {
            Ok(shared) => break shared,
            Err(sluice_server::StartError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && tries < 5 =>
            {
                tries += 1
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(shared.wait_ready(Duration::from_secs(60)).await);
    let shared_trace = "33333333333333333333333333333333";
    grpc_infer(shared.grpc_addr().unwrap(), shared_trace, "4444444444444444").await;

    let pipeline_trace = "11111111111111111111111111111111";
    let r = reqwest::Client::new()
        .post(url(&s, "/iris"))
        .header("traceparent", format!("00-{pipeline_trace}-2222222222222222-01"))
        .body(r#"{"features": [[5.1, 3.5, 1.4, 0.2]]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Export is batched: flush, then wait for the collector to have all three traces.
    telemetry.flush();
    let until = Instant::now() + Duration::from_secs(15);
    let trace = |id: &str| -> Vec<Span> {
        collector.spans.lock().unwrap().iter().filter(|s| hex(&s.trace_id) == id).cloned().collect()
    };
    while [rest_trace, grpc_trace, pipeline_trace, shared_trace, stream_trace]
        .iter()
        .any(|t| trace(t).len() < 3)
    {
        assert!(
            Instant::now() < until,
            "spans received: {:?}",
            collector.spans.lock().unwrap().iter().map(|s| (&s.name, hex(&s.trace_id))).collect::<Vec<_>>()
        );
        telemetry.flush();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    telemetry.flush();

    let named = |spans: &[Span], name: &str| -> Vec<Span> {
        spans.iter().filter(|s| s.name == name).cloned().collect()
    };
    let one = |spans: &[Span], name: &str| -> Span {
        let found = named(spans, name);
        assert_eq!(
            found.len(),
            1,
            "one `{name}` span: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        found[0].clone()
    };

    // REST: the caller's span → request → infer → queue and model; encode under request.
    let rest = trace(rest_trace);
    let request = one(&rest, "request");
    assert_eq!(hex(&request.parent_span_id), "00f067aa0ba902b7", "joined to the caller's span");
    let infer = one(&rest, "infer");
    assert_eq!(infer.parent_span_id, request.span_id);
    assert_eq!(one(&rest, "queue").parent_span_id, infer.span_id);
    assert_eq!(one(&rest, "model").parent_span_id, infer.span_id);
    assert_eq!(one(&rest, "encode").parent_span_id, request.span_id);
    let model_attr = infer.attributes.iter().find(|a| a.key == "model").expect("infer records its model");
    assert!(format!("{:?}", model_attr.value).contains("iris"), "{model_attr:?}");

    // gRPC: the same from metadata.
    let grpc = trace(grpc_trace);
    let request = one(&grpc, "request");
    assert_eq!(hex(&request.parent_span_id), "b7ad6b7169203331");
    assert_eq!(one(&grpc, "infer").parent_span_id, request.span_id);
    // A stream's requests, each on a task of its own, in the call's span.
    let stream = trace(stream_trace);
    let request = one(&stream, "request");
    assert_eq!(hex(&request.parent_span_id), "6666666666666666");
    assert_eq!(one(&stream, "infer").parent_span_id, request.span_id);
    let on_shared_port = trace(shared_trace);
    let request = one(&on_shared_port, "request");
    assert_eq!(hex(&request.parent_span_id), "4444444444444444");
    assert_eq!(one(&on_shared_port, "infer").parent_span_id, request.span_id);

    // A pipeline: one step span per step under the request, each with its deployment's infer.
    let pipeline = trace(pipeline_trace);
    let request = one(&pipeline, "request");
    let steps = named(&pipeline, "step");
    assert_eq!(steps.len(), 2, "{:?}", pipeline.iter().map(|s| &s.name).collect::<Vec<_>>());
    for step in &steps {
        assert_eq!(step.parent_span_id, request.span_id);
        assert!(
            named(&pipeline, "infer").iter().any(|i| i.parent_span_id == step.span_id),
            "an infer under each step"
        );
    }
    s.shutdown().await;
    shared.shutdown().await;
}

/// One request to iris on a `ModelStreamInfer` stream at `addr`, the call a child of span
/// `parent` in `trace`.
async fn grpc_stream_infer(addr: std::net::SocketAddr, trace: &str, parent: &str) {
    use tokio_stream::StreamExt;
    let mut client = client(addr).await;
    let mut req = tonic::Request::new(tokio_stream::iter([iris_request()]));
    req.metadata_mut().insert("traceparent", format!("00-{trace}-{parent}-01").parse().unwrap());
    let mut answers = client.model_stream_infer(req).await.unwrap().into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    assert_eq!(answer.error_message, "");
}

async fn client(
    addr: std::net::SocketAddr,
) -> sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
    tonic::transport::Channel,
> {
    sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .unwrap()
}

fn iris_request() -> sluice_proto::inference::ModelInferRequest {
    let data: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2].iter().flat_map(|v| v.to_le_bytes()).collect();
    sluice_proto::inference::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![sluice_proto::inference::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![data.into()],
        ..Default::default()
    }
}

/// One gRPC infer request to iris at `addr`, sent as a child of span `parent` in `trace`.
async fn grpc_infer(addr: std::net::SocketAddr, trace: &str, parent: &str) {
    let mut client = client(addr).await;
    let mut req = tonic::Request::new(iris_request());
    req.metadata_mut().insert("traceparent", format!("00-{trace}-{parent}-01").parse().unwrap());
    client.model_infer(req).await.unwrap();
}
