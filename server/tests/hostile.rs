//! Clients that misbehave at the connection level, against the real server on port 0: ones
//! that hold connections open through shutdown, send nothing, stall their body, announce a body
//! over the limit, or compress it (a bomb among them). Each gets a bounded, clear outcome.
//!
//! Waits here are guards (a broken bound would hang the test, so each read gives up after a
//! minute and fails); no assertion is about how long anything took.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use flate2::Compression;
use flate2::write::{GzEncoder, ZlibEncoder};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GUARD: Duration = Duration::from_secs(60);

/// A server for iris with extra top-level and `http_options` YAML.
async fn serve(top: &str, http: &str) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).expect("ONNX Runtime");
    let text = format!(
        "{top}\nhttp_options: {{host: 127.0.0.1, port: 0{http}}}\ngrpc_options: {{port: 0}}\nadmin_options: {{enabled: false}}\n\
         applications:\n  - name: t\n    deployments:\n      - {{name: iris, model: iris/model.onnx}}\n"
    );
    let config = sluice_config::parse(&text, &models_dir().join("t.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let server = sluice_server::start(config, Default::default()).await.expect("server starts");
    assert!(server.wait_ready(GUARD).await);
    server
}

async fn connect(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Everything the server sends until it closes the connection.
async fn until_closed(mut s: TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(GUARD, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("the server closes the connection");
    String::from_utf8_lossy(&out).into_owned()
}

/// The first response on a connection (status line, headers and a Content-Length body).
async fn response(s: &mut TcpStream) -> (u16, String, String) {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(GUARD, async {
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return (text[..end].to_string(), text[end + 4..end + 4 + len].to_string());
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => panic!("connection closed before a whole response: {text:?}"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    });
    let (head, body) = read.await.expect("a response arrives");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, head, body)
}

fn iris_body() -> Vec<u8> {
    json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn shutdown_ends_within_the_grace_period_and_closes_connections_that_never_finish() {
    let s = serve("graceful_shutdown_timeout_s: 0.5", "").await;
    let addr = s.http_addr();
    // A request whose body never completes, headers that never end, and an idle keep-alive
    // connection after a whole request.
    let stalled_body =
        connect(addr, b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"in")
            .await;
    let stalled_head = connect(addr, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-slow: ").await;
    let mut idle = connect(addr, b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(response(&mut idle).await.0, 200);
    tokio::time::timeout(GUARD, s.shutdown()).await.expect("shutdown ends within its grace period");
    // Nothing is left behind: every connection was closed (an answer or none).
    for conn in [stalled_body, stalled_head, idle] {
        until_closed(conn).await;
    }
    assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn a_client_that_sends_nothing_or_half_a_request_is_closed() {
    let s = serve("", ", header_read_timeout_s: 0.2").await;
    let silent = connect(s.http_addr(), b"").await;
    let half = connect(s.http_addr(), b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\n").await;
    let silent_grpc = connect(s.grpc_addr().unwrap(), b"").await;
    until_closed(silent).await;
    until_closed(half).await;
    until_closed(silent_grpc).await;
    // The server still serves.
    let mut ok = connect(s.http_addr(), b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(response(&mut ok).await.0, 200);
    s.shutdown().await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408() {
    let s = serve("", ", body_read_timeout_s: 0.2").await;
    let mut c = connect(
        s.http_addr(),
        b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"inputs\"",
    )
    .await;
    let (status, _, body) = response(&mut c).await;
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("body_read_timeout_s"), "{body}");
    s.shutdown().await;
}

/// Sends `head` (a request whose body is announced 100 bytes long) to `addr`, then the body a
/// byte every 100 ms: the answer, and how long it took.
async fn trickled(addr: SocketAddr, head: &[u8]) -> (String, Duration) {
    let c = connect(addr, head).await;
    let (mut rd, mut wr) = c.into_split();
    let started = std::time::Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..99 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(GUARD, async {
        while !String::from_utf8_lossy(&answer).contains("}") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok());
    trickle.abort();
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

/// A body that keeps arriving a byte at a time, each within `body_read_timeout_s`, is cut at
/// `body_total_timeout_s` (it held its request, and the connection, as long as the client
/// liked).
#[tokio::test]
async fn a_body_that_trickles_in_gets_408_at_the_total_timeout() {
    let s = serve("", ", body_read_timeout_s: 1, body_total_timeout_s: 1").await;
    let head = b"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{";
    let (answer, took) = trickled(s.http_addr(), head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_total_timeout_s"), "{answer}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    s.shutdown().await;
}

/// So is one sent to the admin API (it read a body for as long as each piece came within
/// `body_read_timeout_s`).
#[tokio::test]
async fn an_admin_body_that_trickles_in_gets_408_at_the_total_timeout() {
    sluice_server::runtime::init(None, None).expect("ONNX Runtime");
    let text = "http_options: {host: 127.0.0.1, port: 0, body_read_timeout_s: 1, body_total_timeout_s: 1}\n\
                grpc_options: {enabled: false}\nadmin_options: {port: 0}\napplications: []\n";
    let config = sluice_config::parse(text, &models_dir().join("t.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let s = sluice_server::start(config, Default::default()).await.expect("server starts");
    let head = b"PUT /api/serve/applications/ HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{";
    let (answer, took) = trickled(s.admin_addr().unwrap(), head).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_total_timeout_s"), "{answer}");
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    s.shutdown().await;
}

/// On gRPC's own port too, a call whose message stops arriving is ended after
/// `body_read_timeout_s` (only the REST frontend timed bodies: such a call, and its connection,
/// were held until shutdown).
#[tokio::test]
async fn a_grpc_message_that_stops_arriving_is_ended() {
    use http_body_util::BodyExt;
    let s = serve("", ", body_read_timeout_s: 0.2").await;
    let addr = s.grpc_addr().unwrap();
    assert_ne!(addr, s.http_addr(), "gRPC on a port of its own");
    // A stream of requests is timed inside a message too (not between two).
    for method in ["ModelInfer", "ModelStreamInfer"] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(tcp);
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        type Frame = Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>;
        let (tx, rx) = tokio::sync::mpsc::channel::<Frame>(1);
        // A message of 100 bytes announced, 10 of them sent, then nothing.
        let mut head = vec![0u8, 0, 0, 0, 100];
        head.extend([0u8; 10]);
        tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from(head)))).await.unwrap();
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = hyper::Request::post(format!("http://{addr}/inference.GRPCInferenceService/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            match send.send_request(req).await {
                Ok(r) => r.into_body().collect().await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        assert!(ended.is_ok(), "{method}: the stalled call was still open after 10 s");
        drop(tx);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn a_body_announced_over_the_limit_gets_413_before_it_is_sent() {
    let s = serve("", ", max_body_bytes: 4096").await;
    for expect in ["expect: 100-continue\r\n", ""] {
        let head = format!(
            "POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n{expect}\r\n"
        );
        let mut c = connect(s.http_addr(), head.as_bytes()).await;
        let (status, head, body) = response(&mut c).await;
        assert_eq!(status, 413, "{head}\n{body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(
            message.contains("10000000 bytes") && message.contains("max_body_bytes is 4096"),
            "{message}"
        );
    }
    s.shutdown().await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn compressed_requests_are_accepted_and_answers_compressed_when_asked() {
    let s = serve("", "").await;
    let client = reqwest::Client::new();
    let infer = url(&s, "/v2/models/iris/infer");
    // Codings are case-insensitive; `identity` is no coding.
    for (coding, body) in [
        ("gzip", gzip(&iris_body())),
        ("deflate", deflate(&iris_body())),
        ("identity", iris_body()),
        ("GZIP", gzip(&iris_body())),
        ("identity, gzip,", gzip(&iris_body())),
        ("Identity", iris_body()),
    ] {
        let r = client.post(&infer).header("content-encoding", coding).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{coding}");
        let out: Value = r.json().await.unwrap();
        assert_eq!(out["outputs"][0]["data"], json!([0]), "{coding}: {out}");
    }
    // The answer is gzip when the client accepts it.
    let r = client.post(&infer).header("accept-encoding", "gzip").body(iris_body()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let mut text = String::new();
    flate2::read::GzDecoder::new(&r.bytes().await.unwrap()[..]).read_to_string(&mut text).unwrap();
    let out: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(out["model_name"], "iris");
    // An encoding Sluice cannot decode, and a broken gzip stream.
    let r = client.post(&infer).header("content-encoding", "br").body(iris_body()).send().await.unwrap();
    assert_eq!(r.status(), 415);
    let error: Value = r.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("`br` is not supported"), "{error}");
    let twice = gzip(&gzip(&iris_body()));
    let r = client.post(&infer).header("content-encoding", "gzip, gzip").body(twice).send().await.unwrap();
    assert_eq!(r.status(), 415);
    let error: Value = r.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("a body may be compressed once"), "{error}");
    let r = client.post(&infer).header("content-encoding", "gzip").body(iris_body()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("cannot read the request body"), "{error}");
    s.shutdown().await;
}

#[tokio::test]
async fn a_gzip_bomb_gets_413() {
    let s = serve("", ", max_body_bytes: 1048576").await;
    // 64 MiB of zeros in about 64 KiB: the limit applies while decompressing.
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "the compressed body itself is under the limit");
    // The infer route, and the repository's, which read their bodies with axum's extractor
    // and answered its plain text (tritonclient reads the error as JSON).
    for path in ["/v2/models/iris/infer", "/v2/repository/index", "/v2/repository/models/iris/load"] {
        let r = reqwest::Client::new()
            .post(url(&s, path))
            .header("content-encoding", "gzip")
            .body(bomb.clone())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let error: Value = r.json().await.unwrap_or_else(|e| panic!("{path}: not JSON: {e}"));
        assert_eq!(status, 413, "{path}: {error}");
        assert!(error["error"].as_str().unwrap().contains("decompressed bodies count"), "{path}: {error}");
    }
    // The other way round: a deflate stream of empty blocks, chunked (no `Content-Length`),
    // decompresses to nothing however long it is sent; it was read until body_total_timeout_s.
    let head = "POST /v2/models/iris/infer HTTP/1.1\r\nHost: t\r\nContent-Encoding: deflate\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    let mut client = connect(s.http_addr(), head.as_bytes()).await;
    // 64 KiB of empty stored blocks (each a 5-byte header announcing 0 bytes) per chunk, the
    // first after the zlib header.
    let blocks = [0x00, 0x00, 0x00, 0xff, 0xff].repeat(64 * 1024 / 5);
    let chunked = |data: &[u8]| [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat();
    // 2 MiB of them at most, then no more: the answer comes at 1 MiB, not at a timeout.
    for i in 0..32 {
        let data = if i == 0 { [&[0x78, 0x01][..], &blocks].concat() } else { blocks.clone() };
        if client.write_all(&chunked(&data)).await.is_err() {
            break;
        }
    }
    let answer = until_closed(client).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    s.shutdown().await;
}

/// `max_body_bytes_in_flight`: while one client holds most of it with a body it is still
/// sending, a body that would pass it is refused, plain or compressed (its decompressed bytes
/// count), 503 on REST and UNAVAILABLE on gRPC, naming the setting; once the first body is read
/// the bytes are given back, and it and the others are served.
#[tokio::test]
async fn bodies_past_the_bytes_in_flight_wait_for_others_to_be_read() {
    use sluice_proto::inference as pb;
    let s = serve("", ", max_body_bytes: 1048576, max_body_bytes_in_flight: 1048576").await;
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("\nsluice_request_bodies_refused_total "), "at 0 from the start: {metrics}");
    // Valid requests padded with spaces: 900 kB (all but its last kilobyte sent), and 200 kB.
    let padded = |pad: usize| {
        let mut body = iris_body();
        body.splice(1..1, std::iter::repeat_n(b' ', pad));
        body
    };
    let big = padded(900_000);
    let head = format!(
        "POST /v2/models/iris/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    let mut holder = connect(s.http_addr(), head.as_bytes()).await;
    holder.write_all(&big[..big.len() - 1024]).await.unwrap();
    let small = padded(200_000);
    let infer = url(&s, "/v2/models/iris/infer");
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>, encoding: Option<&str>| {
        let mut r = client.post(&infer).body(body);
        if let Some(encoding) = encoding {
            r = r.header("content-encoding", encoding);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    // Once the server has read the holder's bytes (else the holder could be the one refused).
    tokio::time::timeout(GUARD, async {
        while s.body_bytes_reading() < big.len() - 1024 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the holder's bytes are counted as the server reads them");
    let refused = post(small.clone(), None).await;
    assert_eq!(refused.0, 503, "{refused:?}");
    assert!(
        refused.1["error"].as_str().unwrap().contains("max_body_bytes_in_flight (1048576)"),
        "{refused:?}"
    );
    let zipped = gzip(&small);
    assert!(zipped.len() < 4096);
    let (status, error) = post(zipped.clone(), Some("gzip")).await;
    assert_eq!(status, 503, "the decompressed bytes count: {error}");
    let mut grpc = pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!(
        "http://{}",
        s.grpc_addr().unwrap()
    ))
    .await
    .unwrap();
    let message = pb::ModelInferRequest {
        model_name: "iris".into(),
        raw_input_contents: vec![bytes::Bytes::from(vec![0; 200_000])],
        ..Default::default()
    };
    let e = grpc.model_infer(message.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("max_body_bytes_in_flight"), "{e:?}");
    // Seen at `/metrics` (the process's budgets: other tests' servers may share it).
    let metrics = reqwest::get(url(&s, "/metrics")).await.unwrap().text().await.unwrap();
    let sample = |name: &str| {
        let line =
            metrics.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {metrics}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    assert!(sample("sluice_request_body_bytes_reading ") >= (big.len() - 1024) as f64);
    assert!(sample("sluice_request_bodies_refused_total ") >= 3.0);

    holder.write_all(&big[big.len() - 1024..]).await.unwrap();
    let (status, _, answer) = response(&mut holder).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(post(small, None).await.0, 200);
    assert_eq!(post(zipped, Some("gzip")).await.0, 200);
    // A plain body from a client that takes compressed answers is counted once (it goes
    // through decompression unchanged): 600 kB of a 1 MiB budget.
    let r = client.post(&infer).header("accept-encoding", "gzip").body(padded(600_000)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Read whole now: refused for what it holds, not for the bytes in flight.
    let e = grpc.model_infer(message).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(s.body_bytes_reading(), 0, "every body's bytes given back");
    s.shutdown().await;
}

/// `idle_timeout_s`: a connection on which no request starts for that long is closed (here
/// well before `header_read_timeout_s`, which would close an idle HTTP/1.1 connection too), while
/// one that keeps sending stays open across many periods.
#[tokio::test]
async fn an_idle_connection_is_closed_and_a_busy_one_kept() {
    let s = serve("", ", header_read_timeout_s: 600, idle_timeout_s: 0.3").await;
    let live = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut busy = connect(s.http_addr(), b"").await;
    for _ in 0..12 {
        busy.write_all(live).await.unwrap();
        assert_eq!(response(&mut busy).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut idle = connect(s.http_addr(), live).await;
    assert_eq!(response(&mut idle).await.0, 200);
    // Closed by the idle timeout: the guard (60 s) is far below the header timeout (600 s).
    assert_eq!(until_closed(idle).await, "");
    s.shutdown().await;
}

/// A client that sends requests and stops reading the answers is cut off once the server's
/// writes have waited `write_timeout_s` (it held its connection, and the answers' memory,
/// until shutdown).
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_the_write_timeout() {
    let s = serve("", ", write_timeout_s: 0.5").await;
    let size = reqwest::get(format!("http://{}/openapi.json", s.http_addr()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let (mut rd, mut wr) = socket.connect(s.http_addr()).await.unwrap().into_split();
    // More answers than the kernel's buffers hold (a few MB), asked for on one connection.
    let n = 2000;
    let writer = tokio::spawn(async move {
        for _ in 0..n {
            if wr.write_all(b"GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n").await.is_err() {
                break;
            }
        }
        wr
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // What the server sent before it gave up, then the end (not all the answers, then a
    // connection still open).
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    let read = tokio::time::timeout(GUARD, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => total += k,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was still open after {total} bytes");
    assert!(total < n * size / 2, "{total} bytes of {} came", n * size);
    drop(writer.await.unwrap());
    // The server serves others as before.
    let r = reqwest::get(format!("http://{}/v2/health/live", s.http_addr())).await.unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

/// A connection that has sent no request yet when shutdown starts is ended gracefully: an
/// HTTP/2 client gets GOAWAY (so it knows that nothing it sent ran, and retries elsewhere)
/// rather than a connection closed under it. (It did before this test was written: the
/// connection's HTTP task sees the shutdown first and sends it.)
#[tokio::test]
async fn a_connection_without_a_request_at_shutdown_gets_goaway() {
    let s = serve("graceful_shutdown_timeout_s: 5", "").await;
    let tcp = TcpStream::connect(s.http_addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let ended = tokio::spawn(conn);
    // The server has the connection (its preface answered), and no request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(GUARD, s.shutdown()).await.expect("shutdown ends");
    let result = tokio::time::timeout(GUARD, ended).await.expect("the connection ends").unwrap();
    assert!(result.is_ok(), "{result:?}");
    let e = send.ready().await.expect_err("no more requests on it");
    assert!(e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR), "{e:?}");
}

/// A gRPC call that takes one request message and is sent two is refused INVALID_ARGUMENT at
/// the second: tonic read what followed the first and dropped it, each message counted against
/// `max_body_bytes_in_flight` until the body ended, past `max_body_bytes` in all.
#[tokio::test]
async fn a_unary_grpc_call_with_a_second_message_is_refused() {
    let s = serve("", "").await;
    let tcp = TcpStream::connect(s.grpc_addr().unwrap()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let request = grpc_call("ModelInfer");
    let (answer, mut body) = send.ready().await.unwrap().send_request(request, false).unwrap();
    // ModelInferRequest { model_name: "iris" } (field 1, length-delimited), twice.
    let message = [0u8, 0, 0, 0, 6, 0x0a, 4, b'i', b'r', b'i', b's'];
    body.send_data(bytes::Bytes::from([message, message].concat()), true).unwrap();
    let answer = tokio::time::timeout(GUARD, answer).await.expect("an answer").unwrap();
    let (parts, mut answer) = answer.into_parts();
    let trailers = match parts.headers.get("grpc-status") {
        Some(_) => parts.headers,
        None => tokio::time::timeout(GUARD, answer.trailers()).await.unwrap().unwrap().expect("trailers"),
    };
    assert_eq!(trailers["grpc-status"], "3", "INVALID_ARGUMENT: {trailers:?}");
    let message = trailers["grpc-message"].to_str().unwrap();
    assert!(message.contains("second%20request%20message"), "{message}");
    s.shutdown().await;
}

/// A `ModelStreamInfer` client that keeps its HTTP/2 window shut (so the server cannot send
/// the answer to its first request) and sends half of a second request: that half is given
/// back to `max_body_bytes_in_flight` once the stream, woken by the half's read timeout, has
/// waited `write_timeout_s` for hyper to poll it again. hyper
/// stops polling an answer with no room in the window, and the requests are read only from
/// those polls: the half stayed counted, and its timer unpolled, until the server shut down
/// (a few such clients held the whole budget).
#[tokio::test]
async fn a_stream_whose_client_takes_no_answers_gives_its_body_bytes_back() {
    let s = serve("", ", body_read_timeout_s: 1, write_timeout_s: 1").await;
    let tcp = TcpStream::connect(s.grpc_addr().unwrap()).await.unwrap();
    let (send, conn) = h2::client::Builder::new().initial_window_size(0).handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let request = grpc_call("ModelStreamInfer");
    let (_answer, mut body) = send.ready().await.unwrap().send_request(request, false).unwrap();
    // ModelInferRequest { model_name: "none" }: an unknown model, answered at once (in a DATA
    // frame the window has no room for).
    let first = [0u8, 0, 0, 0, 6, 0x0a, 4, b'n', b'o', b'n', b'e'];
    // A second request announcing 1,000 bytes, 500 of them sent.
    let half = [&[0u8, 0, 0, 0x03, 0xe8][..], &[0x0a; 500]].concat();
    body.send_data(bytes::Bytes::from([&first[..], &half].concat()), false).unwrap();
    tokio::time::timeout(GUARD, async {
        while s.body_bytes_reading() < 500 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the half is read and counted");
    tokio::time::timeout(Duration::from_secs(20), async {
        while s.body_bytes_reading() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("given back once the stream waited write_timeout_s");
    conn.abort();
    s.shutdown().await;
}

/// The head of a gRPC call of the inference service's `method`, for a raw HTTP/2 client.
fn grpc_call(method: &str) -> axum::http::Request<()> {
    axum::http::Request::post(format!("/inference.GRPCInferenceService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}
