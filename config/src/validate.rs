//! Checks that need the whole document (unique names, existing files, values in range), and the
//! step from the file's shape to the resolved [`Config`]: paths made absolute, defaults and
//! autoscaling resolved, pipelines put in run order. Collects every problem rather than
//! stopping at the first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_saphyr::{Location, Spanned};

use crate::types::{
    Application, Canary, Config, Deployment, HealthCheck, Model, Pipeline, PipelineStep, Placement,
    ReplicaSettings, Scaling, Shadow,
};
use crate::{ConfigError, ConfigErrors, MAX_WORKER_THREADS, NumReplicas, file};

/// The largest `max_batch_size` accepted.
const MAX_BATCH_SIZE: u32 = 65_536;
/// The largest `max_ongoing_requests` and `max_queued_requests` accepted.
const MAX_REQUESTS: u32 = 1_000_000;
/// The longest `spin_before_sleep_us` accepted (10 ms: past that, sleeping costs less).
const MAX_SPIN_US: u32 = 10_000;

/// Every problem found so far, each at a location of the file.
struct Errors<'a> {
    file: &'a Path,
    /// The file's text, to find the fields of checks on values without a location.
    text: &'a str,
    list: Vec<ConfigError>,
    /// `max_replicas_per_deployment`, which every replica count is checked against.
    max_replicas: u32,
    /// The applications' `route_prefix`es seen so far (unique across the server).
    route_prefixes: HashMap<String, Location>,
}

impl Errors<'_> {
    fn at(&mut self, location: Location, field: impl Into<String>, message: impl Into<String>) {
        let mut error = ConfigError::at(self.file, location, field, message);
        if error.line == 0
            && let Some((line, column)) = crate::error::locate(self.text, &error.field)
        {
            (error.line, error.column) = (line, column);
        }
        self.list.push(error);
    }

    /// Names appear in URL paths: non-empty, not `.` or `..`, none of `/ ? # %` (they end or
    /// escape a path segment) or `{ }` (route patterns: Ray's clients refuse a route prefix
    /// holding them, and Ray Serve's status shows each application's), no whitespace or
    /// control characters.
    fn check_name(&mut self, name: &Spanned<String>, field: &str) {
        let v = &name.value;
        if !crate::valid_name(v) {
            self.at(name.referenced, field, format!("`{v}` is not a valid name: use {}", crate::NAME_RULE));
        }
    }

    fn at_least_one(&mut self, value: &Spanned<u32>, field: &str) {
        if value.value == 0 {
            self.at(value.referenced, field, "must be at least 1");
        }
    }

    /// `path` made absolute against `base`, with an error naming `what` when no file is there.
    fn existing_file(
        &mut self,
        base: &Path,
        path: &Path,
        location: Location,
        field: &str,
        what: &str,
    ) -> PathBuf {
        let resolved = base.join(path);
        if resolved.is_dir() {
            self.at(location, field, format!("{what} `{}` is a folder, not a file", resolved.display()));
        } else if !resolved.is_file() {
            self.at(location, field, format!("{what} `{}` not found", resolved.display()));
        }
        resolved
    }
}

