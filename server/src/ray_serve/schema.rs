//! Ray Serve's deploy schema (`ServeDeploySchema` in ray/serve/schema.py, Ray 2.60), typed
//! where Sluice gives a field a meaning and kept as JSON where Sluice's own config parser
//! checks it later. Every other field Ray knows (or a newer Ray adds) is accepted and listed as
//! ignored, with why: a real Ray config is never refused for a field Sluice does not use.

use serde_json::{Map, Value};

use super::{ValidationError, ValidationErrors};

/// What `import_path` names: `sluice.<kind>:<reference>`.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportPath {
    /// `sluice.onnx:PATH` — an ONNX file.
    Onnx(String),
    /// `sluice.repository:PATH` — a model folder in Triton's layout (`PATH/<N>/model.onnx`).
    Repository(String),
    /// `sluice.builtin:STEP` — a built-in step; its options in `args.options`.
    Builtin(String),
    /// `sluice.custom:NAME` — a step registered in Rust under NAME.
    Custom(String),
    /// `sluice.pipeline:NAME` — a pipeline served as model NAME, declared in `args`.
    Pipeline(String),
}

/// The syntax, for messages.
pub const IMPORT_PATH_SYNTAX: &str = "sluice.onnx:PATH, sluice.repository:PATH, sluice.builtin:STEP, \
     sluice.custom:NAME or sluice.pipeline:NAME";

impl ImportPath {
    /// Parses `sluice.<kind>:<reference>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a Sluice model reference; use {IMPORT_PATH_SYNTAX}");
        let (kind, reference) = s.split_once(':').ok_or_else(bad)?;
        // Ray's own check allows one colon only, not at either end.
        if reference.is_empty() || reference.contains(':') {
            return Err(bad());
        }
        let r = reference.to_string();
        match kind {
            "sluice.onnx" => Ok(Self::Onnx(r)),
            "sluice.repository" => Ok(Self::Repository(r)),
            "sluice.builtin" => Ok(Self::Builtin(r)),
            "sluice.custom" => Ok(Self::Custom(r)),
            "sluice.pipeline" => Ok(Self::Pipeline(r)),
            _ => Err(bad()),
        }
    }
}

/// A whole `ServeDeploySchema`.
#[derive(Debug, Clone)]
pub struct ServeDeploy {
    pub applications: Vec<RayApp>,
    /// Top-level fields Sluice does not act on (`proxy_location`, `http_options`, ...).
    pub ignored: Vec<String>,
}

/// One `applications[]` entry.
#[derive(Debug, Clone)]
pub struct RayApp {
    /// Ray's default is `default`.
    pub name: String,
    pub route_prefix: Option<String>,
    pub import_path: ImportPath,
    /// Sluice deployment fields for the application (see docs/config.md).
    pub args: Map<String, Value>,
    pub deployments: Vec<RayDeployment>,
    /// Application fields Sluice does not act on, each `FIELD: why`.
    pub ignored: Vec<String>,
    /// The entry exactly as submitted (`deployed_app_config` answers it back).
    pub submitted: Value,
}

/// One `applications[].deployments[]` entry: options for a deployment of the application.
#[derive(Debug, Clone)]
pub struct RayDeployment {
    pub name: String,
    /// Ray fields Sluice's deployments have too ([`MAPPED`], `autoscaling_config` and
    /// `ray_actor_options` less the keys Sluice lacks), each with its Ray location.
    pub fields: Vec<(String, Value, String)>,
    /// Sluice deployment fields.
    pub user_config: Map<String, Value>,
    pub ignored: Vec<String>,
}

/// Deployment fields Ray and Sluice share, with the same meaning.
const MAPPED: &[&str] = &[
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "max_replicas_per_node",
    "health_check_period_s",
    "health_check_timeout_s",
];

/// The `ray_actor_options` keys Sluice places replicas by (on Ray).
const ACTOR_OPTIONS: &[&str] = &["num_cpus", "num_gpus", "memory", "resources", "accelerator_type"];

/// Why Sluice does not act on a Ray field.
fn why(field: &str) -> &'static str {
    match field {
        "proxy_location" | "http_options" | "grpc_options" => {
            "Sluice's frontends are set when it starts (its own config's proxy_location, http_options, \
             grpc_options)"
        }
        "logging_config" => "Sluice logs as RUST_LOG says",
        "runtime_env" => "Sluice runs no Python: import_path names the model",
        "graceful_shutdown_wait_loop_s" | "graceful_shutdown_timeout_s" => {
            "replicas drain within Sluice's graceful_shutdown_timeout_s"
        }
        "placement_group_bundles"
        | "placement_group_strategy"
        | "placement_group_bundle_label_selector"
        | "gang_scheduling_config" => "Sluice places each replica by its ray_actor_options alone",
        "request_router_config" => "Sluice picks replicas by power of two choices",
        "max_queued_requests" => "-1 (no limit): Sluice bounds every queue, so its default applies",
        _ => "not used by Sluice",
    }
}

