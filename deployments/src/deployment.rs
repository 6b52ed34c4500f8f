//! A deployment: one model version served by a set of replicas.
//!
//! Admission: each replica takes at most `max_ongoing_requests` at a time; beyond that,
//! requests wait in the deployment's queue (a FIFO semaphore) up to `max_queued_requests`, and
//! the next one is refused at once with 503. A request whose deadline passes while it waits is
//! answered 504 and never runs; one whose caller goes away leaves the queue (its future is
//! dropped) or is skipped by the replica. Replica choice is power-of-two-choices on ongoing
//! requests. Replicas ([`crate::replica`]) know nothing of this: they report readiness to the
//! deployment, which opens their slots to admission.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use metrics::Gauge;
use sluice_config::ReplicaSettings;
use tokio::sync::{Notify, Semaphore, watch};
use tracing::Instrument;

use crate::batch::{BatchPolicy, Job, Reply};
use crate::metrics::DeploymentMetrics;
use crate::remote::{RemoteCall, RemoteInfo, RemoteReplica};
use crate::replica::{self, ModelCell, Msg, ReplicaConfig, ReplicaHost};
use crate::{
    Backend, BackendFactory, DataType, ErrorKind, InferError, InferRequest, InferResponse, LoadError,
    ModelMetadata, backend_factory, validate_request,
};

/// What a deployment needs to start, independent of the config file's layout.
#[derive(Debug, Clone)]
pub struct DeploymentSpec {
    pub name: String,
    pub version: String,
    pub num_replicas: usize,
    /// The most replicas the deployment may scale to (sizes replica queues, with the replicas
    /// it has).
    pub max_replicas: usize,
    /// Batching, admission and deadlines (the config's defaults unless set).
    pub settings: ReplicaSettings,
    /// Notified when a request has to wait on a deployment with no replica, so that whoever
    /// scales it (the controller, which shares one across deployments) starts one at once.
    pub wake: Arc<Notify>,
    /// Whether it serves many models (each request names one; see [`crate::multiplex`]).
    pub multiplexed: bool,
}

impl DeploymentSpec {
    /// A spec with the config file's defaults.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: "1".into(),
            num_replicas: 1,
            max_replicas: 1,
            settings: ReplicaSettings::default(),
            wake: Arc::new(Notify::new()),
            multiplexed: false,
        }
    }

    /// The spec of a config deployment.
    pub fn from_config(d: &sluice_config::Deployment) -> Self {
        Self {
            name: d.name.clone(),
            version: d.version.clone(),
            num_replicas: d.initial_replicas(),
            max_replicas: d.max_replicas(),
            settings: d.settings.clone(),
            wake: Arc::new(Notify::new()),
            multiplexed: matches!(d.model, sluice_config::Model::Multiplexed { .. }),
        }
    }

    /// `max_ongoing_requests`, where 0 means: enough for a batch running and the next one
    /// filling (2 × max_batch_size), and at least 5 (Ray Serve's default).
    pub fn ongoing_limit(&self) -> usize {
        match self.settings.max_ongoing_requests {
            0 => (2 * self.max_batch_size()).max(5),
            n => n as usize,
        }
    }

    /// 0 when the model has no batch dimension, else the most rows one model call takes.
    pub fn max_batch_size(&self) -> usize {
        self.settings.max_batch_size as usize
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.settings.request_timeout_s)
    }

    fn batch_policy(&self) -> BatchPolicy {
        let mut preferred: Vec<usize> =
            self.settings.preferred_batch_sizes.iter().map(|&n| n as usize).collect();
        preferred.sort_unstable();
        BatchPolicy {
            max_batch_size: self.max_batch_size(),
            batch_wait_timeout: Duration::from_secs_f64(self.settings.batch_wait_timeout_s),
            preferred_batch_sizes: preferred,
            pad: Arc::new(self.settings.pad.clone().into_iter().collect()),
        }
    }
}

/// How a replica is reached: its thread's queue (and its model, for calls run inline), or a
/// remote process.
enum Channel {
    Local(SyncSender<Msg>, Arc<ModelCell>),
    /// The replica, and where a call it could not deliver goes back to (its set, its id).
    Remote(Arc<dyn RemoteReplica>, Weak<ReplicaSet>, usize),
}

impl Channel {
    /// Hands a job over; gives it back when a local replica's queue cannot take it.
    #[allow(clippy::result_large_err)]
    fn send(&self, job: Job) -> Result<(), Job> {
        match self {
            Channel::Local(tx, _) => tx.try_send(Msg::Job(job)).map_err(|e| match e {
                TrySendError::Full(msg) | TrySendError::Disconnected(msg) => match msg {
                    Msg::Job(job) => job,
                    Msg::Jobs(_) | Msg::Stop | Msg::Reload => unreachable!("only a job was sent"),
                },
            }),
            Channel::Remote(r, set, from) => {
                let Job { inputs, outputs, rows, deadline, admitted, arrived, reply, span, model, tried } =
                    job;
                let (reply, admission) = reply.into_parts();
                let redirect = (tried.as_ref().map_or(0, |t| t.len()) < MAX_REDIRECTS).then(|| Redirect {
                    set: set.clone(),
                    from: *from,
                    rows,
                    admitted,
                    arrived,
                    span: span.clone(),
                    tried,
                });
                let holder = model.as_ref().and_then(|m| Holder::sent(set, *from, m));
                let _entered = span.enter();
                r.call(RemoteCall {
                    inputs,
                    outputs: outputs.to_vec(),
                    deadline,
                    reply,
                    model,
                    admission,
                    redirect,
                    holder,
                });
                Ok(())
            }
        }
    }

    /// Tells a local replica to finish what it holds and stop (a remote one is stopped by
    /// whoever started it).
    fn stop(&self) {
        if let Channel::Local(tx, _) = self {
            let _ = tx.try_send(Msg::Stop);
        }
    }
}

/// The gRPC metadata key on a replica process's answer to a multiplexed model's request: the
/// ids of the models it holds now, each ended by a NUL byte (an id is a folder name, which
/// cannot hold one). Sent only by `sluice replica` (a client of the server's own port is not
/// told which other models are loaded).
pub const HELD_MODELS_HEADER_BIN: &str = "x-sluice-held-models-bin";

/// The longest list of held models a replica sends (bytes before base64): a longer one is not
/// sent (no news; the controller keeps what it knew), as metadata past the client's header
/// limit would fail an answered request.
pub const HELD_MODELS_MAX_BYTES: usize = 8 * 1024;

/// The gRPC metadata key beside [`HELD_MODELS_HEADER_BIN`]: the list's number in its replica
/// process (ASCII decimal). Answers on different HTTP/2 streams can arrive in another order than
/// they were made; a list numbered below one already taken was read before it, and is not taken.
pub const HELD_MODELS_SEQ_HEADER: &str = "x-sluice-held-models-seq";

/// The models a remote replica's answer says it holds, numbered in the order its process read
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldModels {
    pub seq: u64,
    pub ids: Vec<Arc<str>>,
}

impl HeldModels {
    /// The models `read` finds now, numbered after every list this process read before: the
    /// numbers are taken, and the lists read, under one lock, so a list numbered higher was read
    /// later (it knows every load and eviction the lower one knew).
    pub fn read(read: impl FnOnce() -> Vec<Arc<str>>) -> Self {
        static SEQ: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
        let mut seq = SEQ.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *seq += 1;
        Self { seq: *seq, ids: read() }
    }
}

/// Where a remote replica's answer says which models it holds ([`RemoteCall::holder`]). While
/// it lives, its call's model counts as held by the replica (sent there, not yet answered).
pub struct Holder {
    slot: Weak<ReplicaSlot>,
    model: Arc<str>,
    /// Counted out of the slot's `sent` already.
    answered: bool,
}

impl Holder {
    /// A call for `model` sent to replica `id` of `set`.
    fn sent(set: &Weak<ReplicaSet>, id: usize, model: &Arc<str>) -> Option<Self> {
        let set = set.upgrade()?;
        let slot = set.replicas.load().iter().find(|r| r.id == id)?.clone();
        slot.sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).calls.push(model.clone());
        Some(Self { slot: Arc::downgrade(&slot), model: model.clone(), answered: false })
    }

    /// The replica answered the call holding `held`: its models replace what it was said to
    /// hold, but for the models of its other calls not yet answered (one claimed for a request
    /// on its way there, which an answer to an earlier request cannot know of, stays claimed, or
    /// the requests after it would go to load it on another replica). A list read before one
    /// already taken (an answer that arrived late) is not taken.
    pub fn holds(mut self, held: HeldModels) {
        let Some(slot) = self.slot.upgrade() else { return };
        let mut sent = slot.sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = sent.calls.iter().position(|m| *m == self.model) {
            sent.calls.swap_remove(i);
        }
        self.answered = true;
        if held.seq > sent.seq {
            sent.seq = held.seq;
            sent.taken = held.ids;
        }
        let mut models = sent.taken.clone();
        for m in sent.calls.iter() {
            if !models.contains(m) {
                models.push(m.clone());
            }
        }
        slot.models.store(Arc::new(models));
    }
}

impl Drop for Holder {
    /// A call that ends without an answer (failed, handed on, or given up) is no longer sent.
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if let Some(slot) = self.slot.upgrade() {
            let mut sent = slot.sent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(i) = sent.calls.iter().position(|m| *m == self.model) {
                sent.calls.swap_remove(i);
            }
        }
    }
}

/// A remote replica's calls to multiplexed models not yet answered, and the last list of held
/// models taken from its answers ([`HeldModels`]) with its number.
#[derive(Default)]
struct Sent {
    calls: Vec<Arc<str>>,
    seq: u64,
    taken: Vec<Arc<str>>,
}

/// [`ReplicaSlot::granted`]'s states.
const NOT_GRANTED: u8 = 0;
const GRANTED: u8 = 1;
const RETIRED: u8 = 2;

/// Takes `k` permits out of admission: the free ones now (a request admitted after this must
/// not take a permit of a replica that is gone or not ready: scaled to zero, it was answered
/// "no replicas" instead of waiting for one), the rest as they come free, on `runtime` (or the
/// caller's, when it runs in one).
fn revoke(permits: &Arc<Semaphore>, k: usize, runtime: Option<&tokio::runtime::Handle>) {
    let rest = u32::try_from(k - permits.forget_permits(k)).unwrap_or(u32::MAX);
    if rest == 0 {
        return;
    }
    let permits = permits.clone();
    let take = async move {
        if let Ok(p) = permits.acquire_many_owned(rest).await {
            p.forget();
        }
    };
    match tokio::runtime::Handle::try_current().ok().or_else(|| runtime.cloned()) {
        Some(rt) => drop(rt.spawn(take)),
        None => tracing::warn!("no runtime to take back {rest} admission permits on"),
    }
}

