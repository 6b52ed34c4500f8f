//! The config file as written: serde types that keep each value's location for error messages.
//! Field names follow Ray Serve's config schema where one exists. Defaults come from the
//! resolved types ([`crate::ReplicaSettings`] and the option structs), so each is written
//! once; docs/config.md mirrors them. [`crate::validate`] turns this into [`crate::Config`].

use std::path::PathBuf;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::autoscaling::{AutoscalingConfig, NumReplicas};
use crate::types::{
    AdminOptions, ClusterOptions, GrpcOptions, HttpOptions, LogFormat, ProxyLocation, ReplicaSettings,
    Rollout, TracingOptions,
};

/// A whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
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
    pub graceful_shutdown_timeout_s: Spanned<f64>,
    /// On SIGTERM, how long to keep serving while reporting not ready before the listeners
    /// close. Default 0.
    #[serde(default = "default_zero_seconds")]
    pub shutdown_delay_s: Spanned<f64>,
    /// The applications to serve; each groups deployments.
    #[serde(default)]
    pub applications: Vec<Application>,
    /// A model repository served as one more application, `repository`, polled for changes.
    #[serde(default)]
    pub model_repository: Option<crate::repository::ModelRepository>,
    /// Where replicas run: this process, or a Ray cluster (`{ray: {address: ...}}`).
    #[serde(default)]
    pub cluster: ClusterOptions,
    /// Where the frontends run on a cluster: `HeadOnly` (default) or `EveryNode`.
    #[serde(default)]
    pub proxy_location: ProxyLocation,
    /// OpenTelemetry traces: `{otlp_endpoint, sample_ratio, service_name}`.
    #[serde(default)]
    pub tracing_options: TracingOptions,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// The most replicas one deployment may have: a fixed `num_replicas`, an autoscaling
    /// `max_replicas`, the model repository's `num_replicas`. A ceiling against typos (each
    /// replica is a thread and a model session here, an actor on Ray). Default 1024.
    #[serde(default = "default_max_replicas")]
    pub max_replicas_per_deployment: Spanned<u32>,
    /// Threads of the async runtime that runs the frontends (REST, gRPC, admin) and the calls
    /// of cheap models made inline. Default: one per CPU this process may use.
    #[serde(default)]
    pub worker_threads: Option<Spanned<u32>>,
    /// Once every deployment is ready, page out the code loading touched and warm the
    /// deployments again. Default true.
    #[serde(default = "default_release_startup_memory")]
    pub release_startup_memory: bool,
}

/// `ray_actor_options` of a deployment, Ray Serve's names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RayActorOptions {
    #[serde(default)]
    pub num_cpus: Option<f64>,
    #[serde(default)]
    pub num_gpus: Option<f64>,
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub resources: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    pub accelerator_type: Option<String>,
}

/// A second version of a deployment's model that takes a share of its traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Canary {
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

/// `multiplex` of a deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Multiplex {
    /// The folder of models, relative to the config file.
    pub path: PathBuf,
    /// Models one replica holds at most; the least recently used leaves first. Default 3
    /// (Ray Serve's).
    #[serde(default = "default_models_per_replica")]
    pub max_num_models_per_replica: u32,
}

fn default_models_per_replica() -> u32 {
    3
}

/// A candidate version that gets copies of a share of the requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Shadow {
    /// The candidate's ONNX file, relative to the config file.
    pub model: Spanned<PathBuf>,
    /// Its version string (must differ from the deployment's and its canary's).
    pub version: Spanned<String>,
    /// Percent of requests copied (0-100). Default 100.
    #[serde(default = "default_shadow_percent")]
    pub percent: Spanned<u32>,
}

