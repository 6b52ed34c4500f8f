//! The codec every generated service and client uses: prost's, with one check before a
//! `ModelInferRequest` is decoded.
//!
//! Protobuf's repeated fields can take far more memory decoded than on the wire: an `inputs`
//! entry of two bytes (`2A 00`) becomes a struct of some 300 bytes, an empty `bytes_contents`
//! element a 24-byte `Vec`. A 64 MiB message of empty `inputs` entries (about 64 KiB gzipped,
//! within `max_body_bytes` both ways) would have taken some 10 GiB before the server read its
//! first field, and failed the process. So the message's wire bytes are walked first (no
//! allocation, a pass over its tags; the bytes of strings and packed numbers are skipped by their
//! length), adding up what prost will allocate for it, and a message that would take more than
//! [`GROWTH`] times its own size (plus [`SLACK`]) is refused `RESOURCE_EXHAUSTED` before it is
//! decoded. Numbers grow at most eightfold (a one-byte varint into an `i64`), so no message of
//! tensor data is refused: only one whose repeated entries are mostly empty.

use std::any::TypeId;
use std::marker::PhantomData;
use std::mem::size_of;

use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::inference::{InferParameter, ModelInferRequest};

/// How many times its own size a decoded `ModelInferRequest` may take.
pub const GROWTH: usize = 8;
/// What any message may take besides: each input is a struct of some 300 bytes decoded, which a
/// small input's few wire bytes do not cover eightfold (a model of hundreds of one-value inputs,
/// a feature each, sends such messages); 64 MiB of empty entries still takes some 10 GiB.
pub const SLACK: usize = 16 * 1024 * 1024;

/// [`ProstCodec`] with the check above on `ModelInferRequest`s.
pub struct GuardedCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for GuardedCodec<T, U> {
    fn default() -> Self {
        Self { inner: ProstCodec::default() }
    }
}

impl<T, U> Codec for GuardedCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = GuardedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        GuardedDecoder { inner: self.inner.decoder(), _pd: PhantomData }
    }
}

/// [`ProstDecoder`] that checks a `ModelInferRequest` first ([`GuardedCodec`]).
pub struct GuardedDecoder<U> {
    inner: ProstDecoder<U>,
    _pd: PhantomData<U>,
}

impl<U: prost::Message + Default + 'static> Decoder for GuardedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() == TypeId::of::<ModelInferRequest>() {
            // A `DecodeBuf` is one contiguous buffer: its chunk is the whole message.
            let wire = prost::bytes::Buf::chunk(buf);
            check_infer_request(wire)?;
        }
        self.inner.decode(buf)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.inner.buffer_settings()
    }
}

/// Refuses a `ModelInferRequest` whose decoded form would pass [`GROWTH`] × its size + [`SLACK`].
pub fn check_infer_request(wire: &[u8]) -> Result<(), Status> {
    let mut counts = Counts::default();
    let decoded = request(wire, &mut counts);
    // prost skips a group in a field it does not know, and decodes on after it; the walk here
    // cannot (a group's end is found only by walking it), so it would have counted nothing past
    // one. No field of the protocol is a group: refused.
    if counts.group {
        return Err(Status::invalid_argument(
            "this ModelInferRequest holds a protobuf group, which no field of the protocol is",
        ));
    }
    let bound = wire.len().saturating_mul(GROWTH).saturating_add(SLACK);
    if decoded <= bound {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "this ModelInferRequest of {} bytes would take about {decoded} bytes once decoded, more than \
         {GROWTH} times its size: it holds {} `inputs`, {} `outputs`, {} `raw_input_contents`, {} \
         `bytes_contents` and {} parameter entries, most of them empty",
        wire.len(),
        counts.inputs,
        counts.outputs,
        counts.raw,
        counts.bytes,
        counts.parameters,
    )))
}

/// Entries counted on the way, for the error.
#[derive(Default)]
struct Counts {
    inputs: usize,
    outputs: usize,
    raw: usize,
    bytes: usize,
    parameters: usize,
    /// A group (wire type 3 or 4) was met.
    group: bool,
}

