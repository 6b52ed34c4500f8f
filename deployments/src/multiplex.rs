//! Model multiplexing (Ray Serve's `@serve.multiplexed`): one deployment serves many models of
//! the same interface — per-tenant fine-tunes, say — from a folder `<dir>/<model_id>/model.onnx`.
//! Each replica loads a model the first time a request names it and keeps at most
//! `max_models_per_replica`, evicting the least recently used. Requests for different models
//! never share a batch; the deployment prefers replicas that already hold a request's model
//! (see `Deployment::dispatch`). A model that cannot load fails its requests with a message
//! naming it, and the replica goes on serving the others. A model's folder is looked at again
//! at most every [`RECHECK`] while a replica holds it: changed files are loaded again, and a
//! model whose folder is gone is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Histogram};

use crate::metrics::{MULTIPLEX_EVICTIONS, MULTIPLEX_LOAD_DURATION, MULTIPLEX_LOADS, MULTIPLEX_REQUESTS};
use crate::onnx::{OnnxBackend, OnnxOptions};
use crate::{Backend, CopyTimes, ErrorKind, InferError, LoadError, ModelMetadata, NamedTensor};

/// Counts shared by every replica of a multiplexed deployment.
#[derive(Default)]
pub struct MultiplexStats {
    /// Batches whose model was loaded already, and those that had to load it.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Models loaded (misses that succeeded) and evicted.
    pub loads: AtomicU64,
    pub evictions: AtomicU64,
    /// Total time spent loading, microseconds.
    pub load_us: AtomicU64,
    /// The most models one replica holds.
    pub capacity: u64,
}

/// The models of one multiplexed deployment, as each of its replicas loads them.
pub(crate) struct Shared {
    dir: PathBuf,
    options: OnnxOptions,
    /// Models that failed to load, by id: their folder as it was then, why, and when. Not
    /// loaded again (a load stalls the replica's other models) until a file of the folder
    /// changes, or [`RETRY_FAILED`] has passed (a failure may have been the machine's: memory).
    failed: Mutex<HashMap<String, (FileStamp, String, Instant)>>,
    stats: Arc<MultiplexStats>,
    hit: Counter,
    miss: Counter,
    loads: Counter,
    evictions: Counter,
    load_time: Histogram,
    /// Its series leave `/metrics` once every copy of the deployment is gone.
    _series: crate::metrics::LabelOwner,
}

impl Shared {
    pub fn new(dir: PathBuf, capacity: u32, options: OnnxOptions, deployment: &str) -> Arc<Self> {
        let d = deployment.to_string();
        Arc::new(Self {
            dir,
            options,
            failed: Mutex::new(HashMap::new()),
            stats: Arc::new(MultiplexStats { capacity: capacity.max(1) as u64, ..MultiplexStats::default() }),
            hit: metrics::counter!(MULTIPLEX_REQUESTS, "deployment" => d.clone(), "cache" => "hit"),
            miss: metrics::counter!(MULTIPLEX_REQUESTS, "deployment" => d.clone(), "cache" => "miss"),
            loads: metrics::counter!(MULTIPLEX_LOADS, "deployment" => d.clone()),
            evictions: metrics::counter!(MULTIPLEX_EVICTIONS, "deployment" => d.clone()),
            load_time: metrics::histogram!(MULTIPLEX_LOAD_DURATION, "deployment" => d.clone()),
            _series: crate::metrics::LabelOwner::new("deployment", &d),
        })
    }

