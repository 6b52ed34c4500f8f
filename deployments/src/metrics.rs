//! Every metric Sluice exports: names, units, help text and histogram buckets in one place,
//! and per-deployment handles created once so the request path records without allocating.
//! Triton-style counters for `/v2/models/{m}/stats` come from the same places.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};

use crate::ErrorKind;

pub const REQUESTS: &str = "sluice_requests_total";
pub const REQUEST_DURATION: &str = "sluice_request_duration_seconds";
pub const QUEUE_DURATION: &str = "sluice_queue_duration_seconds";
pub const INFERENCE_DURATION: &str = "sluice_inference_duration_seconds";
pub const BATCH_SIZE: &str = "sluice_batch_size";
pub const QUEUE_DEPTH: &str = "sluice_queue_depth";
pub const REPLICA_IN_FLIGHT: &str = "sluice_replica_in_flight";
pub const REPLICAS_READY: &str = "sluice_replicas_ready";
pub const REPLICAS: &str = "sluice_replicas";
pub const REPLICA_RESTARTS: &str = "sluice_replica_restarts_total";
pub const ROLLBACKS: &str = "sluice_canary_rollbacks_total";
pub const CANARY_WEIGHT: &str = "sluice_canary_weight_percent";
pub const MULTIPLEX_REQUESTS: &str = "sluice_multiplex_requests_total";
pub const MULTIPLEX_LOADS: &str = "sluice_multiplex_loads_total";
pub const MULTIPLEX_EVICTIONS: &str = "sluice_multiplex_evictions_total";
pub const MULTIPLEX_LOAD_DURATION: &str = "sluice_multiplex_load_duration_seconds";
pub const SHADOW_REQUESTS: &str = "sluice_shadow_requests_total";
pub const SHADOW_DURATION: &str = "sluice_shadow_duration_seconds";
pub const SHADOW_ROWS: &str = "sluice_shadow_rows_total";
pub const SHADOW_MAX_ABS_DIFF: &str = "sluice_shadow_max_abs_diff";
pub const REPOSITORY_UP: &str = "sluice_repository_up";
pub const REPOSITORY_SCANS: &str = "sluice_repository_scans_total";
pub const REPOSITORY_DOWNLOADED_BYTES: &str = "sluice_repository_downloaded_bytes_total";
pub const REPOSITORY_REJECTED: &str = "sluice_repository_rejected_versions_total";
pub const BODY_BYTES_READING: &str = "sluice_request_body_bytes_reading";
pub const BODIES_REFUSED: &str = "sluice_request_bodies_refused_total";

