//! The resolved configuration the rest of Sluice works on: plain values with every default
//! applied and every path made absolute, produced by [`crate::parse`] once the file has passed
//! validation. (The file's own shape, with source locations for error messages, is private to
//! this crate.)
//!
//! Defaults are written once, here: [`ReplicaSettings::default`], [`HttpOptions::default`] and
//! the others; the file parser takes its defaults from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::autoscaling::Autoscaling;
use crate::pipeline::{Builtin, JsonRoute, PipelineTensor};
use crate::repository::ModelRepository;
use crate::tls::TlsOptions;

/// A whole config.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_options: HttpOptions,
    pub grpc_options: GrpcOptions,
    pub admin_options: AdminOptions,
    /// On SIGTERM, how long requests in flight and queued may take to finish.
    pub graceful_shutdown_timeout_s: f64,
    /// On SIGTERM, how long the server keeps accepting and serving while it reports not ready,
    /// before its listeners close (for load balancers to take it out first).
    pub shutdown_delay_s: f64,
    pub applications: Vec<Application>,
    /// A model repository served as one more application, `repository`.
    pub model_repository: Option<ModelRepository>,
    /// Where replicas run: this process (default) or a Ray cluster.
    pub cluster: ClusterOptions,
    /// Where the REST and gRPC frontends run on a cluster (Ray Serve's `proxy_location`).
    pub proxy_location: ProxyLocation,
    /// OpenTelemetry traces of requests.
    pub tracing_options: TracingOptions,
    /// Log lines as text (default) or JSON.
    pub log_format: LogFormat,
    /// Threads of the async runtime that runs the frontends and the inline model calls; `None`:
    /// one per CPU the process may use (tokio's default, which `TOKIO_WORKER_THREADS` sets too).
    pub worker_threads: Option<u32>,
    /// Once every deployment is ready, page out the code loading touched (most of ONNX
    /// Runtime's library) and warm the deployments again. The `sluice` commands act on it; an
    /// embedding program calls `sluice_server::Server::release_startup_memory` itself.
    pub release_startup_memory: bool,
    /// The most replicas one deployment may have (checked when the config is read; kept for a
    /// Ray Serve deploy, whose document does not carry it, to be checked against).
    pub max_replicas_per_deployment: u32,
    /// The file this config came from; used in messages.
    pub source: PathBuf,
}

impl Config {
    /// The server settings (everything but the applications and the model repository, which a
    /// deploy applies live) that differ between `self` and `other`, by their config keys.
    pub fn server_settings_changed(&self, other: &Config) -> Vec<&'static str> {
        [
            ("http_options", self.http_options == other.http_options),
            ("grpc_options", self.grpc_options == other.grpc_options),
            ("admin_options", self.admin_options == other.admin_options),
            (
                "graceful_shutdown_timeout_s",
                self.graceful_shutdown_timeout_s == other.graceful_shutdown_timeout_s,
            ),
            ("shutdown_delay_s", self.shutdown_delay_s == other.shutdown_delay_s),
            ("cluster", self.cluster == other.cluster),
            ("proxy_location", self.proxy_location == other.proxy_location),
            ("tracing_options", self.tracing_options == other.tracing_options),
            ("log_format", self.log_format == other.log_format),
            ("worker_threads", self.worker_threads == other.worker_threads),
            ("release_startup_memory", self.release_startup_memory == other.release_startup_memory),
        ]
        .into_iter()
        .filter_map(|(key, same)| (!same).then_some(key))
        .collect()
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_options: HttpOptions::default(),
            grpc_options: GrpcOptions::default(),
            admin_options: AdminOptions::default(),
            graceful_shutdown_timeout_s: 30.0,
            shutdown_delay_s: 0.0,
            applications: Vec::new(),
            model_repository: None,
            cluster: ClusterOptions::default(),
            proxy_location: ProxyLocation::default(),
            tracing_options: TracingOptions::default(),
            log_format: LogFormat::default(),
            worker_threads: None,
            release_startup_memory: true,
            max_replicas_per_deployment: crate::DEFAULT_MAX_REPLICAS_PER_DEPLOYMENT,
            source: PathBuf::new(),
        }
    }
}

