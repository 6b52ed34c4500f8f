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
//!
//! `grpc-stream` sends over Triton's `ModelStreamInfer` instead: each closed-loop worker keeps
//! one stream on the shared connection and has one request in flight on it (as
//! `perf_analyzer --streaming` does per concurrency slot), so that streams and unary calls can
//! be compared at the same concurrency.

use std::sync::Mutex;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use hyper::{Request, Uri};

use sluice_proto::inference as pb;

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
    ModelStreamInfer,
}

impl Rpc {
    fn path(self) -> &'static str {
        match self {
            Rpc::ModelInfer => "/inference.GRPCInferenceService/ModelInfer",
            Rpc::ServerLive => "/inference.GRPCInferenceService/ServerLive",
            Rpc::ModelStreamInfer => "/inference.GRPCInferenceService/ModelStreamInfer",
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
    model_stream_infer: Uri,
    /// The connection's handle and its number (each new connection's is one more).
    send: Mutex<(u64, Option<SendRequest<Bytes>>)>,
    /// Held while a new connection is opened: the workers that find none wait for one
    /// handshake, rather than each opening its own.
    opening: tokio::sync::Mutex<()>,
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
        let model_stream_infer = uri(Rpc::ModelStreamInfer)?;
        let send = handshake(target).await?;
        Ok(Self {
            target: target.to_string(),
            model_infer,
            server_live,
            model_stream_infer,
            send: Mutex::new((0, Some(send))),
            opening: tokio::sync::Mutex::new(()),
        })
    }

    /// The connection's handle and number, after opening a new connection if the last one
    /// broke.
    async fn handle(&self) -> Result<(u64, SendRequest<Bytes>), ErrorKind> {
        if let Some(found) = self.current() {
            return Ok(found);
        }
        let _one_at_a_time = self.opening.lock().await;
        if let Some(found) = self.current() {
            return Ok(found);
        }
        let send = handshake(&self.target).await?;
        let mut held = self.send.lock().expect("not poisoned");
        held.0 += 1;
        held.1 = Some(send.clone());
        Ok((held.0, send))
    }

    fn current(&self) -> Option<(u64, SendRequest<Bytes>)> {
        let held = self.send.lock().expect("not poisoned");
        held.1.clone().map(|send| (held.0, send))
    }

    /// Forgets connection `number` (a call on it failed at the transport), so the next call
    /// opens one; a newer connection, opened since that call began, stays.
    fn broken(&self, number: u64) {
        let mut held = self.send.lock().expect("not poisoned");
        if held.0 == number {
            held.1 = None;
        }
    }

    /// A unary call: `request` is a framed message (see [`frame`]). Returns the response
    /// message's bytes, or the failure: `transport: …`, `grpc <Code>` for a non-OK status, or
    /// `bad response: …`.
    pub async fn unary(&self, rpc: Rpc, request: Bytes) -> Result<Bytes, ErrorKind> {
        let (number, send) = self.handle().await?;
        let uri = match rpc {
            Rpc::ModelInfer => &self.model_infer,
            Rpc::ServerLive => &self.server_live,
            Rpc::ModelStreamInfer => return Err("ModelStreamInfer is a stream: open_stream".into()),
        };
        let result = call(send, uri.clone(), request).await;
        if let Err(Failure::Transport(_)) = &result {
            self.broken(number);
        }
        result.map_err(|f| match f {
            Failure::Transport(e) => format!("transport: {e}"),
            Failure::Status(s) => s,
        })
    }

    /// Opens a `ModelStreamInfer` stream on the connection (a new connection if the last one
    /// broke).
    pub async fn open_stream(&self) -> Result<GrpcStream, ErrorKind> {
        let (number, send) = self.handle().await?;
        let opened = async {
            let mut send = send.ready().await.map_err(|e| Failure::Transport(e.to_string()))?;
            let req = grpc_request(self.model_stream_infer.clone())?;
            let (response, stream) =
                send.send_request(req, false).map_err(|e| Failure::Transport(e.to_string()))?;
            // The answer's headers are awaited with the first answer: gRPC servers other than
            // tonic's (grpc-go, Triton's C++) send them only then.
            Ok(GrpcStream { send: stream, answers: Answers::Coming(response), buf: BytesMut::new() })
        }
        .await;
        if let Err(Failure::Transport(_)) = &opened {
            self.broken(number);
        }
        opened.map_err(|f| match f {
            Failure::Transport(e) => format!("transport: {e}"),
            Failure::Status(s) => s,
        })
    }
}

/// One `ModelStreamInfer` stream with at most one request in flight: each answer is the one to
/// the request sent before it.
pub struct GrpcStream {
    send: h2::SendStream<Bytes>,
    answers: Answers,
    /// What has come of the next answer.
    buf: BytesMut,
}

/// The answering side of a stream: its headers still to come, or its body.
enum Answers {
    Coming(h2::client::ResponseFuture),
    Open(h2::RecvStream),
}

