//! Turning a batch of requests into one model call and back: inputs are concatenated along
//! dimension 0 (padded first where the deployment names a pad value), and outputs are cut back
//! into each request's rows; zero-copy slices of the output buffer where no padding was done.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::batch::{BatchPolicy, BatchState, Job, Taken};
use crate::{DataType, InferError, NamedTensor, Tensor, element_count};

/// A model as the batching path calls it: inputs, and the outputs wanted, in order.
pub type ModelCall<'a> = dyn FnMut(Vec<NamedTensor>, &[String]) -> Result<Vec<NamedTensor>, InferError> + 'a;

/// One batch through `model`: a lone request's tensors go as they are; several are merged
/// (padded per `pad`), run once, and the outputs cut back per job, in each job's order. (The
/// replica's `infer_batch` makes the same calls, timing each stage.)
fn run_batch_through(
    pad: &HashMap<String, f64>,
    model_outputs: &[String],
    model: &mut ModelCall<'_>,
    batch: &mut [Job],
) -> Result<Vec<Vec<NamedTensor>>, InferError> {
    if let [job] = batch {
        // One request: its tensors go to the model as they are.
        let inputs = std::mem::take(&mut job.inputs);
        return Ok(vec![model(inputs, &job.outputs)?]);
    }
    let merged = merge(batch, pad)?;
    let dims = padded_dims(batch, &merged, pad);
    let outputs = union_outputs(batch, model_outputs);
    let results = model(merged, &outputs)?;
    split(&results, batch, &dims, &|_, _| true)
}

