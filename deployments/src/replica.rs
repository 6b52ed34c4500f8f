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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metrics::Gauge;

use crate::batch::{BatchState, Job, Taken};
use crate::concat::{merge, padded_dims, split, union_outputs};
use crate::deployment::Shared;
use crate::{Backend, DataType, ErrorKind, InferError, NamedTensor, Tensor};

/// Makes a fresh backend for a replica (at start, and to replace one that panicked).
pub type BackendFactory = Arc<dyn Fn() -> Result<Box<dyn Backend>, String> + Send + Sync>;

/// What a replica's queue carries.
pub(crate) enum Msg {
    Job(Job),
    /// Finish what is queued, then stop (the deployment is gone).
    Stop,
}

/// The deployment's side of a replica.
pub(crate) struct ReplicaSlot {
    pub id: usize,
    pub tx: SyncSender<Msg>,
    /// Requests assigned and not yet answered (queued here or running).
    pub ongoing: Arc<AtomicUsize>,
    pub ready: AtomicBool,
    /// Whether this replica's admission permits were handed out (when it first became ready)
    /// or forgone (when it was removed first): whoever flips it owns the permits.
    pub granted: AtomicBool,
    pub in_flight: Gauge,
}

/// Decrements a replica's ongoing count when its request is answered or abandoned.
pub(crate) struct OngoingGuard {
    ongoing: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl OngoingGuard {
    pub fn new(slot: &ReplicaSlot) -> Self {
        let n = slot.ongoing.fetch_add(1, Ordering::AcqRel) + 1;
        slot.in_flight.set(n as f64);
        Self { ongoing: slot.ongoing.clone(), gauge: slot.in_flight.clone() }
    }
}

impl Drop for OngoingGuard {
    fn drop(&mut self) {
        let n = self.ongoing.fetch_sub(1, Ordering::AcqRel) - 1;
        self.gauge.set(n as f64);
    }
}

/// The replica thread's body.
pub(crate) fn run(shared: Arc<Shared>, slot: Arc<ReplicaSlot>, rx: Receiver<Msg>, backend: Box<dyn Backend>) {
    let index = slot.id;
    let mut backend = Some(backend);
    let mut state = BatchState::new(shared.policy.clone());
    // Survives a panic, so a replica told to stop does not reload and linger.
    let mut stopping = false;
    loop {
        let mut model = match backend.take() {
            Some(b) => b,
            None => match reload(&shared, index, &rx, &mut state, &mut stopping) {
                Some(b) => b,
                None => return,
            },
        };
        warm_up(&shared, model.as_mut());
        set_ready(&shared, &slot, true);
        let panicked = serve(&shared, model.as_mut(), &rx, &mut state, &mut stopping);
        set_ready(&shared, &slot, false);
        if !panicked {
            return;
        }
        shared.metrics.restarts.increment(1);
        // Hand what waits here to replicas that can run it now.
        let mut waiting: Vec<Job> = state.drain();
        for msg in rx.try_iter() {
            match msg {
                Msg::Job(job) => waiting.push(job),
                Msg::Stop => stopping = true,
            }
        }
        let leaving = stopping || shared.closed.load(Ordering::Acquire);
        for job in waiting {
            if let Err(job) = shared.redispatch(job, index) {
                if leaving {
                    let _ = job.reply.send(Err(InferError::unavailable(format!(
                        "replica of `{}` stopped; retry",
                        shared.spec.name
                    ))));
                } else {
                    state.push(job);
                }
            }
        }
        drop(model);
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
    shared: &Shared,
    index: usize,
    rx: &Receiver<Msg>,
    state: &mut BatchState,
    stopping: &mut bool,
) -> Option<Box<dyn Backend>> {
    let mut wait = Duration::from_millis(100);
    loop {
        match (shared.factory)() {
            Ok(b) => {
                tracing::info!(model = %shared.spec.name, replica = index, "replica replaced");
                return Some(b);
            }
            Err(e) => {
                tracing::error!(model = %shared.spec.name, replica = index, "cannot reload the model: {e}");
                if shared.closed.load(Ordering::Acquire) || *stopping {
                    return None;
                }
                let until = Instant::now() + wait;
                while Instant::now() < until {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(Msg::Job(job)) => state.push(job),
                        Ok(Msg::Stop) => *stopping = true,
                        Err(_) => {}
                    }
                    answer_expired(shared, state.take_expired(Instant::now()));
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn answer_expired(shared: &Shared, expired: Vec<Job>) {
    for job in expired {
        let waited = job.admitted.elapsed();
        let _ = job.reply.send(Err(InferError::new(
            ErrorKind::DeadlineExceeded,
            format!(
                "request timed out after {} ms waiting for model `{}`",
                waited.as_millis(),
                shared.spec.name
            ),
        )));
    }
}

fn set_ready(shared: &Shared, slot: &ReplicaSlot, ready: bool) {
    slot.ready.store(ready, Ordering::Release);
    if ready && !slot.granted.swap(true, Ordering::AcqRel) {
        // First time ready: this replica's slots open to admission.
        shared.permits.add_permits(shared.spec.ongoing_limit());
    }
    shared.publish_ready();
}

/// Runs jobs until told to stop and drained (returns false) or the model panics (true).
fn serve(
    shared: &Shared,
    model: &mut dyn Backend,
    rx: &Receiver<Msg>,
    state: &mut BatchState,
    stopping: &mut bool,
) -> bool {
    let take = |msg: Msg, state: &mut BatchState, stopping: &mut bool| match msg {
        Msg::Job(job) => state.push(job),
        Msg::Stop => *stopping = true,
    };
    loop {
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
                match rx.recv() {
                    Ok(msg) => take(msg, state, stopping),
                    Err(_) => return false,
                }
            }
        }
        for msg in rx.try_iter() {
            take(msg, state, stopping);
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
        answer_expired(shared, expired);
        if batch.is_empty() {
            continue;
        }
        if run_batch(shared, model, batch) {
            return true;
        }
    }
}

/// Runs one batch and answers its callers. Returns true when the model panicked.
fn run_batch(shared: &Shared, model: &mut dyn Backend, mut batch: Vec<Job>) -> bool {
    let start = Instant::now();
    for job in &batch {
        shared.metrics.queued(start.saturating_duration_since(job.admitted));
    }
    let rows: usize = batch.iter().map(|j| j.rows).sum();
    let outcome = catch_unwind(AssertUnwindSafe(|| infer_batch(shared, model, &mut batch)));
    shared.metrics.batch(rows, start.elapsed());
    match outcome {
        Ok(Ok(per_job)) => {
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
            tracing::error!(model = %shared.spec.name, "model panicked: {what}; replacing the replica");
            let e = InferError::internal(format!("model `{}` panicked: {what}", shared.spec.name));
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
            true
        }
    }
}

fn infer_batch(
    shared: &Shared,
    model: &mut dyn Backend,
    batch: &mut [Job],
) -> Result<Vec<Vec<NamedTensor>>, InferError> {
    if let [job] = batch {
        // One request: its tensors go to the model as they are.
        let inputs = std::mem::take(&mut job.inputs);
        return Ok(vec![model.infer(inputs, &job.outputs)?]);
    }
    let pad = &shared.policy.pad;
    let merged = merge(batch, pad)?;
    let dims = padded_dims(batch, &merged, pad);
    let outputs = union_outputs(batch, &shared.model_outputs);
    let results = model.infer(merged, &outputs)?;
    split(&results, batch, &dims)
}

/// Runs one full-size batch of zeros so the first real request does not pay for lazy
/// initialisation. A failure is logged, not fatal: some models reject all-zero inputs.
fn warm_up(shared: &Shared, model: &mut dyn Backend) {
    if !shared.spec.warmup {
        return;
    }
    let rows = shared.policy.max_batch_size.max(1);
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
    let outputs = &shared.model_outputs;
    match catch_unwind(AssertUnwindSafe(|| inputs.and_then(|inputs| model.infer(inputs, outputs)))) {
        Ok(Ok(_)) => tracing::debug!(model = %shared.spec.name, rows, "warmed up in {:?}", started.elapsed()),
        Ok(Err(e)) => tracing::warn!(model = %shared.spec.name, "warm-up batch failed (serving anyway): {e}"),
        Err(_) => tracing::warn!(model = %shared.spec.name, "warm-up batch panicked (serving anyway)"),
    }
}