/// Validates a parsed file and resolves it; `source` is the file it came from.
/// `addresses`: whether the listeners' hosts and ports are checked against each other here (a
/// command line that changes them checks them after, [`crate::check_addresses`]).
pub(crate) fn validate(
    doc: file::Config,
    source: &Path,
    text: &str,
    addresses: bool,
) -> Result<Config, ConfigErrors> {
    // Absolute, so the same file gives the same model paths wherever it is read from (a
    // server started with `run c.yaml` and a `deploy` from the admin API compare equal).
    let parent = source.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let base = std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf());
    let max_replicas = doc.max_replicas_per_deployment.value;
    let mut errs =
        Errors { file: source, text, list: Vec::new(), max_replicas, route_prefixes: HashMap::new() };
    validate_top(&doc, &mut errs);
    let mut model_repository = doc.model_repository;
    if let Some(repo) = &mut model_repository {
        validate_repository(repo, &base, &mut errs);
    }
    let mut apps: HashMap<String, Location> = HashMap::new();
    let mut deployments: HashMap<String, Location> = HashMap::new();
    let mut applications = Vec::new();
    for (a, app) in doc.applications.into_iter().enumerate() {
        let at = format!("applications[{a}]");
        errs.check_name(&app.name, &format!("{at}.name"));
        if model_repository.is_some() && app.name.value == crate::REPOSITORY_APPLICATION {
            errs.at(
                app.name.referenced,
                format!("{at}.name"),
                format!(
                    "the application name `{}` is the model repository's; choose another",
                    app.name.value
                ),
            );
        }
        if let Some(first) = apps.insert(app.name.value.clone(), app.name.referenced) {
            errs.at(
                app.name.referenced,
                format!("{at}.name"),
                format!(
                    "duplicate application name `{}` (first defined at line {})",
                    app.name.value,
                    first.line()
                ),
            );
        }
        applications.push(validate_application(&at, app, &base, &mut deployments, &mut errs));
    }
    let (mut http_options, mut grpc_options, mut admin_options) =
        (doc.http_options, doc.grpc_options, doc.admin_options);
    for (field, message) in crate::tls::check_listeners(
        &mut http_options,
        &mut grpc_options,
        &mut admin_options,
        &base,
        addresses,
    ) {
        errs.at(Location::UNKNOWN, field, message);
    }
    let mut list = errs.list;
    list.sort_by_key(|e| (e.line, e.column));
    if !list.is_empty() {
        return Err(ConfigErrors(list));
    }
    Ok(Config {
        http_options,
        grpc_options,
        admin_options,
        graceful_shutdown_timeout_s: doc.graceful_shutdown_timeout_s.value,
        shutdown_delay_s: doc.shutdown_delay_s.value,
        applications,
        model_repository,
        cluster: doc.cluster,
        proxy_location: doc.proxy_location,
        tracing_options: doc.tracing_options,
        log_format: doc.log_format,
        worker_threads: doc.worker_threads.as_ref().map(|n| n.value),
        release_startup_memory: doc.release_startup_memory,
        max_replicas_per_deployment: doc.max_replicas_per_deployment.value,
        source: source.to_path_buf(),
    })
}

fn validate_top(doc: &file::Config, errs: &mut Errors<'_>) {
    let unknown = Location::UNKNOWN;
    for (field, value) in [
        ("graceful_shutdown_timeout_s", &doc.graceful_shutdown_timeout_s),
        ("shutdown_delay_s", &doc.shutdown_delay_s),
    ] {
        if !(0.0..=crate::MAX_SECONDS).contains(&value.value) {
            errs.at(value.referenced, field, format!("must be 0 to {:e} seconds", crate::MAX_SECONDS));
        }
    }
    let max_replicas = &doc.max_replicas_per_deployment;
    if max_replicas.value == 0 {
        errs.at(max_replicas.referenced, "max_replicas_per_deployment", "must be at least 1");
    }
    if let Some(n) = &doc.worker_threads
        && !(1..=MAX_WORKER_THREADS).contains(&n.value)
    {
        errs.at(n.referenced, "worker_threads", format!("must be 1 to {MAX_WORKER_THREADS}"));
    }
    if !(0.0..=1.0).contains(&doc.tracing_options.sample_ratio) {
        errs.at(unknown, "tracing_options.sample_ratio", "must be 0 to 1 (a share of requests)");
    }
    // Plain OTLP/gRPC only (no TLS to the collector): the exporter takes a bare `HOST:PORT`, the
    // usual way of writing it, for https and then fails at start with advice about its build.
    if let Some(endpoint) = &doc.tracing_options.otlp_endpoint
        && endpoint.strip_prefix("http://").is_none_or(|h| h.is_empty() || h.starts_with(['/', ':']))
    {
        errs.at(
            unknown,
            "tracing_options.otlp_endpoint",
            format!(
                "`{endpoint}`: must be `http://HOST:PORT` (OTLP/gRPC in plain text; Sluice sends no TLS to the \
                 collector)"
            ),
        );
    }
    for (field, problem) in body_limits(&doc.http_options) {
        errs.at(unknown, field, problem);
    }
    if let Some(ray) = &doc.cluster.ray {
        if !(ray.address.is_empty()
            || ray.address.starts_with("http://")
            || ray.address.starts_with("https://"))
        {
            errs.at(unknown, "cluster.ray.address", "must be the Ray dashboard's URL, `http://HEAD:8265`");
        }
        for (field, seconds) in [
            ("start_timeout_s", ray.start_timeout_s),
            ("replica_start_timeout_s", ray.replica_start_timeout_s),
        ] {
            if !(seconds > 0.0 && seconds <= crate::MAX_SECONDS) {
                errs.at(
                    unknown,
                    format!("cluster.ray.{field}"),
                    format!("must be above 0 seconds, at most {:e}", crate::MAX_SECONDS),
                );
            }
        }
    }
}

