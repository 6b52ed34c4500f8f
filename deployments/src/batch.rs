//! Dynamic batching state, apart from the thread that owns it: a queue of jobs, when a batch is
//! ready (`max_batch_size` rows, a preferred size, or `batch_wait_timeout` after the first
//! request of the batch), and which jobs make it (compatible shapes, whole requests only).
//! Jobs whose caller left are dropped here, and jobs past their deadline are handed back to be
//! answered 504, before either costs a model call.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{InferError, NamedTensor};

/// Where a job's answer goes, with what its caller's admission took (a permit, a count on the
/// replica): released with the reply, when it is sent or dropped, that is when the replica is
/// done with the job. A caller that stops waiting (its deadline passed, or its client went
/// away) leaves its job counted until then, so admission never counts a busy replica as free.
pub(crate) struct Reply {
    tx: oneshot::Sender<Result<Vec<NamedTensor>, InferError>>,
    admission: Option<crate::deployment::Admission>,
}

impl Reply {
    pub fn new(tx: oneshot::Sender<Result<Vec<NamedTensor>, InferError>>) -> Self {
        Self { tx, admission: None }
    }

    /// Keeps `admission` until the reply is sent or dropped.
    pub fn hold(&mut self, admission: crate::deployment::Admission) {
        self.admission = Some(admission);
    }

    /// What admitting the job took, while the reply holds it.
    pub fn admission_mut(&mut self) -> Option<&mut crate::deployment::Admission> {
        self.admission.as_mut()
    }

    /// Sends the answer (given back when its caller has gone), then releases the admission.
    pub fn send(
        self,
        answer: Result<Vec<NamedTensor>, InferError>,
    ) -> Result<(), Result<Vec<NamedTensor>, InferError>> {
        self.tx.send(answer)
    }

    /// Whether the caller has stopped waiting.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The channel and the admission apart (for a remote replica, which holds both).
    pub fn into_parts(
        self,
    ) -> (oneshot::Sender<Result<Vec<NamedTensor>, InferError>>, Option<crate::deployment::Admission>) {
        (self.tx, self.admission)
    }
}

/// One request waiting for a model call.
pub(crate) struct Job {
    /// Inputs in the model's input order.
    pub inputs: Vec<NamedTensor>,
    /// Outputs to return, in the order the caller asked for them.
    pub outputs: Arc<[String]>,
    /// Rows along dimension 0 (1 when the model does not batch).
    pub rows: usize,
    /// When the request must have started by; afterwards it is answered 504 and not run.
    pub deadline: Instant,
    /// When the request was admitted (for queue-time metrics).
    pub admitted: Instant,
    /// When it reached this replica's queue (the batch deadline counts from the first one).
    pub arrived: Instant,
    pub reply: Reply,
    /// The request's span: a batch's span follows from it, and it records the batch it ran in.
    pub span: tracing::Span,
    /// Which model of a multiplexed deployment (requests for different models never share a
    /// batch).
    pub model: Option<std::sync::Arc<str>>,
    /// The replicas that could not be reached with it, once one handed it on
    /// ([`crate::deployment::Redirect`]): it goes to none of them again. Boxed: one pointer in
    /// every job, the list only in one handed on.
    #[allow(clippy::box_collection)]
    pub tried: Option<Box<Vec<usize>>>,
}

impl Job {
    /// Whether replica `id` could not be reached with this job before.
    pub fn tried(&self, id: usize) -> bool {
        self.tried.as_ref().is_some_and(|t| t.contains(&id))
    }
}

/// How a deployment batches.
#[derive(Debug, Clone, Default)]
pub struct BatchPolicy {
    /// 0: no batching, one request per model call.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for more.
    pub batch_wait_timeout: Duration,
    /// Batch sizes to send as soon as they can be formed (ascending).
    pub preferred_batch_sizes: Vec<usize>,
    /// Inputs padded (to the longest in the batch, along every dimension after the first)
    /// with this value, so requests of different lengths share a batch.
    pub pad: Arc<HashMap<String, f64>>,
}

/// What [`BatchState::take`] hands out.
pub(crate) struct Taken {
    pub batch: Vec<Job>,
    pub expired: Vec<Job>,
}

/// The queue of one replica.
pub(crate) struct BatchState {
    policy: BatchPolicy,
    queue: VecDeque<Job>,
}