/// How many times a request is handed on by remote replicas that could not be reached
/// before its error is answered (three replicas tried in all, each once).
const MAX_REDIRECTS: usize = 2;

/// Where a remote replica sends a call it could not deliver (its connection could not be
/// made: nothing reached the replica, so the request is run elsewhere rather than answered
/// 503): the other ready replicas of its deployment, as a replica whose model panicked hands
/// on its queue.
pub struct Redirect {
    set: Weak<ReplicaSet>,
    from: usize,
    rows: usize,
    admitted: Instant,
    arrived: Instant,
    span: tracing::Span,
    /// The replicas it could not reach before `from` (as the job holds them).
    #[allow(clippy::box_collection)]
    tried: Option<Box<Vec<usize>>>,
}

impl Redirect {
    /// Hands `call` to another ready replica of the deployment it has not tried (counted
    /// there); where none can take it, or its caller has gone or its deadline passed, answers
    /// it with `error`.
    pub fn send(self, call: RemoteCall, error: InferError) {
        let RemoteCall { inputs, outputs, deadline, reply, model, admission, .. } = call;
        let mut reply = Reply::new(reply);
        if let Some(admission) = admission {
            reply.hold(admission);
        }
        if reply.is_closed() || deadline <= Instant::now() {
            let _ = reply.send(Err(error));
            return;
        }
        let mut tried = self.tried.unwrap_or_default();
        tried.push(self.from);
        let job = Job {
            inputs,
            outputs: outputs.into(),
            rows: self.rows,
            deadline,
            admitted: self.admitted,
            arrived: self.arrived,
            reply,
            span: self.span,
            model,
            tried: Some(tried),
        };
        let Some(set) = self.set.upgrade() else {
            let _ = job.reply.send(Err(error));
            return;
        };
        if let Err(job) = set.redispatch(job, self.from) {
            let _ = job.reply.send(Err(error));
        }
    }
}

/// The deployment's side of one replica.
struct ReplicaSlot {
    id: usize,
    channel: Channel,
    /// Requests assigned and not yet answered (queued there or running).
    ongoing: Arc<AtomicUsize>,
    ready: AtomicBool,
    /// Whether this replica's admission permits are out ([`GRANTED`]: it is ready), not
    /// ([`NOT_GRANTED`]), or for good not ([`RETIRED`]: removed): whoever moves it owns the
    /// permits.
    granted: std::sync::atomic::AtomicU8,
    in_flight: crate::metrics::ReplicaGauge,
    /// The models a multiplexed replica holds (its thread publishes them after each change).
    models: ArcSwap<Vec<Arc<str>>>,
    /// A remote replica's: the models of the calls sent to it and not yet answered (each once
    /// per call), kept in `models` whatever an answer says ([`Holder::holds`]).
    sent: std::sync::Mutex<Sent>,
    started_at: SystemTime,
}

/// What status pages show of one replica. A plain struct so that replicas hosted elsewhere
/// (a Ray actor on another node) can be described the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaInfo {
    /// Unique within its deployment version.
    pub id: usize,
    /// Loaded, warmed and taking requests.
    pub ready: bool,
    /// When the replica joined the deployment (a remote one: when it was added).
    pub started_at: SystemTime,
    /// The node it runs on; `None` for a replica thread of this process.
    pub node_id: Option<String>,
    /// That node's address; `None` for a replica thread of this process.
    pub node_ip: Option<String>,
    /// The process serving it; `None` for a replica thread of this process.
    pub pid: Option<u32>,
}

/// The replicas of a deployment and what admission needs of them.
struct ReplicaSet {
    spec: DeploymentSpec,
    config: Arc<ReplicaConfig>,
    /// The current replicas; replaced whole when one is added or removed.
    replicas: ArcSwap<Vec<Arc<ReplicaSlot>>>,
    ready_count: watch::Sender<usize>,
    closed: AtomicBool,
    /// Admission: `ongoing_limit` permits per replica that is ready.
    permits: Arc<Semaphore>,
    /// The runtime the set was made in: where the permits of a replica that is no longer ready
    /// are taken back as they come free ([`revoke`]; a replica thread marks its own).
    runtime: Option<tokio::runtime::Handle>,
    next_id: AtomicUsize,
    /// A replica has been ready since the deployment started or was last scaled to zero on
    /// purpose ([`Deployment::scaled_to_zero`]).
    served: AtomicBool,
    /// This set's share of its (model, version)'s replica gauges.
    gauges: GaugeShare,
}

/// What one replica set adds to the `sluice_replicas_ready` and `sluice_replicas` series of its
/// (model, version). Two sets may serve one version at a time (a swap at the same version
/// with new settings or files, the old one draining): each adds its own counts and takes them
/// back when it closes, so neither overwrites the other's (a failed swap's set left 0 ready
/// on a version that served, and the no-ready-replica alert fired).
#[derive(Default)]
struct GaugeShare {
    /// (ready, replicas) as last added.
    added: std::sync::Mutex<(usize, usize)>,
    /// Replicas wanted but not in the set yet: on Ray, actors starting or waiting for a node
    /// (they join the set once serving). Counted in `sluice_replicas`.
    elsewhere: AtomicUsize,
}

impl ReplicaHost for ReplicaSet {
    fn set_ready(&self, id: usize, ready: bool) {
        if let Some(slot) = self.replicas.load().iter().find(|r| r.id == id) {
            slot.ready.store(ready, Ordering::Release);
            if ready {
                self.served.store(true, Ordering::Release);
            }
            let (from, to) = if ready { (NOT_GRANTED, GRANTED) } else { (GRANTED, NOT_GRANTED) };
            if slot.granted.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                match ready {
                    // Ready (again): this replica's slots open to admission.
                    true => self.permits.add_permits(self.spec.ongoing_limit()),
                    // Not ready (a model reloading after a panic, a failed health check): its
                    // slots leave admission until it is ready again, or the ready replicas were
                    // sent its share too, past `max_ongoing_requests` each.
                    false => revoke(&self.permits, self.spec.ongoing_limit(), self.runtime.as_ref()),
                }
            }
        }
        self.publish_ready();
    }

    #[allow(clippy::result_large_err)]
    fn redispatch(&self, mut job: Job, from: usize) -> Result<(), Job> {
        let replicas = self.replicas.load();
        let mut targets: Vec<_> = replicas
            .iter()
            .filter(|r| r.id != from && !job.tried(r.id) && r.ready.load(Ordering::Acquire))
            .collect();
        // A multiplexed job goes to a replica holding its model first (as `dispatch` chooses),
        // so that it is not loaded again while a holder has room; then the least loaded.
        let holds = |r: &ReplicaSlot| job.model.as_deref().is_some_and(|m| self.has_room_with(r, m));
        targets.sort_by_key(|r| (!holds(r), r.ongoing.load(Ordering::Acquire)));
        for r in targets {
            // Counted on the replica that runs it, so that routing and scaling see where the
            // load is.
            count_on(&mut job, r);
            match r.channel.send(job) {
                Ok(()) => return Ok(()),
                Err(back) => job = back,
            }
        }
        // Back with the replica that holds it (if it is still in the set).
        if let Some(r) = replicas.iter().find(|r| r.id == from) {
            count_on(&mut job, r);
        }
        Err(job)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn set_models(&self, id: usize, models: Vec<Arc<str>>) {
        if let Some(slot) = self.replicas.load().iter().find(|r| r.id == id) {
            slot.models.store(Arc::new(models));
        }
    }
}

/// Moves `job`'s count on a replica (its admission's) to `slot`.
fn count_on(job: &mut Job, slot: &ReplicaSlot) {
    if let Some(admission) = job.reply.admission_mut() {
        admission.count_on(slot);
    }
}

impl ReplicaSet {
    /// Whether `slot` holds `model` and has room for it (fewer ongoing requests than
    /// `max_ongoing_requests`): a saturated holder lets any replica load the model (Ray
    /// Serve's policy).
    fn has_room_with(&self, slot: &ReplicaSlot, model: &str) -> bool {
        slot.ongoing.load(Ordering::Acquire) < self.spec.ongoing_limit()
            && slot.models.load().iter().any(|m| &**m == model)
    }

    /// Publishes how many replicas are ready (metric and readiness watchers). Replica threads
    /// call this concurrently, so the count is taken under the watch's lock: counted outside
    /// it, a smaller count taken first could be published last and stay (a lost update that
    /// left `wait_ready` waiting out its timeout with every replica ready).
    fn publish_ready(&self) {
        self.publish_ready_if(false);
    }

    /// [`Self::publish_ready`] after replicas left the set: watchers are woken even when the
    /// ready count stays the same (readiness that depends on the set, such as being at zero
    /// on purpose, may have changed).
    fn publish_ready_or_set(&self) {
        self.publish_ready_if(true);
    }

    fn publish_ready_if(&self, set_changed: bool) {
        self.ready_count.send_if_modified(|published| {
            let n = self.replicas.load().iter().filter(|r| r.ready.load(Ordering::Acquire)).count();
            self.publish_gauges();
            std::mem::replace(published, n) != n || set_changed
        });
    }

    /// Brings this set's share of the replica gauges to its ready replicas and those it runs or
    /// waits for; a closed set's to nothing. Counted under the share's lock, so that of two
    /// publishes the later one counts the later state (counted before it, an earlier count
    /// could be published last and stay).
    fn publish_gauges(&self) {
        let mut added = self.gauges.added.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = match self.is_closed() {
            true => (0, 0),
            false => {
                (self.ready_now(), self.replicas.load().len() + self.gauges.elsewhere.load(Ordering::Acquire))
            }
        };
        let metrics = &self.config.metrics;
        metrics.replicas_ready.increment(now.0 as f64 - added.0 as f64);
        metrics.replicas_running.increment(now.1 as f64 - added.1 as f64);
        *added = now;
    }

    /// The ready replicas now.
    fn ready_now(&self) -> usize {
        self.replicas.load().iter().filter(|r| r.ready.load(Ordering::Acquire)).count()
    }

