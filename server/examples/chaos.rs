//! The server `scripts/soak.py` runs: Sluice serving a config, with two custom steps that
//! misbehave on demand registered first, so the soak can mix faults into real traffic:
//!
//! - `sleep`: `x` FP32 [-1] → `y` = `x`, after sleeping `x[0]` milliseconds (at most 10 s): a
//!   slow model that runs past deadlines;
//! - `panic_below_zero`: the same, but panics when `x[0]` is negative: a crashing model (the
//!   replica fails that batch, reloads and serves again).
//!
//! `cargo run --release -p sluice-server --example chaos -- CONFIG`; stops on SIGTERM or
//! Ctrl-C, gracefully. ONNX Runtime comes from the project's `.ort/` folder.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_deployments::{Backend, DataType, InferError, ModelMetadata, NamedTensor, Tensor, TensorSpec};

/// The allocator `sluice` itself runs on (server/src/main.rs), so the soak measures its memory.
#[global_allocator]
static ALLOCATOR: sluice_server::alloc::MiMalloc = sluice_server::alloc::MiMalloc;

/// What a step does before answering with its input.
#[derive(Clone, Copy)]
enum Fault {
    Sleep,
    PanicBelowZero,
}

struct Step {
    meta: ModelMetadata,
    fault: Fault,
}

impl Step {
    fn new(fault: Fault) -> Self {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: vec![-1] };
        Self {
            meta: ModelMetadata {
                platform: "chaos".into(),
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            fault,
        }
    }
}

impl Backend for Step {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: Vec<NamedTensor>, _: &[String]) -> Result<Vec<NamedTensor>, InferError> {
        let x = &inputs[0].tensor;
        let first = x.data().get(..4).map_or(0.0, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match self.fault {
            Fault::Sleep => std::thread::sleep(Duration::from_secs_f32(first.clamp(0.0, 10_000.0) / 1000.0)),
            Fault::PanicBelowZero => assert!(first >= 0.0, "asked to panic (x[0] = {first})"),
        }
        let y = Tensor::new(DataType::Fp32, x.shape().to_vec(), Bytes::copy_from_slice(x.data()))?;
        Ok(vec![NamedTensor { name: "y".into(), tensor: y }])
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").with_writer(std::io::stderr).init();
    for (name, fault) in [("sleep", Fault::Sleep), ("panic_below_zero", Fault::PanicBelowZero)] {
        sluice_deployments::register_step(
            name,
            Arc::new(move || Ok(Box::new(Step::new(fault)) as Box<dyn Backend>)),
        );
    }
    let path = std::env::args().nth(1).ok_or("usage: chaos CONFIG")?;
    let config = sluice_config::load(std::path::Path::new(&path)).map_err(|e| e.to_string())?;
    sluice_server::runtime::init(None, None)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let server = sluice_server::start(config, Default::default()).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        server.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}
