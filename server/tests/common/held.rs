//! A custom step the test holds: `y = x` (`x`: FP32 [-1]), except that a call whose `x` has a
//! positive value tells the test it started and waits until the test releases it. Warm-up
//! batches are zeros and pass straight through. Lets a test have a request provably running
//! (or a replica provably busy) without sleeps.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_deployments::{Backend, DataType, InferError, ModelMetadata, NamedTensor, TensorSpec};
use tokio::sync::Notify;

/// The test's side of a held step.
pub struct Held {
    started: Arc<Notify>,
    release: Sender<()>,
}

impl Held {
    /// Registers a held step as `builtin: {custom: {name: NAME}}` (a name per test: the
    /// registry is the process's).
    pub fn register(name: &str) -> Self {
        let started = Arc::new(Notify::new());
        let (release, gate) = channel();
        let gate = Arc::new(Mutex::new(gate));
        let notify = started.clone();
        sluice_deployments::register_step(
            name,
            Arc::new(move || {
                Ok(Box::new(Step { meta: meta(), started: notify.clone(), gate: gate.clone() })
                    as Box<dyn Backend>)
            }),
        );
        Self { started, release }
    }

    /// Registers, as [`Held::register`] does, a step whose load (each replica's) is what is held:
    /// it tells the test it started and waits until the test releases it.
    #[allow(dead_code)]
    pub fn register_load(name: &str) -> Self {
        let started = Arc::new(Notify::new());
        let (release, gate) = channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let notify = started.clone();
        sluice_deployments::register_step(
            name,
            Arc::new(move || {
                notify.notify_one();
                let _ = gate.lock().unwrap_or_else(|e| e.into_inner()).recv_timeout(Duration::from_secs(60));
                Ok(Box::new(Step { meta: meta(), started: Arc::default(), gate: gate.clone() })
                    as Box<dyn Backend>)
            }),
        );
        Self { started, release }
    }

    /// Waits until a held call has started (at most 30 s, then panics).
    pub async fn started(&self) {
        tokio::time::timeout(Duration::from_secs(30), self.started.notified())
            .await
            .expect("a held call started");
    }

    /// Lets one held call finish.
    pub fn release(&self) {
        let _ = self.release.send(());
    }
}

/// The body of a request with `x = [value]`, optionally with OIP parameters.
pub fn body(value: f32, parameters: Option<serde_json::Value>) -> String {
    let mut v =
        serde_json::json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [value]}]});
    if let Some(p) = parameters {
        v["parameters"] = p;
    }
    v.to_string()
}

fn meta() -> ModelMetadata {
    let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: vec![-1] };
    ModelMetadata { platform: "custom".into(), inputs: vec![spec("x")], outputs: vec![spec("y")] }
}

struct Step {
    meta: ModelMetadata,
    started: Arc<Notify>,
    gate: Arc<Mutex<Receiver<()>>>,
}

impl Backend for Step {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
        let x = &inputs[0].tensor;
        let held = x.data().chunks_exact(4).any(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) > 0.0);
        if held {
            self.started.notify_one();
            // Bounded, so a test that never releases fails instead of hanging.
            let gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            let _ = gate.recv_timeout(Duration::from_secs(60));
        }
        let tensor = sluice_deployments::Tensor::new(
            DataType::Fp32,
            x.shape().to_vec(),
            Bytes::copy_from_slice(x.data()),
        )?;
        Ok(vec![NamedTensor { name: "y".into(), tensor }])
    }
}