    fn add_slot(&self, id: usize, channel: Channel) {
        let slot = Arc::new(ReplicaSlot {
            id,
            channel,
            ongoing: Arc::new(AtomicUsize::new(0)),
            ready: AtomicBool::new(false),
            granted: std::sync::atomic::AtomicU8::new(NOT_GRANTED),
            in_flight: self.config.metrics.replica_in_flight(id),
            models: ArcSwap::from_pointee(Vec::new()),
            sent: std::sync::Mutex::new(Sent::default()),
            started_at: SystemTime::now(),
        });
        self.replicas.rcu(|current| {
            let mut next = current.as_ref().clone();
            next.push(slot.clone());
            next
        });
        // A replica placed elsewhere (on Ray) has arrived: counted in the set now, not twice
        // until the controller next says how many are still on their way.
        let _ = self.gauges.elsewhere.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.publish_gauges();
    }

    /// Starts a replica thread for `backend` and adds it to the set.
    fn spawn_replica(self: &Arc<Self>, backend: Box<dyn Backend>) -> Result<(), LoadError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Sized for `max_replicas`, or for the set as it is with this replica when that is
        // more: a spec may start more replicas than its `max_replicas` (a fixed count set in
        // code), and `scale_to` is not bounded by it. A queue is not resized when the set grows
        // later: a job a full queue refuses goes to another ready replica.
        let most = self.spec.max_replicas.max(self.spec.num_replicas).max(self.replicas.load().len() + 1);
        let (tx, rx) = sync_channel(queue_capacity(self.spec.ongoing_limit(), most));
        // In the set before its thread starts, so its readiness is counted when it comes.
        let cell = Arc::new(ModelCell::new(self.config.policy.clone()));
        self.add_slot(id, Channel::Local(tx, cell.clone()));
        let (config, host) = (self.config.clone(), self.clone() as Arc<dyn ReplicaHost>);
        let spawned = std::thread::Builder::new()
            .name(format!("{}#{id}", self.spec.name))
            .spawn(move || replica::run(id, config, host, rx, backend, cell));
        if let Err(e) = spawned {
            self.replicas.rcu(|current| current.iter().filter(|r| r.id != id).cloned().collect::<Vec<_>>());
            self.publish_gauges();
            return Err(LoadError::Thread(e.to_string()));
        }
        Ok(())
    }
}

/// Most jobs one replica's queue holds beyond its own `max_ongoing_requests`.
const QUEUE_CAP: usize = 4096;

/// A replica's queue: admission keeps at most the deployment's total of slots in flight (the
/// replica's own, plus what other replicas hand over when they stop), sized for `replicas`
/// (the most the deployment may scale to, or the set as it is when larger), +1 for the stop
/// message; at most `QUEUE_CAP` (or the replica's
/// own limit when larger): the queue is allocated when the replica starts, and sizing it for
/// every slot of max_replicas made memory grow with max_replicas squared (2 replicas allowed to
/// grow to 4,096 of 1,000 slots each took 1,315 MB). A job a full queue refuses goes to another
/// ready replica (each is tried, least loaded first), or is answered 503. Bounded rather than unbounded (a list): the bounded channel
/// measured about a microsecond less server CPU per request at 64 connections (ten alternating
/// runs each, medians 15.2 against 16.6 µs).
///
/// Never above [`MAX_QUEUE`], whatever `max_ongoing_requests` says: every slot is written when
/// the queue is made, so a limit of a million (meant as "no limit") made each replica hold
/// some 200 MB before its first request. A replica's queue then refuses what is beyond it,
/// which goes to another replica or is answered 503.
fn queue_capacity(ongoing: usize, replicas: usize) -> usize {
    ongoing.saturating_mul(replicas.max(1)).min(QUEUE_CAP.max(ongoing)).min(MAX_QUEUE) + 1
}

/// The most jobs a replica's queue holds, for any settings.
const MAX_QUEUE: usize = 65_536;

/// A running deployment.
pub struct Deployment {
    set: Arc<ReplicaSet>,
    metadata: Arc<ModelMetadata>,
    /// Requests waiting for a replica slot.
    queued: AtomicUsize,
    /// Requests inside [`Deployment::infer`] (queued, running or being answered).
    requests: AtomicUsize,
    /// Requests on their way to it: pipeline requests whose later step it is ([`Deployment::hold`]).
    /// Apart from `requests`, which the inline path reads to tell a caller alone.
    held: AtomicUsize,
    /// Notified when `requests` drops to zero (draining waits on it).
    idle: Notify,
    ready: watch::Receiver<usize>,
    scaling: tokio::sync::Mutex<()>,
    multiplex: Option<Arc<crate::multiplex::MultiplexStats>>,
    /// Calls measured below this run on the caller's thread when their replica is idle and
    /// the deployment is not crowded (see [`crate::replica::Crowding`]).
    inline_under: Option<Duration>,
    /// Whether autoscaling may take it to zero replicas ([`Deployment::set_scales_to_zero`]).
    scales_to_zero: AtomicBool,
    /// Out of the route table, draining ([`Deployment::mark_retired`]).
    retired: AtomicBool,
    /// Closed for the version that replaced it ([`Deployment::close_handing_back`]).
    hands_back: AtomicBool,
    /// Held while a multiplexed request picks its replica ([`Deployment::pick_for_model`]): a pick and
    /// the claim on a model it makes are one step for concurrent requests.
    claiming: std::sync::Mutex<()>,
}

impl Deployment {
    /// Loads a config deployment's model (ONNX file or built-in step), one backend per replica.
    pub fn load(config: &sluice_config::Deployment) -> Result<Self, LoadError> {
        Self::start(
            DeploymentSpec::from_config(config),
            backend_factory(&config.model, &config.settings, config.max_replicas(), &config.name)?,
        )
    }

    /// Starts a deployment: makes every replica's backend now (so a model that cannot load
    /// fails here), then starts the replica threads, which warm up and report ready. With 0
    /// replicas (scale to zero) one backend is loaded to read the model's metadata.
    pub fn start(spec: DeploymentSpec, factory: BackendFactory) -> Result<Self, LoadError> {
        let mut backends = (0..spec.num_replicas.max(1)).map(|_| factory()).collect::<Result<Vec<_>, _>>()?;
        let metadata = backends[0].metadata().clone();
        let multiplex = backends[0].multiplex_stats();
        if spec.num_replicas == 0 {
            backends.clear();
        }
        let mut spec = spec;
        if multiplex.is_some() {
            // Requests name their model; there is no one model to warm up.
            spec.multiplexed = true;
            spec.settings.warmup = false;
        }
        let mut d = Self::build(spec, factory, metadata, backends)?;
        d.multiplex = multiplex;
        Ok(d)
    }