/// Histogram bucket bounds, by metric name.
pub const BUCKETS: &[(&str, &[f64])] = &[
    (REQUEST_DURATION, LATENCY_BUCKETS),
    (QUEUE_DURATION, LATENCY_BUCKETS),
    (INFERENCE_DURATION, LATENCY_BUCKETS),
    (BATCH_SIZE, &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
    (SHADOW_DURATION, LATENCY_BUCKETS),
    (MULTIPLEX_LOAD_DURATION, LATENCY_BUCKETS),
];

/// Up to two minutes: a request that waits out the default `request_timeout_s` (30 s) has a
/// bucket below `+Inf`, and so has a multiplexed model's load (they read as 10 s, the last one,
/// when it was).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

/// Registers units and help text with the installed recorder (call once at start).
pub fn describe() {
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Inference requests by model, version, protocol (rest, grpc) and outcome (success, invalid, not_found, unavailable, deadline_exceeded, internal, cancelled)"
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from decoding a request to its answer, by model, version and protocol"
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time a request waited between admission and its model call"
    );
    describe_histogram!(
        INFERENCE_DURATION,
        Unit::Seconds,
        "Time of one model call (one batch), including concatenation and splitting"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Rows per model call");
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Requests admitted and waiting for a replica slot, per deployment"
    );
    describe_gauge!(
        REPLICA_IN_FLIGHT,
        Unit::Count,
        "Requests assigned to a replica and not yet answered (queued there or running)"
    );
    describe_gauge!(
        REPLICAS_READY,
        Unit::Count,
        "Replicas of a deployment that are loaded, warmed and serving"
    );
    describe_gauge!(
        REPLICAS,
        Unit::Count,
        "Replicas a deployment runs, ready or starting (0: scaled to zero on purpose)"
    );
    describe_counter!(
        REPLICA_RESTARTS,
        Unit::Count,
        "Replicas replaced: their model panicked, or (on Ray) their actor was lost"
    );
    describe_counter!(
        ROLLBACKS,
        Unit::Count,
        "Canary rollbacks, automatic (a rollout's bound broken) or by hand, by model"
    );
    describe_gauge!(
        CANARY_WEIGHT,
        Unit::Percent,
        "Share of unpinned traffic a model's canary version gets, by model and version; 0 once it is rolled back, promoted or removed"
    );
    describe_counter!(
        MULTIPLEX_REQUESTS,
        Unit::Count,
        "Batches of a multiplexed deployment by cache (hit: the replica held the model, miss: it loaded it)"
    );
    describe_counter!(MULTIPLEX_LOADS, Unit::Count, "Models a multiplexed deployment's replicas loaded");
    describe_counter!(
        MULTIPLEX_EVICTIONS,
        Unit::Count,
        "Models evicted to make room (least recently used first)"
    );
    describe_histogram!(
        MULTIPLEX_LOAD_DURATION,
        Unit::Seconds,
        "Time to load one model of a multiplexed deployment"
    );
    describe_counter!(
        SHADOW_REQUESTS,
        Unit::Count,
        "Requests copied to a shadow version, by model, version (the shadow's) and outcome (compared, dropped: the shadow was busy, error)"
    );
    describe_histogram!(
        SHADOW_DURATION,
        Unit::Seconds,
        "Time the shadow version took to answer a copied request"
    );
    describe_counter!(
        SHADOW_ROWS,
        Unit::Count,
        "Rows compared between primary and shadow, by agree (true: same argmax, or same value for integer outputs)"
    );
    describe_gauge!(
        SHADOW_MAX_ABS_DIFF,
        Unit::Count,
        "Largest absolute difference seen between primary and shadow outputs"
    );
    describe_gauge!(
        REPOSITORY_UP,
        Unit::Count,
        "1 when the last listing of a model repository (label: its URL) succeeded, 0 when it failed"
    );
    describe_counter!(
        REPOSITORY_SCANS,
        Unit::Count,
        "Listings of the model repository by outcome (ok, error)"
    );
    describe_counter!(
        REPOSITORY_DOWNLOADED_BYTES,
        Unit::Bytes,
        "Bytes fetched from the model repository into this node's cache"
    );
    describe_counter!(
        REPOSITORY_REJECTED,
        Unit::Count,
        "Repository versions rejected by model: failed to load, or canary rolled back"
    );
    describe_gauge!(
        BODY_BYTES_READING,
        Unit::Bytes,
        "Request body bytes the frontends hold while reading bodies (http_options.max_body_bytes_in_flight bounds them)"
    );
    describe_counter!(
        BODIES_REFUSED,
        Unit::Count,
        "Request bodies refused because reading them would pass http_options.max_body_bytes_in_flight"
    );
}

/// The frontends that count requests.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Rest = 0,
    Grpc = 1,
}

const PROTOCOLS: [&str; 2] = ["rest", "grpc"];
const OUTCOMES: [&str; 7] =
    ["success", "invalid", "not_found", "unavailable", "deadline_exceeded", "internal", "cancelled"];
/// The index of `cancelled` in [`OUTCOMES`]: the client went away before its answer.
const CANCELLED: usize = 6;
/// The index of `internal` in [`OUTCOMES`].
const INTERNAL: usize = 5;

fn outcome_index(result: Result<(), ErrorKind>) -> usize {
    match result {
        Ok(()) => 0,
        Err(ErrorKind::InvalidArgument | ErrorKind::Conflict | ErrorKind::Unimplemented) => 1,
        Err(ErrorKind::NotFound) => 2,
        Err(ErrorKind::Unavailable) => 3,
        Err(ErrorKind::DeadlineExceeded) => 4,
        Err(ErrorKind::Internal) => 5,
    }
}

/// How many [`DeploymentMetrics`] each (model, version) has now. A pair at 0 was retired: its
/// deployment (a version swapped out, a canary removed, a model deleted) drained and was
/// dropped. The exporter keeps every series it was given; `/metrics` leaves these out
/// ([`retired`]), or `sluice_replicas_ready` at 0 for a retired version would fire the
/// no-ready-replica alert for good, and dashboards would list every version ever served.
fn live() -> std::sync::MutexGuard<'static, HashMap<(String, String), usize>> {
    static LIVE: std::sync::OnceLock<Mutex<HashMap<(String, String), usize>>> = std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many handles each (model, version, replica id) in-flight series has now: one per
