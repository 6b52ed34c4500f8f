//! Numeric tensors to and from f64, for steps that convert between datatypes.

use bytes::Bytes;

use crate::{DataType, InferError, Tensor};

/// Every element as f64 (BYTES: empty).
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    let d = &t.data()[..];
    macro_rules! each {
        ($ty:ty, $n:literal, $f:expr) => {
            d.chunks_exact($n).map(|c| $f(<$ty>::from_le_bytes(c.try_into().unwrap_or_default()))).collect()
        };
    }
    match t.dtype() {
        DataType::Bool => d.iter().map(|&b| b as f64).collect(),
        DataType::Uint8 => d.iter().map(|&b| b as f64).collect(),
        DataType::Int8 => d.iter().map(|&b| b as i8 as f64).collect(),
        DataType::Uint16 => each!(u16, 2, |v| v as f64),
        DataType::Int16 => each!(i16, 2, |v| v as f64),
        DataType::Uint32 => each!(u32, 4, |v| v as f64),
        DataType::Int32 => each!(i32, 4, |v| v as f64),
        DataType::Uint64 => each!(u64, 8, |v| v as f64),
        DataType::Int64 => each!(i64, 8, |v| v as f64),
        DataType::Fp16 => each!(half::f16, 2, |v: half::f16| v.to_f64()),
        DataType::Bf16 => each!(half::bf16, 2, |v: half::bf16| v.to_f64()),
        DataType::Fp32 => each!(f32, 4, |v| v as f64),
        DataType::Fp64 => each!(f64, 8, |v| v),
        DataType::Bytes => Vec::new(),
    }
}

/// A tensor of `dtype` from f64 values (integers truncate toward zero, saturating).
pub fn from_f64(dtype: DataType, shape: Vec<usize>, values: &[f64]) -> Result<Tensor, InferError> {
    let mut out = Vec::with_capacity(values.len() * dtype.byte_size().unwrap_or(1));
    for &v in values {
        match dtype {
            DataType::Bool => out.push((v != 0.0) as u8),
            DataType::Uint8 => out.push(v as u8),
            DataType::Int8 => out.extend((v as i8).to_le_bytes()),
            DataType::Uint16 => out.extend((v as u16).to_le_bytes()),
            DataType::Int16 => out.extend((v as i16).to_le_bytes()),
            DataType::Uint32 => out.extend((v as u32).to_le_bytes()),
            DataType::Int32 => out.extend((v as i32).to_le_bytes()),
            DataType::Uint64 => out.extend((v as u64).to_le_bytes()),
            DataType::Int64 => out.extend((v as i64).to_le_bytes()),
            DataType::Fp16 => out.extend(half::f16::from_f64(v).to_le_bytes()),
            DataType::Bf16 => out.extend(half::bf16::from_f64(v).to_le_bytes()),
            DataType::Fp32 => out.extend((v as f32).to_le_bytes()),
            DataType::Fp64 => out.extend(v.to_le_bytes()),
            DataType::Bytes => return Err(InferError::invalid("cannot convert numbers to BYTES")),
        }
    }
    Tensor::new(dtype, shape, Bytes::from(out))
}