/// One field of a message: its number and what it holds. A message that does not parse ends the
/// walk (prost reports it).
enum Field<'a> {
    Varint,
    Fixed,
    Bytes(&'a [u8]),
    /// A group's start or end: the walk of this message ends there.
    Group,
}

struct Fields<'a> {
    rest: &'a [u8],
}

fn varint(rest: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = rest.split_first()?;
        *rest = tail;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Field<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let tag = varint(&mut self.rest)?;
        let field = match tag & 7 {
            0 => varint(&mut self.rest).map(|_| Field::Varint)?,
            1 | 5 => {
                let n = if tag & 7 == 1 { 8 } else { 4 };
                self.rest = self.rest.get(n..)?;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut self.rest)?).ok()?;
                let (bytes, tail) = (self.rest.get(..len)?, self.rest.get(len..)?);
                self.rest = tail;
                Field::Bytes(bytes)
            }
            3 | 4 => {
                self.rest = &[];
                Field::Group
            }
            _ => return None, // no wire type at all: prost refuses the message
        };
        Some((tag >> 3, field))
    }
}

fn fields(wire: &[u8]) -> Fields<'_> {
    Fields { rest: wire }
}

/// The bytes a string or `bytes` field takes decoded (its heap copy).
fn heap(field: &Field<'_>) -> usize {
    match field {
        Field::Bytes(b) => b.len(),
        _ => 0,
    }
}

fn group(counts: &mut Counts) -> usize {
    counts.group = true;
    0
}

/// A `map<string, InferParameter>` entry: the key, the value and the map's slot for them.
fn parameter(field: &Field<'_>, counts: &mut Counts) -> usize {
    counts.parameters += 1;
    size_of::<String>() + size_of::<InferParameter>() + 16 + heap(field)
}

/// A repeated number field of `size` bytes an element, packed or one element at a time.
fn numbers(field: &Field<'_>, size: usize, varints: bool) -> usize {
    match field {
        Field::Bytes(packed) if varints => packed.iter().filter(|&&b| b & 0x80 == 0).count() * size,
        Field::Bytes(packed) => packed.len(), // fixed-width: as many bytes decoded as sent
        _ => size,
    }
}

fn request(wire: &[u8], counts: &mut Counts) -> usize {
    let mut total = size_of::<ModelInferRequest>();
    for (number, field) in fields(wire) {
        total += match (number, &field) {
            (_, Field::Group) => group(counts),
            (4, _) => parameter(&field, counts),
            (5, Field::Bytes(b)) => {
                counts.inputs += 1;
                size_of::<InferInputTensor>() + input(b, counts)
            }
            (6, Field::Bytes(b)) => {
                counts.outputs += 1;
                size_of::<InferRequestedOutputTensor>() + output(b, counts)
            }
            (7, _) => {
                counts.raw += 1;
                size_of::<prost::bytes::Bytes>() + heap(&field)
            }
            _ => heap(&field),
        };
    }
    total
}

fn input(wire: &[u8], counts: &mut Counts) -> usize {
    fields(wire)
        .map(|(number, field)| match (number, &field) {
            (_, Field::Group) => group(counts),
            (3, _) => numbers(&field, 8, true),
            (4, _) => parameter(&field, counts),
            (5, Field::Bytes(b)) => contents(b, counts),
            _ => heap(&field),
        })
        .sum()
}

fn output(wire: &[u8], counts: &mut Counts) -> usize {
    fields(wire)
        .map(|(number, field)| if number == 2 { parameter(&field, counts) } else { heap(&field) })
        .sum()
}