/// Ray's own bound on a field Sluice maps (its `DeploymentSchema`), in pydantic's words: a
/// config Ray refuses is refused here too (Sluice read `max_ongoing_requests: 0` as its own
/// "auto", and answered the 0 back in the status, which Ray's CLI then failed to read).
fn ray_bound(field: &str, v: &Value) -> Option<&'static str> {
    let n = v.as_f64()?;
    match field {
        "max_ongoing_requests" | "health_check_period_s" | "health_check_timeout_s" if n <= 0.0 => {
            Some("Input should be greater than 0")
        }
        "max_replicas_per_node" if n < 1.0 => Some("Input should be greater than or equal to 1"),
        "num_replicas" if n < 0.0 => Some("Input should be greater than or equal to 0"),
        "max_queued_requests" if n == 0.0 || n < -1.0 => {
            Some("max_queued_requests must be -1 (no limit) or a positive integer")
        }
        _ => None,
    }
}

/// Fields Sluice ignores but answers back in `deployed_app_config`, checked as Ray's
/// `ServeDeploySchema` checks them (Ray's CLI reads the status with the same schema, and one
/// application it would have refused fails `serve status` and `serve config` for all):
/// `runtime_env` takes only remote URIs of Ray's protocols in `working_dir` and `py_modules`,
/// `logging_config` takes Ray's keys, a level name or number and an encoding of TEXT or JSON,
/// and `external_scaler_enabled` excludes autoscaled deployments.
fn ray_only_checks(app: &Map<String, Value>, at: &str, errors: &mut Vec<ValidationError>) {
    type_checks(app, at, APP_TYPES, errors);
    runtime_env_checks(app.get("runtime_env"), &format!("{at}.runtime_env"), errors);
    logging_checks(app.get("logging_config"), &format!("{at}.logging_config"), errors);
    if app.get("external_scaler_enabled") == Some(&Value::Bool(true)) {
        let deployments =
            app.get("deployments").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let autoscaled = |d: &Value| {
            d.get("num_replicas").and_then(Value::as_str) == Some("auto")
                || d.get("autoscaling_config").is_some_and(|a| !a.is_null())
        };
        if deployments.iter().any(autoscaled) {
            errors.push(err(
                &format!("{at}.external_scaler_enabled"),
                "external_scaler_enabled is set, but a deployment has autoscaling (num_replicas: auto or an autoscaling_config)",
            ));
        }
    }
}

/// A JSON type of Ray's schema, in pydantic's words.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Num,
    Bool,
    Dict,
    List,
}

impl Kind {
    fn holds(self, v: &Value) -> bool {
        match self {
            Kind::Str => v.is_string(),
            Kind::Int => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|n| n.fract() == 0.0),
            Kind::Num => v.is_number(),
            Kind::Bool => v.is_boolean(),
            Kind::Dict => v.is_object(),
            Kind::List => v.is_array(),
        }
    }

    fn refusal(self) -> &'static str {
        match self {
            Kind::Str => "Input should be a valid string",
            Kind::Int => "Input should be a valid integer",
            Kind::Num => "Input should be a valid number",
            Kind::Bool => "Input should be a valid boolean",
            Kind::Dict => "Input should be a valid dictionary",
            Kind::List => "Input should be a valid list",
        }
    }
}

