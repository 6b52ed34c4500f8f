//! A replica: one backend on its own OS thread, fed through a bounded channel. Each job carries
//! its own oneshot reply; a job whose caller has gone away is skipped before it costs a model
//! call. A panic inside the backend fails that job only.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use tokio::sync::oneshot;

use crate::{Backend, InferError, NamedTensor};

pub(crate) type Reply = oneshot::Sender<Result<Vec<NamedTensor>, InferError>>;

pub(crate) struct Job {
    pub inputs: Vec<NamedTensor>,
    pub outputs: Vec<String>,
    pub reply: Reply,
}

/// The handle the deployment keeps for one replica.
pub(crate) struct Replica {
    tx: SyncSender<Job>,
    /// Requests sent to this replica and not yet answered (queued + running).
    load: Arc<AtomicUsize>,
}

/// Decrements a replica's load when the request is answered or abandoned.
pub(crate) struct LoadGuard(Arc<AtomicUsize>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replica {
    /// Starts the replica's thread. `capacity` bounds the jobs waiting for it.
    pub fn spawn(name: String, mut backend: Box<dyn Backend>, capacity: usize) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Job>(capacity);
        std::thread::Builder::new().name(name.clone()).spawn(move || {
            while let Ok(job) = rx.recv() {
                if job.reply.is_closed() {
                    continue;
                }
                let result = catch_unwind(AssertUnwindSafe(|| backend.infer(job.inputs, &job.outputs)))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown panic");
                        tracing::error!(replica = %name, "backend panicked: {what}");
                        Err(InferError::internal(format!("model `{name}` panicked: {what}")))
                    });
                // The caller may have left meanwhile; nothing to do then.
                let _ = job.reply.send(result);
            }
        })?;
        Ok(Self { tx, load: Arc::new(AtomicUsize::new(0)) })
    }

    pub fn load(&self) -> usize {
        self.load.load(Ordering::Acquire)
    }

    /// Queues a job, or gives it back when the replica's queue is full or the replica is gone.
    pub fn try_submit(&self, job: Job) -> Result<LoadGuard, Job> {
        self.load.fetch_add(1, Ordering::AcqRel);
        let guard = LoadGuard(self.load.clone());
        match self.tx.try_send(job) {
            Ok(()) => Ok(guard),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => Err(job),
        }
    }
}