fn validate_repository(repo: &mut crate::ModelRepository, base: &Path, errs: &mut Errors<'_>) {
    let unknown = Location::UNKNOWN;
    match crate::repository::locate(&repo.path, base) {
        Ok(location) => repo.location = location,
        Err(message) => errs.at(unknown, "model_repository.path", message),
    }
    if let crate::RepositoryLocation::Local(path) = &repo.location
        && !path.is_dir()
    {
        errs.at(unknown, "model_repository.path", format!("`{}` is not a folder", path.display()));
    }
    repo.cache_dir = base.join(&repo.cache_dir);
    if !(0.0..=crate::MAX_SECONDS).contains(&repo.poll_interval_s) {
        errs.at(
            unknown,
            "model_repository.poll_interval_s",
            format!("must be 0 to {:e} seconds", crate::MAX_SECONDS),
        );
    }
    if !(repo.store_timeout_s > 0.0 && repo.store_timeout_s <= crate::MAX_SECONDS) {
        errs.at(
            unknown,
            "model_repository.store_timeout_s",
            format!("must be above 0 seconds, at most {:e}", crate::MAX_SECONDS),
        );
    }
    if repo.num_replicas > errs.max_replicas {
        let max = errs.max_replicas;
        errs.at(
            unknown,
            "model_repository.num_replicas",
            format!("must be at most {max} (max_replicas_per_deployment)"),
        );
    }
    if repo.max_version_bytes == 0 {
        errs.at(unknown, "model_repository.max_version_bytes", "must be at least 1");
    }
    if repo.num_replicas == 0 {
        errs.at(unknown, "model_repository.num_replicas", "must be at least 1");
    }
    if repo.max_batch_size > MAX_BATCH_SIZE {
        errs.at(unknown, "model_repository.max_batch_size", format!("must be at most {MAX_BATCH_SIZE}"));
    }
    // Names beginning with a dot are left out of every listing (editors' and stores' own
    // files): such a marker would never be seen, and no version ever counted complete.
    if repo.ready_marker.contains('/')
        || repo.ready_marker == "model.onnx"
        || repo.ready_marker.starts_with('.')
    {
        errs.at(
            unknown,
            "model_repository.ready_marker",
            "must be a file name other than model.onnx, not beginning with a dot",
        );
    }
    // A policy that selects nothing would unload every repository model without an error.
    match &repo.version_policy {
        crate::VersionPolicy::Latest(0) => {
            errs.at(unknown, "model_repository.version_policy", "latest must be at least 1")
        }
        crate::VersionPolicy::Specific(v) if v.is_empty() => {
            errs.at(unknown, "model_repository.version_policy", "specific must list at least one version")
        }
        _ => {}
    }
    if let Some(r) = &repo.rollout {
        if r.canary_weight == 0 || r.canary_weight > 100 {
            errs.at(unknown, "model_repository.rollout.canary_weight", "is a percent: 1 to 100");
        }
        check_rollout(&r.rollout(), "model_repository.rollout", unknown, errs);
    }
}

/// The bounds of an automatic rollout, wherever it is written.
fn check_rollout(r: &crate::Rollout, at: &str, loc: Location, errs: &mut Errors<'_>) {
    if r.step_percent == 0 || r.step_percent > 100 {
        errs.at(loc, format!("{at}.step_percent"), "must be 1 to 100");
    }
    if !(r.interval_s > 0.0 && r.interval_s <= crate::MAX_SECONDS) {
        errs.at(
            loc,
            format!("{at}.interval_s"),
            format!("must be above 0 seconds, at most {:e}", crate::MAX_SECONDS),
        );
    }
    if !(0.0..=1.0).contains(&r.max_error_rate) {
        errs.at(loc, format!("{at}.max_error_rate"), "is a fraction: 0 to 1");
    }
    if r.max_p99_ms.is_some_and(|p| !(p > 0.0 && p.is_finite())) {
        errs.at(loc, format!("{at}.max_p99_ms"), "must be above 0 milliseconds");
    }
    if r.min_shadow_agreement.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
        errs.at(loc, format!("{at}.min_shadow_agreement"), "is a fraction: 0 to 1");
    }
}