/// A field Ray's schema types: its JSON type (None: checked where Sluice reads it) and whether
/// it may be null. Sluice reads null as absent; Ray's pydantic models refuse null where a field
/// is not `Optional`, and its CLI reads the status (which answers each application back as
/// submitted) with them: one application with `args:` left empty in YAML, accepted, made
/// `serve status` and `serve config` fail for all.
type Typed = (&'static str, Option<Kind>, bool);

const TOP_TYPES: &[Typed] = &[
    ("proxy_location", Some(Kind::Str), false),
    ("http_options", Some(Kind::Dict), false),
    ("grpc_options", Some(Kind::Dict), false),
];

const APP_TYPES: &[Typed] = &[
    ("name", None, false),
    ("runtime_env", Some(Kind::Dict), false),
    ("host", Some(Kind::Str), false),
    ("port", Some(Kind::Int), false),
    ("deployments", None, false),
    ("args", None, false),
    ("external_scaler_enabled", Some(Kind::Bool), false),
    ("logging_config", Some(Kind::Dict), true),
];

const DEPLOYMENT_TYPES: &[Typed] = &[
    ("max_ongoing_requests", None, false),
    ("max_queued_requests", None, false),
    ("max_replicas_per_node", None, false),
    ("health_check_period_s", None, false),
    ("health_check_timeout_s", None, false),
    ("ray_actor_options", None, false),
    ("backpressure_config", Some(Kind::Dict), false),
    ("graceful_shutdown_wait_loop_s", Some(Kind::Num), false),
    ("graceful_shutdown_timeout_s", Some(Kind::Num), false),
    ("placement_group_bundles", Some(Kind::List), false),
    ("placement_group_strategy", Some(Kind::Str), false),
    ("placement_group_bundle_label_selector", Some(Kind::List), false),
    ("logging_config", Some(Kind::Dict), false),
    ("request_router_config", Some(Kind::Dict), false),
    ("rolling_update_percentage", Some(Kind::Num), false),
    ("max_surge_percent", Some(Kind::Int), false),
];

const LOGGING_TYPES: &[Typed] = &[
    ("encoding", None, false),
    ("log_level", None, false),
    ("logs_dir", Some(Kind::Str), true),
    ("enable_access_log", Some(Kind::Bool), false),
    ("additional_log_standard_attrs", Some(Kind::List), false),
];

/// Refuses, as Ray's schema does, a null where a `types` field may not be one and a value of
/// another JSON type.
fn type_checks(obj: &Map<String, Value>, at: &str, types: &[Typed], errors: &mut Vec<ValidationError>) {
    for &(key, kind, nullable) in types {
        let Some(v) = obj.get(key) else { continue };
        let loc = if at.is_empty() { key.to_string() } else { format!("{at}.{key}") };
        let refusal = match (v, kind) {
            (Value::Null, _) if nullable => continue,
            (Value::Null, None) => "Input should not be None",
            (Value::Null, Some(kind)) => kind.refusal(),
            (v, Some(kind)) if !kind.holds(v) => kind.refusal(),
            _ => continue,
        };
        errors.push(err(&loc, refusal));
    }
}

/// Ray's `runtime_env` rule for Serve configs: URIs of its protocols only (the scheme in any
/// case, as Python's `urlparse` reads it), `local://` with an absolute path (a directory on
/// every node).
fn runtime_env_checks(env: Option<&Value>, at: &str, errors: &mut Vec<ValidationError>) {
    const PROTOCOLS: &[&str] =
        &["gcs", "conda", "pip", "uv", "s3", "gs", "azure", "abfss", "file", "http", "https", "local"];
    let uri = |s: &str| {
        let Some((scheme, rest)) = s.split_once("://") else { return false };
        let scheme = scheme.to_ascii_lowercase();
        let drive = |p: &str| {
            let b = p.as_bytes();
            b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'/' | b'\\')
        };
        let absolute = |p: &str| p.starts_with('/') || drive(p);
        PROTOCOLS.contains(&scheme.as_str()) && (scheme != "local" || absolute(rest))
    };
    let remote = |v: &Value| v.as_str().is_none_or(uri);
    let Some(env) = env.and_then(Value::as_object) else { return };
    let modules = env.get("py_modules").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if !env.get("working_dir").is_none_or(remote) || !modules.iter().all(remote) {
        errors.push(err(
            at,
            &format!(
                "runtime_envs in the Serve config support only remote URIs in working_dir and py_modules ({}), or \
                 \"local://\" URIs for directories that already exist on every node",
                PROTOCOLS.join(", ")
            ),
        ));
    }
}

/// Ray's `LoggingConfig`: its keys only, a level name or number, an encoding of TEXT or JSON.
fn logging_checks(config: Option<&Value>, at: &str, errors: &mut Vec<ValidationError>) {
    const KEYS: &[&str] =
        &["encoding", "log_level", "logs_dir", "enable_access_log", "additional_log_standard_attrs"];
    const LEVELS: &[&str] = &["CRITICAL", "FATAL", "ERROR", "WARN", "WARNING", "INFO", "DEBUG", "NOTSET"];
    /// Python's `logging.LogRecord` attributes (Ray's `LOGRECORD_STANDARD_ATTRS`).
    const ATTRS: &[&str] = &[
        "args",
        "asctime",
        "created",
        "exc_info",
        "exc_text",
        "filename",
        "funcName",
        "levelname",
        "levelno",
        "lineno",
        "message",
        "module",
        "msecs",
        "msg",
        "name",
        "pathname",
        "process",
        "processName",
        "relativeCreated",
        "stack_info",
        "thread",
        "threadName",
        "taskName",
    ];
    let Some(config) = config.and_then(Value::as_object) else { return };
    for key in config.keys().filter(|k| !KEYS.contains(&k.as_str())) {
        errors.push(err(&format!("{at}.{key}"), "Extra inputs are not permitted"));
    }
    type_checks(config, at, LOGGING_TYPES, errors);
    let attrs = config.get("additional_log_standard_attrs").and_then(Value::as_array);
    if let Some(bad) = attrs.into_iter().flatten().find(|a| !a.as_str().is_some_and(|a| ATTRS.contains(&a))) {
        errors.push(err(
            &format!("{at}.additional_log_standard_attrs"),
            &format!("{bad}: additional log standard attributes must be one of {}", ATTRS.join(", ")),
        ));
    }
    // A number is a level of Python's `logging` (0, 10, … 50), not any up to 50.
    if let Some(level) = config.get("log_level").filter(|l| !l.is_null())
        && !level.as_str().is_some_and(|l| LEVELS.contains(&l))
        && level.as_u64().is_none_or(|n| n > 50 || n % 10 != 0)
    {
        errors.push(err(
            &format!("{at}.log_level"),
            &format!("{level} is not a valid log level; use one of {} (or a number)", LEVELS.join(", ")),
        ));
    }
    if let Some(encoding) = config.get("encoding").filter(|e| !e.is_null())
        && !encoding.as_str().is_some_and(|e| e == "TEXT" || e == "JSON")
    {
        errors.push(err(
            &format!("{at}.encoding"),
            &format!("{encoding} is not a valid encoding; use TEXT or JSON"),
        ));
    }
}