/// Where a value was written in the config file (1-based; 0 when it was not written there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Location {
    pub line: u64,
    pub column: u64,
}

impl From<serde_saphyr::Location> for Location {
    fn from(l: serde_saphyr::Location) -> Self {
        Self { line: l.line(), column: l.column() }
    }
}

/// An application: a named group of deployments, optionally composed into a pipeline.
#[derive(Debug, Clone)]
pub struct Application {
    pub name: String,
    /// Where the pipeline's plain-JSON route answers (`/embed`).
    pub route_prefix: Option<String>,
    pub deployments: Vec<Deployment>,
    pub pipeline: Option<Pipeline>,
    /// Fields of the submitted config that Sluice accepted but does not act on (a Ray Serve
    /// config's `runtime_env`, ...), each with why; shown in status, never dropped silently.
    /// Empty for Sluice's own config files.
    pub ignored: Vec<String>,
}

impl Application {
    /// An application made in code.
    pub fn new(name: impl Into<String>, deployments: Vec<Deployment>) -> Self {
        Self { name: name.into(), route_prefix: None, deployments, pipeline: None, ignored: Vec::new() }
    }
}

/// What a deployment serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    /// An ONNX file (absolute path).
    Onnx(PathBuf),
    /// A built-in step (its files made absolute).
    Builtin(Builtin),
    /// Many models of one interface, `<dir>/<model_id>/model.onnx`, each loaded on first use
    /// into a replica's least-recently-used set of at most `max_models_per_replica`.
    Multiplexed { dir: PathBuf, max_models_per_replica: u32 },
}

impl Model {
    /// The files the model is read from: a change to any of them needs new replicas.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            Model::Onnx(path) => vec![path.as_path()],
            Model::Builtin(b) => b.files(),
            // Models come and go in the folder; each is loaded when first asked for.
            Model::Multiplexed { .. } => Vec::new(),
        }
    }

    /// The ONNX file, when the model is one.
    pub fn onnx_path(&self) -> Option<&Path> {
        match self {
            Model::Onnx(path) => Some(path),
            Model::Builtin(_) | Model::Multiplexed { .. } => None,
        }
    }
}

/// How many replicas a deployment runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Scaling {
    /// Exactly this many.
    Fixed(u32),
    /// Resized from the load within the bounds (`num_replicas: auto` or `autoscaling_config`).
    Auto(Autoscaling),
}

/// Everything a replica is built with, where it may run included. Any difference needs new
/// replicas (the controller compares this struct whole, so a new field here can never be left
/// out of that decision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaSettings {
    /// ONNX Runtime intra-op threads per replica. Default 1.
    pub intra_op_threads: u32,
    /// ONNX Runtime's own arena for tensor buffers (on), or the process's allocator (off, the
    /// default: fewer instructions per call, and memory goes back after a burst).
    #[serde(default)]
    pub cpu_memory_arena: bool,
    /// ONNX Runtime's memory pattern (one planned block per call for the intermediate tensors,
    /// on) or one allocation per intermediate tensor (off, the default: fewer instructions and
    /// cache lines per call of a small model).
    #[serde(default)]
    pub memory_pattern: bool,
    /// The replicas of an ONNX model share one copy of its weights (its initializers of 1 KiB
    /// or more, and ONNX Runtime's prepacked forms of them) instead of one per replica. Default
    /// true.
    #[serde(default = "share_weights_default")]
    pub share_weights: bool,
    /// 0: the model has no batch dimension; above 0: the largest batch (dimension 0) a request
    /// may carry and replicas run. Default 0.
    pub max_batch_size: u32,
    /// How long the first request of a batch waits for more. Default 0.
    pub batch_wait_timeout_s: f64,
    /// Batch sizes sent as soon as they can be formed. Default none.
    pub preferred_batch_sizes: Vec<u32>,
    /// Pad values by input name. Default none. Written to other processes (proxies, Ray
    /// replicas) as JSON, where an infinity or NaN (`-.inf` pads an additive attention mask)
    /// travels as a string: a JSON number cannot hold one.
    #[serde(with = "non_finite")]
    pub pad: BTreeMap<String, f64>,
    /// A request's deadline unless it asks for a shorter one. Default 30.
    pub request_timeout_s: f64,
    /// Requests one replica takes at a time; 0: 2 × max_batch_size, at least 5. Default 0.
    pub max_ongoing_requests: u32,
    /// Requests waiting for a replica slot before new ones get 503. Default 64.
    pub max_queued_requests: u32,
    /// Run one full-size batch of zeros before a replica reports ready. Default true.
    pub warmup: bool,
    /// A request to an idle replica whose model calls take less than this (measured) runs on
    /// the frontend's thread instead of the replica's: two thread hand-offs fewer. 0 never;
    /// never with a `batch_wait_timeout_s`. Default 100 µs.
    pub run_inline_under_us: u32,
    /// After a batch, a replica's thread polls its queue this long before it sleeps on it: a
    /// request that comes meanwhile skips the sleep and the wake-up. 0 sleeps at once.
    /// Default 50 µs.
    #[serde(default)]
    pub spin_before_sleep_us: u32,
    /// What a replica needs from a cluster node (used on Ray; one process ignores it).
    pub placement: Placement,
    /// How often a remote replica is checked, and how long a check may take.
    pub health_check: HealthCheck,
}