/// `names`: every deployment name seen so far (they are model names, unique server-wide).
fn validate_application(
    at: &str,
    app: file::Application,
    base: &Path,
    names: &mut HashMap<String, Location>,
    errs: &mut Errors<'_>,
) -> Application {
    let mut deployments = Vec::new();
    for (d, dep) in app.deployments.iter().enumerate() {
        let at = format!("{at}.deployments[{d}]");
        if let Some(first) = names.insert(dep.name.value.clone(), dep.name.referenced) {
            errs.at(
                dep.name.referenced,
                format!("{at}.name"),
                format!(
                    "duplicate deployment name `{}` (first defined at line {}); deployment names are \
                     model names and must be unique across the server",
                    dep.name.value,
                    first.line()
                ),
            );
        }
        deployments.push(validate_deployment(&at, dep, base, errs));
    }
    if let Some(prefix) = &app.route_prefix {
        let p = &prefix.value;
        // Matched against the request's path as it comes, escapes and all: a character a
        // client sends escaped (a space, `é`), or one that ends the path (`?`, `#`), could
        // never match; the server's own paths take the request first.
        let sent_as_is = |c: char| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '%' | '{' | '}');
        // The server's own paths: these and everything under them (`/v2x` is not under `/v2`).
        let own =
            |root: &str| p.strip_prefix(root).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if !p.starts_with('/')
            || (p.len() > 1 && p.ends_with('/'))
            || ["/v2", "/metrics", "/-", "/openapi.json"].into_iter().any(own)
            || !p.chars().all(sent_as_is)
        {
            errs.at(
                prefix.referenced,
                format!("{at}.route_prefix"),
                "must start with `/`, not end with `/`, hold visible ASCII other than `? # % { }`, and not be \
                 /v2, /metrics, /-, /openapi.json or under them",
            );
        }
        if app.pipeline.as_ref().is_none_or(|p| p.route.is_none()) {
            errs.at(prefix.referenced, format!("{at}.route_prefix"), "needs a pipeline with a `route`");
        }
        if let Some(first) = errs.route_prefixes.insert(p.clone(), prefix.referenced) {
            errs.at(
                prefix.referenced,
                format!("{at}.route_prefix"),
                format!("`{p}` is already another application's route_prefix (line {})", first.line()),
            );
        }
    }
    let pipeline = app.pipeline.as_ref().and_then(|p| validate_pipeline(at, &app, p, names, errs));
    // A pipeline's name is a model name too: unique among deployments and pipelines.
    if let Some(p) = &app.pipeline {
        names.entry(p.name.value.clone()).or_insert(p.name.referenced);
    }
    Application {
        name: app.name.value,
        route_prefix: app.route_prefix.map(|p| p.value),
        deployments,
        pipeline,
        ignored: Vec::new(),
    }
}

