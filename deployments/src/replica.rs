//! A replica: one backend on its own OS thread, which also gathers its batches.
//!
//! The thread blocks on its queue, lets a batch fill until it is full or the batch deadline
//! (counted from the first request) passes, runs it, answers each caller through its own
//! oneshot, and goes back to the queue. Gathering on the model's own thread, rather than in an
//! async task that hands batches over, saves a cross-thread wake-up per batch on the latency
//! path, and forms batches exactly when the model is free (requests that arrive while a batch
//! runs make up the next one). The batching rules live in [`crate::batch::BatchState`].
//!
//! A panic in the model fails that batch only: the replica marks itself not ready, hands its
//! queue to the other replicas, loads a fresh backend, warms it and serves again.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::batch::{BatchPolicy, BatchState, Job, Taken};
use crate::concat::{merge, padded_dims, split, union_outputs};
use crate::metrics::{DeploymentMetrics, StageTimes};
use crate::{Backend, BackendFactory, ErrorKind, InferError, LoadError, NamedTensor, Tensor, Yield};

/// What a replica's queue carries. A job goes by value (boxing it would allocate once more
/// per queued request to save the two small messages' slots some bytes).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    Job(Job),
    /// What callers left with the model, handed over in one message so that it runs as one
    /// batch (sent one by one, the replica's thread could wake at the first and run each
    /// alone), and with one wake-up.
    Jobs(Vec<Job>),
    /// Finish what is queued, then stop (the replica is removed or the deployment is gone).
    Stop,
    /// A call run inline (on a caller's thread) panicked: replace the model.
    Reload,
}

/// How many batches a caller runs on its own thread before it hands what still waits to the
/// replica's thread: a frontend thread is not kept from its own connections for long.
const COMBINE_ROUNDS: usize = 4;

/// While callers run alone, one in this many yields anyway ([`ModelCell::before_batch`]).
const PROBE_EVERY: u32 = 8;

/// A replica's model, shared by its thread and by callers that run cheap calls on their own
/// thread (saving the two thread hand-offs of the queue).
///
/// Callers combine: each leaves its request in `pending`, lets the other requests its thread
/// has ready reach it too (one yield), and takes the model if it is free; the one that has it
/// runs what waits as one batch and looks again after it lets go of the model (requests left
/// while it ran make up the next batch). A caller that finds the model busy just waits for its
/// answer: whoever holds the model looks at `pending` after letting go, and the replica's
/// thread does the same before it sleeps, so nothing left there is stranded.
///
/// Measured (tiny MLP, 2 replicas, REST JSON, `scripts/bench_floor.py`, docs/benchmarks.md):
/// server CPU per request at 64 connections 15.2 → 13.2 µs against one-row inline calls and
/// the replica threads (which spun on their queues between batches); at one connection infer
/// p50 73 → 64 µs, at or below liveness.
pub(crate) struct ModelCell {
    model: Mutex<Option<Box<dyn Backend>>>,
    /// Mean time of recent model calls, nanoseconds (`u64::MAX`: not known yet).
    cost_ns: AtomicU64,
    /// Requests left by callers for whoever holds the model next.
    pending: Mutex<BatchState>,
    /// Batches of one request that callers ran in a row (0 after one of more).
    alone: AtomicU32,
}

impl ModelCell {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            model: Mutex::new(None),
            cost_ns: AtomicU64::new(u64::MAX),
            pending: Mutex::new(BatchState::new(policy)),
            alone: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Box<dyn Backend>>> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, BatchState> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How a caller that is to run a batch on its own thread first lets the requests its
    /// thread has ready join it: requeued while requests meet here; not at all for a caller
    /// `alone` in its deployment while the last batches held one request each, except one in
    /// [`PROBE_EVERY`], deferred ([`Yield::Defer`]): requests ready on the same worker are
    /// seen by no count until they are polled, and callers that each finish within their own
    /// poll would never meet again.
    pub fn before_batch(&self, alone: bool) -> Option<Yield> {
        match self.alone.load(Ordering::Relaxed) {
            0 => Some(Yield::Requeue),
            _ if !alone => Some(Yield::Requeue),
            n if n.is_multiple_of(PROBE_EVERY) => Some(Yield::Defer),
            _ => None,
        }
    }

    /// Whether model calls are known to take less than `threshold`.
    pub fn cheap(&self, threshold: Duration) -> bool {
        (self.cost_ns.load(Ordering::Relaxed) as u128) < threshold.as_nanos()
    }

    /// Folds one measured call into the mean (weight 1/8). Only for models that may run
    /// inline: the others stay "not known" and never do.
    fn observe(&self, took: Duration, model: &dyn Backend) {
        if !model.inline_safe() {
            return;
        }
        let ns = took.as_nanos().min(u64::MAX as u128 / 2) as u64;
        let old = self.cost_ns.load(Ordering::Relaxed);
        let new = if old == u64::MAX { ns } else { old - old / 8 + ns / 8 };
        self.cost_ns.store(new, Ordering::Relaxed);
    }

    /// Leaves `job` for whoever runs the model next; the caller then calls
    /// [`ModelCell::run_pending`].
    pub fn leave(&self, job: Job) {
        self.pending().push(job);
    }

    /// Drops the jobs whose callers have gone from `pending` (and their admissions with them):
    /// for a caller dropped after [`ModelCell::leave`], before its [`ModelCell::run_pending`].
    pub fn drop_abandoned(&self) {
        let gone = self.pending().drain_closed();
        drop(gone);
    }

