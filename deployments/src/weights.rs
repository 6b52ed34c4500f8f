//! One copy of a model's weights for all of its replicas.
//!
//! Each ONNX Runtime session otherwise deserialises its own copy of every initializer, so N
//! replicas of a 90 MB model hold N × 90 MB. [`SharedWeights::read`] reads the model file's
//! large initializers once into ONNX Runtime tensors that every replica's session is given
//! (`AddInitializer`: the session uses the caller's buffer instead of its own copy), and keeps the
//! prepacked-weights container in which sessions built with those initializers share their
//! kernel-specific repacked forms (MLAS's packed GEMM weights). Small initializers (shapes,
//! axes, scalars) stay in the model, where ONNX Runtime's graph optimisations fold them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use ort::session::builder::PrepackedWeights;
use ort::value::PrimitiveTensorElementType;
use ort::value::{DynValue, Tensor};
use prost::Message;

use crate::{DataType, LoadError};

/// Initializers smaller than this (bytes) are left in the model file.
pub const MIN_SHARED_BYTES: usize = 1024;

/// Model files read by [`SharedWeights::read`] in this process.
static READS: AtomicUsize = AtomicUsize::new(0);

/// How many times [`SharedWeights::read`] has read a model file in this process: once per
/// deployment version while its replicas share, whatever their number.
pub fn reads() -> usize {
    READS.load(Ordering::Relaxed)
}

/// The model file's initializers that replicas share, and their shared prepacked forms.
pub struct SharedWeights {
    initializers: Vec<(String, Arc<DynValue>)>,
    prepacked: PrepackedWeights,
    bytes: usize,
    /// The file when read (see [`FileStamp`]).
    stamp: Option<FileStamp>,
}

impl std::fmt::Debug for SharedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWeights")
            .field("initializers", &self.initializers.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl SharedWeights {
    /// Reads the initializers of at least `min_bytes` stored in the ONNX file at `path` (inline
    /// in the file; external-data initializers are left to ONNX Runtime). A file that is not a
    /// readable ONNX model fails here with the reason, as the session itself would.
    pub fn read(path: &Path, min_bytes: usize) -> Result<Self, LoadError> {
        let fail = |message: String| LoadError::Model { path: path.to_path_buf(), message };
        READS.fetch_add(1, Ordering::Relaxed);
        // Taken before the read: a file replaced meanwhile no longer matches it.
        let stamp = file_stamp(path);
        let file = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let model = ModelProto::decode(bytes::Bytes::from(file))
            .map_err(|e| fail(format!("not an ONNX model: {e}")))?;
        let mut initializers = Vec::new();
        let mut bytes = 0;
        for tensor in model.graph.map(|g| g.initializer).unwrap_or_default() {
            let Some(data) = tensor.data(min_bytes) else { continue };
            let Some(dtype) = onnx_dtype(tensor.data_type) else { continue };
            let expected = tensor.dims.iter().try_fold(dtype.byte_size().unwrap_or(0), |n, &d| {
                usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
            });
            if expected != Some(data.len()) {
                // ONNX Runtime reports a malformed initializer better than a guess here.
                continue;
            }
            let value = ort_tensor(dtype, &tensor.dims, &data)
                .map_err(|e| fail(format!("initializer `{}`: {e}", tensor.name)))?;
            bytes += data.len();
            initializers.push((tensor.name, Arc::new(value)));
        }
        Ok(Self { initializers, prepacked: PrepackedWeights::new(), bytes, stamp })
    }

    /// Whether the file at `path` is still the one these weights were read from (see
    /// [`FileStamp`]). A session loaded from a replaced file must not get the old weights.
    pub fn is_current(&self, path: &Path) -> bool {
        self.stamp.is_some() && file_stamp(path) == self.stamp
    }

    /// The shared initializers, by name.
    pub fn initializers(&self) -> impl Iterator<Item = (&str, &Arc<DynValue>)> {
        self.initializers.iter().map(|(name, value)| (name.as_str(), value))
    }

    /// The container in which sessions share the prepacked forms of these initializers.
    pub fn prepacked(&self) -> &PrepackedWeights {
        &self.prepacked
    }

    /// How many initializers are shared.
    pub fn count(&self) -> usize {
        self.initializers.len()
    }

    /// Their size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The files beside the ONNX model at `path` that its initializers' external data is read from
/// (ONNX's `external_data` `location`s, resolved against the model file's folder, each once, in
/// the order met): a model's weights can be rewritten there while the model file stays as it
/// is. Empty for a model that keeps its weights in the file, or a file that cannot be read as
/// one (its load reports that). Read again only when the model file changes (see
/// [`FileStamp`]); the answers are kept by path for the life of the process.
pub fn external_files(path: &Path) -> Vec<std::path::PathBuf> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    type Seen = BTreeMap<std::path::PathBuf, (Option<FileStamp>, Vec<std::path::PathBuf>)>;
    static SEEN: Mutex<Seen> = Mutex::new(BTreeMap::new());
    let stamp = file_stamp(path);
    if let Some((seen, files)) = SEEN.lock().unwrap_or_else(|e| e.into_inner()).get(path)
        && *seen == stamp
        && stamp.is_some()
    {
        return files.clone();
    }
    let files = std::fs::read(path)
        .ok()
        .and_then(|file| ModelProto::decode(bytes::Bytes::from(file)).ok())
        .map(|model| {
            let dir = path.parent().unwrap_or(Path::new(""));
            let graph = model.graph.unwrap_or_default();
            let sparse = graph.sparse_initializer.iter().flat_map(|s| s.values.iter().chain(&s.indices));
            let mut files: Vec<std::path::PathBuf> = Vec::new();
            for tensor in graph.initializer.iter().chain(sparse).filter(|t| t.data_location == 1) {
                for entry in tensor.external_data.iter().filter(|e| e.key == "location") {
                    let file = dir.join(&entry.value);
                    if !files.contains(&file) {
                        files.push(file);
                    }
                }
            }
            files
        })
        .unwrap_or_default();
    SEEN.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_path_buf(), (stamp, files.clone()));
    files
}