fn validate_deployment(at: &str, dep: &file::Deployment, base: &Path, errs: &mut Errors<'_>) -> Deployment {
    errs.check_name(&dep.name, &format!("{at}.name"));
    let model = match (&dep.builtin, dep.model.value.as_os_str().is_empty()) {
        (None, true) if dep.multiplex.is_some() => validate_multiplex(at, dep, base, errs),
        (Some(_), _) | (_, false) if dep.multiplex.is_some() => {
            let loc = dep.multiplex.as_ref().map_or(dep.name.referenced, |m| m.referenced);
            errs.at(loc, format!("{at}.multiplex"), "give `multiplex`, `model` or `builtin`, one of them");
            Model::Onnx(PathBuf::new())
        }
        (None, true) => {
            errs.at(
                dep.name.referenced,
                format!("{at}.model"),
                "missing `model` (an ONNX file) or `builtin`",
            );
            Model::Onnx(PathBuf::new())
        }
        (Some(_), false) => {
            errs.at(dep.model.referenced, format!("{at}.model"), "give `model` or `builtin`, not both");
            Model::Onnx(PathBuf::new())
        }
        (None, false) => {
            let field = format!("{at}.model");
            Model::Onnx(errs.existing_file(
                base,
                &dep.model.value,
                dep.model.referenced,
                &field,
                "model file",
            ))
        }
        (Some(b), true) => {
            let mut b = b.clone();
            for path in b.files_mut() {
                *path = errs.existing_file(base, path, dep.name.referenced, &format!("{at}.builtin"), "file");
            }
            Model::Builtin(b)
        }
    };
    errs.check_name(&dep.version, &format!("{at}.version"));
    let scaling = validate_scaling(at, dep, errs);
    let canary = dep.canary.as_ref().map(|c| validate_canary(at, c, &dep.version.value, base, errs));
    let shadow = dep.shadow.as_ref().map(|s| {
        let field = format!("{at}.shadow.model");
        let model = errs.existing_file(base, &s.model.value, s.model.referenced, &field, "model file");
        let taken = std::iter::once(&dep.version.value).chain(dep.canary.as_ref().map(|c| &c.version.value));
        if taken.into_iter().any(|v| *v == s.version.value) {
            errs.at(
                s.version.referenced,
                format!("{at}.shadow.version"),
                "must differ from the deployment's and its canary's version",
            );
        }
        errs.check_name(&s.version, &format!("{at}.shadow.version"));
        if s.percent.value > 100 {
            errs.at(s.percent.referenced, format!("{at}.shadow.percent"), "is a percent: 0 to 100");
        }
        if dep
            .canary
            .as_ref()
            .and_then(|c| c.rollout.as_ref())
            .is_some_and(|r| r.min_shadow_agreement.is_some())
        {
            errs.at(
                s.version.referenced,
                format!("{at}.shadow"),
                "a deployment has one shadow, and `canary.rollout.min_shadow_agreement` makes the canary it",
            );
        }
        Shadow { model, version: s.version.value.clone(), percent: s.percent.value }
    });
    // A canary or shadow is one model file: the requests of a multiplexed deployment name
    // models of its folder, which it does not have (each was answered 400, unseen by the gate).
    if dep.multiplex.is_some() {
        let taken = [
            dep.canary.as_ref().map(|c| ("canary", c.model.referenced)),
            dep.shadow.as_ref().map(|s| ("shadow", s.model.referenced)),
        ];
        for (field, loc) in taken.into_iter().flatten() {
            errs.at(
                loc,
                format!("{at}.{field}"),
                format!(
                    "a multiplexed deployment cannot have a {field}: it is one model file, and the \
                     deployment's requests name models of its folder"
                ),
            );
        }
    }
    let placement = validate_placement(at, dep, errs);
    errs.at_least_one(&dep.intra_op_threads, &format!("{at}.intra_op_threads"));
    errs.at_least_one(&dep.max_queued_requests, &format!("{at}.max_queued_requests"));
    // Replica queues are sized from these; an absurd value must be an error, not an allocation
    // (nor a hundred thousand threads per replica).
    for (field, value, max) in [
        ("intra_op_threads", &dep.intra_op_threads, crate::MAX_WORKER_THREADS),
        ("max_batch_size", &dep.max_batch_size, MAX_BATCH_SIZE),
        ("max_ongoing_requests", &dep.max_ongoing_requests, MAX_REQUESTS),
        ("max_queued_requests", &dep.max_queued_requests, MAX_REQUESTS),
        ("spin_before_sleep_us", &dep.spin_before_sleep_us, MAX_SPIN_US),
    ] {
        if value.value > max {
            errs.at(value.referenced, format!("{at}.{field}"), format!("must be at most {max}"));
        }
    }
    let t = &dep.batch_wait_timeout_s;
    if !(t.value.is_finite() && (0.0..=60.0).contains(&t.value)) {
        errs.at(t.referenced, format!("{at}.batch_wait_timeout_s"), "must be between 0 and 60 seconds");
    }
    let t = &dep.request_timeout_s;
    if !(t.value.is_finite() && t.value > 0.0 && t.value <= 86_400.0) {
        errs.at(t.referenced, format!("{at}.request_timeout_s"), "must be above 0 and at most 86400 seconds");
    }
    let sizes = &dep.preferred_batch_sizes;
    if let Some(bad) = sizes.value.iter().find(|&&n| n == 0 || n > dep.max_batch_size.value) {
        errs.at(
            sizes.referenced,
            format!("{at}.preferred_batch_sizes"),
            format!("{bad} is not between 1 and max_batch_size ({})", dep.max_batch_size.value),
        );
    }
    if !dep.pad.value.is_empty() && dep.max_batch_size.value == 0 {
        errs.at(dep.pad.referenced, format!("{at}.pad"), "padding needs batching: set max_batch_size");
    }
    // An infinity pads an additive mask; NaN is never equal to itself, so the deployment would
    // read as changed (new replicas) on every apply.
    if let Some(name) = dep.pad.value.iter().find(|(_, v)| v.is_nan()).map(|(k, _)| k) {
        errs.at(dep.pad.referenced, format!("{at}.pad"), format!("`{name}`: NaN is not a pad value"));
    }
    Deployment {
        name: dep.name.value.clone(),
        version: dep.version.value.clone(),
        model,
        settings: ReplicaSettings {
            intra_op_threads: dep.intra_op_threads.value,
            cpu_memory_arena: dep.cpu_memory_arena,
            memory_pattern: dep.memory_pattern,
            share_weights: dep.share_weights,
            max_batch_size: dep.max_batch_size.value,
            batch_wait_timeout_s: dep.batch_wait_timeout_s.value,
            preferred_batch_sizes: dep.preferred_batch_sizes.value.clone(),
            pad: dep.pad.value.clone(),
            request_timeout_s: dep.request_timeout_s.value,
            max_ongoing_requests: dep.max_ongoing_requests.value,
            max_queued_requests: dep.max_queued_requests.value,
            warmup: dep.warmup,
            run_inline_under_us: dep.run_inline_under_us.value,
            spin_before_sleep_us: dep.spin_before_sleep_us.value,
            placement,
            health_check: validate_health_check(at, dep, errs),
        },
        scaling,
        canary,
        shadow,
        extra_versions: Vec::new(),
        location: if dep.model.referenced.line() > 0 { dep.model.referenced } else { dep.name.referenced }
            .into(),
    }
}

