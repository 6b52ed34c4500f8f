//! Pipelines over the deployments a plan leaves running, built (and their tensors checked
//! between steps) before anything is committed.

use std::sync::Arc;

use sluice_config::Config;
use sluice_deployments::pipeline::{JsonMapping, Step, tensor_spec};
use sluice_deployments::{Deployment, LoadError, Pipeline};

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
    let lookup = |name: &str| -> Option<Arc<Deployment>> {
        plan.new_primary(name)
            .cloned()
            .or_else(|| state.deployments.get(name).map(|m| m.primary.deployment.clone()))
    };
    config
        .applications
        .iter()
        .filter_map(|app| app.pipeline.as_ref().map(|p| (app, p)))
        .map(|(app, p)| {
            let pipeline = build(p, &lookup)
                .map_err(|source| ControlError::Pipeline { pipeline: p.name.clone(), source })?;
            Ok(PipelineRoute { app: app.name.clone(), pipeline, route_prefix: app.route_prefix.clone() })
        })
        .collect()
}

/// A running pipeline from its (validated) config, over the deployments `lookup` finds.
fn build(
    p: &sluice_config::Pipeline,
    lookup: &impl Fn(&str) -> Option<Arc<Deployment>>,
) -> Result<Arc<Pipeline>, LoadError> {
    let inputs = p
        .inputs
        .iter()
        .map(|t| tensor_spec(&t.name, &t.datatype, &t.shape))
        .collect::<Result<Vec<_>, _>>()?;
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
    Pipeline::new(&p.name, inputs, steps, &p.outputs, json).map(Arc::new)
}
