//! The JSON form of Open Inference Protocol tensors. Request `data` (flat or nested) is parsed
//! once, straight into the tensor's little-endian bytes, after the datatype is known; response
//! tensors are written flat from those bytes.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use sluice_deployments::{DataType, InferError, NamedTensor, Tensor, element_count, push_bytes_element};

/// `POST .../infer` body (the JSON part), as serde reads it or as [`super::json_scan`] does.
#[derive(Deserialize)]
pub struct JsonRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<Params>,
    #[serde(borrow)]
    pub inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    pub outputs: Option<Vec<JsonRequestedOutput>>,
}

#[derive(Deserialize)]
pub struct JsonInput<'a> {
    pub name: String,
    pub shape: Vec<u64>,
    #[serde(borrow)]
    pub datatype: Cow<'a, str>,
    #[serde(default)]
    pub parameters: Option<Params>,
    #[serde(borrow, default)]
    pub data: Option<InputData<'a>>,
}

/// An input's `data`.
pub enum InputData<'a> {
    /// The JSON text, decoded by [`decode_data`] once the datatype and shape are known
    /// (serde's reader: `data` may come before `datatype`).
    Raw(&'a RawValue),
    /// Decoded while read ([`super::json_scan`]): `count` elements, little-endian.
    Decoded { bytes: Vec<u8>, count: usize },
}

impl<'de: 'a, 'a> Deserialize<'de> for InputData<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(InputData::Raw)
    }
}

#[derive(Deserialize)]
pub struct JsonRequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<Params>,
}

/// A `parameters` object of a request, an input or an output: only the parameters Sluice reads
/// are kept, each as its JSON text, and the first reserved name (`triton_…`, [`Params::reserved`]);
/// every other value is read past without being built. (As a `serde_json::Value` tree, a
/// parameter holding a 64 MiB array took some 16 times that.)
#[derive(Debug, Clone, Default)]
pub struct Params {
    known: Vec<(&'static str, Box<RawValue>)>,
    reserved: Option<String>,
}

impl Params {
    /// The parameters Sluice reads; the rest are only checked for reserved names.
    pub const KNOWN: [&'static str; 7] = [
        "binary_data",
        "binary_data_output",
        "binary_data_size",
        "classification",
        "shared_memory_region",
        "timeout",
        sluice_deployments::ENABLE_EMPTY_FINAL_RESPONSE,
    ];

    /// The value of `key` (one of [`Params::KNOWN`]) as its JSON text, the last one given.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.known.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| &**v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The parameters kept, as `(name, JSON text)`.
    pub fn kept(&self) -> impl Iterator<Item = (&str, &str)> {
        self.known.iter().map(|(k, v)| (*k, v.get()))
    }

    /// The first name [`sluice_deployments::check_parameter_name`] refuses, if any.
    pub fn reserved(&self) -> Option<&str> {
        self.reserved.as_deref()
    }