    /// While the model is free, runs what callers left on this thread, a batch at a time, for
    /// up to [`COMBINE_ROUNDS`] batches while calls measure under `under`; what still waits
    /// then goes to the replica's thread through `tx`, as does everything while the model is
    /// out (loading, or replaced after a panic, which this reports to the replica's thread).
    pub fn run_pending(
        &self,
        config: &ReplicaConfig,
        me: (&dyn ReplicaHost, usize),
        tx: &SyncSender<Msg>,
        under: Duration,
    ) {
        for round in 0..COMBINE_ROUNDS {
            // A batch that measured slow sends the rest to the replica's thread: this one's
            // caller (a frontend thread) has waited long enough.
            if round > 0 && !self.cheap(under) {
                break;
            }
            let mut guard = match self.model.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder looks at `pending` after it lets go.
                Err(TryLockError::WouldBlock) => return,
            };
            let Some(model) = guard.as_deref_mut() else {
                drop(guard);
                self.hand_over(config, me, tx);
                return;
            };
            let Taken { batch, expired } = self.pending().take(Instant::now());
            answer_expired(config, expired);
            if !batch.is_empty() {
                if batch.len() == 1 {
                    self.alone.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.alone.store(0, Ordering::Relaxed);
                }
                let ran = run_batch(config, me, model, batch);
                if ran.panicked {
                    *guard = None;
                    drop(guard);
                    ran.answers.send();
                    let _ = tx.try_send(Msg::Reload);
                    self.hand_over(config, me, tx);
                    return;
                }
                self.observe(ran.took, model);
                drop(guard);
                ran.answers.send();
            } else {
                drop(guard);
            }
            // Looked at after letting go: a caller that found the model busy left its request.
            if self.pending().is_empty() {
                return;
            }
        }
        self.hand_over(config, me, tx);
    }

    /// Runs the warm-up batch once more on the model, holding it as a batch does (the server's
    /// `release_startup_memory` reads the code back this way), then, as every holder does,
    /// looks at `pending`: what callers left while it ran goes to the replica's thread. False
    /// when the model is out (loading, or replaced after a panic) or the warm-up did not run.
    pub fn warm_again(
        &self,
        config: &ReplicaConfig,
        me: (&dyn ReplicaHost, usize),
        tx: &SyncSender<Msg>,
    ) -> bool {
        let mut guard = self.lock();
        let warmed = guard.as_deref_mut().is_some_and(|model| warm_up(config, model).is_some());
        drop(guard);
        if !self.pending().is_empty() {
            self.hand_over(config, me, tx);
        }
        warmed
    }

    /// Sends what callers left to the replica's thread; a request its queue cannot take (the
    /// replica stopped: a caller chose it just before it left) goes to another replica, or is
    /// answered 503 when there is none.
    fn hand_over(&self, config: &ReplicaConfig, (host, id): (&dyn ReplicaHost, usize), tx: &SyncSender<Msg>) {
        let jobs = self.pending().drain();
        if jobs.is_empty() {
            return;
        }
        if let Err(TrySendError::Full(Msg::Jobs(jobs)) | TrySendError::Disconnected(Msg::Jobs(jobs))) =
            tx.try_send(Msg::Jobs(jobs))
        {
            for job in jobs {
                elsewhere(config, host, id, job);
            }
        }
    }

    /// Moves what callers left into the replica thread's own queue.
    fn take_pending(&self, state: &mut BatchState) {
        let mut pending = self.pending();
        if !pending.is_empty() {
            state.append(&mut pending);
        }
    }
}

/// What a replica needs from whoever runs it (the deployment): where its readiness goes and
/// who takes its queue when its model panics. Admission is entirely the host's business.
pub(crate) trait ReplicaHost: Send + Sync + 'static {
    /// Replica `id` is ready (loaded and warmed) or no longer is.
    fn set_ready(&self, id: usize, ready: bool);
    /// Hands a job to another ready replica than `from` (each is tried, least loaded first),
    /// counted there; gives it back, counted on `from`, when none takes it. (The job itself
    /// comes back so that nothing accepted is lost; this is the cold path of a replica whose
    /// model panicked or a queue that was full, so its size does not matter.)
    #[allow(clippy::result_large_err)]
    fn redispatch(&self, job: Job, from: usize) -> Result<(), Job>;
    /// True once the deployment is gone: a failing replica then stops instead of coming back.
    fn is_closed(&self) -> bool;
    /// The models a multiplexed replica holds now (for routing requests to holders).
    fn set_models(&self, id: usize, models: Vec<Arc<str>>);
}

/// What every replica of a deployment runs with.
pub(crate) struct ReplicaConfig {
    /// The deployment's name, for messages.
    pub name: String,
    pub policy: BatchPolicy,
    /// Every output of the model, in model order.
    pub model_outputs: Arc<[String]>,
    pub warmup: bool,
    pub factory: BackendFactory,
    /// How long an idle replica thread polls its queue before it sleeps on it.
    pub spin: Duration,
    pub metrics: Arc<DeploymentMetrics>,
}

