//! Shadow traffic: a share of a deployment's requests is copied to a candidate version. The
//! client only ever gets the primary's answer, at the primary's latency: the copy runs in its
//! own task on the candidate's own replicas, and only when one of them has a free slot now —
//! when the candidate is saturated the copy is dropped and counted, never queued behind real
//! traffic. Each answer is compared with the primary's: the largest absolute difference of
//! floating-point outputs, and per row whether they agree (same argmax over the last dimension
//! for floating-point outputs, same values for the others).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use half::{bf16, f16};
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::oneshot;

use crate::metrics::{LatencyBuckets, SHADOW_DURATION, SHADOW_MAX_ABS_DIFF, SHADOW_REQUESTS, SHADOW_ROWS};
use crate::{DataType, Deployment, ErrorKind, InferRequest, NamedTensor, Tensor};

/// A candidate receiving copies of `percent` % of a deployment's requests.
pub struct Shadow {
    target: Arc<Deployment>,
    percent: std::sync::atomic::AtomicU32,
    stats: ShadowStats,
    handles: Handles,
    /// Copies the candidate holds now (sent to it and not yet answered by it).
    at_target: AtomicU64,
}

/// What the shadow did so far.
#[derive(Default)]
pub struct ShadowStats {
    /// Copies sent.
    pub sent: AtomicU64,
    /// Copies dropped because the candidate had no free slot.
    pub dropped: AtomicU64,
    /// Copies the candidate failed.
    pub errors: AtomicU64,
    /// Copies answered and compared.
    pub compared: AtomicU64,
    /// Rows compared, and of them those that agree.
    pub rows: AtomicU64,
    pub rows_agreed: AtomicU64,
    /// The largest absolute difference seen (f64 bits).
    max_abs_diff: AtomicU64,
    /// The candidate's latencies on copies.
    pub latencies: LatencyBuckets,
}

impl ShadowStats {
    pub fn max_abs_diff(&self) -> f64 {
        f64::from_bits(self.max_abs_diff.load(Ordering::Relaxed))
    }
}

/// Metric handles of one shadow.
struct Handles {
    compared: Counter,
    dropped: Counter,
    errors: Counter,
    duration: Histogram,
    agree: Counter,
    disagree: Counter,
    max_abs_diff: Gauge,
}

impl Handles {
    fn new(d: &Deployment) -> Self {
        let (m, v) = (d.name().to_string(), d.version().to_string());
        let outcome = |o: &'static str| metrics::counter!(SHADOW_REQUESTS, "model" => m.clone(), "version" => v.clone(), "outcome" => o);
        let rows = |a: &'static str| metrics::counter!(SHADOW_ROWS, "model" => m.clone(), "version" => v.clone(), "agree" => a);
        Self {
            compared: outcome("compared"),
            dropped: outcome("dropped"),
            errors: outcome("error"),
            duration: metrics::histogram!(SHADOW_DURATION, "model" => m.clone(), "version" => v.clone()),
            agree: rows("true"),
            disagree: rows("false"),
            max_abs_diff: metrics::gauge!(SHADOW_MAX_ABS_DIFF, "model" => m.clone(), "version" => v.clone()),
        }
    }
}

/// One copy counted in [`Shadow::in_flight`] while it lives (a copy's task dropped while the
/// candidate holds it counts out too).
struct AtTarget<'a>(&'a AtomicU64);