fn ignore(list: &mut Vec<String>, path: &str, field: &str) {
    list.push(format!("{path}: {}", why(field)));
}

/// Sluice's `autoscaling_config` keys (Ray's others are ignored, not refused).
const AUTOSCALING_KEYS: &[&str] = &[
    "target_ongoing_requests",
    "min_replicas",
    "max_replicas",
    "initial_replicas",
    "upscale_delay_s",
    "downscale_delay_s",
    "downscale_to_zero_delay_s",
    "upscaling_factor",
    "downscaling_factor",
    "smoothing_factor",
    "look_back_period_s",
    "metrics_interval_s",
];

/// Parses a PUT body already read as JSON. Every problem is reported, at Ray's location
/// (`applications.0.import_path`).
pub fn parse(body: &Value) -> Result<ServeDeploy, ValidationErrors> {
    let mut errors = Vec::new();
    let Some(top) = object(body, "", &mut errors) else { return Err(ValidationErrors(errors)) };
    type_checks(top, "", TOP_TYPES, &mut errors);
    let mut ignored = Vec::new();
    let mut applications = Vec::new();
    for (key, value) in top {
        match key.as_str() {
            "applications" => match value.as_array() {
                Some(list) => {
                    for (i, app) in list.iter().enumerate() {
                        applications.extend(parse_app(app, &format!("applications.{i}"), &mut errors));
                    }
                }
                None => errors.push(err("applications", "Input should be a valid list")),
            },
            _ if value.is_null() => {}
            other => ignore(&mut ignored, &format!("{other} (top level)"), other),
        }
    }
    if !top.contains_key("applications") {
        errors.push(err("applications", "Field required"));
    }
    if errors.is_empty() { Ok(ServeDeploy { applications, ignored }) } else { Err(ValidationErrors(errors)) }
}

fn parse_app(value: &Value, at: &str, errors: &mut Vec<ValidationError>) -> Option<RayApp> {
    let obj = object(value, at, errors)?;
    let before = errors.len();
    let name = match obj.get("name") {
        None | Some(Value::Null) => Some("default".to_string()),
        Some(v) => string(v, &format!("{at}.name"), errors),
    };
    let route_prefix = match obj.get("route_prefix") {
        None | Some(Value::Null) => None,
        Some(v) => string(v, &format!("{at}.route_prefix"), errors),
    };
    let import_path = match obj.get("import_path") {
        None => {
            errors.push(err(&format!("{at}.import_path"), "Field required"));
            None
        }
        Some(v) => string(v, &format!("{at}.import_path"), errors).and_then(|s| {
            ImportPath::parse(&s).map_err(|m| errors.push(err(&format!("{at}.import_path"), &m))).ok()
        }),
    };
    let args = match obj.get("args") {
        None | Some(Value::Null) => Some(Map::new()),
        Some(v) => object(v, &format!("{at}.args"), errors).cloned(),
    };
    let mut deployments = Vec::new();
    let mut ignored = Vec::new();
    match obj.get("deployments") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (j, d) in list.iter().enumerate() {
                deployments.extend(parse_deployment(d, &format!("{at}.deployments.{j}"), errors));
            }
        }
        Some(_) => errors.push(err(&format!("{at}.deployments"), "Input should be a valid list")),
    }
    ray_only_checks(obj, at, errors);
    for (key, value) in obj {
        let known = ["name", "route_prefix", "import_path", "args", "deployments"];
        if !known.contains(&key.as_str()) && !value.is_null() && value != &Value::Bool(false) {
            ignore(&mut ignored, key, key);
        }
    }
    if errors.len() > before {
        return None;
    }
    for d in &mut deployments {
        ignored.extend(d.ignored.drain(..).map(|i| format!("deployments[{}].{i}", d.name)));
    }
    Some(RayApp {
        name: name?,
        route_prefix,
        import_path: import_path?,
        args: args?,
        deployments,
        ignored,
        submitted: value.clone(),
    })
}