/// What one replica asks of a Ray node (Ray Serve's `ray_actor_options` and
/// `max_replicas_per_node`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    /// CPUs per replica. Default: the deployment's `num_cpus`.
    pub num_cpus: f64,
    /// GPUs per replica. Default 0.
    pub num_gpus: f64,
    /// Memory per replica, bytes (Ray's logical resource). Default none.
    pub memory: Option<u64>,
    /// Custom resources per replica (`{"tpu": 1}`). Default none.
    pub resources: BTreeMap<String, f64>,
    /// Ray's accelerator type (`A100`). Default none.
    pub accelerator_type: Option<String>,
    /// At most this many replicas of the deployment on one node. Default: no limit.
    pub max_replicas_per_node: Option<u32>,
}

/// Health checks of remote replicas (Ray Serve's names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Seconds between checks of one replica. Default 10.
    pub period_s: f64,
    /// How long one check may take before it counts as failed. Default 30.
    pub timeout_s: f64,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self { period_s: 10.0, timeout_s: 30.0 }
    }
}

fn share_weights_default() -> bool {
    true
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            intra_op_threads: 1,
            cpu_memory_arena: false,
            memory_pattern: false,
            share_weights: true,
            max_batch_size: 0,
            batch_wait_timeout_s: 0.0,
            preferred_batch_sizes: Vec::new(),
            pad: BTreeMap::new(),
            request_timeout_s: 30.0,
            max_ongoing_requests: 0,
            max_queued_requests: 64,
            warmup: true,
            run_inline_under_us: 100,
            spin_before_sleep_us: 50,
            placement: Placement { num_cpus: 1.0, ..Placement::default() },
            health_check: HealthCheck::default(),
        }
    }
}

/// A deployment: one model served by a set of replicas.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The model name clients use on `/v2/models/{name}`.
    pub name: String,
    /// The version reported and addressable by version. Default `"1"`.
    pub version: String,
    pub model: Model,
    pub settings: ReplicaSettings,
    pub scaling: Scaling,
    /// A canary version taking a share of the traffic.
    pub canary: Option<Canary>,
    /// A candidate version that gets copies of a share of the requests.
    pub shadow: Option<Shadow>,
    /// Further versions served by exact version only: (version, ONNX file). Filled from a
    /// model repository's version policy.
    pub extra_versions: Vec<(String, PathBuf)>,
    /// Where the deployment's model (else its name) is written, for messages.
    pub location: Location,
}

impl Deployment {
    /// A deployment of an ONNX file with every default.
    pub fn onnx(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        let settings = ReplicaSettings::default();
        Self {
            name: name.into(),
            version: "1".into(),
            model: Model::Onnx(path.into()),
            settings,
            scaling: Scaling::Fixed(1),
            canary: None,
            shadow: None,
            extra_versions: Vec::new(),
            location: Location::default(),
        }
    }

