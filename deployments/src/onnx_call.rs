//! One model call through ONNX Runtime's C API, for [`crate::onnx::OnnxBackend`].
//!
//! The `ort` crate's `Session::run` builds on every call what does not change between calls: C
//! strings of the session's input and output names, an allocator handle and a memory description
//! per input tensor (each an allocation), and it reads every output's type and shape through
//! several queries that allocate. Here the names and the CPU memory description are made once per
//! session; an input whose bytes are aligned for its element type is handed to ONNX Runtime where
//! it lies (no tensor buffer allocated, no copy); only the requested outputs are fetched (ONNX
//! Runtime still runs the whole graph), and each output's type and shape are read where ONNX
//! Runtime keeps them. On the tiny MLP the instructions a one-row call spends around ONNX
//! Runtime's `Run` went from ~7,300 to ~3,900 (docs/benchmarks.md).
#![allow(unsafe_code)] // calls into ONNX Runtime's C API; each block says what it relies on

use std::ffi::{CStr, CString, c_char};
use std::ptr::{self, NonNull};
use std::time::Instant;

use ort::AsPointer;
use ort::session::Session;
use ort::sys::{OrtAllocatorType, OrtMemType, OrtMemoryInfo, OrtStatusPtr, OrtValue};
use ort::value::DynValue;

use crate::backend::CopyTimes;
use crate::error::InferError;
use crate::tensor::{DataType, NamedTensor, Tensor, element_count, push_bytes_element};

/// What a session's calls share: its input and output names as C strings, and the description
/// of CPU memory that inputs handed over in place are given.
pub(crate) struct Caller {
    cpu: NonNull<OrtMemoryInfo>,
    inputs: Vec<CString>,
    outputs: Vec<CString>,
}

// SAFETY: the memory description is created here, never changed, and released once in `drop`;
// ONNX Runtime only reads it. The names are owned C strings.
unsafe impl Send for Caller {}

impl Drop for Caller {
    fn drop(&mut self) {
        // SAFETY: created by `CreateCpuMemoryInfo` in `new` and released only here.
        unsafe { (ort::api().ReleaseMemoryInfo)(self.cpu.as_ptr()) }
    }
}

impl Caller {
    pub(crate) fn new(session: &Session) -> Result<Self, String> {
        let inputs = session.inputs().iter().map(|i| c_name(i.name())).collect::<Result<_, _>>()?;
        let outputs = session.outputs().iter().map(|o| c_name(o.name())).collect::<Result<_, _>>()?;
        let mut cpu = ptr::null_mut();
        // SAFETY: `cpu` is a valid out-pointer; the status is checked.
        status(unsafe {
            (ort::api().CreateCpuMemoryInfo)(
                OrtAllocatorType::OrtDeviceAllocator,
                OrtMemType::OrtMemTypeDefault,
                &mut cpu,
            )
        })?;
        let cpu = NonNull::new(cpu).ok_or("ONNX Runtime returned no memory description")?;
        Ok(Self { cpu, inputs, outputs })
    }

