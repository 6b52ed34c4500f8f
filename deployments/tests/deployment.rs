//! A deployment's request path under real concurrency, with a test backend whose speed and
//! failures the tests control: batching with exact rows back, overload shed with 503 and a
//! bounded queue, deadlines, cancelled requests skipped, a request the model refuses failing
//! alone (not its batch), and a panicking replica replaced.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_deployments::{
    Backend, BackendFactory, DataType, Deployment, DeploymentSpec, ErrorKind, InferError, InferRequest,
    InferResponse, LoadError, ModelMetadata, NamedTensor, Tensor, TensorSpec,
};

/// `y = x` for `x: INT64 [batch, 1]`, after `delay`; panics when it sees `panic_on`, and fails a
/// call that has [`REFUSED`] in it (as ONNX Runtime fails a call with an index out of range).
/// With a gate, each call first waits for the test to open it once.
struct Echo {
    meta: ModelMetadata,
    delay: Duration,
    panic_on: Option<i64>,
    log: Arc<Mutex<Vec<Vec<i64>>>>,
    gate: Option<Gate>,
}

/// Lets a test know a model call started and decide when it may finish.
#[derive(Clone)]
struct Gate {
    started: Arc<tokio::sync::Notify>,
    open: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}

/// A value [`Echo`] refuses: the whole call fails.
const REFUSED: i64 = -99;

fn values(t: &Tensor) -> Vec<i64> {
    t.data().chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

impl Backend for Echo {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        _outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        let x = &inputs[0].tensor;
        let v = values(x);
        self.log.lock().unwrap().push(v.clone());
        if let Some(g) = &self.gate {
            g.started.notify_one();
            // Bounded, so a test that fails to open it fails instead of hanging.
            let _ = g.open.lock().unwrap().recv_timeout(Duration::from_secs(10));
        }
        if self.panic_on.is_some_and(|p| v.contains(&p)) {
            panic!("poison value");
        }
        if v.contains(&REFUSED) {
            return Err(InferError::invalid(format!("the model refuses {REFUSED}")));
        }
        std::thread::sleep(self.delay);
        Ok(vec![NamedTensor { name: "y".into(), tensor: x.clone() }])
    }
}

struct Fixture {
    deployment: Arc<Deployment>,
    log: Arc<Mutex<Vec<Vec<i64>>>>,
    loads: Arc<AtomicUsize>,
}

fn start(spec: DeploymentSpec, delay_ms: u64, panic_on: Option<i64>) -> Fixture {
    start_gated(spec, delay_ms, panic_on, None)
}

/// A gate for [`start_gated`], and the sender that opens it once per call.
fn gate() -> (Gate, std::sync::mpsc::Sender<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    (Gate { started: Arc::new(tokio::sync::Notify::new()), open: Arc::new(Mutex::new(rx)) }, tx)
}

fn start_gated(spec: DeploymentSpec, delay_ms: u64, panic_on: Option<i64>, gate: Option<Gate>) -> Fixture {
    start_loading(spec, delay_ms, panic_on, gate, None)
}

/// [`start_gated`], with a load that panics: the one numbered `load_panics` (from 0).
fn start_loading(
    spec: DeploymentSpec,
    delay_ms: u64,
    panic_on: Option<i64>,
    gate: Option<Gate>,
    load_panics: Option<usize>,
) -> Fixture {
    let log = Arc::new(Mutex::new(Vec::new()));
    let loads = Arc::new(AtomicUsize::new(0));
    let (l, n) = (log.clone(), loads.clone());
    let factory: BackendFactory = Arc::new(move || {
        if Some(n.fetch_add(1, Ordering::SeqCst)) == load_panics {
            panic!("the load broke");
        }
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Int64, shape: vec![-1, 1] };
        Ok(Box::new(Echo {
            meta: ModelMetadata {
                platform: "test".into(),
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            delay: Duration::from_millis(delay_ms),
            panic_on,
            log: l.clone(),
            gate: gate.clone(),
        }) as Box<dyn Backend>)
    });
    let deployment = Arc::new(Deployment::start(spec, factory).unwrap());
    Fixture { deployment, log, loads }
}

fn request(values: &[i64]) -> InferRequest {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tensor = Tensor::new(DataType::Int64, vec![values.len(), 1], Bytes::from(data)).unwrap();
    InferRequest { inputs: vec![NamedTensor { name: "x".into(), tensor }], ..Default::default() }
}

