//! One client per run, shared by every worker: a keep-alive HTTP/1 connection pool for REST,
//! one HTTP/2 connection for gRPC ([`crate::grpc`]). Failures are classified by kind for the
//! report. A client made [`Client::liveness`] sends the protocol's liveness call instead of
//! inference (REST `GET /v2/health/live`, gRPC `ServerLive`) over the same connections: the
//! floor of the server's own path for the same tool and concurrency.

use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde::Deserialize;
use sluice_proto::inference as pb;
use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::transport::Channel;

use crate::codec::{self, Output, Prepared};
use crate::grpc::{self, GrpcConn, Rpc};
use crate::inputs::InputSpec;

/// The wire form of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "rest-json")]
    RestJson,
    #[serde(rename = "rest-binary")]
    RestBinary,
    #[serde(rename = "grpc")]
    Grpc,
    /// Triton's `ModelStreamInfer`: a stream per closed-loop worker, one request in flight on
    /// each.
    #[serde(rename = "grpc-stream")]
    GrpcStream,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rest-json" | "json" => Ok(Self::RestJson),
            "rest-binary" | "binary" => Ok(Self::RestBinary),
            "grpc" => Ok(Self::Grpc),
            "grpc-stream" => Ok(Self::GrpcStream),
            other => Err(format!("unknown protocol `{other}` (rest-json, rest-binary, grpc, grpc-stream)")),
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RestJson => "rest-json",
            Self::RestBinary => "rest-binary",
            Self::Grpc => "grpc",
            Self::GrpcStream => "grpc-stream",
        })
    }
}

/// Why a request failed.
pub type ErrorKind = String;

pub enum Client {
    Rest {
        http: Box<HttpClient<HttpConnector, Full<Bytes>>>,
        target: String,
        path: String,
        call: RestCall,
        /// Closed-loop workers' connections between steps, so a measured step reuses those
        /// its warm-up opened (a new connection's first request also waits for the server to
        /// accept it: milliseconds at 64 connections).
        idle: Arc<std::sync::Mutex<Vec<SendRequest<Full<Bytes>>>>>,
    },
    Grpc {
        conn: GrpcConn,
        live: bool,
    },
    /// `ModelStreamInfer` on the shared connection: closed loop only (each worker's stream).
    GrpcStream {
        conn: GrpcConn,
    },
}

/// What a REST client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestCall {
    Json,
    Binary,
    /// `GET /v2/health/live`, no body.
    Live,
}

/// What one closed-loop worker sends through: its own keep-alive HTTP/1 connection (as wrk
/// does: no pool between the worker and the socket), or the shared gRPC connection.
pub struct Worker<'a> {
    client: &'a Client,
    conn: Option<SendRequest<Full<Bytes>>>,
    /// Its `ModelStreamInfer` stream (`grpc-stream`).
    stream: Option<grpc::GrpcStream>,
}

impl Drop for Worker<'_> {
    /// Leaves an open connection to the next step's workers.
    fn drop(&mut self) {
        if let (Client::Rest { idle, .. }, Some(conn)) = (self.client, self.conn.take())
            && !conn.is_closed()
            && let Ok(mut idle) = idle.lock()
        {
            idle.push(conn);
        }
    }
}

