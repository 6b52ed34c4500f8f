//! The Triton-style model configuration both frontends serve (`GET .../config`, gRPC
//! `ModelConfig`), built once from a deployment. Complete enough for perf_analyzer: it reads
//! `max_batch_size`, input and output names, which scheduler is present, and
//! `model_transaction_policy.decoupled` / `response_cache.enable` without checking for them.

use serde_json::{Value, json};
use sluice_deployments::{DataType, Servable};
use sluice_proto::inference as pb;

/// The config enum value for a datatype.
pub fn config_dtype(d: DataType) -> pb::DataType {
    match d {
        DataType::Bool => pb::DataType::TypeBool,
        DataType::Uint8 => pb::DataType::TypeUint8,
        DataType::Uint16 => pb::DataType::TypeUint16,
        DataType::Uint32 => pb::DataType::TypeUint32,
        DataType::Uint64 => pb::DataType::TypeUint64,
        DataType::Int8 => pb::DataType::TypeInt8,
        DataType::Int16 => pb::DataType::TypeInt16,
        DataType::Int32 => pb::DataType::TypeInt32,
        DataType::Int64 => pb::DataType::TypeInt64,
        DataType::Fp16 => pb::DataType::TypeFp16,
        DataType::Bf16 => pb::DataType::TypeBf16,
        DataType::Fp32 => pb::DataType::TypeFp32,
        DataType::Fp64 => pb::DataType::TypeFp64,
        DataType::Bytes => pb::DataType::TypeString,
    }
}

/// Config dims: the model's shape without the batch dimension when the model batches.
fn dims(shape: &[i64], batches: bool) -> Vec<i64> {
    if batches { shape.get(1..).unwrap_or_default().to_vec() } else { shape.to_vec() }
}

/// The configuration of a deployment.
pub fn build(d: &Servable) -> pb::ModelConfig {
    let meta = d.metadata();
    let batches = d.max_batch_size() > 0;
    pb::ModelConfig {
        name: d.name().to_string(),
        platform: meta.platform.clone(),
        backend: if meta.platform == "onnxruntime_onnx" { "onnxruntime".to_string() } else { String::new() },
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::Latest(
                pb::model_version_policy::Latest { num_versions: 1 },
            )),
        }),
        max_batch_size: i32::try_from(d.max_batch_size()).unwrap_or(i32::MAX),
        input: meta
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: config_dtype(t.dtype) as i32,
                dims: dims(&t.shape, batches),
                ..Default::default()
            })
            .collect(),
        output: meta
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: config_dtype(t.dtype) as i32,
                dims: dims(&t.shape, batches),
                ..Default::default()
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: d.name().to_string(),
            count: i32::try_from(d.num_replicas()).unwrap_or(i32::MAX),
            gpus: vec![],
            kind: pb::model_instance_group::Kind::Cpu as i32,
        }],
        default_model_filename: "model.onnx".to_string(),
        scheduling_choice: None,
        parameters: Default::default(),
        model_transaction_policy: Some(pb::ModelTransactionPolicy { decoupled: false }),
        response_cache: Some(pb::ModelResponseCache { enable: false }),
    }
}

fn dtype_name(v: i32) -> &'static str {
    pb::DataType::try_from(v).map(|d| d.as_str_name()).unwrap_or("TYPE_INVALID")
}

/// The JSON form Triton serves on HTTP: proto field names, enums as strings, defaults present.
pub fn to_json(c: &pb::ModelConfig) -> Value {
    let mut v = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| json!({
            "name": i.name,
            "data_type": dtype_name(i.data_type),
            "format": "FORMAT_NONE",
            "dims": i.dims,
            "is_shape_tensor": i.is_shape_tensor,
            "allow_ragged_batch": i.allow_ragged_batch,
            "optional": i.optional,
        })).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| json!({
            "name": o.name,
            "data_type": dtype_name(o.data_type),
            "dims": o.dims,
            "label_filename": o.label_filename,
            "is_shape_tensor": o.is_shape_tensor,
        })).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| json!({
            "name": g.name,
            "kind": pb::model_instance_group::Kind::try_from(g.kind).map(|k| k.as_str_name()).unwrap_or("KIND_AUTO"),
            "count": g.count,
            "gpus": g.gpus,
        })).collect::<Vec<_>>(),
        "default_model_filename": c.default_model_filename,
        "parameters": {},
        "model_transaction_policy": {"decoupled": c.model_transaction_policy.as_ref().is_some_and(|p| p.decoupled)},
        "response_cache": {"enable": c.response_cache.as_ref().is_some_and(|p| p.enable)},
    });
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(b)) = &c.scheduling_choice {
        v["dynamic_batching"] = json!({
            "preferred_batch_size": b.preferred_batch_size,
            "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
            "preserve_ordering": b.preserve_ordering,
        });
    }
    v
}