impl GrpcStream {
    /// Sends one framed `ModelInferRequest` and returns its answer's `ModelInferResponse`
    /// message (unframed); an answer carrying an `error_message` is a `stream error: …`. Any
    /// other failure leaves the stream unusable (the caller opens another).
    pub async fn call(&mut self, request: Bytes) -> Result<Bytes, ErrorKind> {
        self.send.send_data(request, false).map_err(|e| format!("transport: {e}"))?;
        loop {
            if let Some(message) = take_message(&mut self.buf)? {
                return stream_answer(message);
            }
            let recv = match &mut self.answers {
                Answers::Open(recv) => recv,
                Answers::Coming(response) => {
                    let head = response.await.map_err(|e| format!("transport: {e}"))?;
                    if head.status() != hyper::StatusCode::OK {
                        return Err(format!("http {}", head.status().as_u16()));
                    }
                    // A call refused at once answers its status in the headers alone.
                    if let Some(code) = head.headers().get("grpc-status").filter(|c| c.as_bytes() != b"0") {
                        return Err(format!("grpc {:?}", tonic::Code::from_bytes(code.as_bytes())));
                    }
                    self.answers = Answers::Open(head.into_body());
                    continue;
                }
            };
            match recv.data().await {
                Some(Ok(chunk)) => {
                    let _ = recv.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Err(format!("transport: {e}")),
                None => {
                    let trailers = recv.trailers().await.ok().flatten();
                    let code =
                        trailers.as_ref().and_then(|t| t.get("grpc-status")).map(|s| s.as_bytes().to_vec());
                    return Err(match code {
                        Some(code) => format!("grpc {:?}", tonic::Code::from_bytes(&code)),
                        None => "bad response: the stream ended without a status".into(),
                    });
                }
            }
        }
    }
}

/// The first whole message framed in `buf`, taken out of it.
fn take_message(buf: &mut BytesMut) -> Result<Option<Bytes>, ErrorKind> {
    if buf.len() < PREFIX {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err("bad response: compressed, though no compression was offered".into());
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < PREFIX + len {
        return Ok(None);
    }
    let mut message = buf.split_to(PREFIX + len).freeze();
    message.advance(PREFIX);
    Ok(Some(message))
}

/// A `ModelStreamInferResponse`'s `infer_response` message, or its `error_message` as the
/// failure. Read field by field (protobuf's wire format) rather than decoded whole: the
/// response's tensors are left for `--check` to decode, outside the latency. A message with
/// other fields (a newer protocol's) is decoded whole instead.
fn stream_answer(message: Bytes) -> Result<Bytes, ErrorKind> {
    let mut rest = message.clone();
    let mut response = None;
    while rest.has_remaining() {
        let key = prost::encoding::decode_varint(&mut rest).map_err(|e| format!("bad response: {e}"))?;
        if key & 7 != 2 || !matches!(key >> 3, 1 | 2) {
            return decoded_whole(message);
        }
        let len = prost::encoding::decode_varint(&mut rest).map_err(|e| format!("bad response: {e}"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= rest.len())
            .ok_or("bad response: a field longer than its message")?;
        let field = rest.split_to(len);
        match key >> 3 {
            1 if !field.is_empty() => {
                return Err(format!("stream error: {}", String::from_utf8_lossy(&field)));
            }
            1 => {}
            _ => response = Some(field),
        }
    }
    response.ok_or_else(|| "bad response: an answer with no response".into())
}

fn decoded_whole(message: Bytes) -> Result<Bytes, ErrorKind> {
    use prost::Message;
    let answer = pb::ModelStreamInferResponse::decode(message).map_err(|e| format!("bad response: {e}"))?;
    if !answer.error_message.is_empty() {
        return Err(format!("stream error: {}", answer.error_message));
    }
    let response = answer.infer_response.ok_or("bad response: an answer with no response")?;
    Ok(response.encode_to_vec().into())
}

fn grpc_request(uri: Uri) -> Result<Request<()>, Failure> {
    Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| Failure::Status(format!("request: {e}")))
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
    let req = grpc_request(uri)?;
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
    fn stream_answers_are_read_field_by_field() {
        use prost::Message;
        let response =
            pb::ModelInferResponse { model_name: "m".into(), id: "7".into(), ..Default::default() };
        let ok = pb::ModelStreamInferResponse {
            error_message: String::new(),
            infer_response: Some(response.clone()),
        };
        let mut buf = BytesMut::from(&frame(&ok).unwrap()[..]);
        buf.extend_from_slice(&[0, 0, 0]); // the start of the next answer
        let message = take_message(&mut buf).unwrap().unwrap();
        assert_eq!(buf.len(), 3, "the next answer's start is kept");
        assert_eq!(pb::ModelInferResponse::decode(stream_answer(message).unwrap()).unwrap(), response);
        let failed = pb::ModelStreamInferResponse {
            error_message: "bad shape".into(),
            infer_response: Some(response),
        };
        let message = unframe(frame(&failed).unwrap()).unwrap();
        assert_eq!(stream_answer(message).unwrap_err(), "stream error: bad shape");
        assert!(
            take_message(&mut BytesMut::from(&[0u8, 0, 0, 0, 9, 1][..])).unwrap().is_none(),
            "not whole yet"
        );
    }

    #[test]
    fn malformed_frames_are_named() {
        assert!(unframe(Bytes::from_static(&[0, 0])).unwrap_err().contains("not a gRPC message"));
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).unwrap_err().contains("compressed"));
        assert!(unframe(Bytes::from_static(&[0, 0, 0, 0, 3, 1])).unwrap_err().contains("framed with 1"));
    }
}
