//! Checks that need the whole document: unique names, existing files, values in range.
//! Collects every problem rather than stopping at the first.

use std::collections::HashMap;
use std::path::Path;

use serde_saphyr::{Location, Spanned};

use crate::{Config, ConfigError, ConfigErrors};

pub(crate) fn validate(config: &mut Config, base: &Path) -> Result<(), ConfigErrors> {
    let file = config.source.clone();
    let mut errors = Vec::new();
    let mut err = |loc: Location, field: String, msg: String| {
        errors.push(ConfigError::at(&file, loc, field, msg));
    };

    if !(config.graceful_shutdown_timeout_s >= 0.0 && config.graceful_shutdown_timeout_s.is_finite()) {
        err(Location::UNKNOWN, "graceful_shutdown_timeout_s".into(), "must be 0 or more seconds".into());
    }
    if config.http_options.max_body_bytes == 0 {
        err(Location::UNKNOWN, "http_options.max_body_bytes".into(), "must be at least 1".into());
    }

    if let Some(repo) = &mut config.model_repository {
        repo.path = base.join(&repo.path);
        if !repo.path.is_dir() {
            err(
                Location::UNKNOWN,
                "model_repository.path".into(),
                format!("`{}` is not a folder", repo.path.display()),
            );
        }
        if !(repo.poll_interval_s >= 0.0 && repo.poll_interval_s.is_finite()) {
            err(
                Location::UNKNOWN,
                "model_repository.poll_interval_s".into(),
                "must be 0 or more seconds".into(),
            );
        }
    }
    let mut apps: HashMap<String, Location> = HashMap::new();
    let mut deployments: HashMap<String, Location> = HashMap::new();
    for (a, app) in config.applications.iter_mut().enumerate() {
        let at = format!("applications[{a}]");
        check_name(&app.name, &format!("{at}.name"), &mut err);
        if let Some(first) = apps.insert(app.name.value.clone(), app.name.referenced) {
            err(
                app.name.referenced,
                format!("{at}.name"),
                format!(
                    "duplicate application name `{}` (first defined at line {})",
                    app.name.value,
                    first.line()
                ),
            );
        }
        for (d, dep) in app.deployments.iter_mut().enumerate() {
            let at = format!("{at}.deployments[{d}]");
            check_name(&dep.name, &format!("{at}.name"), &mut err);
            if let Some(first) = deployments.insert(dep.name.value.clone(), dep.name.referenced) {
                err(
                    dep.name.referenced,
                    format!("{at}.name"),
                    format!(
                        "duplicate deployment name `{}` (first defined at line {}); deployment \
                         names are model names and must be unique across the server",
                        dep.name.value,
                        first.line()
                    ),
                );
            }
            match (&mut dep.builtin, dep.model.value.as_os_str().is_empty()) {
                (None, true) => err(
                    dep.name.referenced,
                    format!("{at}.model"),
                    "missing `model` (an ONNX file) or `builtin`".into(),
                ),
                (Some(_), false) => err(
                    dep.model.referenced,
                    format!("{at}.model"),
                    "give `model` or `builtin`, not both".into(),
                ),
                (None, false) => {
                    let resolved = base.join(&dep.model.value);
                    if !resolved.is_file() {
                        err(
                            dep.model.referenced,
                            format!("{at}.model"),
                            format!("model file `{}` not found", resolved.display()),
                        );
                    }
                    dep.model.value = resolved;
                }
                (Some(b), true) => {
                    use crate::Builtin;
                    let file = match b {
                        Builtin::Tokenizer { path, .. } => Some(path),
                        Builtin::Argmax { labels: Some(path) } | Builtin::TopK { labels: Some(path), .. } => {
                            Some(path)
                        }
                        _ => None,
                    };
                    if let Some(path) = file {
                        *path = base.join(&*path);
                        if !path.is_file() {
                            err(
                                dep.name.referenced,
                                format!("{at}.builtin"),
                                format!("file `{}` not found", path.display()),
                            );
                        }
                    }
                }
            }
            check_name(&dep.version, &format!("{at}.version"), &mut err);
            match (&dep.num_replicas.value, &dep.autoscaling_config) {
                (crate::NumReplicas::Fixed(_), Some(a)) if dep.num_replicas.referenced.line() > 0 => err(
                    a.referenced,
                    format!("{at}.autoscaling_config"),
                    "cannot be set together with a fixed num_replicas; use `num_replicas: auto` or leave it out".into(),
                ),
                (crate::NumReplicas::Fixed(0), None) => {
                    err(dep.num_replicas.referenced, format!("{at}.num_replicas"), "must be at least 1".into())
                }
                _ => {}
            }
            if let Some(a) = dep.autoscaling() {
                let loc =
                    dep.autoscaling_config.as_ref().map_or(dep.num_replicas.referenced, |c| c.referenced);
                for (field, problem) in a.problems() {
                    err(loc, format!("{at}.autoscaling_config.{field}"), problem);
                }
            }
            if let Some(c) = &mut dep.canary {
                let resolved = base.join(&c.model.value);
                if !resolved.is_file() {
                    err(
                        c.model.referenced,
                        format!("{at}.canary.model"),
                        format!("model file `{}` not found", resolved.display()),
                    );
                }
                c.model.value = resolved;
                if c.version.value == dep.version.value {
                    err(
                        c.version.referenced,
                        format!("{at}.canary.version"),
                        format!("must differ from the deployment's version `{}`", dep.version.value),
                    );
                }
                check_name(&c.version, &format!("{at}.canary.version"), &mut err);
                if c.weight.value > 100 {
                    err(c.weight.referenced, format!("{at}.canary.weight"), "is a percent: 0 to 100".into());
                }
                if let Some(r) = &c.rollout {
                    if r.step_percent == 0 || r.step_percent > 100 {
                        err(
                            c.weight.referenced,
                            format!("{at}.canary.rollout.step_percent"),
                            "must be 1 to 100".into(),
                        );
                    }
                    if !(r.interval_s > 0.0 && r.interval_s.is_finite()) {
                        err(
                            c.weight.referenced,
                            format!("{at}.canary.rollout.interval_s"),
                            "must be above 0".into(),
                        );
                    }
                    if !(0.0..=1.0).contains(&r.max_error_rate) {
                        err(
                            c.weight.referenced,
                            format!("{at}.canary.rollout.max_error_rate"),
                            "is a fraction: 0 to 1".into(),
                        );
                    }
                }
            }
            if dep.num_cpus.is_some_and(|c| !(c > 0.0 && c.is_finite())) {
                err(dep.name.referenced, format!("{at}.num_cpus"), "must be above 0".into());
            }
            at_least_one(&dep.intra_op_threads, &format!("{at}.intra_op_threads"), &mut err);
            at_least_one(&dep.max_queued_requests, &format!("{at}.max_queued_requests"), &mut err);
            let t = &dep.batch_wait_timeout_s;
            if !(t.value.is_finite() && (0.0..=60.0).contains(&t.value)) {
                err(
                    t.referenced,
                    format!("{at}.batch_wait_timeout_s"),
                    "must be between 0 and 60 seconds".into(),
                );
            }
            let t = &dep.request_timeout_s;
            if !(t.value.is_finite() && t.value > 0.0 && t.value <= 86_400.0) {
                err(
                    t.referenced,
                    format!("{at}.request_timeout_s"),
                    "must be above 0 and at most 86400 seconds".into(),
                );
            }
            let sizes = &dep.preferred_batch_sizes;
            if let Some(bad) = sizes.value.iter().find(|&&n| n == 0 || n > dep.max_batch_size.value) {
                err(
                    sizes.referenced,
                    format!("{at}.preferred_batch_sizes"),
                    format!("{bad} is not between 1 and max_batch_size ({})", dep.max_batch_size.value),
                );
            }
            if !dep.pad.value.is_empty() && dep.max_batch_size.value == 0 {
                err(
                    dep.pad.referenced,
                    format!("{at}.pad"),
                    "padding needs batching: set max_batch_size".into(),
                );
            }
        }
    }
    for (a, app) in config.applications.iter().enumerate() {
        let at = format!("applications[{a}]");
        if let Some(prefix) = &app.route_prefix {
            let p = &prefix.value;
            if !p.starts_with('/')
                || (p.len() > 1 && p.ends_with('/'))
                || p.starts_with("/v2")
                || p.starts_with("/metrics")
            {
                err(
                    prefix.referenced,
                    format!("{at}.route_prefix"),
                    "must start with `/`, not end with `/`, and not be under /v2 or /metrics".into(),
                );
            }
            if app.pipeline.as_ref().is_none_or(|p| p.route.is_none()) {
                err(
                    prefix.referenced,
                    format!("{at}.route_prefix"),
                    "needs a pipeline with a `route`".into(),
                );
            }
        }
        if let Some(p) = &app.pipeline {
            if deployments.contains_key(&p.name.value) {
                err(
                    p.name.referenced,
                    format!("{at}.pipeline.name"),
                    format!("`{}` is already a deployment name", p.name.value),
                );
            }
            let names: Vec<String> = app.deployments.iter().map(|d| d.name.value.clone()).collect();
            if let Err(problems) = p.check(&names) {
                for (loc, field, msg) in problems {
                    err(loc, format!("{at}.pipeline.{field}"), msg);
                }
            }
            if let Some(route) = &p.route {
                if app.route_prefix.is_none() {
                    err(
                        p.name.referenced,
                        format!("{at}.pipeline.route"),
                        "needs the application's `route_prefix`".into(),
                    );
                }
                for tensor in route.request.values() {
                    if !p.inputs.iter().any(|t| &t.name == tensor) {
                        err(
                            p.name.referenced,
                            format!("{at}.pipeline.route.request"),
                            format!("`{tensor}` is not a pipeline input"),
                        );
                    }
                }
                for tensor in route.response.values() {
                    if !p.outputs.contains(tensor) {
                        err(
                            p.name.referenced,
                            format!("{at}.pipeline.route.response"),
                            format!("`{tensor}` is not a pipeline output"),
                        );
                    }
                }
            }
        }
    }
    errors.sort_by_key(|e| (e.line, e.column));
    if errors.is_empty() { Ok(()) } else { Err(ConfigErrors(errors)) }
}

/// Names appear in URL paths: non-empty, no `/`, no whitespace or control characters.
fn check_name(name: &Spanned<String>, field: &str, err: &mut impl FnMut(Location, String, String)) {
    let v = &name.value;
    let bad = v.is_empty() || v.chars().any(|c| c == '/' || c.is_whitespace() || c.is_control());
    if bad {
        err(
            name.referenced,
            field.to_string(),
            format!("`{v}` is not a valid name: use a non-empty name without `/` or spaces"),
        );
    }
}

fn at_least_one(value: &Spanned<u32>, field: &str, err: &mut impl FnMut(Location, String, String)) {
    if value.value == 0 {
        err(value.referenced, field.to_string(), "must be at least 1".to_string());
    }
}
