//! `Tensor`: a datatype, a shape and contiguous little-endian bytes. The bytes are a
//! `bytes::Bytes`, so gRPC raw contents and REST binary bodies become tensors by slicing, and
//! one layout serves every frontend and backend. BYTES tensors use the Open Inference
//! Protocol's binary form: each element is a u32 little-endian length and then its bytes.

use std::fmt;

use bytes::Bytes;

use crate::InferError;

/// The Open Inference Protocol datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    Bytes,
}

impl DataType {
    /// Every datatype, in the order the protocol lists them.
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// The wire name (`"FP32"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a wire name; `None` for anything else. (A match, not a search of [`Self::ALL`]:
    /// every JSON input names its datatype, and the search cost ~230 instructions for FP32.)
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => DataType::Bool,
            "UINT8" => DataType::Uint8,
            "UINT16" => DataType::Uint16,
            "UINT32" => DataType::Uint32,
            "UINT64" => DataType::Uint64,
            "INT8" => DataType::Int8,
            "INT16" => DataType::Int16,
            "INT32" => DataType::Int32,
            "INT64" => DataType::Int64,
            "FP16" => DataType::Fp16,
            "BF16" => DataType::Bf16,
            "FP32" => DataType::Fp32,
            "FP64" => DataType::Fp64,
            "BYTES" => DataType::Bytes,
            _ => return None,
        })
    }

    /// Bytes per element, `None` for BYTES (variable length).
    pub fn byte_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most elements the dimensions of an empty tensor other than its zeros may span: a
/// model can allocate that many for it (a mean over its empty dimension is a tensor of the
/// others), which its zero bytes on the wire would not bound. `[0, 4096, 4096]` passes.
pub const MAX_EMPTY_TENSOR_SPAN: usize = 1 << 24;

/// Element count of `shape`, or an error naming the shape when it cannot be a real tensor
/// (a dimension above `i64::MAX`, a product that overflows, or an empty tensor whose other
/// dimensions span more than [`MAX_EMPTY_TENSOR_SPAN`] elements).
pub fn element_count(shape: &[usize]) -> Result<usize, InferError> {
    if shape.iter().any(|&d| d > i64::MAX as usize) {
        return Err(InferError::invalid(format!("shape {shape:?} has a dimension larger than {}", i64::MAX)));
    }
    if shape.contains(&0) {
        let span = shape.iter().filter(|&&d| d != 0).try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if span.is_none_or(|span| span > MAX_EMPTY_TENSOR_SPAN) {
            return Err(InferError::invalid(format!(
                "shape {shape:?} is empty, but its other dimensions span more than {MAX_EMPTY_TENSOR_SPAN} \
                 elements, which a model could allocate for it"
            )));
        }
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| InferError::invalid(format!("shape {shape:?} has too many elements")))
}

/// A tensor: datatype, shape and little-endian bytes (see the module docs for BYTES).
#[derive(Clone, PartialEq)]
pub struct Tensor {
    dtype: DataType,
    shape: Vec<usize>,
    data: Bytes,
}

