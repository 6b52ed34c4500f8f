//! The config file's types. Field names follow Ray Serve's config schema where one exists.
//! Defaults live in the `default_*` functions next to the fields; docs/config.md mirrors them.

use std::path::PathBuf;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::autoscaling::{Autoscaling, AutoscalingConfig, NumReplicas};

/// A whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the REST frontend listens and how much it accepts.
    #[serde(default)]
    pub http_options: HttpOptions,
    /// Where the gRPC frontend listens.
    #[serde(default)]
    pub grpc_options: GrpcOptions,
    /// The admin API (deploy, status, delete, rollouts).
    #[serde(default)]
    pub admin_options: AdminOptions,
    /// On SIGTERM, how long requests in flight and queued may take to finish before the
    /// process exits anyway. Default 30.
    #[serde(default = "default_grace")]
    pub graceful_shutdown_timeout_s: f64,
    /// The applications to serve; each groups deployments.
    #[serde(default)]
    pub applications: Vec<Application>,
    /// A model repository served as one more application, `repository`, polled for changes.
    #[serde(default)]
    pub model_repository: Option<crate::repository::ModelRepository>,
    /// The file this config came from (set by [`crate::load`]); used in messages.
    #[serde(skip)]
    pub source: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_options: HttpOptions::default(),
            grpc_options: GrpcOptions::default(),
            admin_options: AdminOptions::default(),
            graceful_shutdown_timeout_s: default_grace(),
            applications: Vec::new(),
            model_repository: None,
            source: PathBuf::new(),
        }
    }
}

/// REST frontend settings (`http_options`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Address to bind. Default `127.0.0.1` (loopback only; use `0.0.0.0` to serve a network).
    #[serde(default = "default_host")]
    pub host: String,
    /// Port to bind; 0 picks a free one. Default 8000 (Triton's and Ray Serve's).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Largest request body accepted, in bytes; larger bodies get 413. Default 64 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self { host: default_host(), port: default_port(), max_body_bytes: default_max_body_bytes() }
    }
}

/// gRPC frontend settings (`grpc_options`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcOptions {
    /// Address to bind. Default `127.0.0.1`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port to bind; 0 picks a free one. Default 8001 (Triton's). The same host and port as
    /// `http_options` serves both protocols on one port.
    #[serde(default = "default_grpc_port")]
    pub port: u16,
    /// Set false to serve REST only. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        Self { host: default_host(), port: default_grpc_port(), enabled: true }
    }
}

/// Admin API settings (`admin_options`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminOptions {
    /// Address to bind. Default `127.0.0.1`: the admin API changes what is served, so it is
    /// not exposed unless asked.
    #[serde(default = "default_host")]
    pub host: String,
    /// Port. Default 8265 (Ray's dashboard port, where `serve deploy` talks).
    #[serde(default = "default_admin_port")]
    pub port: u16,
    /// Set false to serve no admin API. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Environment variable holding a bearer token the admin API requires. Default
    /// `SLUICE_ADMIN_TOKEN`; when it is unset or empty, no token is required.
    #[serde(default = "default_token_env")]
    pub token_env: String,
}

impl Default for AdminOptions {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_admin_port(),
            enabled: true,
            token_env: default_token_env(),
        }
    }
}

/// A second version of a deployment's model that takes a share of its traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// The canary's ONNX file, relative to the config file.
    pub model: Spanned<PathBuf>,
    /// Its version string (must differ from the deployment's).
    pub version: Spanned<String>,
    /// Percent of requests that name no version which go to the canary (0-100). Default 10.
    #[serde(default = "default_canary_weight")]
    pub weight: Spanned<u32>,
    /// Step the weight up automatically, rolling back when the canary misbehaves.
    #[serde(default)]
    pub rollout: Option<Rollout>,
}