/// The replica thread's body: serves until told to stop; a panicking model is replaced.
pub(crate) fn run(
    id: usize,
    config: Arc<ReplicaConfig>,
    host: Arc<dyn ReplicaHost>,
    rx: Receiver<Msg>,
    backend: Box<dyn Backend>,
    cell: Arc<ModelCell>,
) {
    let mut backend = Some(backend);
    let mut state = BatchState::new(config.policy.clone());
    // Survives a panic, so a replica told to stop does not reload and linger.
    let mut stopping = false;
    loop {
        let mut model = match backend.take() {
            Some(b) => b,
            None => match reload(&config, &*host, id, &rx, &mut state, &mut stopping) {
                Some(b) => b,
                None => {
                    // What it held goes to replicas that can run it, or is answered 503, and so
                    // do requests sent to it after it was told to stop.
                    for job in state.drain() {
                        elsewhere(&config, &*host, id, job);
                    }
                    forward_until_gone(&config, &*host, id, &rx);
                    return;
                }
            },
        };
        let inline = model.inline_safe();
        if let Some(took) = warm_up(&config, model.as_mut()).filter(|_| inline) {
            // A full batch took this long: a safe upper bound for one request until measured.
            cell.cost_ns.store(took.as_nanos().min(u64::MAX as u128 - 1) as u64, Ordering::Relaxed);
        }
        *cell.lock() = Some(model);
        host.set_ready(id, true);
        let panicked = serve(&config, (&*host, id), &cell, &rx, &mut state, &mut stopping);
        host.set_ready(id, false);
        // Callers that find the model out from here on send their requests to the queue.
        let model = cell.lock().take();
        // Looked at after letting go, as every holder of the model does: a caller that found it
        // busy just now left its request here.
        let mut left = cell.pending().drain();
        if !panicked {
            // Left by callers in the moment this replica stopped, or sent to it from a replica
            // list read just before it left the set: another ready replica takes each, and what
            // none takes runs here, on the model this replica still holds (the last replica,
            // scaled down or retired, refused it 503 with the model in hand).
            // Again until none comes: what callers send while these run goes to the queue.
            let mut model = model;
            loop {
                for msg in rx.try_iter() {
                    match msg {
                        Msg::Job(job) => left.push(job),
                        Msg::Jobs(jobs) => left.extend(jobs),
                        Msg::Stop | Msg::Reload => {}
                    }
                }
                if left.is_empty() {
                    break;
                }
                for job in std::mem::take(&mut left) {
                    if let Err(job) = host.redispatch(job, id) {
                        state.push(job);
                    }
                }
                // Panicked (or no model): what is left is answered below.
                let Some(m) = model.as_deref_mut() else { break };
                if run_last(&config, (&*host, id), m, &mut state) {
                    break;
                }
            }
            drop(model);
            for job in state.drain() {
                answer_stopped(&config, job);
            }
            forward_until_gone(&config, &*host, id, &rx);
            return;
        }
        config.metrics.restarts.increment(1);
        // Hand what waits here to replicas that can run it now.
        let mut waiting: Vec<Job> = state.drain();
        waiting.extend(left);
        for msg in rx.try_iter() {
            match msg {
                Msg::Job(job) => waiting.push(job),
                Msg::Jobs(jobs) => waiting.extend(jobs),
                Msg::Stop => stopping = true,
                Msg::Reload => {}
            }
        }
        let leaving = stopping || host.is_closed();
        for job in waiting {
            if let Err(job) = host.redispatch(job, id) {
                if leaving {
                    answer_stopped(&config, job);
                } else {
                    state.push(job);
                }
            }
        }
        drop(model);
        cell.cost_ns.store(u64::MAX, Ordering::Relaxed);
        if leaving {
            // Told to stop (scaled down or retired) before the panic: do not come back.
            forward_until_gone(&config, &*host, id, &rx);
            return;
        }
    }
}

/// Runs what `state` holds on `model`, batch by batch, until it is empty (false) or the model
/// panics (true; what is left then is the caller's to answer): a stopping replica's last
/// requests.
fn run_last(
    config: &ReplicaConfig,
    me: (&dyn ReplicaHost, usize),
    model: &mut dyn Backend,
    state: &mut BatchState,
) -> bool {
    loop {
        let Taken { batch, expired } = state.take(Instant::now());
        answer_expired(config, expired);
        if batch.is_empty() {
            return false;
        }
        let ran = run_batch(config, me, model, batch);
        ran.answers.send();
        if ran.panicked {
            return true;
        }
    }
}