impl<'a> AtTarget<'a> {
    fn count(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for AtTarget<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hands the primary's answer to a copy in flight, for the comparison.
pub struct Mirror {
    primary: oneshot::Sender<Vec<NamedTensor>>,
}

impl Mirror {
    /// The primary's outputs (cheap clones of their bytes).
    pub fn compare(self, outputs: &[NamedTensor]) {
        let _ = self.primary.send(outputs.to_vec());
    }
}

impl Shadow {
    pub fn new(target: Arc<Deployment>, percent: u32) -> Self {
        let handles = Handles::new(&target);
        Self {
            target,
            percent: percent.min(100).into(),
            stats: ShadowStats::default(),
            handles,
            at_target: AtomicU64::new(0),
        }
    }

    pub fn target(&self) -> &Arc<Deployment> {
        &self.target
    }

    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// Changes the share copied (0-100).
    pub fn set_percent(&self, percent: u32) {
        self.percent.store(percent.min(100), Ordering::Relaxed);
    }

    pub fn stats(&self) -> &ShadowStats {
        &self.stats
    }

    /// Copies the candidate holds now: sent to it and not yet answered by it (one it answered
    /// and that waits for the primary's answer is not). Its autoscaler counts its own traffic,
    /// not these.
    pub fn in_flight(&self) -> u64 {
        self.at_target.load(Ordering::Relaxed)
    }

    /// Copies `request` to the candidate when this one is drawn (`percent` %); the returned
    /// mirror takes the primary's answer. Must run inside the server's runtime.
    pub fn mirror(self: &Arc<Self>, request: &InferRequest) -> Option<Mirror> {
        let percent = self.percent();
        if percent == 0 || (percent < 100 && fastrand::u32(..100) >= percent) {
            return None;
        }
        let (primary, answer) = oneshot::channel::<Vec<NamedTensor>>();
        let me = self.clone();
        let copy = InferRequest { id: None, ..request.clone() };
        me.stats.sent.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let handles = &me.handles;
            let started = Instant::now();
            let at_target = AtTarget::count(&me.at_target);
            let answered = me.target.infer_now(copy).await;
            drop(at_target);
            match answered {
                Ok(r) => {
                    let took = started.elapsed();
                    me.stats.latencies.record(took);
                    handles.duration.record(took.as_secs_f64());
                    match answer.await {
                        Ok(primary) => me.record(&primary, &r.outputs),
                        // The primary failed: nothing to compare with, so the copy counts as
                        // dropped (every copy sent is compared, dropped or an error).
                        Err(_) => {
                            me.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            handles.dropped.increment(1);
                        }
                    }
                }
                Err(e) if e.kind == ErrorKind::Unavailable => {
                    me.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    handles.dropped.increment(1);
                }
                // The primary failed the request too (the client's own mistake, a malformed
                // input): nothing to compare, and nothing said of the candidate, so dropped.
                Err(_) if answer.await.is_err() => {
                    me.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    handles.dropped.increment(1);
                }
                Err(e) => {
                    tracing::debug!(model = %me.target.name(), version = %me.target.version(), "shadow failed: {e}");
                    me.stats.errors.fetch_add(1, Ordering::Relaxed);
                    handles.errors.increment(1);
                }
            }
        });
        Some(Mirror { primary })
    }

    fn record(&self, primary: &[NamedTensor], shadow: &[NamedTensor]) {
        let h = &self.handles;
        let c = compare(primary, shadow);
        self.stats.compared.fetch_add(1, Ordering::Relaxed);
        self.stats.rows.fetch_add(c.rows, Ordering::Relaxed);
        self.stats.rows_agreed.fetch_add(c.agreed, Ordering::Relaxed);
        let max = self
            .stats
            .max_abs_diff
            .fetch_max(c.max_abs_diff.to_bits(), Ordering::Relaxed)
            .max(c.max_abs_diff.to_bits());
        h.compared.increment(1);
        h.agree.increment(c.agreed);
        h.disagree.increment(c.rows - c.agreed);
        h.max_abs_diff.set(f64::from_bits(max));
    }
}

/// How two answers to one request compare.
#[derive(Debug, PartialEq)]
pub struct Comparison {
    pub rows: u64,
    pub agreed: u64,
    /// Over floating-point outputs; infinite when shapes or datatypes differ.
    pub max_abs_diff: f64,
}

