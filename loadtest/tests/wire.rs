//! What the load tester puts on the wire, seen by in-process servers that record it: REST
//! requests' content types, and the HTTP/2 receive windows of its gRPC connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::json;
use sluice_loadtest::client::{Client, Protocol};
use sluice_loadtest::codec::prepare;
use sluice_loadtest::grpc::{GrpcConn, Rpc, STREAM_WINDOW, frame};
use sluice_loadtest::inputs::{Case, JsonTensor};
use sluice_loadtest::run::{Limits, Mode, StepOptions, run_step};
use sluice_proto::inference as pb;

fn case() -> Case {
    let x = JsonTensor {
        name: "x".into(),
        datatype: "FP32".into(),
        shape: vec![1, 1],
        data: vec![json!(0.5)],
        ..Default::default()
    };
    Case { inputs: vec![x], ..Default::default() }
}

/// Each request's `Content-Type` and `Inference-Header-Content-Length`, as received.
type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

async fn recording_server() -> (String, Seen) {
    let seen = Seen::default();
    let s = seen.clone();
    let app = Router::new().route(
        "/v2/models/m/infer",
        post(move |headers: HeaderMap, _body: Bytes| {
            let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            s.lock().unwrap().push((header("content-type"), header("inference-header-content-length")));
            async { (StatusCode::OK, r#"{"outputs": []}"#) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, seen)
}

/// JSON bodies go as `application/json`; the binary extension's as `application/octet-stream`
/// with its JSON header's length; from closed-loop workers' connections and the open loop's
/// pool alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_requests_name_their_content_type() {
    let (addr, seen) = recording_server().await;
    let prepared = prepare(&case(), "m", "").unwrap();
    let binary_header = prepared.rest_binary_header.to_string();
    let cases = Arc::new(vec![prepared]);
    let limits = Limits { duration: None, requests: Some(3) };
    for (protocol, want) in [
        (Protocol::RestJson, (Some("application/json".to_string()), None)),
        (Protocol::RestBinary, (Some("application/octet-stream".to_string()), Some(binary_header))),
    ] {
        let client = Arc::new(Client::connect(protocol, &addr, "m", "").await.unwrap());
        for mode in [Mode::Closed { concurrency: 1 }, Mode::Open { rate: 200.0, poisson: false }] {
            let r = run_step(client.clone(), cases.clone(), mode, limits, StepOptions::default(), None).await;
            assert_eq!(r.ok, 3, "{protocol} {mode:?}: {:?}", r.errors);
            let seen = std::mem::take(&mut *seen.lock().unwrap());
            assert_eq!(seen, vec![want.clone(); 3], "{protocol} {mode:?}");
        }
    }
}

/// The gRPC connection opens with hyper's (and so tonic's) client windows, 2 MiB a stream and
/// 5 MiB the connection, not HTTP/2's initial 64 KiB: a server may send that much of an
/// answer before it waits for the client. The server here reserves room for a 3 MiB answer
/// and records the first send capacity the client's windows grant it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_connection_opens_wide_windows() {
    const ANSWER: usize = 3 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let granted = Arc::new(Mutex::new(None));
    let g = granted.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn =
            h2::server::Builder::new().max_send_buffer_size(2 * ANSWER).handshake(tcp).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let g = g.clone();
            tokio::spawn(async move {
                let mut body = req.into_body();
                while let Some(chunk) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.unwrap().len());
                }
                let head =
                    hyper::Response::builder().header("content-type", "application/grpc").body(()).unwrap();
                let mut send = respond.send_response(head, false).unwrap();
                send.reserve_capacity(ANSWER + 5);
                let first = std::future::poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
                *g.lock().unwrap() = Some(first);
                let answer = pb::ModelInferResponse {
                    raw_output_contents: vec![vec![7u8; ANSWER].into()],
                    ..Default::default()
                };
                send.send_data(frame(&answer).unwrap(), false).unwrap();
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                send.send_trailers(trailers).unwrap();
            });
        }
    });
    let conn = GrpcConn::connect(&addr).await.unwrap();
    let request = frame(&pb::ModelInferRequest::default()).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(10), conn.unary(Rpc::ModelInfer, request))
        .await
        .expect("answered")
        .unwrap();
    let answer = <pb::ModelInferResponse as prost::Message>::decode(message).unwrap();
    assert_eq!(answer.raw_output_contents[0].len(), ANSWER);
    let first = granted.lock().unwrap().expect("the server saw the call");
    assert_eq!(first, STREAM_WINDOW as usize, "the first send capacity is the stream's window");
}
