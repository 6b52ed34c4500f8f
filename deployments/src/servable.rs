//! [`Servable`]: what a route points at — a deployment or a pipeline, which the frontends serve
//! alike.

use std::sync::Arc;

use crate::metrics::DeploymentMetrics;
use crate::shadow::Shadow;
use crate::{Deployment, InferError, InferRequest, InferResponse, MULTIPLEX_HEADER, ModelMetadata, Pipeline};

/// What a route points at: a deployment or a pipeline, served alike by the frontends.
#[derive(Clone)]
pub enum Servable {
    Deployment(Arc<Deployment>),
    Pipeline(Arc<Pipeline>),
    /// A deployment whose requests are also copied to a shadow version.
    Shadowed(Arc<Deployment>, Arc<Shadow>),
    /// One model of a multiplexed deployment, addressed by its id as the model name.
    Multiplexed(Arc<Deployment>, Arc<str>),
}

impl Servable {
    pub fn name(&self) -> &str {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.name(),
            Self::Pipeline(p) => p.name(),
        }
    }

    pub fn version(&self) -> &str {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.version(),
            Self::Pipeline(_) => "1",
        }
    }

    pub fn metadata(&self) -> &ModelMetadata {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.metadata(),
            Self::Pipeline(p) => p.metadata(),
        }
    }

    /// The models a multiplexed deployment's replicas hold ([`Deployment::held_models`]);
    /// empty for a pipeline.
    pub fn held_models(&self) -> Vec<Arc<str>> {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.held_models(),
            Self::Pipeline(_) => Vec::new(),
        }
    }

    pub fn metrics(&self) -> &DeploymentMetrics {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.metrics(),
            Self::Pipeline(p) => p.metrics(),
        }
    }

    pub fn is_ready(&self) -> bool {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.is_ready(),
            Self::Pipeline(p) => p.is_ready(),
        }
    }

    /// What server readiness counts: ready, or with no ready replica only because autoscaling
    /// took it to zero on purpose ([`Deployment::ready_or_at_zero`]; each step, for a
    /// pipeline). Requests to it wait in its queue while a replica starts.
    pub fn ready_or_at_zero(&self) -> bool {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.ready_or_at_zero(),
            Self::Pipeline(p) => p.deployments().all(|d| d.ready_or_at_zero()),
        }
    }

    /// 0 for pipelines (their steps batch on their own).
    pub fn max_batch_size(&self) -> usize {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.max_batch_size(),
            Self::Pipeline(_) => 0,
        }
    }

    pub fn num_replicas(&self) -> usize {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.num_replicas(),
            Self::Pipeline(_) => 1,
        }
    }

    pub async fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => {
                d.wait_ready(timeout).await
            }
            Self::Pipeline(p) => p.wait_ready(timeout).await,
        }
    }

    /// The deployments behind this one: itself, or a pipeline's steps.
    pub fn deployments(&self) -> Vec<&Arc<Deployment>> {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => vec![d],
            Self::Pipeline(p) => p.deployments().collect(),
        }
    }

    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        self.infer_handing_back(request, &mut None).await
    }

    /// [`Servable::infer`], but a request its deployment hands back, closed for its successor
    /// while the request waited for a replica ([`Deployment::infer_handing_back`]), comes back
    /// in `back` (a pipeline's steps answer it 503).
    pub async fn infer_handing_back(
        &self,
        request: InferRequest,
        back: &mut Option<InferRequest>,
    ) -> Result<InferResponse, InferError> {
        match self {
            Self::Deployment(d) => d.infer_handing_back(request, back).await,
            Self::Multiplexed(d, model) => {
                let mut request = request;
                let added = request.model_id.is_none();
                match &request.model_id {
                    Some(id) if id != &**model => {
                        return Err(InferError::invalid(format!(
                            "the path names model `{model}` but the {MULTIPLEX_HEADER} header names `{id}`; send one, or the same"
                        )));
                    }
                    Some(_) => {}
                    None => request.model_id = Some(model.to_string()),
                }
                let answer = d.infer_handing_back(request, back).await;
                // Handed back as the caller sent it: the id this route added is the route's.
                if let Some(b) = back.as_mut().filter(|_| added) {
                    b.model_id = None;
                }
                answer
            }
            Self::Shadowed(d, shadow) => {
                // Mirrored again if handed back and routed here again (proxies, whose copies
                // hand back, route to no shadow).
                let mirror = shadow.mirror(&request);
                let answer = d.infer_handing_back(request, back).await;
                if let (Some(m), Ok(a)) = (mirror, &answer) {
                    m.compare(&a.outputs);
                }
                answer
            }
            Self::Pipeline(p) => p.infer(request).await,
        }
    }

    /// The ready-replica counts its readiness follows (its steps', for a pipeline), to wait
    /// for a change.
    pub fn ready_watches(&self) -> Vec<tokio::sync::watch::Receiver<usize>> {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => vec![d.ready_watch()],
            Self::Pipeline(p) => p.deployments().map(|d| d.ready_watch()).collect(),
        }
    }

    /// Whether it is out of the route table ([`Deployment::is_retired`]; a pipeline, when one of
    /// its steps is): to be routed again.
    pub fn is_retired(&self) -> bool {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => d.is_retired(),
            Self::Pipeline(p) => p.deployments().any(|d| d.is_retired()),
        }
    }

    /// The deployment, when this is one.
    pub fn deployment(&self) -> Option<&Arc<Deployment>> {
        match self {
            Self::Deployment(d) | Self::Shadowed(d, _) | Self::Multiplexed(d, _) => Some(d),
            Self::Pipeline(_) => None,
        }
    }
}
