//! The ONNX Runtime backend (`ort` with `load-dynamic`). ONNX Runtime is loaded once per process
//! from a path the caller resolves ([`init_runtime`]); each replica then owns one [`OnnxBackend`]
//! with its own session, since `Session::run` takes `&mut self`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynTensor, DynValue, Shape, TensorElementType, ValueType};

use crate::onnx_call::Caller;
use crate::weights::SharedWeights;
use crate::{
    Backend, CopyTimes, DataType, InferError, LoadError, ModelMetadata, NamedTensor, Tensor, TensorSpec,
};

static ENVIRONMENT: OnceLock<Result<Environment, LoadError>> = OnceLock::new();

/// What runs after a session is built or dropped; see [`on_memory_released`].
static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Sets what runs after a model is loaded (or fails to) and after a session is dropped: both
/// free large buffers (the parsed file, initializers copied out of it, a whole session). An allocator that returns freed memory to the system only when allocation activity
/// runs its purge (mimalloc) keeps them resident in an idle server; the binary that owns the
/// allocator passes its purge here. The first call wins.
pub fn on_memory_released(purge: fn()) {
    let _ = RELEASE.set(purge);
}

/// What runs after a session build: what [`AroundBuild`] returned before it.
pub type AfterBuild = Box<dyn FnOnce() + Send>;

/// What runs before each session build; see [`around_session_builds`].
pub type AroundBuild = fn() -> AfterBuild;

static AROUND_BUILD: OnceLock<AroundBuild> = OnceLock::new();

/// Sets what runs around building each session: `before` is called first, and the closure it
/// returns once the session is built or has failed to be. The server passes the release of the
/// code that only building touched (`release_startup_memory`). The first call wins.
pub fn around_session_builds(before: AroundBuild) {
    let _ = AROUND_BUILD.set(before);
}

fn memory_released() {
    if let Some(purge) = RELEASE.get() {
        purge();
    }
}

/// Calls [`memory_released`] when dropped: the last field of [`OnnxBackend`], so it runs after
/// the session is gone.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        memory_released();
    }
}

/// Loads the ONNX Runtime shared library at `library` and creates the process's one
/// environment. Later calls return the first call's outcome, whatever path they pass.
pub fn init_runtime(library: &Path) -> Result<(), LoadError> {
    let result = ENVIRONMENT.get_or_init(|| {
        let builder = ort::init_from(library).map_err(|e| LoadError::Runtime(e.to_string()))?;
        // No usage data sent to Microsoft from a server (the library still writes its device id
        // under ~/.cache unless ORT_DISABLE_TELEMETRY=1 is in the environment; see docs).
        builder
            .with_name("sluice")
            .with_telemetry(false)
            .build()
            .map_err(|e| LoadError::Runtime(e.to_string()))
    });
    result.as_ref().map(|_| ()).map_err(Clone::clone)
}

/// The process's ONNX Runtime environment, once [`init_runtime`] succeeded.
pub fn environment() -> Result<&'static Environment, LoadError> {
    match ENVIRONMENT.get() {
        Some(Ok(env)) => Ok(env),
        Some(Err(e)) => Err(e.clone()),
        None => Err(LoadError::Runtime("not initialised (call init_runtime first)".into())),
    }
}

/// Session options for one replica.
#[derive(Debug, Clone)]
pub struct OnnxOptions {
    /// Threads ONNX Runtime uses inside one operator; 1 runs on the replica's own thread.
    pub intra_op_threads: usize,
    /// ONNX Runtime's own arena for tensor buffers instead of the process's allocator.
    pub cpu_memory_arena: bool,
    /// ONNX Runtime's memory pattern: one planned block per call for the intermediate tensors.
    pub memory_pattern: bool,
}

impl OnnxOptions {
    /// The ONNX Runtime part of a deployment's replica settings.
    pub fn from_settings(settings: &sluice_config::ReplicaSettings) -> Self {
        Self {
            intra_op_threads: settings.intra_op_threads as usize,
            cpu_memory_arena: settings.cpu_memory_arena,
            memory_pattern: settings.memory_pattern,
        }
    }
}

impl Default for OnnxOptions {
    fn default() -> Self {
        Self { intra_op_threads: 1, cpu_memory_arena: false, memory_pattern: false }
    }
}

/// One ONNX Runtime session and the metadata read from it.
pub struct OnnxBackend {
    session: Session,
    /// What every call of `session` shares (its names as C strings, a CPU memory description).
    caller: Caller,
    metadata: ModelMetadata,
    path: PathBuf,
    copy_times: CopyTimes,
    /// The model's named dynamic dimensions that more than one input has ([`SharedDim`]).
    shared_dims: Vec<SharedDim>,
    /// The initializers the session was given, shared with the model's other replicas.
    _weights: Option<Arc<SharedWeights>>,
    /// Last: purges after the session's memory is freed.
    _purge: PurgeOnDrop,
}