impl BatchState {
    pub fn new(policy: BatchPolicy) -> Self {
        Self { policy, queue: VecDeque::new() }
    }

    pub fn push(&mut self, job: Job) {
        self.queue.push_back(job);
    }

    /// Takes out the jobs whose callers have gone (to be dropped outside any lock).
    pub fn drain_closed(&mut self) -> VecDeque<Job> {
        let (gone, kept) = self.queue.drain(..).partition(|j| j.reply.is_closed());
        self.queue = kept;
        gone
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Moves every job of `other` to the back of this queue.
    pub fn append(&mut self, other: &mut BatchState) {
        self.queue.append(&mut other.queue);
    }

    /// Drains every job (used when a replica hands its queue to others).
    pub fn drain(&mut self) -> Vec<Job> {
        self.queue.drain(..).collect()
    }

    /// Removes and returns the jobs whose deadline has passed (cancelled ones are dropped).
    pub fn take_expired(&mut self, now: Instant) -> Vec<Job> {
        let (expired, keep): (Vec<Job>, Vec<Job>) =
            self.queue.drain(..).filter(|j| !j.reply.is_closed()).partition(|j| j.deadline <= now);
        self.queue = keep.into();
        expired
    }

    /// The first job whose caller is still there: the one a batch is taken around (a gone
    /// caller's job at the front, of another shape, held a full batch of live ones back until
    /// its own wait ran out).
    fn head(&self) -> Option<&Job> {
        self.queue.iter().find(|j| !j.reply.is_closed())
    }

    /// When the current batch must go even if not full.
    pub fn deadline(&self) -> Option<Instant> {
        self.head().map(|head| self.wait_end(head))
    }

    /// When the head's batch goes even if not full: `batch_wait_timeout` after it arrived, or
    /// at once when a request that could join the batch must have started before then
    /// (waiting would only answer it 504 unrun, with the model idle).
    fn wait_end(&self, head: &Job) -> Instant {
        let end = head.arrived + self.policy.batch_wait_timeout;
        let mut joining = self
            .queue
            .iter()
            .filter(|j| !j.reply.is_closed() && self.compatible(head, j))
            .take(self.policy.max_batch_size.max(1));
        if joining.any(|j| j.deadline < end) { head.arrived } else { end }
    }

    /// True when a batch should be taken now, or when every job queued is a gone caller's:
    /// [`Self::take`] drops them (with their places under `max_ongoing_requests`), and the
    /// replica sleeps (it waited for a batch with no deadline, spinning, and kept their places).
    pub fn ready(&self, now: Instant) -> bool {
        let Some(head) = self.head() else { return !self.queue.is_empty() };
        let max = self.policy.max_batch_size;
        if max == 0 || now >= self.wait_end(head) {
            return true;
        }
        let rows = self.compatible_rows();
        rows >= max || self.policy.preferred_batch_sizes.iter().any(|&p| p <= rows)
    }

    /// Rows of live jobs that could join the head's batch, capped at `max_batch_size`.
    fn compatible_rows(&self) -> usize {
        let Some(head) = self.head() else { return 0 };
        let max = self.policy.max_batch_size;
        let mut rows = 0;
        // As `take` fills a batch: a job too big for what is left is passed over, not the end.
        for job in self.queue.iter().filter(|j| !j.reply.is_closed() && self.compatible(head, j)) {
            if rows + job.rows <= max {
                rows += job.rows;
            }
        }
        rows
    }

    /// Same input shapes apart from dimension 0, and apart from dimension 1 (the sequence) of
    /// padded inputs. Only the sequence is padded: a request whose other dimensions differ
    /// (a wider hidden size sent to `mean_pool`) padded every request of its batch on them,
    /// and their answers came back in its shape (an embedding of 400 values ending in zeros
    /// instead of 384) or over its padding (an argmax past a request's own classes).
    fn compatible(&self, a: &Job, b: &Job) -> bool {
        a.model == b.model
            && a.inputs.iter().zip(&b.inputs).all(|(x, y)| {
                let (sx, sy) = (x.tensor.shape(), y.tensor.shape());
                if self.policy.pad.contains_key(&x.name) {
                    sx.len() == sy.len() && sx.get(2..) == sy.get(2..)
                } else {
                    sx.get(1..) == sy.get(1..)
                }
            })
    }

    /// Takes the next batch. Cancelled jobs are dropped, expired ones returned apart; jobs
    /// whose shapes do not fit the batch stay queued, in order, for a later one.
    pub fn take(&mut self, now: Instant) -> Taken {
        let mut expired = Vec::new();
        let mut batch: Vec<Job> = Vec::new();
        let mut rest = VecDeque::with_capacity(self.queue.len());
        let max = self.policy.max_batch_size.max(1);
        let timed_out = self.head().is_some_and(|h| now >= self.wait_end(h));
        // Aim from the whole queue, head included, before anything is taken off it.
        let target =
            if timed_out || self.policy.preferred_batch_sizes.is_empty() || self.policy.max_batch_size == 0 {
                max
            } else {
                self.target_rows()
            };
        let mut rows = 0;
        let mut padding = PaddingBudget::default();
        while let Some(job) = self.queue.pop_front() {
            if job.reply.is_closed() {
                continue;
            }
            if job.deadline <= now {
                expired.push(job);
                continue;
            }
            if rows >= target {
                rest.push_back(job);
                continue;
            }
            match batch.first() {
                None => {
                    rows = job.rows;
                    padding.admit(&job, &self.policy.pad);
                    batch.push(job);
                }
                Some(head)
                    if self.policy.max_batch_size > 0
                        && self.compatible(head, &job)
                        && rows + job.rows <= target
                        && padding.fits(&job, &self.policy.pad) =>
                {
                    rows += job.rows;
                    padding.admit(&job, &self.policy.pad);
                    batch.push(job);
                }
                Some(_) => rest.push_back(job),
            }
        }
        self.queue = rest;
        Taken { batch, expired }
    }

    /// The batch size to aim for before the wait runs out: the largest preferred size that
    /// the queue can fill, else `max_batch_size`.
    fn target_rows(&self) -> usize {
        let rows = self.compatible_rows();
        let max = self.policy.max_batch_size;
        if rows >= max {
            return max;
        }
        self.policy.preferred_batch_sizes.iter().copied().filter(|&p| p <= rows).max().unwrap_or(max)
    }
}

/// Bounds what padding may add to a batch: the padded batch may hold at most 4× the elements
/// its requests bring (plus a little), so requests of very different shapes (long along one
/// axis, long along another) wait for separate batches instead of multiplying into a huge one.
#[derive(Default)]
struct PaddingBudget {
    /// Per padded input: the longest length so far along each axis after the first.
    longest: HashMap<String, Vec<usize>>,
    rows: usize,
    own: usize,
}

impl PaddingBudget {
    fn padded_inputs<'j>(
        job: &'j Job,
        pad: &'j HashMap<String, f64>,
    ) -> impl Iterator<Item = &'j crate::NamedTensor> {
        job.inputs.iter().filter(move |i| pad.contains_key(&i.name))
    }

    fn fits(&self, job: &Job, pad: &HashMap<String, f64>) -> bool {
        let rows = self.rows + job.rows;
        let mut padded = 0usize;
        let mut own = self.own;
        for input in Self::padded_inputs(job, pad) {
            let shape = input.tensor.shape();
            let longest = self.longest.get(&input.name);
            let per_row = shape
                .iter()
                .enumerate()
                .skip(1)
                .map(|(axis, &d)| d.max(longest.and_then(|l| l.get(axis - 1)).copied().unwrap_or(0)))
                .try_fold(1usize, |acc, d| acc.checked_mul(d));
            let Some(total) = per_row.and_then(|p| p.checked_mul(rows)) else { return false };
            padded = padded.saturating_add(total);
            own = own.saturating_add(input.tensor.len());
        }
        padded <= own.saturating_mul(4).saturating_add(4096)
    }

    fn admit(&mut self, job: &Job, pad: &HashMap<String, f64>) {
        self.rows += job.rows;
        for input in Self::padded_inputs(job, pad) {
            self.own += input.tensor.len();
            let longest = self.longest.entry(input.name.clone()).or_default();
            for (axis, &d) in input.tensor.shape().iter().enumerate().skip(1) {
                if longest.len() < axis {
                    longest.resize(axis, 0);
                }
                longest[axis - 1] = longest[axis - 1].max(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{DataType, Tensor};

    fn job(
        rows: usize,
        len: usize,
        arrived: Instant,
    ) -> (Job, oneshot::Receiver<Result<Vec<NamedTensor>, InferError>>) {
        let (reply, rx) = oneshot::channel();
        let tensor =
            Tensor::new(DataType::Int64, vec![rows, len], Bytes::from(vec![0u8; rows * len * 8])).unwrap();
        let job = Job {
            inputs: vec![NamedTensor { name: "ids".into(), tensor }],
            outputs: ["y".to_string()].into(),
            rows,
            deadline: arrived + Duration::from_secs(10),
            admitted: arrived,
            arrived,
            reply: Reply::new(reply),
            span: tracing::Span::none(),
            model: None,
            tried: None,
        };
        (job, rx)
    }

    fn policy(max: usize, wait_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: max,
            batch_wait_timeout: Duration::from_millis(wait_ms),
            ..Default::default()
        }
    }

    #[test]
    fn flushes_when_full() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(4, 100));
        let mut keep = Vec::new();
        for _ in 0..3 {
            let (j, rx) = job(1, 2, t0);
            s.push(j);
            keep.push(rx);
        }
        assert!(!s.ready(t0), "3 of 4 rows, wait not over");
        let (j, rx) = job(1, 2, t0);
        s.push(j);
        keep.push(rx);
        assert!(s.ready(t0));
        let t = s.take(t0);
        assert_eq!(t.batch.len(), 4);
        assert!(s.is_empty());
    }

    #[test]
    fn a_gone_callers_job_at_the_front_does_not_hold_a_full_batch_back() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(4, 1000));
        let (gone, rx) = job(1, 2, t0);
        drop(rx);
        s.push(gone);
        let mut keep = Vec::new();
        for _ in 0..4 {
            let (j, rx) = job(1, 3, t0);
            s.push(j);
            keep.push(rx);
        }
        assert!(s.ready(t0), "four live rows of one shape: a full batch");
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(1000)));
        assert_eq!(s.take(t0).batch.len(), 4);
    }

    #[test]
    fn flushes_on_the_deadline_of_the_first_request() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(8, 10));
        let (a, _ra) = job(1, 2, t0);
        let (b, _rb) = job(1, 2, t0 + Duration::from_millis(9));
        s.push(a);
        s.push(b);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_millis(10)));
        assert!(!s.ready(t0 + Duration::from_millis(9)));
        // The deadline does not move when the second request arrives.
        assert!(s.ready(t0 + Duration::from_millis(10)));
        assert_eq!(s.take(t0 + Duration::from_millis(10)).batch.len(), 2);
    }

    /// A request that must start before the wait ends sends the batch at once, rather than
    /// wait with the model idle and then answer it 504 unrun.
    #[test]
    fn a_request_due_before_the_wait_ends_sends_the_batch_at_once() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(8, 50));
        let (a, _ra) = job(1, 2, t0);
        s.push(a);
        assert!(!s.ready(t0), "no deadline before the wait's end");
        let (mut b, _rb) = job(1, 2, t0 + Duration::from_millis(1));
        b.deadline = t0 + Duration::from_millis(20);
        s.push(b);
        assert!(s.ready(t0 + Duration::from_millis(1)));
        assert_eq!(s.deadline(), Some(t0));
        // One that could not join the batch (another shape) does not hurry it.
        let mut other = BatchState::new(policy(8, 50));
        let (a, _ra) = job(1, 2, t0);
        let (mut c, _rc) = job(1, 3, t0);
        c.deadline = t0 + Duration::from_millis(20);
        other.push(a);
        other.push(c);
        assert!(!other.ready(t0 + Duration::from_millis(1)));
        let t = s.take(t0 + Duration::from_millis(1));
        assert_eq!((t.batch.len(), t.expired.len()), (2, 0));
    }

    /// A request too big for what is left of the batch is passed over when counting, as when
    /// taking: 3 + 1 rows fill a batch of 4 past a 2-row request, at once.
    #[test]
    fn a_full_batch_past_a_request_that_does_not_fit_goes_at_once() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(4, 100));
        let mut keep = Vec::new();
        for rows in [3, 2, 1] {
            let (j, rx) = job(rows, 2, t0);
            s.push(j);
            keep.push(rx);
        }
        assert!(s.ready(t0));
        let t = s.take(t0);
        assert_eq!(t.batch.iter().map(|j| j.rows).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn cancelled_entries_are_skipped_and_expired_ones_returned() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(8, 0));
        let (a, ra) = job(1, 2, t0);
        let (mut b, _rb) = job(1, 2, t0);
        b.deadline = t0;
        let (c, _rc) = job(1, 2, t0);
        s.push(a);
        s.push(b);
        s.push(c);
        drop(ra);
        let t = s.take(t0 + Duration::from_millis(1));
        assert_eq!(t.batch.len(), 1, "a cancelled, b expired, c runs");
        assert_eq!(t.expired.len(), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn multi_row_requests_count_their_rows_and_are_never_split() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(4, 0));
        let (a, _ra) = job(3, 2, t0);
        let (b, _rb) = job(2, 2, t0);
        let (c, _rc) = job(1, 2, t0);
        s.push(a);
        s.push(b);
        s.push(c);
        let t = s.take(t0);
        let rows: Vec<usize> = t.batch.iter().map(|j| j.rows).collect();
        assert_eq!(rows, vec![3, 1], "b (2 rows) does not fit after a (3), c does");
        assert_eq!(s.len(), 1);
        assert_eq!(s.take(t0).batch[0].rows, 2);
    }

    #[test]
    fn different_shapes_go_to_separate_batches_unless_padded() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(8, 0));
        let (a, _ra) = job(1, 5, t0);
        let (b, _rb) = job(1, 7, t0);
        let (c, _rc) = job(1, 5, t0);
        s.push(a);
        s.push(b);
        s.push(c);
        let t = s.take(t0);
        assert_eq!(t.batch.len(), 2, "a and c share a shape");
        assert_eq!(s.take(t0).batch.len(), 1);

        let mut pad = HashMap::new();
        pad.insert("ids".to_string(), 0.0);
        let mut s = BatchState::new(BatchPolicy { pad: Arc::new(pad), ..policy(8, 0) });
        let (a, _ra) = job(1, 5, t0);
        let (b, _rb) = job(1, 7, t0);
        s.push(a);
        s.push(b);
        assert_eq!(s.take(t0).batch.len(), 2, "padding lets lengths differ");
    }

    #[test]
    fn padding_never_multiplies_a_batch_into_a_huge_one() {
        let t0 = Instant::now();
        let mut pad = HashMap::new();
        pad.insert("ids".to_string(), 0.0);
        let mut s = BatchState::new(BatchPolicy { pad: Arc::new(pad), ..policy(16, 0) });
        let mut keep = Vec::new();
        for len in [50_000, 2, 2, 2, 2, 2, 2, 2] {
            let (j, rx) = job(1, len, t0);
            s.push(j);
            keep.push(rx);
        }
        let t = s.take(t0);
        let n = t.batch.len();
        // 4 padded rows of 50,000 stay within 4x the 50,006 elements they bring; more do not.
        assert_eq!(n, 4, "the short requests beyond the budget wait for the next batch");
        assert_eq!(s.take(t0).batch.len(), 4);
    }

    #[test]
    fn a_full_queue_is_not_cut_to_a_preferred_size() {
        let t0 = Instant::now();
        let mut s = BatchState::new(BatchPolicy { preferred_batch_sizes: vec![4], ..policy(8, 1000) });
        let mut keep = Vec::new();
        for _ in 0..8 {
            let (j, rx) = job(1, 2, t0);
            s.push(j);
            keep.push(rx);
        }
        assert_eq!(s.take(t0).batch.len(), 8);
    }

    #[test]
    fn preferred_batch_sizes_send_early() {
        let t0 = Instant::now();
        let mut s = BatchState::new(BatchPolicy { preferred_batch_sizes: vec![2], ..policy(8, 1000) });
        let (a, _ra) = job(1, 2, t0);
        s.push(a);
        assert!(!s.ready(t0));
        let (b, _rb) = job(1, 2, t0);
        s.push(b);
        assert!(s.ready(t0));
        let (c, _rc) = job(1, 2, t0);
        s.push(c);
        let t = s.take(t0);
        assert_eq!(t.batch.len(), 2, "the largest preferred size that can be formed");
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn without_batching_each_request_runs_alone() {
        let t0 = Instant::now();
        let mut s = BatchState::new(policy(0, 0));
        let (a, _ra) = job(1, 2, t0);
        let (b, _rb) = job(1, 2, t0);
        s.push(a);
        s.push(b);
        assert!(s.ready(t0));
        assert_eq!(s.take(t0).batch.len(), 1);
        assert_eq!(s.take(t0).batch.len(), 1);
    }
}
