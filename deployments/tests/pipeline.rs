//! Pipelines run independent branches at the same time: x → {left, right} → join. Each branch
//! step waits until the other branch has started before it answers, so a pipeline that ran its
//! steps one after another could never finish (the wait is bounded: it would fail instead).

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_deployments::pipeline::Step;
use sluice_deployments::{
    Backend, BackendFactory, DataType, Deployment, DeploymentSpec, InferError, InferRequest, ModelMetadata,
    NamedTensor, Pipeline, Tensor, TensorSpec,
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