    fn build(
        spec: DeploymentSpec,
        factory: BackendFactory,
        metadata: ModelMetadata,
        backends: Vec<Box<dyn Backend>>,
    ) -> Result<Self, LoadError> {
        // Not with a batch wait: the config asks requests to wait for each other.
        let under = spec.settings.run_inline_under_us;
        let inline_under = (under > 0 && spec.settings.batch_wait_timeout_s == 0.0)
            .then(|| Duration::from_micros(u64::from(under)));
        let metadata = Arc::new(metadata);
        check_fits(&spec.settings, &metadata)?;
        let config = Arc::new(ReplicaConfig {
            name: spec.name.clone(),
            policy: spec.batch_policy(),
            model_outputs: metadata.outputs.iter().map(|o| o.name.clone()).collect(),
            warmup: spec.settings.warmup,
            factory,
            spin: Duration::from_micros(u64::from(spec.settings.spin_before_sleep_us)),
            metrics: Arc::new(DeploymentMetrics::new(&spec.name, &spec.version, spec.max_batch_size())),
        });
        let (ready_count, ready) = watch::channel(0);
        let set = Arc::new(ReplicaSet {
            spec,
            config,
            replicas: ArcSwap::from_pointee(Vec::new()),
            ready_count,
            closed: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(0)),
            runtime: tokio::runtime::Handle::try_current().ok(),
            next_id: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            gauges: GaugeShare::default(),
        });
        for backend in backends {
            if let Err(e) = set.spawn_replica(backend) {
                // No deployment owns the replicas started so far, so no drop of one would stop
                // them: each holds the set, which holds their queues, and they would wait on
                // those for good (each with its model).
                set.close();
                return Err(e);
            }
        }
        set.publish_ready();
        Ok(Self {
            set,
            metadata,
            queued: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            idle: Notify::new(),
            ready,
            scaling: tokio::sync::Mutex::new(()),
            multiplex: None,
            inline_under,
            scales_to_zero: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            hands_back: AtomicBool::new(false),
            claiming: std::sync::Mutex::new(()),
        })
    }

    /// Changes the number of replicas. New ones load their model here (on a blocking thread),
    /// warm up and join admission when ready; removed ones leave the set at once, finish what
    /// they hold, and stop. Requests in flight are never dropped.
    pub async fn scale_to(&self, n: usize) -> Result<(), LoadError> {
        let _one_at_a_time = self.scaling.lock().await;
        let current = self.set.replicas.load().len();
        for _ in current..n {
            let factory = self.set.config.factory.clone();
            let backend = tokio::task::spawn_blocking(move || factory())
                .await
                .map_err(|e| LoadError::Thread(e.to_string()))??;
            self.set.spawn_replica(backend)?;
        }
        self.set.publish_ready();
        if n < current {
            let mut removed = Vec::new();
            self.set.replicas.rcu(|list| {
                // Remove replicas not ready first, then the least loaded.
                let mut keep = list.as_ref().clone();
                keep.sort_by_key(|r| (r.ready.load(Ordering::Acquire), r.ongoing.load(Ordering::Acquire)));
                removed = keep.drain(..current - n).collect();
                keep.sort_by_key(|r| r.id);
                keep
            });
            self.retire(removed);
        }
        Ok(())
    }

    /// Takes replicas out of admission: local ones finish what they hold and stop; the
    /// permits each brought are taken back as they come free.
    fn retire(&self, removed: Vec<Arc<ReplicaSlot>>) {
        for slot in removed {
            slot.channel.stop();
            if slot.granted.swap(RETIRED, Ordering::AcqRel) == GRANTED {
                revoke(&self.set.permits, self.set.spec.ongoing_limit(), self.set.runtime.as_ref());
            }
        }
        // Watchers hear of it even when the ready count stays: a set left with no replica
        // that has served is at zero on purpose ([`Deployment::at_zero_on_purpose`]).
        self.set.publish_ready_or_set();
    }

    /// A deployment whose replicas all run elsewhere ([`RemoteReplica`]s added with
    /// [`Deployment::add_remote`]); `metadata` comes from one of them. It starts with none.
    pub fn start_remote(spec: DeploymentSpec, metadata: ModelMetadata) -> Result<Self, LoadError> {
        let name = spec.name.clone();
        let factory: BackendFactory = Arc::new(move || {
            Err(LoadError::Settings(format!(
                "the replicas of `{name}` run on the cluster, not in this process"
            )))
        });
        let spec = DeploymentSpec { num_replicas: 0, ..spec };
        Self::build(spec, factory, metadata, Vec::new())
    }

    /// Adds a replica in another process; it takes requests once marked ready
    /// ([`Deployment::set_replica_ready`]). Returns its id in this deployment.
    pub fn add_remote(&self, remote: Arc<dyn RemoteReplica>) -> usize {
        let id = self.set.next_id.fetch_add(1, Ordering::Relaxed);
        self.set.add_slot(id, Channel::Remote(remote, Arc::downgrade(&self.set), id));
        self.set.publish_ready();
        id
    }

    /// Marks a replica ready (its slots open to admission the first time) or not (it gets no
    /// new requests until ready again).
    pub fn set_replica_ready(&self, id: usize, ready: bool) {
        self.set.set_ready(id, ready);
    }

    /// Takes a replica out of the set at once (it is unhealthy, dead, or stopping); requests
    /// it holds finish or fail there, queued ones go to the others. False when unknown.
    pub fn remove_replica(&self, id: usize) -> bool {
        let mut removed = Vec::new();
        self.set.replicas.rcu(|list| {
            let (gone, keep): (Vec<_>, Vec<_>) = list.iter().cloned().partition(|r| r.id == id);
            removed = gone;
            keep
        });
        let found = !removed.is_empty();
        self.retire(removed);
        found
    }

    /// The remote replicas now, with their ids and readiness.
    pub fn remote_replicas(&self) -> Vec<(usize, bool, RemoteInfo)> {
        self.set
            .replicas
            .load()
            .iter()
            .filter_map(|r| match &r.channel {
                Channel::Remote(remote, ..) => {
                    Some((r.id, r.ready.load(Ordering::Acquire), remote.info().clone()))
                }
                Channel::Local(..) => None,
            })
            .collect()
    }

    /// Replicas in the set now (ready or warming up).
    pub fn replica_count(&self) -> usize {
        self.set.replicas.load().len()
    }

    /// The replicas in the set now (ready or warming up), by id. Threads of this process have
    /// no node fields; remote replicas have theirs ([`RemoteInfo`]).
    pub fn replicas(&self) -> Vec<ReplicaInfo> {
        self.set
            .replicas
            .load()
            .iter()
            .map(|r| {
                let remote = match &r.channel {
                    Channel::Remote(remote, ..) => Some(remote.info()),
                    Channel::Local(..) => None,
                };
                ReplicaInfo {
                    id: r.id,
                    ready: r.ready.load(Ordering::Acquire),
                    started_at: r.started_at,
                    node_id: remote.map(|i| i.node_id.clone()),
                    node_ip: remote.map(|i| i.node_ip.clone()),
                    pid: remote.map(|i| i.pid),
                }
            })
            .collect()
    }

    /// Runs the warm-up batch again on one replica of this process that holds its model, where
    /// the deployment warms up (`warmup`): after the process paged out the code loading touched
    /// (the server's `release_startup_memory`), so that the code a model call runs is read back
    /// before the first request, not during it. Requests that arrive meanwhile wait for the
    /// model as they would behind a batch, and are run after it. Blocks for one model call.
    /// True when a warm-up batch ran and succeeded.
    pub fn warm_again(&self) -> bool {
        let replicas = self.set.replicas.load_full();
        let mut local = replicas.iter().filter_map(|r| match &r.channel {
            Channel::Local(tx, cell) => Some((r.id, tx, cell)),
            Channel::Remote(..) => None,
        });
        local.any(|(id, tx, cell)| cell.warm_again(&self.set.config, (&*self.set, id), tx))
    }

    /// Replicas ready now.
    pub fn ready_replicas(&self) -> usize {
        *self.ready.borrow()
    }

    /// Requests inside it (queued, running or being answered) or on their way to it
    /// ([`Deployment::hold`]): what its drain waits for ([`Deployment::drained`]).
    pub fn busy(&self) -> usize {
        self.requests.load(Ordering::Acquire) + self.held.load(Ordering::Acquire)
    }

    /// Requests in the deployment now: waiting for a slot plus held by replicas. The
    /// autoscaling signal.
    pub fn in_system(&self) -> usize {
        self.queue_depth()
            + self.set.replicas.load().iter().map(|r| r.ongoing.load(Ordering::Acquire)).sum::<usize>()
    }

    /// Resolves once no request is inside the deployment (queued, running or being answered).
    /// A deployment that no route points to any more only gets fewer, so this is how a retired
    /// version drains.
    /// Marks the deployment retired (it drained, and its replicas are stopped next): replicas
    /// leaving it from now on leave the series it shares with a successor at the same version
    /// alone, one that fails is not loaded again, and a request still waiting to be admitted
    /// (past the drain's grace) is answered 503 "shutting down" at once rather than at its
    /// deadline. Dropping it does the same.
    pub fn close(&self) {
        self.set.closed.store(true, Ordering::Release);
        self.set.publish_gauges();
        self.set.permits.close();
        // Requests waiting for a replica to come ready look again: none comes now.
        self.set.ready_count.send_modify(|_| {});
    }

    /// Like [`Deployment::close`], for a copy taken out of the route table with no replica (a
    /// proxy's copy of a version swapped out at zero replicas, where the controller starts none
    /// for it): a request still waiting in it for a replica is handed back to its caller
    /// ([`Deployment::infer_handing_back`]) to run on what the table routes it to now, rather
    /// than answered 503. Call after the table without it is published.
    pub fn close_handing_back(&self) {
        self.hands_back.store(true, Ordering::Release);
        self.close();
    }

    /// Counts a replica replaced (`sluice_replica_restarts_total`) where the replacement is not
    /// this set's own: on Ray, an actor lost (exited, died with its node, failed its health
    /// check) and started again.
    pub fn count_restart(&self) {
        self.set.config.metrics.restarts.increment(1);
    }

    /// How many replicas this version has placed elsewhere that are not in its set yet (on
    /// Ray: actors starting, or waiting for a node); `sluice_replicas` counts them, so that a
    /// version whose replicas cannot start reads as running none ready, not as none at all.
    pub fn set_placed_elsewhere(&self, n: usize) {
        if self.set.gauges.elsewhere.swap(n, Ordering::AcqRel) != n {
            self.set.publish_gauges();
        }
    }

    /// Counts a request that will reach this deployment later (a pipeline's later step) until
    /// the guard is dropped, so that [`Deployment::drained`] waits for it: a retired version is
    /// stopped once drained, and a pipeline request that had routed to it would otherwise find
    /// its replicas gone (on Ray) when it got there. Not counted as inside it (a step called
    /// alone still runs as a caller alone).
    pub fn hold(&self) -> Held<'_> {
        self.held.fetch_add(1, Ordering::AcqRel);
        Held { deployment: self }
    }

    /// Marks it out of the route table: what is still routed to it should be routed again
    /// ([`Deployment::is_retired`]). Before its drain waits ([`Deployment::settled`]).
    pub fn mark_retired(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Whether it is out of the route table. A frontend that routed a request here before it
    /// read the request's body (which can take long) routes it again when this says so: the
    /// drain, which saw none of its requests inside, may have closed it meanwhile (the request
    /// was answered 503 "shutting down" while the new version would have served it).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Waits until no request is inside the deployment or on its way to it, and none has come
    /// for [`DRAIN_SETTLE`] after: a request routed here just before it was retired and not yet
    /// inside (between the look at [`Deployment::is_retired`] and its entry: no await) is in
    /// by then.
    pub async fn settled(&self) {
        loop {
            self.drained().await;
            tokio::time::sleep(DRAIN_SETTLE).await;
            if self.requests.load(Ordering::SeqCst) == 0 && self.held.load(Ordering::SeqCst) == 0 {
                return;
            }
        }
    }

    /// Waits until no request is inside the deployment or on its way to it ([`Deployment::hold`]).
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.requests.load(Ordering::Acquire) == 0 && self.held.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn name(&self) -> &str {
        &self.set.spec.name
    }

    pub fn version(&self) -> &str {
        &self.set.spec.version
    }

    pub fn spec(&self) -> &DeploymentSpec {
        &self.set.spec
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// 0 when the model has no batch dimension, else the most rows one model call takes.
    pub fn max_batch_size(&self) -> usize {
        self.set.spec.max_batch_size()
    }

    pub fn num_replicas(&self) -> usize {
        self.replica_count()
    }

    /// Metrics and statistics of this deployment.
    pub fn metrics(&self) -> &DeploymentMetrics {
        &self.set.config.metrics
    }

    /// Requests waiting for a replica slot now.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The number of ready replicas, as it changes.
    pub fn ready_watch(&self) -> watch::Receiver<usize> {
        self.ready.clone()
    }

    /// Ready when at least one replica is loaded, warmed and serving.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow() > 0
    }

    /// Says whether autoscaling may take this deployment to zero replicas (`min_replicas: 0`);
    /// the controller keeps it current. Off until said.
    pub fn set_scales_to_zero(&self, yes: bool) {
        self.scales_to_zero.store(yes, Ordering::Release);
    }

    /// Whether autoscaling may take it to zero replicas ([`Deployment::set_scales_to_zero`]).
    pub fn scales_to_zero(&self) -> bool {
        self.scales_to_zero.load(Ordering::Acquire)
    }

    /// Whether it has no ready replica only because autoscaling took it to zero on purpose:
    /// it may scale to zero, and no replica has been ready since it started or was last scaled
    /// to zero ([`Deployment::scaled_to_zero`]), so it has none, or only replicas starting from
    /// zero. Requests to it then wait in its queue, and the first one starts a replica. Not
    /// while a replica that served is failing, restarting or replaced (on Ray a replaced
    /// replica is a new one, so the replicas alone cannot tell).
    pub fn at_zero_on_purpose(&self) -> bool {
        self.scales_to_zero.load(Ordering::Acquire) && !self.set.served.load(Ordering::Acquire)
    }

    /// Says that autoscaling took it to zero replicas on purpose (see
    /// [`Deployment::at_zero_on_purpose`]).
    pub fn scaled_to_zero(&self) {
        self.set.served.store(false, Ordering::Release);
        self.set.publish_ready_or_set();
    }

    /// What server readiness counts: ready, or [at zero on purpose](Self::at_zero_on_purpose).
    /// A load balancer that took such a server out would never send the request that scales
    /// the deployment up again.
    pub fn ready_or_at_zero(&self) -> bool {
        self.is_ready() || self.at_zero_on_purpose()
    }

    /// Waits until every replica is ready, or `timeout` passes; returns whether they are.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let want = self.replica_count();
        let mut rx = self.ready.clone();
        tokio::time::timeout(timeout, rx.wait_for(|&n| n >= want)).await.is_ok_and(|r| r.is_ok())
    }

    /// Checks the request, admits it, runs it on a replica and answers, inside one span
    /// (`infer`: model, version, request id; the batch it ran in is recorded on it).
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        let span = self.span(&request);
        self.infer_in(request, span.clone(), true, None).instrument(span).await
    }

    /// [`Deployment::infer`], but a request still waiting for a replica when the deployment is
    /// closed for its successor ([`Deployment::close_handing_back`]) comes back in `back`, as
    /// sent but for its timeout (what is left of it), and the error says it is shutting down.
    pub async fn infer_handing_back(
        &self,
        request: InferRequest,
        back: &mut Option<InferRequest>,
    ) -> Result<InferResponse, InferError> {
        let span = self.span(&request);
        self.infer_in(request, span.clone(), true, Some(back)).instrument(span).await
    }

    /// A request's span (`infer`: model, version, request id; the batch it ran in is recorded
    /// on it).
    fn span(&self, request: &InferRequest) -> tracing::Span {
        tracing::debug_span!(
            "infer",
            model = %self.set.spec.name,
            version = %self.set.spec.version,
            request_id = request.id.as_deref().unwrap_or(""),
            batch_rows = tracing::field::Empty,
            model_us = tracing::field::Empty,
        )
    }

    /// Like [`Deployment::infer`], but only when a replica slot is free now: otherwise
    /// Unavailable at once, never queued (shadow copies must not wait behind real traffic);
    /// and always on a replica's thread, never on the caller's (a copy of a cheap model ran on
    /// the thread serving the primary's request, ahead of it).
    pub async fn infer_now(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        self.infer_in(request, tracing::Span::none(), false, None).await
    }

    async fn infer_in(
        &self,
        mut request: InferRequest,
        span: tracing::Span,
        may_wait: bool,
        hand_back: Option<&mut Option<InferRequest>>,
    ) -> Result<InferResponse, InferError> {
        let admitted = Instant::now();
        let _inside = Inside::enter(self);
        let spec = &self.set.spec;
        validate_request(&spec.name, &self.metadata, spec.max_batch_size(), &request)?;
        let chose_outputs = request.outputs.is_some();
        let outputs = match request.outputs.take() {
            None => Arc::clone(&self.set.config.model_outputs),
            Some(requested) => requested.into(),
        };
        // Model input order, so a batch lines inputs up by position.
        let order = &self.metadata.inputs;
        request.inputs.sort_by_key(|i| order.iter().position(|s| s.name == i.name));
        let rows = match spec.max_batch_size() {
            0 => 1,
            _ => request.inputs.first().and_then(|i| i.tensor.shape().first().copied()).unwrap_or(1),
        };
        let model = match (request.model_id.take(), spec.multiplexed) {
            // No folder is named so (and a replica's list of the models it holds ends each id
            // with one).
            (Some(id), true) if id.contains('\0') => {
                return Err(InferError::not_found(format!(
                    "no model `{}` in `{}`",
                    id.escape_debug(),
                    spec.name
                )));
            }
            (Some(id), true) => Some(Arc::<str>::from(id)),
            (None, true) => {
                return Err(InferError::invalid(format!(
                    "`{}` serves many models: name one with the `{MULTIPLEX_HEADER}` header (gRPC metadata) or as \
                     the model in the path",
                    spec.name
                )));
            }
            (Some(id), false) => {
                return Err(InferError::invalid(format!(
                    "model `{}` serves one model; it cannot serve `{id}` ({MULTIPLEX_HEADER})",
                    spec.name
                )));
            }
            (None, false) => None,
        };
        let timeout = request.timeout.map_or(spec.request_timeout(), |t| t.min(spec.request_timeout()));
        let deadline = admitted + timeout;

        let (reply, mut answer) = tokio::sync::oneshot::channel();
        let reply = Reply::new(reply);
        let mut job = Job {
            inputs: request.inputs,
            outputs,
            rows,
            deadline,
            admitted,
            arrived: admitted,
            reply,
            span,
            model,
            tried: None,
        };
        let left = loop {
            let permit = if may_wait {
                match self.admit(deadline, timeout).instrument(tracing::debug_span!("queue")).await {
                    Ok(permit) => permit,
                    Err(e) => {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        if let Some(back) = hand_back
                            && e.kind == ErrorKind::Unavailable
                            && self.hands_back.load(Ordering::Acquire)
                            && !remaining.is_zero()
                        {
                            *back = Some(InferRequest {
                                id: request.id,
                                inputs: job.inputs,
                                outputs: chose_outputs.then(|| job.outputs.to_vec()),
                                timeout: Some(remaining),
                                model_id: job.model.map(|m| m.to_string()),
                            });
                        }
                        return Err(e);
                    }
                }
            } else {
                self.set.permits.clone().try_acquire_owned().map_err(|_| {
                    InferError::unavailable(format!("model `{}` has no free replica slot now", spec.name))
                })?
            };
            job.arrived = Instant::now();
            match self.dispatch(job, permit, may_wait)? {
                Dispatched::Sent => break None,
                Dispatched::Left(slot) => break Some(slot),
                // The last replica went between the admission and here (scaled to zero, lost
                // on Ray): waited for as the admission waits for one (it was answered 503).
                Dispatched::Back(back) if may_wait => job = *back,
                Dispatched::Back(_) => {
                    return Err(InferError::unavailable(format!("model `{}` has no replicas", spec.name)));
                }
            }
        };
        if let Some(slot) = left
            && let Channel::Local(tx, cell) = &slot.channel
        {
            // Until `run_pending` runs, the job left with the model is this caller's to run: a
            // caller dropped at its yield takes it out of `pending` again (with its admission).
            let abandoned = Abandoned { cell, answer: Some(answer) };
            // Let the other requests this thread has ready now reach the model first: the
            // first of them to come back runs them all as one batch. Not when requests do not
            // meet (the last batches held one) and no other is in the deployment now: one
            // connection's requests run at once (a requeued yield wakes a parked worker).
            let alone = self.requests.load(Ordering::Acquire) == 1;
            if let Some(how) = cell.before_batch(alone) {
                yield_once(how).await;
            }
            cell.run_pending(
                &self.set.config,
                (&*self.set, slot.id),
                tx,
                self.inline_under.unwrap_or_default(),
            );
            answer = abandoned.disarm();
        }
        // Answered at the deadline at the latest. A model still running the request keeps its
        // admission until it is done (a queued one is answered 504 by the replica without
        // running): the job's reply holds it.
        let outputs = match tokio::time::timeout_at(deadline.into(), &mut answer).await {
            Ok(Ok(outputs)) => outputs?,
            // The replica stopped (scaled down, or its deployment closed) with the request in
            // hand: a moment's unavailability for the client to retry, not a server fault.
            Ok(Err(_)) => {
                return Err(InferError::unavailable(format!(
                    "replica of `{}` stopped before answering; retry",
                    spec.name
                )));
            }
            Err(_) => {
                return Err(InferError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "request timed out after {} ms: model `{}` did not answer in time",
                        timeout.as_millis(),
                        spec.name
                    ),
                ));
            }
        };
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
        let shutting_down =
            || InferError::unavailable(format!("model `{}` is shutting down", self.set.spec.name));
        if let Ok(permit) = self.set.permits.clone().try_acquire_owned() {
            if !self.set.replicas.load().is_empty() {
                return Ok(permit);
            }
            // A permit of a replica that has just gone: waited for below, unless the deployment
            // is closed (retired or deleted: no replica comes).
            drop(permit);
            if self.set.is_closed() {
                return Err(shutting_down());
            }
        }
        let max = self.set.spec.settings.max_queued_requests as usize;
        // Join the queue only below its bound, so its depth never reads above it.
        if self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| (d < max).then_some(d + 1))
            .is_err()
        {
            return Err(InferError::unavailable(format!(
                "model `{}` is overloaded: {max} requests already wait (max_queued_requests); retry later",
                self.set.spec.name
            )));
        }
        let _leave = QueueExit::joined(&self.queued, &self.set.config.metrics.queue_depth);
        let timed_out = || {
            InferError::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "request timed out after {} ms waiting in the queue of model `{}`",
                    timeout.as_millis(),
                    self.set.spec.name
                ),
            )
        };
        loop {
            if self.set.replicas.load().is_empty() {
                // Closed with no replica (retired or deleted): none comes.
                if self.set.is_closed() {
                    return Err(shutting_down());
                }
                // Scaled to zero: wake the controller to start a replica now (once this request
                // is in the queue, which is what the controller reads to start one at once).
                self.set.spec.wake.notify_one();
            }
            match tokio::time::timeout_at(deadline.into(), self.set.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) if !self.set.replicas.load().is_empty() => return Ok(permit),
                // The permit of a replica that has just gone, the last one (lost on Ray, or
                // scaled away while this request waited), freed by a request it still held:
                // handed back for the replica's retirement to take, and this request waits for
                // a replica to be ready. It was answered 503 "has no replicas" at once, and so
                // was every request queued behind it, while a replacement started.
                Ok(Ok(permit)) => {
                    drop(permit);
                    self.set.spec.wake.notify_one();
                    // Woken by a replica coming ready, or by the deployment closing (see
                    // `close`), which the loop's top answers.
                    let mut ready = self.set.ready_count.subscribe();
                    let woken = ready.wait_for(|&n| n > 0 || self.set.is_closed());
                    match tokio::time::timeout_at(deadline.into(), woken).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => return Err(shutting_down()),
                        Err(_) => return Err(timed_out()),
                    }
                }
                Ok(Err(_)) => return Err(shutting_down()),
                Err(_) => return Err(timed_out()),
            }
        }
    }

    /// Sends an admitted job to a replica chosen by power-of-two-choices among ready ones (or,
    /// when that replica's queue is full, to another ready one), or, when `inline` allows,
    /// leaves it with that replica's model (returned) for the caller to run. With no replica
    /// left (the last one gone since the admission), the job comes back, without its permit.
    fn dispatch(
        &self,
        mut job: Job,
        permit: tokio::sync::OwnedSemaphorePermit,
        inline: bool,
    ) -> Result<Dispatched, InferError> {
        let replicas = self.set.replicas.load();
        if replicas.is_empty() {
            return Ok(Dispatched::Back(Box::new(job))); // and the permit goes
        }
        let load = |i: usize| {
            let r = &replicas[i];
            // Replicas not ready sort last; among ready ones, fewer ongoing first.
            (!r.ready.load(Ordering::Acquire), r.ongoing.load(Ordering::Acquire))
        };
        let pick = match &job.model {
            Some(m) => self.pick_for_model(&replicas, m, load),
            None => choose(replicas.len(), two_choices(replicas.len()), self.set.spec.ongoing_limit(), load),
        };
        let slot = &replicas[pick];
        job.reply.hold(Admission { _permit: permit, ongoing: OngoingGuard::new(slot) });
        // A cheap call is left with its replica's model for the caller to run on its own thread
        // (see `ModelCell`): no hand-off to the replica's thread and back.
        if let (Channel::Local(_, cell), Some(under)) = (&slot.channel, self.inline_under)
            && inline
            && job.model.is_none()
            && cell.cheap(under)
            && small(&job.inputs)
        {
            cell.leave(job);
            return Ok(Dispatched::Left(slot.clone()));
        }
        // A queue that cannot take the job (full: a replica whose model panicked just handed
        // it what it held) sends it to another ready replica, counted there; one no replica
        // can take is dropped here, with its admission.
        match slot.channel.send(job) {
            Ok(()) => Ok(Dispatched::Sent),
            Err(job) => self.set.redispatch(job, slot.id).map(|()| Dispatched::Sent).map_err(|_| {
                InferError::unavailable(format!(
                    "replica of `{}` cannot take requests now",
                    self.set.spec.name
                ))
            }),
        }
    }
}