    /// Runs `session` on `inputs` and returns the outputs named in `outputs`, in that order, and
    /// the time taken to hand the inputs over and to copy the outputs out. When `outputs` is
    /// empty the model still runs (for its errors) with all its outputs.
    pub(crate) fn run(
        &self,
        session: &mut Session,
        inputs: &[NamedTensor],
        outputs: &[String],
    ) -> Result<(Vec<NamedTensor>, CopyTimes), InferError> {
        let api = ort::api();
        let started = Instant::now();
        // Names the session does not have (the request layer checks them first) go to ONNX
        // Runtime as given, for its own error.
        let mut unknown: Vec<CString> = Vec::new();
        let mut name_ptr = |known: &[CString], name: &str| -> Result<*const c_char, String> {
            if let Some(c) = known.iter().find(|c| c.as_bytes() == name.as_bytes()) {
                return Ok(c.as_ptr());
            }
            unknown.push(c_name(name)?);
            // A CString's bytes stay where they are when `unknown` grows.
            Ok(unknown.last().map_or(ptr::null(), |c| c.as_ptr()))
        };

        let mut in_names = Few::new();
        let mut in_values = Few::new();
        let mut made = Released(Few::new());
        let mut copied: Vec<DynValue> = Vec::new();
        for input in inputs {
            let invalid = |e: String| InferError::invalid(format!("input `{}`: {e}", input.name));
            in_names.push(name_ptr(&self.inputs, &input.name).map_err(invalid)?);
            match self.in_place(&input.tensor).map_err(invalid)? {
                Some(value) => {
                    made.0.push(value.as_ptr());
                    in_values.push(value.as_ptr().cast_const());
                }
                None if input.tensor.dtype() == DataType::Bytes => {
                    let value = strings(&input.tensor).map_err(invalid)?;
                    made.0.push(value.as_ptr());
                    in_values.push(value.as_ptr().cast_const());
                }
                None => {
                    let value = crate::onnx::to_ort(&input.tensor).map_err(invalid)?;
                    in_values.push(value.ptr());
                    copied.push(value);
                }
            }
        }

        let copied_in = Instant::now();
        let out_names = if outputs.is_empty() {
            self.outputs.iter().map(|c| c.as_ptr()).collect()
        } else {
            outputs
                .iter()
                .map(|name| name_ptr(&self.outputs, name))
                .collect::<Result<Few<_>, _>>()
                .map_err(|e| InferError::internal(format!("output: {e}")))?
        };
        let mut results = Released(smallvec::smallvec![ptr::null_mut(); out_names.len()]);
        // SAFETY: the session pointer is live and used by this thread alone (`&mut Session`);
        // every name is a NUL-terminated string and every input value a live OrtValue, both alive
        // until the call returns; `results` has room for one value per output name.
        run_status(unsafe {
            (api.Run)(
                session.ptr_mut(),
                ptr::null(),
                in_names.as_ptr(),
                in_values.as_ptr(),
                in_values.len(),
                out_names.as_ptr(),
                out_names.len(),
                results.0.as_mut_ptr(),
            )
        })?;
        let ran = Instant::now();
        drop((made, copied));
        let read = outputs
            .iter()
            .zip(&results.0)
            .map(|(name, &value)| {
                let value = NonNull::new(value)
                    .ok_or_else(|| InferError::internal(format!("model produced no output `{name}`")))?;
                Ok(NamedTensor { name: name.clone(), tensor: read_output(value)? })
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        Ok((read, CopyTimes { input: copied_in - started, output: ran.elapsed() }))
    }

    /// An ONNX Runtime tensor over `tensor`'s own bytes, where they can be used in place: a
    /// fixed-size element type, at least one element, aligned for the type. `None` otherwise.
    fn in_place(&self, tensor: &Tensor) -> Result<Option<NonNull<OrtValue>>, String> {
        let data = tensor.data();
        let Some(size) = tensor.dtype().byte_size() else { return Ok(None) };
        if data.is_empty() || data.as_ptr().align_offset(size) != 0 {
            return Ok(None);
        }
        let ty = crate::onnx::to_ort_type(tensor.dtype());
        let mut value = ptr::null_mut();
        with_dims(tensor.shape(), |dims| {
            // SAFETY: `data` holds exactly the shape's elements of this type (checked when the
            // `Tensor` was built) and outlives the value: the caller releases it right after the
            // run, while the tensor is still borrowed. ONNX Runtime reads inputs and never writes
            // them, so the pointer's mutability is only the C signature's. An output can share
            // an input's buffer (a graph whose output is its input): outputs are copied out
            // (`read_output`) while the request's tensors are still borrowed, so they must never
            // be handed out in place past the call.
            status(unsafe {
                (ort::api().CreateTensorWithDataAsOrtValue)(
                    self.cpu.as_ptr(),
                    data.as_ptr().cast_mut().cast(),
                    data.len(),
                    dims.as_ptr(),
                    dims.len(),
                    ty.into(),
                    &mut value,
                )
            })
        })?;
        NonNull::new(value).map(Some).ok_or_else(|| "ONNX Runtime returned no tensor".to_string())
    }
}

/// An ONNX Runtime string tensor of `tensor`'s BYTES elements, each copied once, straight into
/// the string ONNX Runtime keeps for it. ONNX strings are bytes: an element may hold NUL or bytes
/// that are not UTF-8 (what the model's operators make of them is theirs to say, as in Triton).
/// Through `ort`'s own constructor each element also became a Rust `String` and a C string
/// first (about 90 bytes an element where the protocol sends 4: a body of empty elements grew
/// some twentyfold); here it is ONNX Runtime's string (32 bytes, the text inside it up to 15).
fn strings(tensor: &Tensor) -> Result<NonNull<OrtValue>, String> {
    // ONNX Runtime multiplies the dimensions unchecked: `[2^32, 2^32, 0]` holds nothing but
    // overflows on the way.
    let dims = tensor.shape().iter().filter(|&&d| d > 0);
    if dims.map(|&d| i64::try_from(d).ok()).try_fold(1i64, |p, d| p.checked_mul(d?)).is_none() {
        return Err(format!("shape {:?} is too large", tensor.shape()));
    }
    let api = ort::api();
    let mut allocator = ptr::null_mut();
    // SAFETY: a valid out-pointer; the default allocator is ONNX Runtime's and never released.
    status(unsafe { (api.GetAllocatorWithDefaultOptions)(&mut allocator) })?;
    let mut value = ptr::null_mut();
    with_dims(tensor.shape(), |dims| {
        // SAFETY: the allocator is live, `dims` holds `dims.len()` dimensions, `value` is a
        // valid out-pointer; the status is checked.
        status(unsafe {
            (api.CreateTensorAsOrtValue)(
                allocator,
                dims.as_ptr(),
                dims.len(),
                ort::value::TensorElementType::String.into(),
                &mut value,
            )
        })
    })?;
    let mut value = Released(smallvec::smallvec![value]);
    let at = NonNull::new(value.0[0]).ok_or("ONNX Runtime returned no tensor")?;
    for (i, element) in tensor.bytes_elements().enumerate() {
        let mut buffer: *mut c_char = ptr::null_mut();
        // SAFETY: `at` is a live string tensor of the shape's elements, and `i` one of them (the
        // `Tensor` holds exactly that many, checked when it was built); ONNX Runtime resizes
        // that element's string to `element.len()` bytes and gives its buffer, which is written
        // only within that length.
        status(unsafe {
            (api.GetResizedStringTensorElementBuffer)(at.as_ptr(), i, element.len(), &mut buffer)
        })?;
        if !element.is_empty() {
            if buffer.is_null() {
                return Err("ONNX Runtime gave no buffer for a string".into());
            }
            // SAFETY: `buffer` holds `element.len()` bytes (resized just above) that nothing else
            // refers to; `element` is the request's, a different allocation.
            unsafe { ptr::copy_nonoverlapping(element.as_ptr(), buffer.cast::<u8>(), element.len()) };
        }
    }
    value.0.clear(); // handed to the caller, which releases it after the run
    Ok(at)
}

/// Reads an output tensor into a [`Tensor`] (one copy of its bytes).
fn read_output(value: NonNull<OrtValue>) -> Result<Tensor, InferError> {
    let api = ort::api();
    let fail = |e: String| InferError::internal(format!("cannot read model output: {e}"));
    // Written as a plain C int: a newer ONNX Runtime (`ORT_DYLIB_PATH`) may write a code that
    // ort's enum lacks, which must not be read as that enum.
    let mut code: i32 = 0;
    let mut dims: *const i64 = ptr::null();
    let mut rank = 0;
    // SAFETY: `value` is a live output of the run; the out-pointers are valid (the element type
    // is a C enum, an int). The dimensions are ONNX Runtime's own, read before `value` is released.
    status(unsafe {
        (api.GetTensorElementTypeAndShapeDataReference)(
            value.as_ptr(),
            (&raw mut code).cast(),
            &mut dims,
            &mut rank,
        )
    })
    .map_err(|e| InferError::internal(format!("model output is not a tensor: {e}")))?;
    let dims =
        if rank == 0 || dims.is_null() { &[][..] } else { unsafe { std::slice::from_raw_parts(dims, rank) } };
    let dtype = served_type(code)
        .ok_or_else(|| InferError::internal(format!("unsupported output element type (ONNX code {code})")))?;
    let shape: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
    // The model's answer, not the request: a shape refused here is the server's failure.
    let count =
        element_count(&shape).map_err(|e| InferError::internal(format!("model output: {}", e.message)))?;
    let data = if dtype == DataType::Bytes {
        read_strings(value, count).map_err(fail)?
    } else {
        let len = count * dtype.byte_size().unwrap_or(1);
        if len == 0 {
            Vec::new()
        } else {
            let mut at = ptr::null_mut();
            // SAFETY: a CPU tensor of this type and shape holds `len` contiguous bytes at `at`,
            // alive while `value` is (released by the caller after this copy).
            status(unsafe { (api.GetTensorMutableData)(value.as_ptr(), &mut at) }).map_err(fail)?;
            if at.is_null() {
                return Err(fail("no data".into()));
            }
            unsafe { std::slice::from_raw_parts(at.cast::<u8>(), len) }.to_vec()
        }
    };
    Tensor::new(dtype, shape, data.into())
}

/// The datatype of ONNX element type `code`, for the element types Sluice serves (the same
/// mapping as the inputs', [`crate::onnx::to_ort_type`]).
fn served_type(code: i32) -> Option<DataType> {
    DataType::ALL
        .into_iter()
        .find(|&d| ort::sys::ONNXTensorElementDataType::from(crate::onnx::to_ort_type(d)) as i32 == code)
}

/// A string tensor's `count` elements in the protocol's BYTES layout.
fn read_strings(value: NonNull<OrtValue>, count: usize) -> Result<Vec<u8>, String> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let api = ort::api();
    let mut len = 0;
    // SAFETY: `value` is a live string tensor of `count` elements; `content` has room for
    // `len` bytes and `offsets` for `count` offsets, as the call requires.
    status(unsafe { (api.GetStringTensorDataLength)(value.as_ptr(), &mut len) })?;
    let mut content = vec![0u8; len];
    let mut offsets = vec![0usize; count];
    status(unsafe {
        (api.GetStringTensorContent)(
            value.as_ptr(),
            content.as_mut_ptr().cast(),
            len,
            offsets.as_mut_ptr(),
            count,
        )
    })?;
    let mut out = Vec::with_capacity(len + 4 * count);
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(len);
        let element = content.get(start..end).ok_or("string offsets out of range")?;
        push_bytes_element(&mut out, element).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Calls `f` with `shape` as ONNX Runtime's dimensions, on the stack for up to 16 of them.
fn with_dims<R>(shape: &[usize], f: impl FnOnce(&[i64]) -> R) -> R {
    let dim = |d: usize| i64::try_from(d).unwrap_or(i64::MAX);
    let mut stack = [0i64; 16];
    if let Some(dims) = stack.get_mut(..shape.len()) {
        for (to, &d) in dims.iter_mut().zip(shape) {
            *to = dim(d);
        }
        f(dims)
    } else {
        f(&shape.iter().map(|&d| dim(d)).collect::<Vec<_>>())
    }
}

fn c_name(name: &str) -> Result<CString, String> {
    CString::new(name).map_err(|_| format!("name {name:?} holds a NUL byte"))
}

/// `Ok` for a null status, else its message (the status released).
/// A model call's status. ONNX Runtime's `INVALID_ARGUMENT` is the request's fault (an index
/// past a table's end, inputs whose dynamic sizes do not agree): 400, and not counted against a
/// canary; any other failure is the server's (500).
fn run_status(call: OrtStatusPtr) -> Result<(), InferError> {
    if call.0.is_null() {
        return Ok(());
    }
    const ORT_INVALID_ARGUMENT: i32 = 2;
    // SAFETY: `GetErrorCode` returns a C enum, an `i32` (ort-sys declares it `#[repr(i32)]`);
    // read as the plain `i32` so that a code newer than ort-sys knows is not an invalid Rust
    // enum value. The status is non-null and released by `status` below.
    let code = unsafe {
        let get: unsafe extern "system" fn(*const ort::sys::OrtStatus) -> i32 =
            std::mem::transmute(ort::api().GetErrorCode);
        get(call.0)
    };
    let message = status(call).err().unwrap_or_default();
    Err(match code {
        ORT_INVALID_ARGUMENT => InferError::invalid(format!("the model refused the inputs: {message}")),
        _ => InferError::internal(format!("ONNX Runtime error: {message}")),
    })
}

fn status(status: OrtStatusPtr) -> Result<(), String> {
    if status.0.is_null() {
        return Ok(());
    }
    let api = ort::api();
    // SAFETY: a non-null status from ONNX Runtime, read once and released once.
    let message = unsafe { CStr::from_ptr((api.GetErrorMessage)(status.0)) }.to_string_lossy().into_owned();
    unsafe { (api.ReleaseStatus)(status.0) };
    Err(message)
}

/// A call's names and values: on the stack for up to 8 inputs or outputs.
type Few<T> = smallvec::SmallVec<[T; 8]>;

/// Values this module made or received, released when it lets go of them.
struct Released(Few<*mut OrtValue>);

impl Drop for Released {
    fn drop(&mut self) {
        for &value in &self.0 {
            if !value.is_null() {
                // SAFETY: each value was created for or returned by this call and is released once.
                unsafe { (ort::api().ReleaseValue)(value) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_element_codes_map_to_served_datatypes_and_others_are_refused() {
        for dtype in DataType::ALL {
            let code = ort::sys::ONNXTensorElementDataType::from(crate::onnx::to_ort_type(dtype)) as i32;
            assert_eq!(served_type(code), Some(dtype), "{dtype} (ONNX code {code})");
        }
        // Undefined, complex, float8, int4, and codes ort's enum does not have.
        for code in [0, 14, 15, 17, 21, 22, 26, 27, 1000, -1] {
            assert_eq!(served_type(code), None, "ONNX code {code}");
        }
    }

    /// A BYTES tensor holding nothing may name dimensions whose product overflows before its 0
    /// (ONNX Runtime multiplies them unchecked; with overflow checks on, that panicked, and the
    /// replica was replaced): such a tensor is refused when it is made now.
    #[test]
    fn an_empty_bytes_tensor_of_huge_dimensions_is_refused() {
        let e = Tensor::new(DataType::Bytes, vec![1 << 32, 1 << 32, 0], bytes::Bytes::new()).unwrap_err();
        assert!(e.message.contains("span more than"), "{e}");
    }
}
