//! Cheap calls run on the callers' threads (no hand-off to the replica's thread and back),
//! batched: requests that arrive while one caller runs the model are left to it and run as the
//! next batch. A batch wait, a setting of 0, a blocking backend or slow model calls keep them on
//! the replica's thread; a panic in an inline call fails that request only and the replica is
//! replaced; under many concurrent callers and a scale-down no request is stranded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_deployments::{
    Backend, BackendFactory, DataType, Deployment, DeploymentSpec, ErrorKind, InferError, InferRequest,
    ModelMetadata, NamedTensor, Tensor, TensorSpec,
};

/// `y = x`, recording the name of the thread each call ran on and its rows; panics on `13`;
/// takes 300 ms more on `77`, 2 s more on `78`.
struct Echo {
    meta: ModelMetadata,
    delay: Duration,
    inline_safe: bool,
    threads: Arc<Mutex<Vec<String>>>,
    rows: Arc<Mutex<Vec<usize>>>,
}

impl Backend for Echo {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn inline_safe(&self) -> bool {
        self.inline_safe
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
        self.threads.lock().unwrap().push(std::thread::current().name().unwrap_or("").to_string());
        self.rows.lock().unwrap().push(inputs[0].tensor.shape()[0]);
        if inputs[0].tensor.data()[..8] == 13i64.to_le_bytes() {
            panic!("poison value");
        }
        std::thread::sleep(self.delay);
        if inputs[0].tensor.data()[..8] == 77i64.to_le_bytes() {
            std::thread::sleep(Duration::from_millis(300));
        }
        if inputs[0].tensor.data()[..8] == 78i64.to_le_bytes() {
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(vec![NamedTensor { name: "y".into(), tensor: inputs[0].tensor.clone() }])
    }
}

struct Fixture {
    deployment: Arc<Deployment>,
    threads: Arc<Mutex<Vec<String>>>,
    rows: Arc<Mutex<Vec<usize>>>,
    loads: Arc<AtomicUsize>,
}

fn start(delay: Duration, edit: impl FnOnce(&mut DeploymentSpec)) -> Fixture {
    start_with(delay, true, edit)
}

fn start_with(delay: Duration, inline_safe: bool, edit: impl FnOnce(&mut DeploymentSpec)) -> Fixture {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let rows = Arc::new(Mutex::new(Vec::new()));
    let loads = Arc::new(AtomicUsize::new(0));
    let (t, r, n) = (threads.clone(), rows.clone(), loads.clone());
    let factory: BackendFactory = Arc::new(move || {
        n.fetch_add(1, Ordering::SeqCst);
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Int64, shape: vec![-1, 1] };
        let meta =
            ModelMetadata { platform: "test".into(), inputs: vec![spec("x")], outputs: vec![spec("y")] };
        Ok(Box::new(Echo { meta, delay, inline_safe, threads: t.clone(), rows: r.clone() })
            as Box<dyn Backend>)
    });
    let mut spec = DeploymentSpec::new("echo");
    spec.settings.max_batch_size = 4;
    // Calls measure cheap however loaded the machine is (a call preempted for a millisecond
    // lifted the mean past the default 100 µs and sent the next calls to the replica's
    // thread); the tests of the measure set their own threshold.
    spec.settings.run_inline_under_us = 1_000_000;
    edit(&mut spec);
    Fixture { deployment: Arc::new(Deployment::start(spec, factory).unwrap()), threads, rows, loads }
}

fn request(v: i64) -> InferRequest {
    let tensor = Tensor::new(DataType::Int64, vec![1, 1], Bytes::from(v.to_le_bytes().to_vec())).unwrap();
    InferRequest { inputs: vec![NamedTensor { name: "x".into(), tensor }], ..Default::default() }
}

