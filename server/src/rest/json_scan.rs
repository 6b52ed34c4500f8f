//! One pass over the common infer request: `id`, `inputs` of `name`, `shape`, `datatype` and
//! numeric `data` (flat or nested, after its `datatype`; `NaN`, `Infinity` and `-Infinity` in
//! floating-point data, as Triton reads them), and `outputs` by name with at most the
//! `binary_data` parameter (as tritonclient sends them), with no escapes in strings. The data goes straight from the JSON text into the tensor's bytes
//! (each number read as a correctly rounded f64 by std's parser, then converted to the
//! datatype as serde's reader converts it: the same bytes); serde's reader walks `data` twice,
//! once to find its end and once to convert it.
//!
//! Anything else gives `None`, and serde's reader ([`super::json`]) reads the body instead:
//! other `parameters`, BOOL or BYTES data, escapes, unknown or repeated keys, `data` before its
//! `datatype`, and every malformed or out-of-range value. So this reader never rejects a
//! request: serde's accepts every valid one and words every error.

use std::borrow::Cow;

use sluice_deployments::DataType;

use super::json::{
    InputData, JsonInput, JsonRequest, JsonRequestedOutput, NON_FINITE, Params, push_float_as,
    push_non_finite,
};

/// Nesting deeper than this in `data` is left to serde's reader.
const MAX_DEPTH: usize = 32;

/// The request in `body`, when it has the common form (see the module's comment).
pub fn read(body: &[u8]) -> Option<JsonRequest<'_>> {
    // Checked once here, so that strings and numbers are slices of it (ASCII delimiters are
    // character boundaries).
    let text = std::str::from_utf8(body).ok()?;
    let mut r = Reader { text, b: body, at: 0 };
    let request = r.request()?;
    r.ws();
    (r.at == body.len()).then_some(request)
}

