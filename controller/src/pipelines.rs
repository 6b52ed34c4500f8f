//! Pipelines over the deployments a plan leaves running, built (and their tensors checked
//! between steps) before anything is committed.

use std::sync::Arc;

use sluice_config::Config;
use sluice_deployments::pipeline::{JsonMapping, Step, StepTypes, check_types, tensor_spec};
use sluice_deployments::{Deployment, LoadError, ModelMetadata, Pipeline};

use crate::ControlError;
use crate::reconcile::Plan;
use crate::state::{ControllerState, PipelineRoute};

/// Every pipeline of `config`, over the new primaries `plan` starts and the running ones it
/// keeps.
pub(crate) fn build_all(
    config: &Config,
    plan: &Plan,
    state: &ControllerState,
) -> Result<Vec<PipelineRoute>, ControlError> {
    let lookup = |name: &str| {
        plan.new_primary(name)
            .cloned()
            .or_else(|| state.deployments.get(name).map(|m| m.primary.deployment.clone()))
    };
    build_over(config, &lookup, &state.pipelines)
}

/// Every pipeline of `config`, over the deployments `lookup` finds (their types checked), each
/// counting on in the statistics of the one of its name in `previous`.
pub(crate) fn build_over(
    config: &Config,
    lookup: &impl Fn(&str) -> Option<Arc<Deployment>>,
    previous: &[PipelineRoute],
) -> Result<Vec<PipelineRoute>, ControlError> {
    config
        .applications
        .iter()
        .filter_map(|app| app.pipeline.as_ref().map(|p| (app, p)))
        .map(|(app, p)| {
            let old = previous.iter().find(|r| r.pipeline.name() == p.name).map(|r| &*r.pipeline);
            let pipeline = build(p, lookup, old)
                .map_err(|source| ControlError::Pipeline { pipeline: p.name.clone(), source })?;
            Ok(PipelineRoute { app: app.name.clone(), pipeline, route_prefix: app.route_prefix.clone() })
        })
        .collect()
}

/// A pipeline's input tensors as its config declares them.
fn inputs(p: &sluice_config::Pipeline) -> Result<Vec<sluice_deployments::TensorSpec>, LoadError> {
    p.inputs.iter().map(|t| tensor_spec(&t.name, &t.datatype, &t.shape)).collect()
}

/// The type check a pipeline's load runs (each tensor's datatype and rank the same where it
/// is produced and where it is read), over the models' metadata alone: for `sluice validate`,
/// which loads each model but starts no deployment. `metadata` finds a step deployment's
/// model; a step whose model it does not find (one that failed to load) ends the check with
/// `Ok`, the load's error being the one to report.
pub fn check<'a>(
    p: &'a sluice_config::Pipeline,
    metadata: impl Fn(&str) -> Option<&'a ModelMetadata>,
) -> Result<(), LoadError> {
    let inputs = inputs(p)?;
    let mut steps = Vec::new();
    for &i in &p.order {
        let s = &p.steps[i];
        let Some(metadata) = metadata(&s.deployment) else { return Ok(()) };
        steps.push(StepTypes {
            step: &s.name,
            deployment: &s.deployment,
            metadata,
            inputs: s.inputs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
            outputs: s.outputs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
        });
    }
    check_types(&inputs, steps, &p.outputs).map(drop).map_err(LoadError::Pipeline)
}

/// A running pipeline from its (validated) config, over the deployments `lookup` finds.
fn build(
    p: &sluice_config::Pipeline,
    lookup: &impl Fn(&str) -> Option<Arc<Deployment>>,
    old: Option<&Pipeline>,
) -> Result<Arc<Pipeline>, LoadError> {
    let inputs = inputs(p)?;
    let mut steps = Vec::new();
    for &i in &p.order {
        let s = &p.steps[i];
        let deployment = lookup(&s.deployment).ok_or_else(|| {
            LoadError::Pipeline(format!("step `{}`: unknown deployment `{}`", s.name, s.deployment))
        })?;
        steps.push(Step {
            name: s.name.clone(),
            deployment,
            inputs: s.inputs.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
            outputs: s.outputs.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
        });
    }
    let json = p.route.as_ref().map(|r| JsonMapping {
        request: r.request.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
        response: r.response.iter().map(|(a, b)| (a.clone(), b.clone())).collect(),
    });
    let pipeline = Pipeline::new(&p.name, inputs, steps, &p.outputs, json)?;
    Ok(Arc::new(match old {
        Some(old) => pipeline.keeping_stats_of(old),
        None => pipeline,
    }))
}