/// An automatic rollout: every `interval_s` the canary's weight grows by `step_percent` while
/// its error rate and p99 latency over the interval stay within bounds; past a bound it is
/// rolled back to 0 and the reason recorded in the events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Weight added per step. Default 10.
    #[serde(default = "default_step")]
    pub step_percent: u32,
    /// Seconds between steps. Default 30.
    #[serde(default = "default_interval")]
    pub interval_s: f64,
    /// Largest share of failed canary requests in an interval. Default 0.01.
    #[serde(default = "default_error_rate")]
    pub max_error_rate: f64,
    /// Largest canary p99 latency in an interval, milliseconds. Default: no bound.
    #[serde(default)]
    pub max_p99_ms: Option<f64>,
    /// Canary requests an interval needs before it counts. Default 20.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

/// An application: a named group of deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    /// Unique name of the application.
    pub name: Spanned<String>,
    /// Where the pipeline's plain-JSON route answers (`/embed`), Ray Serve style.
    #[serde(default)]
    pub route_prefix: Option<Spanned<String>>,
    /// The deployments (models) of the application.
    #[serde(default)]
    pub deployments: Vec<Deployment>,
    /// Deployments composed into one model.
    #[serde(default)]
    pub pipeline: Option<crate::pipeline::Pipeline>,
}

/// A deployment: one model served by a set of replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// The model name clients use on `/v2/models/{name}`; unique across the server.
    pub name: Spanned<String>,
    /// Path of the ONNX file, relative to the config file. After loading, it is resolved.
    /// Required unless `builtin` is given.
    #[serde(default = "default_no_model")]
    pub model: Spanned<PathBuf>,
    /// A built-in step instead of an ONNX model (`{tokenizer: {path: ...}}`, `{mean_pool: {}}`,
    /// `{softmax: {}}`, `{argmax: {}}`, `{top_k: {k: 5}}`, `{cast: ..}`, `{reshape: ..}`,
    /// `{custom: {name: ..}}`).
    #[serde(default)]
    pub builtin: Option<crate::pipeline::Builtin>,
    /// The model version reported and addressable on `/v2/models/{name}/versions/{version}`.
    /// Default `"1"`.
    #[serde(default = "default_version")]
    pub version: Spanned<String>,
    /// Replicas, each with its own ONNX Runtime session on its own OS thread: a count, or
    /// `auto` (autoscaling with Ray Serve's auto defaults). Default 1.
    #[serde(default = "default_num_replicas")]
    pub num_replicas: Spanned<NumReplicas>,
    /// Autoscaling on in-flight + queued requests (Ray Serve's fields). Not with a fixed
    /// `num_replicas`.
    #[serde(default)]
    pub autoscaling_config: Option<Spanned<AutoscalingConfig>>,
    /// CPUs one replica needs, for fitting replicas on the node. Default: `intra_op_threads`.
    #[serde(default)]
    pub num_cpus: Option<f64>,
    /// A canary version taking a share of the traffic.
    #[serde(default)]
    pub canary: Option<Canary>,
    /// Further versions served by exact version only: (version, model file). Filled from a
    /// model repository's version policy.
    #[serde(skip)]
    pub extra_versions: Vec<(String, PathBuf)>,
    /// ONNX Runtime intra-op threads per replica. Default 1: on a small machine, more replicas
    /// scale better than more threads per replica.
    #[serde(default = "default_intra_op_threads")]
    pub intra_op_threads: Spanned<u32>,
    /// Largest batch (dimension 0) one request may carry, and the largest batch replicas run.
    /// 0 (the default) means the model has no batch dimension: tensors pass as they are.
    /// Above 0, every input and output's first dimension must be dynamic in the model.
    #[serde(default = "default_zero")]
    pub max_batch_size: Spanned<u32>,
    /// Requests one replica takes at a time (in its batch queue or running). 0 (the default)
    /// means automatic: 2 × max_batch_size, at least 5.
    #[serde(default = "default_zero")]
    pub max_ongoing_requests: Spanned<u32>,
    /// How long the first request of a batch waits for more, in seconds. Default 0: a batch
    /// goes as soon as the replica is free, holding whatever queued while it was busy.
    #[serde(default = "default_zero_f64")]
    pub batch_wait_timeout_s: Spanned<f64>,
    /// Batch sizes sent as soon as they can be formed, before the wait runs out. Default none.
    #[serde(default = "default_empty_sizes")]
    pub preferred_batch_sizes: Spanned<Vec<u32>>,
    /// Pad values by input name: requests whose padded inputs differ in length (after
    /// dimension 0) share a batch, padded to the longest; outputs are cut back. Default none.
    #[serde(default = "default_pad")]
    pub pad: Spanned<std::collections::BTreeMap<String, f64>>,
    /// Deadline of a request in seconds (a client's OIP `timeout` may shorten it). A request
    /// still waiting when it passes is answered 504 and never runs. Default 30.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: Spanned<f64>,
    /// Run one full-size batch of zeros on each replica before it reports ready. Default true.
    #[serde(default = "default_true")]
    pub warmup: bool,
    /// Requests waiting for a replica slot of this deployment before new ones are refused
    /// with 503. Default 64.
    #[serde(default = "default_max_queued_requests")]
    pub max_queued_requests: Spanned<u32>,
}