struct Reader<'a> {
    text: &'a str,
    /// `text`'s bytes.
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, without taking it.
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.at).copied()
    }

    /// The next byte after whitespace.
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.at += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let len = self.b[start..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        self.at = start + len;
        if self.b[self.at] != b'"' {
            return None;
        }
        self.at += 1;
        self.text.get(start..start + len)
    }

    /// An array, `item` reading each element.
    fn elements(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            match self.next()? {
                b',' => {}
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// An object, `member` reading the value of each key.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            member(self, key)?;
            match self.next()? {
                b',' => {}
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    fn request(&mut self) -> Option<JsonRequest<'a>> {
        let (mut id, mut inputs, mut outputs) = (None, None, None);
        self.members(|r, key| {
            match key {
                "id" if id.is_none() => id = Some(r.string()?.to_string()),
                "inputs" if inputs.is_none() => {
                    let mut list = Vec::new();
                    r.elements(|r| {
                        list.push(r.input()?);
                        Some(())
                    })?;
                    inputs = Some(list);
                }
                "outputs" if outputs.is_none() => {
                    let mut list = Vec::new();
                    r.elements(|r| {
                        list.push(r.output()?);
                        Some(())
                    })?;
                    outputs = Some(list);
                }
                _ => return None,
            }
            Some(())
        })?;
        Some(JsonRequest { id, parameters: None, inputs: inputs?, outputs })
    }

    /// A requested output: its name, and the one parameter tritonclient sends with each,
    /// `binary_data` (a boolean).
    fn output(&mut self) -> Option<JsonRequestedOutput> {
        let (mut name, mut parameters) = (None, None);
        self.members(|r, key| {
            match key {
                "name" if name.is_none() => name = Some(r.string()?.to_string()),
                "parameters" if parameters.is_none() => {
                    let mut binary = None;
                    r.members(|r, key| match key {
                        "binary_data" if binary.is_none() => {
                            binary = Some(r.boolean()?);
                            Some(())
                        }
                        _ => None,
                    })?;
                    let params = Params::default();
                    parameters = Some(if let Some(b) = binary {
                        params.with("binary_data", if b { "true" } else { "false" })
                    } else {
                        params
                    });
                }
                _ => return None,
            }
            Some(())
        })?;
        Some(JsonRequestedOutput { name: name?, parameters })
    }

    /// `true` or `false`.
    fn boolean(&mut self) -> Option<bool> {
        self.ws();
        let rest = &self.b[self.at..];
        let (v, len) = if rest.starts_with(b"true") {
            (true, 4)
        } else if rest.starts_with(b"false") {
            (false, 5)
        } else {
            return None;
        };
        self.at += len;
        Some(v)
    }

    fn input(&mut self) -> Option<JsonInput<'a>> {
        let (mut name, mut shape, mut datatype, mut data) = (None, None, None, None);
        self.members(|r, key| {
            match key {
                "name" if name.is_none() => name = Some(r.string()?),
                "shape" if shape.is_none() => {
                    let mut dims = Vec::new();
                    r.elements(|r| {
                        dims.push(r.dimension()?);
                        Some(())
                    })?;
                    shape = Some(dims);
                }
                "datatype" if datatype.is_none() => datatype = Some(r.string()?),
                "data" if data.is_none() => {
                    let dtype = DataType::parse(datatype?)?;
                    // Sized from the shape when it came first, never beyond what the text
                    // can hold (each element takes at least two bytes but the last).
                    let elements = shape.as_deref().map_or(Some(0), element_count)?;
                    let room = (r.b.len() - r.at) / 2 + 1;
                    let mut bytes = Vec::with_capacity(elements.min(room) * dtype.byte_size()?);
                    let mut count = 0;
                    r.nested(dtype, &mut bytes, &mut count, 0)?;
                    // Data short of (or beyond) the shape that sized `bytes`: left to serde's
                    // reader, which names the mismatch, and the reservation freed now. Kept
                    // until the whole body was read, many such inputs added up to terabytes.
                    if shape.is_some() && count != elements {
                        return None;
                    }
                    data = Some(InputData::Decoded { bytes, count });
                }
                _ => return None,
            }
            Some(())
        })?;
        Some(JsonInput {
            name: name?.to_string(),
            shape: shape?,
            datatype: Cow::Borrowed(datatype?),
            parameters: None,
            data: Some(data?),
        })
    }

    /// A shape's dimension: an unsigned integer that fits 64 bits.
    fn dimension(&mut self) -> Option<u64> {
        self.ws();
        let (text, integer) = self.number()?;
        if !integer || text.starts_with('-') {
            return None;
        }
        text.parse().ok()
    }

    /// A `data` array, flat or nested: each number converted to `dtype` and appended to `out`.
    fn nested(&mut self, dtype: DataType, out: &mut Vec<u8>, count: &mut usize, depth: usize) -> Option<()> {
        if depth == MAX_DEPTH {
            return None;
        }
        self.elements(|r| {
            if r.peek()? == b'[' {
                r.nested(dtype, out, count, depth + 1)
            } else {
                r.element(dtype, out)?;
                *count += 1;
                Some(())
            }
        })
    }

    fn element(&mut self, dtype: DataType, out: &mut Vec<u8>) -> Option<()> {
        let Some((text, integer)) = self.number() else { return self.non_finite(dtype, out) };
        macro_rules! int {
            ($t:ty) => {{
                // serde_json reads `-0` as the float -0.0, which no integer type takes.
                if !integer || text.starts_with("-0") {
                    return None;
                }
                let v: i128 = text.parse().ok()?;
                out.extend_from_slice(&<$t>::try_from(v).ok()?.to_le_bytes())
            }};
        }
        match dtype {
            DataType::Fp32 | DataType::Fp64 | DataType::Fp16 | DataType::Bf16 => {
                // std's parse rounds correctly, as serde_json's (float_roundtrip) does; the
                // conversion to `dtype` is serde's reader's own. Infinities are its to word.
                return push_float_as(dtype, text.parse().ok()?, out)?.then_some(());
            }
            DataType::Uint8 => int!(u8),
            DataType::Uint16 => int!(u16),
            DataType::Uint32 => int!(u32),
            DataType::Uint64 => int!(u64),
            DataType::Int8 => int!(i8),
            DataType::Int16 => int!(i16),
            DataType::Int32 => int!(i32),
            DataType::Int64 => int!(i64),
            DataType::Bool | DataType::Bytes => return None,
        }
        Some(())
    }

    /// `NaN`, `Infinity` or `-Infinity` (not JSON, but what Triton reads and writes for a
    /// floating-point value that is no number, and what tritonclient's JSON sends) as an element
    /// of a floating-point `dtype`.
    fn non_finite(&mut self, dtype: DataType, out: &mut Vec<u8>) -> Option<()> {
        let rest = &self.b[self.at..];
        let (word, v) = NON_FINITE.iter().find(|(w, _)| rest.starts_with(w.as_bytes()))?;
        push_non_finite(dtype, *v, out)?;
        self.at += word.len();
        Some(())
    }

    /// A JSON number's text (after whitespace), and whether it is an integer (no fraction, no
    /// exponent). Leading zeros are left for the caller: `01` reads as `0`, then `1` follows.
    fn number(&mut self) -> Option<(&'a str, bool)> {
        self.ws();
        let b = self.b;
        let start = self.at;
        let mut i = start;
        let digits = |i: &mut usize| {
            let run = digit_run(&b[*i..]);
            *i += run;
            run > 0
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return None,
        }
        let mut integer = true;
        if b.get(i) == Some(&b'.') {
            i += 1;
            integer = false;
            if !digits(&mut i) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = b.get(i) {
            i += 1;
            integer = false;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if !digits(&mut i) {
                return None;
            }
        }
        self.at = i;
        Some((self.text.get(start..i)?, integer))
    }
}

/// How many ASCII digits `b` starts with, eight bytes at a time: a byte is a digit when its
/// high nibble is 3 and adding 6 leaves it so. (A carry out of a byte from adding 6 reaches
/// only later bytes, which a non-digit before them already ends the run at.)
fn digit_run(b: &[u8]) -> usize {
    const HIGH: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    let mut n = 0;
    while let Some(&eight) = b.get(n..).and_then(|rest| rest.first_chunk::<8>()) {
        let x = u64::from_le_bytes(eight);
        let not_digits = ((x & HIGH) ^ THREES) | ((x.wrapping_add(0x0606_0606_0606_0606) & HIGH) ^ THREES);
        if not_digits != 0 {
            return n + not_digits.trailing_zeros() as usize / 8;
        }
        n += 8;
    }
    n + b[n..].iter().take_while(|c| c.is_ascii_digit()).count()
}

/// Elements in `shape`, `None` when it overflows.
fn element_count(shape: &[u64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))
}

