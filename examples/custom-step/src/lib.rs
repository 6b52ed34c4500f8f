//! Custom pipeline steps in Rust, standing in for any pre- or post-processing: a synchronous
//! one (`Celsius → Fahrenheit`, a [`Backend`]) and an async one ([`Rounder`], an [`AsyncStep`]).
//! Both run on replica threads and batch like a model; [`register`] makes them available to
//! configs as `builtin: {custom: {name: to_fahrenheit}}` and `{custom: {name: round}}`.

use std::sync::Arc;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;

use sluice_deployments::{
    AsyncStep, Backend, DataType, InferError, ModelMetadata, NamedTensor, Tensor, TensorSpec,
    register_async_step, register_step,
};

/// `celsius` [N] (FP32) → `fahrenheit` [N, 1] (FP32, a column).
pub struct ToFahrenheit {
    meta: ModelMetadata,
}

impl Default for ToFahrenheit {
    fn default() -> Self {
        let spec =
            |name: &str, shape: Vec<i64>| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape };
        Self {
            meta: ModelMetadata {
                platform: "custom".into(),
                inputs: vec![spec("celsius", vec![-1])],
                outputs: vec![spec("fahrenheit", vec![-1, 1])],
            },
        }
    }
}

impl Backend for ToFahrenheit {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(
        &mut self,
        inputs: Vec<NamedTensor>,
        _outputs: &[String],
    ) -> Result<Vec<NamedTensor>, InferError> {
        let c = &inputs[0].tensor;
        let out: Vec<u8> = c
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * 1.8 + 32.0)
            .flat_map(f32::to_le_bytes)
            .collect();
        Ok(vec![NamedTensor {
            name: "fahrenheit".into(),
            tensor: Tensor::new(DataType::Fp32, vec![c.len(), 1], Bytes::from(out))?,
        }])
    }
}

/// An async step: rounds to whole degrees after awaiting (a stand-in for a lookup in another
/// service). `x` [N, 1] (FP64) → `rounded` [N, 1] (FP64).
pub struct Rounder {
    meta: ModelMetadata,
}

impl Default for Rounder {
    fn default() -> Self {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp64, shape: vec![-1, 1] };
        Self {
            meta: ModelMetadata {
                platform: "custom".into(),
                inputs: vec![spec("x")],
                outputs: vec![spec("rounded")],
            },
        }
    }
}

impl AsyncStep for Rounder {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer<'a>(
        &'a self,
        inputs: Vec<NamedTensor>,
        _outputs: &'a [String],
    ) -> Pin<Box<dyn Future<Output = Result<Vec<NamedTensor>, InferError>> + Send + 'a>> {
        Box::pin(async move {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            let x = &inputs[0].tensor;
            let out: Vec<u8> = x
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()).round())
                .flat_map(f64::to_le_bytes)
                .collect();
            Ok(vec![NamedTensor {
                name: "rounded".into(),
                tensor: Tensor::new(DataType::Fp64, x.shape().to_vec(), Bytes::from(out))?,
            }])
        })
    }
}

/// Registers the steps as `to_fahrenheit` (sync) and `round` (async).
pub fn register() {
    register_step("to_fahrenheit", Arc::new(|| Ok(Box::new(ToFahrenheit::default()) as Box<dyn Backend>)));
    register_async_step("round", Arc::new(Rounder::default()));
}

/// A config serving the custom step alone and in a pipeline with a built-in step.
pub const CONFIG: &str = r#"
applications:
  - name: weather
    route_prefix: /weather
    deployments:
      - {name: to_f, builtin: {custom: {name: to_fahrenheit}}, max_batch_size: 64}
      - {name: to_double, builtin: {cast: {from: FP32, to: FP64}}, max_batch_size: 64}
      - {name: rounder, builtin: {custom: {name: round}}, max_batch_size: 64, num_replicas: 2}
    pipeline:
      name: forecast
      inputs: [{name: celsius, datatype: FP32, shape: [-1]}]
      steps:
        - {name: convert, deployment: to_f, inputs: {celsius: celsius}, outputs: {fahrenheit: f}}
        - {name: widen, deployment: to_double, inputs: {x: f}, outputs: {y: f_column}}
        - {name: round, deployment: rounder, inputs: {x: f_column}, outputs: {rounded: whole}}
      outputs: [f_column, whole]
      route: {request: {celsius: celsius}, response: {fahrenheit: f_column, whole_degrees: whole}}
"#;