    /// `key` (one of [`Params::KNOWN`]) set to the JSON text `value`.
    pub fn with(mut self, key: &'static str, value: &str) -> Self {
        let value = RawValue::from_string(value.to_string()).expect("valid JSON");
        self.known.push((key, value));
        self
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of parameters")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut params = Params::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match Params::KNOWN.iter().find(|k| **k == key) {
                        Some(known) => params.known.push((known, map.next_value()?)),
                        None => {
                            if params.reserved.is_none()
                                && sluice_deployments::check_parameter_name(&key).is_err()
                            {
                                params.reserved = Some(key.into_owned());
                            }
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(params)
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses an input's datatype and shape (the parts every encoding of `data` shares).
pub fn input_header(input: &JsonInput<'_>) -> Result<(DataType, Vec<usize>), InferError> {
    let dtype = DataType::parse(&input.datatype).ok_or_else(|| {
        InferError::invalid(format!("input `{}` has unknown datatype `{}`", input.name, input.datatype))
    })?;
    let shape =
        input.shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| {
            InferError::invalid(format!("input `{}` has an absurd shape {:?}", input.name, input.shape))
        })?;
    element_count(&shape).map_err(|e| InferError::invalid(format!("input `{}`: {e}", input.name)))?;
    Ok((dtype, shape))
}

/// Decodes JSON `data` into a tensor of the given datatype and shape.
pub fn decode_data(
    name: &str,
    dtype: DataType,
    shape: Vec<usize>,
    raw: &RawValue,
) -> Result<NamedTensor, InferError> {
    let count = element_count(&shape)?;
    let text = raw.get();
    // Never trust the shape for the allocation: each element takes at least one JSON byte.
    let capacity = count.min(text.len()) * dtype.byte_size().unwrap_or(8);
    let mut out = Vec::with_capacity(capacity);
    let mut found = 0usize;
    let mut de = serde_json::Deserializer::from_str(text);
    Flatten { dtype, out: &mut out, count: &mut found }
        .deserialize(&mut de)
        .map_err(|e| InferError::invalid(format!("input `{name}`: {}", strip_position(&e))))?;
    Ok(NamedTensor { name: name.to_string(), tensor: decoded(name, dtype, shape, out, found)? })
}

/// The tensor of input `name` from its `found` decoded elements, checked against its shape.
pub fn decoded(
    name: &str,
    dtype: DataType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    found: usize,
) -> Result<Tensor, InferError> {
    let count = element_count(&shape)?;
    if found != count {
        return Err(InferError::invalid(format!(
            "input `{name}` has shape {shape:?} ({count} elements) but its data has {found} elements"
        )));
    }
    Tensor::new(dtype, shape, Bytes::from(bytes))
        .map_err(|e| InferError::invalid(format!("input `{name}`: {e}")))
}

fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Walks nested arrays and appends each scalar, converted to `dtype`, to `out`.
struct Flatten<'o> {
    dtype: DataType,
    out: &'o mut Vec<u8>,
    count: &'o mut usize,
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! push_int {
    ($self:ident, $v:expr, $E:ty) => {{
        let v = $v;
        macro_rules! put {
            ($t:ty) => {
                match <$t>::try_from(v) {
                    Ok(x) => $self.out.extend_from_slice(&x.to_le_bytes()),
                    Err(_) => return Err(<$E>::custom(format!("{v} is out of range for {}", $self.dtype))),
                }
            };
        }
        match $self.dtype {
            DataType::Uint8 => put!(u8),
            DataType::Uint16 => put!(u16),
            DataType::Uint32 => put!(u32),
            DataType::Uint64 => put!(u64),
            DataType::Int8 => put!(i8),
            DataType::Int16 => put!(i16),
            DataType::Int32 => put!(i32),
            DataType::Int64 => put!(i64),
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
                return $self.push_float(v as f64);
            }
            DataType::Bool | DataType::Bytes => {
                return Err(<$E>::custom(format!("expected {} data, found number {v}", $self.dtype_desc())));
            }
        }
        *$self.count += 1;
        Ok(())
    }};
}

impl Flatten<'_> {
    fn dtype_desc(&self) -> &'static str {
        match self.dtype {
            DataType::Bool => "boolean (BOOL)",
            DataType::Bytes => "string (BYTES)",
            _ => "numeric",
        }
    }