/// The header (and gRPC metadata key) naming the model of a multiplexed deployment (Ray
/// Serve's).
pub const MULTIPLEX_HEADER: &str = "serve_multiplexed_model_id";

/// The gRPC metadata key carrying a model id as bytes (UTF-8), for ids an ASCII value cannot
/// hold.
pub const MULTIPLEX_HEADER_BIN: &str = "serve_multiplexed_model_id-bin";

impl Deployment {
    /// The least loaded ready replica holding `model`, unless every holder is saturated
    /// (`max_ongoing_requests`): then any replica may load it (Ray Serve's policy), and the one
    /// chosen by `load` counts as holding it from then, so that requests for it that come while
    /// it loads follow it there (each went to the less loaded replica: the model loaded on
    /// several, each evicting a warm one). The replica's own list replaces the claim after its
    /// next batch. Picks are one at a time (`claiming`): two requests checking at once both
    /// found no holder. `replicas` is not empty.
    fn pick_for_model(
        &self,
        replicas: &[Arc<ReplicaSlot>],
        model: &Arc<str>,
        load: impl Fn(usize) -> (bool, usize),
    ) -> usize {
        let _one_at_a_time = self.claiming.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let holding = replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ready.load(Ordering::Acquire) && self.set.has_room_with(r, model))
            .map(|(i, r)| (r.ongoing.load(Ordering::Acquire), i))
            .min()
            .map(|(_, i)| i);
        if let Some(holder) = holding {
            return holder;
        }
        let pick = choose(replicas.len(), two_choices(replicas.len()), self.set.spec.ongoing_limit(), load);
        replicas[pick].models.rcu(|held| {
            let mut held = held.as_ref().clone();
            if !held.iter().any(|h| h == model) {
                held.push(model.clone());
            }
            held
        });
        pick
    }

    /// The models a multiplexed deployment's replicas hold (each once), what a replica process
    /// reports to its controller; empty for others.
    pub fn held_models(&self) -> Vec<Arc<str>> {
        let mut held: Vec<Arc<str>> = Vec::new();
        for r in self.set.replicas.load().iter() {
            for m in r.models.load().iter() {
                if !held.contains(m) {
                    held.push(m.clone());
                }
            }
        }
        held
    }

    /// The counters of a multiplexed deployment's model loads.
    pub fn multiplex_stats(&self) -> Option<&Arc<crate::multiplex::MultiplexStats>> {
        self.multiplex.as_ref()
    }
}