/// replica slot, two while a same-version swap's old and new replica of one id overlap. The
/// autoscaler adds and removes replicas under new ids; `/metrics` leaves out the series of
/// those gone ([`gone_replicas`]), or they would pile up at 0 for as long as the version
/// serves.
fn live_replicas() -> std::sync::MutexGuard<'static, HashMap<ReplicaKey, usize>> {
    static LIVE: std::sync::OnceLock<Mutex<HashMap<ReplicaKey, usize>>> = std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many owners each (label, value) of the series not labelled by model and version has:
/// a multiplexed deployment's (`deployment`), the model repository's (`repository`). A value
/// at 0 is gone (the deployment deleted, the repository moved or removed), and `/metrics`
/// leaves its series out ([`gone_labels`]): a repository's `sluice_repository_up` at 0 stayed
/// for good after it moved, and an alert on it fired for good.
fn live_labels() -> std::sync::MutexGuard<'static, HashMap<(&'static str, String), usize>> {
    static LIVE: std::sync::OnceLock<Mutex<HashMap<(&'static str, String), usize>>> =
        std::sync::OnceLock::new();
    LIVE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The series labelled `label="value"` are live while this lives.
#[derive(Debug)]
pub struct LabelOwner {
    key: (&'static str, String),
}

impl LabelOwner {
    pub fn new(label: &'static str, value: &str) -> Self {
        let key = (label, value.to_string());
        *live_labels().entry(key.clone()).or_insert(0) += 1;
        Self { key }
    }

    /// The value it keeps live.
    pub fn value(&self) -> &str {
        &self.key.1
    }
}

impl Drop for LabelOwner {
    fn drop(&mut self) {
        if let Some(n) = live_labels().get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The (label, value) pairs whose series are gone ([`LabelOwner`]).
pub fn gone_labels() -> HashSet<(&'static str, String)> {
    live_labels().iter().filter(|(_, n)| **n == 0).map(|(key, _)| key.clone()).collect()
}

/// A replica's series: (model, version, replica id).
type ReplicaKey = (String, String, String);

/// The (model, version, replica id) in-flight series whose replicas are gone.
pub fn gone_replicas() -> HashSet<ReplicaKey> {
    live_replicas().iter().filter(|(_, n)| **n == 0).map(|(key, _)| key.clone()).collect()
}

/// A replica's in-flight gauge; its series counts as gone once every handle is dropped.
pub(crate) struct ReplicaGauge {
    pub gauge: Gauge,
    key: ReplicaKey,
}

impl Drop for ReplicaGauge {
    fn drop(&mut self) {
        if let Some(n) = live_replicas().get_mut(&self.key) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The (model, version) pairs whose deployments are all gone (see [`live`]); a pair served
/// again is live again.
pub fn retired() -> HashSet<(String, String)> {
    live().iter().filter(|(_, n)| **n == 0).map(|(pair, _)| pair.clone()).collect()
}

impl Drop for DeploymentMetrics {
    fn drop(&mut self) {
        if let Some(n) = live().get_mut(&(self.model.clone(), self.version.clone())) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One request being counted ([`DeploymentMetrics::counted`]). A request whose future is
/// dropped before its answer (the client closed the connection, or cancelled the gRPC call)
/// is counted as `cancelled`, with the time it had taken: otherwise the requests clients gave
/// up on (the slowest, under overload) would be missing from the counts, the latency histogram
/// and the canary's p99 gate.
pub struct Counted<'a> {
    metrics: &'a DeploymentMetrics,
    protocol: Protocol,
    started: Instant,
    answered: bool,
}

impl Counted<'_> {
    /// Records the request's outcome.
    pub fn answered(mut self, result: Result<(), ErrorKind>) {
        self.answered = true;
        self.metrics.request(self.protocol, result, self.started.elapsed());
    }

    /// The request, counted on `to` instead (routed again to what replaced its first
    /// deployment: it is that one's request, and its outcome that one's, for a canary's gates
    /// too). Nothing is recorded on the first.
    pub fn moved(mut self, to: &DeploymentMetrics) -> Counted<'_> {
        self.answered = true;
        to.counted(self.protocol, self.started)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        if !self.answered {
            // Dropped by a panic in its handler (answered 500 by the frontend): the server's
            // failure, counted as one (the canary's error gate reads it), not a client gone.
            let (outcome, error) = match std::thread::panicking() {
                true => (INTERNAL, Some(ErrorKind::Internal)),
                false => (CANCELLED, None),
            };
            self.metrics.record(self.protocol, outcome, error, self.started.elapsed());
        }
    }
}

/// A count and a total time, as Triton's statistics report them.
#[derive(Default)]
pub struct Duration64 {
    pub count: AtomicU64,
    pub ns: AtomicU64,
}

impl Duration64 {
    fn add(&self, d: Duration) {
        self.add_n(1, d);
    }

    /// `n` more, each of which took `d`.
    fn add_n(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Ordering::Relaxed);
        self.ns.fetch_add(n.saturating_mul(d.as_nanos() as u64), Ordering::Relaxed);
    }
}

/// Where the time of one successful model call went, in Triton's three compute stages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimes {
    /// Concatenating (and padding) the batch's inputs and copying them into the framework.
    pub input: Duration,
    /// Running the model.
    pub infer: Duration,
    /// Copying the outputs out of the framework and cutting them back into each request's rows.
    pub output: Duration,
}

/// Triton's statistics of the model calls of one batch size.
#[derive(Default)]
pub struct BatchSizeStats {
    pub compute_input: Duration64,
    pub compute_infer: Duration64,
    pub compute_output: Duration64,
}

/// Triton-style cumulative statistics of a deployment, with Triton's meaning: the `success`,
/// `fail`, `queue` and `compute_*` counts are requests (each request of a batch is charged the
/// batch's compute times), while `execution_count` and `batch_sizes` count model calls.
pub struct Stats {
    pub success: Duration64,
    pub fail: Duration64,
    pub queue: Duration64,
    pub compute_input: Duration64,
    pub compute_infer: Duration64,
    pub compute_output: Duration64,
    /// Successful model calls by batch size in rows: entry `i` is batch size `i + 1`, up to
    /// the deployment's `max_batch_size` or [`BATCH_STATS_MAX_SIZE`], whichever is smaller
    /// (allocated once, so recording never allocates; larger batches count only in the totals).
    pub batch_sizes: Box<[BatchSizeStats]>,
    /// Rows run through the model by successful calls.
    pub inference_count: AtomicU64,
    /// Successful model calls (batches).
    pub execution_count: AtomicU64,
    /// Milliseconds since the epoch of the last model call.
    pub last_inference_ms: AtomicU64,
    /// Failures that are the server's or the model's (internal errors, and requests answered 504
    /// past their deadline), apart from bad requests, overload (503: a full queue is the
    /// canary's few replicas under the traffic a rollout moves to it, not a fault of its model)
    /// and callers that gave up: what a canary rollout judges. A canary slower than its
    /// `request_timeout_s` fails its gate; it would otherwise have no request counted, and hold
    /// its weight for good.
    pub server_errors: AtomicU64,
}

/// The largest batch size `batch_stats` breaks out: 48 bytes per size per deployment.
pub const BATCH_STATS_MAX_SIZE: usize = 1024;

impl Stats {
    /// Statistics for batches of up to `max_rows` rows (at least 1; per-size entries up to
    /// [`BATCH_STATS_MAX_SIZE`]).
    pub fn new(max_rows: usize) -> Self {
        Self {
            success: Duration64::default(),
            fail: Duration64::default(),
            queue: Duration64::default(),
            compute_input: Duration64::default(),
            compute_infer: Duration64::default(),
            compute_output: Duration64::default(),
            batch_sizes: (0..max_rows.clamp(1, BATCH_STATS_MAX_SIZE))
                .map(|_| BatchSizeStats::default())
                .collect(),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
        }
    }

    /// Records one successful model call of `rows` rows answering `requests` requests.
    fn executed(&self, rows: usize, requests: usize, stages: StageTimes) {
        let n = requests as u64;
        self.compute_input.add_n(n, stages.input);
        self.compute_infer.add_n(n, stages.infer);
        self.compute_output.add_n(n, stages.output);
        if let Some(b) = rows.checked_sub(1).and_then(|i| self.batch_sizes.get(i)) {
            b.compute_input.add(stages.input);
            b.compute_infer.add(stages.infer);
            b.compute_output.add(stages.output);
        }
        self.inference_count.fetch_add(rows as u64, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Request latencies in log-spaced buckets (16 per doubling: each 4.4 % wide, 1 µs to ~70 min),
/// counted with atomics so recording costs no lock; a controller diffs snapshots to get an
/// interval's percentiles. (With 4 per doubling, 19 % wide, a canary whose every request took
/// 46.5 ms read a p99 of 55 ms against a `max_p99_ms` of 50, and was rolled back.)
pub struct LatencyBuckets {
    counts: Vec<AtomicU64>,
}

const BUCKETS_PER_DOUBLING: f64 = 16.0;
const LATENCY_BUCKET_COUNT: usize = 512;

impl Default for LatencyBuckets {
    fn default() -> Self {
        Self { counts: (0..LATENCY_BUCKET_COUNT).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl LatencyBuckets {
    fn index(d: Duration) -> usize {
        let us = d.as_secs_f64() * 1e6;
        if us <= 1.0 {
            return 0;
        }
        ((us.log2() * BUCKETS_PER_DOUBLING).ceil() as usize).min(LATENCY_BUCKET_COUNT - 1)
    }

    pub fn record(&self, d: Duration) {
        self.counts[Self::index(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// The `q` quantile (0..1) of the requests between two snapshots, as the upper bound of its
    /// bucket; `None` when there were none.
    pub fn quantile(before: &[u64], after: &[u64], q: f64) -> Option<Duration> {
        let diff: Vec<u64> = after.iter().zip(before).map(|(a, b)| a.saturating_sub(*b)).collect();
        Self::quantile_of(&diff, q)
    }

    /// The `q` quantile (0..1) of the requests `diff` holds by bucket.
    pub fn quantile_of(diff: &[u64], q: f64) -> Option<Duration> {
        // Saturating: a rollout's counts come from proxies' reports too.
        let total = diff.iter().fold(0u64, |a, &n| a.saturating_add(n));
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, n) in diff.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= rank {
                return Some(Duration::from_secs_f64(2f64.powf(i as f64 / BUCKETS_PER_DOUBLING) / 1e6));
            }
        }
        None
    }
}

/// Handles for one deployment's metrics.
pub struct DeploymentMetrics {
    requests: Vec<Counter>,
    request_duration: Vec<Histogram>,
    queue_duration: Histogram,
    inference_duration: Histogram,
    batch_size: Histogram,
    pub(crate) queue_depth: Gauge,
    pub(crate) replicas_ready: Gauge,
    /// Replicas in the set, ready or not.
    pub(crate) replicas_running: Gauge,
    pub(crate) restarts: Counter,
    model: String,
    version: String,
    pub stats: Stats,
    /// Latencies of answered requests, for rollout decisions.
    pub latencies: LatencyBuckets,
}

impl DeploymentMetrics {
    /// Handles for `model` at `version`, whose model calls take at most `max_rows` rows.
    pub fn new(model: &str, version: &str, max_rows: usize) -> Self {
        Self::with_replicas(model, version, max_rows, true)
    }

    /// Without `replicas`, the replica and model-call series (ready replicas, queue depth,
    /// restarts, queue time, model calls, batch sizes) are not registered and their handles do
    /// nothing.
    fn with_replicas(model: &str, version: &str, max_rows: usize, replicas: bool) -> Self {
        let (m, v) = (model.to_string(), version.to_string());
        *live().entry((m.clone(), v.clone())).or_insert(0) += 1;
        let mut requests = Vec::new();
        for protocol in PROTOCOLS {
            for outcome in OUTCOMES {
                requests.push(metrics::counter!(REQUESTS, "model" => m.clone(), "version" => v.clone(), "protocol" => protocol, "outcome" => outcome));
            }
        }
        let request_duration = PROTOCOLS
            .iter()
            .map(|&p| metrics::histogram!(REQUEST_DURATION, "model" => m.clone(), "version" => v.clone(), "protocol" => p))
            .collect();
        // A series of the deployment's own replicas and model calls: registered with `replicas`,
        // else a handle that does nothing.
        macro_rules! own {
            ($register:ident, $handle:ident, $name:expr) => {
                match replicas {
                    true => metrics::$register!($name, "model" => m.clone(), "version" => v.clone()),
                    false => $handle::noop(),
                }
            };
        }
        Self {
            requests,
            request_duration,
            // A pipeline's model calls are its steps', in their series: its own end-to-end time
            // read as one "model call" of its name.
            queue_duration: own!(histogram, Histogram, QUEUE_DURATION),
            inference_duration: own!(histogram, Histogram, INFERENCE_DURATION),
            batch_size: own!(histogram, Histogram, BATCH_SIZE),
            queue_depth: own!(gauge, Gauge, QUEUE_DEPTH),
            replicas_ready: own!(gauge, Gauge, REPLICAS_READY),
            replicas_running: own!(gauge, Gauge, REPLICAS),
            restarts: own!(counter, Counter, REPLICA_RESTARTS),
            model: m,
            version: v,
            stats: Stats::new(max_rows),
            latencies: LatencyBuckets::default(),
        }
    }

    /// Handles for a pipeline: no replicas, queue, restarts or model calls of its own (its
    /// steps' deployments have them), so none of those series; `sluice_replicas_ready` at 0 for a pipeline read as
    /// "no ready replica" to the shipped alert.
    pub fn pipeline(name: &str) -> Self {
        Self::with_replicas(name, "1", 1, false)
    }

    /// A replica's in-flight gauge, its series in `/metrics` while the handle lives (see
    /// [`gone_replicas`]).
    pub(crate) fn replica_in_flight(&self, replica: usize) -> ReplicaGauge {
        let key = (self.model.clone(), self.version.clone(), replica.to_string());
        *live_replicas().entry(key.clone()).or_default() += 1;
        let gauge = metrics::gauge!(REPLICA_IN_FLIGHT, "model" => key.0.clone(), "version" => key.1.clone(), "replica" => key.2.clone());
        ReplicaGauge { gauge, key }
    }

    /// Starts counting one request (the frontend's, which knows the protocol): it is recorded
    /// by [`Counted::answered`], or as `cancelled` if dropped before (the client went away).
    pub fn counted(&self, protocol: Protocol, started: Instant) -> Counted<'_> {
        Counted { metrics: self, protocol, started, answered: false }
    }

    /// Records one answered request (called by the frontend, which knows the protocol).
    pub fn request(&self, protocol: Protocol, result: Result<(), ErrorKind>, elapsed: Duration) {
        self.record(protocol, outcome_index(result), result.err(), elapsed);
    }

    fn record(&self, protocol: Protocol, outcome: usize, error: Option<ErrorKind>, elapsed: Duration) {
        let p = protocol as usize;
        self.requests[p * OUTCOMES.len() + outcome].increment(1);
        self.request_duration[p].record(elapsed.as_secs_f64());
        self.latencies.record(elapsed);
        if outcome == 0 {
            self.stats.success.add(elapsed);
        } else {
            self.stats.fail.add(elapsed);
            if matches!(error, Some(ErrorKind::Internal | ErrorKind::DeadlineExceeded)) {
                self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A request that queues nowhere of its own (a pipeline's): counted in Triton's queue
    /// statistics with no wait, not in the queue histogram.
    pub(crate) fn entered(&self) {
        self.stats.queue.add(Duration::ZERO);
    }

    pub(crate) fn queued(&self, waited: Duration) {
        self.queue_duration.record(waited.as_secs_f64());
        self.stats.queue.add(waited);
    }

    /// Records one model call of `rows` rows for `requests` requests that took `took` in all;
    /// `stages` says where the time went when the call succeeded (`None`: it failed).
    /// One request's successful call of its own (its batch failed, and each of its requests ran
    /// alone).
    pub(crate) fn batch(&self, rows: usize, requests: usize, took: Duration, stages: Option<StageTimes>) {
        self.batch_size.record(rows as f64);
        self.inference_duration.record(took.as_secs_f64());
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.stats.last_inference_ms.store(ms, Ordering::Relaxed);
        if let Some(stages) = stages {
            self.stats.executed(rows, requests, stages);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request that waits out the default deadline, and a slow multiplexed load, each have a
    /// bucket below `+Inf` (the last was 10 s: a 30 s wait read as 10 s in every quantile).
    #[test]
    fn the_latency_buckets_reach_past_the_default_deadline() {
        let deadline = sluice_config::ReplicaSettings::default().request_timeout_s;
        assert!(LATENCY_BUCKETS.iter().any(|&b| b >= deadline));
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    /// What a canary's gate counts as its failures: internal errors and deadlines; not bad
    /// requests, unknown names, overload or callers that gave up.
    #[test]
    fn a_canary_gate_counts_the_servers_failures_only() {
        let m = DeploymentMetrics::new("gate-test", "1", 1);
        let ms = Duration::from_millis(1);
        for kind in [ErrorKind::Internal, ErrorKind::DeadlineExceeded, ErrorKind::Unavailable] {
            m.request(Protocol::Rest, Err(kind), ms);
        }
        m.request(Protocol::Rest, Err(ErrorKind::InvalidArgument), ms);
        m.request(Protocol::Rest, Err(ErrorKind::NotFound), ms);
        m.request(Protocol::Rest, Ok(()), ms);
        drop(m.counted(Protocol::Rest, Instant::now()));
        assert_eq!(m.stats.server_errors.load(Ordering::Relaxed), 2);
        assert_eq!(m.stats.success.count.load(Ordering::Relaxed), 1);
        // A request whose handler panicked (the frontend answers 500) is the server's failure.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _counted = m.counted(Protocol::Rest, Instant::now());
            panic!("a broken handler");
        }));
        assert!(panicked.is_err());
        assert_eq!(m.stats.server_errors.load(Ordering::Relaxed), 3);
    }

    /// A request routed again after a swap is counted on what replaced its first deployment,
    /// its outcome too (a failure there is that version's, for its canary gate), and not on
    /// the first at all (not even as a request gone).
    #[test]
    fn a_request_moved_is_counted_where_it_went() {
        let (first, then) =
            (DeploymentMetrics::new("moved", "1", 1), DeploymentMetrics::new("moved", "2", 1));
        first.counted(Protocol::Grpc, Instant::now()).moved(&then).answered(Err(ErrorKind::Internal));
        let count = |m: &DeploymentMetrics| {
            (
                m.stats.success.count.load(Ordering::Relaxed) + m.stats.fail.count.load(Ordering::Relaxed),
                m.stats.server_errors.load(Ordering::Relaxed),
            )
        };
        assert_eq!(count(&then), (1, 1));
        assert_eq!(count(&first), (0, 0));
    }

    #[test]
    fn latency_quantiles_from_bucket_snapshots() {
        let b = LatencyBuckets::default();
        let before = b.snapshot();
        for ms in 1..=100u64 {
            b.record(Duration::from_millis(ms));
        }
        let after = b.snapshot();
        let p50 = LatencyBuckets::quantile(&before, &after, 0.5).unwrap();
        let p99 = LatencyBuckets::quantile(&before, &after, 0.99).unwrap();
        // Bucket upper bounds: within 19% (2^(1/4)) above the true value.
        assert!(p50 >= Duration::from_millis(50) && p50 <= Duration::from_millis(60), "{p50:?}");
        assert!(p99 >= Duration::from_millis(99) && p99 <= Duration::from_millis(118), "{p99:?}");
        assert_eq!(LatencyBuckets::quantile(&after, &after, 0.5), None);
    }

    #[test]
    fn stats_charge_each_request_the_batch_stages_and_count_calls_by_batch_size() {
        let s = Stats::new(4);
        let ms = Duration::from_millis;
        s.executed(3, 2, StageTimes { input: ms(1), infer: ms(10), output: ms(2) });
        s.executed(1, 1, StageTimes { input: ms(1), infer: ms(5), output: ms(1) });
        s.executed(9, 1, StageTimes::default()); // above max_batch_size: no batch entry
        let get = |d: &Duration64| (d.count.load(Ordering::Relaxed), d.ns.load(Ordering::Relaxed));
        // Per request: the batch of 3 rows answered 2 requests, each charged its times.
        assert_eq!(get(&s.compute_input), (4, 3_000_000));
        assert_eq!(get(&s.compute_infer), (4, 25_000_000));
        assert_eq!(get(&s.compute_output), (4, 5_000_000));
        // Per model call, by rows.
        assert_eq!(get(&s.batch_sizes[2].compute_infer), (1, 10_000_000));
        assert_eq!(get(&s.batch_sizes[0].compute_output), (1, 1_000_000));
        assert_eq!(get(&s.batch_sizes[1].compute_infer), (0, 0));
        assert_eq!(s.inference_count.load(Ordering::Relaxed), 13);
        assert_eq!(s.execution_count.load(Ordering::Relaxed), 3);
        assert_eq!(Stats::new(0).batch_sizes.len(), 1, "unbatched models run batches of 1");
        assert_eq!(Stats::new(1 << 30).batch_sizes.len(), BATCH_STATS_MAX_SIZE, "bounded");
    }
}
