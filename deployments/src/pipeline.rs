//! Pipelines: deployments composed into a DAG of named tensors, served as one model. Each step
//! is an ordinary deployment (its own replicas, batching and admission); the pipeline hands
//! each step the tensors it maps in and names what comes out. A step's failure fails the
//! request with a message naming the step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::deployment::MULTIPLEX_HEADER;
use crate::metrics::{DeploymentMetrics, StageTimes};
use crate::{
    DataType, Deployment, ErrorKind, InferError, InferRequest, InferResponse, LoadError, ModelMetadata,
    NamedTensor, TensorSpec, check_request,
};

/// One step of a running pipeline.
pub struct Step {
    pub name: String,
    pub deployment: Arc<Deployment>,
    /// (step input, pipeline tensor).
    pub inputs: Vec<(String, String)>,
    /// (step output, pipeline tensor).
    pub outputs: Vec<(String, String)>,
}

/// A JSON route onto a pipeline: request fields to inputs, outputs to response fields.
#[derive(Debug, Clone, Default)]
pub struct JsonMapping {
    pub request: Vec<(String, String)>,
    pub response: Vec<(String, String)>,
}

/// A running pipeline.
pub struct Pipeline {
    name: String,
    metadata: ModelMetadata,
    /// Steps in run order.
    steps: Vec<Step>,
    /// For each step, the steps producing its inputs.
    needs: Vec<Vec<usize>>,
    /// A request's deadline, counted from its start, when the client sets none (and the most
    /// a client may ask for): the steps' `request_timeout_s` added up.
    timeout: Duration,
    /// Shared with the pipeline it replaced, where it had one of its name ([`Self::keeping_stats_of`]).
    metrics: Arc<DeploymentMetrics>,
    pub json: Option<JsonMapping>,
}

impl Pipeline {
    /// Builds a pipeline over running deployments, checking that every tensor's datatype and
    /// rank agree between its producer and each consumer. `steps` must be in run order.
    pub fn new(
        name: &str,
        inputs: Vec<TensorSpec>,
        steps: Vec<Step>,
        outputs: &[String],
        json: Option<JsonMapping>,
    ) -> Result<Self, LoadError> {
        Self::build(name, inputs, steps, outputs, json).map_err(LoadError::Pipeline)
    }