/// Checks that the model can be served with these settings: batching needs a dynamic first
/// dimension everywhere, and padding names numeric inputs (`sluice validate` checks it too).
pub fn check_fits(settings: &ReplicaSettings, metadata: &ModelMetadata) -> Result<(), LoadError> {
    let max = settings.max_batch_size;
    if max > 0 {
        let fixed =
            metadata.inputs.iter().chain(&metadata.outputs).find(|t| t.shape.first().is_none_or(|&d| d >= 0));
        if let Some(t) = fixed {
            return Err(LoadError::Settings(format!(
                "max_batch_size is {max} but `{}` has shape {:?}: batching needs a dynamic first dimension \
                 on every input and output (or max_batch_size: 0)",
                t.name, t.shape
            )));
        }
    }
    let pad = &settings.pad;
    if let Some(name) = pad.keys().find(|n| !metadata.inputs.iter().any(|i| &i.name == *n)) {
        return Err(LoadError::Settings(format!("pad names `{name}`, which is not an input of the model")));
    }
    if let Some(t) = metadata.inputs.iter().find(|i| pad.contains_key(&i.name) && i.dtype == DataType::Bytes)
    {
        return Err(LoadError::Settings(format!(
            "pad names `{}`, a BYTES input: only numeric inputs can be padded",
            t.name
        )));
    }
    Ok(())
}

/// The less loaded of the two choices `(a, b)` by `load` (not ready, ongoing: lower first);
/// when neither is ready, or the better holds `limit` requests already (`max_ongoing_requests`
/// is per replica: both picks can be full while another has room), the least loaded ready
/// replica of all `n`, if any (two picks can both be warming up while others are ready, with
/// three replicas or more).
fn choose(n: usize, (a, b): (usize, usize), limit: usize, load: impl Fn(usize) -> (bool, usize)) -> usize {
    let best = if load(a) <= load(b) { a } else { b };
    let (not_ready, ongoing) = load(best);
    if !not_ready && ongoing < limit {
        return best;
    }
    (0..n).map(|i| (load(i), i)).filter(|&((not_ready, _), _)| !not_ready).min().map_or(best, |(_, i)| i)
}

/// Two distinct random indices below `n` (the same one twice when `n` is 1).
fn two_choices(n: usize) -> (usize, usize) {
    if n <= 1 {
        return (0, 0);
    }
    let first = fastrand::usize(..n);
    let offset = 1 + fastrand::usize(..n - 1);
    (first, (first + offset) % n)
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.set.close();
    }
}

impl ReplicaSet {
    /// Closes the set and stops every replica.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.publish_gauges();
        self.ready_count.send_modify(|_| {});
        self.permits.close();
        for r in self.replicas.load().iter() {
            r.channel.stop();
        }
        // The set lets go of the replicas' queues too: a replica thread holds the set, so a
        // queue kept here would never report its sender gone, and a replica whose stop message
        // did not fit in its full queue would wait on it for ever once it has served the rest.
        self.replicas.store(Arc::new(Vec::new()));
    }
}

/// The most input bytes a request run on its caller's thread may hold ([`INLINE_MAX_BYTES`]).
///
/// The measure that lets a model's calls run there is an average over the requests seen: one
/// far larger than those (a 64 MiB text to a tokenizer that usually takes a sentence) would hold
/// a frontend thread, and every connection on it, for as long as it runs, past its own deadline
/// (which only a caller that waits can keep). It goes to the replica's thread instead.
fn small(inputs: &[crate::NamedTensor]) -> bool {
    inputs.iter().map(|i| i.tensor.data().len()).sum::<usize>() <= INLINE_MAX_BYTES
}

/// See [`small`]: 64 KiB, some thousands of rows of a small model's features.
pub const INLINE_MAX_BYTES: usize = 64 * 1024;

/// How long an empty deployment must stay empty before its drain ends ([`Deployment::settled`]).
pub const DRAIN_SETTLE: Duration = Duration::from_millis(50);

/// Where [`Deployment::dispatch`] put a job.
enum Dispatched {
    /// In a replica's queue.
    Sent,
    /// With this replica's model, for the caller to run.
    Left(Arc<ReplicaSlot>),
    /// Back with the caller: no replica left (its permit gone).
    Back(Box<Job>),
}

/// A pipeline request on its way to a deployment ([`Deployment::hold`]); the last one gone
/// wakes whoever waits to drain.
pub struct Held<'a> {
    deployment: &'a Deployment,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.deployment.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.deployment.idle.notify_waiters();
        }
    }
}

/// Counts a request inside the deployment; the last one out wakes whoever waits to drain.
struct Inside<'a> {
    deployment: &'a Deployment,
}

impl<'a> Inside<'a> {
    fn enter(deployment: &'a Deployment) -> Self {
        deployment.requests.fetch_add(1, Ordering::AcqRel);
        Self { deployment }
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        if self.deployment.requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.deployment.idle.notify_waiters();
        }
    }
}

/// How a future yielded on purpose ([`yielded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Yield {
    /// It woke itself: the scheduler puts it at the back of the worker's queue (and wakes a
    /// parked worker to help). A wrapper that absorbed that wake must pass it on.
    Requeue,
    /// Its waker is with the scheduler, which wakes it once the worker has nothing else to run
    /// (or after 61 polls): nothing to pass on. The worker first looks for work to steal, and
    /// on leaving that search it wakes a parked worker (tokio's hand-off), which then holds the
    /// I/O driver: at one connection the connection moves between the workers. Measured, that
    /// costs neither CPU nor latency (per-thread `perf stat`, 2026-12-05).
    Defer,
}

/// Yields once to the other tasks the worker has ready ([`Yield`] says how). Requeued is what
/// callers that meet others use: deferred held every caller's batch back under load (64
/// connections served ~10 % fewer requests). A wrapper that polls again at once a future that
/// woke itself (the server's connections) leaves one that [`yielded`] to the scheduler.
pub struct YieldOnce {
    how: Yield,
    yielded: bool,
}

/// Yields once to the other tasks the worker has ready: see [`YieldOnce`].
pub fn yield_once(how: Yield) -> YieldOnce {
    YieldOnce { how, yielded: false }
}

thread_local! {
    static YIELDED: std::cell::Cell<Option<Yield>> = const { std::cell::Cell::new(None) };
}

