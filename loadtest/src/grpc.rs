//! The gRPC side of the load tester: unary calls on one HTTP/2 connection shared by every
//! worker (calls are multiplexed on it, as a gRPC client's channel does), spoken with `h2`
//! directly.
//!
//! A call goes from the worker to the connection's task and back, as an HTTP/1 call does in the
//! REST client, and its request message is encoded once per case (as REST bodies are). tonic's
//! `Channel` puts a buffer task between the caller and the connection, and hyper's HTTP/2 client
//! spawns a task per call; both are the load tester's own time, and they showed in every gRPC
//! latency it reported (docs/benchmarks.md, "The load tester's gRPC client").
//!
//! A connection that breaks (or that the server closes with GOAWAY) is replaced on the next
//! call; calls in flight on it fail and are counted.

use std::sync::Mutex;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use hyper::{Request, Uri};

use crate::client::ErrorKind;

/// The framing of one gRPC message: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// `ServerLiveRequest {}` framed: an empty message.
pub const SERVER_LIVE_REQUEST: Bytes = Bytes::from_static(&[0; PREFIX]);

/// The calls the load tester makes.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    ModelInfer,
    ServerLive,
}

impl Rpc {
    fn path(self) -> &'static str {
        match self {
            Rpc::ModelInfer => "/inference.GRPCInferenceService/ModelInfer",
            Rpc::ServerLive => "/inference.GRPCInferenceService/ServerLive",
        }
    }
}

/// `message` framed as one uncompressed gRPC message.
pub fn frame(message: &impl prost::Message) -> Result<Bytes, ErrorKind> {
    let len = message.encoded_len();
    let prefix =
        u32::try_from(len).map_err(|_| format!("a {len}-byte message is over gRPC's 4 GiB frame"))?;
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    message.encode(&mut buf).map_err(|e| format!("encoding: {e}"))?;
    Ok(buf.freeze())
}

/// One HTTP/2 connection to `target` (host:port), opened on first use and again after it breaks.
pub struct GrpcConn {
    target: String,
    /// Each [`Rpc`]'s URI, built once.
    model_infer: Uri,
    server_live: Uri,
    send: Mutex<Option<SendRequest<Bytes>>>,
}

impl GrpcConn {
    /// Connects to `target` now, so that an unreachable server is reported before a run starts.
    pub async fn connect(target: &str) -> Result<Self, ErrorKind> {
        let uri = |rpc: Rpc| {
            Uri::builder()
                .scheme("http")
                .authority(target)
                .path_and_query(rpc.path())
                .build()
                .map_err(|e| format!("target `{target}`: {e}"))
        };
        let (model_infer, server_live) = (uri(Rpc::ModelInfer)?, uri(Rpc::ServerLive)?);
        let send = handshake(target).await?;
        Ok(Self { target: target.to_string(), model_infer, server_live, send: Mutex::new(Some(send)) })
    }

    /// The connection's handle, after opening a new connection if the last one broke.
    async fn handle(&self) -> Result<SendRequest<Bytes>, ErrorKind> {
        if let Some(send) = self.send.lock().expect("not poisoned").clone() {
            return Ok(send);
        }
        let send = handshake(&self.target).await?;
        // Workers that found no connection at the same time race here; the first one's stays.
        Ok(self.send.lock().expect("not poisoned").get_or_insert(send).clone())
    }

    /// Forgets the connection (a call on it failed at the transport), so the next call opens one.
    fn broken(&self) {
        self.send.lock().expect("not poisoned").take();
    }

    /// A unary call: `request` is a framed message (see [`frame`]). Returns the response
    /// message's bytes, or the failure: `transport: …`, `grpc <Code>` for a non-OK status, or
    /// `bad response: …`.
    pub async fn unary(&self, rpc: Rpc, request: Bytes) -> Result<Bytes, ErrorKind> {
        let send = self.handle().await?;
        let uri = match rpc {
            Rpc::ModelInfer => &self.model_infer,
            Rpc::ServerLive => &self.server_live,
        };
        let result = call(send, uri.clone(), request).await;
        if let Err(Failure::Transport(_)) = &result {
            self.broken();
        }
        result.map_err(|f| match f {
            Failure::Transport(e) => format!("transport: {e}"),
            Failure::Status(s) => s,
        })
    }
}