    fn push_float<E: de::Error>(self, v: f64) -> Result<(), E> {
        match push_float_as(self.dtype, v, self.out) {
            Some(true) => {}
            Some(false) => return Err(E::custom(format!("{v:e} is out of range for {}", self.dtype))),
            // serde_json hands integers beyond 64 bits over as floats.
            _ if integer_range(self.dtype)
                .is_some_and(|(below, above)| v.fract() == 0.0 && !(below < v && v < above)) =>
            {
                return Err(E::custom(format!("{v} is out of range for {}", self.dtype)));
            }
            // JSON's negative zero, which the reader takes for a float.
            _ if self.dtype.byte_size().is_some()
                && self.dtype != DataType::Bool
                && v == 0.0
                && v.is_sign_negative() =>
            {
                return Err(E::custom(format!(
                    "-0 is read as a float; {} needs an integer: send 0",
                    self.dtype
                )));
            }
            // `1.0` or `1e2`: a whole number, written as JSON writes a float.
            _ if self.dtype.byte_size().is_some() && self.dtype != DataType::Bool && v.fract() == 0.0 => {
                return Err(E::custom(format!(
                    "{v} is written with a fraction or an exponent; {} needs an integer written without either",
                    self.dtype
                )));
            }
            _ if self.dtype.byte_size().is_some() && self.dtype != DataType::Bool => {
                return Err(E::custom(format!("{v} is not an integer, as {} needs", self.dtype)));
            }
            _ => {
                return Err(E::custom(format!("expected {} data, found number {v}", self.dtype_desc())));
            }
        }
        *self.count += 1;
        Ok(())
    }
}

/// `v` converted to `dtype` and appended to `out`: `Some(true)`, or `Some(false)` (nothing
/// appended) where it rounds to an infinity of `dtype` (FP32 `1e39`, FP16 `70000`); `None` when
/// `dtype` is not a float type. Both JSON readers convert with this, from the same correctly
/// rounded f64, so a number's bytes do not depend on which reader read the request.
/// How a response writes a floating-point value that is not finite, as Triton does.
#[cold]
fn non_finite(v: f64) -> &'static [u8] {
    if v.is_nan() {
        b"NaN"
    } else if v > 0.0 {
        b"Infinity"
    } else {
        b"-Infinity"
    }
}

/// The words for a floating-point value that is no number, as Triton reads and writes them
/// (rapidjson's NaN and Infinity flags), with their values.
pub(super) const NON_FINITE: [(&str, f64); 3] =
    [("NaN", f64::NAN), ("Infinity", f64::INFINITY), ("-Infinity", f64::NEG_INFINITY)];

/// Appends `v` (NaN or an infinity) as a value of the floating-point `dtype`; None for another.
pub(super) fn push_non_finite(dtype: DataType, v: f64, out: &mut Vec<u8>) -> Option<()> {
    match dtype {
        DataType::Fp16 => out.extend_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        DataType::Bf16 => out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
        DataType::Fp32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        DataType::Fp64 => out.extend_from_slice(&v.to_le_bytes()),
        _ => return None,
    }
    Some(())
}

/// `json` with each `NaN`, `Infinity` and `-Infinity` outside its strings put in quotes, which
/// serde's reader then reads as strings (and a floating-point input's data takes as the value):
/// serde_json reads no such words, which tritonclient writes for these values in JSON data, and
/// Triton reads. None when the text has none.
pub(super) fn quote_non_finite(json: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    let (mut in_string, mut escaped, mut copied) = (false, false, 0);
    let mut i = 0;
    while i < json.len() {
        let c = json[i];
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if let Some((word, _)) = NON_FINITE.iter().find(|(w, _)| json[i..].starts_with(w.as_bytes())) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(json.len() + 16));
            o.extend_from_slice(&json[copied..i]);
            o.push(b'"');
            o.extend_from_slice(word.as_bytes());
            o.push(b'"');
            i += word.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    let mut out = out?;
    out.extend_from_slice(&json[copied..]);
    Some(out)
}

