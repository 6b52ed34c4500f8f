//! A custom pipeline step: `Celsius → Fahrenheit` on FP32 values, standing in for any
//! pre- or post-processing written in Rust. It implements [`Backend`], so it runs on replica
//! threads and batches like a model; [`register`] makes it available to configs as
//! `builtin: {custom: {name: to_fahrenheit}}`.

use std::sync::Arc;

use bytes::Bytes;
use sluice_deployments::{
    Backend, DataType, InferError, ModelMetadata, NamedTensor, Tensor, TensorSpec, register_step,
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

/// Registers the step as `to_fahrenheit`.
pub fn register() {
    register_step("to_fahrenheit", Arc::new(|| Ok(Box::new(ToFahrenheit::default()) as Box<dyn Backend>)));
}

/// A config serving the custom step alone and in a pipeline with a built-in step.
pub const CONFIG: &str = r#"
applications:
  - name: weather
    route_prefix: /weather
    deployments:
      - {name: to_f, builtin: {custom: {name: to_fahrenheit}}, max_batch_size: 64}
      - {name: to_double, builtin: {cast: {from: FP32, to: FP64}}, max_batch_size: 64}
    pipeline:
      name: forecast
      inputs: [{name: celsius, datatype: FP32, shape: [-1]}]
      steps:
        - {name: convert, deployment: to_f, inputs: {celsius: celsius}, outputs: {fahrenheit: f}}
        - {name: widen, deployment: to_double, inputs: {x: f}, outputs: {y: f_column}}
      outputs: [f_column]
      route: {request: {celsius: celsius}, response: {fahrenheit: f_column}}
"#;