    /// The autoscaling settings, when the deployment autoscales.
    pub fn autoscaling(&self) -> Option<&Autoscaling> {
        match &self.scaling {
            Scaling::Auto(a) => Some(a),
            Scaling::Fixed(_) => None,
        }
    }

    /// Replicas to start with.
    pub fn initial_replicas(&self) -> usize {
        match &self.scaling {
            Scaling::Fixed(n) => *n as usize,
            Scaling::Auto(a) => a.initial_replicas as usize,
        }
    }

    /// CPUs one replica takes from its node.
    pub fn num_cpus(&self) -> f64 {
        self.settings.placement.num_cpus
    }

    /// The most replicas this deployment may have.
    pub fn max_replicas(&self) -> usize {
        match &self.scaling {
            Scaling::Fixed(n) => *n as usize,
            Scaling::Auto(a) => a.max_replicas as usize,
        }
    }
}

/// A second version of a deployment's model that takes a share of its traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    /// The canary's ONNX file (absolute).
    pub model: PathBuf,
    /// Its version string (differs from the deployment's).
    pub version: String,
    /// Percent of requests that name no version which go to the canary (0-100). Default 10.
    pub weight: u32,
    /// Step the weight up automatically, rolling back when the canary misbehaves.
    pub rollout: Option<Rollout>,
    /// Promote the canary by itself once its rollout reaches 100 % (repository rollouts);
    /// otherwise a completed rollout waits for `promote`.
    pub auto_promote: bool,
}

/// A candidate version getting copies of requests (`shadow`): the client only ever gets the
/// primary's answer; the candidate's latency, errors and agreement with the primary are
/// measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    /// The candidate's ONNX file (absolute).
    pub model: PathBuf,
    pub version: String,
    /// Percent of the requests the primary serves that are copied (0-100). Default 100.
    pub percent: u32,
}

/// A pipeline, checked: `order` lists the steps in an order that runs each after the steps
/// producing its inputs.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The model name the pipeline answers to.
    pub name: String,
    pub inputs: Vec<PipelineTensor>,
    pub steps: Vec<PipelineStep>,
    /// Pipeline tensors returned.
    pub outputs: Vec<String>,
    /// Plain-JSON route at the application's `route_prefix`.
    pub route: Option<JsonRoute>,
    /// Indices into `steps`, in run order.
    pub order: Vec<usize>,
}

/// One step of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineStep {
    pub name: String,
    /// A deployment of the same application.
    pub deployment: String,
    /// Step input name → pipeline tensor.
    pub inputs: BTreeMap<String, String>,
    /// Step output name → pipeline tensor.
    pub outputs: BTreeMap<String, String>,
}

/// `http_options.max_body_bytes_in_flight`'s default: 1 GiB.
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 1 << 30;