/// Runs `requests` (each one's inputs, already checked with [`crate::check_request`] and in
/// model input order) through a replica's batching path without a replica: queued, taken in
/// batches by the policy's rules (compatible shapes, `max_batch_size`, padding budget), merged,
/// passed to `model` once per batch, and cut back. Returns each request's outputs (all of
/// `model_outputs`), in request order. Public so that the batching path can be fuzzed.
pub fn run_batched(
    policy: &BatchPolicy,
    requests: Vec<Vec<NamedTensor>>,
    model_outputs: &[String],
    model: &mut ModelCall<'_>,
) -> Vec<Result<Vec<NamedTensor>, InferError>> {
    let now = Instant::now();
    let model_outputs: std::sync::Arc<[String]> = model_outputs.into();
    let mut state = BatchState::new(policy.clone());
    let mut answers = Vec::with_capacity(requests.len());
    for inputs in requests {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let rows = match policy.max_batch_size {
            0 => 1,
            _ => inputs.first().and_then(|i| i.tensor.shape().first().copied()).unwrap_or(1),
        };
        let far = now + Duration::from_secs(3600);
        let span = tracing::Span::none();
        let job = Job {
            inputs,
            outputs: std::sync::Arc::clone(&model_outputs),
            rows,
            deadline: far,
            admitted: now,
            arrived: now,
            reply: crate::batch::Reply::new(reply),
            span,
            model: None,
            tried: None,
        };
        state.push(job);
        answers.push(answer);
    }
    // Past any batch wait: every take forms the largest batch it can.
    let later = now + policy.batch_wait_timeout + Duration::from_secs(1);
    while !state.is_empty() {
        let Taken { mut batch, .. } = state.take(later);
        if batch.is_empty() {
            break;
        }
        match run_batch_through(&policy.pad, &model_outputs, model, &mut batch) {
            Ok(per_job) => {
                for (job, outputs) in batch.into_iter().zip(per_job) {
                    let _ = job.reply.send(Ok(outputs));
                }
            }
            // As the replica does: a merged call's failure sends each request alone.
            Err(_) if batch.len() > 1 => {
                for mut job in batch {
                    let result =
                        run_batch_through(&policy.pad, &model_outputs, model, std::slice::from_mut(&mut job));
                    let _ = job.reply.send(result.map(|mut outputs| outputs.swap_remove(0)));
                }
            }
            Err(e) => {
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
    answers
        .into_iter()
        .map(|mut a| a.try_recv().unwrap_or_else(|_| Err(InferError::internal("request left unanswered"))))
        .collect()
}

/// Merged inputs for a batch of `jobs` (all with inputs in the same, model, order).
pub(crate) fn merge(jobs: &[Job], pad: &HashMap<String, f64>) -> Result<Vec<NamedTensor>, InferError> {
    let first = &jobs[0];
    let rows: usize = jobs.iter().map(|j| j.rows).sum();
    let mut merged = Vec::with_capacity(first.inputs.len());
    for (i, input) in first.inputs.iter().enumerate() {
        let dtype = input.tensor.dtype();
        let pad_value = pad.get(&input.name).filter(|_| dtype != DataType::Bytes);
        let mut shape = input.tensor.shape().to_vec();
        for job in &jobs[1..] {
            for (d, &n) in shape.iter_mut().zip(job.inputs[i].tensor.shape()).skip(1) {
                *d = (*d).max(n);
            }
        }
        shape[0] = rows;
        let data = match pad_value {
            Some(&value) if jobs.iter().any(|j| j.inputs[i].tensor.shape()[1..] != shape[1..]) => {
                let size = dtype.byte_size().unwrap_or(1);
                let mut out = pad_fill(dtype, value, element_count(&shape)?);
                let mut row = 0;
                for job in jobs {
                    let t = &job.inputs[i].tensor;
                    let mut slot_shape = shape.clone();
                    slot_shape[0] = t.shape()[0];
                    let slot_len = element_count(&slot_shape)? * size;
                    let start = row * (slot_len / t.shape()[0].max(1));
                    if t.shape()[0] > 0 {
                        copy_nd(t.data(), t.shape(), &mut out[start..start + slot_len], &slot_shape, size);
                    }
                    row += t.shape()[0];
                }
                Bytes::from(out)
            }
            _ => {
                let mut out = Vec::with_capacity(jobs.iter().map(|j| j.inputs[i].tensor.data().len()).sum());
                for job in jobs {
                    out.extend_from_slice(job.inputs[i].tensor.data());
                }
                Bytes::from(out)
            }
        };
        merged.push(NamedTensor { name: input.name.clone(), tensor: Tensor::new(dtype, shape, data)? });
    }
    Ok(merged)
}

/// The outputs any job of the batch asked for, in model order.
pub(crate) fn union_outputs(jobs: &[Job], model_outputs: &[String]) -> Vec<String> {
    model_outputs.iter().filter(|name| jobs.iter().any(|j| j.outputs.contains(name))).cloned().collect()
}

/// Cuts batch outputs back into each job's rows, in the order each job asked for its outputs.
/// Outputs whose dimensions match an input padded for the batch are cropped to the job's own
/// length along that dimension.
/// `crops(output, axis)`: whether that output axis is cut back to a request's own length where
/// the batch padded it ([`crate::Backend::crops_to_request`]).
pub(crate) fn split(
    outputs: &[NamedTensor],
    jobs: &[Job],
    padded_dims: &[Padded],
    crops: &dyn Fn(&str, usize) -> bool,
) -> Result<Vec<Vec<NamedTensor>>, InferError> {
    let rows: usize = jobs.iter().map(|j| j.rows).sum();
    let mut per_job: Vec<Vec<NamedTensor>> =
        jobs.iter().map(|j| Vec::with_capacity(j.outputs.len())).collect();
    for out in outputs {
        let t = &out.tensor;
        if t.shape().first() != Some(&rows) {
            return Err(InferError::internal(format!(
                "model returned output `{}` with shape {:?} for a batch of {rows} rows",
                out.name,
                t.shape()
            )));
        }
        let pieces = row_slices(t, jobs.iter().map(|j| j.rows))?;
        for (k, ((job, piece), dims)) in jobs.iter().zip(pieces).zip(padded_dims).enumerate() {
            if job.outputs.contains(&out.name) {
                let tensor = crop(piece, dims, |axis| crops(&out.name, axis))?;
                per_job[k].push(NamedTensor { name: out.name.clone(), tensor });
            }
        }
    }
    // Put each job's outputs in the order it asked for them.
    for (job, outs) in jobs.iter().zip(per_job.iter_mut()) {
        outs.sort_by_key(|o| job.outputs.iter().position(|n| n == &o.name));
    }
    Ok(per_job)
}

/// Zero-copy row ranges of `t` of the given row counts.
fn row_slices(t: &Tensor, rows: impl Iterator<Item = usize>) -> Result<Vec<Tensor>, InferError> {
    let per_row = element_count(&t.shape()[1..])?;
    let data = t.data();
    let mut out = Vec::new();
    let mut byte = 0;
    let mut elements = t.bytes_elements();
    for r in rows {
        let len = match t.dtype().byte_size() {
            Some(size) => r * per_row * size,
            None => (0..r * per_row).map(|_| elements.next().map_or(0, |e| e.len() + 4)).sum(),
        };
        let mut shape = t.shape().to_vec();
        shape[0] = r;
        out.push(Tensor::new(t.dtype(), shape, data.slice(byte..byte + len))?);
        byte += len;
    }
    Ok(out)
}

/// One job's padded lengths: for each axis, (the job's own length, the batch's length) of each
/// padded input on it.
pub(crate) type Padded = Vec<Vec<(usize, usize)>>;

/// Crops dimensions 1.. of a tensor back to a job's own lengths, on the axes where the tensor
/// has exactly a padded input's batch length and every padded input of that batch length agrees
/// on the job's own length (two inputs padded to one length from different own lengths: which
/// one the output follows cannot be told, and the axis is left whole).
fn crop(t: Tensor, dims: &Padded, crops: impl Fn(usize) -> bool) -> Result<Tensor, InferError> {
    let mut target = t.shape().to_vec();
    let mut changed = false;
    for (axis, pairs) in dims.iter().enumerate() {
        if axis == 0 || axis >= target.len() {
            continue;
        }
        let mut owns = pairs.iter().filter(|&&(_, padded)| padded == target[axis]).map(|&(own, _)| own);
        let Some(own) = owns.next() else { continue };
        // An own length of 0 is cropped to like any other (a request with an empty sequence
        // gets an empty output, not padding).
        if owns.all(|o| o == own) && own < target[axis] && crops(axis) {
            target[axis] = own;
            changed = true;
        }
    }
    if !changed {
        return Ok(t);
    }
    let Some(size) = t.dtype().byte_size() else { return crop_bytes(&t, target) };
    let mut out = vec![0u8; element_count(&target)? * size];
    copy_nd(t.data(), t.shape(), &mut out, &target, size);
    Tensor::new(t.dtype(), target, Bytes::from(out))
}

/// [`crop`] of a BYTES tensor: the elements inside `target`, in order (their sizes vary, so the
/// corner is found element by element).
fn crop_bytes(t: &Tensor, target: Vec<usize>) -> Result<Tensor, InferError> {
    let shape = t.shape();
    let mut index = vec![0usize; shape.len()];
    let mut out = Vec::new();
    for element in t.bytes_elements() {
        if index.iter().zip(&target).all(|(i, n)| i < n) {
            crate::push_bytes_element(&mut out, element)?;
        }
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            if index[k] < shape[k] {
                break;
            }
            index[k] = 0;
        }
    }
    Tensor::new(DataType::Bytes, target, Bytes::from(out))
}

/// The lengths to crop outputs back to, per job (see [`Padded`]).
pub(crate) fn padded_dims(jobs: &[Job], merged: &[NamedTensor], pad: &HashMap<String, f64>) -> Vec<Padded> {
    jobs.iter()
        .map(|job| {
            let mut dims: Padded = Vec::new();
            for (input, m) in job.inputs.iter().zip(merged) {
                if !pad.contains_key(&input.name) {
                    continue;
                }
                for (axis, (&own, &batch)) in
                    input.tensor.shape().iter().zip(m.tensor.shape()).enumerate().skip(1)
                {
                    if dims.len() <= axis {
                        dims.resize(axis + 1, Vec::new());
                    }
                    dims[axis].push((own, batch));
                }
            }
            dims
        })
        .collect()
}

/// A buffer of `count` elements all equal to `value` in `dtype`'s little-endian form.
fn pad_fill(dtype: DataType, value: f64, count: usize) -> Vec<u8> {
    let one: Vec<u8> = match dtype {
        DataType::Bool => vec![(value != 0.0) as u8],
        DataType::Uint8 => vec![value as u8],
        DataType::Uint16 => (value as u16).to_le_bytes().to_vec(),
        DataType::Uint32 => (value as u32).to_le_bytes().to_vec(),
        DataType::Uint64 => (value as u64).to_le_bytes().to_vec(),
        DataType::Int8 => (value as i8).to_le_bytes().to_vec(),
        DataType::Int16 => (value as i16).to_le_bytes().to_vec(),
        DataType::Int32 => (value as i32).to_le_bytes().to_vec(),
        DataType::Int64 => (value as i64).to_le_bytes().to_vec(),
        DataType::Fp16 => half::f16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Bf16 => half::bf16::from_f64(value).to_le_bytes().to_vec(),
        DataType::Fp32 => (value as f32).to_le_bytes().to_vec(),
        DataType::Fp64 => value.to_le_bytes().to_vec(),
        DataType::Bytes => vec![0, 0, 0, 0],
    };
    if one.iter().all(|&b| b == 0) {
        return vec![0u8; count * one.len()];
    }
    one.repeat(count)
}

/// Copies the overlapping corner of two row-major arrays of the same rank: every index that is
/// inside both shapes goes from `src` to `dst`.
fn copy_nd(src: &[u8], src_shape: &[usize], dst: &mut [u8], dst_shape: &[usize], size: usize) {
    let rank = src_shape.len();
    if rank == 0 {
        dst[..size].copy_from_slice(&src[..size]);
        return;
    }
    let overlap: Vec<usize> = src_shape.iter().zip(dst_shape).map(|(a, b)| *a.min(b)).collect();
    if overlap.contains(&0) {
        return;
    }
    let strides = |shape: &[usize]| {
        let mut s = vec![size; rank];
        for k in (0..rank - 1).rev() {
            s[k] = s[k + 1] * shape[k + 1];
        }
        s
    };
    let (ss, ds) = (strides(src_shape), strides(dst_shape));
    let inner = overlap[rank - 1] * size;
    let mut index = vec![0usize; rank.saturating_sub(1)];
    loop {
        let so: usize = index.iter().zip(&ss).map(|(i, s)| i * s).sum();
        let d_o: usize = index.iter().zip(&ds).map(|(i, s)| i * s).sum();
        dst[d_o..d_o + inner].copy_from_slice(&src[so..so + inner]);
        // Next index over the outer dimensions.
        let mut k = index.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            index[k] += 1;
            if index[k] < overlap[k] {
                break;
            }
            index[k] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::sync::oneshot;

    use super::*;

    fn i64s(v: &[i64]) -> Bytes {
        Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    fn to_i64s(t: &Tensor) -> Vec<i64> {
        t.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    fn job(shape: Vec<usize>, data: &[i64], outputs: &[&str]) -> Job {
        let (reply, rx) = oneshot::channel();
        std::mem::forget(rx);
        let now = Instant::now();
        Job {
            rows: shape[0],
            inputs: vec![NamedTensor {
                name: "ids".into(),
                tensor: Tensor::new(DataType::Int64, shape, i64s(data)).unwrap(),
            }],
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            deadline: now,
            admitted: now,
            arrived: now,
            reply: crate::batch::Reply::new(reply),
            span: tracing::Span::none(),
            model: None,
            tried: None,
        }
    }

    #[test]
    fn concatenates_and_splits_rows_exactly() {
        let jobs = vec![job(vec![1, 2], &[1, 2], &["y"]), job(vec![2, 2], &[3, 4, 5, 6], &["y"])];
        let merged = merge(&jobs, &HashMap::new()).unwrap();
        assert_eq!(merged[0].tensor.shape(), &[3, 2]);
        assert_eq!(to_i64s(&merged[0].tensor), vec![1, 2, 3, 4, 5, 6]);
        // An "identity model": the output is the input.
        let out = vec![NamedTensor { name: "y".into(), tensor: merged[0].tensor.clone() }];
        let dims = padded_dims(&jobs, &merged, &HashMap::new());
        let per_job = split(&out, &jobs, &dims, &|_, _| true).unwrap();
        assert_eq!(to_i64s(&per_job[0][0].tensor), vec![1, 2]);
        assert_eq!(per_job[1][0].tensor.shape(), &[2, 2]);
        assert_eq!(to_i64s(&per_job[1][0].tensor), vec![3, 4, 5, 6]);
        // Zero-copy: the pieces point into the batch output.
        assert_eq!(per_job[0][0].tensor.data().as_ptr(), out[0].tensor.data().as_ptr());
    }

    #[test]
    fn pads_to_the_longest_and_crops_outputs_back() {
        let mut pad = HashMap::new();
        pad.insert("ids".to_string(), -1.0);
        let jobs = vec![job(vec![1, 2], &[1, 2], &["y"]), job(vec![1, 3], &[3, 4, 5], &["y"])];
        let merged = merge(&jobs, &pad).unwrap();
        assert_eq!(merged[0].tensor.shape(), &[2, 3]);
        assert_eq!(to_i64s(&merged[0].tensor), vec![1, 2, -1, 3, 4, 5]);
        let out = vec![NamedTensor { name: "y".into(), tensor: merged[0].tensor.clone() }];
        let dims = padded_dims(&jobs, &merged, &pad);
        let per_job = split(&out, &jobs, &dims, &|_, _| true).unwrap();
        assert_eq!(per_job[0][0].tensor.shape(), &[1, 2]);
        assert_eq!(to_i64s(&per_job[0][0].tensor), vec![1, 2]);
        assert_eq!(to_i64s(&per_job[1][0].tensor), vec![3, 4, 5]);
    }

    /// Two inputs padded on the same axis to different lengths: each output is cut back by
    /// the input of its own length (the last padded input decided for all); padded to the same
    /// length from different own lengths, the axis is left whole rather than guessed.
    #[test]
    fn two_padded_inputs_crop_each_output_by_its_own() {
        let pad: HashMap<String, f64> = [("q".to_string(), 0.0), ("d".to_string(), 0.0)].into();
        let two = |q: usize, d: usize| {
            let mut j = job(vec![1, q], &vec![1; q], &["q_out", "d_out"]);
            j.inputs[0].name = "q".into();
            j.inputs.push(NamedTensor {
                name: "d".into(),
                tensor: Tensor::new(DataType::Int64, vec![1, d], i64s(&vec![2; d])).unwrap(),
            });
            j
        };
        let jobs = vec![two(3, 10), two(5, 20)];
        let merged = merge(&jobs, &pad).unwrap();
        let out = vec![
            NamedTensor { name: "q_out".into(), tensor: merged[0].tensor.clone() },
            NamedTensor { name: "d_out".into(), tensor: merged[1].tensor.clone() },
        ];
        let per_job = split(&out, &jobs, &padded_dims(&jobs, &merged, &pad), &|_, _| true).unwrap();
        assert_eq!(per_job[0][0].tensor.shape(), &[1, 3]);
        assert_eq!(per_job[0][1].tensor.shape(), &[1, 10]);
        assert_eq!(to_i64s(&per_job[0][1].tensor), vec![2; 10]);
        // Both padded to 5, from 3 and 4: an output of length 5 follows either.
        let jobs = vec![two(3, 4), two(5, 5)];
        let merged = merge(&jobs, &pad).unwrap();
        let out = vec![NamedTensor { name: "q_out".into(), tensor: merged[0].tensor.clone() }];
        let per_job = split(&out, &jobs, &padded_dims(&jobs, &merged, &pad), &|_, _| true).unwrap();
        assert_eq!(per_job[0][0].tensor.shape(), &[1, 5], "left whole");
    }

    /// A BYTES output along a padded axis is cut back too (it came back at the padded length,
    /// padding included).
    #[test]
    fn a_bytes_output_is_cropped_like_the_others() {
        let mut pad = HashMap::new();
        pad.insert("ids".to_string(), -1.0);
        let jobs = vec![job(vec![1, 1], &[1], &["labels"]), job(vec![1, 3], &[3, 4, 5], &["labels"])];
        let merged = merge(&jobs, &pad).unwrap();
        let mut text = Vec::new();
        for t in ["a", "pad", "pad", "bb", "c", "ddd"] {
            crate::push_bytes_element(&mut text, t.as_bytes()).unwrap();
        }
        let labels = Tensor::new(DataType::Bytes, vec![2, 3], Bytes::from(text)).unwrap();
        let out = vec![NamedTensor { name: "labels".into(), tensor: labels }];
        let per_job = split(&out, &jobs, &padded_dims(&jobs, &merged, &pad), &|_, _| true).unwrap();
        let texts = |t: &Tensor| {
            t.bytes_elements().map(|e| String::from_utf8(e.to_vec()).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(per_job[0][0].tensor.shape(), &[1, 1]);
        assert_eq!(texts(&per_job[0][0].tensor), ["a"]);
        assert_eq!(texts(&per_job[1][0].tensor), ["bb", "c", "ddd"]);
    }

    /// Found by the `batch` fuzz target: an empty sequence batched with a longer one came
    /// back at the padded length (padding data, not an empty output).
    #[test]
    fn an_empty_sequence_padded_in_a_batch_comes_back_empty() {
        let mut pad = HashMap::new();
        pad.insert("ids".to_string(), -1.0);
        let jobs = vec![
            job(vec![1, 0], &[], &["y"]),
            job(vec![1, 3], &[3, 4, 5], &["y"]),
            job(vec![0, 0], &[], &["y"]),
        ];
        let merged = merge(&jobs, &pad).unwrap();
        assert_eq!(merged[0].tensor.shape(), &[2, 3]);
        let out = vec![NamedTensor { name: "y".into(), tensor: merged[0].tensor.clone() }];
        let per_job = split(&out, &jobs, &padded_dims(&jobs, &merged, &pad), &|_, _| true).unwrap();
        assert_eq!(per_job[0][0].tensor.shape(), &[1, 0]);
        assert!(per_job[0][0].tensor.data().is_empty());
        assert_eq!(to_i64s(&per_job[1][0].tensor), vec![3, 4, 5]);
        assert_eq!(per_job[2][0].tensor.shape(), &[0, 0]);
    }

    #[test]
    fn each_job_gets_only_the_outputs_it_asked_for_in_its_order() {
        let jobs = vec![job(vec![1, 1], &[7], &["b", "a"]), job(vec![1, 1], &[8], &["a"])];
        let union = union_outputs(&jobs, &["a".to_string(), "b".to_string(), "c".to_string()]);
        assert_eq!(union, vec!["a", "b"]);
        let merged = merge(&jobs, &HashMap::new()).unwrap();
        let t = merged[0].tensor.clone();
        let out = vec![
            NamedTensor { name: "a".into(), tensor: t.clone() },
            NamedTensor { name: "b".into(), tensor: t },
        ];
        let per_job = split(&out, &jobs, &[vec![], vec![]], &|_, _| true).unwrap();
        let names: Vec<&str> = per_job[0].iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, vec!["b", "a"]);
        assert_eq!(per_job[1].len(), 1);
    }

    #[test]
    fn wrong_row_count_from_the_model_is_an_error() {
        let jobs = vec![job(vec![1, 1], &[1], &["y"]), job(vec![1, 1], &[2], &["y"])];
        let out = vec![NamedTensor {
            name: "y".into(),
            tensor: Tensor::new(DataType::Int64, vec![1], i64s(&[0])).unwrap(),
        }];
        assert!(
            split(&out, &jobs, &[vec![], vec![]], &|_, _| true)
                .unwrap_err()
                .message
                .contains("batch of 2 rows")
        );
    }

    #[test]
    fn bytes_outputs_split_by_elements() {
        let mut data = Vec::new();
        for s in ["a", "bb", "ccc"] {
            crate::push_bytes_element(&mut data, s.as_bytes()).unwrap();
        }
        let t = Tensor::new(DataType::Bytes, vec![3], Bytes::from(data)).unwrap();
        let pieces = row_slices(&t, [1, 2].into_iter()).unwrap();
        assert_eq!(pieces[0].bytes_elements().collect::<Vec<_>>(), vec![b"a"]);
        assert_eq!(pieces[1].bytes_elements().collect::<Vec<_>>(), vec![&b"bb"[..], b"ccc"]);
    }
}
