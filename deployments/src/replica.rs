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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::batch::{BatchPolicy, BatchState, Job, Taken};
use crate::concat::{merge, padded_dims, split, union_outputs};
use crate::metrics::{DeploymentMetrics, StageTimes};
use crate::{Backend, BackendFactory, DataType, ErrorKind, InferError, NamedTensor, Tensor};

/// What a replica's queue carries.
pub(crate) enum Msg {
    Job(Job),
    /// Finish what is queued, then stop (the replica is removed or the deployment is gone).
    Stop,
    /// A call run inline (on a caller's thread) panicked: replace the model.
    Reload,
}

/// A replica's model, shared by its thread and by callers that run a cheap call on their own
/// thread when the replica is idle (saving the two thread hand-offs of the queue).
pub(crate) struct ModelCell {
    model: Mutex<Option<Box<dyn Backend>>>,
    /// Mean time of recent one-request model calls, nanoseconds (`u64::MAX`: not known yet).
    cost_ns: AtomicU64,
}

impl ModelCell {
    pub fn new() -> Self {
        Self { model: Mutex::new(None), cost_ns: AtomicU64::new(u64::MAX) }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Box<dyn Backend>>> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a one-request call is known to take less than `threshold`.
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

    /// Runs `job` on this thread when the model is free now: `Err(job)` when it is busy or
    /// (re)loading. A panic leaves the model out and returns true, for the replica thread to
    /// replace it.
    #[allow(clippy::result_large_err)]
    pub fn run_inline(
        &self,
        config: &ReplicaConfig,
        me: (&dyn ReplicaHost, usize),
        job: Job,
    ) -> Result<bool, Job> {
        let Ok(mut guard) = self.model.try_lock() else { return Err(job) };
        let Some(model) = guard.as_deref_mut() else { return Err(job) };
        let started = Instant::now();
        let panicked = run_batch(config, me, model, vec![job]);
        if panicked {
            *guard = None;
        } else {
            self.observe(started.elapsed(), model);
        }
        Ok(panicked)
    }
}

/// What a replica needs from whoever runs it (the deployment): where its readiness goes and
/// who takes its queue when its model panics. Admission is entirely the host's business.
pub(crate) trait ReplicaHost: Send + Sync + 'static {
    /// Replica `id` is ready (loaded and warmed) or no longer is.
    fn set_ready(&self, id: usize, ready: bool);
    /// Hands a job to another ready replica than `from`; gives it back when there is none.
    /// (The job itself comes back so that nothing accepted is lost; this is the cold path of a
    /// replica whose model panicked, so its size does not matter.)
    #[allow(clippy::result_large_err)]
    fn redispatch(&self, job: Job, from: usize) -> Result<(), Job>;
    /// True once the deployment is gone: a failing replica then stops instead of coming back.
    fn is_closed(&self) -> bool;
    /// The models a multiplexed replica holds now (for routing requests to holders).
    fn set_models(&self, id: usize, models: Vec<Arc<str>>);
}

/// When a replica of the deployment last ran a batch of two or more requests. Inline calls
/// save a lightly loaded deployment two thread hand-offs per request, but under load they run
/// one row per model call where the replica's thread would have batched the requests that
/// piled up meanwhile, and contend with it for the model (tiny MLP, 2 replicas, 64
/// connections: 27.8k req/s with inline calls, 37k without). Requests that meet in a batch
/// are the sign of that load; inline calls wait until none have for [`CROWD_HOLD`].
pub(crate) struct Crowding {
    origin: Instant,
    /// Nanoseconds after `origin` of the last batch of two or more; `u64::MAX`: never.
    last_ns: AtomicU64,
}

/// How long after a batch of two or more requests calls stay on the replica's thread.
pub(crate) const CROWD_HOLD: Duration = Duration::from_millis(100);

impl Crowding {
    pub fn new() -> Self {
        Self { origin: Instant::now(), last_ns: AtomicU64::new(u64::MAX) }
    }

    fn batched(&self, now: Instant) {
        let ns = now.saturating_duration_since(self.origin).as_nanos() as u64;
        self.last_ns.store(ns.min(u64::MAX - 1), Ordering::Relaxed);
    }