/// REST frontend settings (`http_options`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpOptions {
    /// Address to bind. Default `127.0.0.1` (loopback only; use `0.0.0.0` to serve a network).
    pub host: String,
    /// Port to bind; 0 picks a free one. Default 8000 (Triton's and Ray Serve's).
    pub port: u16,
    /// Largest request body accepted, in bytes, as sent and after decompression; larger
    /// bodies get 413 (at once when `Content-Length` announces one). Default 64 MiB.
    pub max_body_bytes: usize,
    /// Request body bytes the server holds at once while reading bodies, across every
    /// request, connection and inference frontend (REST and gRPC share it; the admin API's
    /// bodies are not counted): counted as a body arrives
    /// (decompressed, for a compressed REST body) and given back once it is read and decoded
    /// (a gRPC stream holds only the message it is reading). A request whose body would pass
    /// it is refused 503 (gRPC `UNAVAILABLE`), so that many large or compressed bodies at once
    /// cannot take the server's memory. At least `max_body_bytes`. Default 1 GiB.
    pub max_body_bytes_in_flight: usize,
    /// How long a client may take to send a request's headers (counted from when the
    /// connection is ready for its next request, so an idle keep-alive connection closes after
    /// it too), its TLS handshake, or its first bytes. Every listener. Default 30.
    pub header_read_timeout_s: f64,
    /// The longest pause while a request body arrives; past it the request gets 408. Default 30.
    pub body_read_timeout_s: f64,
    /// The longest a request body (a gRPC stream's message) may take to arrive in all,
    /// counted from when the server first waits for it. Default 300.
    pub body_total_timeout_s: f64,
    /// The longest a connection's write may wait for the client to take bytes (it stopped
    /// reading, its window full); past it the connection is closed. Every listener. Default 30.
    pub write_timeout_s: f64,
    /// A connection on which no request has started for this long is closed gracefully
    /// (requests still running finish; HTTP/2 clients get GOAWAY and reconnect when they need
    /// to). 0: never. Idle HTTP/1.1 connections close after `header_read_timeout_s` already.
    /// Every listener. Default 3600.
    pub idle_timeout_s: f64,
    /// Open connections per listener; more wait in the kernel's accept queue. Default 4096.
    pub max_connections: usize,
    /// TLS for REST (and gRPC when it shares the port). Default none (plain HTTP).
    pub tls: Option<TlsOptions>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            max_body_bytes: 64 * 1024 * 1024,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
            header_read_timeout_s: 30.0,
            body_read_timeout_s: 30.0,
            body_total_timeout_s: 300.0,
            write_timeout_s: 30.0,
            idle_timeout_s: 3600.0,
            max_connections: 4096,
            tls: None,
        }
    }
}

/// gRPC frontend settings (`grpc_options`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcOptions {
    /// Address to bind. Default `127.0.0.1`.
    pub host: String,
    /// Port to bind; 0 picks a free one. Default 8001 (Triton's). The same host and port as
    /// `http_options` serves both protocols on one port.
    pub port: u16,
    /// Set false to serve REST only. Default true.
    pub enabled: bool,
    /// TLS for gRPC on its own port. Default none.
    pub tls: Option<TlsOptions>,
    /// Requests of one `ModelStreamInfer` stream run at once, at most; past it the stream's
    /// further messages are not read until one is answered (HTTP/2 flow control holds the
    /// client back). 1 answers a stream's requests in the order sent. Default 128.
    pub stream_max_in_flight: usize,
}

/// `grpc_options.stream_max_in_flight`'s bound.
pub const MAX_STREAM_IN_FLIGHT: usize = 65_536;

impl Default for GrpcOptions {
    fn default() -> Self {
        Self { host: "127.0.0.1".into(), port: 8001, enabled: true, tls: None, stream_max_in_flight: 128 }
    }
}

/// Admin API settings (`admin_options`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminOptions {
    /// Address to bind. Default `127.0.0.1`: the admin API changes what is served, so it is
    /// not exposed unless asked.
    pub host: String,
    /// Port. Default 8265 (Ray's dashboard port, where `serve deploy` talks).
    pub port: u16,
    /// Set false to serve no admin API. Default true.
    pub enabled: bool,
    /// Environment variable holding a bearer token the admin API requires. Default
    /// `SLUICE_ADMIN_TOKEN`; when it is unset or empty, no token is required.
    pub token_env: String,
    /// Serve the admin API on a non-loopback address with neither a token nor client
    /// certificates. Default false: the server refuses to start that way.
    pub allow_unauthenticated: bool,
    /// TLS for the admin API (`client_ca_file` there requires client certificates). Default none.
    pub tls: Option<TlsOptions>,
}

impl Default for AdminOptions {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8265,
            enabled: true,
            token_env: "SLUICE_ADMIN_TOKEN".into(),
            allow_unauthenticated: false,
            tls: None,
        }
    }
}