    fn build(
        name: &str,
        inputs: Vec<TensorSpec>,
        steps: Vec<Step>,
        outputs: &[String],
        json: Option<JsonMapping>,
    ) -> Result<Self, String> {
        let views = steps.iter().map(|step| StepTypes {
            step: &step.name,
            deployment: step.deployment.name(),
            metadata: step.deployment.metadata(),
            inputs: step.inputs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
            outputs: step.outputs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect(),
        });
        let outputs = check_types(&inputs, views, outputs)?;
        // A step needs the (earlier) steps that produce the tensors it reads.
        let needs = steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let mut needs: Vec<usize> = step
                    .inputs
                    .iter()
                    .filter_map(|(_, tensor)| {
                        steps[..i].iter().rposition(|s| s.outputs.iter().any(|(_, t)| t == tensor))
                    })
                    .collect();
                needs.sort_unstable();
                needs.dedup();
                needs
            })
            .collect();
        // The steps' own deadlines one after another: what the slowest path through the
        // pipeline could take if each step took all of its own.
        let timeout = steps
            .iter()
            .filter_map(|s| Duration::try_from_secs_f64(s.deployment.spec().settings.request_timeout_s).ok())
            .fold(Duration::ZERO, Duration::saturating_add);
        Ok(Self {
            name: name.to_string(),
            metadata: ModelMetadata { platform: "ensemble".into(), inputs, outputs },
            steps,
            needs,
            timeout,
            metrics: Arc::new(DeploymentMetrics::pipeline(name)),
            json,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// The steps, in run order.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn metrics(&self) -> &DeploymentMetrics {
        &self.metrics
    }

    /// This pipeline, counting on in the statistics of `old` (the one it replaces, built again
    /// at an apply): Triton's `/stats` of a pipeline went back to 0 at every deploy or
    /// repository change, and perf_analyzer's difference of two readings underflowed.
    pub fn keeping_stats_of(mut self, old: &Pipeline) -> Self {
        self.metrics = Arc::clone(&old.metrics);
        self
    }

    /// Waits until every step's replicas are ready, or `timeout` passes for one of them.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        for s in &self.steps {
            if !s.deployment.wait_ready(timeout).await {
                return false;
            }
        }
        true
    }

    /// The deployments of its steps, in run order.
    pub fn deployments(&self) -> impl Iterator<Item = &Arc<Deployment>> {
        self.steps.iter().map(|s| &s.deployment)
    }

    /// Ready when every step has a ready replica.
    pub fn is_ready(&self) -> bool {
        self.steps.iter().all(|s| s.deployment.is_ready())
    }

    /// Runs the steps — each as soon as the steps producing its inputs are done, so that
    /// independent branches run at the same time and the pipeline takes its critical path —
    /// and returns the requested pipeline outputs. A failed step fails the request, names the
    /// step, and cancels the steps still running. One deadline covers the whole request (the
    /// client's timeout, at most the steps' `request_timeout_s` added up): each step gets what
    /// is left of it (at most its own), and a step that would start after it is answered 504.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        use futures_util::StreamExt;
        use futures_util::stream::FuturesUnordered;
        use tracing::Instrument;

        let started = Instant::now();
        // Every step's deployment counts this request from now on: a version retired while an
        // earlier step runs is not stopped before this request has passed it.
        let _held: Vec<_> = self.steps.iter().map(|s| s.deployment.hold()).collect();
        let outputs = check_request(&self.name, &self.metadata, 0, &request)?;
        // As Triton counts an ensemble's requests: through its queue, at once (its steps queue
        // on their own). perf_analyzer finds the version of a model it measures by the queue
        // count that grew, and failed on a pipeline's that never did.
        self.metrics.entered();
        let timeout = request.timeout.map_or(self.timeout, |t| t.min(self.timeout));
        let deadline = started.checked_add(timeout);
        // Rows, as Triton's inference_count counts them and deployments do: dimension 0 of the
        // first input (rank 0: one).
        let rows = self
            .metadata
            .inputs
            .first()
            .and_then(|spec| request.inputs.iter().find(|i| i.name == spec.name))
            .and_then(|i| i.tensor.shape().first().copied())
            .unwrap_or(1);
        if let Some(id) = &request.model_id
            && !self.steps.iter().any(|s| s.deployment.spec().multiplexed)
        {
            return Err(InferError::invalid(format!(
                "pipeline `{}` has no multiplexed step; it cannot serve `{id}` ({MULTIPLEX_HEADER})",
                self.name
            )));
        }
        let mut tensors: HashMap<String, crate::Tensor> =
            request.inputs.into_iter().map(|t| (t.name, t.tensor)).collect();
        let mut done = vec![false; self.steps.len()];
        let mut started_steps = vec![false; self.steps.len()];
        let mut running = FuturesUnordered::new();
        loop {
            for (i, step) in self.steps.iter().enumerate() {
                if started_steps[i] || !self.needs[i].iter().all(|&j| done[j]) {
                    continue;
                }
                started_steps[i] = true;
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left.is_some_and(|left| left.is_zero()) {
                    return Err(InferError::new(
                        ErrorKind::DeadlineExceeded,
                        format!(
                            "pipeline `{}` step `{}` ({}): request timed out after {} ms, before the step started",
                            self.name,
                            step.name,
                            step.deployment.name(),
                            timeout.as_millis()
                        ),
                    ));
                }
                let inputs = step
                    .inputs
                    .iter()
                    .map(|(step_in, tensor)| {
                        // Pipeline inputs are checked above, and each step's outputs below
                        // (present, of their datatype and rank).
                        let tensor = tensors.get(tensor).cloned().ok_or_else(|| {
                            InferError::internal(format!(
                                "pipeline `{}` step `{}`: tensor `{tensor}` was not produced",
                                self.name, step.name
                            ))
                        })?;
                        Ok(NamedTensor { name: step_in.clone(), tensor })
                    })
                    .collect::<Result<Vec<_>, InferError>>()?;
                let wanted = step.outputs.iter().map(|(o, _)| o.clone()).collect();
                let sub = InferRequest {
                    // The client's id, for the step's span and logs (its answer's id is not used).
                    id: request.id.clone(),
                    inputs,
                    outputs: Some(wanted),
                    timeout: left,
                    // The model a multiplexed step runs is the one the request names.
                    model_id: request.model_id.clone().filter(|_| step.deployment.spec().multiplexed),
                };
                let span = tracing::debug_span!("step", pipeline = %self.name, step = %step.name);
                running.push(async move { (i, step.deployment.infer(sub).await) }.instrument(span));
            }
            let Some((i, answer)) = running.next().await else { break };
            let step = &self.steps[i];
            let d = step.deployment.name();
            let mut answer = answer
                .map_err(|e| {
                    InferError::new(
                        e.kind,
                        format!("pipeline `{}` step `{}` ({d}): {}", self.name, step.name, e.message),
                    )
                })?
                .outputs;
            // A custom or remote step may answer fewer outputs than asked: the request fails
            // here, naming what is missing, rather than the step that would read it.
            for (step_out, tensor) in &step.outputs {
                let Some(at) = answer.iter().position(|o| &o.name == step_out) else {
                    return Err(InferError::internal(format!(
                        "pipeline `{}` step `{}` ({d}) did not return its output `{step_out}`",
                        self.name, step.name
                    )));
                };
                let got = answer.swap_remove(at).tensor;
                // Nor one of another datatype or rank than its metadata says: the step that
                // read it would refuse it as the client's mistake (400), or the client would
                // get a tensor the pipeline's metadata contradicts.
                let declared = step.deployment.metadata().outputs.iter().find(|o| &o.name == step_out);
                if let Some(spec) =
                    declared.filter(|s| s.dtype != got.dtype() || s.shape.len() != got.shape().len())
                {
                    return Err(InferError::internal(format!(
                        "pipeline `{}` step `{}` ({d}) returned its output `{step_out}` as {} {:?}, but its metadata says {} {:?}",
                        self.name,
                        step.name,
                        got.dtype(),
                        got.shape(),
                        spec.dtype,
                        spec.shape
                    )));
                }
                tensors.insert(tensor.clone(), got);
            }
            done[i] = true;
        }
        let outputs = outputs
            .into_iter()
            .map(|name| {
                let tensor = tensors.remove(&name).ok_or_else(|| {
                    InferError::internal(format!("pipeline output `{name}` was not produced"))
                })?;
                Ok(NamedTensor { name, tensor })
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        // The whole pipeline is one execution of one request of `rows` rows; its steps keep
        // their own stats.
        let took = started.elapsed();
        self.metrics.batch(rows, 1, took, Some(StageTimes { infer: took, ..StageTimes::default() }));
        Ok(InferResponse {
            model_name: self.name.clone(),
            model_version: "1".into(),
            id: request.id,
            outputs,
        })
    }
}