fn parse_deployment(value: &Value, at: &str, errors: &mut Vec<ValidationError>) -> Option<RayDeployment> {
    let obj = object(value, at, errors)?;
    // What Sluice ignores of a deployment but Ray's schema refuses (see [`ray_only_checks`]).
    type_checks(obj, at, DEPLOYMENT_TYPES, errors);
    if obj.get("rolling_update_percentage").and_then(Value::as_f64).is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        errors.push(err(
            &format!("{at}.rolling_update_percentage"),
            "Input should be greater than 0 and at most 1",
        ));
    }
    if obj.get("max_surge_percent").and_then(Value::as_f64).is_some_and(|p| !(0.0..=100.0).contains(&p)) {
        errors.push(err(&format!("{at}.max_surge_percent"), "Input should be 0 to 100"));
    }
    let options = obj.get("ray_actor_options");
    runtime_env_checks(
        options.and_then(|o| o.get("runtime_env")),
        &format!("{at}.ray_actor_options.runtime_env"),
        errors,
    );
    logging_checks(obj.get("logging_config"), &format!("{at}.logging_config"), errors);
    let bundles = obj.get("placement_group_bundles").is_some_and(|b| !b.is_null());
    if bundles && obj.get("max_replicas_per_node").is_some_and(|m| !m.is_null()) {
        errors.push(err(
            &format!("{at}.max_replicas_per_node"),
            "Setting max_replicas_per_node is not allowed when placement_group_bundles is provided",
        ));
    }
    for key in ["graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s"] {
        if obj.get(key).and_then(Value::as_f64).is_some_and(|v| v < 0.0) {
            errors.push(err(&format!("{at}.{key}"), "Input should be greater than or equal to 0"));
        }
    }
    let name = match obj.get("name") {
        None => {
            errors.push(err(&format!("{at}.name"), "Field required"));
            None
        }
        Some(v) => string(v, &format!("{at}.name"), errors),
    };
    let mut fields = Vec::new();
    let mut user_config = Map::new();
    let mut ignored = Vec::new();
    for (key, value) in obj {
        let loc = format!("{at}.{key}");
        match (key.as_str(), value) {
            ("name", _) | (_, Value::Null) => {}
            ("max_queued_requests", v) if v.as_i64() == Some(-1) => ignore(&mut ignored, key, key),
            (k, v) if MAPPED.contains(&k) => match ray_bound(k, v) {
                Some(message) => errors.push(err(&loc, message)),
                None => fields.push((key.clone(), v.clone(), loc)),
            },
            ("user_config", v) => user_config = object(v, &loc, errors).cloned().unwrap_or_default(),
            ("autoscaling_config", v) => {
                let Some(a) = object(v, &loc, errors) else { continue };
                let (known, other): (Map<_, _>, Map<_, _>) =
                    a.clone().into_iter().partition(|(k, _)| AUTOSCALING_KEYS.contains(&k.as_str()));
                for k in other.keys() {
                    ignore(&mut ignored, &format!("autoscaling_config.{k}"), k);
                }
                fields.push((key.clone(), Value::Object(known), loc));
            }
            ("ray_actor_options", v) => {
                let Some(options) = object(v, &loc, errors) else { continue };
                let mut kept = Map::new();
                for (k, v) in options {
                    match k.as_str() {
                        _ if v.is_null() => {}
                        // Ray's memory is a float of bytes; Sluice's a whole number.
                        "memory" => {
                            let whole =
                                v.as_f64().filter(|m| m.fract() == 0.0 && *m >= 0.0).map(|m| m as u64);
                            kept.insert(k.clone(), whole.map_or_else(|| v.clone(), Value::from));
                        }
                        option if ACTOR_OPTIONS.contains(&option) => {
                            kept.insert(k.clone(), v.clone());
                        }
                        _ if v == &Value::Object(Map::new()) => {}
                        _ => ignore(&mut ignored, &format!("ray_actor_options.{k}"), k),
                    }
                }
                fields.push((key.clone(), Value::Object(kept), loc));
            }
            _ => ignore(&mut ignored, key, key),
        }
    }
    Some(RayDeployment { name: name?, fields, user_config, ignored })
}