/// An application: a named group of deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Application {
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
pub(crate) struct Deployment {
    /// The model name clients use on `/v2/models/{name}`; unique across the server.
    pub name: Spanned<String>,
    /// Path of the ONNX file, relative to the config file. After loading, it is resolved.
    /// Required unless `builtin` is given.
    #[serde(default = "default_no_model")]
    pub model: Spanned<PathBuf>,
    /// Many models of one interface instead of one model: `<path>/<model_id>/model.onnx`, each
    /// loaded on first use (Ray Serve's model multiplexing).
    #[serde(default)]
    pub multiplex: Option<Spanned<Multiplex>>,
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
    /// A candidate version that gets copies of a share of the requests.
    #[serde(default)]
    pub shadow: Option<Shadow>,
    /// ONNX Runtime intra-op threads per replica. Default 1: on a small machine, more replicas
    /// scale better than more threads per replica.
    #[serde(default = "default_intra_op_threads")]
    pub intra_op_threads: Spanned<u32>,
    /// ONNX Runtime's own arena for tensor buffers. Default false: buffers come from the
    /// process's allocator.
    #[serde(default = "default_cpu_memory_arena")]
    pub cpu_memory_arena: bool,
    /// ONNX Runtime's memory pattern: one block per call for all intermediate tensors, planned
    /// from the first call of each input shape. Default false: each intermediate tensor is its
    /// own allocation.
    #[serde(default = "default_memory_pattern")]
    pub memory_pattern: bool,
    /// One copy of the model's weights for all its replicas. Default true.
    #[serde(default = "default_share_weights")]
    pub share_weights: bool,
    /// Largest batch (dimension 0) one request may carry, and the largest batch replicas run.
    /// 0 (the default) means the model has no batch dimension: tensors pass as they are.
    /// Above 0, every input and output's first dimension must be dynamic in the model.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: Spanned<u32>,
    /// Requests one replica takes at a time (in its batch queue or running). 0 (the default)
    /// means automatic: 2 × max_batch_size, at least 5.
    #[serde(default = "default_max_ongoing_requests")]
    pub max_ongoing_requests: Spanned<u32>,
    /// How long the first request of a batch waits for more, in seconds. Default 0: a batch
    /// goes as soon as the replica is free, holding whatever queued while it was busy.
    #[serde(default = "default_batch_wait_timeout")]
    pub batch_wait_timeout_s: Spanned<f64>,
    /// Batch sizes sent as soon as they can be formed, before the wait runs out. Default none.
    #[serde(default = "default_preferred_sizes")]
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
    #[serde(default = "default_warmup")]
    pub warmup: bool,
    /// Idle replicas run calls measured below this many µs on the frontend's thread. Default
    /// 100; 0 never.
    #[serde(default = "default_run_inline")]
    pub run_inline_under_us: Spanned<u32>,
    /// After a batch, a replica's thread polls its queue this many µs before it sleeps.
    /// Default 50; 0 sleeps at once.
    #[serde(default = "default_spin_before_sleep")]
    pub spin_before_sleep_us: Spanned<u32>,
    /// Requests waiting for a replica slot of this deployment before new ones are refused
    /// with 503. Default 64.
    #[serde(default = "default_max_queued_requests")]
    pub max_queued_requests: Spanned<u32>,
    /// What one replica asks of a Ray node (`num_cpus`, `num_gpus`, `memory`, `resources`,
    /// `accelerator_type`). Used on Ray.
    #[serde(default)]
    pub ray_actor_options: Option<Spanned<RayActorOptions>>,
    /// At most this many replicas on one Ray node. Default: no limit.
    #[serde(default)]
    pub max_replicas_per_node: Option<Spanned<u32>>,
    /// Seconds between health checks of a remote replica. Default 10.
    #[serde(default = "default_health_period")]
    pub health_check_period_s: Spanned<f64>,
    /// How long a health check may take before it fails. Default 30.
    #[serde(default = "default_health_timeout")]
    pub health_check_timeout_s: Spanned<f64>,
}

fn spanned<T>(value: T) -> Spanned<T> {
    let unknown = serde_saphyr::Location::UNKNOWN;
    Spanned::new(value, unknown, unknown)
}

fn defaults() -> ReplicaSettings {
    ReplicaSettings::default()
}
fn default_no_model() -> Spanned<PathBuf> {
    spanned(PathBuf::new())
}
fn default_max_replicas() -> Spanned<u32> {
    spanned(crate::DEFAULT_MAX_REPLICAS_PER_DEPLOYMENT)
}
fn default_zero_seconds() -> Spanned<f64> {
    spanned(0.0)
}
fn default_grace() -> Spanned<f64> {
    spanned(crate::Config::default().graceful_shutdown_timeout_s)
}
fn default_shadow_percent() -> Spanned<u32> {
    spanned(100)
}
fn default_canary_weight() -> Spanned<u32> {
    spanned(10)
}
fn default_max_batch_size() -> Spanned<u32> {
    spanned(defaults().max_batch_size)
}
fn default_max_ongoing_requests() -> Spanned<u32> {
    spanned(defaults().max_ongoing_requests)
}
fn default_batch_wait_timeout() -> Spanned<f64> {
    spanned(defaults().batch_wait_timeout_s)
}
fn default_preferred_sizes() -> Spanned<Vec<u32>> {
    spanned(defaults().preferred_batch_sizes)
}
fn default_pad() -> Spanned<std::collections::BTreeMap<String, f64>> {
    spanned(defaults().pad)
}
fn default_request_timeout() -> Spanned<f64> {
    spanned(defaults().request_timeout_s)
}
fn default_cpu_memory_arena() -> bool {
    defaults().cpu_memory_arena
}
fn default_memory_pattern() -> bool {
    defaults().memory_pattern
}
fn default_share_weights() -> bool {
    defaults().share_weights
}
fn default_warmup() -> bool {
    defaults().warmup
}
fn default_release_startup_memory() -> bool {
    crate::Config::default().release_startup_memory
}
fn default_version() -> Spanned<String> {
    spanned("1".to_string())
}
fn default_num_replicas() -> Spanned<NumReplicas> {
    spanned(NumReplicas::Fixed(1))
}
fn default_intra_op_threads() -> Spanned<u32> {
    spanned(defaults().intra_op_threads)
}
fn default_health_period() -> Spanned<f64> {
    spanned(defaults().health_check.period_s)
}
fn default_health_timeout() -> Spanned<f64> {
    spanned(defaults().health_check.timeout_s)
}
fn default_run_inline() -> Spanned<u32> {
    spanned(defaults().run_inline_under_us)
}
fn default_spin_before_sleep() -> Spanned<u32> {
    spanned(defaults().spin_before_sleep_us)
}
fn default_max_queued_requests() -> Spanned<u32> {
    spanned(defaults().max_queued_requests)
}
