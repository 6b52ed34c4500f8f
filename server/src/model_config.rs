//! The Triton-style model configuration both frontends serve (`GET .../config`, gRPC
//! `ModelConfig`), built from a deployment's real settings. Complete enough for perf_analyzer:
//! it reads `max_batch_size`, input and output names, which scheduler is present
//! (`dynamic_batching` for every batching deployment, with its preferred sizes, batch wait and
//! queue policy), and `model_transaction_policy.decoupled` / `response_cache.enable` without
//! checking for them.

use serde_json::{Value, json};
use sluice_config::VersionPolicy;
use sluice_controller::Controller;
use sluice_deployments::{DataType, Servable};
use sluice_proto::inference as pb;
use sluice_proto::inference::model_version_policy::{All, Latest, PolicyChoice, Specific};
use sluice_router::Router;

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

/// Which versions of `model` are served: the repository's version policy for a repository
/// model; otherwise the versions the config declares (a deployment and its canary), listed as
/// `specific` when they are numbers (Triton's versions are) and `all` when one is not.
pub fn version_policy(routes: &Router, controller: &Controller, model: &str) -> pb::ModelVersionPolicy {
    let choice = match controller.repository_policy(model) {
        Some(VersionPolicy::Latest(n)) => PolicyChoice::Latest(Latest { num_versions: n }),
        Some(VersionPolicy::All) => PolicyChoice::All(All {}),
        Some(VersionPolicy::Specific(v)) => {
            PolicyChoice::Specific(Specific { versions: v.iter().map(|&v| v as i64).collect() })
        }
        None => {
            let numbers: Option<Vec<i64>> = routes.versions(model).iter().map(|v| v.parse().ok()).collect();
            match numbers {
                Some(mut versions) => {
                    versions.sort_unstable();
                    PolicyChoice::Specific(Specific { versions })
                }
                None => PolicyChoice::All(All {}),
            }
        }
    };
    pb::ModelVersionPolicy { policy_choice: Some(choice) }
}

/// The dynamic batcher of a batching deployment, with its real settings: preferred sizes,
/// the batch wait, and the queue's bound and default timeout (a request's OIP `timeout` may
/// shorten it; one that cannot get a slot in time is rejected).
fn dynamic_batching(d: &Servable) -> Option<pb::model_config::SchedulingChoice> {
    let settings = &d.deployment().filter(|d| d.max_batch_size() > 0)?.spec().settings;
    let mut preferred: Vec<i32> =
        settings.preferred_batch_sizes.iter().map(|&n| i32::try_from(n).unwrap_or(i32::MAX)).collect();
    preferred.sort_unstable();
    let micros = |s: f64| (s * 1e6).round() as u64;
    Some(pb::model_config::SchedulingChoice::DynamicBatching(pb::ModelDynamicBatching {
        preferred_batch_size: preferred,
        max_queue_delay_microseconds: micros(settings.batch_wait_timeout_s),
        preserve_ordering: false,
        priority_levels: 0,
        default_priority_level: 0,
        default_queue_policy: Some(pb::ModelQueuePolicy {
            timeout_action: pb::model_queue_policy::TimeoutAction::Reject as i32,
            default_timeout_microseconds: micros(settings.request_timeout_s),
            allow_timeout_override: true,
            max_queue_size: settings.max_queued_requests,
        }),
    }))
}

/// A pipeline's steps as Triton describes an ensemble's: each step's deployment and the version
/// it runs (-1, Triton's "latest", when the version is not a number), its inputs and outputs
/// mapped to the pipeline's tensors. A config saying `platform: ensemble` without them crashed
/// perf_analyzer, which walks them (and looks each step's statistics up by that version).
fn ensemble_scheduling(p: &sluice_deployments::Pipeline) -> pb::model_config::SchedulingChoice {
    let step = p
        .steps()
        .iter()
        .map(|s| pb::model_ensembling::Step {
            model_name: s.deployment.name().to_string(),
            model_version: s.deployment.version().parse().unwrap_or(-1),
            input_map: s.inputs.iter().cloned().collect(),
            output_map: s.outputs.iter().cloned().collect(),
            model_namespace: String::new(),
        })
        .collect();
    pb::model_config::SchedulingChoice::EnsembleScheduling(pb::ModelEnsembling { step })
}

/// The configuration of a deployment whose versions follow `version_policy`.
pub fn build(d: &Servable, version_policy: pb::ModelVersionPolicy) -> pb::ModelConfig {
    let meta = d.metadata();
    let batches = d.max_batch_size() > 0;
    pb::ModelConfig {
        name: d.name().to_string(),
        platform: meta.platform.clone(),
        backend: if meta.platform == "onnxruntime_onnx" { "onnxruntime".to_string() } else { String::new() },
        version_policy: Some(version_policy),
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
        scheduling_choice: match d {
            Servable::Pipeline(p) => Some(ensemble_scheduling(p)),
            _ => dynamic_batching(d),
        },
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
        "version_policy": policy_json(c.version_policy.as_ref()),
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
    if let Some(pb::model_config::SchedulingChoice::EnsembleScheduling(e)) = &c.scheduling_choice {
        v["ensemble_scheduling"] = json!({
            "step": e.step.iter().map(|s| json!({
                "model_name": s.model_name,
                "model_version": s.model_version,
                "input_map": s.input_map,
                "output_map": s.output_map,
                "model_namespace": s.model_namespace,
            })).collect::<Vec<_>>(),
        });
    }
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(b)) = &c.scheduling_choice {
        let q = b.default_queue_policy.unwrap_or_default();
        let action = pb::model_queue_policy::TimeoutAction::try_from(q.timeout_action)
            .map(|a| a.as_str_name())
            .unwrap_or("REJECT");
        v["dynamic_batching"] = json!({
            "preferred_batch_size": b.preferred_batch_size,
            "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
            "preserve_ordering": b.preserve_ordering,
            "priority_levels": b.priority_levels,
            "default_priority_level": b.default_priority_level,
            "default_queue_policy": {
                "timeout_action": action,
                "default_timeout_microseconds": q.default_timeout_microseconds,
                "allow_timeout_override": q.allow_timeout_override,
                "max_queue_size": q.max_queue_size,
            },
        });
    }
    v
}

fn policy_json(p: Option<&pb::ModelVersionPolicy>) -> Value {
    match p.and_then(|p| p.policy_choice.as_ref()) {
        Some(PolicyChoice::Latest(l)) => json!({"latest": {"num_versions": l.num_versions}}),
        Some(PolicyChoice::All(_)) => json!({"all": {}}),
        Some(PolicyChoice::Specific(s)) => json!({"specific": {"versions": s.versions}}),
        // Triton's default.
        None => json!({"latest": {"num_versions": 1}}),
    }
}