#[cfg(test)]
mod tests {
    use sluice_deployments::Tensor;

    use super::super::json::{decode_data, decoded, input_header};
    use super::*;

    /// A request as both readers see it: id, output names, and each input's name and tensor.
    #[derive(Debug)]
    struct Read {
        id: Option<String>,
        outputs: Option<Vec<String>>,
        inputs: Vec<(String, Tensor)>,
    }

    fn materialize(parsed: JsonRequest<'_>) -> Result<Read, String> {
        let mut inputs = Vec::new();
        for input in parsed.inputs {
            let (dtype, shape) = input_header(&input).map_err(|e| e.message)?;
            let tensor = match input.data {
                Some(InputData::Raw(raw)) => {
                    decode_data(&input.name, dtype, shape, raw).map_err(|e| e.message)?.tensor
                }
                Some(InputData::Decoded { bytes, count }) => {
                    decoded(&input.name, dtype, shape, bytes, count).map_err(|e| e.message)?
                }
                None => return Err("no data".into()),
            };
            inputs.push((input.name, tensor));
        }
        let outputs = parsed.outputs.map(|o| o.into_iter().map(|o| o.name).collect());
        Ok(Read { id: parsed.id, outputs, inputs })
    }

    /// Whether two readings are the same request, byte for byte.
    fn same(a: &Read, b: &Read) -> bool {
        a.id == b.id
            && a.outputs == b.outputs
            && a.inputs.len() == b.inputs.len()
            && a.inputs.iter().zip(&b.inputs).all(|((an, at), (bn, bt))| {
                an == bn && at.dtype() == bt.dtype() && at.shape() == bt.shape() && at.data() == bt.data()
            })
    }