/// Whether (and how) a future polled on this thread yielded on purpose since the last call;
/// clears it. For a wrapper that polls a future again at once when it woke itself: one that
/// yielded is left to the scheduler instead.
pub fn yielded() -> Option<Yield> {
    YIELDED.with(|y| y.take())
}

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.yielded {
            return std::task::Poll::Ready(());
        }
        self.yielded = true;
        YIELDED.with(|y| y.set(Some(self.how)));
        match self.how {
            Yield::Requeue => cx.waker().wake_by_ref(),
            Yield::Defer => {
                let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
            }
        }
        std::task::Poll::Pending
    }
}

/// What admitting a request took: its permit, and its count on the replica it went to. It
/// travels with the request's reply (a local replica's job, [`RemoteCall::admission`]) and is
/// released with it.
pub struct Admission {
    _permit: tokio::sync::OwnedSemaphorePermit,
    ongoing: OngoingGuard,
}

impl Admission {
    /// Moves its count to `slot` (a job handed to another replica).
    fn count_on(&mut self, slot: &ReplicaSlot) {
        if !Arc::ptr_eq(&self.ongoing.ongoing, &slot.ongoing) {
            self.ongoing = OngoingGuard::new(slot);
        }
    }
}

/// A job its caller left with a replica's model and has not run yet: taken out of `pending`
/// again (its reply closed, so the job and its admission go) if the caller is dropped first.
/// Otherwise nobody might look at `pending` again while the admission it holds keeps every
/// other caller out.
struct Abandoned<'a> {
    cell: &'a ModelCell,
    /// The caller's end of the job's reply, given back once the job is no longer its alone.
    answer: Option<Answer>,
}

type Answer = tokio::sync::oneshot::Receiver<Result<Vec<crate::NamedTensor>, InferError>>;

impl Abandoned<'_> {
    fn disarm(mut self) -> Answer {
        self.answer.take().expect("armed until now")
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(answer) = self.answer.take() {
            drop(answer);
            self.cell.drop_abandoned();
        }
    }
}

/// Leaves the admission queue when the waiting request gets its slot, times out or is dropped.
///
/// The gauge moves by the same ±1 as the count, never `set` to a count read a moment before:
/// two threads that changed the count one after the other could land their `set`s the other
/// way round and leave the gauge at 1 on an idle deployment for good. Increments and
/// decrements add up to the count whatever order they land in. (One atomic update each, as
/// `set` was.)
struct QueueExit<'a> {
    queued: &'a AtomicUsize,
    gauge: &'a metrics::Gauge,
}

impl<'a> QueueExit<'a> {
    /// A request counted in `queued` (by the caller, which bounds it) joins the gauge too.
    fn joined(queued: &'a AtomicUsize, gauge: &'a metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self { queued, gauge }
    }
}

impl Drop for QueueExit<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

/// Counts a request against its replica until it is answered or abandoned; the replica's
/// in-flight gauge moves by the same ±1 (see [`QueueExit`] for why not `set`).
struct OngoingGuard {
    ongoing: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl OngoingGuard {
    /// Counts one more request on `slot`.
    fn new(slot: &ReplicaSlot) -> Self {
        Self::count(&slot.ongoing, &slot.in_flight.gauge)
    }

    fn count(ongoing: &Arc<AtomicUsize>, gauge: &Gauge) -> Self {
        ongoing.fetch_add(1, Ordering::AcqRel);
        gauge.increment(1.0);
        Self { ongoing: ongoing.clone(), gauge: gauge.clone() }
    }
}

impl Drop for OngoingGuard {
    fn drop(&mut self) {
        self.ongoing.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use arc_swap::ArcSwap;
    use tokio::sync::{Semaphore, watch};

    use super::{
        Channel, DeploymentSpec, OngoingGuard, QueueExit, ReplicaConfig, ReplicaSet, choose, queue_capacity,
        two_choices,
    };
    use crate::batch::BatchPolicy;

    /// A model whose calls wait until the test lets them go (`entered` counts them); it counts
    /// as alive while `alive` has a second owner.
    struct Gated {
        meta: crate::ModelMetadata,
        open: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        entered: Arc<AtomicUsize>,
        _alive: Arc<()>,
    }

    impl crate::Backend for Gated {
        fn metadata(&self) -> &crate::ModelMetadata {
            &self.meta
        }

        fn infer(
            &mut self,
            _inputs: Vec<crate::NamedTensor>,
            _outputs: &[String],
        ) -> Result<Vec<crate::NamedTensor>, crate::InferError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let (lock, cvar) = &*self.open;
            let _open = cvar.wait_while(lock.lock().unwrap(), |open| !*open).unwrap();
            Ok(Vec::new())
        }
    }

    /// A job of no inputs, answered on `reply`, due in a minute.
    fn empty_job(
        reply: tokio::sync::oneshot::Sender<Result<Vec<crate::NamedTensor>, crate::InferError>>,
    ) -> crate::batch::Job {
        let now = std::time::Instant::now();
        crate::batch::Job {
            inputs: Vec::new(),
            outputs: Arc::from([]),
            rows: 1,
            deadline: now + std::time::Duration::from_secs(60),
            admitted: now,
            arrived: now,
            reply: crate::batch::Reply::new(reply),
            span: tracing::Span::none(),
            model: None,
            tried: None,
        }
    }