/// A multiplexed deployment's folder: it must hold at least one `<model_id>/model.onnx`.
fn validate_multiplex(at: &str, dep: &file::Deployment, base: &Path, errs: &mut Errors<'_>) -> Model {
    let Some(m) = &dep.multiplex else { return Model::Onnx(PathBuf::new()) };
    let dir = base.join(&m.value.path);
    let has_model = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(Result::ok).any(|e| e.path().join("model.onnx").is_file()))
        .unwrap_or(false);
    if !has_model {
        errs.at(
            m.referenced,
            format!("{at}.multiplex.path"),
            format!("`{}` holds no `<model_id>/model.onnx`", dir.display()),
        );
    }
    if m.value.max_num_models_per_replica == 0 {
        errs.at(m.referenced, format!("{at}.multiplex.max_num_models_per_replica"), "must be at least 1");
    }
    Model::Multiplexed { dir, max_models_per_replica: m.value.max_num_models_per_replica }
}

/// `num_cpus`, `ray_actor_options` and `max_replicas_per_node` into one [`Placement`].
fn validate_placement(at: &str, dep: &file::Deployment, errs: &mut Errors<'_>) -> Placement {
    let options = dep.ray_actor_options.as_ref();
    let loc = options.map_or(dep.name.referenced, |o| o.referenced);
    let o = options.map(|o| o.value.clone()).unwrap_or_default();
    let num_cpus = match (dep.num_cpus, o.num_cpus) {
        (Some(a), Some(b)) if a != b => {
            errs.at(
                loc,
                format!("{at}.ray_actor_options.num_cpus"),
                format!("{b} differs from num_cpus ({a}); give one"),
            );
            a
        }
        (Some(c), _) | (None, Some(c)) => c,
        (None, None) => dep.intra_op_threads.value as f64,
    };
    if !(num_cpus >= 0.0 && num_cpus.is_finite()) || (num_cpus == 0.0 && dep.num_cpus.is_some()) {
        errs.at(loc, format!("{at}.num_cpus"), "must be above 0");
    }
    let num_gpus = o.num_gpus.unwrap_or(0.0);
    if !(num_gpus >= 0.0 && num_gpus.is_finite()) {
        errs.at(loc, format!("{at}.ray_actor_options.num_gpus"), "must be 0 or more");
    } else if num_gpus > 1.0 && num_gpus.fract() != 0.0 {
        errs.at(
            loc,
            format!("{at}.ray_actor_options.num_gpus"),
            "above 1 must be a whole number (Ray's rule)",
        );
    }
    if let Some((name, _)) = o.resources.iter().find(|(_, v)| !(**v >= 0.0 && v.is_finite())) {
        errs.at(loc, format!("{at}.ray_actor_options.resources.{name}"), "must be 0 or more");
    }
    // Ray's own resources have settings of their own; the job's driver refuses them here (each
    // replica would be refused at every start, until the deployment gave up).
    if let Some(name) =
        o.resources.keys().find(|k| ["CPU", "GPU", "memory", "object_store_memory"].contains(&k.as_str()))
    {
        errs.at(
            loc,
            format!("{at}.ray_actor_options.resources.{name}"),
            "is one of Ray's own resources: use num_cpus, num_gpus or memory",
        );
    }
    // Ray Serve's range; each replica asks Ray for 1/N of a per-node resource, which Ray holds
    // to four decimals: exact up to 100.
    if let Some(n) = &dep.max_replicas_per_node
        && !(1..=100).contains(&n.value)
    {
        errs.at(n.referenced, format!("{at}.max_replicas_per_node"), "must be 1 to 100");
    }
    Placement {
        num_cpus,
        num_gpus,
        memory: o.memory,
        resources: o.resources,
        accelerator_type: o.accelerator_type,
        max_replicas_per_node: dep.max_replicas_per_node.as_ref().map(|n| n.value),
    }
}

