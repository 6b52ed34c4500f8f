//! The load engines. Closed loop: a fixed number of workers, each sending its next request when
//! the last one is answered. Open loop: requests sent on a schedule (constant or Poisson
//! arrivals) whatever the answers, latency measured from each request's scheduled send time so
//! that a slow server cannot hide its queueing (no coordinated omission).
//! Every step stops by itself: after its duration or its request count.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::task::JoinSet;

use crate::client::{Client, ErrorKind, Worker};
use crate::codec::{Prepared, matches};
use crate::stats::{DEFAULT_CAP, Percentiles, RequestRecord, StepResult, histogram, record};

/// How one step loads the server.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Closed { concurrency: usize },
    Open { rate: f64, poisson: bool },
}

/// When a step ends: whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
}

/// What a step records besides its statistics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepOptions {
    /// Compare each response with the case's expected outputs; mismatches count as errors.
    pub check: bool,
    /// Keep a record of every request ([`StepResult::requests`]).
    pub request_log: bool,
    /// How long one request may take; past it, it counts as a `timeout` error, and latencies
    /// are recorded up to it. None: no bound (latencies recorded up to 100 s).
    pub timeout: Option<Duration>,
}

/// Outstanding requests an open-loop step allows before it counts sends as `overrun` (each
/// outstanding REST request holds a connection), unless the open-file limit allows fewer
/// ([`raise_open_files`]).
pub const MAX_OUTSTANDING: u64 = 4_096;

/// An open-loop send that leaves later than this after its scheduled time is late: the load
/// tester itself fell behind (its pacer or its runtime), and the latencies it reports carry
/// that delay.
pub const LATE: Duration = Duration::from_millis(1);

/// File descriptors kept for what is not a request's connection (the runtime, the output).
const SPARE_FILES: u64 = 64;

/// The open-file limit, raised to its hard limit (often 1,024 soft where the hard one is far
/// higher: a REST connection per outstanding request would fail past it as `transport: Too
/// many open files`), once per process.
fn open_files() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        #[allow(unsafe_code)]
        // SAFETY: `limit` is a valid, writable rlimit for the call's duration.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return u64::MAX;
        }
        // The hard limit may read unlimited, which Linux refuses for this resource.
        let most = limit.rlim_max.min(1 << 20);
        if limit.rlim_cur < most {
            let raised = libc::rlimit { rlim_cur: most, rlim_max: limit.rlim_max };
            #[allow(unsafe_code)]
            // SAFETY: `raised` is a valid rlimit that outlives the call.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit.rlim_cur = most;
            }
        }
        limit.rlim_cur
    })
}

/// Raises the open-file limit; says so when it still holds the load back: closed-loop
/// workers past it fail to connect, and an open loop counts `overrun` from there.
pub fn raise_open_files(connections: u64) -> Option<String> {
    let limit = open_files();
    (connections.saturating_add(SPARE_FILES) > limit).then(|| {
        format!(
            "the open-file limit is {limit} (ulimit -n, raised to its hard limit): {connections} connections \
             do not fit; an open loop counts sends past {} outstanding as `overrun`",
            outstanding_cap()
        )
    })
}

/// [`MAX_OUTSTANDING`], or fewer where the open-file limit is lower.
fn outstanding_cap() -> u64 {
    MAX_OUTSTANDING.min(open_files().saturating_sub(SPARE_FILES).max(1))
}

/// What every tally of a step shares.
#[derive(Debug, Clone, Copy)]
struct Frame {
    start: Instant,
    /// When a step bound by its duration stops sending.
    end: Option<Instant>,
    /// Keep every request ([`StepResult::requests`]).
    log: bool,
    /// The longest latency its histogram holds: the step's timeout.
    cap: Duration,
}

/// How one request ended.
struct Outcome {
    /// When it was sent (open loop: its scheduled time).
    started: Instant,
    /// When its answer was received in full, or it failed.
    done: Instant,
    /// The rows it carried, or its failure kind.
    result: Result<u64, ErrorKind>,
}

struct Tally {
    frame: Frame,
    hist: Histogram<u64>,
    ok: u64,
    rows: u64,
    /// Successes and their rows answered by the frame's end (or all of them when it has none).
    ok_by_end: u64,
    rows_by_end: u64,
    /// When the last answer came back.
    last: Option<Instant>,
    errors: BTreeMap<String, u64>,
    /// The requests, when the step logs them.
    log: Option<Vec<RequestRecord>>,
    /// Open loop: sends that left more than [`LATE`] after their scheduled time.
    late_sends: u64,
}

