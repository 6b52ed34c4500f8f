//! A deployment: one model version served by a set of replicas.
//!
//! Admission: each replica takes at most `max_ongoing_requests` at a time; beyond that,
//! requests wait in the deployment's queue (a FIFO semaphore) up to `max_queued_requests`, and
//! the next one is refused at once with 503. A request whose deadline passes while it waits is
//! answered 504 and never runs; one whose caller goes away leaves the queue (its future is
//! dropped) or is skipped by the replica. Replica choice is power-of-two-choices on ongoing
//! requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{TrySendError, sync_channel};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, watch};

use crate::batch::{BatchPolicy, Job};
use crate::metrics::DeploymentMetrics;
use crate::onnx::{OnnxBackend, OnnxOptions};
use crate::replica::{self, BackendFactory, Msg, OngoingGuard, ReplicaSlot};
use crate::{Backend, ErrorKind, InferError, InferRequest, InferResponse, ModelMetadata, check_request};

/// What a deployment needs to start, independent of the config file's layout.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub name: String,
    pub version: String,
    pub num_replicas: usize,
    /// Requests one replica takes at a time (queued in its batcher or running).
    pub max_ongoing_requests: usize,
    /// Requests waiting for a replica slot before new ones are refused.
    pub max_queued_requests: usize,
    /// 0: no batch dimension; above 0: dimension 0 batches, at most this many rows a call.
    pub max_batch_size: usize,
    pub batch_wait_timeout: Duration,
    pub preferred_batch_sizes: Vec<usize>,
    /// Pad values per input name, for batching requests of different lengths.
    pub pad: HashMap<String, f64>,
    /// Deadline of a request unless it asks for a shorter one.
    pub request_timeout: Duration,
    /// The most replicas the deployment may scale to (sizes replica queues).
    pub max_replicas: usize,
    /// Run a full-size batch before a replica reports ready.
    pub warmup: bool,
}

impl DeploymentSpec {
    /// A spec with the config file's defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: "1".into(),
            num_replicas: 1,
            max_ongoing_requests: 0,
            max_queued_requests: 64,
            max_batch_size: 0,
            batch_wait_timeout: Duration::ZERO,
            preferred_batch_sizes: Vec::new(),
            pad: HashMap::new(),
            request_timeout: Duration::from_secs(30),
            max_replicas: 1,
            warmup: true,
        }
    }

    pub fn from_config(d: &sluice_config::Deployment) -> Self {
        Self {
            name: d.name.value.clone(),
            version: d.version.value.clone(),
            num_replicas: d.initial_replicas(),
            max_ongoing_requests: d.max_ongoing_requests.value as usize,
            max_queued_requests: d.max_queued_requests.value as usize,
            max_batch_size: d.max_batch_size.value as usize,
            batch_wait_timeout: Duration::from_secs_f64(d.batch_wait_timeout_s.value),
            preferred_batch_sizes: d.preferred_batch_sizes.value.iter().map(|&n| n as usize).collect(),
            pad: d.pad.value.clone().into_iter().collect(),
            request_timeout: Duration::from_secs_f64(d.request_timeout_s.value),
            max_replicas: d.max_replicas(),
            warmup: d.warmup,
        }
    }

    /// `max_ongoing_requests`, where 0 means: enough for a batch running and the next one
    /// filling (2 × max_batch_size), and at least 5 (Ray Serve's default).
    pub fn ongoing_limit(&self) -> usize {
        if self.max_ongoing_requests > 0 {
            self.max_ongoing_requests
        } else {
            (2 * self.max_batch_size).max(5)
        }
    }
}

/// What the replicas of a deployment share.
pub(crate) struct Shared {
    pub spec: DeploymentSpec,
    pub model_outputs: Vec<String>,
    pub policy: BatchPolicy,
    /// The current replica set; replaced whole when replicas are added or removed.
    pub replicas: ArcSwap<Vec<Arc<ReplicaSlot>>>,
    pub factory: BackendFactory,
    pub metrics: DeploymentMetrics,
    pub ready_count: watch::Sender<usize>,
    pub closed: AtomicBool,
    /// Admission: `ongoing_limit` permits per ready replica.
    pub permits: Arc<Semaphore>,
    next_id: AtomicUsize,
}