/// What the type check reads of one step: its name, its deployment's name and tensors, and
/// its mappings (step tensor, pipeline tensor).
pub struct StepTypes<'a> {
    pub step: &'a str,
    pub deployment: &'a str,
    pub metadata: &'a ModelMetadata,
    pub inputs: Vec<(&'a str, &'a str)>,
    pub outputs: Vec<(&'a str, &'a str)>,
}

/// Checks that every tensor's datatype, rank and fixed sizes agree between its producer and
/// each consumer,
/// that each step's inputs are all mapped to tensors produced before it, and that `outputs` are
/// produced; `steps` in run order. Answers the pipeline's output specs. Used by a pipeline's
/// load and by `sluice validate`, which has the models' metadata but no deployments.
pub fn check_types<'a>(
    inputs: &[TensorSpec],
    steps: impl IntoIterator<Item = StepTypes<'a>>,
    outputs: &[String],
) -> Result<Vec<TensorSpec>, String> {
    let mut known: HashMap<String, TensorSpec> = inputs.iter().map(|t| (t.name.clone(), t.clone())).collect();
    for step in steps {
        let StepTypes { step: name, deployment, metadata: meta, .. } = step;
        for &(step_in, tensor) in &step.inputs {
            let want = meta.inputs.iter().find(|s| s.name == step_in).ok_or_else(|| {
                let names: Vec<&str> = meta.inputs.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "step `{name}`: `{step_in}` is not an input of `{deployment}` (inputs: {})",
                    names.join(", ")
                )
            })?;
            let have = known
                .get(tensor)
                .ok_or_else(|| format!("step `{name}`: tensor `{tensor}` is not produced before it"))?;
            // A size both sides fix and disagree on fails every request: refused here too.
            let sizes_clash = have.shape.iter().zip(&want.shape).any(|(&h, &w)| h >= 0 && w >= 0 && h != w);
            if have.dtype != want.dtype || have.shape.len() != want.shape.len() || sizes_clash {
                return Err(format!(
                    "step `{name}`: tensor `{tensor}` is {} {:?} but `{deployment}` input `{step_in}` takes {} {:?}",
                    have.dtype, have.shape, want.dtype, want.shape
                ));
            }
        }
        if let Some(needed) = meta.inputs.iter().find(|i| !step.inputs.iter().any(|(s, _)| *s == i.name)) {
            return Err(format!("step `{name}`: input `{}` of `{deployment}` is not mapped", needed.name));
        }
        for &(step_out, tensor) in &step.outputs {
            let spec = meta.outputs.iter().find(|s| s.name == step_out).ok_or_else(|| {
                let names: Vec<&str> = meta.outputs.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "step `{name}`: `{step_out}` is not an output of `{deployment}` (outputs: {})",
                    names.join(", ")
                )
            })?;
            known.insert(tensor.to_string(), TensorSpec { name: tensor.to_string(), ..spec.clone() });
        }
    }
    outputs
        .iter()
        .map(|o| known.get(o).cloned().ok_or_else(|| format!("output `{o}` is not produced")))
        .collect()
}

