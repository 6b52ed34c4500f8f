//! A deployment: one model version served by a set of replicas. Picks a replica by
//! power-of-two-choices on outstanding requests and refuses at once (503) when the chosen
//! replicas' queues are full, instead of queueing without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::onnx::{OnnxBackend, OnnxOptions};
use crate::replica::{Job, Replica};
use crate::{Backend, InferError, InferRequest, InferResponse, ModelMetadata, check_request};

/// What a deployment needs to start, independent of the config file's layout.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub name: String,
    pub version: String,
    pub num_replicas: usize,
    pub max_queued_requests: usize,
    /// 0: no batch dimension; above 0: dimension 0 batches, at most this many rows a request.
    pub max_batch_size: usize,
}

impl DeploymentSpec {
    pub fn from_config(d: &sluice_config::Deployment) -> Self {
        Self {
            name: d.name.value.clone(),
            version: d.version.value.clone(),
            num_replicas: d.num_replicas.value as usize,
            max_queued_requests: d.max_queued_requests.value as usize,
            max_batch_size: d.max_batch_size.value as usize,
        }
    }
}

/// A running deployment.
pub struct Deployment {
    spec: DeploymentSpec,
    metadata: Arc<ModelMetadata>,
    replicas: Vec<Replica>,
    rng: AtomicU64,
}

impl Deployment {
    /// Loads the ONNX model of a config deployment into `num_replicas` sessions.
    pub fn load(config: &sluice_config::Deployment) -> Result<Self, String> {
        let spec = DeploymentSpec::from_config(config);
        let options = OnnxOptions { intra_op_threads: config.intra_op_threads.value as usize };
        let backends = (0..spec.num_replicas)
            .map(|_| {
                OnnxBackend::load(&config.model.value, &options).map(|b| Box::new(b) as Box<dyn Backend>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::start(spec, backends)
    }

    /// Starts a deployment over backends already loaded (one per replica, same model).
    pub fn start(spec: DeploymentSpec, backends: Vec<Box<dyn Backend>>) -> Result<Self, String> {
        let metadata = match backends.first() {
            Some(b) => Arc::new(b.metadata().clone()),
            None => return Err(format!("deployment `{}` has no replicas", spec.name)),
        };
        if spec.max_batch_size > 0 {
            let fixed = metadata
                .inputs
                .iter()
                .chain(&metadata.outputs)
                .find(|t| t.shape.first().is_none_or(|&d| d >= 0));
            if let Some(t) = fixed {
                return Err(format!(
                    "max_batch_size is {} but `{}` has shape {:?}: batching needs a dynamic first \
                     dimension on every input and output (or max_batch_size: 0)",
                    spec.max_batch_size, t.name, t.shape
                ));
            }
        }
        let capacity = spec.max_queued_requests.div_ceil(backends.len()).max(1);
        let replicas = backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| Replica::spawn(format!("{}#{i}", spec.name), b, capacity))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot start replica thread for `{}`: {e}", spec.name))?;
        Ok(Self { spec, metadata, replicas, rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15) })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn version(&self) -> &str {
        &self.spec.version
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// 0 when the model has no batch dimension, else the most rows one request may carry.
    pub fn max_batch_size(&self) -> usize {
        self.spec.max_batch_size
    }

    /// Replicas serving this deployment.
    pub fn num_replicas(&self) -> usize {
        self.replicas.len()
    }

    /// Ready once every replica has loaded its model (true from construction on, for now).
    pub fn is_ready(&self) -> bool {
        !self.replicas.is_empty()
    }

    /// Checks the request, runs it on a replica and answers.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        let outputs = check_request(&self.spec.name, &self.metadata, self.spec.max_batch_size, &request)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job { inputs: request.inputs, outputs, reply };
        let _guard = self.submit(job)?;
        let outputs = answer
            .await
            .map_err(|_| InferError::internal(format!("replica of `{}` stopped", self.spec.name)))??;
        Ok(InferResponse {
            model_name: self.spec.name.clone(),
            model_version: self.spec.version.clone(),
            id: request.id,
            outputs,
        })
    }

    fn submit(&self, job: Job) -> Result<crate::replica::LoadGuard, InferError> {
        let (first, second) = self.two_choices();
        let (a, b) = if self.replicas[first].load() <= self.replicas[second].load() {
            (first, second)
        } else {
            (second, first)
        };
        let job = match self.replicas[a].try_submit(job) {
            Ok(guard) => return Ok(guard),
            Err(job) => job,
        };
        if a != b
            && let Ok(guard) = self.replicas[b].try_submit(job)
        {
            return Ok(guard);
        }
        Err(InferError::unavailable(format!(
            "model `{}` is overloaded: its queue of {} requests is full; retry later",
            self.spec.name, self.spec.max_queued_requests
        )))
    }

    /// Two distinct random replica indices (the same one twice when there is only one).
    fn two_choices(&self) -> (usize, usize) {
        let n = self.replicas.len();
        if n == 1 {
            return (0, 0);
        }
        let r = splitmix(self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
        let first = (r % n as u64) as usize;
        let offset = 1 + ((r >> 32) % (n as u64 - 1)) as usize;
        (first, (first + offset) % n)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