/// Compares each of the primary's outputs with the shadow's of the same name. A row agrees when
/// every output agrees on it: same argmax over the last dimension in each of the row's slices
/// along it (floating point; an output with one value per slice, `[N, 1]` or `[N]`, within a
/// relative 1e-3) or the same values (otherwise). An output the shadow's answer lacks (renamed in its model), or of
/// another shape or datatype, disagrees on every row.
pub fn compare(primary: &[NamedTensor], shadow: &[NamedTensor]) -> Comparison {
    // An empty output has no rows to compare, whatever its first dimension says (`[2^40, 0]`
    // asked for a flag per row, 1 TiB, and would have counted 2^40 agreeing rows).
    let rows =
        primary.first().map_or(0, |o| o.tensor.shape().first().copied().unwrap_or(1).min(o.tensor.len()))
            as u64;
    let mut agree = vec![true; rows as usize];
    let mut max_abs_diff = 0.0f64;
    for p in primary {
        let s = shadow.iter().find(|s| s.name == p.name);
        let (a, b) = (&p.tensor, s.map(|s| &s.tensor));
        let Some(b) = b.filter(|b| a.dtype() == b.dtype() && a.shape() == b.shape()) else {
            max_abs_diff = f64::INFINITY;
            agree.iter_mut().for_each(|x| *x = false);
            continue;
        };
        let per_row = a.shape().iter().skip(1).product::<usize>().max(1);
        match (floats(a), floats(b)) {
            (Some(x), Some(y)) => {
                for (u, v) in x.iter().zip(&y) {
                    max_abs_diff = max_abs_diff.max((u - v).abs());
                }
                // The class axis is the last; a row holds one or more slices along it (a token
                // classifier's `[B, T, V]`: T), and agrees when each slice has the same argmax.
                // With one value per slice (`[N, 1]` scores, `[N]`) an argmax says nothing (it
                // is always 0): the values must be within a relative 1e-3 instead.
                let classes = a.shape().last().copied().filter(|_| a.shape().len() > 1).unwrap_or(1);
                for (r, ok) in agree.iter_mut().enumerate() {
                    let (xr, yr) = (row(&x, r, per_row), row(&y, r, per_row));
                    *ok &= if classes <= 1 {
                        xr.len() == yr.len() && xr.iter().zip(yr).all(|(&u, &v)| close(u, v))
                    } else {
                        xr.chunks(classes).zip(yr.chunks(classes)).all(|(p, q)| argmax(p) == argmax(q))
                    };
                }
            }
            _ if a.dtype() == DataType::Bytes => {
                // Text elements differ in length: rows are counted in elements, not bytes.
                let (x, y): (Vec<&[u8]>, Vec<&[u8]>) =
                    (a.bytes_elements().collect(), b.bytes_elements().collect());
                for (r, ok) in agree.iter_mut().enumerate() {
                    *ok &= x.get(r * per_row..(r + 1) * per_row) == y.get(r * per_row..(r + 1) * per_row);
                }
            }
            _ => {
                // This output's own row width (its dimension 0 may not be the first output's).
                let width = per_row * a.dtype().byte_size().unwrap_or(1);
                for (r, ok) in agree.iter_mut().enumerate() {
                    *ok &=
                        a.data().get(r * width..(r + 1) * width) == b.data().get(r * width..(r + 1) * width);
                }
            }
        }
    }
    Comparison { rows, agreed: agree.iter().filter(|&&x| x).count() as u64, max_abs_diff }
}

fn row(v: &[f64], r: usize, width: usize) -> &[f64] {
    v.get(r * width..(r + 1) * width).unwrap_or(&[])
}

/// Equal within a relative 1e-3 (NaN agrees with NaN: both models gave no number).
fn close(u: f64, v: f64) -> bool {
    (u.is_nan() && v.is_nan()) || u == v || (u - v).abs() <= 1e-3 * u.abs().max(v.abs()).max(1.0)
}

fn argmax(v: &[f64]) -> Option<usize> {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i)
}

