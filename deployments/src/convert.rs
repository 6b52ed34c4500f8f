//! Numeric tensors converted between datatypes (the built-in `cast` step), element by element
//! as ONNX's `Cast` and numpy's `astype` do: integers to integers keep their low bits (300 as
//! INT8 is 44, -1 as UINT8 is 255), each value rounded once to a floating type (except to
//! FP16 or BF16, which FP64 and integers reach through FP32, as ONNX Runtime's `Cast` does), floats to integers truncated toward zero and saturated at the
//! type's bounds (NaN: 0). Integers go through i128 and floats through their own width, never
//! through f64: an INT64 above 2^53 keeps all its bits.

use bytes::Bytes;

use crate::{DataType, InferError, Tensor};

/// The elements of a tensor, widened without loss.
enum Column {
    Ints(Vec<i128>),
    /// FP16, BF16 and FP32 (each exact as f32).
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Elements widened at a time: the widened copy (an i128 per element: sixteen times a UINT8
/// input's size, 1 GiB for a 64 MiB body) is held for a part at a time, never for the whole.
const PART: usize = 4096;

/// `d`, whole elements of `dtype`, widened.
fn column(dtype: DataType, d: &[u8]) -> Result<Column, InferError> {
    macro_rules! each {
        ($variant:ident, $ty:ty, $n:literal, $f:expr) => {
            Column::$variant(
                d.chunks_exact($n)
                    .map(|c| $f(<$ty>::from_le_bytes(c.try_into().unwrap_or_default())))
                    .collect(),
            )
        };
    }
    Ok(match dtype {
        DataType::Bool | DataType::Uint8 => Column::Ints(d.iter().map(|&b| i128::from(b)).collect()),
        DataType::Int8 => Column::Ints(d.iter().map(|&b| i128::from(b as i8)).collect()),
        DataType::Uint16 => each!(Ints, u16, 2, i128::from),
        DataType::Int16 => each!(Ints, i16, 2, i128::from),
        DataType::Uint32 => each!(Ints, u32, 4, i128::from),
        DataType::Int32 => each!(Ints, i32, 4, i128::from),
        DataType::Uint64 => each!(Ints, u64, 8, i128::from),
        DataType::Int64 => each!(Ints, i64, 8, i128::from),
        DataType::Fp16 => each!(F32, half::f16, 2, |v: half::f16| v.to_f32()),
        DataType::Bf16 => each!(F32, half::bf16, 2, |v: half::bf16| v.to_f32()),
        DataType::Fp32 => each!(F32, f32, 4, |v| v),
        DataType::Fp64 => each!(F64, f64, 8, |v| v),
        DataType::Bytes => return Err(InferError::invalid("cannot convert BYTES to numbers")),
    })
}

/// `t`'s elements as `to`, same shape.
pub fn cast(t: &Tensor, to: DataType) -> Result<Tensor, InferError> {
    let width = to.byte_size().ok_or_else(|| InferError::invalid("cannot convert numbers to BYTES"))?;
    let mut out = Vec::with_capacity(t.len() * width);
    // One element `$v` (an i128, f32 or f64) written as `to`: `as` between integers keeps the low
    // bits, from a float it truncates and saturates.
    macro_rules! put {
        ($v:expr, $nonzero:expr, $to_f32:expr, $to_f64:expr) => {
            match to {
                DataType::Bool => out.push(u8::from($nonzero)),
                DataType::Uint8 => out.push($v as u8),
                DataType::Int8 => out.extend(($v as i8).to_le_bytes()),
                DataType::Uint16 => out.extend(($v as u16).to_le_bytes()),
                DataType::Int16 => out.extend(($v as i16).to_le_bytes()),
                DataType::Uint32 => out.extend(($v as u32).to_le_bytes()),
                DataType::Int32 => out.extend(($v as i32).to_le_bytes()),
                DataType::Uint64 => out.extend(($v as u64).to_le_bytes()),
                DataType::Int64 => out.extend(($v as i64).to_le_bytes()),
                DataType::Fp16 => out.extend(half::f16::from_f32($to_f32).to_le_bytes()),
                DataType::Bf16 => out.extend(half::bf16::from_f32($to_f32).to_le_bytes()),
                DataType::Fp32 => out.extend(($to_f32).to_le_bytes()),
                DataType::Fp64 => out.extend(($to_f64).to_le_bytes()),
                DataType::Bytes => unreachable!("refused above"),
            }
        };
    }
    let size = t.dtype().byte_size().ok_or_else(|| InferError::invalid("cannot convert BYTES to numbers"))?;
    for part in t.data().chunks(PART * size) {
        match column(t.dtype(), part)? {
            Column::Ints(values) => values.into_iter().for_each(|v| put!(v, v != 0, v as f32, v as f64)),
            Column::F32(values) => values.into_iter().for_each(|v| put!(v, v != 0.0, v, f64::from(v))),
            Column::F64(values) => values.into_iter().for_each(|v| put!(v, v != 0.0, v as f32, v)),
        }
    }
    Tensor::new(to, t.shape().to_vec(), Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor<const N: usize>(dtype: DataType, bytes: [&[u8]; N]) -> Tensor {
        Tensor::new(dtype, vec![N], Bytes::from(bytes.concat())).unwrap()
    }

    fn i64s(t: &Tensor) -> Vec<i64> {
        t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    /// A tensor of several parts ([`super::PART`] elements widened at a time) is cast whole, in
    /// order.
    #[test]
    fn a_tensor_of_several_parts_is_cast_whole() {
        let n = 2 * super::PART + 7;
        let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let t = Tensor::new(DataType::Uint8, vec![n], bytes::Bytes::from(bytes)).unwrap();
        let out = cast(&t, DataType::Fp32).unwrap();
        let got: Vec<f32> =
            out.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, (0..n).map(|i| (i % 251) as f32).collect::<Vec<_>>());
        let empty_bytes = Tensor::new(DataType::Bytes, vec![0], bytes::Bytes::new()).unwrap();
        assert!(cast(&empty_bytes, DataType::Fp32).is_err(), "BYTES is refused even when empty");
    }

    /// Each pinned against numpy's `astype` and ONNX's `Cast` (integers wrap; every value rounded
    /// once; 64-bit integers keep every bit).
    #[test]
    fn conversions_match_onnx_cast() {
        let big = (1i64 << 53) + 1;
        let t = tensor(DataType::Int64, [&big.to_le_bytes(), &(-1i64).to_le_bytes(), &300i64.to_le_bytes()]);
        assert_eq!(
            i64s(&cast(&t, DataType::Int64).unwrap()),
            [big, -1, 300],
            "INT64 to INT64 keeps every bit"
        );
        assert_eq!(
            &cast(&t, DataType::Uint8).unwrap().data()[..],
            [1, 255, 44],
            "low bits: -1 is 255, 300 is 44"
        );
        let hash = tensor(DataType::Uint64, [&(u64::MAX - 1).to_le_bytes()]);
        assert_eq!(i64s(&cast(&hash, DataType::Int64).unwrap()), [-2], "a UINT64 hash keeps its bits");
        let once = (1i64 << 60) + (1 << 36) + 1;
        let f = cast(&tensor(DataType::Int64, [&once.to_le_bytes()]), DataType::Fp32).unwrap();
        let got = f32::from_le_bytes(f.data()[..4].try_into().unwrap());
        assert_eq!(got, ((1u64 << 60) + (1 << 37)) as f32, "rounded once, to nearest");
        let x = f32::from_bits(0x3F80_8001);
        let b = cast(&tensor(DataType::Fp32, [&x.to_le_bytes()]), DataType::Bf16).unwrap();
        assert_eq!(
            u16::from_le_bytes(b.data()[..2].try_into().unwrap()),
            0x3F81,
            "FP32 to BF16 rounds to nearest"
        );
        let floats = tensor(
            DataType::Fp32,
            [&1.6f32.to_le_bytes(), &(-2.5f32).to_le_bytes(), &f32::NAN.to_le_bytes()],
        );
        assert_eq!(
            &cast(&floats, DataType::Int8).unwrap().data()[..],
            [1, (-2i8) as u8, 0],
            "truncated; NaN 0"
        );
        assert_eq!(&cast(&floats, DataType::Bool).unwrap().data()[..], [1, 1, 1], "NaN is not zero");
        assert!(cast(&floats, DataType::Bytes).is_err());
        // Integers reach BF16 through FP32, as ONNX Runtime's `Cast`: 2^30 + 2^22 + 1 is a tie
        // in FP32 (2^30 + 2^22), which BF16 rounds to even.
        let t = tensor(DataType::Int32, [&1_077_936_129i32.to_le_bytes()]);
        let b = cast(&t, DataType::Bf16).unwrap();
        assert_eq!(u16::from_le_bytes(b.data()[..2].try_into().unwrap()), 0x4E80, "through FP32");
    }
}
