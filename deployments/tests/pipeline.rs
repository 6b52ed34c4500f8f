//! Pipelines run independent branches at the same time: x → {left, right} → join. Each branch
//! step waits until the other branch has started before it answers, so a pipeline that ran its
//! steps one after another could never finish (the wait is bounded: it would fail instead).
//! And a pipeline request has one deadline, fails cleanly on a step's missing output, and counts
//! its rows in the pipeline's stats.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_deployments::pipeline::Step;
use sluice_deployments::{
    Backend, BackendFactory, DataType, Deployment, DeploymentSpec, ErrorKind, InferError, InferRequest,
    ModelMetadata, NamedTensor, Pipeline, Tensor, TensorSpec,
};

fn spec(name: &str) -> TensorSpec {
    TensorSpec { name: name.into(), dtype: DataType::Int64, shape: vec![-1, 1] }
}

/// `out = in0 + offset` (first input), after telling `started` and, when given, waiting for
/// the other branch's start.
struct Branch {
    meta: ModelMetadata,
    offset: i64,
    started: Option<Sender<()>>,
    other: Option<Arc<Mutex<Receiver<()>>>>,
}

impl Backend for Branch {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
        if let Some(s) = &self.started {
            let _ = s.send(());
        }
        if let Some(other) = &self.other {
            other.lock().unwrap().recv_timeout(Duration::from_secs(5)).map_err(|_| {
                InferError::internal("the other branch never started: steps ran one after another")
            })?;
        }
        let x = &inputs[0].tensor;
        let v: Vec<u8> = x
            .data()
            .chunks(8)
            .flat_map(|c| (i64::from_le_bytes(c.try_into().unwrap()) + self.offset).to_le_bytes())
            .collect();
        let out = Tensor::new(DataType::Int64, x.shape().to_vec(), Bytes::from(v))?;
        Ok(vec![NamedTensor { name: self.meta.outputs[0].name.clone(), tensor: out }])
    }
}

fn deployment(
    name: &str,
    inputs: &[&str],
    offset: i64,
    started: Option<Sender<()>>,
    other: Option<Receiver<()>>,
) -> Arc<Deployment> {
    let meta = ModelMetadata {
        platform: "test".into(),
        inputs: inputs.iter().map(|n| spec(n)).collect(),
        outputs: vec![spec("out")],
    };
    let other = other.map(|o| Arc::new(Mutex::new(o)));
    let factory: BackendFactory = Arc::new(move || {
        Ok(Box::new(Branch { meta: meta.clone(), offset, started: started.clone(), other: other.clone() })
            as Box<dyn Backend>)
    });
    let mut s = DeploymentSpec::new(name);
    s.settings.warmup = false;
    Arc::new(Deployment::start(s, factory).unwrap())
}