impl Shared {
    /// Sends a job to a ready replica other than `from`; gives it back when there is none.
    pub fn redispatch(&self, job: Job, from: usize) -> Result<(), Job> {
        let replicas = self.replicas.load();
        let target = replicas
            .iter()
            .filter(|r| r.id != from && r.ready.load(Ordering::Acquire))
            .min_by_key(|r| r.ongoing.load(Ordering::Acquire));
        match target {
            Some(r) => r.tx.try_send(Msg::Job(job)).map_err(|e| match e {
                TrySendError::Full(Msg::Job(j)) | TrySendError::Disconnected(Msg::Job(j)) => j,
                _ => unreachable!("only jobs are sent here"),
            }),
            None => Err(job),
        }
    }

    /// Publishes how many replicas are ready (metric and readiness watchers).
    pub fn publish_ready(&self) {
        let n = self.replicas.load().iter().filter(|r| r.ready.load(Ordering::Acquire)).count();
        self.metrics.replicas_ready.set(n as f64);
        self.ready_count.send_replace(n);
    }

    /// Starts a replica thread for `backend` and adds it to the set.
    fn spawn_replica(self: &Arc<Self>, backend: Box<dyn Backend>) -> Result<(), String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Admission keeps at most the deployment's total of slots in flight; the channel is
        // sized for the largest set this deployment may grow to (+1 for the stop message).
        let (tx, rx) = sync_channel(self.spec.ongoing_limit() * self.spec.max_replicas.max(1) + 1);
        let slot = Arc::new(ReplicaSlot {
            id,
            tx,
            ongoing: Arc::new(AtomicUsize::new(0)),
            ready: AtomicBool::new(false),
            granted: AtomicBool::new(false),
            in_flight: self.metrics.replica_in_flight(id),
        });
        // In the set before its thread starts, so its readiness is counted when it comes.
        self.replicas.rcu(|current| {
            let mut next = current.as_ref().clone();
            next.push(slot.clone());
            next
        });
        let (shared, thread_slot) = (self.clone(), slot.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{}#{id}", self.spec.name))
            .spawn(move || replica::run(shared, thread_slot, rx, backend));
        if let Err(e) = spawned {
            self.replicas.rcu(|current| current.iter().filter(|r| r.id != id).cloned().collect::<Vec<_>>());
            return Err(format!("cannot start a replica thread: {e}"));
        }
        Ok(())
    }
}

/// A running deployment.
pub struct Deployment {
    shared: Arc<Shared>,
    metadata: Arc<ModelMetadata>,
    queued: AtomicUsize,
    rng: AtomicU64,
    ready: watch::Receiver<usize>,
    scaling: tokio::sync::Mutex<()>,
    scale_hint: Arc<tokio::sync::Notify>,
}

impl Deployment {
    /// Loads the ONNX model of a config deployment, one session per replica.
    pub fn load(config: &sluice_config::Deployment) -> Result<Self, String> {
        Self::load_spec(config, DeploymentSpec::from_config(config))
    }

    /// Loads the ONNX model of a config deployment with a spec adjusted by the caller (the
    /// controller picks replica counts).
    pub fn load_spec(config: &sluice_config::Deployment, spec: DeploymentSpec) -> Result<Self, String> {
        if let Some(b) = &config.builtin {
            return Self::start(spec, crate::builtin::factory(b)?);
        }
        let options = OnnxOptions { intra_op_threads: config.intra_op_threads.value as usize };
        let path = config.model.value.clone();
        let factory: BackendFactory =
            Arc::new(move || OnnxBackend::load(&path, &options).map(|b| Box::new(b) as Box<dyn Backend>));
        Self::start(spec, factory)
    }

