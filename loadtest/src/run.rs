//! The load engines. Closed loop: a fixed number of workers, each sending its next request when
//! the last one is answered. Open loop: requests sent on a schedule (constant or Poisson
//! arrivals) whatever the answers, latency measured from each request's scheduled send time so
//! that a slow server cannot hide its queueing (no coordinated omission).
//! Every step stops by itself: after its duration or its request count.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::Mutex;

use crate::client::{Client, Worker};
use crate::codec::{Prepared, matches};
use crate::stats::{Percentiles, RequestRecord, StepResult, histogram, record};

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
    /// How long one request may take; past it, it counts as a `timeout` error. None: no bound.
    pub timeout: Option<Duration>,
}

/// Outstanding requests an open-loop step allows before it counts sends as `overrun` (each
/// outstanding REST request holds a connection).
pub const MAX_OUTSTANDING: u64 = 4_096;

struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    rows: u64,
    errors: BTreeMap<String, u64>,
    /// The step's start and its requests, when it logs them.
    log: Option<(Instant, Vec<RequestRecord>)>,
}

impl Tally {
    fn new(log_from: Option<Instant>) -> Self {
        Self {
            hist: histogram(),
            ok: 0,
            rows: 0,
            errors: BTreeMap::new(),
            log: log_from.map(|t| (t, Vec::new())),
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.hist.add(&other.hist);
        self.ok += other.ok;
        self.rows += other.rows;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if let (Some((_, mine)), Some((_, theirs))) = (&mut self.log, other.log) {
            mine.extend(theirs);
        }
    }

    fn failed(&mut self, kind: String, started: Instant) {
        self.log_request(started, Some(&kind));
        *self.errors.entry(kind).or_default() += 1;
    }

    fn log_request(&mut self, started: Instant, error: Option<&str>) {
        if let Some((step, log)) = &mut self.log {
            log.push(RequestRecord {
                sent: started.saturating_duration_since(*step),
                latency: started.elapsed(),
                error: error.map(str::to_string),
            });
        }
    }
}

async fn one(
    sender: Sender<'_, '_>,
    p: &Prepared,
    options: StepOptions,
    tally: &mut Tally,
    started: Instant,
) {
    let decode = options.check && p.expected.is_some();
    // Bounded from the scheduled send time, like the latency.
    let until = options.timeout.map(|t| started + t);
    let result = match sender {
        Sender::Shared(client) => bounded(until, client.send(p, decode)).await,
        Sender::Own(worker) => {
            let result = bounded(until, worker.send(p, decode)).await;
            if result.as_ref().is_err_and(|e| e == TIMEOUT) {
                // Its connection still waits for that answer: the next request gets a new one.
                worker.disconnect();
            }
            result
        }
    };
    match result {
        Ok(outputs) => {
            if let (Some(got), Some(want)) = (outputs, &p.expected)
                && !matches(&got, want, p.tolerance)
            {
                tally.failed("mismatch".into(), started);
                return;
            }
            record(&mut tally.hist, started.elapsed());
            tally.log_request(started, None);
            tally.ok += 1;
            tally.rows += p.rows;
        }
        Err(kind) => tally.failed(kind, started),
    }
}

/// The error kind of a request that took longer than the step's timeout.
const TIMEOUT: &str = "timeout";

/// `send`, or the `timeout` error once `until` passes.
async fn bounded<T>(
    until: Option<Instant>,
    send: impl std::future::Future<Output = Result<T, crate::client::ErrorKind>>,
) -> Result<T, crate::client::ErrorKind> {
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
    let log_from = options.request_log.then_some(start);
    let end = limits.duration.map(|d| start + d);
    let issued = Arc::new(AtomicU64::new(0));
    let budget = limits.requests.unwrap_or(u64::MAX);
    let tally = match mode {
        Mode::Closed { concurrency } => {
            let mut workers = Vec::new();
            for w in 0..concurrency {
                let (client, cases, issued, progress) =
                    (client.clone(), cases.clone(), issued.clone(), progress.clone());
                workers.push(tokio::spawn(async move {
                    let mut tally = Tally::new(log_from);
                    let mut worker = client.worker();
                    worker.connect().await;
                    loop {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        if n >= budget || end.is_some_and(|e| Instant::now() >= e) {
                            break;
                        }
                        let p = &cases[(n as usize + w) % cases.len()];
                        one(Sender::Own(&mut worker), p, options, &mut tally, Instant::now()).await;
                        if let Some(pb) = &progress {
                            pb.inc(1);
                        }
                    }
                    tally
                }));
            }
            let mut total = Tally::new(log_from);
            for w in workers {
                if let Ok(t) = w.await {
                    total.merge(t);
                }
            }
            total
        }
        Mode::Open { rate, poisson } => {
            let total = Arc::new(Mutex::new(Tally::new(log_from)));
            let outstanding = Arc::new(AtomicU64::new(0));
            // Paced on a thread of its own: tokio's timer ticks in whole milliseconds, so a send
            // timed by it went out up to a millisecond late, and latency (measured from the
            // scheduled time, so that a slow server cannot hide its queue) carried that delay.
            // The thread's sleep wakes within tens of microseconds.
            let runtime = tokio::runtime::Handle::current();
            let total_for_pacer = total.clone();
            let pacer = tokio::task::spawn_blocking(move || {
                let total = total_for_pacer;
                let mut rng = 0x2545_F491_4F6C_DD1Du64;
                let mut next = start;
                let mut tasks = Vec::new();
                let mut n = 0u64;
                while n < budget && end.is_none_or(|e| next < e) {
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
                    next += Duration::from_secs_f64(gap);
                    if outstanding.load(Ordering::Relaxed) >= MAX_OUTSTANDING {
                        total.blocking_lock().failed("overrun".into(), scheduled);
                        n += 1;
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    let (client, cases, total, outstanding, progress) =
                        (client.clone(), cases.clone(), total.clone(), outstanding.clone(), progress.clone());
                    let index = n as usize % cases.len();
                    tasks.push(runtime.spawn(async move {
                        let mut t = Tally::new(log_from);
                        one(Sender::Shared(&client), &cases[index], options, &mut t, scheduled).await;
                        total.lock().await.merge(t);
                        outstanding.fetch_sub(1, Ordering::Relaxed);
                        if let Some(pb) = progress {
                            pb.inc(1);
                        }
                    }));
                    n += 1;
                }
                tasks
            });
            for t in pacer.await.unwrap_or_default() {
                let _ = t.await;
            }
            Arc::try_unwrap(total).map(Mutex::into_inner).unwrap_or_else(|_| Tally::new(None))
        }
    };
    let seconds = start.elapsed().as_secs_f64();
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
        seconds,
        throughput: tally.ok as f64 / seconds,
        inferences_per_second: tally.rows as f64 / seconds,
        latency_us: Percentiles::of(&tally.hist),
        started_unix_s,
        requests: tally.log.map(|(_, log)| log).unwrap_or_default(),
    }
}