impl Tally {
    fn new(frame: Frame) -> Self {
        Self {
            frame,
            hist: histogram(),
            ok: 0,
            rows: 0,
            ok_by_end: 0,
            rows_by_end: 0,
            last: None,
            errors: BTreeMap::new(),
            log: frame.log.then(Vec::new),
            late_sends: 0,
        }
    }

    /// Counts one request: a histogram record and a few additions, cheap enough to do under a
    /// lock shared by every open-loop request.
    fn add(&mut self, o: Outcome) {
        let latency = o.done.saturating_duration_since(o.started);
        if let Some(log) = &mut self.log {
            log.push(RequestRecord {
                sent: o.started.saturating_duration_since(self.frame.start),
                latency,
                error: o.result.as_ref().err().cloned(),
            });
        }
        self.last = self.last.max(Some(o.done));
        match o.result {
            Ok(rows) => {
                record(&mut self.hist, latency, self.frame.cap);
                self.ok += 1;
                self.rows += rows;
                if self.frame.end.is_none_or(|e| o.done <= e) {
                    self.ok_by_end += 1;
                    self.rows_by_end += rows;
                }
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.rows += other.rows;
        self.ok_by_end += other.ok_by_end;
        self.rows_by_end += other.rows_by_end;
        self.last = self.last.max(other.last);
        self.late_sends += other.late_sends;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if let (Some(mine), Some(theirs)) = (&mut self.log, other.log) {
            mine.extend(theirs);
        }
    }

    /// The step's rates, at `now` (when its last request has been counted). A step that ran
    /// out of time before its request budget (`budget`) is rated over its send window, as wrk
    /// and h2load do: the answers that came back in it, over its duration; what it had in
    /// flight then drains after it (counted in `ok` and the latencies, not the rates). A
    /// step bound by its request count is rated over every answer, until the last.
    fn rates(&self, budget: u64, now: Instant) -> Rates {
        let sent = self.ok + self.errors.values().sum::<u64>();
        match self.frame.end.filter(|_| sent < budget) {
            Some(end) => {
                let seconds = end.saturating_duration_since(self.frame.start).as_secs_f64();
                Rates {
                    seconds,
                    throughput: per_second(self.ok_by_end, seconds),
                    inferences_per_second: per_second(self.rows_by_end, seconds),
                    drain_seconds: self.last.map_or(0.0, |l| l.saturating_duration_since(end).as_secs_f64()),
                }
            }
            None => {
                let seconds = now.saturating_duration_since(self.frame.start).as_secs_f64();
                Rates {
                    seconds,
                    throughput: per_second(self.ok, seconds),
                    inferences_per_second: per_second(self.rows, seconds),
                    drain_seconds: 0.0,
                }
            }
        }
    }
}

/// A request's task that panicked (its outcome was never counted) ends the run with its panic
/// rather than vanishing; one cancelled at the runtime's end is nothing.
fn surface_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// `count` over `seconds`; 0 over none (a step of `--duration 0`).
fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// [`StepResult`]'s time and rates.
#[derive(Debug, PartialEq)]
struct Rates {
    seconds: f64,
    throughput: f64,
    inferences_per_second: f64,
    drain_seconds: f64,
}

/// Sends one request and sees how it ended. Its latency ends when the answer has been received
/// in full; decoding and comparing it (`--check`) come after, outside the latency.
async fn one(sender: Sender<'_, '_>, p: &Prepared, options: StepOptions, started: Instant) -> Outcome {
    // Bounded from the scheduled send time, like the latency.
    let until = options.timeout.map(|t| started + t);
    let result = match sender {
        Sender::Shared(client) => bounded(until, client.answer(p)).await,
        Sender::Own(worker) => {
            let result = bounded(until, worker.answer(p)).await;
            if result.as_ref().is_err_and(|e| e == TIMEOUT) {
                // Its connection still waits for that answer: the next request gets a new one.
                worker.disconnect();
            }
            result
        }
    };
    let done = Instant::now();
    let result = result.and_then(|answer| match &p.expected {
        Some(want) if options.check => {
            if matches(&answer.outputs()?, want, p.tolerance) {
                Ok(p.rows)
            } else {
                Err("mismatch".into())
            }
        }
        _ => Ok(p.rows),
    });
    Outcome { started, done, result }
}

/// The error kind of a request that took longer than the step's timeout.
const TIMEOUT: &str = "timeout";

/// `send`, or the `timeout` error once `until` passes.
async fn bounded<T>(
    until: Option<Instant>,
    send: impl std::future::Future<Output = Result<T, ErrorKind>>,
) -> Result<T, ErrorKind> {
    match until {
        Some(until) => {
            tokio::time::timeout_at(until.into(), send).await.unwrap_or_else(|_| Err(TIMEOUT.into()))
        }
        None => send.await,
    }
}

enum Sender<'a, 'b> {
    Shared(&'a Client),
    Own(&'a mut Worker<'b>),
}

/// Runs one step and returns what it measured.
pub async fn run_step(
    client: Arc<Client>,
    cases: Arc<Vec<Prepared>>,
    mode: Mode,
    limits: Limits,
    options: StepOptions,
    progress: Option<ProgressBar>,
) -> StepResult {
    let start = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let end = limits.duration.map(|d| start + d);
    let frame = Frame { start, end, log: options.request_log, cap: options.timeout.unwrap_or(DEFAULT_CAP) };
    let issued = Arc::new(AtomicU64::new(0));
    let budget = limits.requests.unwrap_or(u64::MAX);
    let tally = match mode {
        Mode::Closed { concurrency } => {
            let mut workers = Vec::new();
            for w in 0..concurrency {
                let (client, cases, issued, progress) =
                    (client.clone(), cases.clone(), issued.clone(), progress.clone());
                workers.push(tokio::spawn(async move {
                    let mut tally = Tally::new(frame);
                    let mut worker = client.worker();
                    let left = end.map(|e| e.saturating_duration_since(Instant::now()));
                    let within = match (options.timeout, left) {
                        (Some(t), Some(l)) => Some(t.min(l)),
                        (t, l) => t.or(l),
                    };
                    worker.connect(within).await;
                    loop {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        if n >= budget || end.is_some_and(|e| Instant::now() >= e) {
                            break;
                        }
                        let p = &cases[(n as usize + w) % cases.len()];
                        tally.add(one(Sender::Own(&mut worker), p, options, Instant::now()).await);
                        if let Some(pb) = &progress {
                            pb.inc(1);
                        }
                    }
                    tally
                }));
            }
            let mut total = Tally::new(frame);
            for w in workers {
                // A worker that panicked would take its requests' counts with it, unseen.
                total.merge(w.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
            }
            total
        }
        Mode::Open { rate, poisson } => {
            // One tally for every request, each adding its own under a short lock (never held
            // across an await).
            let total = Arc::new(Mutex::new(Tally::new(frame)));
            let outstanding = Arc::new(AtomicU64::new(0));
            // Paced on a thread of its own: tokio's timer ticks in whole milliseconds, so a send
            // timed by it went out up to a millisecond late, and latency (measured from the
            // scheduled time, so that a slow server cannot hide its queue) carried that delay.
            // The thread's sleep wakes within tens of microseconds.
            let runtime = tokio::runtime::Handle::current();
            let total_for_pacer = total.clone();
            let cap = outstanding_cap();
            let late = Arc::new(AtomicU64::new(0));
            let late_for_pacer = late.clone();
            let pacer = tokio::task::spawn_blocking(move || {
                let (total, late) = (total_for_pacer, late_for_pacer);
                let mut rng = 0x2545_F491_4F6C_DD1Du64;
                // Each send time from the start (not the last one plus a gap rounded to whole
                // nanoseconds: at high rates the rounding added up, or the gap was 0).
                let mut offset = 0.0f64;
                let mut next = start;
                // The requests in flight; finished ones are reaped as it goes, so that a long
                // step holds only those outstanding.
                let mut tasks = JoinSet::new();
                let mut n = 0u64;
                while n < budget && end.is_none_or(|e| next < e) {
                    // Reaped while it waits for the next send time, not after.
                    while let Some(done) = tasks.try_join_next() {
                        surface_panic(done);
                    }
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    let scheduled = next;
                    let gap = if poisson {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                        -(1.0 - u).ln() / rate
                    } else {
                        1.0 / rate
                    };
                    offset += gap;
                    next = start + Duration::from_secs_f64(offset);
                    n += 1;
                    if outstanding.load(Ordering::Relaxed) >= cap {
                        let overrun = Outcome {
                            started: scheduled,
                            done: Instant::now(),
                            result: Err("overrun".into()),
                        };
                        lock(&total).add(overrun);
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (client, cases, total, outstanding, progress, late) = (
                        client.clone(),
                        cases.clone(),
                        total.clone(),
                        outstanding.clone(),
                        progress.clone(),
                        late.clone(),
                    );
                    let index = (n - 1) as usize % cases.len();
                    tasks.spawn_on(
                        async move {
                            if Instant::now().saturating_duration_since(scheduled) > LATE {
                                late.fetch_add(1, Ordering::Relaxed);
                            }
                            let outcome =
                                one(Sender::Shared(&client), &cases[index], options, scheduled).await;
                            lock(&total).add(outcome);
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                            if let Some(pb) = progress {
                                pb.inc(1);
                            }
                        },
                        &runtime,
                    );
                }
                tasks
            });
            let mut tasks = pacer.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            while let Some(done) = tasks.join_next().await {
                surface_panic(done);
            }
            let mut tally = std::mem::replace(&mut *lock(&total), Tally::new(frame));
            tally.late_sends = late.load(Ordering::Relaxed);
            tally
        }
    };
    let rates = tally.rates(budget, Instant::now());
    let (concurrency, rate, label) = match mode {
        Mode::Closed { concurrency } => (Some(concurrency), None, format!("concurrency {concurrency}")),
        Mode::Open { rate, .. } => (None, Some(rate), format!("rate {rate}/s")),
    };
    StepResult {
        label,
        concurrency,
        rate,
        protocol: String::new(),
        ok: tally.ok,
        errors: tally.errors,
        seconds: rates.seconds,
        throughput: rates.throughput,
        inferences_per_second: rates.inferences_per_second,
        drain_seconds: rates.drain_seconds,
        latency_us: Percentiles::of(&tally.hist),
        started_unix_s,
        late_sends: tally.late_sends,
        requests: tally.log.unwrap_or_default(),
    }
}

/// The tally, whether or not a request that held it panicked (what it had counted stays).
fn lock(tally: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    tally.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(start: Instant, end: Option<Instant>) -> Frame {
        Frame { start, end, log: true, cap: DEFAULT_CAP }
    }

    fn answered(start: Instant, at_ms: u64, rows: u64) -> Outcome {
        Outcome { started: start, done: start + Duration::from_millis(at_ms), result: Ok(rows) }
    }

    /// A step that ran out of time is rated over its duration with the answers that came back
    /// in it: one answer 29 s late (a stalled request, up to the timeout) does not divide the
    /// others' rate by 30, and shows as the drain.
    #[test]
    fn a_timed_step_is_rated_over_its_send_window() {
        let start = Instant::now();
        let end = start + Duration::from_secs(1);
        let mut t = Tally::new(frame(start, Some(end)));
        for ms in (50..=950).step_by(100) {
            t.add(answered(start, ms, 2));
        }
        t.add(Outcome { started: start, done: end, result: Err("http 503".into()) });
        t.add(answered(start, 30_000, 2));
        let r = t.rates(u64::MAX, start + Duration::from_secs(31));
        let want = Rates { seconds: 1.0, throughput: 10.0, inferences_per_second: 20.0, drain_seconds: 29.0 };
        assert_eq!(r, want);
        assert_eq!(t.ok, 11, "the late answer counts as answered");
        assert_eq!(t.log.as_ref().map(Vec::len), Some(12));
        // Merged from workers' tallies, the same.
        let mut merged = Tally::new(frame(start, Some(end)));
        merged.merge(t);
        assert_eq!(merged.rates(u64::MAX, start + Duration::from_secs(31)), want);
    }

    /// A step that sent its whole request budget is rated over every answer, until the last,
    /// whatever its duration: exact.
    #[test]
    fn a_counted_step_is_rated_over_every_answer() {
        let start = Instant::now();
        let mut t = Tally::new(frame(start, Some(start + Duration::from_secs(1))));
        for ms in [100, 200, 1_500, 3_900] {
            t.add(answered(start, ms, 1));
        }
        let r = t.rates(4, start + Duration::from_secs(4));
        assert_eq!(
            r,
            Rates { seconds: 4.0, throughput: 1.0, inferences_per_second: 1.0, drain_seconds: 0.0 }
        );
        // Not bound by time at all: the same.
        let mut t = Tally::new(frame(start, None));
        t.add(answered(start, 1_000, 3));
        let r = t.rates(u64::MAX, start + Duration::from_secs(2));
        assert_eq!(
            r,
            Rates { seconds: 2.0, throughput: 0.5, inferences_per_second: 1.5, drain_seconds: 0.0 }
        );
    }
}