/// An automatic rollout: every `interval_s` the canary's weight grows by `step_percent` while
/// its error rate and p99 latency over the interval stay within bounds; past a bound it is
/// rolled back to 0 and the reason recorded in the events.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollout {
    /// Weight added per step. Default 10.
    pub step_percent: u32,
    /// Seconds between steps. Default 30.
    pub interval_s: f64,
    /// Largest share of failed canary requests in an interval. Default 0.01.
    pub max_error_rate: f64,
    /// Largest canary p99 latency in an interval, milliseconds. Default: no bound.
    pub max_p99_ms: Option<f64>,
    /// Canary requests an interval needs before it counts. Default 20.
    pub min_requests: u64,
    /// Gate on agreement with the primary: the primary's requests are also copied to the canary
    /// (as a shadow: only onto a free slot, never queued) and an interval needs `min_requests`
    /// compared rows, of which at least this share must agree. Default: no gate.
    pub min_shadow_agreement: Option<f64>,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            step_percent: 10,
            interval_s: 30.0,
            max_error_rate: 0.01,
            max_p99_ms: None,
            min_requests: 20,
            min_shadow_agreement: None,
        }
    }
}

/// `cluster`: where replicas run.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterOptions {
    /// Run on a Ray cluster (`sluice run --ray URL` sets the address too).
    pub ray: Option<RayOptions>,
}

/// `cluster.ray`: the Ray cluster Sluice submits itself to as one job.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RayOptions {
    /// The Ray dashboard (Jobs API), `http://HEAD:8265`.
    pub address: String,
    /// Ray namespace of Sluice's actors. Default `sluice`.
    pub namespace: String,
    /// Environment variable holding Ray's auth token (`RAY_AUTH_MODE=token`), sent as a bearer
    /// token. Default `RAY_AUTH_TOKEN`; unset or empty: none.
    pub token_env: String,
    /// How long `sluice run --ray` waits for the job to run and every application to be
    /// healthy. Default 600.
    pub start_timeout_s: f64,
    /// How long a replica (or proxy) actor's process may take to start serving: fetch its
    /// model, load it, warm up. Past it, it is killed and started again. Default 300.
    pub replica_start_timeout_s: f64,
}

impl Default for RayOptions {
    fn default() -> Self {
        Self {
            address: String::new(),
            namespace: "sluice".into(),
            token_env: "RAY_AUTH_TOKEN".into(),
            start_timeout_s: 600.0,
            replica_start_timeout_s: 300.0,
        }
    }
}

/// Where the REST and gRPC frontends (proxies) run on a cluster (Ray Serve's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ProxyLocation {
    /// On the head node only (the controller's own process).
    #[default]
    HeadOnly,
    /// On the head node and on every node that has replicas.
    EveryNode,
}

/// `tracing_options`: every request as an OpenTelemetry trace, exported over OTLP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingOptions {
    /// The OTLP/gRPC collector (`http://127.0.0.1:4317`). Default: none, no traces.
    pub otlp_endpoint: Option<String>,
    /// Share of requests traced when the caller sent no `traceparent` (a sampled parent is
    /// always followed). Default 1.0.
    pub sample_ratio: f64,
    /// `service.name` of the traces. Default `sluice`.
    pub service_name: String,
}

impl Default for TracingOptions {
    fn default() -> Self {
        Self { otlp_endpoint: None, sample_ratio: 1.0, service_name: "sluice".into() }
    }
}

/// `log_format`: how log lines look on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line, with the fields of the spans it happened in (request id,
    /// trace id, model, version).
    Json,
}

/// What a `sluice proxy` on another node of a Ray cluster (`proxy_location: EveryNode`) serves
/// by, from the config: its frontends' limits and timeouts, its shutdown, its logs and traces.
/// Its host and ports come as flags of their own, and TLS is refused with `EveryNode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    pub max_body_bytes: usize,
    pub max_body_bytes_in_flight: usize,
    pub header_read_timeout_s: f64,
    pub body_read_timeout_s: f64,
    pub body_total_timeout_s: f64,
    pub write_timeout_s: f64,
    pub idle_timeout_s: f64,
    pub max_connections: usize,
    pub stream_max_in_flight: usize,
    pub graceful_shutdown_timeout_s: f64,
    pub shutdown_delay_s: f64,
    pub log_format: LogFormat,
    pub tracing_options: TracingOptions,
}