/// A file as it is: its inode and device, size, modification time and status-change time. A
/// file replaced by a rename (a new inode), or rewritten with its modification time kept
/// (`cp -p`, `rsync -a`: the status-change time moves), reads as another file.
type FileStamp = (u64, u64, u64, SystemTime, i64, i64);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.len(), meta.modified().ok()?, meta.ctime(), meta.ctime_nsec()))
}

/// An ONNX Runtime tensor over a buffer Sluice owns: `AddInitializer` takes only those (a tensor
/// ONNX Runtime allocated itself is refused).
fn ort_tensor(dtype: DataType, dims: &[i64], data: &[u8]) -> Result<DynValue, ort::Error> {
    let dims = dims.to_vec();
    Ok(match dtype {
        DataType::Fp32 => owned::<f32>(dims, data)?,
        DataType::Fp64 => owned::<f64>(dims, data)?,
        DataType::Fp16 => owned::<half::f16>(dims, data)?,
        DataType::Bf16 => owned::<half::bf16>(dims, data)?,
        DataType::Int8 => owned::<i8>(dims, data)?,
        DataType::Int16 => owned::<i16>(dims, data)?,
        DataType::Int32 => owned::<i32>(dims, data)?,
        DataType::Int64 => owned::<i64>(dims, data)?,
        DataType::Uint8 => owned::<u8>(dims, data)?,
        DataType::Uint16 => owned::<u16>(dims, data)?,
        DataType::Uint32 => owned::<u32>(dims, data)?,
        DataType::Uint64 => owned::<u64>(dims, data)?,
        // Not every byte is a valid `bool`; such initializers are not shared (`onnx_dtype`).
        DataType::Bool | DataType::Bytes => unreachable!("not a shared initializer type"),
    })
}

/// The little-endian `data` copied into a `Vec<T>` (aligned for `T`) that the tensor owns.
#[allow(unsafe_code)] // one copy of plain numbers; see the SAFETY comment
fn owned<T: PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
    dims: Vec<i64>,
    data: &[u8],
) -> Result<DynValue, ort::Error> {
    let n = data.len() / size_of::<T>();
    // Checked here too, not only by the caller: a length between two elements would be copied
    // past the room made for `n`.
    assert_eq!(n * size_of::<T>(), data.len(), "an initializer's bytes are whole elements");
    let mut values: Vec<T> = Vec::with_capacity(n);
    // SAFETY: `values` has room for `n` elements, `n * size_of::<T>() == data.len()` (asserted
    // above), every bit pattern is a valid `T` for these number types, and the regions cannot
    // overlap. x86-64 and aarch64 are little-endian, as ONNX's `raw_data` is.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), values.as_mut_ptr().cast::<u8>(), data.len());
        values.set_len(n);
    }
    Ok(Tensor::from_array((dims, values))?.into_dyn())
}

/// ONNX's `TensorProto.DataType` numbers for the types a replica can share.
fn onnx_dtype(code: i32) -> Option<DataType> {
    Some(match code {
        1 => DataType::Fp32,
        2 => DataType::Uint8,
        3 => DataType::Int8,
        4 => DataType::Uint16,
        5 => DataType::Int16,
        6 => DataType::Int32,
        7 => DataType::Int64,
        10 => DataType::Fp16,
        11 => DataType::Fp64,
        12 => DataType::Uint32,
        13 => DataType::Uint64,
        16 => DataType::Bf16,
        _ => return None,
    })
}

// The few fields of onnx.proto (https://github.com/onnx/onnx/blob/main/onnx/onnx.proto) that
// locate a model's initializers; prost skips the rest.

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "15")]
    sparse_initializer: Vec<SparseTensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "bytes", tag = "9")]
    raw_data: bytes::Bytes,
    /// Where external data lies: `location` (a path relative to the model file's folder),
    /// `offset`, `length`, `checksum`.
    #[prost(message, repeated, tag = "13")]
    external_data: Vec<StringStringEntryProto>,
    /// 1 = EXTERNAL: the data is in another file.
    #[prost(int32, tag = "14")]
    data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
struct SparseTensorProto {
    #[prost(message, optional, tag = "1")]
    values: Option<TensorProto>,
    #[prost(message, optional, tag = "2")]
    indices: Option<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

impl TensorProto {
    /// The tensor's little-endian bytes when stored in the file and at least `min_bytes` long.
    fn data(&self, min_bytes: usize) -> Option<std::borrow::Cow<'_, [u8]>> {
        if self.data_location == 1 {
            return None;
        }
        if self.raw_data.len() >= min_bytes {
            return Some(std::borrow::Cow::Borrowed(&self.raw_data));
        }
        if self.raw_data.is_empty() && self.data_type == 1 && self.float_data.len() * 4 >= min_bytes {
            return Some(self.float_data.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    /// A length between two elements is refused before the copy (it was copied past the room
    /// made for the whole elements; the caller's check alone kept it from happening).
    #[test]
    #[should_panic(expected = "whole elements")]
    fn bytes_that_are_not_whole_elements_are_refused() {
        let _ = super::owned::<f32>(vec![1], &[0u8; 5]);
    }
}