fn spec(f: impl FnOnce(&mut DeploymentSpec)) -> DeploymentSpec {
    let mut s = DeploymentSpec::new("echo");
    s.settings.warmup = false;
    f(&mut s);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_each_gets_its_own_rows() {
    let f = start(
        spec(|s| {
            s.settings.max_batch_size = 16;
            s.settings.batch_wait_timeout_s = 0.05;
        }),
        0,
        None,
    );
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let mut tasks = Vec::new();
    for k in 0..16i64 {
        let d = f.deployment.clone();
        // One single-row request and a few multi-row ones.
        let rows: Vec<i64> = if k % 5 == 0 { vec![k * 100, k * 100 + 1] } else { vec![k * 100] };
        tasks.push(tokio::spawn(async move {
            let r = d.infer(request(&rows)).await.unwrap();
            assert_eq!(values(&r.outputs[0].tensor), rows, "request {k} got its own rows");
            assert_eq!(r.outputs[0].tensor.shape(), &[rows.len(), 1]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let batches = f.log.lock().unwrap().clone();
    assert!(batches.iter().any(|b| b.len() > 1), "some batch had more than one row: {batches:?}");
    assert!(batches.iter().all(|b| b.len() <= 16));
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 16 + 4, "every row ran exactly once");
    assert!(f.deployment.metrics().stats.execution_count.load(Ordering::Relaxed) < 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_the_queue_stays_bounded() {
    let f = start(
        spec(|s| {
            s.settings.max_ongoing_requests = 1;
            s.settings.max_queued_requests = 4;
        }),
        30,
        None,
    );
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let max_depth = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (d, m) = (f.deployment.clone(), max_depth.clone());
        tokio::spawn(async move {
            loop {
                m.fetch_max(d.queue_depth(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for k in 0..40 {
        let d = f.deployment.clone();
        tasks.push(tokio::spawn(async move { (k, d.infer(request(&[k])).await) }));
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (k, r) = t.await.unwrap();
        match r {
            Ok(r) => {
                assert_eq!(values(&r.outputs[0].tensor), vec![k]);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
                assert!(e.message.contains("max_queued_requests"), "{e}");
                refused += 1;
            }
        }
    }
    watcher.abort();
    assert!(refused > 0, "40 requests at once against 1 slot and a queue of 4");
    assert!(ok >= 5, "the running one and the 4 queued ones succeed (ok = {ok})");
    assert!(max_depth.load(Ordering::SeqCst) <= 4, "queue depth {} > 4", max_depth.load(Ordering::SeqCst));
    assert_eq!(f.log.lock().unwrap().len(), ok, "only accepted requests reached the model");
}

/// Waits (yielding) until `cond` holds; panics after 5 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(5), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_answered_504_and_never_runs() {
    // The first request holds the only slot until the test opens the gate, so the second can
    // only wait in the queue: its deadline passes there, whatever the machine's speed.
    let (gate, open) = gate();
    let f = start_gated(spec(|s| s.settings.max_ongoing_requests = 1), 0, None, Some(gate.clone()));
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let d = f.deployment.clone();
    let slow = tokio::spawn(async move { d.infer(request(&[1])).await });
    gate.started.notified().await;
    let mut late = request(&[2]);
    late.timeout = Some(Duration::from_millis(50));
    let e = f.deployment.infer(late).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::DeadlineExceeded, "{e}");
    assert!(e.message.contains("timed out"), "{e}");
    open.send(()).unwrap();
    assert!(slow.await.unwrap().is_ok());
    assert!(f.log.lock().unwrap().iter().all(|b| !b.contains(&2)), "the late request never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_caller_left_is_skipped() {
    // max_ongoing 2: the second request is handed to the replica while the first runs.
    let (gate, open) = gate();
    let f = start_gated(spec(|s| s.settings.max_ongoing_requests = 2), 0, None, Some(gate.clone()));
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let d = f.deployment.clone();
    let first = tokio::spawn(async move { d.infer(request(&[1])).await });
    gate.started.notified().await;
    let d = f.deployment.clone();
    let gone = tokio::spawn(async move { d.infer(request(&[2])).await });
    until("the second request is at the replica", || f.deployment.in_system() == 2).await;
    gone.abort();
    let _ = gone.await;
    open.send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    // A third request runs after the skipped one would have.
    open.send(()).unwrap();
    assert!(f.deployment.infer(request(&[3])).await.is_ok());
    let log = f.log.lock().unwrap().clone();
    assert!(!log.iter().any(|b| b.contains(&2)), "cancelled request reached the model: {log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_request_whose_caller_left_keeps_its_slot_until_the_model_is_done() {
    // One slot. The first request's caller leaves while the model runs it: the slot stays taken
    // until the call ends, so the next request waits in the admission queue instead of being
    // handed to the busy replica (callers that leave could otherwise fill its queue).
    let (gate, open) = gate();
    let f = start_gated(spec(|s| s.settings.max_ongoing_requests = 1), 0, None, Some(gate.clone()));
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let d = f.deployment.clone();
    let gone = tokio::spawn(async move { d.infer(request(&[1])).await });
    gate.started.notified().await;
    gone.abort();
    let _ = gone.await;
    let d = f.deployment.clone();
    let next = tokio::spawn(async move { d.infer(request(&[2])).await });
    until("the next request waits for the slot", || f.deployment.queue_depth() == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.deployment.queue_depth(), 1, "admitted while the model still ran the first");
    assert_eq!(f.log.lock().unwrap().len(), 1);
    // The first call ends (its answer has no one to go to), then the next runs.
    open.send(()).unwrap();
    open.send(()).unwrap();
    let r = next.await.unwrap().expect("the next request runs once the slot is free");
    assert_eq!(values(&r.outputs[0].tensor), vec![2]);
    assert_eq!(*f.log.lock().unwrap(), vec![vec![1], vec![2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_model_refuses_fails_alone_not_its_batch() {
    let f = start(
        spec(|s| {
            s.settings.max_batch_size = 16;
            // Long enough for the four tasks to arrive within it on a loaded machine.
            s.settings.batch_wait_timeout_s = 1.0;
        }),
        0,
        None,
    );
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let mut tasks = Vec::new();
    for rows in [vec![1], vec![2, 3], vec![REFUSED], vec![4]] {
        let d = f.deployment.clone();
        tasks.push(tokio::spawn(async move { (rows.clone(), d.infer(request(&rows)).await) }));
    }
    for t in tasks {
        match t.await.unwrap() {
            (rows, Err(e)) if rows == [REFUSED] => {
                assert_eq!(e.kind, ErrorKind::InvalidArgument);
                assert!(e.message.contains("refuses -99"), "{e}");
            }
            (rows, r) => {
                assert_eq!(values(&r.unwrap().outputs[0].tensor), rows, "its own rows, not the batch's error")
            }
        }
    }
    let calls = f.log.lock().unwrap().clone();
    assert_eq!(calls.len(), 5, "one merged call, then each request alone: {calls:?}");
    assert_eq!(calls[0].len(), 5, "the four requests were one batch: {calls:?}");
    assert_eq!(f.loads.load(Ordering::SeqCst), 1, "a refused call is no panic: the replica stays");
    // The statistics count the three calls that answered, and their four rows.
    let stats = &f.deployment.metrics().stats;
    assert_eq!(
        (stats.execution_count.load(Ordering::SeqCst), stats.inference_count.load(Ordering::SeqCst)),
        (3, 4)
    );
    assert_eq!(values(&f.deployment.infer(request(&[7])).await.unwrap().outputs[0].tensor), vec![7]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_replica_fails_its_batch_only_and_is_replaced() {
    let f = start(
        spec(|s| {
            s.num_replicas = 2;
            s.settings.max_ongoing_requests = 4;
        }),
        5,
        Some(13),
    );
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let mut tasks = Vec::new();
    for k in 0..40i64 {
        let d = f.deployment.clone();
        tasks.push(tokio::spawn(async move { (k, d.infer(request(&[k])).await) }));
    }
    for t in tasks {
        let (k, r) = t.await.unwrap();
        if k == 13 {
            let e = r.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Internal);
            assert!(e.message.contains("panicked: poison value"), "{e}");
        } else {
            // Without batching each request is its own batch: only the poison one fails.
            assert_eq!(values(&r.unwrap().outputs[0].tensor), vec![k]);
        }
    }
    // The other replica is ready all along: wait for the replacement's load itself (read at
    // once, it had not always begun on a busy machine).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while f.loads.load(Ordering::SeqCst) < 3 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await, "the replica came back");
    assert_eq!(f.loads.load(Ordering::SeqCst), 3, "two replicas at start, one replacement");
    assert!(f.deployment.infer(request(&[7])).await.is_ok());
}

/// A load that panics while a replica replaces its panicked model is a failed load, tried
/// again: the panic ended the replica's thread, its slot kept counted and never served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_a_replica_reloads_is_a_failed_load_tried_again() {
    let f = start_loading(spec(|s| s.settings.request_timeout_s = 5.0), 0, Some(13), None, Some(1));
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let e = f.deployment.infer(request(&[13])).await.unwrap_err();
    assert!(e.message.contains("panicked: poison value"), "{e}");
    let r = f.deployment.infer(request(&[7])).await;
    assert_eq!(values(&r.unwrap().outputs[0].tensor), vec![7], "served after the load was tried again");
    assert_eq!(f.loads.load(Ordering::SeqCst), 3, "at start, the panicking reload, the one after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmup_runs_a_full_batch_before_ready_and_again_when_asked() {
    let f = start(
        spec(|s| {
            s.settings.warmup = true;
            s.settings.max_batch_size = 8;
        }),
        0,
        None,
    );
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    assert!(f.deployment.is_ready());
    let log = f.log.lock().unwrap().clone();
    assert_eq!(log, vec![vec![0i64; 8]], "one warm-up call of max_batch_size zero rows");

    // `warm_again` (after the server pages out code: `release_startup_memory`) runs it once
    // more, and the deployment still serves.
    assert!(f.deployment.warm_again());
    assert_eq!(f.log.lock().unwrap().clone(), vec![vec![0i64; 8]; 2]);
    assert_eq!(values(&f.deployment.infer(request(&[5])).await.unwrap().outputs[0].tensor), vec![5]);
    // Where the deployment does not warm up, it runs nothing.
    let cold = start(spec(|_| {}), 0, None);
    assert!(cold.deployment.wait_ready(Duration::from_secs(5)).await);
    assert!(!cold.deployment.warm_again());
    assert!(cold.log.lock().unwrap().is_empty(), "no warm-up batch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_and_down_keeps_every_request() {
    let f = start(spec(|s| s.max_replicas = 4), 2, None);
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let load = {
        let d = f.deployment.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for k in 0..300i64 {
                let d = d.clone();
                tasks.push(tokio::spawn(async move { (k, d.infer(request(&[k])).await) }));
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            let mut ok = 0;
            for t in tasks {
                let (k, r) = t.await.unwrap();
                match r {
                    Ok(r) => {
                        assert_eq!(values(&r.outputs[0].tensor), vec![k]);
                        ok += 1;
                    }
                    Err(e) => assert_eq!(e.kind, ErrorKind::Unavailable, "only overload may refuse: {e}"),
                }
            }
            ok
        })
    };
    f.deployment.scale_to(4).await.unwrap();
    assert_eq!(f.deployment.replica_count(), 4);
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    // Each replica is listed once, ready, as a thread of this process (no node fields).
    let replicas = f.deployment.replicas();
    let mut ids: Vec<usize> = replicas.iter().map(|r| r.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4, "{replicas:?}");
    assert!(replicas.iter().all(|r| r.ready && r.node_id.is_none() && r.pid.is_none()), "{replicas:?}");
    f.deployment.scale_to(1).await.unwrap();
    assert_eq!(f.deployment.replica_count(), 1);
    assert_eq!(f.deployment.replicas().len(), 1);
    let ok = load.await.unwrap();
    assert!(ok > 0);
    assert_eq!(f.loads.load(Ordering::SeqCst), 4, "one at start, three added");
    // Scale to zero: a request waits (bounded by its deadline) until a replica is back.
    f.deployment.scale_to(0).await.unwrap();
    let d = f.deployment.clone();
    let held = tokio::spawn(async move { d.infer(request(&[9])).await });
    until("the request waits in the queue", || f.deployment.queue_depth() == 1).await;
    assert!(!held.is_finished(), "held while there is no replica");
    f.deployment.scale_to(1).await.unwrap();
    assert_eq!(values(&held.await.unwrap().unwrap().outputs[0].tensor), vec![9]);
}

/// Right after a scale to zero (before any other task runs: one thread), a request waits for
/// a replica; the gone replica's permits are taken back at once, not by a task that runs later
/// (meanwhile a request took one and was answered "no replicas").
#[tokio::test(flavor = "current_thread")]
async fn a_request_right_after_a_scale_to_zero_waits_for_a_replica() {
    let f = start(spec(|_| {}), 0, None);
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    f.deployment.scale_to(0).await.unwrap();
    let held = f.deployment.infer(request(&[9]));
    tokio::pin!(held);
    // Polled once, with no task run in between.
    assert!(tokio::time::timeout(Duration::ZERO, &mut held).await.is_err(), "answered at once");
    assert_eq!(f.deployment.queue_depth(), 1);
    f.deployment.scale_to(1).await.unwrap();
    assert_eq!(values(&held.await.unwrap().outputs[0].tensor), vec![9]);
}

/// A replica in another process, as the test plays it: each call is kept (`held`) or answered
/// at once with its inputs.
struct FakeRemote {
    info: sluice_deployments::RemoteInfo,
    held: Option<Mutex<Vec<sluice_deployments::RemoteCall>>>,
}

impl sluice_deployments::RemoteReplica for FakeRemote {
    fn call(&self, call: sluice_deployments::RemoteCall) {
        match &self.held {
            Some(held) => held.lock().unwrap().push(call),
            None => {
                let outputs = call
                    .inputs
                    .into_iter()
                    .map(|i| NamedTensor { name: "y".into(), tensor: i.tensor })
                    .collect();
                let _ = call.reply.send(Ok(outputs));
            }
        }
    }

    fn info(&self) -> &sluice_deployments::RemoteInfo {
        &self.info
    }
}

/// The interface of the deployments whose replicas a [`FakeRemote`] plays: `x` → `y`, INT64
/// `[-1, 1]`.
fn remote_meta() -> ModelMetadata {
    let tensor = TensorSpec { name: "x".into(), dtype: DataType::Int64, shape: vec![-1, 1] };
    ModelMetadata {
        platform: "onnxruntime_onnx".into(),
        inputs: vec![tensor.clone()],
        outputs: vec![TensorSpec { name: "y".into(), ..tensor }],
    }
}

/// Requests queued when a deployment's last replica is lost (on Ray: its actor died) wait for
/// the replacement within their deadline: the permit a request still held on the lost replica
/// went to the first of them when it ended, which found no replica and was answered 503 at
/// once, and so was every request queued behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_when_the_last_replica_is_lost_wait_for_its_replacement() {
    let meta = remote_meta();
    let s = spec(|s| {
        s.num_replicas = 0;
        s.max_replicas = 2;
        s.settings.max_ongoing_requests = 1;
    });
    let d = Arc::new(Deployment::start_remote(s, meta).unwrap());
    let lost = Arc::new(FakeRemote { info: Default::default(), held: Some(Mutex::new(Vec::new())) });
    let id = d.add_remote(lost.clone());
    d.set_replica_ready(id, true);
    let first = tokio::spawn({
        let d = d.clone();
        async move { d.infer(request(&[1])).await }
    });
    until("the first request on the replica", || lost.held.as_ref().unwrap().lock().unwrap().len() == 1)
        .await;
    let queued: Vec<_> = (2..5)
        .map(|v| {
            let d = d.clone();
            tokio::spawn(async move { d.infer(request(&[v])).await })
        })
        .collect();
    until("three requests queued", || d.queue_depth() == 3).await;
    assert!(d.remove_replica(id));
    // The lost replica's call ends (its connection broke): its permit is freed.
    lost.held.as_ref().unwrap().lock().unwrap().clear();
    assert_eq!(first.await.unwrap().unwrap_err().kind, ErrorKind::Unavailable);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(queued.iter().all(|q| !q.is_finished()), "a queued request was answered with no replica");
    let replacement = d.add_remote(Arc::new(FakeRemote { info: Default::default(), held: None }));
    d.set_replica_ready(replacement, true);
    for (q, v) in queued.into_iter().zip(2..) {
        let answer = tokio::time::timeout(Duration::from_secs(5), q).await.expect("answered").unwrap();
        assert_eq!(values(&answer.unwrap().outputs[0].tensor), vec![v]);
    }
}

/// A request waiting for a replica of a deployment that is then closed (retired after its
/// drain, or deleted) is answered 503 at once: no replica comes, and it waited for its
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_in_a_closed_deployment_is_answered_at_once() {
    let meta = remote_meta();
    let d = Arc::new(Deployment::start_remote(spec(|s| s.num_replicas = 0), meta).unwrap());
    let waiting = tokio::spawn({
        let d = d.clone();
        async move { d.infer(request(&[1])).await }
    });
    until("the request queued", || d.queue_depth() == 1).await;
    d.close();
    let answer =
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("answered at once").unwrap();
    assert_eq!(answer.unwrap_err().kind, ErrorKind::Unavailable);
    // A request that comes after is refused at once too.
    let late = tokio::time::timeout(Duration::from_secs(5), d.infer(request(&[2]))).await.expect("at once");
    assert_eq!(late.unwrap_err().kind, ErrorKind::Unavailable);
}

/// An [`Echo`] (panicking on 13) that loads once: every later load fails, as when the model
/// file is gone. `loads` counts the tries.
fn loads_once(loads: Arc<AtomicUsize>, gate: Option<Gate>) -> BackendFactory {
    Arc::new(move || {
        if loads.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(gone());
        }
        Ok(panics_on_13(gate.clone()))
    })
}

/// Queues a request for `value` (30 s deadline) behind a batch whose model panics on 13, held at
/// `gate` until both are at the replica; returns the queued request once a reload was tried.
async fn held_behind_a_panic(
    d: &Arc<Deployment>,
    gate: &Gate,
    open: std::sync::mpsc::Sender<()>,
    value: i64,
    loads: &AtomicUsize,
) -> tokio::task::JoinHandle<Result<InferResponse, InferError>> {
    let poison = {
        let d = d.clone();
        tokio::spawn(async move { d.infer(request(&[13])).await })
    };
    gate.started.notified().await;
    let held = {
        let d = d.clone();
        tokio::spawn(async move {
            let mut r = request(&[value]);
            r.timeout = Some(Duration::from_secs(30));
            d.infer(r).await
        })
    };
    until("the second request is admitted", || d.in_system() == 2).await;
    // Admitted with a free slot, it is handed to the replica in the same poll.
    tokio::time::sleep(Duration::from_millis(50)).await;
    open.send(()).unwrap();
    assert_eq!(poison.await.unwrap().unwrap_err().kind, ErrorKind::Internal);
    until("a reload was tried", || loads.load(Ordering::SeqCst) >= 2).await;
    held
}

fn gone() -> LoadError {
    LoadError::Model { path: "gone.onnx".into(), message: "model file is gone".into() }
}

/// An echo model that panics on 13.
fn panics_on_13(gate: Option<Gate>) -> Box<dyn Backend> {
    let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Int64, shape: vec![-1, 1] };
    Box::new(Echo {
        meta: ModelMetadata { platform: "test".into(), inputs: vec![spec("x")], outputs: vec![spec("y")] },
        delay: Duration::ZERO,
        panic_on: Some(13),
        log: Arc::new(Mutex::new(Vec::new())),
        gate,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_replica_that_cannot_reload_time_out() {
    // The model loads once, then every reload fails (the file is gone, say).
    let loads = Arc::new(AtomicUsize::new(0));
    let factory = loads_once(loads.clone(), None);
    let d = Arc::new(Deployment::start(spec(|_| {}), factory).unwrap());
    assert!(d.wait_ready(Duration::from_secs(5)).await);
    assert_eq!(d.infer(request(&[13])).await.unwrap_err().kind, ErrorKind::Internal);
    let mut late = request(&[1]);
    late.timeout = Some(Duration::from_millis(300));
    let e = tokio::time::timeout(Duration::from_secs(5), d.infer(late))
        .await
        .expect("answered, not left hanging")
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DeadlineExceeded, "{e}");
    assert!(loads.load(Ordering::SeqCst) >= 2, "a reload was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_by_a_replica_that_stops_while_reloading_is_answered_503() {
    // A request queued behind a batch whose model panics stays with its replica while every
    // reload fails; the replica is scaled away meanwhile. The request is answered Unavailable
    // (retry) then: not a server fault, not at its deadline, and not when the reload's backoff
    // ends.
    let (gate, open) = gate();
    let loads = Arc::new(AtomicUsize::new(0));
    let factory = loads_once(loads.clone(), Some(gate.clone()));
    let d = Arc::new(Deployment::start(spec(|s| s.settings.max_ongoing_requests = 4), factory).unwrap());
    assert!(d.wait_ready(Duration::from_secs(5)).await);
    let held = held_behind_a_panic(&d, &gate, open, 1, &loads).await;
    // The reload's backoff (0.1 s, doubling) has grown to 3.2 s by now.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    assert!(!held.is_finished(), "held while the replica reloads");
    let stopped = std::time::Instant::now();
    d.scale_to(0).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("answered when the replica stopped, not at the deadline")
        .unwrap()
        .unwrap_err();
    // Not at the end of the backoff's current wait (seconds away).
    assert!(
        stopped.elapsed() < Duration::from_millis(1500),
        "answered {:?} after the stop",
        stopped.elapsed()
    );
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("stopped") && e.message.contains("retry"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_by_a_replica_that_cannot_reload_goes_to_a_replica_that_comes_ready() {
    // A request queued behind a batch whose model panics stays with its replica, the only one,
    // while every reload there fails. A replica added meanwhile loads (on the scaling task, not
    // on the failing replica's thread): the held request goes to it and is answered, not left
    // with the failing replica until its deadline.
    let (gate, open) = gate();
    let loads = Arc::new(AtomicUsize::new(0));
    let (n, g) = (loads.clone(), gate.clone());
    let factory: BackendFactory = Arc::new(move || {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        // A replica reloads on its own thread, named after the deployment (`echo#0`).
        if !first && std::thread::current().name().is_some_and(|t| t.starts_with("echo#")) {
            return Err(gone());
        }
        Ok(panics_on_13(first.then(|| g.clone())))
    });
    let d = Arc::new(Deployment::start(spec(|s| s.settings.max_ongoing_requests = 4), factory).unwrap());
    assert!(d.wait_ready(Duration::from_secs(5)).await);
    let held = held_behind_a_panic(&d, &gate, open, 7, &loads).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "held while no replica can run it");
    d.scale_to(2).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("answered by the new replica, not at the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(values(&answer.outputs[0].tensor), vec![7]);
}

/// A `mean_pool` deployment that pads `hidden` and `mask`, batching up to 16 rows within
/// 200 ms.
async fn padded_pool() -> Arc<Deployment> {
    let pool = sluice_config::Model::Builtin(sluice_config::Builtin::MeanPool { normalize: false });
    let mut s = spec(|s| {
        s.settings.max_batch_size = 16;
        s.settings.batch_wait_timeout_s = 0.2;
        s.settings.pad = [("hidden".to_string(), 0.0), ("mask".to_string(), 0.0)].into();
    });
    s.name = "pool".into();
    let factory = sluice_deployments::backend_factory(&pool, &s.settings, 1, "pool").unwrap();
    let d = Arc::new(Deployment::start(s, factory).unwrap());
    assert!(d.wait_ready(Duration::from_secs(5)).await);
    d
}

/// A `mean_pool` request of `len` tokens of `width` values (value `i` of the whole is
/// `value(i)`), every token in the mask.
fn pool_request(len: usize, width: usize, value: impl Fn(usize) -> f32) -> InferRequest {
    let hidden: Vec<u8> = (0..len * width).flat_map(|i| value(i).to_le_bytes()).collect();
    let mask: Vec<u8> = (0..len).flat_map(|_| 1i64.to_le_bytes()).collect();
    let t = |name: &str, dtype, shape: Vec<usize>, data: Vec<u8>| NamedTensor {
        name: name.into(),
        tensor: Tensor::new(dtype, shape, Bytes::from(data)).unwrap(),
    };
    InferRequest {
        inputs: vec![
            t("hidden", DataType::Fp32, vec![1, len, width], hidden),
            t("mask", DataType::Int64, vec![1, len], mask),
        ],
        ..Default::default()
    }
}

/// A padded batch cuts outputs back to each request's own length only on axes that follow the
/// sequence: a pooled embedding's hidden size equal to the batch's padded length stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_padded_batch_leaves_axes_that_are_not_the_sequence_whole() {
    let d = padded_pool().await;
    // Hidden size 8; one request of 2 tokens, one of 8 (the batch's padded length).
    let request = |len: usize| pool_request(len, 8, |i| i as f32);
    let (short, long) = tokio::join!(d.infer(request(2)), d.infer(request(8)));
    let (short, long) = (short.unwrap(), long.unwrap());
    assert_eq!(short.outputs[0].tensor.shape(), &[1, 8], "the short request's embedding is whole");
    assert_eq!(long.outputs[0].tensor.shape(), &[1, 8]);
    // Its mean over its own two tokens: (i + (8 + i)) / 2 for hidden unit i.
    let got: Vec<f32> =
        short.outputs[0].tensor.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(got, (0..8).map(|i| (2 * i + 8) as f32 / 2.0).collect::<Vec<_>>());
    assert_eq!(d.metrics().stats.execution_count.load(Ordering::Relaxed), 1, "the two shared one batch");
}

/// Only the sequence (dimension 1) is padded: a request with a wider hidden size does not
/// share a batch with others, whose embeddings keep their own size (a hidden size of 10 padded
/// everyone's 8 to 10, and their embeddings came back with 10 values ending in zeros).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_another_hidden_size_does_not_widen_the_others() {
    let d = padded_pool().await;
    let request = |len: usize, width: usize| pool_request(len, width, |_| 1.0);
    let (a, wide, b) = tokio::join!(d.infer(request(3, 8)), d.infer(request(1, 10)), d.infer(request(5, 8)));
    let (a, wide, b) = (a.unwrap(), wide.unwrap(), b.unwrap());
    assert_eq!(a.outputs[0].tensor.shape(), &[1, 8]);
    assert_eq!(b.outputs[0].tensor.shape(), &[1, 8]);
    assert_eq!(wide.outputs[0].tensor.shape(), &[1, 10]);
    assert_eq!(
        d.metrics().stats.execution_count.load(Ordering::Relaxed),
        2,
        "the two of width 8 shared one batch"
    );
}

/// A `mean_pool` request whose hidden states and mask differ in length (refused alone) was
/// padded with a longer request's into one batch and answered on pad values: its batch runs
/// each request alone, so it is refused naming both, and the other is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_pool_request_whose_mask_differs_in_length_is_refused() {
    let d = padded_pool().await;
    let mut bad = pool_request(3, 8, |_| 1.0);
    bad.inputs[1] = pool_request(5, 8, |_| 1.0).inputs.remove(1);
    let (bad, good) = tokio::join!(d.infer(bad), d.infer(pool_request(5, 8, |_| 1.0)));
    let e = bad.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.starts_with("mask has shape [1, 5] but hidden is [1, 3, 8]"), "{e}");
    assert_eq!(good.unwrap().outputs[0].tensor.shape(), &[1, 8]);
}

/// A tokenizer's batch runs each request by itself: merged, its rows were padded to the
/// longest text of the call, so a short text's token ids came back as long as another
/// client's (whose length they told), and the encoder after it ran at that length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokenizers_answer_does_not_follow_the_texts_it_was_batched_with() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models/tiny-encoder/tokenizer.json");
    let tokenizer = sluice_config::Model::Builtin(sluice_config::Builtin::Tokenizer {
        path,
        max_length: None,
        max_tokens: 1 << 20,
        max_text_bytes: 1 << 20,
    });
    let mut s = spec(|s| {
        s.settings.max_batch_size = 16;
        s.settings.batch_wait_timeout_s = 0.2;
    });
    s.name = "tokenizer".into();
    let factory = sluice_deployments::backend_factory(&tokenizer, &s.settings, 1, "tokenizer").unwrap();
    let d = Arc::new(Deployment::start(s, factory).unwrap());
    assert!(d.wait_ready(Duration::from_secs(5)).await);
    let request = |text: &str| {
        let mut data = Vec::new();
        sluice_deployments::push_bytes_element(&mut data, text.as_bytes()).unwrap();
        InferRequest {
            inputs: vec![NamedTensor {
                name: "text".into(),
                tensor: Tensor::new(DataType::Bytes, vec![1], Bytes::from(data)).unwrap(),
            }],
            ..Default::default()
        }
    };
    let alone = d.infer(request("a")).await.unwrap();
    let own = alone.outputs[0].tensor.shape().to_vec();
    let long = "a b c d e f g h i j k l m n o p";
    let (short, other) = tokio::join!(d.infer(request("a")), d.infer(request(long)));
    let (short, other) = (short.unwrap(), other.unwrap());
    assert_eq!(
        short.outputs[0].tensor.shape(),
        own.as_slice(),
        "the short text's ids took the long one's length"
    );
    assert!(other.outputs[0].tensor.shape()[1] > own[1]);
}

fn rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() / 1024
}

/// Room to grow costs little until it is used: each replica's queue held a slot for every
/// request the largest set could have in flight (4,096 replicas × 1,000 here, 4 M slots per
/// replica, hundreds of MB each), allocated when the replica started; it is capped now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_allowed_many_replicas_costs_what_it_runs() {
    let before = rss_mb();
    let f = start(
        spec(|s| {
            s.num_replicas = 2;
            s.max_replicas = 4096;
            s.settings.max_ongoing_requests = 1000;
        }),
        0,
        None,
    );
    assert!(f.deployment.wait_ready(Duration::from_secs(10)).await);
    let grown = rss_mb().saturating_sub(before);
    assert!(grown < 128, "two replicas added {grown} MB");
    let r = f.deployment.infer(request(&[7])).await.unwrap();
    assert_eq!(values(&r.outputs[0].tensor), vec![7]);
}

/// A deployment that may scale to zero counts as ready at zero only when it got there on
/// purpose: one whose replica served and is then lost (a crash, a lost node: on Ray the
/// replacement is a new replica) is not ready until a replica is again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_at_zero_only_when_scaled_there_on_purpose() {
    let f = start(spec(|s| s.num_replicas = 1), 0, None);
    let d = &f.deployment;
    d.set_scales_to_zero(true);
    assert!(d.wait_ready(Duration::from_secs(10)).await);
    let id = d.replicas()[0].id;
    assert!(d.remove_replica(id), "lost");
    assert_eq!((d.replica_count(), d.is_ready()), (0, false));
    assert!(!d.ready_or_at_zero(), "a replica that served was lost: not ready");
    d.scaled_to_zero();
    assert!(d.ready_or_at_zero(), "at zero on purpose: ready");
}

/// A remote replica that holds one model at a time (`max_models_per_replica: 1`), and says so
/// with each answer, as a `sluice replica` process does.
struct HoldsOne;

impl sluice_deployments::RemoteReplica for HoldsOne {
    fn call(&self, call: sluice_deployments::RemoteCall) {
        if let (Some(holder), Some(model)) = (call.holder, &call.model) {
            holder.holds(sluice_deployments::HeldModels::read(|| vec![model.clone()]));
        }
        let outputs =
            call.inputs.into_iter().map(|i| NamedTensor { name: "y".into(), tensor: i.tensor }).collect();
        let _ = call.reply.send(Ok(outputs));
    }

    fn info(&self) -> &sluice_deployments::RemoteInfo {
        static NONE: std::sync::OnceLock<sluice_deployments::RemoteInfo> = std::sync::OnceLock::new();
        NONE.get_or_init(Default::default)
    }
}

/// A remote replica of a multiplexed deployment is taken to hold what its answers say it
/// holds: one that evicted a model is no longer sent that model's requests as its holder (each
/// model it was ever sent stayed its own, and its requests went there to be loaded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_replica_holds_what_its_answers_say() {
    let s = spec(|s| {
        s.num_replicas = 0;
        s.max_replicas = 1;
        s.multiplexed = true;
    });
    let d = Deployment::start_remote(s, remote_meta()).unwrap();
    let id = d.add_remote(Arc::new(HoldsOne));
    d.set_replica_ready(id, true);
    for model in ["a", "b"] {
        let r = InferRequest { model_id: Some(model.into()), ..request(&[1]) };
        d.infer(r).await.unwrap();
    }
    assert_eq!(d.held_models(), [Arc::<str>::from("b")]);
    // No folder is named with a NUL (and a replica's list ends each id with one).
    let r = InferRequest { model_id: Some("a\0b".into()), ..request(&[1]) };
    assert_eq!(d.infer(r).await.unwrap_err().kind, ErrorKind::NotFound);
}

/// A model claimed for a request on its way to a remote replica stays that replica's while the
/// request is out, whatever an answer to an earlier request says it holds (that answer cannot
/// know of it): the next request for the model follows it there, rather than going to load it
/// on another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_its_way_to_a_remote_replica_stays_claimed_there() {
    let s = spec(|s| {
        s.num_replicas = 0;
        s.max_replicas = 2;
        s.multiplexed = true;
        s.settings.max_ongoing_requests = 4;
    });
    let d = Arc::new(Deployment::start_remote(s, remote_meta()).unwrap());
    let slow = Arc::new(FakeRemote { info: Default::default(), held: Some(Mutex::new(Vec::new())) });
    let first = d.add_remote(slow.clone());
    d.set_replica_ready(first, true);
    let send = |model: &str| {
        let d = d.clone();
        let r = InferRequest { model_id: Some(model.into()), ..request(&[1]) };
        tokio::spawn(async move { d.infer(r).await })
    };
    let calls = || slow.held.as_ref().unwrap().lock().unwrap().len();
    let y = send("y");
    until("y's call on the first replica", || calls() == 1).await;
    let _x = send("x");
    until("x's call on the first replica", || calls() == 2).await;
    // The first replica answers y, holding only y: it has not seen x yet.
    let call = slow.held.as_ref().unwrap().lock().unwrap().remove(0);
    assert_eq!(call.model.as_deref(), Some("y"));
    call.holder.unwrap().holds(held(1, &["y"]));
    let _ = call.reply.send(Ok(Vec::new()));
    let _ = y.await;
    // A second replica, idle, comes up: x's next request still goes where x is on its way.
    let other = d.add_remote(Arc::new(HoldsOne));
    d.set_replica_ready(other, true);
    let _x2 = send("x");
    until("x's second call on the first replica", || calls() == 2).await;
    let held = d.held_models();
    assert!(held.iter().any(|m| &**m == "x"), "{held:?}");
}

fn held(seq: u64, ids: &[&str]) -> sluice_deployments::HeldModels {
    sluice_deployments::HeldModels { seq, ids: ids.iter().map(|&id| Arc::from(id)).collect() }
}

/// Answers can arrive in another order than their replica made them (one per HTTP/2 stream): a
/// list of held models read before one already taken is not taken (it put back a model the
/// replica had evicted since, and that model's requests went there to load it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_does_not_put_back_a_model_its_replica_evicted() {
    let s = spec(|s| {
        s.num_replicas = 0;
        s.max_replicas = 1;
        s.multiplexed = true;
        s.settings.max_ongoing_requests = 4;
    });
    let d = Arc::new(Deployment::start_remote(s, remote_meta()).unwrap());
    let replica = Arc::new(FakeRemote { info: Default::default(), held: Some(Mutex::new(Vec::new())) });
    let id = d.add_remote(replica.clone());
    d.set_replica_ready(id, true);
    let send = |model: &str| {
        let d = d.clone();
        let r = InferRequest { model_id: Some(model.into()), ..request(&[1]) };
        tokio::spawn(async move { d.infer(r).await })
    };
    let calls = || replica.held.as_ref().unwrap().lock().unwrap().len();
    let a = send("a");
    until("a's call", || calls() == 1).await;
    let b = send("b");
    until("b's call", || calls() == 2).await;
    let (call_a, call_b) = {
        let mut calls = replica.held.as_ref().unwrap().lock().unwrap();
        let b = calls.remove(1);
        (calls.remove(0), b)
    };
    // The replica ran a, then evicted it to load b: b's answer (list 2) arrives first, then a's
    // (list 1, read before the eviction).
    call_b.holder.unwrap().holds(held(2, &["b"]));
    let _ = call_b.reply.send(Ok(Vec::new()));
    call_a.holder.unwrap().holds(held(1, &["a"]));
    let _ = call_a.reply.send(Ok(Vec::new()));
    let _ = (a.await, b.await);
    assert_eq!(d.held_models(), [Arc::<str>::from("b")]);
}

/// A shadow's copies count as the candidate's load only while the candidate holds them (its
/// autoscaler leaves them out of the canary's own traffic): a copy the candidate answered that
/// waits for the primary's answer, to be compared, is not counted (it was, until compared, so a
/// slow primary made the canary's own load read lower than it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_copy_counts_as_in_flight_only_while_the_candidate_holds_it() {
    use std::sync::atomic::Ordering::Relaxed;
    let (g, open) = gate();
    let started = g.started.clone();
    let candidate = start_gated(spec(|_| {}), 0, None, Some(g));
    assert!(candidate.deployment.wait_ready(Duration::from_secs(5)).await);
    let shadow = Arc::new(sluice_deployments::Shadow::new(candidate.deployment.clone(), 100));
    let notified = started.notified();
    let mirror = shadow.mirror(&request(&[1])).expect("every request copied at 100 %");
    notified.await;
    assert_eq!(shadow.in_flight(), 1, "the copy the candidate runs");
    open.send(()).unwrap();
    until("the candidate's answer", || shadow.in_flight() == 0).await;
    assert_eq!(shadow.stats().compared.load(Relaxed), 0, "compared before the primary answered");
    let x = request(&[1]).inputs.remove(0).tensor;
    mirror.compare(&[NamedTensor { name: "y".into(), tensor: x }]);
    until("the comparison", || shadow.stats().compared.load(Relaxed) == 1).await;
    assert_eq!(shadow.in_flight(), 0);
}

/// A request whose caller gives up while it waits for its batch to fill leaves its replica's
/// queue with nothing live in it: the replica drops it and sleeps (it spun on an empty wait,
/// a core at 100 %, and kept the request's place under `max_ongoing_requests` for good, so
/// every later request waited for a place that never came back and was answered 504).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_in_its_batch_wait_gives_its_place_back() {
    let f = start(
        spec(|s| {
            s.settings.max_batch_size = 8;
            s.settings.batch_wait_timeout_s = 0.5;
            s.settings.max_ongoing_requests = 1;
        }),
        0,
        None,
    );
    let d = &f.deployment;
    assert!(d.wait_ready(Duration::from_secs(5)).await);
    let gone = tokio::time::timeout(Duration::from_millis(50), d.infer(request(&[1]))).await;
    assert!(gone.is_err(), "given up while its batch waited");
    let started = std::time::Instant::now();
    let r = InferRequest { timeout: Some(Duration::from_secs(5)), ..request(&[2]) };
    let answer = d.infer(r).await.expect("the given-up request's place came back");
    assert_eq!(values(&answer.outputs[0].tensor), vec![2]);
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert!(f.log.lock().unwrap().iter().all(|call| !call.contains(&1)), "the given-up request never ran");
}

/// A replica that stops being ready (a failed health check, a model reloading) takes its
/// slots out of admission until it is ready again: they stayed in, and the ready replicas were
/// sent its share too, past `max_ongoing_requests` each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_not_ready_takes_its_slots_out_of_admission() {
    let s = spec(|s| {
        s.num_replicas = 0;
        s.max_replicas = 2;
        s.settings.max_ongoing_requests = 1;
    });
    let d = Arc::new(Deployment::start_remote(s, remote_meta()).unwrap());
    let held = || FakeRemote { info: Default::default(), held: Some(Mutex::new(Vec::new())) };
    let (a, b) = (Arc::new(held()), Arc::new(held()));
    let (ia, ib) = (d.add_remote(a.clone()), d.add_remote(b.clone()));
    d.set_replica_ready(ia, true);
    d.set_replica_ready(ib, true);
    d.set_replica_ready(ib, false);
    let send = || {
        let d = d.clone();
        tokio::spawn(async move { d.infer(request(&[1])).await })
    };
    let calls = |r: &FakeRemote| r.held.as_ref().unwrap().lock().unwrap().len();
    let _first = send();
    until("the first request on the ready replica", || calls(&a) == 1).await;
    let _second = send();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((calls(&a), calls(&b)), (1, 0), "the ready replica was sent past its limit");
    d.set_replica_ready(ib, true);
    until("the second request, once the other replica is ready again", || calls(&b) == 1).await;
    assert_eq!(calls(&a), 1);
}

/// A retired deployment's drain ends once it has stayed empty for `DRAIN_SETTLE`: a request
/// routed to it just before its retirement, in only after the drain first saw it empty, is
/// waited for (it was closed under that request, answered 503 "shutting down").
#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_a_request_that_comes_in_just_after_it_saw_none() {
    let d = Arc::new(Deployment::start_remote(spec(|s| s.num_replicas = 0), remote_meta()).unwrap());
    d.mark_retired();
    let settled = tokio::spawn({
        let d = d.clone();
        async move { d.settled().await }
    });
    // The drain has seen it empty and waits out the settle.
    tokio::time::sleep(sluice_deployments::DRAIN_SETTLE / 5).await;
    let on_its_way = d.hold();
    tokio::time::sleep(sluice_deployments::DRAIN_SETTLE * 4).await;
    assert!(!settled.is_finished(), "the drain ended with a request on its way in");
    drop(on_its_way);
    tokio::time::timeout(Duration::from_secs(1), settled).await.expect("settled once it left").unwrap();
}