fn err(loc: &str, msg: &str) -> ValidationError {
    ValidationError { loc: loc.to_string(), msg: msg.to_string() }
}

fn object<'a>(v: &'a Value, at: &str, errors: &mut Vec<ValidationError>) -> Option<&'a Map<String, Value>> {
    let o = v.as_object();
    if o.is_none() {
        errors.push(err(at, "Input should be a valid dictionary"));
    }
    o
}

fn string(v: &Value, at: &str, errors: &mut Vec<ValidationError>) -> Option<String> {
    let s = v.as_str().map(str::to_string);
    if s.is_none() {
        errors.push(err(at, "Input should be a valid string"));
    }
    s
}

/// Whether a PUT body is Ray's schema rather than Sluice's own config: a document with a
/// field only Ray's schema has, at the top (`logging_config`, `target_capacity`, ...) or in an
/// application (`import_path`, `args`, `runtime_env`, ...).
pub fn is_ray_config(body: &Value) -> bool {
    const TOP: &[&str] = &["logging_config", "tracing_config", "controller_options", "target_capacity"];
    const APP: &[&str] = &[
        "import_path",
        "args",
        "runtime_env",
        "logging_config",
        "external_scaler_enabled",
        "autoscaling_policy",
    ];
    /// Ray's `http_options` and `grpc_options` keys Sluice's have not (a RayService removes
    /// every application with `applications: []` beside them).
    const OPTIONS: &[&str] = &[
        "request_timeout_s",
        "root_path",
        "keep_alive_timeout_s",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_keyfile_password",
        "ssl_ca_certs",
        "location",
        "middlewares",
        "grpc_servicer_functions",
    ];
    let Some(top) = body.as_object() else { return false };
    let app_says = |a: &Value| a.as_object().is_some_and(|a| APP.iter().any(|k| a.contains_key(*k)));
    let options_say = |key: &str| {
        top.get(key).and_then(Value::as_object).is_some_and(|o| OPTIONS.iter().any(|k| o.contains_key(*k)))
    };
    TOP.iter().any(|k| top.contains_key(*k))
        || options_say("http_options")
        || options_say("grpc_options")
        || top.get("applications").and_then(Value::as_array).is_some_and(|apps| apps.iter().any(app_says))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn import_paths_name_the_model_kind() {
        assert_eq!(
            ImportPath::parse("sluice.onnx:models/iris.onnx"),
            Ok(ImportPath::Onnx("models/iris.onnx".into()))
        );
        assert_eq!(ImportPath::parse("sluice.pipeline:embed"), Ok(ImportPath::Pipeline("embed".into())));
        for bad in ["main:app", "sluice.onnx:", "sluice.onnx:a:b", "sluice.onnx", "sluice.wasm:x"] {
            let e = ImportPath::parse(bad).unwrap_err();
            assert!(e.contains(&format!("`{bad}` is not a Sluice model reference")), "{e}");
        }
    }

    #[test]
    fn ray_fields_are_typed_ignored_with_why_or_refused_at_their_location() {
        let body = json!({
            "proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": 8000},
            "applications": [{
                "name": "iris",
                "import_path": "sluice.onnx:iris.onnx",
                "runtime_env": {"pip": ["torch"]},
                "args": {"max_batch_size": 8},
                "deployments": [{
                    "name": "iris",
                    "num_replicas": 2,
                    "max_queued_requests": -1,
                    "user_config": {"version": "2"},
                    "health_check_period_s": 5,
                    "graceful_shutdown_timeout_s": 20,
                    "autoscaling_config": null,
                    "ray_actor_options": {"num_cpus": 0.5, "memory": 1e9, "runtime_env": {"pip": ["x"]}},
                }],
            }],
        });
        let d = parse(&body).unwrap();
        assert!(d.ignored.iter().any(|i| i.starts_with("proxy_location (top level): ")), "{:?}", d.ignored);
        let app = &d.applications[0];
        assert_eq!(app.import_path, ImportPath::Onnx("iris.onnx".into()));
        assert_eq!(app.args["max_batch_size"], 8);
        assert_eq!(app.submitted, body["applications"][0]);
        let dep = &app.deployments[0];
        let fields: Vec<(&str, &Value)> = dep.fields.iter().map(|(k, v, _)| (k.as_str(), v)).collect();
        let options = json!({"num_cpus": 0.5, "memory": 1_000_000_000u64});
        assert_eq!(
            fields,
            vec![
                ("health_check_period_s", &json!(5)),
                ("num_replicas", &json!(2)),
                ("ray_actor_options", &options)
            ]
        );
        assert_eq!(dep.fields[2].2, "applications.0.deployments.0.ray_actor_options");
        assert_eq!(dep.user_config["version"], "2");
        let ignored = app.ignored.join("\n");
        for field in [
            "runtime_env: Sluice runs no Python",
            "deployments[iris].graceful_shutdown_timeout_s: replicas drain within",
            "deployments[iris].max_queued_requests: -1 (no limit)",
            "deployments[iris].ray_actor_options.runtime_env: Sluice runs no Python",
        ] {
            assert!(ignored.contains(field), "{field} in {ignored}");
        }

        let bad = json!({"applications": [{"name": 3, "import_path": "main:app", "deployments": [{}]}, "x"]});
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("4 validation errors for ServeDeploySchema\n"), "{e}");
        assert!(
            e.contains("\napplications.0.name\n  Input should be a valid string [type=value_error]"),
            "{e}"
        );
        assert!(
            e.contains("\napplications.0.import_path\n  `main:app` is not a Sluice model reference"),
            "{e}"
        );
        assert!(e.contains("\napplications.0.deployments.0.name\n  Field required"), "{e}");
        assert!(e.contains("\napplications.1\n  Input should be a valid dictionary"), "{e}");
    }

    #[test]
    fn ray_configs_are_told_from_sluice_configs() {
        assert!(is_ray_config(
            &json!({"applications": [{"name": "a", "import_path": "sluice.onnx:m.onnx"}]})
        ));
        assert!(is_ray_config(&json!({"target_capacity": 50, "applications": []})));
        assert!(!is_ray_config(&json!({"proxy_location": "EveryNode", "applications": []})), "Sluice's too");
        assert!(!is_ray_config(&json!({"applications": [{"name": "a", "deployments": []}]})));
        assert!(!is_ray_config(&json!("applications: []")));
        // How a RayService removes every application: Ray's frontend options, no application.
        assert!(is_ray_config(
            &json!({"http_options": {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 30}, "applications": []})
        ));
        assert!(is_ray_config(
            &json!({"grpc_options": {"port": 9000, "grpc_servicer_functions": []}, "applications": []})
        ));
        assert!(!is_ray_config(&json!({"http_options": {"port": 8000}, "applications": []})), "Sluice's too");
    }

    #[test]
    fn what_ray_refuses_is_refused_even_where_sluice_ignores_it() {
        let app = |deployment: Value, extra: Value| {
            let mut a =
                json!({"name": "a", "import_path": "sluice.onnx:m.onnx", "deployments": [deployment]});
            a.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            json!({"applications": [a]})
        };
        for (deployment, message) in [
            (
                json!({"name": "a", "max_ongoing_requests": 0}),
                "max_ongoing_requests\n  Input should be greater than 0",
            ),
            (
                json!({"name": "a", "num_replicas": -1}),
                "num_replicas\n  Input should be greater than or equal to 0",
            ),
            (json!({"name": "a", "max_queued_requests": 0}), "must be -1 (no limit) or a positive integer"),
            (
                json!({"name": "a", "health_check_period_s": 0}),
                "health_check_period_s\n  Input should be greater than 0",
            ),
        ] {
            let e = parse(&app(deployment, json!({}))).unwrap_err().to_string();
            assert!(e.contains(message), "{e}");
        }
        let ok = json!({"name": "a", "max_ongoing_requests": 5, "max_queued_requests": -1});
        assert!(parse(&app(ok.clone(), json!({"runtime_env": {}}))).is_ok());
        let local =
            parse(&app(ok.clone(), json!({"runtime_env": {"working_dir": "."}}))).unwrap_err().to_string();
        assert!(
            local.contains(
                "applications.0.runtime_env\n  runtime_envs in the Serve config support only remote URIs"
            ),
            "{local}"
        );
        let remote = json!({"runtime_env": {"working_dir": "https://example.invalid/a.zip", "py_modules": ["s3://b/m.zip"]}});
        assert!(parse(&app(ok.clone(), remote)).is_ok());
        // As Ray takes them: a directory on every node (`local://`, an absolute path), and a
        // scheme in capitals (Python's `urlparse` lowers it); both were refused.
        for working_dir in ["local:///app", "LOCAL:///app", "local://C:/app", "S3://b/x.zip"] {
            let env = json!({"runtime_env": {"working_dir": working_dir}});
            assert!(parse(&app(ok.clone(), env)).is_ok(), "{working_dir}");
        }
        let relative = json!({"runtime_env": {"working_dir": "local://app"}});
        assert!(parse(&app(ok.clone(), relative)).is_err(), "a local:// path must be absolute");
        let level = parse(&app(ok.clone(), json!({"logging_config": {"log_level": "LOUD"}})))
            .unwrap_err()
            .to_string();
        assert!(level.contains("logging_config.log_level\n  \"LOUD\" is not a valid log level"), "{level}");
        // Refused too, as Ray's schema refuses them (an application Ray would not take, shown
        // back in the status, made `serve status` fail on every application).
        for (top, deployment, message) in [
            (
                json!({"runtime_env": {"working_dir": "ftp://h/a.zip"}}),
                ok.clone(),
                "support only remote URIs",
            ),
            (json!({"logging_config": {"encoding": "XML"}}), ok.clone(), "logging_config.encoding"),
            (
                json!({"logging_config": {"colour": true}}),
                ok.clone(),
                "logging_config.colour\n  Extra inputs",
            ),
            (
                json!({}),
                json!({"name": "a", "ray_actor_options": {"runtime_env": {"working_dir": "."}}}),
                "deployments.0.ray_actor_options.runtime_env",
            ),
            (
                json!({}),
                json!({"name": "a", "max_replicas_per_node": 2, "placement_group_bundles": [{"CPU": 1}]}),
                "not allowed when placement_group_bundles is provided",
            ),
            (
                json!({}),
                json!({"name": "a", "graceful_shutdown_timeout_s": -1}),
                "graceful_shutdown_timeout_s\n  Input should be greater than or equal to 0",
            ),
            (
                json!({"external_scaler_enabled": true}),
                json!({"name": "a", "num_replicas": "auto"}),
                "external_scaler_enabled",
            ),
        ] {
            let e = parse(&app(deployment, top)).unwrap_err().to_string();
            assert!(e.contains(message), "{message}: {e}");
        }
        // A level by number is Ray's too.
        assert!(
            parse(&app(ok.clone(), json!({"logging_config": {"log_level": 20, "encoding": "JSON"}}))).is_ok()
        );
        // Nulls where Ray's fields are not optional (a YAML key left empty), values of another
        // type, and values out of Ray's ranges: accepted and answered back, each made Ray's CLI
        // fail to read the status of every application.
        for (top, deployment, message) in [
            (
                json!({"args": null}),
                ok.clone(),
                "applications.0.args
  Input should not be None",
            ),
            (
                json!({"name": null}),
                ok.clone(),
                "applications.0.name
  Input should not be None",
            ),
            (json!({"deployments": null}), ok.clone(), "applications.0.deployments"),
            (
                json!({"runtime_env": null}),
                ok.clone(),
                "applications.0.runtime_env
  Input should be a valid dictionary",
            ),
            (
                json!({"runtime_env": "s3://b/x.zip"}),
                ok.clone(),
                "runtime_env
  Input should be a valid dictionary",
            ),
            (
                json!({"port": "80"}),
                ok.clone(),
                "applications.0.port
  Input should be a valid integer",
            ),
            (json!({"logging_config": {"log_level": 25}}), ok.clone(), "logging_config.log_level"),
            (
                json!({"logging_config": {"enable_access_log": "sometimes"}}),
                ok.clone(),
                "enable_access_log
  Input should be a valid boolean",
            ),
            (
                json!({"logging_config": {"logs_dir": 5}}),
                ok.clone(),
                "logs_dir
  Input should be a valid string",
            ),
            (
                json!({"logging_config": {"additional_log_standard_attrs": ["bogus"]}}),
                ok.clone(),
                "\"bogus\": additional log standard attributes",
            ),
            (
                json!({}),
                json!({"name": "a", "ray_actor_options": null}),
                "deployments.0.ray_actor_options
  Input should not be None",
            ),
            (
                json!({}),
                json!({"name": "a", "max_ongoing_requests": null}),
                "deployments.0.max_ongoing_requests",
            ),
            (json!({}), json!({"name": "a", "logging_config": null}), "deployments.0.logging_config"),
            (
                json!({}),
                json!({"name": "a", "graceful_shutdown_timeout_s": "20s"}),
                "Input should be a valid number",
            ),
            (
                json!({}),
                json!({"name": "a", "rolling_update_percentage": 2}),
                "rolling_update_percentage
  Input should be greater than 0 and at most 1",
            ),
            (json!({}), json!({"name": "a", "max_surge_percent": 101}), "max_surge_percent"),
        ] {
            let e = parse(&app(deployment, top)).unwrap_err().to_string();
            assert!(e.contains(message), "{message}: {e}");
        }
        let e = parse(&json!({"applications": [], "proxy_location": null})).unwrap_err().to_string();
        assert!(e.contains("proxy_location\n  Input should be a valid string"), "{e}");
        // Where Ray's fields are optional, null is taken.
        let optional = json!({"logging_config": null, "route_prefix": null});
        assert!(parse(&app(ok.clone(), optional)).is_ok());
        let logs = json!({"logging_config": {"logs_dir": null, "log_level": 50, "additional_log_standard_attrs": ["name"]}});
        assert!(parse(&app(json!({"name": "a", "num_replicas": null}), logs)).is_ok());
    }
}