/// Requests still sent to a replica that stopped, by callers that chose it just before it left
/// the set (or handed what they left to its queue): each goes to another replica, or is answered
/// 503 when there is none, until no sender is left or the deployment is closed.
fn forward_until_gone(config: &ReplicaConfig, host: &dyn ReplicaHost, id: usize, rx: &Receiver<Msg>) {
    loop {
        match rx.recv_timeout(Duration::from_millis(10)) {
            Ok(Msg::Job(job)) => elsewhere(config, host, id, job),
            Ok(Msg::Jobs(jobs)) => jobs.into_iter().for_each(|job| elsewhere(config, host, id, job)),
            Ok(Msg::Stop | Msg::Reload) => {}
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) if host.is_closed() => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// Loads a fresh backend, retrying with a backoff while the factory fails; `None` when the
/// deployment is gone or the replica is told to stop. While it retries, what it holds goes to
/// another replica as soon as one is ready (checked every 50 ms: a replica can come back or be
/// added while this one keeps failing), and queued requests whose deadline passes are answered
/// 504 rather than left waiting.
fn reload(
    config: &ReplicaConfig,
    host: &dyn ReplicaHost,
    index: usize,
    rx: &Receiver<Msg>,
    state: &mut BatchState,
    stopping: &mut bool,
) -> Option<Box<dyn Backend>> {
    let mut wait = Duration::from_millis(100);
    loop {
        // A load that panics is a failed load, tried again like one (it would end this
        // thread, its slot counted and never serving again).
        let loaded = catch_unwind(AssertUnwindSafe(|| (config.factory)())).unwrap_or_else(|panic| {
            Err(LoadError::Step(format!("the model's load panicked: {}", panic_text(&*panic))))
        });
        match loaded {
            Ok(b) => {
                tracing::info!(model = %config.name, replica = index, "replica replaced");
                return Some(b);
            }
            Err(e) => {
                tracing::error!(model = %config.name, replica = index, "cannot reload the model: {e}");
                if host.is_closed() || *stopping {
                    return None;
                }
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        // Handed on below with the rest of what it holds.
                        Ok(Msg::Job(job)) => state.push(job),
                        Ok(Msg::Jobs(jobs)) => jobs.into_iter().for_each(|job| state.push(job)),
                        // Told to stop, or dropped from the deployment: one last load (a model
                        // that loads serves what it holds, then stops), not the rest of the wait.
                        Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                            *stopping = true;
                            break;
                        }
                        Ok(Msg::Reload) | Err(RecvTimeoutError::Timeout) => {}
                    }
                    answer_expired(config, state.take_expired(Instant::now()));
                    for job in state.drain() {
                        if let Err(job) = host.redispatch(job, index) {
                            state.push(job);
                        }
                    }
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A job replica `id` cannot run (it stopped) goes to another ready replica, or is answered 503
/// when there is none.
fn elsewhere(config: &ReplicaConfig, host: &dyn ReplicaHost, id: usize, job: Job) {
    if let Err(job) = host.redispatch(job, id) {
        answer_stopped(config, job);
    }
}

fn answer_stopped(config: &ReplicaConfig, job: Job) {
    let _ =
        job.reply.send(Err(InferError::unavailable(format!("replica of `{}` stopped; retry", config.name))));
}

fn answer_expired(config: &ReplicaConfig, expired: Vec<Job>) {
    for job in expired {
        let waited = job.admitted.elapsed();
        let _ = job.reply.send(Err(InferError::new(
            ErrorKind::DeadlineExceeded,
            format!("request timed out after {} ms waiting for model `{}`", waited.as_millis(), config.name),
        )));
    }
}

/// Polls `rx` for up to `spin` before the caller sleeps on it: a message that comes meanwhile
/// is taken without the futex sleep and the sender's wake-up system call. Under load the next
/// batch is usually there within microseconds; those two were a seventh of the server's CPU
/// (tiny MLP, 2 replicas, 64 connections: 21.6k req/s and 63.7 µs CPU per request sleeping at
/// once, 32.8k and 40.6 µs polling 50 µs). Yields between polls, so that a thread waiting for
/// this CPU (a frontend worker with the next requests) runs first.
fn spin_recv(rx: &Receiver<Msg>, spin: Duration) -> Option<Msg> {
    if spin.is_zero() {
        return None;
    }
    let until = Instant::now() + spin;
    loop {
        if let Ok(msg) = rx.try_recv() {
            return Some(msg);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::yield_now();
    }
}

/// Runs jobs until told to stop and drained (returns false) or the model panics (true).
fn serve(
    config: &ReplicaConfig,
    me: (&dyn ReplicaHost, usize),
    cell: &ModelCell,
    rx: &Receiver<Msg>,
    state: &mut BatchState,
    stopping: &mut bool,
) -> bool {
    let reload = std::cell::Cell::new(false);
    let take = |msg: Msg, state: &mut BatchState, stopping: &mut bool| match msg {
        Msg::Job(job) => state.push(job),
        Msg::Jobs(jobs) => jobs.into_iter().for_each(|job| state.push(job)),
        Msg::Stop => *stopping = true,
        Msg::Reload => reload.set(true),
    };
    loop {
        if reload.take() && cell.lock().is_none() {
            return true;
        }
        // Before it may sleep: what callers left for the model while this thread held it.
        cell.take_pending(state);
        if state.is_empty() {
            if *stopping {
                // A job sent from a replica list read just before this one left: serve it too.
                for msg in rx.try_iter() {
                    take(msg, state, stopping);
                }
                cell.take_pending(state);
                if state.is_empty() {
                    return false;
                }
            } else {
                match spin_recv(rx, config.spin).map_or_else(|| rx.recv(), Ok) {
                    Ok(msg) => take(msg, state, stopping),
                    Err(_) => return false,
                }
            }
        }
        for msg in rx.try_iter() {
            take(msg, state, stopping);
        }
        if reload.get() && state.is_empty() {
            continue;
        }
        let now = Instant::now();
        if !state.ready(now) && !*stopping {
            let wait = state.deadline().map_or(Duration::ZERO, |d| d.saturating_duration_since(now));
            match rx.recv_timeout(wait) {
                Ok(msg) => take(msg, state, stopping),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => *stopping = true,
            }
            if !state.ready(Instant::now()) && !*stopping {
                continue;
            }
        }
        let Taken { batch, expired } = state.take(Instant::now());
        answer_expired(config, expired);
        if batch.is_empty() {
            continue;
        }
        let mut guard = cell.lock();
        let Some(model) = guard.as_deref_mut() else {
            // An inline call panicked and left the model out: answer this batch from a new one.
            drop(guard);
            for job in batch {
                state.push(job);
            }
            return true;
        };
        let ran = run_batch(config, me, model, batch);
        if ran.panicked {
            *guard = None;
            drop(guard);
            ran.answers.send();
            return true;
        }
        cell.observe(ran.took, model);
        drop(guard);
        ran.answers.send();
    }
}

/// A batch's answers, sent with [`Answers::send`] once the model is let go, so that a caller
/// woken by its answer finds the model free for its next request. (Answered while the model
/// was still held, a caller sending one request after another found it busy every time, and
/// the replica's thread, which had it, ran all its requests from then on.)
pub(crate) enum Answers {
    Each(Vec<Job>, Vec<Vec<NamedTensor>>),
    All(Vec<Job>, InferError),
    /// Each job's own outcome: a merged call failed and each request was run alone.
    Alone(Vec<Job>, Vec<Result<Vec<NamedTensor>, InferError>>),
}

impl Answers {
    pub fn send(self) {
        match self {
            Answers::Each(batch, outputs) => {
                for (job, outputs) in batch.into_iter().zip(outputs) {
                    let _ = job.reply.send(Ok(outputs));
                }
            }
            Answers::All(batch, e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
            Answers::Alone(batch, results) => {
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

/// What [`run_batch`] did.
pub(crate) struct Ran {
    /// The model panicked: the replica must be replaced.
    pub panicked: bool,
    /// From taking the batch to having its outcome (what the inline budget learns from).
    pub took: Duration,
    /// To send once the model is let go.
    pub answers: Answers,
}

/// Runs one batch.
pub(crate) fn run_batch(
    config: &ReplicaConfig,
    (host, id): (&dyn ReplicaHost, usize),
    model: &mut dyn Backend,
    mut batch: Vec<Job>,
) -> Ran {
    let start = Instant::now();
    for job in &batch {
        config.metrics.queued(start.saturating_duration_since(job.admitted));
    }
    let rows: usize = batch.iter().map(|j| j.rows).sum();
    // One span for the model call, following each request's own span, so a slow batch's log
    // lines name the requests in it.
    let span = tracing::debug_span!("batch", model = %config.name, rows, requests = batch.len(), model_us = tracing::field::Empty);
    for job in &batch {
        span.follows_from(&job.span);
    }
    // Each request's trace shows the model call it was part of.
    let model_spans: Vec<tracing::Span> = batch
        .iter()
        .map(|j| tracing::debug_span!(parent: &j.span, "model", batch_rows = rows))
        .filter(|s| !s.is_disabled())
        .collect();
    // A multiplexed deployment's batch is one model's: make it current (loading it if needed).
    let selected = batch.first().and_then(|j| j.model.clone());
    let outcome = span.in_scope(|| {
        catch_unwind(AssertUnwindSafe(|| {
            if let Some(m) = &selected {
                model.select_model(m).map_err(Failed::All)?;
            }
            if batch.len() > 1 && !model.merges_requests() {
                return Err(Failed::Apart(run_alone(config, model, &mut batch)));
            }
            match infer_batch(config, model, &mut batch) {
                // One request's data (an index out of range, a value the model refuses) fails
                // the merged call for all: each request runs alone, so only its own fails.
                Err(e) if batch.len() > 1 => Err(Failed::Alone(e, run_alone(config, model, &mut batch))),
                result => result.map_err(Failed::All),
            }
        }))
    });
    if selected.is_some() {
        // A model that panicked is replaced by a fresh one that holds nothing: advertising
        // what the old one held would keep sending those ids here to be loaded again.
        let held = if outcome.is_ok() { model.loaded_models() } else { Vec::new() };
        host.set_models(id, held);
    }
    let took = start.elapsed();
    drop(model_spans);
    span.record("model_us", took.as_micros() as u64);
    for job in &batch {
        job.span.record("batch_rows", rows);
        job.span.record("model_us", took.as_micros() as u64);
    }
    // Recorded before anyone is answered, so a caller that reads the statistics after its
    // answer finds its own batch in them.
    let stages = match &outcome {
        Ok(Ok((_, stages))) => Some(*stages),
        _ => None,
    };
    // Requests that ran alone are each a model call of their own ([`each_alone`]): the batch
    // was not one (a tokenizer's read as calls of all its rows, taking all their time).
    if !matches!(outcome, Ok(Err(Failed::Alone(..) | Failed::Apart(..)))) {
        config.metrics.batch(rows, batch.len(), took, stages);
    }
    let (panicked, answers) = match outcome {
        Ok(Ok((per_job, _))) => (false, Answers::Each(batch, per_job)),
        Ok(Err(Failed::All(e))) => (false, Answers::All(batch, e)),
        Ok(Err(Failed::Alone(e, results))) => {
            let failed = results.iter().filter(|(_, r)| r.is_err()).count();
            tracing::debug!(model = %config.name, requests = batch.len(), failed, "batch failed ({e}); its requests ran alone");
            (false, each_alone(config, batch, results))
        }
        Ok(Err(Failed::Apart(results))) => (false, each_alone(config, batch, results)),
        Err(panic) => {
            let what = panic_text(&*panic);
            tracing::error!(model = %config.name, "model panicked: {what}; replacing the replica");
            let e = InferError::internal(format!("model `{}` panicked: {what}", config.name));
            (true, Answers::All(batch, e))
        }
    };
    Ran { panicked, took, answers }
}

/// The answers of a batch whose requests ran alone. Each request's own call is a model call
/// of the statistics (their counts left out every request of a batch that one bad request
/// made run alone).
fn each_alone(config: &ReplicaConfig, batch: Vec<Job>, results: RanAlone) -> Answers {
    let results = batch
        .iter()
        .zip(results)
        .map(|(job, (took, r))| {
            // A call that failed is a model call too (a failed call of a whole batch is).
            let stages = r.as_ref().ok().map(|(_, stages)| *stages);
            config.metrics.batch(job.rows, 1, took, stages);
            r.map(|(outputs, _)| outputs)
        })
        .collect();
    Answers::Alone(batch, results)
}

/// What a panic said.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// How a batch failed: as a whole, or merged, after which each request ran alone
/// ([`run_alone`]); or how it ran when its model does not merge requests (each alone, `Apart`).
enum Failed {
    All(InferError),
    Alone(InferError, RanAlone),
    Apart(RanAlone),
}

/// Each request of a batch run by itself: how long its call took, and its outputs (with the
/// call's stage times) or error.
type RanAlone = Vec<(Duration, Result<(Vec<NamedTensor>, StageTimes), InferError>)>;

/// Each job of a batch through the model by itself.
fn run_alone(config: &ReplicaConfig, model: &mut dyn Backend, batch: &mut [Job]) -> RanAlone {
    batch
        .iter_mut()
        .map(|job| {
            let started = Instant::now();
            let result = infer_batch(config, model, std::slice::from_mut(job))
                .map(|(mut outputs, stages)| (outputs.swap_remove(0), stages));
            (started.elapsed(), result)
        })
        .collect()
}

/// Runs a batch through the model: its outputs per job, and where the time went.
fn infer_batch(
    config: &ReplicaConfig,
    model: &mut dyn Backend,
    batch: &mut [Job],
) -> Result<(Vec<Vec<NamedTensor>>, StageTimes), InferError> {
    if let [job] = batch {
        // One request: its tensors go to the model as they are (nothing to prepare).
        let inputs = std::mem::take(&mut job.inputs);
        let called = Instant::now();
        let outputs = model.infer(inputs, &job.outputs)?;
        let stages = stage_times(model, Duration::ZERO, called.elapsed(), Duration::ZERO);
        return Ok((vec![outputs], stages));
    }
    let start = Instant::now();
    let pad = &config.policy.pad;
    // Padding would make a request's inputs as long as each other where the model says they
    // are (a sequence its ids and mask share) and answer it on pad values: its batch fails, and
    // each request runs alone (the model refuses that one, or runs it at its own lengths).
    if !pad.is_empty() && batch.iter().any(|job| !model.shared_dims_agree(&job.inputs)) {
        warn_once_of_shared_dims(&config.name);
        return Err(InferError::invalid("a request's inputs disagree on a dimension the model shares"));
    }
    let merged = merge(batch, pad)?;
    let dims = padded_dims(batch, &merged, pad);
    let outputs = union_outputs(batch, &config.model_outputs);
    let called = Instant::now();
    let results = model.infer(merged, &outputs)?;
    let returned = Instant::now();
    let per_job = split(&results, batch, &dims, &|output, axis| model.crops_to_request(output, axis))?;
    let stages = stage_times(model, called - start, returned - called, returned.elapsed());
    Ok((per_job, stages))
}

/// Says once per deployment that its requests whose padded inputs disagree on a dimension the
/// model names alike run alone (a model whose exporter named unrelated dimensions alike pays
/// for it in throughput, correctly answered; this says why).
fn warn_once_of_shared_dims(deployment: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !warned.iter().any(|d| d == deployment) {
        warned.push(deployment.to_string());
        tracing::warn!(
            model = %deployment,
            "a batch holds a request whose padded inputs differ on a dimension the model names alike in \
             both; such a request's batch runs each request alone (said once)"
        );
    }
}

/// Triton's stages of one model call: what the replica spent before the backend (`prepare`:
/// concatenation and padding) and after it (`split`), plus the backend's own copies in and
/// out of its framework, which `call` includes; the rest of `call` ran the model.
fn stage_times(model: &dyn Backend, prepare: Duration, call: Duration, split: Duration) -> StageTimes {
    let copies = model.last_copy_times();
    let copy_in = copies.input.min(call);
    let copy_out = copies.output.min(call - copy_in);
    StageTimes { input: prepare + copy_in, infer: call - copy_in - copy_out, output: copy_out + split }
}

/// The largest warm-up input made (zeros): past it, a model is served without its warm-up.
const WARM_UP_MAX_BYTES: usize = 256 * 1024 * 1024;

/// Runs one full-size batch of zeros so the first real request does not pay for lazy
/// initialisation. A failure is logged, not fatal: some models reject all-zero inputs.
/// Returns how long the warm-up batch took when it ran and succeeded.
fn warm_up(config: &ReplicaConfig, model: &mut dyn Backend) -> Option<Duration> {
    if !config.warmup {
        return None;
    }
    let rows = config.policy.max_batch_size.max(1);
    let inputs: Result<Vec<NamedTensor>, InferError> = model
        .metadata()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d >= 0 {
                        d as usize
                    } else if i == 0 {
                        rows
                    } else {
                        1
                    }
                })
                .collect();
            let count = crate::element_count(&shape)?;
            let width = spec.dtype.byte_size().unwrap_or(4);
            // A model file may fix an input at any size (`[1, 2^40]`): zeros that large would
            // abort the process, so such a model is served without its warm-up.
            let bytes = count.checked_mul(width).filter(|&b| b <= WARM_UP_MAX_BYTES).ok_or_else(|| {
                InferError::invalid(format!(
                    "input `{}` of shape {shape:?} is over {WARM_UP_MAX_BYTES} bytes",
                    spec.name
                ))
            })?;
            let data = vec![0u8; bytes];
            Ok(NamedTensor {
                name: spec.name.clone(),
                tensor: Tensor::new(spec.dtype, shape, Bytes::from(data))?,
            })
        })
        .collect();
    let started = Instant::now();
    let outputs = &config.model_outputs;
    match catch_unwind(AssertUnwindSafe(|| inputs.and_then(|inputs| model.infer(inputs, outputs)))) {
        Ok(Ok(_)) => {
            tracing::debug!(model = %config.name, rows, "warmed up in {:?}", started.elapsed());
            return Some(started.elapsed());
        }
        Ok(Err(e)) => tracing::warn!(model = %config.name, "warm-up batch failed (serving anyway): {e}"),
        Err(_) => tracing::warn!(model = %config.name, "warm-up batch panicked (serving anyway)"),
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::DataType;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::mpsc::sync_channel;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use tokio::sync::oneshot;

    use super::*;
    use crate::{ModelMetadata, TensorSpec};

    struct Echo(ModelMetadata);
    impl Backend for Echo {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }
        fn inline_safe(&self) -> bool {
            true
        }
        fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
            Ok(vec![NamedTensor { name: "y".into(), tensor: inputs[0].tensor.clone() }])
        }
    }

    fn echo() -> Box<dyn Backend> {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Int64, shape: vec![-1, 1] };
        Box::new(Echo(ModelMetadata {
            platform: "t".into(),
            inputs: vec![spec("x")],
            outputs: vec![spec("y")],
        }))
    }

    type Rx = oneshot::Receiver<Result<Vec<NamedTensor>, InferError>>;

    /// A model file that fixes an input at 4 TiB is served without its warm-up, not aborted
    /// making the zeros.
    #[test]
    fn a_huge_fixed_input_skips_the_warm_up() {
        let spec = TensorSpec { name: "x".into(), dtype: DataType::Fp32, shape: vec![1, 1 << 40] };
        let metadata =
            ModelMetadata { platform: "t".into(), inputs: vec![spec.clone()], outputs: vec![spec] };
        let base = config();
        let warming = ReplicaConfig {
            name: base.name.clone(),
            policy: base.policy.clone(),
            model_outputs: base.model_outputs.clone(),
            warmup: true,
            factory: base.factory.clone(),
            spin: base.spin,
            metrics: base.metrics.clone(),
        };
        assert_eq!(warm_up(&warming, &mut Echo(metadata)), None);
        // A small one still warms up.
        assert!(warm_up(&warming, echo().as_mut()).is_some());
    }

    fn job(v: i64) -> (Job, Rx) {
        let (reply, rx) = oneshot::channel();
        let tensor = Tensor::new(DataType::Int64, vec![1, 1], Bytes::from(v.to_le_bytes().to_vec())).unwrap();
        let now = Instant::now();
        let job = Job {
            inputs: vec![NamedTensor { name: "x".into(), tensor }],
            outputs: ["y".to_string()].into(),
            rows: 1,
            deadline: now + Duration::from_secs(60),
            admitted: now,
            arrived: now,
            reply: crate::batch::Reply::new(reply),
            span: tracing::Span::none(),
            model: None,
            tried: None,
        };
        (job, rx)
    }

    fn config() -> Arc<ReplicaConfig> {
        let policy = BatchPolicy { max_batch_size: 4, ..Default::default() };
        let factory: crate::BackendFactory = Arc::new(|| Ok(echo()));
        Arc::new(ReplicaConfig {
            name: "echo".into(),
            policy,
            model_outputs: Arc::from(["y".to_string()]),
            warmup: false,
            factory,
            spin: Duration::ZERO,
            metrics: Arc::new(crate::metrics::DeploymentMetrics::new("echo", "1", 4)),
        })
    }

    /// A host with one other replica, which "serves" whatever is redispatched to it (answers
    /// it Ok at once). `block_ready_false`/`block_redispatch` make it wait on a barrier.
    #[derive(Default)]
    struct Host {
        ready: AtomicBool,
        not_ready_gate: Option<Arc<Barrier>>,
        redispatch_gate: Option<Arc<Barrier>>,
        redispatched: AtomicUsize,
        models: std::sync::Mutex<Option<Vec<Arc<str>>>>,
        /// No other replica: nothing redispatched is taken.
        alone: bool,
    }
    impl ReplicaHost for Host {
        fn set_ready(&self, _: usize, ready: bool) {
            self.ready.store(ready, Ordering::SeqCst);
            if !ready && let Some(b) = &self.not_ready_gate {
                b.wait();
                b.wait();
            }
        }
        fn redispatch(&self, job: Job, _: usize) -> Result<(), Job> {
            if self.alone {
                return Err(job);
            }
            if self.redispatched.fetch_add(1, Ordering::SeqCst) == 0
                && let Some(b) = &self.redispatch_gate
            {
                b.wait();
                b.wait();
            }
            let _ = job.reply.send(Ok(vec![]));
            Ok(())
        }
        fn is_closed(&self) -> bool {
            false
        }
        fn set_models(&self, _: usize, models: Vec<Arc<str>>) {
            *self.models.lock().unwrap() = Some(models);
        }
    }

    /// A multiplexed model that holds `a` and panics in the call.
    struct Holding(ModelMetadata);
    impl Backend for Holding {
        fn metadata(&self) -> &ModelMetadata {
            &self.0
        }
        fn select_model(&mut self, _: &str) -> Result<(), InferError> {
            Ok(())
        }
        fn loaded_models(&self) -> Vec<Arc<str>> {
            vec![Arc::from("a")]
        }
        fn infer(&mut self, _: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
            panic!("the model broke")
        }
    }

    /// A multiplexed model that panicked is replaced by one that holds nothing: the replica
    /// stops advertising the models the broken one held (requests for them were routed to it
    /// to be loaded again instead of to a replica holding them).
    #[test]
    fn a_panicked_model_advertises_nothing() {
        let host = Host::default();
        let mut model = Holding(echo().metadata().clone());
        let (mut j, rx) = job(1);
        j.model = Some(Arc::from("a"));
        let ran = run_batch(&config(), (&host, 0), &mut model, vec![j]);
        assert!(ran.panicked);
        assert_eq!(*host.models.lock().unwrap(), Some(vec![]));
        ran.answers.send();
        assert!(rx.blocking_recv().unwrap().is_err());
    }

    /// A replica whose model panicked and cannot be loaded again is told to stop: a request
    /// sent to it after the stop goes to another replica (it was dropped with the queue, and
    /// its caller told to retry).
    #[test]
    fn a_replica_that_gives_up_reloading_forwards_what_comes_after_its_stop() {
        let base = config();
        let config = Arc::new(ReplicaConfig {
            name: base.name.clone(),
            policy: base.policy.clone(),
            model_outputs: base.model_outputs.clone(),
            warmup: false,
            factory: Arc::new(|| Err(crate::LoadError::Step("the model's file is gone".into()))),
            spin: base.spin,
            metrics: base.metrics.clone(),
        });
        let host = Arc::new(Host::default());
        let cell = Arc::new(ModelCell::new(config.policy.clone()));
        let (tx, rx) = sync_channel(16);
        let thread = {
            let (config, host, cell) = (config.clone(), host.clone() as Arc<dyn ReplicaHost>, cell.clone());
            let model = Box::new(Holding(echo().metadata().clone()));
            std::thread::spawn(move || run(0, config, host, rx, model, cell))
        };
        let (first, first_rx) = job(1);
        tx.send(Msg::Job(first)).unwrap();
        assert!(first_rx.blocking_recv().unwrap().is_err(), "the model panicked");
        tx.send(Msg::Stop).unwrap();
        let (second, second_rx) = job(2);
        tx.send(Msg::Job(second)).unwrap();
        drop(tx);
        thread.join().unwrap();
        assert!(matches!(second_rx.blocking_recv(), Ok(Ok(_))), "sent on to another replica");
    }

    /// A replica told to stop; a caller leaves a request and runs `run_pending` while the
    /// replica's thread redispatches what it drained from `pending`: the request goes into the
    /// queue of a thread about to return, which sends it to another replica (it was dropped
    /// with the queue).
    #[test]
    fn a_request_handed_to_a_stopping_replica_goes_to_another() {
        let config = config();
        let not_ready = Arc::new(Barrier::new(2));
        let redispatch = Arc::new(Barrier::new(2));
        let host = Arc::new(Host {
            not_ready_gate: Some(not_ready.clone()),
            redispatch_gate: Some(redispatch.clone()),
            ..Default::default()
        });
        let (cell, tx, thread) = started(&config, &host);
        tx.send(Msg::Stop).unwrap();
        // The thread is in set_ready(false), about to take the model: a caller left a request
        // and is at its yield.
        not_ready.wait();
        let (first, mut first_rx) = job(1);
        cell.leave(first);
        not_ready.wait();
        // The thread drained it and redispatches it (blocked there); a second caller comes.
        redispatch.wait();
        let (second, mut second_rx) = job(2);
        cell.leave(second);
        cell.run_pending(&config, (&*host, 0), &tx, Duration::from_secs(1));
        redispatch.wait();
        drop(tx);
        thread.join().unwrap();
        assert!(first_rx.try_recv().unwrap().is_ok(), "first one redispatched");
        let second = second_rx.try_recv();
        assert!(
            matches!(second, Ok(Ok(_))),
            "second request should have been redispatched to the live replica; got {:?}",
            second.map(|r| r.map(|_| ()))
        );
    }

    /// A replica of an echo model on its thread, once it is ready: its model cell, its queue,
    /// the thread.
    fn started(
        config: &Arc<ReplicaConfig>,
        host: &Arc<Host>,
    ) -> (Arc<ModelCell>, std::sync::mpsc::SyncSender<Msg>, std::thread::JoinHandle<()>) {
        let cell = Arc::new(ModelCell::new(config.policy.clone()));
        let (tx, rx) = sync_channel(16);
        let thread = {
            let (config, host, cell) = (config.clone(), host.clone() as Arc<dyn ReplicaHost>, cell.clone());
            std::thread::spawn(move || run(0, config, host, rx, echo(), cell))
        };
        while !host.ready.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        (cell, tx, thread)
    }

    /// The last replica, told to stop (scaled down, retired): a request a caller leaves with
    /// it, and one sent to its queue, in the moment it stops are run on the model it still
    /// holds, not answered 503 for want of another replica.
    #[test]
    fn the_last_replica_runs_what_reaches_it_as_it_stops() {
        let config = config();
        let not_ready = Arc::new(Barrier::new(2));
        let host =
            Arc::new(Host { not_ready_gate: Some(not_ready.clone()), alone: true, ..Default::default() });
        let (cell, tx, thread) = started(&config, &host);
        tx.send(Msg::Stop).unwrap();
        // The thread has served its last and is in set_ready(false), about to take the model.
        not_ready.wait();
        let (left, left_rx) = job(1);
        cell.leave(left);
        let (sent, sent_rx) = job(2);
        tx.send(Msg::Job(sent)).unwrap();
        not_ready.wait();
        drop(tx);
        thread.join().unwrap();
        for (rx, v) in [(left_rx, 1i64), (sent_rx, 2)] {
            let outputs = rx.blocking_recv().unwrap().unwrap_or_else(|e| panic!("request {v}: {e}"));
            assert_eq!(outputs[0].tensor.data().as_ref(), v.to_le_bytes(), "request {v} ran");
        }
    }

    /// What callers left goes to the replica's thread in one message, which that thread runs
    /// as one batch: sent one by one, the thread could wake at the first and run each alone (a
    /// burst split into batches of one on a busy machine, where a batch had measured slow).
    #[test]
    fn what_callers_left_is_handed_over_as_one_batch() {
        let config = config();
        let host = Host::default();
        let cell = ModelCell::new(config.policy.clone());
        let (tx, rx) = sync_channel(16);
        let answers: Vec<Rx> = (1..=3)
            .map(|k| {
                let (job, answer) = job(k);
                cell.leave(job);
                answer
            })
            .collect();
        cell.hand_over(&config, (&host, 0), &tx);
        let Ok(Msg::Jobs(jobs)) = rx.try_recv() else { panic!("the jobs are not handed over together") };
        assert_eq!(jobs.len(), 3);
        assert!(rx.try_recv().is_err(), "one message");
        assert!(cell.pending().is_empty());
        cell.hand_over(&config, (&host, 0), &tx);
        assert!(rx.try_recv().is_err(), "nothing left, nothing sent");
        // The replica's thread takes them in together and runs them as one batch.
        let mut state = BatchState::new(config.policy.clone());
        let mut stopping = false;
        tx.send(Msg::Jobs(jobs)).unwrap();
        tx.send(Msg::Stop).unwrap();
        let rows = Arc::new(std::sync::Mutex::new(Vec::new()));
        *cell.lock() = Some(Box::new(Rows(echo(), rows.clone())));
        assert!(!serve(&config, (&host, 0), &cell, &rx, &mut state, &mut stopping));
        assert_eq!(*rows.lock().unwrap(), [3], "one batch of three");
        for (k, mut answer) in (1i64..).zip(answers) {
            let outputs = answer.try_recv().unwrap().unwrap();
            assert_eq!(outputs[0].tensor.data()[..8], k.to_le_bytes(), "each caller gets its own answer");
        }
    }

    /// A model that records the rows of each call.
    struct Rows(Box<dyn Backend>, Arc<std::sync::Mutex<Vec<usize>>>);
    impl Backend for Rows {
        fn metadata(&self) -> &ModelMetadata {
            self.0.metadata()
        }
        fn infer(
            &mut self,
            inputs: Vec<NamedTensor>,
            outputs: &[String],
        ) -> Result<Vec<NamedTensor>, InferError> {
            self.1.lock().unwrap().push(inputs[0].tensor.shape()[0]);
            self.0.infer(inputs, outputs)
        }
    }
}