/// `v` as an f32 rounded to odd (toward zero, the last bit set when that was inexact), from
/// which rounding to the nearest FP16 or BF16 is the correct rounding of `v` itself: f32 keeps
/// more than two bits beyond either. (`half`'s own conversions from f64 round twice, or drop
/// the low 32 bits before they look for a tie: 2049.0000000001 became 2048, not 2050.)
fn round_to_odd(v: f64) -> f32 {
    let t = v as f32;
    if !t.is_finite() || f64::from(t) == v {
        return t;
    }
    let mut bits = t.to_bits();
    if f64::from(t).abs() > v.abs() {
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

pub(super) fn push_float_as(dtype: DataType, v: f64, out: &mut Vec<u8>) -> Option<bool> {
    fn put<const N: usize>(out: &mut Vec<u8>, finite: bool, bytes: [u8; N]) -> bool {
        if finite {
            out.extend_from_slice(&bytes);
        }
        finite
    }
    Some(match dtype {
        DataType::Fp16 => {
            let h = half::f16::from_f32(round_to_odd(v));
            put(out, h.is_finite(), h.to_le_bytes())
        }
        DataType::Bf16 => {
            let h = half::bf16::from_f32(round_to_odd(v));
            put(out, h.is_finite(), h.to_le_bytes())
        }
        DataType::Fp32 => put(out, (v as f32).is_finite(), (v as f32).to_le_bytes()),
        DataType::Fp64 => put(out, v.is_finite(), v.to_le_bytes()),
        _ => return None,
    })
}

/// An integer datatype's values as floats, both bounds excluded: (just below its minimum, just
/// above its maximum). For the 64-bit types these are ±2^63 and 2^64, which is also where values
/// beyond them round to.
fn integer_range(dtype: DataType) -> Option<(f64, f64)> {
    let two = |bits: i32| 2f64.powi(bits);
    Some(match dtype {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let bits = dtype.byte_size().unwrap_or(8) as i32 * 8 - 1;
            (-two(bits) - if bits < 63 { 1.0 } else { 0.0 }, two(bits))
        }
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64 => {
            (-1.0, two(dtype.byte_size().unwrap_or(8) as i32 * 8))
        }
        _ => return None,
    })
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} data: a flat or nested array of values", self.dtype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Flatten { dtype: self.dtype, out: &mut *self.out, count: &mut *self.count })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        if self.dtype != DataType::Bool {
            return Err(E::custom(format!("expected {} data, found boolean {v}", self.dtype_desc())));
        }
        self.out.push(v as u8);
        *self.count += 1;
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        push_int!(self, v, E)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        push_int!(self, v, E)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push_float(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if let Some((_, x)) = NON_FINITE.iter().find(|(w, _)| *w == v)
            && push_non_finite(self.dtype, *x, self.out).is_some()
        {
            *self.count += 1;
            return Ok(());
        }
        if self.dtype != DataType::Bytes {
            return Err(E::custom(format!("expected {} data, found string {v:?}", self.dtype_desc())));
        }
        push_bytes_element(self.out, v.as_bytes()).map_err(E::custom)?;
        *self.count += 1;
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(format!("expected {} data, found null", self.dtype_desc())))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(format!("expected {} data, found an object", self.dtype_desc())))
    }
}

/// Writes `t`'s elements into `out` as a flat JSON array: byte for byte what serializing
/// [`JsonData`] with serde_json writes (numbers formatted by the same `zmij` and `itoa`), without
/// a serializer call per number, except NaN and infinities: `NaN`, `Infinity`, `-Infinity` as
/// Triton writes them (serde_json writes `null`, which clients read as NaN).
pub fn write_data(out: &mut Vec<u8>, t: &Tensor) {
    let data = &t.data()[..];
    out.push(b'[');
    macro_rules! each {
        ($t:ty, $n:literal, |$v:ident| $write:expr) => {
            for (i, c) in data.chunks_exact($n).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let $v = <$t>::from_le_bytes(c.try_into().expect("chunk size"));
                $write;
            }
        };
    }
    macro_rules! ints {
        ($t:ty, $n:literal) => {{
            let mut buffer = itoa::Buffer::new();
            each!($t, $n, |v| out.extend_from_slice(buffer.format(v).as_bytes()))
        }};
    }
    macro_rules! floats {
        ($t:ty, $n:literal, $map:expr) => {{
            let mut buffer = zmij::Buffer::new();
            each!($t, $n, |v| {
                let v = $map(v);
                if v.is_finite() {
                    out.extend_from_slice(buffer.format_finite(v).as_bytes());
                } else {
                    // Triton's words for these (rapidjson's kWriteNanAndInfFlag), which
                    // tritonclient and Python's json read back; `null` read as NaN there.
                    out.extend_from_slice(non_finite(v.into()));
                }
            })
        }};
    }
    match t.dtype() {
        DataType::Bool => {
            for (i, &b) in data.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(if b != 0 { b"true" } else { b"false" });
            }
        }
        DataType::Uint8 => ints!(u8, 1),
        DataType::Uint16 => ints!(u16, 2),
        DataType::Uint32 => ints!(u32, 4),
        DataType::Uint64 => ints!(u64, 8),
        DataType::Int8 => ints!(i8, 1),
        DataType::Int16 => ints!(i16, 2),
        DataType::Int32 => ints!(i32, 4),
        DataType::Int64 => ints!(i64, 8),
        DataType::Fp16 => floats!(half::f16, 2, |v: half::f16| v.to_f32()),
        DataType::Bf16 => floats!(half::bf16, 2, |v: half::bf16| v.to_f32()),
        DataType::Fp32 => floats!(f32, 4, |v: f32| v),
        DataType::Fp64 => floats!(f64, 8, |v: f64| v),
        DataType::Bytes => {
            for (i, item) in t.bytes_elements().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Strings need escaping: serde_json's own writer (into a Vec, which cannot fail).
                let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(item));
            }
        }
    }
    out.push(b']');
}