impl Worker<'_> {
    /// Drops the worker's connection (or stream); its next request opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
        self.stream = None;
    }

    /// Takes a connection an earlier step's worker left (REST), else opens one now, so that
    /// its first measured request does not include connecting; a failure, or no connection
    /// within `within` (the request timeout, or what is left of the step), is left for that
    /// request to meet and count (a server that took no connection held the step in the
    /// kernel's connect retries, about two minutes, and counted nothing).
    pub async fn connect(&mut self, within: Option<std::time::Duration>) {
        if let Client::Rest { target, idle, .. } = self.client
            && self.conn.is_none()
        {
            let kept = std::iter::from_fn(|| idle.lock().ok()?.pop()).find(|c| !c.is_closed());
            self.conn = match (kept, within) {
                (Some(c), _) => Some(c),
                (None, None) => connect_http1(target).await.ok(),
                (None, Some(d)) => {
                    tokio::time::timeout(d, connect_http1(target)).await.ok().and_then(Result::ok)
                }
            };
        }
    }

    /// Sends one request on the worker's connection and receives its answer, undecoded.
    pub async fn answer(&mut self, p: &Prepared) -> Result<Answer, ErrorKind> {
        if let Client::GrpcStream { conn } = self.client {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                none => none.insert(conn.open_stream().await?),
            };
            let answer = stream.call(p.grpc.clone()).await;
            // A failed request leaves the stream open (its answer carried the error); anything
            // else ended it.
            if answer.as_ref().is_err_and(|e| !e.starts_with("stream error")) {
                self.stream = None;
            }
            return answer.map(Answer::Grpc);
        }
        let Client::Rest { target, path, call, .. } = self.client else {
            return self.client.answer(p).await;
        };
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(connect_http1(target).await?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        conn.ready().await.map_err(|e| format!("transport: {}", root_cause(&e)))?;
        let req = rest_request(path, target, *call, p)?;
        let resp = conn.send_request(req).await.map_err(|e| format!("transport: {}", root_cause(&e)))?;
        rest_response(resp).await
    }
}

async fn connect_http1(target: &str) -> Result<SendRequest<Full<Bytes>>, ErrorKind> {
    let stream = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("transport: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("transport: {}", root_cause(&e)))?;
    tokio::spawn(conn);
    Ok(send)
}

fn rest_request(
    path: &str,
    target: &str,
    call: RestCall,
    p: &Prepared,
) -> Result<Request<Full<Bytes>>, ErrorKind> {
    let req = match call {
        RestCall::Live => {
            Request::get(path).header(hyper::header::HOST, target).body(Full::new(Bytes::new()))
        }
        RestCall::Json => Request::post(path)
            .header(hyper::header::HOST, target)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(p.rest_json.clone())),
        // The binary extension's body: a JSON header, then the tensors' bytes.
        RestCall::Binary => Request::post(path)
            .header(hyper::header::HOST, target)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header("Inference-Header-Content-Length", p.rest_binary_header)
            .body(Full::new(p.rest_binary.clone())),
    };
    req.map_err(|e| format!("request: {e}"))
}

async fn rest_response(resp: hyper::Response<hyper::body::Incoming>) -> Result<Answer, ErrorKind> {
    let status = resp.status();
    let header_len = resp
        .headers()
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let body = resp.into_body().collect().await.map_err(|e| format!("transport: {e}"))?.to_bytes();
    if !status.is_success() {
        return Err(format!("http {}", status.as_u16()));
    }
    Ok(Answer::Rest { body, header_len })
}

/// A successful answer as received, in full and not yet decoded: the caller takes its latency
/// first, so that decoding and comparing it (`--check`) are the load tester's time, not the
/// server's.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A REST body, and its binary extension's JSON header length when it has one.
    Rest { body: Bytes, header_len: Option<usize> },
    /// A gRPC `ModelInferResponse` message, unframed.
    Grpc(Bytes),
    /// A gRPC `ServerLive` answer (checked live on receipt): nothing to decode.
    Live,
}

impl Answer {
    /// The answer's outputs, for comparing with the expected ones.
    pub fn outputs(&self) -> Result<Vec<Output>, ErrorKind> {
        let outputs = match self {
            Answer::Rest { body, header_len } => codec::decode_rest(body, *header_len),
            Answer::Grpc(message) => pb::ModelInferResponse::decode(message.clone())
                .map_err(anyhow::Error::from)
                .and_then(|r| codec::decode_grpc(&r)),
            Answer::Live => Ok(Vec::new()),
        };
        outputs.map_err(|e| format!("bad response: {e}"))
    }
}