/// A floating-point tensor's values as f64.
fn floats(t: &Tensor) -> Option<Vec<f64>> {
    let d = t.data();
    Some(match t.dtype() {
        DataType::Fp32 => {
            d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        DataType::Fp64 => {
            d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
        }
        DataType::Fp16 => d.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        DataType::Bf16 => d.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn fp32(name: &str, shape: Vec<usize>, v: &[f32]) -> NamedTensor {
        let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(DataType::Fp32, shape, Bytes::from(data)).unwrap(),
        }
    }

    fn i64s(name: &str, v: &[i64]) -> NamedTensor {
        let data: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(DataType::Int64, vec![v.len()], Bytes::from(data)).unwrap(),
        }
    }

    #[test]
    fn rows_agree_on_argmax_and_labels_and_the_largest_difference_is_kept() {
        let p = [fp32("p", vec![2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]), i64s("label", &[1, 0])];
        let same = compare(&p, &p);
        assert_eq!(same, Comparison { rows: 2, agreed: 2, max_abs_diff: 0.0 });
        // Row 0 moves a little (same argmax), row 1 flips its argmax.
        let s = [fp32("p", vec![2, 3], &[0.15, 0.65, 0.2, 0.3, 0.5, 0.2]), i64s("label", &[1, 0])];
        let c = compare(&p, &s);
        assert_eq!((c.rows, c.agreed), (2, 1));
        assert!((c.max_abs_diff - 0.2).abs() < 1e-6, "{c:?}");
        // A differing label disagrees too.
        let s = [fp32("p", vec![2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]), i64s("label", &[2, 0])];
        assert_eq!(compare(&p, &s).agreed, 1);
    }

    /// An empty output (`[2^24, 0]`, which a model keeping an empty input's first dimension
    /// answers) has no rows: a flag per row of its first dimension took 1 TiB for `[2^40, 0]`,
    /// refused when it is made now, and aborted.
    #[test]
    fn an_empty_output_has_no_rows() {
        let p = [fp32("y", vec![1 << 24, 0], &[])];
        assert_eq!(compare(&p, &p), Comparison { rows: 0, agreed: 0, max_abs_diff: 0.0 });
    }

    fn texts(name: &str, v: &[&str]) -> NamedTensor {
        let mut data = Vec::new();
        for t in v {
            crate::push_bytes_element(&mut data, t.as_bytes()).unwrap();
        }
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(DataType::Bytes, vec![v.len()], Bytes::from(data)).unwrap(),
        }
    }

    /// Text outputs compare element by element: elements of other lengths in another row do
    /// not shift the rows (they were cut into equal byte widths).
    /// One value per row (`[N, 1]` scores) has no argmax to compare: every row agreed whatever
    /// the values; they must be close now. A `[B, T, V]` output agrees per token: one argmax
    /// over the whole row counted a row whose tokens changed as agreeing.
    #[test]
    fn scores_compare_by_value_and_tokens_by_their_own_argmax() {
        let p = [fp32("score", vec![2, 1], &[0.9, 0.2])];
        let c = compare(&p, &[fp32("score", vec![2, 1], &[0.1, 0.2001])]);
        assert_eq!((c.rows, c.agreed), (2, 1), "0.9 against 0.1 disagrees; 0.2 against 0.2001 agrees");
        let p = [fp32("logits", vec![1, 2, 3], &[0.1, 0.2, 9.0, 0.5, 0.3, 0.2])];
        let s = [fp32("logits", vec![1, 2, 3], &[0.1, 0.2, 9.0, 0.1, 0.8, 0.2])];
        assert_eq!(compare(&p, &s).agreed, 0, "the second token's class changed");
        assert_eq!(compare(&p, &p).agreed, 1);
    }

    #[test]
    fn text_rows_agree_element_by_element() {
        let p = [texts("label", &["ab", "c"])];
        assert_eq!(compare(&p, &p).agreed, 2);
        let c = compare(&p, &[texts("label", &["a", "c"])]);
        assert_eq!((c.rows, c.agreed), (2, 1), "only row 0 differs");
        let c = compare(&p, &[texts("label", &["ab", "d"])]);
        assert_eq!((c.rows, c.agreed), (2, 1), "only row 1 differs");
    }

    #[test]
    fn a_different_shape_is_a_disagreement_not_a_panic() {
        let p = [fp32("p", vec![1, 2], &[0.1, 0.9])];
        let s = [fp32("p", vec![1, 3], &[0.1, 0.9, 0.0])];
        let c = compare(&p, &s);
        assert_eq!((c.rows, c.agreed), (1, 0));
        assert!(c.max_abs_diff.is_infinite());
    }

    /// An output the shadow does not answer (renamed in its model) disagrees: it agreed on
    /// every row, with no difference, so an agreement gate passed a model never compared.
    #[test]
    fn an_output_the_shadow_lacks_is_a_disagreement() {
        let p = [fp32("probs", vec![2, 2], &[0.1, 0.9, 0.8, 0.2])];
        let c = compare(&p, &[fp32("probabilities", vec![2, 2], &[0.1, 0.9, 0.8, 0.2])]);
        assert_eq!((c.rows, c.agreed), (2, 0));
        assert!(c.max_abs_diff.is_infinite());
    }
}
