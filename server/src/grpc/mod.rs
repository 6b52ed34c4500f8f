//! The Open Inference Protocol gRPC frontend (tonic): `inference.GRPCInferenceService` over the
//! same router and deployments as REST, plus `grpc.health.v1` (following readiness, see
//! [`health`]) and server reflection. Requests may be gzip or deflate compressed (answers are
//! not: gRPC clients advertise compression they accept by default, and it costs CPU on every
//! answer). RPCs not listed in proto/grpc_service.proto answer UNIMPLEMENTED.

pub mod codec;
pub mod health;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use sluice_controller::Controller;
use sluice_deployments::metrics::Protocol;
use sluice_deployments::{ErrorKind, Servable, TensorSpec};
use sluice_proto::inference as pb;
use sluice_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use sluice_router::Router as RouteTable;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::error::{grpc_control_status, grpc_status};
use crate::readiness::Readiness;

/// The service implementation.
pub struct InferenceService {
    routes: Arc<RouteTable>,
    controller: Arc<Controller>,
    readiness: Readiness,
    /// Who may load and unload repository models here.
    control: crate::auth::Control,
    /// `grpc_options.stream_max_in_flight`.
    stream_max_in_flight: usize,
    /// How long a stream's answer may wait for the client (`http_options.write_timeout_s`).
    stream_answer_wait: Duration,
    /// Turns true when the server shuts down (streams then stop reading requests).
    stop: tokio::sync::watch::Receiver<bool>,
    /// A `sluice replica` process: its answers to a multiplexed model's requests say which
    /// models it holds ([`sluice_deployments::HELD_MODELS_HEADER_BIN`]), for its controller.
    report_held_models: bool,
}

/// What a call's metadata says about its requests: a version pinned with
/// `x-sluice-version`, a multiplexed model's id.
#[derive(Default)]
pub(crate) struct CallHeaders {
    pinned: Option<String>,
    model_id: Option<String>,
}

impl CallHeaders {
    /// The call's headers, as text (UTF-8); one that is not is refused naming it (it was
    /// dropped: an unreadable version pin went through the traffic split).
    fn of(metadata: &tonic::metadata::MetadataMap) -> Result<Self, Status> {
        let unreadable = |key: &str| Status::invalid_argument(format!("metadata `{key}` is not UTF-8 text"));
        let header = |key: &'static str| -> Result<Option<String>, Status> {
            metadata
                .get(key)
                .map(|v| std::str::from_utf8(v.as_bytes()).map(str::to_string).map_err(|_| unreadable(key)))
                .transpose()
        };
        let model_id = match header(sluice_deployments::MULTIPLEX_HEADER)? {
            Some(id) => Some(id),
            None => metadata
                .get_bin(sluice_deployments::MULTIPLEX_HEADER_BIN)
                .map(|v| {
                    let bytes =
                        v.to_bytes().map_err(|_| unreadable(sluice_deployments::MULTIPLEX_HEADER_BIN))?;
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| unreadable(sluice_deployments::MULTIPLEX_HEADER_BIN))
                })
                .transpose()?,
        };
        Ok(Self { pinned: header(sluice_router::VERSION_HEADER)?, model_id })
    }
}

/// One inference request, `ModelInfer`'s or one of a stream's, counted from `started`.
async fn infer(
    routes: &RouteTable,
    headers: &CallHeaders,
    started: std::time::Instant,
    req: pb::ModelInferRequest,
) -> Result<pb::ModelInferResponse, Status> {
    infer_on(routes, &route(routes, headers, &req)?, headers, started, req).await
}

/// What serves `req`: its model at the version it names or its metadata pins.
fn route(
    routes: &RouteTable,
    headers: &CallHeaders,
    req: &pb::ModelInferRequest,
) -> Result<Servable, Status> {
    let choice =
        sluice_router::VersionChoice { exact: Some(&req.model_version), pinned: headers.pinned.as_deref() };
    routes.route(&req.model_name, choice).map_err(grpc_status)
}

/// [`infer`] on the servable [`route`] found.
async fn infer_on(
    routes: &RouteTable,
    d: &Servable,
    headers: &CallHeaders,
    started: std::time::Instant,
    mut req: pb::ModelInferRequest,
) -> Result<pb::ModelInferResponse, Status> {
    let (rerouted, handed_on);
    let mut counted = d.metrics().counted(Protocol::Grpc, started);
    let (model, version) = (std::mem::take(&mut req.model_name), std::mem::take(&mut req.model_version));
    let result = match codec::decode(req) {
        Ok(mut request) => {
            request.model_id = headers.model_id.clone();
            // Routed again if a swap took it out of the table while the request was decoded.
            let choice =
                sluice_router::VersionChoice { exact: Some(&version), pinned: headers.pinned.as_deref() };
            rerouted = routes.rerouted(d, &model, choice);
            if let Some(to) = &rerouted {
                counted = counted.moved(to.metrics());
            }
            let answer;
            (answer, handed_on) = routes.infer(rerouted.as_ref().unwrap_or(d), &model, choice, request).await;
            if let Some(to) = &handed_on {
                counted = counted.moved(to.metrics());
            }
            answer
        }
        Err(e) => Err(e),
    };
    counted.answered(result.as_ref().map(|_| ()).map_err(|e| e.kind));
    Ok(codec::encode(result.map_err(grpc_status)?))
}

