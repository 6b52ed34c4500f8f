//! Sluice's configuration file: the YAML schema (in Ray Serve's vocabulary), its defaults, and
//! validation that reports every problem with the file, `line:column` and field it concerns.
//!
//! ```yaml
//! http_options: {host: 127.0.0.1, port: 8000}
//! applications:
//!   - name: iris
//!     deployments:
//!       - name: iris              # the model name on /v2/models/{name}
//!         model: models/iris.onnx # relative to the config file
//! ```
//!
//! Every field and default is documented in `docs/config.md`; keep the two in step.

mod autoscaling;
mod error;
mod file;
mod pipeline;
mod repository;
mod tls;
mod types;
mod validate;

use std::path::Path;

pub use autoscaling::{Autoscaling, AutoscalingConfig, NumReplicas};
pub use error::{ConfigError, ConfigErrors};
pub use pipeline::{Builtin, DEFAULT_MAX_TEXT_BYTES, JsonRoute, PipelineTensor};
pub use repository::{
    DEFAULT_READY_MARKER, ModelRepository, RepositoryLocation, RepositoryRollout, VersionPolicy,
};
pub use tls::TlsOptions;
pub use types::{
    AdminOptions, Application, Canary, ClusterOptions, Config, Deployment, GrpcOptions, HealthCheck,
    HttpOptions, Location, LogFormat, Model, Pipeline, PipelineStep, Placement, ProxyLocation, ProxySettings,
    RayOptions, ReplicaSettings, Rollout, Scaling, Shadow, TracingOptions,
};

/// The most threads `worker_threads` (and `sluice proxy`'s and `sluice replica`'s
/// `--worker-threads`) may ask for: a ceiling against typos.
pub const MAX_WORKER_THREADS: u32 = 1024;

/// `max_replicas_per_deployment`'s default.
pub const DEFAULT_MAX_REPLICAS_PER_DEPLOYMENT: u32 = 1024;

/// The longest duration a setting may give, in seconds (about 31 years: "never" in practice).
/// Longer ones are refused: a time that far ahead cannot be added to a clock reading, and the
/// loop that would add it would stop.
pub const MAX_SECONDS: f64 = 1e9;

/// The application that holds the model repository's models (a config may not name one so
/// when it has a `model_repository`).
pub const REPOSITORY_APPLICATION: &str = "repository";

/// What [`valid_name`] asks of a name, for messages.
pub const NAME_RULE: &str = "a non-empty name without spaces or any of `/ ? # % { }`";

/// Whether `name` may name an application, deployment or model: not empty, not `.` or `..`,
/// and without whitespace, control characters or any of `/ ? # % { }` (it is a path segment
/// of the REST API and a metric label).
pub fn valid_name(name: &str) -> bool {
    !(name.is_empty()
        || name == "."
        || name == ".."
        || name.chars().any(|c| "/?#%{}".contains(c) || c.is_whitespace() || c.is_control()))
}

/// Reads, parses and validates a config file. Relative model paths are resolved against the
/// directory of the file. Returns every error found (parse errors stop at the first one, since
/// the rest of the document cannot be trusted after it).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    read(path, true)
}

/// [`load`] without checking the listeners' hosts and ports against each other, for a command
/// line that may change them (`sluice run --admin-port`): it checks them once changed
/// ([`check_addresses`]), so that a flag can move a listener off a clash in the file.
pub fn load_before_overrides(path: &Path) -> Result<Config, ConfigErrors> {
    read(path, false)
}

fn read(path: &Path, addresses: bool) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::single(ConfigError::file(path, format!("cannot read config file: {e}")))
    })?;
    parse_text(&text, path, addresses)
}

/// Parses and validates config text that claims to come from `path` (used for messages and to
/// resolve relative model paths).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    parse_text(text, path, true)
}

/// [`parse`] for a config deployed to a running server: its listeners stay the ones it started
/// with (their settings are reported, not applied), so their hosts and ports are not checked
/// against each other (a file `sluice run` took with a flag that moved a listener off a clash
/// could not be deployed again).
pub fn parse_to_deploy(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    parse_text(text, path, false)
}

fn parse_text(text: &str, path: &Path, addresses: bool) -> Result<Config, ConfigErrors> {
    let doc: file::Config =
        serde_saphyr::from_str(text).map_err(|e| ConfigErrors::single(error::from_yaml(path, text, &e)))?;
    validate::validate(doc, path, text, addresses)
}

/// Checks again what [`load`] checks of the listeners' hosts and ports (gRPC TLS of its own on
/// the REST port), for a config whose hosts or ports changed since (`sluice run --grpc-port`).
pub fn check_addresses(config: &Config) -> Result<(), ConfigErrors> {
    let errors = tls::address_errors(config);
    if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
}

#[cfg(test)]
mod tests;