fn validate_health_check(at: &str, dep: &file::Deployment, errs: &mut Errors<'_>) -> HealthCheck {
    for (field, v) in [
        ("health_check_period_s", &dep.health_check_period_s),
        ("health_check_timeout_s", &dep.health_check_timeout_s),
    ] {
        if !(v.value > 0.0 && v.value <= crate::MAX_SECONDS) {
            errs.at(
                v.referenced,
                format!("{at}.{field}"),
                format!("must be above 0 seconds, at most {:e}", crate::MAX_SECONDS),
            );
        }
    }
    HealthCheck { period_s: dep.health_check_period_s.value, timeout_s: dep.health_check_timeout_s.value }
}

/// `num_replicas` and `autoscaling_config` into one [`Scaling`].
fn validate_scaling(at: &str, dep: &file::Deployment, errs: &mut Errors<'_>) -> Scaling {
    let auto = dep.num_replicas.value == NumReplicas::Auto;
    let written = dep.num_replicas.referenced.line() > 0;
    match (dep.num_replicas.value, &dep.autoscaling_config) {
        (NumReplicas::Fixed(_), Some(a)) if written => {
            errs.at(
                a.referenced,
                format!("{at}.autoscaling_config"),
                "cannot be set together with a fixed num_replicas; use `num_replicas: auto` or leave it out",
            );
            Scaling::Fixed(1)
        }
        (NumReplicas::Fixed(0), None) => {
            errs.at(dep.num_replicas.referenced, format!("{at}.num_replicas"), "must be at least 1");
            Scaling::Fixed(1)
        }
        (NumReplicas::Fixed(n), None) if n > errs.max_replicas => {
            let max = errs.max_replicas;
            errs.at(
                dep.num_replicas.referenced,
                format!("{at}.num_replicas"),
                format!("{n} is more than max_replicas_per_deployment ({max})"),
            );
            Scaling::Fixed(max)
        }
        (NumReplicas::Fixed(n), None) => Scaling::Fixed(n),
        (_, config) => {
            let mut resolved = config
                .as_ref()
                .map(|c| c.value.resolve(auto))
                .unwrap_or_else(|| crate::AutoscalingConfig::default().resolve(true));
            let loc = config.as_ref().map_or(dep.num_replicas.referenced, |c| c.referenced);
            // Ray's default ceiling (100 for `auto`) gives way to a lower one here.
            if config.as_ref().is_none_or(|c| c.value.max_replicas.is_none()) {
                resolved.max_replicas =
                    resolved.max_replicas.min(errs.max_replicas).max(resolved.min_replicas);
            }
            for (field, problem) in resolved.problems() {
                errs.at(loc, format!("{at}.autoscaling_config.{field}"), problem);
            }
            let max = errs.max_replicas;
            if let Some((field, n)) =
                [("min_replicas", resolved.min_replicas), ("max_replicas", resolved.max_replicas)]
                    .into_iter()
                    .find(|&(_, n)| n > max)
            {
                errs.at(
                    loc,
                    format!("{at}.autoscaling_config.{field}"),
                    format!("{n} is more than max_replicas_per_deployment ({max})"),
                );
            }
            Scaling::Auto(resolved)
        }
    }
}