impl Tensor {
    /// Checks that `data` holds exactly the elements `shape` promises.
    pub fn new(dtype: DataType, shape: Vec<usize>, data: Bytes) -> Result<Self, InferError> {
        let count = element_count(&shape)?;
        match dtype.byte_size() {
            Some(size) => {
                let want = count
                    .checked_mul(size)
                    .ok_or_else(|| InferError::invalid(format!("shape {shape:?} has too many elements")))?;
                if data.len() != want {
                    return Err(InferError::invalid(format!(
                        "{dtype} tensor of shape {shape:?} needs {want} bytes of data, got {}",
                        data.len()
                    )));
                }
                // A model reads each byte as a C++ `bool`: any other value is undefined there.
                if dtype == DataType::Bool
                    && let Some(at) = data.iter().position(|&b| b > 1)
                {
                    return Err(InferError::invalid(format!(
                        "BOOL element {at} is the byte {:#04x}; a BOOL element is one byte, 0 (false) or 1 (true)",
                        data[at]
                    )));
                }
            }
            None => {
                let found = count_bytes_elements(&data)?;
                if found != count {
                    return Err(InferError::invalid(format!(
                        "BYTES tensor of shape {shape:?} needs {count} elements, got {found}"
                    )));
                }
            }
        }
        Ok(Self { dtype, shape, data })
    }

    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw little-endian bytes (BYTES: length-prefixed elements).
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Number of elements (the product of the shape). A shape with a 0 holds none whatever its
    /// other dimensions, whose product alone may not fit (`[2^32, 2^32, 0]` is a valid empty
    /// tensor; the plain product overflowed).
    pub fn len(&self) -> usize {
        if self.shape.contains(&0) { 0 } else { self.shape.iter().product() }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements of a BYTES tensor; empty for other datatypes.
    pub fn bytes_elements(&self) -> BytesElements<'_> {
        let data = if self.dtype == DataType::Bytes { &self.data[..] } else { &[] };
        BytesElements { rest: data }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Appends one BYTES element (length prefix and bytes) to `out`.
pub fn push_bytes_element(out: &mut Vec<u8>, element: &[u8]) -> Result<(), InferError> {
    let len = u32::try_from(element.len())
        .map_err(|_| InferError::invalid("a BYTES element is longer than 4 GiB"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(element);
    Ok(())
}

fn count_bytes_elements(mut data: &[u8]) -> Result<usize, InferError> {
    let mut n = 0;
    while !data.is_empty() {
        let Some((len, rest)) = data.split_first_chunk::<4>() else {
            return Err(InferError::invalid("BYTES data ends inside a length prefix"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(InferError::invalid(format!(
                "BYTES element {n} claims {len} bytes but only {} remain",
                rest.len()
            )));
        }
        data = &rest[len..];
        n += 1;
    }
    Ok(n)
}

/// Iterator over the elements of a BYTES tensor (validated at construction).
pub struct BytesElements<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for BytesElements<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
        let (item, rest) = rest.split_at(len);
        self.rest = rest;
        Some(item)
    }
}

/// A tensor with its input or output name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::parse(d.as_str()), Some(d));
        }
        for other in ["FLOAT", "fp32", "FP3", "FP32 ", "", "BYTE"] {
            assert_eq!(DataType::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn fixed_size_tensor_checks_length() {
        let t = Tensor::new(DataType::Fp32, vec![2, 2], Bytes::from(vec![0u8; 16])).unwrap();
        assert_eq!(t.len(), 4);
        let e = Tensor::new(DataType::Fp32, vec![2, 2], Bytes::from(vec![0u8; 12])).unwrap_err();
        assert!(e.to_string().contains("needs 16 bytes"), "{e}");
    }

    #[test]
    fn absurd_shapes_are_errors_not_panics() {
        let e = Tensor::new(DataType::Fp32, vec![usize::MAX / 2, 4], Bytes::new()).unwrap_err();
        assert!(e.to_string().contains("too many elements"), "{e}");
        let e = Tensor::new(DataType::Int8, vec![usize::MAX], Bytes::new()).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        let e = Tensor::new(DataType::Fp64, vec![1 << 61, 8], Bytes::new()).unwrap_err();
        assert!(e.to_string().contains("too many elements"), "{e}");
        // A zero dimension makes an empty tensor, of no data; its other dimensions may span
        // up to MAX_EMPTY_TENSOR_SPAN elements (a model can allocate them for it).
        let t = Tensor::new(DataType::Fp32, vec![1 << 12, 0, 1 << 12], Bytes::new()).unwrap();
        assert_eq!((t.len(), t.is_empty()), (0, true));
        for shape in [vec![0, (1 << 24) + 1], vec![1 << 23, 0, 3], vec![1 << 32, 1 << 32, 0]] {
            let e = Tensor::new(DataType::Fp32, shape.clone(), Bytes::new()).unwrap_err();
            assert!(e.to_string().contains("span more than 16777216"), "{shape:?}: {e}");
        }
        // BOOL bytes are 0 or 1; UINT8 takes any byte.
        assert!(Tensor::new(DataType::Bool, vec![4], Bytes::from(vec![0u8, 1, 1, 0])).is_ok());
        let e = Tensor::new(DataType::Bool, vec![4], Bytes::from(vec![0u8, 1, 2, 0])).unwrap_err();
        assert!(e.message.contains("BOOL element 2 is the byte 0x02"), "{}", e.message);
        assert!(Tensor::new(DataType::Uint8, vec![4], Bytes::from(vec![0u8, 1, 2, 255])).is_ok());
    }

    #[test]
    fn bytes_tensor_walks_length_prefixes() {
        let mut data = Vec::new();
        push_bytes_element(&mut data, b"ab").unwrap();
        push_bytes_element(&mut data, b"").unwrap();
        push_bytes_element(&mut data, b"xyz").unwrap();
        let t = Tensor::new(DataType::Bytes, vec![3], Bytes::from(data.clone())).unwrap();
        let items: Vec<&[u8]> = t.bytes_elements().collect();
        assert_eq!(items, vec![&b"ab"[..], b"", b"xyz"]);
        assert!(Tensor::new(DataType::Bytes, vec![2], Bytes::from(data.clone())).is_err());
        data.truncate(data.len() - 1);
        let e = Tensor::new(DataType::Bytes, vec![3], Bytes::from(data)).unwrap_err();
        assert!(e.to_string().contains("only 2 remain"), "{e}");
    }
}