impl OnnxBackend {
    /// Loads `path` into a new session. Fails with a message naming the file when the model
    /// cannot be loaded or uses a type the Open Inference Protocol cannot carry.
    pub fn load(path: &Path, options: &OnnxOptions) -> Result<Self, LoadError> {
        Self::build(path, options, None)
    }

    /// Like [`OnnxBackend::load`], with the model's large initializers and their prepacked
    /// forms taken from `weights` (read from the same file) instead of copied into this session.
    pub fn load_shared(
        path: &Path,
        options: &OnnxOptions,
        weights: Arc<SharedWeights>,
    ) -> Result<Self, LoadError> {
        Self::build(path, options, Some(weights))
    }

    fn build(
        path: &Path,
        options: &OnnxOptions,
        weights: Option<Arc<SharedWeights>>,
    ) -> Result<Self, LoadError> {
        let env = environment()?;
        let fail =
            |e: &dyn std::fmt::Display| LoadError::Model { path: path.to_path_buf(), message: e.to_string() };
        let built = AROUND_BUILD.get().map(|before| before());
        let session = Session::builder(env)
            .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::All)?))
            .and_then(|b| Ok(b.with_intra_threads(options.intra_op_threads)?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|b| Ok(b.with_memory_pattern(options.memory_pattern)?))
            .and_then(|b| {
                let cpu = ort::ep::CPU::default().with_arena_allocator(options.cpu_memory_arena);
                Ok(b.with_execution_providers([cpu.build()])?)
            })
            .and_then(|mut b| {
                if let Some(weights) = &weights {
                    b = b.with_prepacked_weights(weights.prepacked())?;
                    for (name, value) in weights.initializers() {
                        b = b.with_initializer(name, Arc::clone(value))?;
                    }
                }
                Ok(b)
            })
            .and_then(|mut b| b.commit_from_file(path));
        if let Some(after) = built {
            after();
        }
        // Building a session, or failing to, frees the parsed model file.
        memory_released();
        let session = session.map_err(|e| fail(&e))?;
        let spec = |o: &ort::value::Outlet| -> Result<TensorSpec, LoadError> {
            match o.dtype() {
                ValueType::Tensor { ty, shape, .. } => Ok(TensorSpec {
                    name: o.name().to_string(),
                    dtype: from_ort(*ty).ok_or_else(|| {
                        fail(&format!("`{}` has element type {ty}, which Sluice cannot serve", o.name()))
                    })?,
                    shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
                }),
                other => Err(fail(&format!("`{}` is a {other}, not a tensor", o.name()))),
            }
        };
        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".to_string(),
            inputs: session.inputs().iter().map(spec).collect::<Result<_, _>>()?,
            outputs: session.outputs().iter().map(spec).collect::<Result<_, _>>()?,
        };
        let caller = Caller::new(&session).map_err(|e| fail(&e))?;
        let shared_dims = SharedDim::of(session.inputs());
        Ok(Self {
            session,
            caller,
            metadata,
            path: path.to_path_buf(),
            copy_times: CopyTimes::default(),
            shared_dims,
            _weights: weights,
            _purge: PurgeOnDrop,
        })
    }

    /// The model file this backend was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A named dynamic dimension (ONNX's `dim_param`) that more than one input has: the model takes
/// it to be the same size in each (a sequence length shared by token ids and their mask).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SharedDim {
    symbol: String,
    /// (input, axis) of each place it appears.
    at: Vec<(String, usize)>,
}

impl SharedDim {
    fn of(inputs: &[ort::value::Outlet]) -> Vec<Self> {
        let mut dims: Vec<Self> = Vec::new();
        for input in inputs {
            let ValueType::Tensor { shape, dimension_symbols, .. } = input.dtype() else { continue };
            for (axis, symbol) in dimension_symbols.iter().enumerate() {
                // A fixed size has no name, and ONNX Runtime names none it made up.
                if symbol.is_empty() || shape.get(axis).is_none_or(|&d| d >= 0) {
                    continue;
                }
                let place = (input.name().to_string(), axis);
                match dims.iter_mut().find(|d| d.symbol == *symbol) {
                    Some(d) => d.at.push(place),
                    None => dims.push(Self { symbol: symbol.clone(), at: vec![place] }),
                }
            }
        }
        dims.retain(|d| d.at.len() > 1);
        dims
    }

    /// The first two places of this dimension where `inputs` have different sizes, with them.
    #[allow(clippy::type_complexity)]
    fn disagreeing<'a>(
        &'a self,
        inputs: &[NamedTensor],
    ) -> Option<((&'a (String, usize), usize), (&'a (String, usize), usize))> {
        let size = |(name, axis): &(String, usize)| {
            inputs.iter().find(|i| i.name == *name).and_then(|i| i.tensor.shape().get(*axis).copied())
        };
        let mut sizes = self.at.iter().filter_map(|place| Some((place, size(place)?)));
        let first = sizes.next()?;
        sizes.find(|&(_, got)| got != first.1).map(|other| (first, other))
    }
}