    /// Dropping a deployment ends its replica threads even when a replica's queue is full, so
    /// that the stop message is not delivered: the queue reports its sender gone once the
    /// replica has served what it holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_deployment_ends_a_replica_whose_queue_was_full() {
        let open = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let alive = Arc::new(());
        let entered = Arc::new(AtomicUsize::new(0));
        let (o, a, e) = (open.clone(), alive.clone(), entered.clone());
        let factory: crate::BackendFactory = Arc::new(move || {
            let meta =
                crate::ModelMetadata { platform: "test".into(), inputs: Vec::new(), outputs: Vec::new() };
            Ok(Box::new(Gated { meta, open: o.clone(), entered: e.clone(), _alive: a.clone() })
                as Box<dyn crate::Backend>)
        });
        let mut spec = DeploymentSpec::new("full");
        spec.settings.warmup = false;
        spec.settings.max_ongoing_requests = 1;
        let d = super::Deployment::start(spec, factory).unwrap();
        assert!(d.wait_ready(std::time::Duration::from_secs(5)).await);
        let replicas = d.set.replicas.load_full();
        let Channel::Local(tx, _) = &replicas[0].channel else { unreachable!("a local replica") };
        // The callers stay (a job whose caller has gone is skipped, not run).
        let mut callers = Vec::new();
        let mut job = || {
            let (reply, answer) = tokio::sync::oneshot::channel();
            callers.push(answer);
            empty_job(reply)
        };
        // One job runs (held at the gate), then the queue fills up.
        tx.send(super::Msg::Job(job())).unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while entered.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < until, "the replica took the first job");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        while tx.try_send(super::Msg::Job(job())).is_ok() {}
        assert!(tx.try_send(super::Msg::Job(job())).is_err(), "the queue is full");
        drop(replicas);
        drop(d);
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&alive) > 1 && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(Arc::strong_count(&alive), 1, "the replica thread ended and dropped its model");
        assert_eq!(
            entered.load(Ordering::SeqCst),
            3,
            "it served what it held first (one running, two queued)"
        );
    }

    #[test]
    fn a_replica_queue_holds_every_slot_of_the_set_up_to_a_cap() {
        assert_eq!(queue_capacity(64, 2), 129, "2 replicas of 64, and the stop message");
        assert_eq!(queue_capacity(64, 0), 65, "scale to zero: at least one replica's");
        assert_eq!(queue_capacity(1000, 4096), 4097, "capped");
        assert_eq!(queue_capacity(10_000, 2), 10_001, "never below the replica's own slots");
        assert_eq!(queue_capacity(1_000_000, 8), 65_537, "but never above MAX_QUEUE");
        assert_eq!(queue_capacity(usize::MAX, usize::MAX), 65_537, "no overflow");
    }
    use crate::metrics::DeploymentMetrics;
    use crate::replica::{ModelCell, ReplicaHost};

    /// A replica set of `n` slots with no threads behind them (only readiness is exercised).
    fn set_of(n: usize) -> Arc<ReplicaSet> {
        let spec = DeploymentSpec::new("race");
        let metrics = Arc::new(DeploymentMetrics::new("race", "1", 1));
        let factory: crate::BackendFactory = Arc::new(|| Err(crate::LoadError::Thread("unused".into())));
        let config = Arc::new(ReplicaConfig {
            name: "race".into(),
            policy: spec.batch_policy(),
            model_outputs: Arc::from([]),
            warmup: false,
            factory,
            spin: std::time::Duration::ZERO,
            metrics,
        });
        let set = Arc::new(ReplicaSet {
            spec,
            config,
            replicas: ArcSwap::from_pointee(Vec::new()),
            ready_count: watch::channel(0).0,
            closed: AtomicBool::new(false),
            permits: Arc::new(Semaphore::new(0)),
            runtime: tokio::runtime::Handle::try_current().ok(),
            next_id: AtomicUsize::new(n),
            served: AtomicBool::new(false),
            gauges: super::GaugeShare::default(),
        });
        for id in 0..n {
            let (tx, _rx) = std::sync::mpsc::sync_channel(1);
            set.add_slot(id, Channel::Local(tx, Arc::new(ModelCell::new(BatchPolicy::default()))));
        }
        set
    }

    /// A job handed to another replica (its queue full, or its model panicked) is counted on
    /// the replica that takes it, so that routing and scaling see where the load is; each ready
    /// replica is tried, least loaded first; a job none can take comes back counted on the
    /// replica that holds it.
    #[test]
    fn a_handed_on_job_is_counted_on_the_replica_that_takes_it() {
        use std::sync::mpsc::TryRecvError;

        use super::{Admission, Msg, OngoingGuard};
        let set = set_of(0);
        let mut queues = Vec::new();
        for id in 0..3 {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            set.add_slot(id, Channel::Local(tx, Arc::new(ModelCell::new(BatchPolicy::default()))));
            queues.push(rx);
        }
        let slots = set.replicas.load_full();
        slots.iter().for_each(|r| r.ready.store(true, Ordering::SeqCst));
        let ongoing = || slots.iter().map(|r| r.ongoing.load(Ordering::SeqCst)).collect::<Vec<_>>();
        let fill = |i: usize| {
            let Channel::Local(tx, _) = &slots[i].channel else { unreachable!("a local replica") };
            tx.try_send(Msg::Stop).unwrap();
        };
        set.permits.add_permits(1);
        let (reply, _answer) = tokio::sync::oneshot::channel();
        let mut job = empty_job(reply);
        let permit = set.permits.clone().try_acquire_owned().unwrap();
        job.reply.hold(Admission { _permit: permit, ongoing: OngoingGuard::new(&slots[0]) });
        assert_eq!(ongoing(), [1, 0, 0]);

        // Replica 1 (least loaded, first in order) cannot take it: replica 2 does.
        fill(1);
        assert!(set.redispatch(job, 0).is_ok());
        assert_eq!(ongoing(), [0, 0, 1], "counted where it went");
        let Ok(Msg::Job(job)) = queues[2].try_recv() else { panic!("replica 2 holds the job") };

        // No other replica can take it: it comes back, counted on the one that holds it.
        fill(0);
        let Err(job) = set.redispatch(job, 2) else { panic!("every other queue is full") };
        assert_eq!(ongoing(), [0, 0, 1]);
        assert!(
            matches!(queues[0].try_recv(), Ok(Msg::Stop)) && matches!(queues[1].try_recv(), Ok(Msg::Stop))
        );
        assert!(matches!(queues[2].try_recv(), Err(TryRecvError::Empty)), "nothing sent twice");
        drop(job);
        assert_eq!(ongoing(), [0, 0, 0], "released with the job");
        assert_eq!(set.permits.available_permits(), 1);
    }

    /// A multiplexed job handed on (a full queue, a panicked or stopped replica) goes to a
    /// replica holding its model while one has room, as `dispatch` chooses, even when another
    /// is less loaded; with every holder saturated, to the least loaded.
    #[test]
    fn a_handed_on_multiplexed_job_goes_to_a_replica_holding_its_model() {
        use super::Msg;
        let set = set_of(0);
        let mut queues = Vec::new();
        for id in 0..3 {
            let (tx, rx) = std::sync::mpsc::sync_channel(4);
            set.add_slot(id, Channel::Local(tx, Arc::new(ModelCell::new(BatchPolicy::default()))));
            queues.push(rx);
        }
        let slots = set.replicas.load_full();
        slots.iter().for_each(|r| r.ready.store(true, Ordering::SeqCst));
        slots[2].models.store(Arc::new(vec![Arc::from("b")]));
        // Busier than replica 1, below the limit.
        slots[2].ongoing.store(1, Ordering::SeqCst);
        let job_for = |model: &str| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let mut job = empty_job(reply);
            job.model = Some(Arc::from(model));
            (job, answer)
        };
        let (job, _answer) = job_for("b");
        assert!(set.redispatch(job, 0).is_ok());
        assert!(matches!(queues[2].try_recv(), Ok(Msg::Job(_))), "the replica holding `b` took it");
        assert!(queues[1].try_recv().is_err());

        // A model no replica holds: the least loaded.
        let (job, _answer) = job_for("c");
        assert!(set.redispatch(job, 0).is_ok());
        assert!(matches!(queues[1].try_recv(), Ok(Msg::Job(_))), "the least loaded took it");

        // The holder saturated: the least loaded, which will load the model.
        slots[2].ongoing.store(set.spec.ongoing_limit(), Ordering::SeqCst);
        let (job, _answer) = job_for("b");
        assert!(set.redispatch(job, 0).is_ok());
        assert!(matches!(queues[1].try_recv(), Ok(Msg::Job(_))), "the least loaded took it");
        assert!(queues[2].try_recv().is_err());
    }

    /// Replicas warm up on their own threads and report ready at about the same time. The
    /// published count must end at the number of ready replicas: a count taken by one thread
    /// and published after another's larger one left `wait_ready` waiting for minutes on a
    /// 2-replica deployment (issue 15). The race is narrow, so it is run many times on two
    /// long-lived threads (without the fix this fails within a few thousand rounds).
    #[test]
    fn readiness_reported_at_once_by_every_replica_is_never_lost() {
        const REPLICAS: usize = 2;
        const ROUNDS: usize = 100_000;
        let set = set_of(REPLICAS);
        let rx = set.ready_count.subscribe();
        let barrier = Barrier::new(REPLICAS + 1);
        std::thread::scope(|s| {
            for id in 0..REPLICAS {
                let (set, barrier) = (&set, &barrier);
                s.spawn(move || {
                    for _ in 0..ROUNDS {
                        barrier.wait();
                        set.set_ready(id, true);
                        barrier.wait();
                    }
                });
            }
            // Every round runs (a panic here would leave the threads at the barrier).
            let mut lost = 0;
            for _ in 0..ROUNDS {
                for r in set.replicas.load().iter() {
                    r.ready.store(false, Ordering::Release);
                }
                set.ready_count.send_replace(0);
                barrier.wait();
                barrier.wait();
                lost += usize::from(*rx.borrow() != REPLICAS);
            }
            assert_eq!(lost, 0, "{lost} of {ROUNDS} rounds lost a readiness update");
        });
    }

    #[test]
    fn two_choices_are_distinct_and_cover_every_replica() {
        for n in 2..8 {
            let mut seen = vec![0u32; n];
            for _ in 0..2000 {
                let (a, b) = two_choices(n);
                assert!(a < n && b < n);
                assert_ne!(a, b, "two choices among {n} replicas must differ");
                seen[a] += 1;
                seen[b] += 1;
            }
            assert!(seen.iter().all(|&c| c > 0), "every replica is a candidate: {seen:?}");
        }
        assert_eq!(two_choices(1), (0, 0));
    }

    #[test]
    fn two_choices_that_are_both_warming_up_give_way_to_a_ready_replica() {
        // (not ready, ongoing) per replica.
        let loads = [(true, 0), (true, 0), (false, 7), (false, 3), (true, 0)];
        let load = |i: usize| loads[i];
        assert_eq!(choose(5, (0, 1), 100, load), 3, "the least loaded ready one");
        assert_eq!(choose(5, (0, 2), 100, load), 2, "a ready pick stays");
        assert_eq!(choose(5, (3, 2), 100, load), 3, "the less loaded of two ready picks");
        let none_ready = |_: usize| (true, 0);
        assert_eq!(choose(3, (1, 2), 100, none_ready), 1, "no replica ready: a pick stays");
    }

    /// `max_ongoing_requests` is per replica: two picks at the limit give way to a ready
    /// replica with room (the request waited a whole batch behind a full one while another
    /// was idle); with none that has room, the least loaded.
    #[test]
    fn two_full_choices_give_way_to_a_replica_with_room() {
        let loads = [(false, 1), (false, 1), (false, 0)];
        let load = |i: usize| loads[i];
        assert_eq!(choose(3, (0, 1), 1, load), 2);
        assert_eq!(choose(3, (0, 1), 2, load), 0, "room in a pick: it stays");
        let full = |i: usize| [(false, 3), (false, 2), (false, 2)][i];
        assert_eq!(choose(3, (0, 2), 2, full), 1, "none with room: the least loaded");
    }

    /// Where a [`LateFirst`] gauge is in holding back an update.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    enum Hold {
        #[default]
        Off,
        Armed,
        Holding,
        Passed,
    }

    /// A gauge that, once armed, holds the next update back until another one has landed: the
    /// worst order in which two threads' updates can reach the exporter.
    #[derive(Default)]
    struct LateFirst {
        state: std::sync::Mutex<(f64, Hold)>,
        changed: std::sync::Condvar,
    }

    impl LateFirst {
        fn arm(&self) {
            self.state.lock().unwrap().1 = Hold::Armed;
        }

        /// Waits until an update is held back.
        fn wait_holding(&self) {
            let held = self.changed.wait_while(self.state.lock().unwrap(), |s| s.1 != Hold::Holding);
            drop(held.unwrap());
        }

        fn value(&self) -> f64 {
            self.state.lock().unwrap().0
        }

        fn update(&self, f: impl FnOnce(f64) -> f64) {
            let mut s = self.state.lock().unwrap();
            match s.1 {
                Hold::Armed => {
                    s.1 = Hold::Holding;
                    self.changed.notify_all();
                    s = self.changed.wait_while(s, |s| s.1 == Hold::Holding).unwrap();
                }
                Hold::Holding => {
                    s.1 = Hold::Passed;
                    self.changed.notify_all();
                }
                Hold::Off | Hold::Passed => {}
            }
            s.0 = f(s.0);
        }
    }

    impl metrics::GaugeFn for LateFirst {
        fn increment(&self, value: f64) {
            self.update(|v| v + value);
        }

        fn decrement(&self, value: f64) {
            self.update(|v| v - value);
        }

        fn set(&self, value: f64) {
            self.update(|_| value);
        }
    }

    /// Drops `first` on another thread, whose gauge update `late` holds back, then `second`
    /// here: each changes its count before its gauge, and the gauge hears of them the other
    /// way round.
    fn drop_in_the_worst_order<G: Send>(late: &LateFirst, first: G, second: G) {
        late.arm();
        std::thread::scope(|s| {
            s.spawn(move || drop(first));
            late.wait_holding();
            drop(second);
        });
    }

    /// The in-flight and queue-depth gauges read 0 once every request is gone, whatever order
    /// concurrent updates reach them in. Each gauge was `set` to the count its thread had just
    /// made: two requests leaving at once could land their `set`s the other way round and
    /// leave 1 on an idle deployment for good.
    #[test]
    fn the_in_flight_and_queue_gauges_end_at_zero_whatever_order_their_updates_land_in() {
        let late = Arc::new(LateFirst::default());
        let gauge = metrics::Gauge::from_arc(late.clone());
        let ongoing = Arc::new(AtomicUsize::new(0));
        let (a, b) = (OngoingGuard::count(&ongoing, &gauge), OngoingGuard::count(&ongoing, &gauge));
        assert_eq!(late.value(), 2.0);
        drop_in_the_worst_order(&late, a, b);
        assert_eq!((ongoing.load(Ordering::SeqCst), late.value()), (0, 0.0), "in flight");

        let late = Arc::new(LateFirst::default());
        let gauge = metrics::Gauge::from_arc(late.clone());
        // Counted by the caller, which bounds the queue, before it joins.
        let queued = AtomicUsize::new(1);
        let a = QueueExit::joined(&queued, &gauge);
        queued.fetch_add(1, Ordering::SeqCst);
        let b = QueueExit::joined(&queued, &gauge);
        assert_eq!(late.value(), 2.0);
        drop_in_the_worst_order(&late, a, b);
        assert_eq!((queued.load(Ordering::SeqCst), late.value()), (0, 0.0), "queue depth");
    }
}