impl Client {
    /// A client for `model` (`version` may be empty) at `host:port`.
    pub async fn connect(protocol: Protocol, target: &str, model: &str, version: &str) -> Result<Self> {
        let model_path = match version {
            "" => format!("/v2/models/{model}"),
            v => format!("/v2/models/{model}/versions/{v}"),
        };
        Ok(match protocol {
            Protocol::RestJson | Protocol::RestBinary => {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                let http = Box::new(
                    HttpClient::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector),
                );
                Client::Rest {
                    http,
                    target: target.to_string(),
                    path: format!("{model_path}/infer"),
                    call: if protocol == Protocol::RestBinary { RestCall::Binary } else { RestCall::Json },
                    idle: Arc::default(),
                }
            }
            Protocol::Grpc | Protocol::GrpcStream => {
                let conn = GrpcConn::connect(target)
                    .await
                    .map_err(|e| anyhow::anyhow!("connecting to {target}: {e}"))?;
                if protocol == Protocol::GrpcStream {
                    Client::GrpcStream { conn }
                } else {
                    Client::Grpc { conn, live: false }
                }
            }
        })
    }

    /// The same client sending the protocol's liveness call instead of inference (REST
    /// `GET /v2/health/live`, gRPC `ServerLive`); a failed or false answer is an error.
    pub fn liveness(self) -> Self {
        match self {
            Client::Rest { http, target, idle, .. } => {
                Client::Rest { http, target, path: "/v2/health/live".into(), call: RestCall::Live, idle }
            }
            Client::Grpc { conn, .. } | Client::GrpcStream { conn } => Client::Grpc { conn, live: true },
        }
    }

    /// A worker with its own connection (REST) for closed-loop sending.
    pub fn worker(&self) -> Worker<'_> {
        Worker { client: self, conn: None, stream: None }
    }

    /// Sends one request through the shared pool or channel (open loop) and receives its
    /// answer, undecoded.
    pub async fn answer(&self, p: &Prepared) -> Result<Answer, ErrorKind> {
        match self {
            Client::Rest { http, target, path, call, .. } => {
                let mut req = rest_request(path, target, *call, p)?;
                *req.uri_mut() =
                    format!("http://{target}{path}").parse().map_err(|e| format!("request: {e}"))?;
                let resp = http.request(req).await.map_err(|e| format!("transport: {}", root_cause(&e)))?;
                rest_response(resp).await
            }
            Client::Grpc { conn, live: true } => {
                let message = conn.unary(Rpc::ServerLive, grpc::SERVER_LIVE_REQUEST).await?;
                match pb::ServerLiveResponse::decode(message) {
                    Ok(r) if r.live => Ok(Answer::Live),
                    Ok(_) => Err("not live".into()),
                    Err(e) => Err(format!("bad response: {e}")),
                }
            }
            Client::Grpc { conn, live: false } => {
                conn.unary(Rpc::ModelInfer, p.grpc.clone()).await.map(Answer::Grpc)
            }
            Client::GrpcStream { .. } => Err("grpc-stream sends from closed-loop workers only".into()),
        }
    }

    /// [`Client::answer`], then with `decode` its outputs.
    pub async fn send(&self, p: &Prepared, decode: bool) -> Result<Option<Vec<Output>>, ErrorKind> {
        let answer = self.answer(p).await?;
        if decode { answer.outputs().map(Some) } else { Ok(None) }
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Reads a model's inputs from its metadata (`GET /v2/models/{m}` over REST, or gRPC
/// `ModelMetadata`).
pub async fn model_inputs(
    protocol: Protocol,
    target: &str,
    model: &str,
    version: &str,
) -> Result<Vec<InputSpec>> {
    if matches!(protocol, Protocol::Grpc | Protocol::GrpcStream) {
        let channel = Channel::from_shared(format!("http://{target}"))?.connect().await?;
        let mut c = GrpcInferenceServiceClient::new(channel);
        let m = c
            .model_metadata(pb::ModelMetadataRequest { name: model.into(), version: version.into() })
            .await
            .map_err(|s| anyhow::anyhow!("model metadata: {}", s.message()))?
            .into_inner();
        return Ok(m
            .inputs
            .into_iter()
            .map(|t| InputSpec { name: t.name, datatype: t.datatype, shape: t.shape })
            .collect());
    }
    #[derive(Deserialize)]
    struct Meta {
        inputs: Vec<InputSpec>,
    }
    let path = match version {
        "" => format!("/v2/models/{model}"),
        v => format!("/v2/models/{model}/versions/{v}"),
    };
    let http: HttpClient<HttpConnector, Full<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: hyper::Uri = format!("http://{target}{path}").parse()?;
    let resp = http.get(uri).await.with_context(|| format!("GET {path}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice::<Meta>(&body)?.inputs)
}