fn contents(wire: &[u8], counts: &mut Counts) -> usize {
    // The contents' own struct is held inline in its input, counted there.
    fields(wire)
        .map(|(number, field)| match number {
            _ if matches!(field, Field::Group) => group(counts),
            1 => numbers(&field, 1, true),
            2 | 4 => numbers(&field, 4, true),
            3 | 5 => numbers(&field, 8, true),
            6 => numbers(&field, 4, false),
            7 => numbers(&field, 8, false),
            8 => {
                counts.bytes += 1;
                size_of::<Vec<u8>>() + heap(&field)
            }
            _ => heap(&field),
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::inference::InferTensorContents;

    fn tensor(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    /// Requests of tensor data pass, however large: typed numbers (the eightfold varints
    /// included), raw contents, strings.
    #[test]
    fn requests_of_tensor_data_pass() {
        let ids = InferTensorContents { int64_contents: vec![1; 100_000], ..Default::default() };
        let texts = InferTensorContents {
            bytes_contents: vec![b"a short text".to_vec(); 10_000],
            ..Default::default()
        };
        let floats = InferTensorContents { fp32_contents: vec![0.5; 100_000], ..Default::default() };
        let request = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![
                tensor("ids", "INT64", vec![1, 100_000], Some(ids)),
                tensor("texts", "BYTES", vec![10_000], Some(texts)),
                tensor("x", "FP32", vec![100_000], Some(floats)),
                tensor("raw", "FP32", vec![1, 4], None),
            ],
            raw_input_contents: vec![vec![0u8; 16].into()],
            ..Default::default()
        };
        check_infer_request(&request.encode_to_vec()).unwrap();
        check_infer_request(&ModelInferRequest::default().encode_to_vec()).unwrap();
    }

    /// A length-delimited field: `tag`, then `payload`'s length and bytes.
    fn delimited(tag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let mut len = payload.len();
        while len >= 0x80 {
            out.push((len as u8 & 0x7f) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
        out.extend_from_slice(payload);
        out
    }

    /// Mostly empty repeated entries are refused before prost builds them, naming what they are.
    #[test]
    fn mostly_empty_entries_are_refused() {
        let empties = [
            (vec![0x2a, 0x00], 1_000_000, "1000000 `inputs`"),
            (vec![0x32, 0x00], 1_000_000, "1000000 `outputs`"),
            (vec![0x3a, 0x00], 4_000_000, "4000000 `raw_input_contents`"),
            (vec![0x22, 0x00], 1_000_000, "1000000 parameter entries"),
        ];
        for (entry, n, named) in empties {
            let wire = entry.repeat(n);
            let e = check_infer_request(&wire).unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{named}");
            assert!(e.message().contains(named), "{named}: {}", e.message());
        }
        // Empty `bytes_contents` elements inside one input: 24-byte `Vec`s for two bytes each.
        let contents = delimited(0x2a, &[0x42, 0x00].repeat(4_000_000));
        let e = check_infer_request(&delimited(0x2a, &contents)).unwrap_err();
        assert!(e.message().contains("4000000 `bytes_contents`"), "{}", e.message());
    }

    /// A group, which prost skips in a field it does not know (and decodes on after it), ends the
    /// walk: the message is refused, wherever the group is, rather than counted only up to it.
    #[test]
    fn a_group_is_refused_wherever_it_is() {
        let mut hidden = vec![0x7b, 0x7c]; // an empty group in field 15
        hidden.extend([0x2a, 0x00].repeat(1_000_000));
        let e = check_infer_request(&hidden).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("group"), "{}", e.message());
        // Inside an input, before its contents.
        let input = [0x7b, 0x7c, 0x2a, 0x00];
        let mut nested = vec![0x2a, input.len() as u8];
        nested.extend(input);
        assert!(check_infer_request(&nested).is_err());
    }

    /// Many small inputs, one value each (a model with a feature per input), pass.
    #[test]
    fn many_small_inputs_pass() {
        let request = ModelInferRequest {
            inputs: (0..10_000).map(|i| tensor(&format!("f{i}"), "FP32", vec![1, 1], None)).collect(),
            raw_input_contents: vec![vec![0u8; 4].into(); 10_000],
            ..Default::default()
        };
        check_infer_request(&request.encode_to_vec()).unwrap();
    }

    /// A message that does not parse is left to prost, which names its own error.
    #[test]
    fn a_malformed_message_is_left_to_prost() {
        for wire in [&[0x2a, 0x05, 0x00][..], &[0xff; 11], &[0x2a]] {
            check_infer_request(wire).unwrap();
            assert!(ModelInferRequest::decode(wire).is_err());
        }
    }
}