/// A pipeline tensor spec from the config's datatype name and shape.
pub fn tensor_spec(name: &str, datatype: &str, shape: &[i64]) -> Result<TensorSpec, LoadError> {
    let dtype = DataType::parse(datatype).ok_or_else(|| {
        LoadError::Pipeline(format!("pipeline input `{name}`: unknown datatype `{datatype}`"))
    })?;
    Ok(TensorSpec { name: name.to_string(), dtype, shape: shape.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataType;

    fn spec(name: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: shape.to_vec() }
    }

    /// Sizes both sides fix and disagree on fail at load, as the datatype and rank do: every
    /// request failed at the step with a 400 blaming the client, who had followed the
    /// pipeline's own metadata. A size one side leaves open (-1) is checked per request.
    #[test]
    fn fixed_sizes_that_disagree_are_refused_at_load() {
        let meta = |input: &[i64]| ModelMetadata {
            platform: "test".into(),
            inputs: vec![spec("in", input)],
            outputs: vec![spec("out", &[-1, 2])],
        };
        let check = |pipeline_input: &[i64], step_input: &[i64]| {
            let m = meta(step_input);
            let step = StepTypes {
                step: "s",
                deployment: "d",
                metadata: &m,
                inputs: vec![("in", "x")],
                outputs: vec![("out", "y")],
            };
            check_types(&[spec("x", pipeline_input)], [step], &["y".to_string()])
        };
        let e = check(&[-1, 768], &[-1, 384]).unwrap_err();
        assert!(e.contains("tensor `x` is FP32 [-1, 768] but `d` input `in` takes FP32 [-1, 384]"), "{e}");
        assert!(check(&[-1, 3], &[-1, 4]).is_err());
        assert!(check(&[-1, 4], &[-1, 4]).is_ok());
        assert!(check(&[-1, -1], &[-1, 4]).is_ok(), "open on one side: checked per request");
        assert!(check(&[2, 4], &[-1, 4]).is_ok());
        assert!(check(&[-1, 4], &[-1, 4, 1]).is_err(), "rank");
    }
}