enum Failure {
    /// The connection failed (or was closed): it is replaced.
    Transport(String),
    /// The server answered, with an error status or a response that is not gRPC.
    Status(String),
}

/// The receive windows a gRPC client opens with: hyper's HTTP/2 client defaults, which tonic's
/// `Channel` uses. h2's own are HTTP/2's initial 64 KiB, shared by every call on the
/// connection: answers larger than that, or many at once, waited for window updates a round
/// trip each, a stall of the load tester's making.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

async fn handshake(target: &str) -> Result<SendRequest<Bytes>, ErrorKind> {
    let tcp = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("transport: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(tcp)
        .await
        .map_err(|e| format!("transport: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn call(send: SendRequest<Bytes>, uri: Uri, body: Bytes) -> Result<Bytes, Failure> {
    let transport = |e: h2::Error| Failure::Transport(e.to_string());
    let mut send = send.ready().await.map_err(transport)?;
    let req = Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| Failure::Status(format!("request: {e}")))?;
    let (response, mut stream) = send.send_request(req, false).map_err(transport)?;
    // Sent as the peer's flow-control window allows; h2 queues what does not fit yet.
    stream.send_data(body, true).map_err(transport)?;
    let (head, mut body) = response.await.map_err(stream_failure)?.into_parts();
    if head.status != hyper::StatusCode::OK {
        return Err(Failure::Status(format!("http {}", head.status.as_u16())));
    }
    let mut message = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(stream_failure)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(stream_failure)?;
    // A call that fails before any message may answer with its status in the headers alone.
    let status = trailers.as_ref().and_then(|t| t.get("grpc-status")).or(head.headers.get("grpc-status"));
    match status.map(|s| s.as_bytes()) {
        Some(b"0") => unframe(message.freeze()).map_err(Failure::Status),
        Some(code) => Err(Failure::Status(format!("grpc {:?}", tonic::Code::from_bytes(code)))),
        None => Err(Failure::Status("bad response: no grpc-status".into())),
    }
}

/// A stream-level failure (reset by the server, e.g. REFUSED_STREAM) leaves the connection
/// usable; anything else is the connection's.
fn stream_failure(e: h2::Error) -> Failure {
    if e.is_reset() && !e.is_go_away() {
        Failure::Status(format!("transport: {e}"))
    } else {
        Failure::Transport(e.to_string())
    }
}

/// The one message of a unary response.
pub(crate) fn unframe(mut data: Bytes) -> Result<Bytes, ErrorKind> {
    if data.len() < PREFIX {
        return Err(format!("bad response: {} bytes, not a gRPC message", data.len()));
    }
    let compressed = data.get_u8();
    let len = data.get_u32() as usize;
    if compressed != 0 {
        return Err("bad response: compressed, though no compression was offered".into());
    }
    if data.len() != len {
        return Err(format!("bad response: message of {len} bytes framed with {}", data.len()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_proto::inference as pb;

    #[test]
    fn a_framed_message_unframes_to_its_encoding() {
        let m = pb::ServerLiveResponse { live: true };
        let framed = frame(&m).unwrap();
        assert_eq!(&framed[..PREFIX], &[0, 0, 0, 0, 2]);
        let back = unframe(framed).unwrap();
        assert_eq!(<pb::ServerLiveResponse as prost::Message>::decode(back).unwrap(), m);
        assert_eq!(frame(&pb::ServerLiveRequest {}).unwrap(), SERVER_LIVE_REQUEST);
    }

    #[test]
    fn malformed_frames_are_named() {
        assert!(unframe(Bytes::from_static(&[0, 0])).unwrap_err().contains("not a gRPC message"));
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).unwrap_err().contains("compressed"));
        assert!(unframe(Bytes::from_static(&[0, 0, 0, 0, 3, 1])).unwrap_err().contains("framed with 1"));
    }
}