fn spanned<T>(value: T) -> Spanned<T> {
    let unknown = serde_saphyr::Location::UNKNOWN;
    Spanned::new(value, unknown, unknown)
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}
fn default_port() -> u16 {
    8000
}
fn default_max_body_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_no_model() -> Spanned<PathBuf> {
    spanned(PathBuf::new())
}
fn default_grace() -> f64 {
    30.0
}
fn default_admin_port() -> u16 {
    8265
}
fn default_token_env() -> String {
    "SLUICE_ADMIN_TOKEN".to_string()
}
fn default_canary_weight() -> Spanned<u32> {
    spanned(10)
}
fn default_step() -> u32 {
    10
}
fn default_interval() -> f64 {
    30.0
}
fn default_error_rate() -> f64 {
    0.01
}
fn default_min_requests() -> u64 {
    20
}
fn default_zero() -> Spanned<u32> {
    spanned(0)
}
fn default_zero_f64() -> Spanned<f64> {
    spanned(0.0)
}
fn default_empty_sizes() -> Spanned<Vec<u32>> {
    spanned(Vec::new())
}
fn default_pad() -> Spanned<std::collections::BTreeMap<String, f64>> {
    spanned(Default::default())
}
fn default_request_timeout() -> Spanned<f64> {
    spanned(30.0)
}
fn default_grpc_port() -> u16 {
    8001
}
fn default_true() -> bool {
    true
}
fn default_version() -> Spanned<String> {
    spanned("1".to_string())
}
fn default_num_replicas() -> Spanned<NumReplicas> {
    spanned(NumReplicas::Fixed(1))
}
fn default_intra_op_threads() -> Spanned<u32> {
    spanned(1)
}
fn default_max_queued_requests() -> Spanned<u32> {
    spanned(64)
}

impl Application {
    /// An application made in code (no location in a file).
    pub fn new(name: impl Into<String>, deployments: Vec<Deployment>) -> Self {
        Self { name: spanned(name.into()), route_prefix: None, deployments, pipeline: None }
    }
}

impl Deployment {
    /// The resolved autoscaling settings, when the deployment autoscales.
    pub fn autoscaling(&self) -> Option<Autoscaling> {
        let auto = self.num_replicas.value == NumReplicas::Auto;
        match &self.autoscaling_config {
            Some(c) => Some(c.value.resolve(auto)),
            None if auto => Some(AutoscalingConfig::default().resolve(true)),
            None => None,
        }
    }

    /// Replicas to start with.
    pub fn initial_replicas(&self) -> usize {
        match (self.num_replicas.value, self.autoscaling()) {
            (_, Some(a)) => a.initial_replicas as usize,
            (NumReplicas::Fixed(n), None) => n as usize,
            (NumReplicas::Auto, None) => 1,
        }
    }

    /// The most replicas this deployment may have.
    pub fn max_replicas(&self) -> usize {
        match (self.num_replicas.value, self.autoscaling()) {
            (_, Some(a)) => a.max_replicas as usize,
            (NumReplicas::Fixed(n), None) => n as usize,
            (NumReplicas::Auto, None) => 1,
        }
    }

    /// CPUs one replica takes from the node.
    pub fn cpus_per_replica(&self) -> f64 {
        self.num_cpus.unwrap_or(self.intra_op_threads.value as f64)
    }
}