/// Sends requests one after another; returns on which threads the model ran for them.
async fn run(f: &Fixture, n: i64) -> Vec<String> {
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    f.threads.lock().unwrap().clear();
    for k in 100..100 + n {
        let r = f.deployment.infer(request(k)).await.unwrap();
        assert_eq!(r.outputs[0].tensor.data()[..8], k.to_le_bytes(), "each caller gets its own answer");
    }
    f.threads.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cheap_calls_to_an_idle_replica_run_on_the_callers_thread() {
    let f = start(Duration::ZERO, |_| {});
    let threads = run(&f, 20).await;
    assert!(
        threads.iter().all(|t| !t.starts_with("echo#")),
        "none went through the replica's thread: {threads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_models_a_batch_wait_a_zero_setting_or_a_blocking_backend_keep_calls_on_the_replica() {
    let slow = start(Duration::from_millis(2), |s| s.settings.run_inline_under_us = 100);
    let waits = start(Duration::ZERO, |s| s.settings.batch_wait_timeout_s = 0.001);
    let off = start(Duration::ZERO, |s| s.settings.run_inline_under_us = 0);
    // A backend that may block (a custom step) never runs on the caller's thread.
    let unsafe_backend = start_with(Duration::ZERO, false, |_| {});
    for f in [&slow, &waits, &off, &unsafe_backend] {
        let threads = run(f, 10).await;
        assert!(threads.iter().all(|t| t == "echo#0"), "{threads:?}");
    }
}

/// A request far larger than those the measure was taken on (more than 64 KiB of inputs) goes
/// to the replica's thread: it would hold a frontend thread for as long as it runs. Small ones
/// go on running inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_to_a_cheap_model_goes_to_the_replicas_thread() {
    let f = start(Duration::ZERO, |s| s.settings.max_batch_size = 0);
    assert!(run(&f, 5).await.iter().all(|t| !t.starts_with("echo#")), "small calls run inline");
    f.threads.lock().unwrap().clear();
    let rows = sluice_deployments::INLINE_MAX_BYTES / 8 + 1;
    let tensor = Tensor::new(DataType::Int64, vec![rows, 1], Bytes::from(vec![0u8; rows * 8])).unwrap();
    let large = InferRequest { inputs: vec![NamedTensor { name: "x".into(), tensor }], ..Default::default() };
    let r = f.deployment.infer(large).await.unwrap();
    assert_eq!(r.outputs[0].tensor.shape(), [rows, 1]);
    assert_eq!(*f.threads.lock().unwrap(), ["echo#0"]);
    assert!(run(&f, 5).await.iter().all(|t| !t.starts_with("echo#")), "small calls still run inline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_left_while_a_caller_runs_the_model_run_as_its_next_batch() {
    // The setting (1 s) is far above the slow call (2 s lifts the measured mean to ~250 ms):
    // the model stays cheap throughout.
    let f = start(Duration::ZERO, |_| {});
    assert!(run(&f, 5).await.iter().all(|t| !t.starts_with("echo#")), "alone, calls run inline");
    f.rows.lock().unwrap().clear();
    f.threads.lock().unwrap().clear();
    // A slow call runs on a caller's thread; three requests meanwhile find the model busy,
    // leave their requests, and the caller runs them as one batch when the slow one is done.
    // Long enough for the crowd to arrive on a loaded machine, where the slow call holds
    // one of the two workers.
    let slow = tokio::spawn({
        let d = f.deployment.clone();
        async move { d.infer(request(78)).await.unwrap() }
    });
    // Until the slow call holds the model (a fixed sleep was not always enough on a loaded
    // machine: a request of the crowd then ran alone before it).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while f.rows.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < until, "the slow call never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let crowd: Vec<_> = (0..3)
        .map(|k| {
            let d = f.deployment.clone();
            tokio::spawn(async move { d.infer(request(200 + k)).await.unwrap() })
        })
        .collect();
    slow.await.unwrap();
    for (k, task) in (200..).zip(crowd) {
        let r = task.await.unwrap();
        assert_eq!(r.outputs[0].tensor.data()[..8], i64::to_le_bytes(k), "each caller gets its own answer");
    }
    assert_eq!(*f.rows.lock().unwrap(), [1, 3], "the slow call, then the three as one batch");
    let threads = f.threads.lock().unwrap().clone();
    assert!(threads.iter().all(|t| !t.starts_with("echo#")), "both on callers' threads: {threads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_call_measures_slow_what_is_left_and_the_next_calls_go_to_the_replica() {
    // The threshold and the slow call are far apart from the noise of a busy machine (a call
    // preempted for a few milliseconds): 20 ms, and 300 ms for the slow one, which lifts the
    // measured mean to ~37 ms and takes ~4 fast calls to bring back under 20.
    let f = start(Duration::ZERO, |s| s.settings.run_inline_under_us = 20_000);
    assert!(run(&f, 5).await.iter().all(|t| !t.starts_with("echo#")), "alone, calls run inline");
    f.threads.lock().unwrap().clear();
    f.rows.lock().unwrap().clear();
    // A second slow request left while the first runs on a caller's thread: once the first
    // measured slow, it goes to the replica's thread, and the first caller returns at once
    // instead of running it too on its (frontend) thread.
    let slow = tokio::spawn({
        let d = f.deployment.clone();
        async move { d.infer(request(77)).await.unwrap() }
    });
    // Until the first holds the model (a fixed sleep could end before it started, and the
    // two then ran as one batch).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while f.rows.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < until, "the slow call never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = tokio::spawn({
        let d = f.deployment.clone();
        async move { d.infer(request(77)).await.unwrap() }
    });
    slow.await.unwrap();
    second.await.unwrap();
    let threads = f.threads.lock().unwrap().clone();
    assert!(!threads[0].starts_with("echo#") && threads[1] == "echo#0", "{threads:?}");
    // The slow calls raised the measured cost of a call above the setting: the next calls go
    // to the replica's thread, until enough fast calls bring the measure back under it.
    let threads = run(&f, 60).await;
    assert!(threads[..3].iter().all(|t| t == "echo#0"), "after the slow calls: {threads:?}");
    assert!(threads[50..].iter().all(|t| !t.starts_with("echo#")), "inline again: {threads:?}");
}

/// Many callers at once on two replicas, one removed while they run: every request gets its
/// own answer (a request left for a holder that never looked again would hang here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_callers_and_a_scale_down_strand_no_request() {
    let f = start(Duration::ZERO, |s| {
        s.num_replicas = 2;
        s.max_replicas = 2;
    });
    run(&f, 40).await;
    let callers: Vec<_> = (0..16i64)
        .map(|c| {
            let d = f.deployment.clone();
            tokio::spawn(async move {
                for k in 0..300 {
                    let v = 1_000 + c * 1_000 + k;
                    let r = d.infer(request(v)).await.unwrap();
                    assert_eq!(r.outputs[0].tensor.data()[..8], v.to_le_bytes());
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    f.deployment.scale_to(1).await.unwrap();
    for task in callers {
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("a request was stranded").unwrap();
    }
    let rows = f.rows.lock().unwrap().clone();
    assert!(rows.iter().any(|&r| r > 1), "concurrent callers batched together: {rows:?}");
    let threads = f.threads.lock().unwrap().clone();
    assert!(threads.iter().any(|t| !t.starts_with("echo#")), "callers ran batches: {threads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_an_inline_call_fails_that_request_and_the_replica_is_replaced() {
    let f = start(Duration::ZERO, |_| {});
    run(&f, 5).await;
    let e = f.deployment.infer(request(13)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Internal);
    assert!(e.message.contains("panicked: poison value"), "{e}");
    // The replica's thread loads a new model and serves again.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while f.loads.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < until, "the model was never replaced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(run(&f, 3).await.len(), 3);
}

/// Polls its future again at once when it stays pending, unless it yielded on purpose: as
/// the server polls a connection that woke itself while being polled.
struct PolledAgain<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for PolledAgain<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        sluice_deployments::yielded();
        match self.0.as_mut().poll(cx) {
            std::task::Poll::Pending if sluice_deployments::yielded().is_none() => self.0.as_mut().poll(cx),
            done => done,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_caller_alone_runs_the_model_in_its_first_poll() {
    let f = start(Duration::ZERO, |_| {});
    run(&f, 3).await;
    let mut call = std::pin::pin!(f.deployment.infer(request(5)));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(call.as_mut().poll(cx))).await;
    let std::task::Poll::Ready(answer) = first else { panic!("a caller alone waited for others") };
    assert_eq!(answer.unwrap().outputs[0].tensor.data()[..8], 5i64.to_le_bytes());
}

/// Callers that each ran alone skip the yield, but one in eight yields anyway: a burst of
/// callers ready on one thread, each of which would otherwise finish within its own poll and
/// never meet another, is batched again within eight requests. The yield is announced
/// (`yielded`), so a server that polls a task that woke itself again at once (`PolledAgain`
/// here) leaves it to the scheduler.
#[test]
fn a_burst_on_one_thread_after_callers_ran_alone_is_batched_again() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _inside = rt.enter();
    let f = start(Duration::ZERO, |_| {});
    rt.block_on(async {
        run(&f, 3).await;
        f.rows.lock().unwrap().clear();
        let callers: Vec<_> = (0..16)
            .map(|k| {
                let d = f.deployment.clone();
                tokio::spawn(PolledAgain(Box::pin(async move { d.infer(request(300 + k)).await.unwrap() })))
            })
            .collect();
        for (k, task) in (300..).zip(callers) {
            let r = task.await.unwrap();
            assert_eq!(
                r.outputs[0].tensor.data()[..8],
                i64::to_le_bytes(k),
                "each caller gets its own answer"
            );
        }
    });
    let rows = f.rows.lock().unwrap().clone();
    assert_eq!(rows.iter().sum::<usize>(), 16, "{rows:?}");
    let first = rows.iter().position(|&r| r > 1).unwrap_or_else(|| panic!("never batched again: {rows:?}"));
    assert!(first < 8, "batched again within eight requests: {rows:?}");
    assert!(rows[first..].iter().all(|&r| r > 1), "the rest of the burst in batches: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_dropped_at_its_yield_leaves_no_job_holding_the_only_slot() {
    // One slot. A caller that left its job with the model and is dropped at its yield, before
    // it runs the job, takes the job out again with its admission: else the job would keep the
    // only slot while nobody comes to run it.
    let f = start(Duration::ZERO, |s| s.settings.max_ongoing_requests = 1);
    run(&f, 20).await;
    let mut yielded = false;
    for k in 0..32 {
        let mut call = std::pin::pin!(f.deployment.infer(request(200 + k)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if call.as_mut().poll(&mut cx).is_pending() {
            yielded = true;
            break; // dropped here, at its yield
        }
    }
    assert!(yielded, "one caller in eight yields while callers run alone");
    let r = tokio::time::timeout(Duration::from_secs(5), f.deployment.infer(request(300)))
        .await
        .expect("the next request gets the slot")
        .unwrap();
    assert_eq!(r.outputs[0].tensor.data()[..8], 300i64.to_le_bytes());
}

/// A request that finds the model held by `warm_again` (the server's `release_startup_memory`
/// runs it while requests may arrive) is left for the holder, and is run once the warm-up lets
/// go, not stranded until its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_during_warm_again_is_answered() {
    let f = start(Duration::from_millis(300), |s| {
        s.settings.warmup = true;
        // The warm-up's 300 ms still counts as cheap: the request is made inline.
        s.settings.run_inline_under_us = 10_000_000;
    });
    assert!(f.deployment.wait_ready(Duration::from_secs(5)).await);
    let d = f.deployment.clone();
    let warm = tokio::task::spawn_blocking(move || d.warm_again());
    // Let the warm-up take the model first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = tokio::time::timeout(Duration::from_secs(5), f.deployment.infer(request(5)))
        .await
        .expect("answered once the warm-up let go, not held until its deadline")
        .unwrap();
    assert_eq!(r.outputs[0].tensor.data()[..8], 5i64.to_le_bytes());
    assert!(warm.await.unwrap(), "the warm-up ran");
}

/// A shadow's copy (`infer_now`) of a cheap model runs on the replica's thread, never on the
/// caller's: it ran on the thread serving the primary's request, ahead of it, whenever the
/// primary gave the thread up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_copy_runs_on_the_replicas_thread() {
    let f = start(Duration::ZERO, |_| {});
    assert!(run(&f, 5).await.iter().all(|t| !t.starts_with("echo#")), "cheap: calls run inline");
    f.threads.lock().unwrap().clear();
    for k in 0..5 {
        let r = f.deployment.infer_now(request(k)).await.unwrap();
        assert_eq!(r.outputs[0].tensor.data()[..8], k.to_le_bytes());
    }
    let threads = f.threads.lock().unwrap().clone();
    assert!(threads.iter().all(|t| t == "echo#0"), "{threads:?}");
}
