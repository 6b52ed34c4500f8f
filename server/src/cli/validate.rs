//! `sluice validate CONFIG`: every config error at once, then each model loaded once — every
//! deployment's model, its canary, and each version the model repository would serve — and
//! each pipeline's tensors checked between its steps' models, as `run` checks them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sluice_config::{Deployment, Model};
use sluice_deployments::{LoadError, ModelMetadata, backend_factory, check_fits};

/// Validates `path`; `ort_env` is `ORT_DYLIB_PATH`.
pub fn validate(
    path: &Path,
    ort: super::OrtArgs,
    ort_env: Option<PathBuf>,
    store_env: &sluice_controller::StoreEnv,
) -> ExitCode {
    let config = match super::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(code) = super::init_runtime(ort, ort_env) {
        return code;
    }
    let mut deployments: Vec<&Deployment> = config.applications.iter().flat_map(|a| &a.deployments).collect();
    let repository = match &config.model_repository {
        Some(repo) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(sluice_controller::repository::scan_once(repo, store_env))
                    .map_err(|e| e.to_string())
            }) {
            Ok(models) => models,
            Err(e) => {
                eprintln!("{}: model_repository: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => Vec::new(),
    };
    // A repository model named like a deployment of the config: `run` serves the config's
    // and rejects the repository's; validate reports the clash.
    if let Err(e) = sluice_controller::repository::effective(&config, repository.clone()) {
        eprintln!("{}: model_repository: {e}", path.display());
        return ExitCode::from(2);
    }
    deployments.extend(&repository);
    let mut failed = 0;
    // Each deployment's own model's tensors, for the pipelines' check.
    let mut metadata: HashMap<&str, ModelMetadata> = HashMap::new();
    for d in &deployments {
        for (what, model) in models_of(d) {
            match load_once(&model, d) {
                Ok(m) if what.is_empty() => drop(metadata.insert(&d.name, m)),
                Ok(_) => {}
                Err(e) => {
                    let at = d.location;
                    eprintln!("{}:{}:{}: {}{what}: {e}", path.display(), at.line, at.column, d.name);
                    failed += 1;
                }
            }
        }
    }
    for p in config.applications.iter().filter_map(|a| a.pipeline.as_ref()) {
        if let Err(e) = sluice_controller::check_pipeline(p, |name| metadata.get(name)) {
            eprintln!("{}: pipeline `{}`: {e}", path.display(), p.name);
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} error(s) in {}", path.display());
        return ExitCode::from(2);
    }
    outln!(
        "{}: ok ({} application(s), {} deployment(s), {} model(s) loaded)",
        path.display(),
        config.applications.len(),
        deployments.len(),
        deployments.iter().map(|d| models_of(d).len()).sum::<usize>()
    );
    ExitCode::SUCCESS
}

/// Every model a deployment serves: its own, its canary's, its shadow's and its extra
/// versions', each with how to name it in a message.
fn models_of(d: &Deployment) -> Vec<(String, Model)> {
    let mut out = vec![(String::new(), d.model.clone())];
    if let Some(c) = &d.canary {
        out.push((format!(" canary version {}", c.version), Model::Onnx(c.model.clone())));
    }
    if let Some(s) = &d.shadow {
        out.push((format!(" shadow version {}", s.version), Model::Onnx(s.model.clone())));
    }
    for (version, path) in &d.extra_versions {
        out.push((format!(" version {version}"), Model::Onnx(path.clone())));
    }
    out
}

/// Loads `model` once and checks it fits the deployment's settings, as starting it would;
/// answers the tensors it serves.
fn load_once(model: &Model, d: &Deployment) -> Result<ModelMetadata, LoadError> {
    let factory = backend_factory(model, &d.settings, 1, &d.name)?;
    let metadata = factory()?.metadata().clone();
    check_fits(&d.settings, &metadata)?;
    Ok(metadata)
}