    /// Starts a deployment: makes every replica's backend now (so a model that cannot load
    /// fails here), then starts the replica threads, which warm up and report ready. With 0
    /// replicas (scale to zero) one backend is loaded to read the model's metadata.
    pub fn start(spec: DeploymentSpec, factory: BackendFactory) -> Result<Self, String> {
        let mut backends = (0..spec.num_replicas.max(1)).map(|_| factory()).collect::<Result<Vec<_>, _>>()?;
        let metadata = Arc::new(backends[0].metadata().clone());
        if spec.num_replicas == 0 {
            backends.clear();
        }
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
        if let Some(name) = spec.pad.keys().find(|n| !metadata.inputs.iter().any(|i| &i.name == *n)) {
            return Err(format!("pad names `{name}`, which is not an input of the model"));
        }
        if let Some(t) = metadata
            .inputs
            .iter()
            .find(|i| spec.pad.contains_key(&i.name) && i.dtype == crate::DataType::Bytes)
        {
            return Err(format!("pad names `{}`, a BYTES input: only numeric inputs can be padded", t.name));
        }
        let metrics = DeploymentMetrics::new(&spec.name, &spec.version);
        let policy = BatchPolicy {
            max_batch_size: spec.max_batch_size,
            batch_wait_timeout: spec.batch_wait_timeout,
            preferred_batch_sizes: {
                let mut p = spec.preferred_batch_sizes.clone();
                p.sort_unstable();
                p
            },
            pad: Arc::new(spec.pad.clone()),
        };
        let (ready_count, ready) = watch::channel(0);
        let shared = Arc::new(Shared {
            model_outputs: metadata.outputs.iter().map(|o| o.name.clone()).collect(),
            spec,
            policy,
            replicas: ArcSwap::from_pointee(Vec::new()),
            factory,
            metrics,
            ready_count,
            closed: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(0)),
            next_id: AtomicUsize::new(0),
        });
        for backend in backends {
            shared.spawn_replica(backend)?;
        }
        shared.publish_ready();
        Ok(Self {
            shared,
            metadata,
            queued: AtomicUsize::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            ready,
            scaling: tokio::sync::Mutex::new(()),
            scale_hint: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Changes the number of replicas. New ones load their model here (on a blocking thread),
    /// warm up and join admission when ready; removed ones leave the set at once, finish what
    /// they hold, and stop. Requests in flight are never dropped.
    pub async fn scale_to(&self, n: usize) -> Result<(), String> {
        let _one_at_a_time = self.scaling.lock().await;
        let current = self.shared.replicas.load().len();
        for _ in current..n {
            let factory = self.shared.factory.clone();
            let backend = tokio::task::spawn_blocking(move || factory())
                .await
                .map_err(|e| format!("loading a replica failed: {e}"))??;
            self.shared.spawn_replica(backend)?;
        }
        self.shared.publish_ready();
        if n < current {
            let mut removed = Vec::new();
            self.shared.replicas.rcu(|list| {
                // Remove replicas not ready first, then the least loaded.
                let mut keep = list.as_ref().clone();
                keep.sort_by_key(|r| (r.ready.load(Ordering::Acquire), r.ongoing.load(Ordering::Acquire)));
                removed = keep.drain(..current - n).collect();
                keep.sort_by_key(|r| r.id);
                keep
            });
            for slot in removed {
                let _ = slot.tx.try_send(Msg::Stop);
                if slot.granted.swap(true, Ordering::AcqRel) {
                    // Its permits are out there: take them back as they come free.
                    let permits = self.shared.permits.clone();
                    let k = u32::try_from(self.shared.spec.ongoing_limit()).unwrap_or(u32::MAX);
                    tokio::spawn(async move {
                        if let Ok(p) = permits.acquire_many_owned(k).await {
                            p.forget();
                        }
                    });
                }
            }
            self.shared.publish_ready();
        }
        Ok(())
    }

    /// Replicas in the set now (ready or warming up).
    pub fn replica_count(&self) -> usize {
        self.shared.replicas.load().len()
    }

    /// Replicas ready now.
    pub fn ready_replicas(&self) -> usize {
        *self.ready.borrow()
    }

    /// Requests in the deployment now: waiting for a slot plus held by replicas. The
    /// autoscaling signal.
    pub fn in_system(&self) -> usize {
        self.queue_depth()
            + self.shared.replicas.load().iter().map(|r| r.ongoing.load(Ordering::Acquire)).sum::<usize>()
    }

    /// Woken whenever a request has to wait for a slot (lets a controller start a replica at
    /// once when the deployment is scaled to zero).
    pub fn scale_hint(&self) -> Arc<tokio::sync::Notify> {
        self.scale_hint.clone()
    }

    pub fn name(&self) -> &str {
        &self.shared.spec.name
    }

    pub fn version(&self) -> &str {
        &self.shared.spec.version
    }

    pub fn spec(&self) -> &DeploymentSpec {
        &self.shared.spec
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// 0 when the model has no batch dimension, else the most rows one model call takes.
    pub fn max_batch_size(&self) -> usize {
        self.shared.spec.max_batch_size
    }

    pub fn num_replicas(&self) -> usize {
        self.replica_count()
    }

    /// Metrics and statistics of this deployment.
    pub fn metrics(&self) -> &DeploymentMetrics {
        &self.shared.metrics
    }

    /// Requests waiting for a replica slot now.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Ready when at least one replica is loaded, warmed and serving.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() > 0
    }

    /// Waits until every replica is ready, or `timeout` passes; returns whether they are.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let want = self.replica_count();
        let mut rx = self.ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|&n| n >= want)).await.is_ok_and(|r| r.is_ok())
    }

    /// Checks the request, admits it, runs it on a replica and answers.
    pub async fn infer(&self, mut request: InferRequest) -> Result<InferResponse, InferError> {
        let admitted = Instant::now();
        let spec = &self.shared.spec;
        let outputs = check_request(&spec.name, &self.metadata, spec.max_batch_size, &request)?;
        // Model input order, so a batch lines inputs up by position.
        let order = &self.metadata.inputs;
        request.inputs.sort_by_key(|i| order.iter().position(|s| s.name == i.name));
        let rows = match spec.max_batch_size {
            0 => 1,
            _ => request.inputs.first().and_then(|i| i.tensor.shape().first().copied()).unwrap_or(1),
        };
        let timeout = request.timeout.map_or(spec.request_timeout, |t| t.min(spec.request_timeout));
        let deadline = admitted + timeout;

        let _permit = self.admit(deadline, timeout).await?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job =
            Job { inputs: request.inputs, outputs, rows, deadline, admitted, arrived: Instant::now(), reply };
        let _ongoing = self.dispatch(job)?;
        let outputs = answer.await.map_err(|_| {
            InferError::internal(format!("replica of `{}` stopped before answering", spec.name))
        })??;
        Ok(InferResponse {
            model_name: spec.name.clone(),
            model_version: spec.version.clone(),
            id: request.id,
            outputs,
        })
    }

    /// Waits for a replica slot in FIFO order, unless the queue is full (503) or the deadline
    /// passes first (504).
    async fn admit(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, InferError> {
        if let Ok(permit) = self.shared.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.shared.replicas.load().is_empty() {
            // Scaled to zero: wake the controller to start a replica now.
            self.scale_hint.notify_one();
        }
        let max = self.shared.spec.max_queued_requests;
        let depth = self.queued.fetch_add(1, Ordering::AcqRel);
        if depth >= max {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(InferError::unavailable(format!(
                "model `{}` is overloaded: {max} requests already wait (max_queued_requests); retry later",
                self.shared.spec.name
            )));
        }
        self.shared.metrics.queue_depth.set((depth + 1) as f64);
        let _leave = QueueExit { queued: &self.queued, gauge: &self.shared.metrics.queue_depth };
        match tokio::time::timeout_at(deadline.into(), self.shared.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => {
                Err(InferError::unavailable(format!("model `{}` is shutting down", self.shared.spec.name)))
            }
            Err(_) => Err(InferError::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "request timed out after {} ms waiting in the queue of model `{}`",
                    timeout.as_millis(),
                    self.shared.spec.name
                ),
            )),
        }
    }

    /// Sends an admitted job to a replica chosen by power-of-two-choices among ready ones.
    fn dispatch(&self, job: Job) -> Result<OngoingGuard, InferError> {
        let replicas = self.shared.replicas.load();
        if replicas.is_empty() {
            return Err(InferError::unavailable(format!(
                "model `{}` has no replicas",
                self.shared.spec.name
            )));
        }
        let (a, b) = self.two_choices(replicas.len());
        let load = |i: usize| {
            let r = &replicas[i];
            // Replicas not ready sort last; among ready ones, fewer ongoing first.
            (!r.ready.load(Ordering::Acquire), r.ongoing.load(Ordering::Acquire))
        };
        let pick = if load(a) <= load(b) { a } else { b };
        let slot = &replicas[pick];
        let guard = OngoingGuard::new(slot);
        slot.tx.try_send(Msg::Job(job)).map_err(|_| {
            InferError::unavailable(format!(
                "replica of `{}` cannot take requests now",
                self.shared.spec.name
            ))
        })?;
        Ok(guard)
    }

    /// Two distinct random indices below `n` (the same one twice when `n` is 1).
    fn two_choices(&self, n: usize) -> (usize, usize) {
        if n == 1 {
            return (0, 0);
        }
        let r = splitmix(self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed));
        let first = (r % n as u64) as usize;
        let offset = 1 + ((r >> 32) % (n as u64 - 1)) as usize;
        (first, (first + offset) % n)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.permits.close();
        for r in self.shared.replicas.load().iter() {
            let _ = r.tx.try_send(Msg::Stop);
        }
    }
}

/// Leaves the admission queue when the waiting request gets its slot, times out or is dropped.
struct QueueExit<'a> {
    queued: &'a AtomicUsize,
    gauge: &'a metrics::Gauge,
}

impl Drop for QueueExit<'_> {
    fn drop(&mut self) {
        let n = self.queued.fetch_sub(1, Ordering::AcqRel) - 1;
        self.gauge.set(n as f64);
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