    /// No batch of two or more within [`CROWD_HOLD`] before `now`.
    pub fn quiet(&self, now: Instant) -> bool {
        let last = self.last_ns.load(Ordering::Relaxed);
        let now = now.saturating_duration_since(self.origin).as_nanos() as u64;
        last == u64::MAX || now.saturating_sub(last) >= CROWD_HOLD.as_nanos() as u64
    }
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
    /// Shared by the deployment's replicas: whether calls may run inline now.
    pub crowding: Crowding,
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
                None => return,
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
        let model = cell.lock().take();
        if !panicked {
            return;
        }
        config.metrics.restarts.increment(1);
        // Hand what waits here to replicas that can run it now.
        let mut waiting: Vec<Job> = state.drain();
        for msg in rx.try_iter() {
            match msg {
                Msg::Job(job) => waiting.push(job),
                Msg::Stop => stopping = true,
                Msg::Reload => {}
            }
        }
        let leaving = stopping || host.is_closed();
        for job in waiting {
            if let Err(job) = host.redispatch(job, id) {
                if leaving {
                    let _ = job.reply.send(Err(InferError::unavailable(format!(
                        "replica of `{}` stopped; retry",
                        config.name
                    ))));
                } else {
                    state.push(job);
                }
            }
        }
        drop(model);
        cell.cost_ns.store(u64::MAX, Ordering::Relaxed);
        if leaving {
            // Told to stop (scaled down or retired) before the panic: do not come back.
            return;
        }
    }
}

/// Loads a fresh backend, retrying with a backoff while the factory fails; `None` when the
/// deployment is gone or the replica is told to stop. While it retries, queued requests whose
/// deadline passes are answered 504 rather than left waiting.
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
        match (config.factory)() {
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
                        Ok(Msg::Job(job)) => state.push(job),
                        Ok(Msg::Stop) => *stopping = true,
                        Ok(Msg::Reload) | Err(_) => {}
                    }
                    answer_expired(config, state.take_expired(Instant::now()));
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
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
        Msg::Stop => *stopping = true,
        Msg::Reload => reload.set(true),
    };
    loop {
        if reload.take() && cell.lock().is_none() {
            return true;
        }
        if state.is_empty() {
            if *stopping {
                // A job sent from a replica list read just before this one left: serve it too.
                for msg in rx.try_iter() {
                    take(msg, state, stopping);
                }
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
        let single = batch.len() == 1;
        let mut guard = cell.lock();
        let Some(model) = guard.as_deref_mut() else {
            // An inline call panicked and left the model out: answer this batch from a new one.
            drop(guard);
            for job in batch {
                state.push(job);
            }
            return true;
        };
        let started = Instant::now();
        if run_batch(config, me, model, batch) {
            *guard = None;
            return true;
        }
        if single {
            cell.observe(started.elapsed(), model);
        }
    }
}

/// Runs one batch and answers its callers. Returns true when the model panicked.
pub(crate) fn run_batch(
    config: &ReplicaConfig,
    (host, id): (&dyn ReplicaHost, usize),
    model: &mut dyn Backend,
    mut batch: Vec<Job>,
) -> bool {
    let start = Instant::now();
    for job in &batch {
        config.metrics.queued(start.saturating_duration_since(job.admitted));
    }
    if batch.len() > 1 {
        config.crowding.batched(start);
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
                model.select_model(m)?;
            }
            infer_batch(config, model, &mut batch)
        }))
    });
    if selected.is_some() {
        host.set_models(id, model.loaded_models());
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
    config.metrics.batch(rows, batch.len(), took, stages);
    match outcome {
        Ok(Ok((per_job, _))) => {
            for (job, outputs) in batch.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(outputs));
            }
            false
        }
        Ok(Err(e)) => {
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
            false
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            tracing::error!(model = %config.name, "model panicked: {what}; replacing the replica");
            let e = InferError::internal(format!("model `{}` panicked: {what}", config.name));
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
            true
        }
    }
}

/// Runs a batch through the model: its outputs per job, and where the time went.
fn infer_batch(
    config: &ReplicaConfig,
    model: &mut dyn Backend,
    batch: &mut [Job],
) -> Result<(Vec<Vec<NamedTensor>>, StageTimes), InferError> {
    let start = Instant::now();
    if let [job] = batch {
        // One request: its tensors go to the model as they are.
        let inputs = std::mem::take(&mut job.inputs);
        let called = Instant::now();
        let outputs = model.infer(inputs, &job.outputs)?;
        let stages = stage_times(model, called - start, called.elapsed(), Duration::ZERO);
        return Ok((vec![outputs], stages));
    }
    let pad = &config.policy.pad;
    let merged = merge(batch, pad)?;
    let dims = padded_dims(batch, &merged, pad);
    let outputs = union_outputs(batch, &config.model_outputs);
    let called = Instant::now();
    let results = model.infer(merged, &outputs)?;
    let returned = Instant::now();
    let per_job = split(&results, batch, &dims)?;
    let stages = stage_times(model, called - start, returned - called, returned.elapsed());
    Ok((per_job, stages))
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
            let data = match spec.dtype {
                DataType::Bytes => vec![0u8; count * 4],
                other => vec![0u8; count * other.byte_size().unwrap_or(1)],
            };
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