/// A model call that failed as the server's fault (ONNX Runtime does not check named dimensions
/// before it runs, and a kernel that meets two sizes fails with an internal error), on inputs
/// that disagree on a dimension the model shares between them: the request's fault (400),
/// naming the inputs and sizes. Inputs that agree, or an error that is already the request's,
/// leave `error` as it is, and so does a failure whose message is not about shapes. Only looked
/// at on a failure: a model whose exporter named two unrelated dimensions alike still runs what
/// ONNX Runtime runs.
fn disagreeing_inputs(shared: &[SharedDim], inputs: &[NamedTensor], error: InferError) -> InferError {
    // Only a failure that is about shapes (a memory or device failure on such inputs stays the
    // server's, and counts against a canary).
    let message = error.message.to_ascii_lowercase();
    let about_shapes = ["broadcast", "dimension", "shape", "mismatch"].iter().any(|w| message.contains(w));
    if error.kind != crate::ErrorKind::Internal || !about_shapes {
        return error;
    }
    for dim in shared {
        if let Some(((first, want), (other, got))) = dim.disagreeing(inputs) {
            return InferError::invalid(format!(
                "inputs `{}` (dimension {}: {want}) and `{}` (dimension {}: {got}) must agree: the model \
                 names both `{}` ({})",
                first.0, first.1, other.0, other.1, dim.symbol, error.message
            ));
        }
    }
    error
}

impl Backend for OnnxBackend {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn inline_safe(&self) -> bool {
        true
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        let (outputs, times) = self
            .caller
            .run(&mut self.session, &inputs, outputs)
            .map_err(|e| disagreeing_inputs(&self.shared_dims, &inputs, e))?;
        self.copy_times = times;
        Ok(outputs)
    }

    fn last_copy_times(&self) -> CopyTimes {
        self.copy_times
    }

    fn shared_dims_agree(&self, inputs: &[NamedTensor]) -> bool {
        self.shared_dims.iter().all(|dim| dim.disagreeing(inputs).is_none())
    }
}

/// An ONNX Runtime tensor holding a copy of `tensor`: for fixed-size inputs
/// [`crate::onnx_call`] cannot hand over in place (unaligned bytes).
#[allow(unsafe_code)] // one copy into ONNX Runtime's buffer; see the SAFETY comment
pub(crate) fn to_ort(tensor: &Tensor) -> Result<DynValue, String> {
    // BYTES go through `onnx_call::strings`, straight into ONNX Runtime's strings.
    if tensor.dtype() == DataType::Bytes {
        return Err("BYTES tensors are made by the call itself".into());
    }
    let shape = Shape::new(tensor.shape().iter().map(|&d| d as i64));
    let ty = to_ort_type(tensor.dtype());
    let mut t = DynTensor::new(&Allocator::default(), ty, shape).map_err(|e| e.to_string())?;
    let data = tensor.data();
    if !data.is_empty() {
        // SAFETY: ONNX Runtime allocated a CPU buffer of exactly `data.len()` bytes for this
        // dtype and shape (checked when the `Tensor` was built); regions cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), t.data_ptr_mut().cast::<u8>(), data.len());
        }
    }
    Ok(t.into_dyn())
}

pub(crate) fn from_ort(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

pub(crate) fn to_ort_type(dtype: DataType) -> TensorElementType {
    match dtype {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Bf16 => TensorElementType::Bfloat16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => TensorElementType::String,
    }
}

#[cfg(test)]
mod tests {
    use super::{SharedDim, disagreeing_inputs};
    use crate::{DataType, InferError, NamedTensor, Tensor};

    /// Inputs disagreeing on a shared dimension turn a failure about shapes into the client's
    /// error; any other failure on them (memory, a device) stays the server's, counted against
    /// a canary, and so does one on inputs that agree.
    #[test]
    fn only_a_shape_failure_on_disagreeing_inputs_is_the_clients() {
        let shared = vec![SharedDim { symbol: "L".into(), at: vec![("a".into(), 1), ("b".into(), 1)] }];
        let input = |name: &str, len: usize| NamedTensor {
            name: name.into(),
            tensor: Tensor::new(DataType::Int64, vec![1, len], vec![0u8; 8 * len].into()).unwrap(),
        };
        let differ = [input("a", 3), input("b", 4)];
        let broadcast =
            || InferError::internal("Attempting to broadcast an axis by a dimension other than 1. 3 by 4");
        let e = disagreeing_inputs(&shared, &differ, broadcast());
        assert_eq!(e.kind, crate::ErrorKind::InvalidArgument, "{e:?}");
        assert!(e.message.contains("must agree: the model names both `L`"), "{e:?}");
        let memory = InferError::internal("Failed to allocate memory for requested buffer of size 1024");
        assert_eq!(disagreeing_inputs(&shared, &differ, memory).kind, crate::ErrorKind::Internal);
        let agree = [input("a", 3), input("b", 3)];
        assert_eq!(disagreeing_inputs(&shared, &agree, broadcast()).kind, crate::ErrorKind::Internal);
    }
}