    /// The interface every model must have: that of the first model of the folder (by id)
    /// that loads. One that does not load is answered as any model that fails to load is, when
    /// asked for; it does not keep the others from serving.
    pub fn reference(&self) -> Result<ModelMetadata, LoadError> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|e| LoadError::Model { path: self.dir.clone(), message: e.to_string() })?
            .filter_map(Result::ok)
            .filter(|e| e.path().join("model.onnx").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        let mut first_error = None;
        for id in &ids {
            match OnnxBackend::load(&self.dir.join(id).join("model.onnx"), &self.options) {
                Ok(model) => return Ok(model.metadata().clone()),
                Err(e) => {
                    tracing::warn!("multiplexed model `{id}` in {} does not load: {e}", self.dir.display());
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.map_or_else(
            || LoadError::Model {
                path: self.dir.clone(),
                message: "the folder holds no `<model_id>/model.onnx`".into(),
            },
            LoadError::from,
        ))
    }
}

/// How often a replica looks at the folder of a model it holds (a hit does not stat files).
pub const RECHECK: Duration = Duration::from_secs(1);

/// How long a model that failed to load is answered with its failure without loading it again,
/// its files unchanged.
pub const RETRY_FAILED: Duration = Duration::from_secs(60);

/// A model's folder as it is now: each file's name, modified time and length, sorted (the
/// model file and what it reads beside it, such as external weights); None when the folder
/// cannot be read.
type FileStamp = Option<Vec<(std::ffi::OsString, SystemTime, u64)>>;

fn stamp(model_file: &Path) -> FileStamp {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(model_file.parent()?).ok()? {
        let entry = entry.ok()?;
        let meta = entry.metadata().ok()?;
        if meta.is_file() {
            files.push((entry.file_name(), meta.modified().ok()?, meta.len()));
        }
    }
    files.sort();
    Some(files)
}

/// One model a replica holds.
struct Held {
    id: Arc<str>,
    model: OnnxBackend,
    /// Its folder when it was loaded, and when that was last compared.
    stamp: FileStamp,
    checked: Instant,
}

/// A replica's backend: its loaded models, most recently used last.
pub(crate) struct Multiplexed {
    shared: Arc<Shared>,
    metadata: ModelMetadata,
    loaded: Vec<Held>,
}

impl Multiplexed {
    pub fn new(shared: Arc<Shared>, metadata: ModelMetadata) -> Self {
        Self { shared, metadata, loaded: Vec::new() }
    }

    /// The model file of `id`: 404 for an id with none (or one that would leave the folder),
    /// and the same error again, without loading, for a file that failed to load and has not
    /// changed since.
    fn file(&self, id: &str) -> Result<PathBuf, InferError> {
        let valid = !id.is_empty() && !id.contains(['/', '\\']) && id != "." && id != "..";
        let path = self.shared.dir.join(id).join("model.onnx");
        if !valid || !path.is_file() {
            // Named by the id alone: the server's folders are not the client's to see.
            return Err(InferError::not_found(format!(
                "unknown model `{id}` (no {id}/model.onnx in the deployment's folder)"
            )));
        }
        let failed = self.shared.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((was, why, at)) = failed.get(id)
            && at.elapsed() < RETRY_FAILED
            && *was == stamp(&path)
        {
            let after = RETRY_FAILED.as_secs();
            return Err(InferError::internal(format!(
                "{why} (not loaded again until its files change, or for {after} s)"
            )));
        }
        Ok(path)
    }

    fn load(&self, id: &str, path: &Path) -> Result<(OnnxBackend, FileStamp), InferError> {
        let was = stamp(path);
        // Named by the id: the server's folders are not the client's to see (the path is logged).
        let loaded = OnnxBackend::load(path, &self.shared.options)
            .map_err(|e| {
                tracing::warn!(model = %id, path = %path.display(), "multiplexed model failed to load: {e}");
                let e = e.to_string().replace(&path.display().to_string(), &format!("{id}/model.onnx"));
                format!("model `{id}` failed to load: {e}")
            })
            .and_then(|backend| {
                let (want, got) = (&self.metadata, backend.metadata());
                if want.inputs != got.inputs || want.outputs != got.outputs {
                    return Err(format!(
                        "model `{id}` has another interface than the deployment's (inputs {:?}, outputs {:?})",
                        got.inputs.iter().map(|t| &t.name).collect::<Vec<_>>(),
                        got.outputs.iter().map(|t| &t.name).collect::<Vec<_>>()
                    ));
                }
                Ok(backend)
            });
        let mut failed = self.shared.failed.lock().unwrap_or_else(PoisonError::into_inner);
        match loaded {
            Ok(backend) => {
                failed.remove(id);
                Ok((backend, was))
            }
            Err(why) => {
                failed.insert(id.to_string(), (was, why.clone(), Instant::now()));
                Err(InferError::internal(why))
            }
        }
    }
}

impl Backend for Multiplexed {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        match self.loaded.last_mut() {
            Some(held) => held.model.infer(inputs, outputs),
            None => Err(InferError::new(
                ErrorKind::InvalidArgument,
                "name a model of this multiplexed deployment",
            )),
        }
    }

    fn shared_dims_agree(&self, inputs: &[NamedTensor]) -> bool {
        self.loaded.last().is_none_or(|held| held.model.shared_dims_agree(inputs))
    }

    /// The copies of the model that ran last (the current one).
    fn last_copy_times(&self) -> CopyTimes {
        self.loaded.last().map_or_else(CopyTimes::default, |held| held.model.last_copy_times())
    }

    fn select_model(&mut self, id: &str) -> Result<(), InferError> {
        let s = self.shared.clone();
        if let Some(i) = self.loaded.iter().position(|held| &*held.id == id) {
            let mut held = self.loaded.remove(i);
            // Its files rewritten since it was loaded (a new fine-tune), or its folder gone
            // (the tenant left): loaded again, or refused, as a model not held would be.
            // Replicas that loaded it later served the new files meanwhile.
            let stale = held.checked.elapsed() >= RECHECK && {
                held.checked = Instant::now();
                held.stamp != stamp(&s.dir.join(id).join("model.onnx"))
            };
            if !stale {
                self.loaded.push(held);
                s.stats.hits.fetch_add(1, Ordering::Relaxed);
                s.hit.increment(1);
                return Ok(());
            }
            tracing::info!(model = %id, "the model's files changed: loading it again");
            drop(held);
        }
        // An id with no model, or one that fails to load, is neither a hit nor a miss: clients
        // sending unknown ids do not move the hit rate.
        let path = self.file(id)?;
        // Room first, so that a replica never holds more than its capacity, not even while
        // it loads.
        if self.loaded.len() as u64 >= s.stats.capacity {
            let gone = self.loaded.remove(0).id;
            tracing::debug!(model = %gone, "evicted");
            s.stats.evictions.fetch_add(1, Ordering::Relaxed);
            s.evictions.increment(1);
        }
        let started = Instant::now();
        let (model, stamp) = self.load(id, &path)?;
        let took = started.elapsed();
        s.stats.misses.fetch_add(1, Ordering::Relaxed);
        s.miss.increment(1);
        s.stats.loads.fetch_add(1, Ordering::Relaxed);
        s.stats.load_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        s.loads.increment(1);
        s.load_time.record(took.as_secs_f64());
        self.loaded.push(Held { id: Arc::from(id), model, stamp, checked: Instant::now() });
        Ok(())
    }

    fn loaded_models(&self) -> Vec<Arc<str>> {
        self.loaded.iter().map(|held| held.id.clone()).collect()
    }

    fn multiplex_stats(&self) -> Option<Arc<MultiplexStats>> {
        Some(self.shared.stats.clone())
    }
}