/// The first element of a BYTES tensor that is not UTF-8 (which a JSON string cannot hold);
/// `None` for other datatypes.
pub fn first_not_utf8(t: &Tensor) -> Option<usize> {
    if t.dtype() != DataType::Bytes {
        return None;
    }
    t.bytes_elements().position(|b| std::str::from_utf8(b).is_err())
}

/// Writes a tensor's elements as a flat JSON array (through serde; [`write_data`] writes the
/// same bytes straight into a buffer).
pub struct JsonData<'a>(pub &'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut seq = s.serialize_seq(Some(t.len()))?;
        let data = &t.data()[..];
        macro_rules! each {
            ($t:ty, $n:literal, $map:expr) => {
                for c in data.chunks_exact($n) {
                    let v = <$t>::from_le_bytes(c.try_into().expect("chunk size"));
                    seq.serialize_element(&$map(v))?;
                }
            };
        }
        match t.dtype() {
            DataType::Bool => {
                for &b in data {
                    seq.serialize_element(&(b != 0))?;
                }
            }
            DataType::Uint8 => each!(u8, 1, |v| v),
            DataType::Uint16 => each!(u16, 2, |v| v),
            DataType::Uint32 => each!(u32, 4, |v| v),
            DataType::Uint64 => each!(u64, 8, |v| v),
            DataType::Int8 => each!(i8, 1, |v| v),
            DataType::Int16 => each!(i16, 2, |v| v),
            DataType::Int32 => each!(i32, 4, |v| v),
            DataType::Int64 => each!(i64, 8, |v| v),
            DataType::Fp16 => each!(half::f16, 2, |v: half::f16| v.to_f32()),
            DataType::Bf16 => each!(half::bf16, 2, |v: half::bf16| v.to_f32()),
            DataType::Fp32 => each!(f32, 4, |v| v),
            DataType::Fp64 => each!(f64, 8, |v| v),
            DataType::Bytes => {
                for item in t.bytes_elements() {
                    seq.serialize_element(&String::from_utf8_lossy(item))?;
                }
            }
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(dtype: DataType, shape: Vec<usize>, json: &str) -> Result<NamedTensor, InferError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        decode_data("x", dtype, shape, &raw)
    }

    fn encode(t: &Tensor) -> String {
        serde_json::to_string(&JsonData(t)).unwrap()
    }

    fn direct(t: &Tensor) -> String {
        let mut out = Vec::new();
        write_data(&mut out, t);
        String::from_utf8(out).unwrap()
    }

    /// FP16 and BF16 values are the correct rounding of the number written.
    #[test]
    fn half_precision_values_are_correctly_rounded() {
        let half = |dtype, v: f64| {
            let mut out = Vec::new();
            assert_eq!(push_float_as(dtype, v, &mut out), Some(true));
            u16::from_le_bytes([out[0], out[1]])
        };
        assert_eq!(half(DataType::Fp16, 2049.0000000001), 0x6801, "just above a tie: up");
        assert_eq!(half(DataType::Fp16, 2049.0), 0x6800, "a tie: to even");
        assert_eq!(half(DataType::Fp16, -2049.0000000001), 0xe801);
        assert_eq!(half(DataType::Bf16, 1.003906250000001), half::bf16::from_f32(1.0078125).to_bits());
        assert_eq!(half(DataType::Bf16, 1.00390625), half::bf16::ONE.to_bits(), "a tie: to even");
        assert_eq!(half(DataType::Fp16, 1e-10), 0, "below the smallest: zero");
        assert_eq!(half(DataType::Fp16, 0.1), half::f16::from_f32(0.1).to_bits());
    }

    /// The words serde's reader does not read are quoted outside strings only.
    #[test]
    fn nan_and_infinities_are_quoted_outside_strings() {
        let text = br#"{"id":"NaN \"Infinity\"","data":[NaN,-Infinity, Infinity,1]}"#;
        let quoted = String::from_utf8(quote_non_finite(text).unwrap()).unwrap();
        assert_eq!(quoted, r#"{"id":"NaN \"Infinity\"","data":["NaN","-Infinity", "Infinity",1]}"#);
        assert_eq!(quote_non_finite(br#"{"id":"NaN","data":[1]}"#), None);
        // Read as values of a floating-point input, not as text.
        let t = decode(DataType::Fp64, vec![3], r#"["NaN","-Infinity","Infinity"]"#).unwrap();
        let v: Vec<f64> =
            t.tensor.data().chunks(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        assert!(v[0].is_nan() && v[1] == f64::NEG_INFINITY && v[2] == f64::INFINITY, "{v:?}");
        assert!(decode(DataType::Int32, vec![1], r#"["NaN"]"#).is_err());
    }

    #[test]
    fn the_direct_writer_writes_what_serde_writes() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for dtype in DataType::ALL {
            let Some(size) = dtype.byte_size() else { continue };
            // Random bit patterns: subnormals, NaNs with payloads and infinities among the floats.
            let mut data: Vec<u8> = (0..size * 4096).map(|_| next() as u8).collect();
            if dtype == DataType::Bool {
                data.iter_mut().for_each(|b| *b &= 1);
            }
            let specials: Vec<u8> = match dtype {
                DataType::Fp32 => [0.0f32, -0.0, 0.1, 1e-45, f32::MAX, f32::MIN_POSITIVE, 16_777_217.0, 1e21]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                DataType::Fp64 => [0.0f64, -0.0, 0.1, 5e-324, f64::MAX, 1e21, 1e-7, 123_456_789.125]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => Vec::new(),
            };
            data.extend(specials);
            let n = data.len() / size;
            let t = Tensor::new(dtype, vec![n], data.into()).unwrap();
            // serde_json writes `null` where the direct writer writes Triton's words.
            let words =
                direct(&t).replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null");
            assert_eq!(words, encode(&t), "{dtype:?}");
            let empty = Tensor::new(dtype, vec![0], Bytes::new()).unwrap();
            assert_eq!(direct(&empty), "[]", "{dtype:?}");
        }
        let mut strings = Vec::new();
        for s in ["", "plain", "qu\"ote", "back\\slash", "h\u{e9}llo \u{1F600}", "\u{0}\n\t\u{1f}"] {
            push_bytes_element(&mut strings, s.as_bytes()).unwrap();
        }
        push_bytes_element(&mut strings, &[0xff, 0xfe, b'a']).unwrap(); // not UTF-8
        let t = Tensor::new(DataType::Bytes, vec![7], strings.into()).unwrap();
        assert_eq!(direct(&t), encode(&t));
    }

    #[test]
    fn flat_and_nested_data_give_the_same_tensor() {
        let flat = decode(DataType::Fp32, vec![2, 2], "[1, 2.5, -3, 4]").unwrap();
        let nested = decode(DataType::Fp32, vec![2, 2], "[[1, 2.5], [-3, 4]]").unwrap();
        assert_eq!(flat, nested);
        assert_eq!(encode(&flat.tensor), "[1.0,2.5,-3.0,4.0]");
    }

    #[test]
    fn every_datatype_round_trips() {
        let cases = [
            (DataType::Bool, "[true,false]"),
            (DataType::Uint8, "[0,255]"),
            (DataType::Uint16, "[0,65535]"),
            (DataType::Uint32, "[0,4294967295]"),
            (DataType::Uint64, "[0,18446744073709551615]"),
            (DataType::Int8, "[-128,127]"),
            (DataType::Int16, "[-32768,32767]"),
            (DataType::Int32, "[-2147483648,2147483647]"),
            (DataType::Int64, "[-9223372036854775808,9223372036854775807]"),
            (DataType::Fp16, "[0.5,-2.0]"),
            (DataType::Bf16, "[0.5,-2.0]"),
            (DataType::Fp32, "[0.1,-2.5]"),
            (DataType::Fp64, "[0.1,1e+300]"),
            (DataType::Bytes, r#"["héllo",""]"#),
        ];
        for (dtype, json) in cases {
            let t = decode(dtype, vec![2], json).unwrap_or_else(|e| panic!("{dtype}: {e}"));
            assert_eq!(encode(&t.tensor), json, "{dtype}");
        }
    }

    #[test]
    fn out_of_range_and_wrong_kinds_are_named() {
        let e = decode(DataType::Uint8, vec![1], "[256]").unwrap_err();
        assert!(e.message.contains("256 is out of range for UINT8"), "{e}");
        let e = decode(DataType::Int32, vec![1], "[1.5]").unwrap_err();
        assert!(e.message.contains("not an integer"), "{e}");
        // A whole number written as a float is named as such, not as "not an integer".
        for json in ["[1.0]", "[1e2]", "[0.0]"] {
            let e = decode(DataType::Int32, vec![1], json).unwrap_err();
            assert!(e.message.contains("written with a fraction or an exponent; INT32 needs"), "{json}: {e}");
        }
        let e = decode(DataType::Int32, vec![1], "[-0]").unwrap_err();
        assert!(e.message.contains("-0 is read as a float; INT32 needs an integer: send 0"), "{e}");
        // Beyond 64 bits serde_json reads a float: still named out of range, not "not an integer".
        let e = decode(DataType::Uint64, vec![1], "[18446744073709551616]").unwrap_err();
        assert!(e.message.contains("is out of range for UINT64"), "{e}");
        let e = decode(DataType::Int64, vec![1], "[-9223372036854775809]").unwrap_err();
        assert!(e.message.contains("is out of range for INT64"), "{e}");
        let e = decode(DataType::Fp32, vec![1], r#"["a"]"#).unwrap_err();
        assert!(e.message.contains("found string"), "{e}");
        let e = decode(DataType::Bool, vec![1], "[1]").unwrap_err();
        assert!(e.message.contains("boolean"), "{e}");
        let e = decode(DataType::Fp32, vec![1], "[null]").unwrap_err();
        assert!(e.message.contains("null"), "{e}");
        assert!(e.message.starts_with("input `x`"), "{e}");
    }

    #[test]
    fn element_count_must_match_shape() {
        let e = decode(DataType::Fp32, vec![1, 4], "[1, 2, 3]").unwrap_err();
        assert!(e.message.contains("4 elements") && e.message.contains("has 3"), "{e}");
        // A scalar where an array is expected is one element.
        assert!(decode(DataType::Fp32, vec![1], "7").is_ok());
    }

    #[test]
    fn absurd_shapes_do_not_allocate() {
        let e = decode(DataType::Fp64, vec![1 << 40, 1 << 20], "[1]").unwrap_err();
        assert!(e.message.contains("elements"), "{e}");
    }
}