impl InferenceService {
    /// Refuses a repository load or unload the port's [`crate::auth::Control`] does not allow
    /// (the token in metadata `authorization: Bearer <token>`).
    fn may_control<T>(&self, req: &Request<T>) -> Result<(), Status> {
        use crate::auth::{CONTROL_CLOSED, CONTROL_NEEDS_TOKEN, Refused};
        self.control.check(req.metadata().get("authorization").map(|v| v.as_bytes())).map_err(|r| match r {
            Refused::NeedsToken => Status::unauthenticated(CONTROL_NEEDS_TOKEN),
            Refused::Closed => Status::permission_denied(CONTROL_CLOSED),
        })
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> Reply<pb::ServerLiveResponse> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<pb::ServerReadyRequest>) -> Reply<pb::ServerReadyResponse> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.readiness.server_ready() }))
    }

    async fn model_ready(&self, req: Request<pb::ModelReadyRequest>) -> Reply<pb::ModelReadyResponse> {
        let req = req.into_inner();
        // A model or version the server does not know is not ready (Triton answers so too, and
        // tritonclient's `is_model_ready` then returns False instead of raising).
        let ready = match self.routes.resolve(&req.name, Some(&req.version)) {
            Ok(d) => d.is_ready(),
            Err(e) if e.kind == ErrorKind::NotFound => false,
            Err(e) => return Err(grpc_status(e)),
        };
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Reply<pb::ServerMetadataResponse> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: crate::SERVER_NAME.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: crate::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Reply<pb::ModelMetadataResponse> {
        let req = req.into_inner();
        let d = self.routes.resolve(&req.name, Some(&req.version)).map_err(grpc_status)?;
        let tensors = |specs: &[TensorSpec]| {
            specs
                .iter()
                .map(|s| pb::model_metadata_response::TensorMetadata {
                    name: s.name.clone(),
                    datatype: s.dtype.as_str().to_string(),
                    shape: s.shape.clone(),
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            // The name asked for: a multiplexed model's id, not its deployment's (perf_analyzer
            // sends its requests to the name it reads here).
            name: req.name.clone(),
            versions: self.routes.versions(d.name()),
            platform: d.metadata().platform.clone(),
            inputs: tensors(&d.metadata().inputs),
            outputs: tensors(&d.metadata().outputs),
            properties: Default::default(),
        }))
    }

    async fn model_infer(&self, req: Request<pb::ModelInferRequest>) -> Reply<pb::ModelInferResponse> {
        let started = std::time::Instant::now();
        let headers = CallHeaders::of(req.metadata())?;
        let req = req.into_inner();
        let d = route(&self.routes, &headers, &req)?;
        let answer = infer_on(&self.routes, &d, &headers, started, req).await;
        // Said with a failure too: a model that failed to load, or panicked, is not held.
        let report = self.report_held_models && headers.model_id.is_some();
        let held = report
            .then(|| sluice_deployments::HeldModels::read(|| d.held_models()))
            .map(|held| {
                let mut ids = Vec::new();
                for id in held.ids {
                    ids.extend_from_slice(id.as_bytes());
                    ids.push(0);
                }
                (held.seq, ids)
            })
            .filter(|(_, ids)| ids.len() <= sluice_deployments::HELD_MODELS_MAX_BYTES);
        let tell = |metadata: &mut tonic::metadata::MetadataMap| {
            if let Some((seq, ids)) = &held {
                metadata.insert_bin(
                    sluice_deployments::HELD_MODELS_HEADER_BIN,
                    tonic::metadata::MetadataValue::from_bytes(ids),
                );
                metadata.insert(sluice_deployments::HELD_MODELS_SEQ_HEADER, (*seq).into());
            }
        };
        match answer {
            Ok(answer) => {
                let mut response = Response::new(answer);
                tell(response.metadata_mut());
                Ok(response)
            }
            Err(mut status) => {
                tell(status.metadata_mut());
                Err(status)
            }
        }
    }

    type ModelStreamInferStream = stream::Answers;

    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Reply<stream::Answers> {
        let headers = CallHeaders::of(req.metadata())?;
        Ok(Response::new(stream::Answers::new(
            req.into_inner(),
            headers,
            self.routes.clone(),
            (self.stream_max_in_flight, self.stream_answer_wait),
            self.stop.clone(),
        )))
    }

    async fn model_config(&self, req: Request<pb::ModelConfigRequest>) -> Reply<pb::ModelConfigResponse> {
        let req = req.into_inner();
        let d = self.routes.resolve(&req.name, Some(&req.version)).map_err(grpc_status)?;
        let policy = crate::model_config::version_policy(&self.routes, &self.controller, d.name());
        Ok(Response::new(pb::ModelConfigResponse { config: Some(crate::model_config::build(&d, policy)) }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Reply<pb::ModelStatisticsResponse> {
        let req = req.into_inner();
        let deployments = crate::model_stats::asked(&self.routes, Some(&req.name), Some(&req.version))
            .map_err(grpc_status)?;
        Ok(Response::new(crate::model_stats::build(&deployments)))
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Reply<pb::RepositoryIndexResponse> {
        let ready_only = req.into_inner().ready;
        let models = crate::repository_index(&self.routes, &self.controller, ready_only)
            .into_iter()
            .map(|m| pb::repository_index_response::ModelIndex {
                state: m.state().to_string(),
                name: m.name,
                version: m.version,
                reason: m.reason.to_string(),
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Reply<pb::RepositoryModelLoadResponse> {
        self.may_control(&req)?;
        let req = req.into_inner();
        crate::rest::model::refuse_overrides(req.parameters.keys().map(String::as_str))
            .map_err(tonic::Status::invalid_argument)?;
        let name = req.model_name;
        let controller = self.controller.clone();
        sluice_controller::to_the_end(async move { controller.load_model(&name).await })
            .await
            .map_err(grpc_control_status)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Reply<pb::RepositoryModelUnloadResponse> {
        self.may_control(&req)?;
        let name = req.into_inner().model_name;
        let controller = self.controller.clone();
        sluice_controller::to_the_end(async move { controller.unload_model(&name).await })
            .await
            .map_err(grpc_control_status)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

/// A path no service has: `UNIMPLEMENTED` for a gRPC call (as tonic answers it), and `415`
/// naming what is wrong for anything else, as grpc-go answers it (tonic answered any request
/// `200` with the gRPC status in its headers, which an HTTP health probe sent to the gRPC port
/// by mistake read as healthy).
async fn unknown_method(req: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    let content_type = req.headers().get(axum::http::header::CONTENT_TYPE);
    if content_type.is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")) {
        let (parts, ()) = Status::unimplemented("").into_http::<()>().into_parts();
        return axum::response::Response::from_parts(parts, axum::body::Body::empty());
    }
    let got = content_type.map_or("none".into(), |v| format!("`{}`", String::from_utf8_lossy(v.as_bytes())));
    let message =
        format!("this port serves gRPC only: the content-type must be application/grpc (got {got})");
    (axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE, axum::Json(serde_json::json!({"error": message})))
        .into_response()
}

/// The bounds of the gRPC services' calls.
pub struct Limits {
    /// The largest message (`http_options.max_body_bytes`).
    pub max_message_bytes: usize,
    /// `grpc_options.stream_max_in_flight`.
    pub stream_max_in_flight: usize,
    /// How long a stream's answer may wait for the client to take it before the stream's
    /// requests not yet read are dropped (`http_options.write_timeout_s`).
    pub stream_answer_wait: Duration,
}

/// Where the gRPC services run.
pub struct Role {
    /// On a port of their own: they open each call's span (on a port shared with REST,
    /// REST's frontend has).
    pub traced: bool,
    /// In a `sluice replica` process ([`crate::StartOptions::replica`]).
    pub replica: bool,
}

/// Every gRPC service Sluice serves, as one axum router (served on its own port or merged
/// with REST). `max_message_bytes` bounds decoded requests, decompressed ones too (tonic's
/// default is 4 MiB). Health follows readiness until `stop` turns true; streams stop reading
/// requests then.
pub async fn routes(
    routes: Arc<RouteTable>,
    controller: Arc<Controller>,
    readiness: Readiness,
    limits: Limits,
    stop: tokio::sync::watch::Receiver<bool>,
    control: crate::auth::Control,
    role: Role,
) -> Result<axum::Router, crate::StartError> {
    let Limits { max_message_bytes, stream_max_in_flight, stream_answer_wait } = limits;
    let Role { traced, replica } = role;
    let service = InferenceService {
        routes: routes.clone(),
        controller,
        readiness: readiness.clone(),
        control,
        stream_max_in_flight,
        stream_answer_wait,
        stop: stop.clone(),
        report_held_models: replica,
    };
    let inference = GrpcInferenceServiceServer::new(service)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // tonic starts the server's own entry ("") as SERVING; nothing is until models load.
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    tokio::spawn(health::follow(reporter, readiness, routes, stop));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| crate::StartError::Reflection(e.to_string()))?;
    let routes = tonic::service::Routes::new(inference)
        .add_service(health_service)
        .add_service(reflection)
        .into_axum_router()
        .fallback(unknown_method);
    // A span per call when something records it (see `telemetry::request_spans_recorded`), and
    // `traced`: on a port shared with REST, REST's frontend has opened the call's span.
    Ok(if traced && crate::telemetry::request_spans_recorded() {
        routes.layer(
            tower_http::trace::TraceLayer::new_for_grpc()
                .make_span_with(crate::telemetry::request_span::<axum::body::Body>),
        )
    } else {
        routes
    })
}