impl ProxySettings {
    pub fn of(config: &Config) -> Self {
        let (http, grpc) = (&config.http_options, &config.grpc_options);
        Self {
            max_body_bytes: http.max_body_bytes,
            max_body_bytes_in_flight: http.max_body_bytes_in_flight,
            header_read_timeout_s: http.header_read_timeout_s,
            body_read_timeout_s: http.body_read_timeout_s,
            body_total_timeout_s: http.body_total_timeout_s,
            write_timeout_s: http.write_timeout_s,
            idle_timeout_s: http.idle_timeout_s,
            max_connections: http.max_connections,
            stream_max_in_flight: grpc.stream_max_in_flight,
            graceful_shutdown_timeout_s: config.graceful_shutdown_timeout_s,
            shutdown_delay_s: config.shutdown_delay_s,
            log_format: config.log_format,
            tracing_options: config.tracing_options.clone(),
        }
    }

    /// Sets the config's keys these stand for, checked as the config's own are (they come from
    /// a config the controller checked, on a command line anyone may write).
    pub fn apply(&self, config: &mut Config) -> Result<(), String> {
        let http = &mut config.http_options;
        http.max_body_bytes = self.max_body_bytes;
        http.max_body_bytes_in_flight = self.max_body_bytes_in_flight;
        http.header_read_timeout_s = self.header_read_timeout_s;
        http.body_read_timeout_s = self.body_read_timeout_s;
        http.body_total_timeout_s = self.body_total_timeout_s;
        http.write_timeout_s = self.write_timeout_s;
        http.idle_timeout_s = self.idle_timeout_s;
        http.max_connections = self.max_connections;
        config.grpc_options.stream_max_in_flight = self.stream_max_in_flight;
        config.graceful_shutdown_timeout_s = self.graceful_shutdown_timeout_s;
        config.shutdown_delay_s = self.shutdown_delay_s;
        config.log_format = self.log_format;
        config.tracing_options = self.tracing_options.clone();
        let (http, grpc, admin) =
            (&mut config.http_options, &mut config.grpc_options, &mut config.admin_options);
        let mut problems = crate::tls::check_listeners(http, grpc, admin, Path::new(""), false);
        problems.extend(crate::validate::body_limits(http));
        for (field, s) in [
            ("graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s),
            ("shutdown_delay_s", self.shutdown_delay_s),
        ] {
            if !(0.0..=crate::MAX_SECONDS).contains(&s) {
                problems.push((field.into(), format!("must be 0 to {:e} seconds", crate::MAX_SECONDS)));
            }
        }
        if !(0.0..=1.0).contains(&self.tracing_options.sample_ratio) {
            problems.push(("tracing_options.sample_ratio".into(), "must be 0 to 1".into()));
        }
        match problems.is_empty() {
            true => Ok(()),
            false => {
                Err(problems.iter().map(|(field, m)| format!("{field} {m}")).collect::<Vec<_>>().join("; "))
            }
        }
    }
}

/// A map of floats whose infinities and NaN travel as the strings `Infinity`, `-Infinity` and
/// `NaN` (Triton's JSON words; JSON numbers cannot hold them, and serde_json writes them
/// `null`), finite values as numbers.
mod non_finite {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Float {
        Number(f64),
        Word(String),
    }

    pub fn serialize<S: Serializer>(map: &BTreeMap<String, f64>, s: S) -> Result<S::Ok, S::Error> {
        let word = |v: f64| match v {
            _ if v.is_finite() => Float::Number(v),
            _ if v.is_nan() => Float::Word("NaN".into()),
            _ if v > 0.0 => Float::Word("Infinity".into()),
            _ => Float::Word("-Infinity".into()),
        };
        s.collect_map(map.iter().map(|(k, &v)| (k, word(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
        BTreeMap::<String, Float>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Float::Number(v) => v,
                    Float::Word(w) => match w.as_str() {
                        "NaN" => f64::NAN,
                        "Infinity" => f64::INFINITY,
                        "-Infinity" => f64::NEG_INFINITY,
                        _ => {
                            return Err(serde::de::Error::custom(format!(
                                "pad `{k}`: `{w}` is not a number"
                            )));
                        }
                    },
                };
                Ok((k, v))
            })
            .collect()
    }
}