fn step(name: &str, d: &Arc<Deployment>, inputs: &[(&str, &str)], out: &str) -> Step {
    Step {
        name: name.into(),
        deployment: d.clone(),
        inputs: inputs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        outputs: vec![("out".into(), out.into())],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_branches_run_at_the_same_time_and_join() {
    let (left_started, right_sees) = channel();
    let (right_started, left_sees) = channel();
    let left = deployment("left", &["x"], 10, Some(left_started), Some(left_sees));
    let right = deployment("right", &["x"], 20, Some(right_started), Some(right_sees));
    let join = deployment("join", &["a", "b"], 0, None, None);
    let steps = vec![
        step("left", &left, &[("x", "x")], "a"),
        step("right", &right, &[("x", "x")], "b"),
        step("join", &join, &[("a", "a"), ("b", "b")], "y"),
    ];
    let pipeline =
        Pipeline::new("branches", vec![spec("x")], steps, &["y".into(), "b".into()], None).unwrap();
    for d in [&left, &right, &join] {
        assert!(d.wait_ready(Duration::from_secs(5)).await);
    }
    let x = Tensor::new(DataType::Int64, vec![1, 1], Bytes::from(5i64.to_le_bytes().to_vec())).unwrap();
    let request =
        InferRequest { inputs: vec![NamedTensor { name: "x".into(), tensor: x }], ..Default::default() };
    let answer =
        tokio::time::timeout(Duration::from_secs(20), pipeline.infer(request)).await.unwrap().unwrap();
    let value = |i: usize| i64::from_le_bytes(answer.outputs[i].tensor.data()[..8].try_into().unwrap());
    assert_eq!((answer.outputs[0].name.as_str(), value(0)), ("y", 15), "join echoes the left branch: 5 + 10");
    assert_eq!((answer.outputs[1].name.as_str(), value(1)), ("b", 25), "the right branch: 5 + 20");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_branch_fails_the_request_naming_its_step() {
    // The right branch waits for a left branch that never signals: it fails after its bound.
    let (_never, right_sees) = channel();
    let left = deployment("left", &["x"], 1, None, None);
    let right = deployment("right", &["x"], 2, None, Some(right_sees));
    let steps = vec![step("ok", &left, &[("x", "x")], "a"), step("stuck", &right, &[("x", "x")], "b")];
    let pipeline = Pipeline::new("p", vec![spec("x")], steps, &["a".into(), "b".into()], None).unwrap();
    let x = Tensor::new(DataType::Int64, vec![1, 1], Bytes::from(0i64.to_le_bytes().to_vec())).unwrap();
    let request =
        InferRequest { inputs: vec![NamedTensor { name: "x".into(), tensor: x }], ..Default::default() };
    let e = pipeline.infer(request).await.unwrap_err();
    assert!(
        e.message.starts_with("pipeline `p` step `stuck` (right): the other branch never started"),
        "{e}"
    );
}

/// `out = in0` (and `extra = in0` unless it leaves it out) after sleeping `sleep`: a slow step,
/// or one whose answer lacks an output the pipeline asked of it.
struct Copy {
    meta: ModelMetadata,
    sleep: Duration,
    leaves_out_extra: bool,
}

impl Backend for Copy {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        std::thread::sleep(self.sleep);
        let x = &inputs[0].tensor;
        Ok(outputs
            .iter()
            .filter(|name| !(self.leaves_out_extra && *name == "extra"))
            .map(|name| NamedTensor { name: name.clone(), tensor: x.clone() })
            .collect())
    }
}

/// A deployment of [`Copy`] with outputs `out` and `extra`.
fn copy(name: &str, sleep: Duration, leaves_out_extra: bool) -> Arc<Deployment> {
    let meta = ModelMetadata {
        platform: "test".into(),
        inputs: vec![spec("x")],
        outputs: vec![spec("out"), spec("extra")],
    };
    let factory: BackendFactory = Arc::new(move || {
        Ok(Box::new(Copy { meta: meta.clone(), sleep, leaves_out_extra }) as Box<dyn Backend>)
    });
    let mut s = DeploymentSpec::new(name);
    s.settings.warmup = false;
    Arc::new(Deployment::start(s, factory).unwrap())
}

/// `x` of `rows` rows.
fn rows(n: usize) -> InferRequest {
    let data: Vec<u8> = (0..n as i64).flat_map(i64::to_le_bytes).collect();
    let x = Tensor::new(DataType::Int64, vec![n, 1], Bytes::from(data)).unwrap();
    InferRequest { inputs: vec![NamedTensor { name: "x".into(), tensor: x }], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_deadline_covers_the_whole_pipeline_not_each_step() {
    // Each step alone answers well within the deadline; one after the other they cannot.
    let first = copy("first", Duration::from_millis(1200), false);
    let second = copy("second", Duration::from_millis(1200), false);
    let steps = vec![step("one", &first, &[("x", "x")], "a"), step("two", &second, &[("x", "a")], "y")];
    let pipeline = Pipeline::new("slow", vec![spec("x")], steps, &["y".into()], None).unwrap();
    let request = InferRequest { timeout: Some(Duration::from_secs(2)), ..rows(1) };
    let e = pipeline.infer(request).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::DeadlineExceeded, "{e}");
    assert!(e.message.starts_with("pipeline `slow` step `two` (second): request timed out"), "{e}");
    // A deadline that has passed before a step starts is answered without running it.
    let request = InferRequest { timeout: Some(Duration::ZERO), ..rows(1) };
    let e = pipeline.infer(request).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::DeadlineExceeded, "{e}");
    assert!(e.message.starts_with("pipeline `slow` step `one` (first): request timed out"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_leaves_out_an_output_fails_the_request_naming_it() {
    let forgetful = copy("forgetful", Duration::ZERO, true);
    let join = deployment("join", &["a", "b"], 0, None, None);
    let steps = vec![
        Step {
            name: "split".into(),
            deployment: forgetful.clone(),
            inputs: vec![("x".into(), "x".into())],
            outputs: vec![("out".into(), "a".into()), ("extra".into(), "b".into())],
        },
        step("join", &join, &[("a", "a"), ("b", "b")], "y"),
    ];
    let pipeline = Pipeline::new("p", vec![spec("x")], steps, &["y".into()], None).unwrap();
    let e = pipeline.infer(rows(1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Internal, "{e}");
    assert_eq!(e.message, "pipeline `p` step `split` (forgetful) did not return its output `extra`");
}

/// A step whose answer contradicts its own metadata (a custom step declaring FP32, returning
/// INT64) fails the request as the server's fault, naming the step: the step reading it would
/// have refused it as the client's mistake (400), and as a pipeline output it reached the
/// client in a type the pipeline's metadata contradicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_answering_against_its_metadata_fails_the_request_naming_it() {
    let fp32 = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: vec![-1, 1] };
    let meta = ModelMetadata { platform: "test".into(), inputs: vec![spec("x")], outputs: vec![fp32("out")] };
    let factory: BackendFactory = Arc::new(move || {
        Ok(Box::new(Copy { meta: meta.clone(), sleep: Duration::ZERO, leaves_out_extra: false })
            as Box<dyn Backend>)
    });
    let mut s = DeploymentSpec::new("liar");
    s.settings.warmup = false;
    let liar = Arc::new(Deployment::start(s, factory).unwrap());
    let steps = vec![step("copy", &liar, &[("x", "x")], "y")];
    let pipeline = Pipeline::new("p", vec![spec("x")], steps, &["y".into()], None).unwrap();
    let e = pipeline.infer(rows(1)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Internal, "{e}");
    assert_eq!(
        e.message,
        "pipeline `p` step `copy` (liar) returned its output `out` as INT64 [1, 1], but its metadata says FP32 [-1, 1]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_stats_count_the_rows_of_each_request() {
    let d = copy("rows", Duration::ZERO, false);
    let steps = vec![step("copy", &d, &[("x", "x")], "y")];
    let pipeline = Pipeline::new("p", vec![spec("x")], steps, &["y".into()], None).unwrap();
    pipeline.infer(rows(32)).await.unwrap();
    pipeline.infer(rows(1)).await.unwrap();
    let stats = &pipeline.metrics().stats;
    assert_eq!(stats.inference_count.load(Ordering::Relaxed), 33, "rows, as Triton counts them");
    assert_eq!(stats.execution_count.load(Ordering::Relaxed), 2, "one execution per request");
}

/// A pipeline request counts on every step's deployment from its start: a later step's
/// deployment retired (swapped out) while an earlier step runs is not drained, and so not
/// stopped, before the request has passed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_steps_deployment_is_not_drained_while_a_request_is_on_its_way() {
    let first = copy("slow-first", Duration::from_millis(600), false);
    let second = copy("later", Duration::ZERO, false);
    let steps = vec![step("one", &first, &[("x", "x")], "a"), step("two", &second, &[("x", "a")], "y")];
    let pipeline = Arc::new(Pipeline::new("p", vec![spec("x")], steps, &["y".into()], None).unwrap());
    let running = tokio::spawn({
        let pipeline = pipeline.clone();
        async move { pipeline.infer(rows(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Step one runs; step two's deployment has not been called yet, but is not drained.
    let drained = tokio::time::timeout(Duration::from_millis(200), second.drained()).await;
    assert!(drained.is_err(), "drained while a request was on its way to it");
    running.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(5), second.drained()).await.expect("drained once it passed");
}