    /// Both readers on one body: when this one reads it, serde's reads it too, and the checks
    /// after give the same request or the same error.
    fn agree(body: &str) -> bool {
        let Some(fast) = read(body.as_bytes()) else { return false };
        let slow = serde_json::from_slice(body.as_bytes())
            .unwrap_or_else(|e| panic!("serde rejects what was read: {e}\n{body}"));
        match (materialize(fast), materialize(slow)) {
            (Ok(fast), Ok(slow)) => assert!(same(&fast, &slow), "{body}\nscan: {fast:?}\nserde: {slow:?}"),
            (Err(fast), Err(slow)) => assert_eq!(fast, slow, "{body}"),
            (fast, slow) => panic!("{body}\nscan: {fast:?}\nserde: {slow:?}"),
        }
        true
    }

    #[test]
    fn the_common_request_is_read_in_one_pass() {
        let body = r#" {"id": "7", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32",
            "data": [[1, -2.5], [3e2, 0.1]]}, {"name": "n", "shape": [1], "datatype": "INT64", "data": [-9223372036854775808]}],
            "outputs": [{"name": "y"}]} "#;
        assert!(agree(body));
        let read = materialize(read(body.as_bytes()).unwrap()).unwrap();
        let floats: Vec<f32> =
            read.inputs[0].1.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(floats, [1.0, -2.5, 300.0, 0.1]);
        assert_eq!(read.inputs[1].1.data()[..], i64::MIN.to_le_bytes());
        assert_eq!((read.id.as_deref(), read.outputs), (Some("7"), Some(vec!["y".to_string()])));
        for dtype in ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "FP16", "BF16", "FP64"]
        {
            assert!(
                agree(&format!(
                    r#"{{"inputs":[{{"name":"a","shape":[3],"datatype":"{dtype}","data":[0,1,[2]]}}]}}"#
                )),
                "{dtype}"
            );
        }
    }

    /// tritonclient's requests name each output with its `binary_data` parameter: read here,
    /// with the parameter as serde's reader gives it (they went to serde's reader, which
    /// refuses the `NaN` tritonclient writes in JSON data).
    #[test]
    fn outputs_with_binary_data_are_read_in_one_pass() {
        let body = r#"{"id":"x","inputs":[{"name":"in_FP32","shape":[2],"datatype":"FP32","data":[1.5,2]}],
            "outputs":[{"name":"a","parameters":{"binary_data":false}},{"name":"b","parameters":{"binary_data":true}},{"name":"c","parameters":{}}]}"#;
        assert!(agree(body));
        let fast = read(body.as_bytes()).unwrap().outputs.unwrap();
        let slow = serde_json::from_str::<JsonRequest<'_>>(body).unwrap().outputs.unwrap();
        let params = |o: &[JsonRequestedOutput]| {
            o.iter()
                .map(|o| {
                    o.parameters
                        .as_ref()
                        .map(|p| p.kept().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(params(&fast), params(&slow));
    }

    #[test]
    fn data_that_does_not_fill_its_shape_is_left_to_serde_at_once() {
        // Each input's buffer is sized from its shape before its data is read; one whose data
        // falls short is given up on as soon as it is read, not kept while the rest is read.
        let short = r#"{"name":"x","shape":[99999999],"datatype":"FP64","data":[]}"#;
        let body = format!(r#"{{"inputs":[{}]}}"#, vec![short; 1000].join(","));
        assert!(read(body.as_bytes()).is_none());
        let slow: JsonRequest<'_> = serde_json::from_slice(body.as_bytes()).unwrap();
        let e = materialize(slow).unwrap_err();
        assert!(e.contains("has shape [99999999] (99999999 elements) but its data has 0 elements"), "{e}");
        // Data that fills its shape, or a shape given after the data, is still read here.
        assert!(agree(r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP64","data":[1,2]}]}"#));
        assert!(agree(r#"{"inputs":[{"name":"x","datatype":"FP64","data":[1,2],"shape":[2]}]}"#));
        assert!(!agree(r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP64","data":[1,2]}]}"#));
    }

    #[test]
    fn anything_else_is_left_to_serde() {
        let input = |fields: &str| format!(r#"{{"inputs": [{{"name": "x", {fields}}}]}}"#);
        let left = [
            input(r#""shape": [1], "datatype": "FP32", "data": [1], "parameters": {}"#),
            input(r#""data": [1], "shape": [1], "datatype": "FP32""#),
            input(r#""shape": [1], "datatype": "BOOL", "data": [true]"#),
            input(r#""shape": [1], "datatype": "BYTES", "data": ["a"]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [1], "data": [2]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": 1"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [1e400]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [1e39]"#),
            input(r#""shape": [1], "datatype": "UINT8", "data": [256]"#),
            input(r#""shape": [1], "datatype": "INT8", "data": [1.0]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [01]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [.5]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [1.]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [+1]"#),
            input(r#""shape": [1], "datatype": "INT32", "data": [NaN]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [Nan]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [-NaN]"#),
            input(r#""shape": [1], "datatype": "FP32", "data": [1,]"#),
            input(r#""shape": [-1], "datatype": "FP32", "data": [1]"#),
            input(r#""shape": [1.0], "datatype": "FP32", "data": [1]"#),
            input(r#""shape": [18446744073709551616], "datatype": "FP32", "data": [1]"#),
            input(r#""shape": [1], "datatype": "FP33", "data": [1]"#),
            input(r#""shape": [1], "datatype": "FP32""#),
            input(r#""shape": [1], "datatype": "FP32", "data": [1], "extra": 0"#),
            input(r#""shape": [1], "datatype": "FP\u0033", "data": [1]"#),
            format!("{}x", input(r#""shape": [1], "datatype": "FP32", "data": [1]"#)),
            format!(
                r#"{{"inputs": [{{"name": "x", "shape": [1], "datatype": "FP32", "data": {}1{}}}]}}"#,
                "[".repeat(40),
                "]".repeat(40)
            ),
            r#"{"inputs": [], "parameters": {"binary_data_output": true}}"#.to_string(),
            r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}"#.to_string(),
            r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"other": true}}]}"#.to_string(),
            r#"{"inputs": [], "outputs": [{"name": "y", "parameters": {"binary_data": true, "binary_data": true}}]}"#
                .to_string(),
            r#"{"id": null, "inputs": []}"#.to_string(),
            r#"{"outputs": []}"#.to_string(),
            "{\"inputs\": [{\"name\": \"a\tb\", \"shape\": [1], \"datatype\": \"FP32\", \"data\": [1]}]}"
                .to_string(),
        ];
        for body in &left {
            assert!(read(body.as_bytes()).is_none(), "{body}");
        }
        assert!(
            read(br#"{"inputs": [{"name": "\xff", "shape": [1], "datatype": "FP32", "data": [1]}]}"#)
                .is_none()
        );
    }

    /// `NaN`, `Infinity` and `-Infinity`, as Triton reads them and tritonclient's JSON sends
    /// them, in a floating-point input's data (they were refused as malformed JSON).
    #[test]
    fn nan_and_infinities_are_read_as_triton_reads_them() {
        for (dtype, size) in [("FP32", 4), ("FP64", 8), ("FP16", 2), ("BF16", 2)] {
            let body = format!(
                r#"{{"inputs": [{{"name": "x", "shape": [4], "datatype": "{dtype}", "data": [NaN, Infinity, -Infinity, 1]}}]}}"#
            );
            let r = materialize(read(body.as_bytes()).expect(dtype)).unwrap();
            let data = r.inputs[0].1.data();
            assert_eq!(data.len(), 4 * size, "{dtype}");
            let f = |i: usize| -> f64 {
                let b = &data[i * size..(i + 1) * size];
                match dtype {
                    "FP32" => f32::from_le_bytes(b.try_into().unwrap()).into(),
                    "FP64" => f64::from_le_bytes(b.try_into().unwrap()),
                    "FP16" => half::f16::from_le_bytes(b.try_into().unwrap()).into(),
                    _ => half::bf16::from_le_bytes(b.try_into().unwrap()).into(),
                }
            };
            assert!(
                f(0).is_nan() && f(1) == f64::INFINITY && f(2) == f64::NEG_INFINITY && f(3) == 1.0,
                "{dtype}"
            );
        }
    }

    /// Numbers whose f64 is hard to round, or rounds to the edge of a datatype: both readers
    /// give the same bytes, or the same error, whichever reads the request.
    #[test]
    fn edge_numbers_read_the_same_either_way() {
        let cases = [
            ("FP64", "1.7976931348623158e308"),
            ("FP64", "-1.797693134862315708e308"),
            ("FP64", "7.3e-24"),
            ("FP64", "4.75e30"),
            ("FP64", "-14335269121867723682E+29"),
            ("FP64", "2.4703282292062328e-324"),
            ("FP32", "3.4028235677973366e38"),
            ("FP32", "3.4028235e38"),
            ("FP32", "1e39"),
            ("FP32", "1152921573326323713"),
            ("FP32", "1.00000005960464477539062500001"),
            ("FP32", "1e-46"),
            ("FP16", "1.7976931348623158e308"),
            ("FP16", "65504"),
            ("FP16", "65520"),
            ("FP16", "70000"),
            ("BF16", "3.4e38"),
            ("BF16", "3.5e38"),
        ];
        for (dtype, n) in cases {
            let fields = format!(r#""name": "x", "shape": [1], "datatype": "{dtype}", "data": [{n}]"#);
            let common = format!(r#"{{"inputs": [{{{fields}}}]}}"#);
            // Parameters send the same input to serde's reader.
            let other = format!(r#"{{"inputs": [{{{fields}, "parameters": {{}}}}]}}"#);
            assert!(read(other.as_bytes()).is_none());
            let serde =
                |body: &str| materialize(serde_json::from_slice(body.as_bytes()).map_err(|e| e.to_string())?);
            let (a, b) = (serde(&common), serde(&other));
            match (&a, &b) {
                (Ok(a), Ok(b)) => assert!(same(a, b), "{dtype} {n}: {a:?} {b:?}"),
                (Err(a), Err(b)) => assert!(a.contains("out of range") && b.contains("out of range"), "{a}"),
                _ => panic!("{dtype} {n}: {a:?} {b:?}"),
            }
            let scanned = read(common.as_bytes()).map(|r| materialize(r).unwrap());
            match (scanned, a) {
                (Some(fast), Ok(slow)) => assert!(same(&fast, &slow), "{dtype} {n}: {fast:?} {slow:?}"),
                (None, Err(_)) => {}
                (fast, slow) => panic!("{dtype} {n}: {fast:?} {slow:?}"),
            }
        }
    }

    /// xorshift64*: a fixed sequence, so a failure is reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'s>(&mut self, items: &[&'s str]) -> &'s str {
            items[self.below(items.len())]
        }
    }

    fn number(rng: &mut Rng) -> String {
        let digits = |rng: &mut Rng, n: usize| {
            (0..n).map(|_| char::from(b'0' + rng.below(10) as u8)).collect::<String>()
        };
        let sign = rng.pick(&["", "", "-"]);
        let int = match rng.below(4) {
            0 => "0".to_string(),
            1 => format!("{}", 1 + rng.below(300)),
            2 => {
                let (first, more) = (1 + rng.below(9), rng.below(20));
                format!("{first}{}", digits(rng, more))
            }
            _ => format!("{}", rng.next()),
        };
        let frac = match rng.below(3) {
            0 => String::new(),
            _ => {
                let n = 1 + rng.below(18);
                format!(".{}", digits(rng, n))
            }
        };
        let exp = match rng.below(5) {
            0 => format!("{}{}{}", rng.pick(&["e", "E"]), rng.pick(&["", "+", "-"]), rng.below(45)),
            // Around the largest and smallest f64s.
            1 if rng.below(4) == 0 => format!("e{}{}", rng.pick(&["", "-"]), 290 + rng.below(40)),
            _ => String::new(),
        };
        format!("{sign}{int}{frac}{exp}")
    }

    fn body(rng: &mut Rng) -> String {
        let ws = |rng: &mut Rng| rng.pick(&["", "", " ", "\n  ", "\t"]).to_string();
        let dtypes = ["FP32", "FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "UINT64"];
        let mut inputs = Vec::new();
        for i in 0..1 + rng.below(3) {
            let n = rng.below(6);
            let rows = 1 + rng.below(2);
            let elements = (0..n * rows).map(|_| number(rng)).collect::<Vec<_>>();
            let data = if rows == 2 && n > 0 {
                format!(
                    "[[{}],{}[{}]]",
                    elements[..n].join(","),
                    ws(rng),
                    elements[n..].join(&format!(",{}", ws(rng)))
                )
            } else {
                format!("[{}]", elements.join(&format!(",{}", ws(rng))))
            };
            let mut fields = vec![
                format!(r#""name":{}"in{i}""#, ws(rng)),
                format!(
                    r#""shape":[{}]"#,
                    if rows == 2 { format!("2,{}{n}", ws(rng)) } else { format!("{n}") }
                ),
                format!(r#""datatype":"{}""#, rng.pick(&dtypes)),
            ];
            if rng.below(4) == 0 {
                fields.swap(0, 1);
            }
            fields.push(format!(r#""data":{}{data}"#, ws(rng)));
            inputs.push(format!("{{{}}}", fields.join(&format!(",{}", ws(rng)))));
        }
        let mut top = vec![format!(r#""inputs":[{}]"#, inputs.join(","))];
        if rng.below(2) == 0 {
            top.insert(0, format!(r#""id":"{}""#, rng.next()));
        }
        if rng.below(3) == 0 {
            top.push(r#""outputs":[{"name":"y"},{ "name" : "z" }]"#.to_string());
        }
        format!("{}{{{}}}{}", ws(rng), top.join(&format!(",{}", ws(rng))), ws(rng))
    }

    /// Random requests, and each mangled a little: whatever this reader reads, serde's reads the
    /// same; whatever serde's rejects, this one leaves alone.
    #[test]
    fn both_readers_agree_on_random_requests() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let (mut read_fast, mut mangled_read) = (0, 0);
        for _ in 0..20_000 {
            let body = body(&mut rng);
            if agree(&body) {
                read_fast += 1;
            }
            let mut bytes = body.into_bytes();
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, b"[]{},:\"-.e0x \\"[rng.below(14)]),
                _ => bytes[at] = b"[]{},:\"-.e19 "[rng.below(13)],
            }
            let Ok(mangled) = String::from_utf8(bytes) else { continue };
            if agree(&mangled) {
                mangled_read += 1;
            }
        }
        // About a quarter of the generated requests are this reader's (integers with fractions, out of
        // range, ... are not), and some mangled ones stay valid.
        assert!(read_fast > 4_000, "{read_fast}");
        assert!(mangled_read > 100, "{mangled_read}");
    }

    /// Runs of digits counted eight bytes at a time end where a byte-at-a-time count ends them,
    /// whatever byte ends them and wherever it falls.
    #[test]
    fn digit_runs_end_at_the_first_other_byte() {
        let slow = |b: &[u8]| b.iter().take_while(|c| c.is_ascii_digit()).count();
        for len in 0..20 {
            for end in [b'/', b':', b'.', b'e', b' ', 0x00, 0x7f, 0xf9, 0xfa, 0xff] {
                for tail in [&b""[..], b"9", b"12345678901234567"] {
                    let mut b: Vec<u8> = (0..len).map(|i| b'0' + (i * 7 % 10) as u8).collect();
                    b.push(end);
                    b.extend_from_slice(tail);
                    assert_eq!(digit_run(&b), slow(&b), "{b:?}");
                    assert_eq!(digit_run(&b[..len]), len);
                }
            }
        }
    }
}