fn validate_canary(at: &str, c: &file::Canary, version: &str, base: &Path, errs: &mut Errors<'_>) -> Canary {
    let field = format!("{at}.canary.model");
    let model = errs.existing_file(base, &c.model.value, c.model.referenced, &field, "model file");
    if c.version.value == version {
        errs.at(
            c.version.referenced,
            format!("{at}.canary.version"),
            format!("must differ from the deployment's version `{version}`"),
        );
    }
    errs.check_name(&c.version, &format!("{at}.canary.version"));
    if c.weight.value > 100 {
        errs.at(c.weight.referenced, format!("{at}.canary.weight"), "is a percent: 0 to 100");
    }
    if let Some(r) = &c.rollout {
        check_rollout(r, &format!("{at}.canary.rollout"), c.weight.referenced, errs);
    }
    Canary {
        model,
        version: c.version.value.clone(),
        weight: c.weight.value,
        rollout: c.rollout.clone(),
        auto_promote: false,
    }
}

fn validate_pipeline(
    at: &str,
    app: &file::Application,
    p: &crate::pipeline::Pipeline,
    names: &HashMap<String, Location>,
    errs: &mut Errors<'_>,
) -> Option<Pipeline> {
    // A model name on the wire (`/v2/models/{name}`), as a deployment's is.
    errs.check_name(&p.name, &format!("{at}.pipeline.name"));
    if let Some(first) = names.get(&p.name.value) {
        errs.at(
            p.name.referenced,
            format!("{at}.pipeline.name"),
            format!(
                "`{}` is already the name of a deployment or pipeline (line {}); model names are unique across the server",
                p.name.value,
                first.line()
            ),
        );
    }
    let deployments: Vec<String> = app.deployments.iter().map(|d| d.name.value.clone()).collect();
    let order = match p.check(&deployments) {
        Ok(order) => order,
        Err(problems) => {
            for (loc, field, msg) in problems {
                errs.at(loc, format!("{at}.pipeline.{field}"), msg);
            }
            Vec::new()
        }
    };
    if let Some(route) = &p.route {
        if app.route_prefix.is_none() {
            errs.at(
                p.name.referenced,
                format!("{at}.pipeline.route"),
                "needs the application's `route_prefix`",
            );
        }
        for tensor in route.request.values().filter(|t| !p.inputs.iter().any(|i| &&i.name == t)) {
            errs.at(
                p.name.referenced,
                format!("{at}.pipeline.route.request"),
                format!("`{tensor}` is not a pipeline input"),
            );
        }
        for tensor in route.response.values().filter(|t| !p.outputs.contains(t)) {
            errs.at(
                p.name.referenced,
                format!("{at}.pipeline.route.response"),
                format!("`{tensor}` is not a pipeline output"),
            );
        }
        // Each input from exactly one field (a request could not fill one mapped twice, nor one
        // left out); each output in one field.
        for input in &p.inputs {
            let fields: Vec<&String> =
                route.request.iter().filter(|(_, t)| **t == input.name).map(|(f, _)| f).collect();
            if fields.is_empty() {
                errs.at(
                    p.name.referenced,
                    format!("{at}.pipeline.route.request"),
                    format!("the pipeline input `{}` comes from no field", input.name),
                );
            } else if fields.len() > 1 {
                errs.at(
                    p.name.referenced,
                    format!("{at}.pipeline.route.request"),
                    format!("the pipeline input `{}` comes from more than one field: {fields:?}", input.name),
                );
            }
        }
        for output in &p.outputs {
            let fields: Vec<&String> =
                route.response.iter().filter(|(_, t)| *t == output).map(|(f, _)| f).collect();
            if fields.len() > 1 {
                errs.at(
                    p.name.referenced,
                    format!("{at}.pipeline.route.response"),
                    format!("the pipeline output `{output}` goes to more than one field: {fields:?}"),
                );
            }
        }
    }
    Some(Pipeline {
        name: p.name.value.clone(),
        inputs: p.inputs.clone(),
        steps: p
            .steps
            .iter()
            .map(|s| PipelineStep {
                name: s.name.value.clone(),
                deployment: s.deployment.value.clone(),
                inputs: s.inputs.clone(),
                outputs: s.outputs.clone(),
            })
            .collect(),
        outputs: p.outputs.clone(),
        route: p.route.clone(),
        order,
    })
}

/// What is wrong with the request body limits: each problem's field and what it must be.
pub(crate) fn body_limits(http: &crate::HttpOptions) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    if http.max_body_bytes == 0 {
        problems.push(("http_options.max_body_bytes".into(), "must be at least 1".into()));
    }
    if http.max_body_bytes_in_flight < http.max_body_bytes {
        let problem = format!(
            "must be at least http_options.max_body_bytes ({}): a body that large could never be read",
            http.max_body_bytes
        );
        problems.push(("http_options.max_body_bytes_in_flight".into(), problem));
    }
    problems
}
