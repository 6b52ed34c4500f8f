//! Triton's statistics extension, built once for both frontends: `GET /v2/models[/{m}[/versions/
//! {v}]]/stats` renders it as JSON ([`to_json`]), gRPC's `ModelStatistics` sends it as it is.
//! Cumulative counters with Triton's meaning (see [`sluice_deployments::metrics::Stats`]);
//! `batch_stats` lists the batch sizes that ran; no response cache, so its counters are zeros.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};
use sluice_deployments::{InferError, Servable};
use sluice_proto::inference as pb;
use sluice_router::Router;

/// The deployments asked for, each with the name its statistics go by: `model` at `version`
/// (empty: every version it serves), named as asked (a multiplexed model's id: perf_analyzer looks the
/// statistics of the model it measures up by its name), or every one (each version once, a
/// multiplexed deployment once however many ids route to it).
pub fn asked(
    routes: &Router,
    model: Option<&str>,
    version: Option<&str>,
) -> Result<Vec<(String, Servable)>, InferError> {
    let table = routes.table();
    if let Some(m) = model.filter(|m| !m.is_empty()) {
        let version = version.filter(|v| !v.is_empty());
        // Every version served, as Triton answers a model without a version (one picked by the
        // traffic split read another version each time: perf_analyzer, which compares two
        // readings, then found another model's numbers).
        if version.is_none()
            && let Some(route) = table.models.get(m)
        {
            let mut all: Vec<Servable> = route.versions.values().cloned().collect();
            all.sort_by(|a, b| a.version().cmp(b.version()));
            return Ok(all.into_iter().map(|d| (m.to_string(), d)).collect());
        }
        return Ok(vec![(m.to_string(), routes.resolve(m, version)?)]);
    }
    let mut all: Vec<Servable> = table.models.values().flat_map(|m| m.versions.values().cloned()).collect();
    all.sort_by(|a, b| (a.name(), a.version()).cmp(&(b.name(), b.version())));
    all.dedup_by(|a, b| (a.name(), a.version()) == (b.name(), b.version()));
    Ok(all.into_iter().map(|d| (d.name().to_string(), d)).collect())
}

/// The statistics of `deployments`.
pub fn build(deployments: &[(String, Servable)]) -> pb::ModelStatisticsResponse {
    let duration = |d: &sluice_deployments::metrics::Duration64| {
        Some(pb::StatisticDuration { count: d.count.load(Relaxed), ns: d.ns.load(Relaxed) })
    };
    let zero = || Some(pb::StatisticDuration::default());
    let model_stats = deployments
        .iter()
        .map(|(name, d)| {
            let s = &d.metrics().stats;
            let batch_stats = s
                .batch_sizes
                .iter()
                .enumerate()
                .filter(|(_, b)| b.compute_infer.count.load(Relaxed) > 0)
                .map(|(i, b)| pb::InferBatchStatistics {
                    batch_size: i as u64 + 1,
                    compute_input: duration(&b.compute_input),
                    compute_infer: duration(&b.compute_infer),
                    compute_output: duration(&b.compute_output),
                })
                .collect();
            pb::ModelStatistics {
                name: name.clone(),
                version: d.version().to_string(),
                last_inference: s.last_inference_ms.load(Relaxed),
                inference_count: s.inference_count.load(Relaxed),
                execution_count: s.execution_count.load(Relaxed),
                inference_stats: Some(pb::InferStatistics {
                    success: duration(&s.success),
                    fail: duration(&s.fail),
                    queue: duration(&s.queue),
                    compute_input: duration(&s.compute_input),
                    compute_infer: duration(&s.compute_infer),
                    compute_output: duration(&s.compute_output),
                    cache_hit: zero(),
                    cache_miss: zero(),
                }),
                batch_stats,
            }
        })
        .collect();
    pb::ModelStatisticsResponse { model_stats }
}

/// The JSON form Triton serves on HTTP.
pub fn to_json(r: &pb::ModelStatisticsResponse) -> Value {
    let d = |d: &Option<pb::StatisticDuration>| {
        let d = d.unwrap_or_default();
        json!({"count": d.count, "ns": d.ns})
    };
    let model_stats: Vec<Value> = r
        .model_stats
        .iter()
        .map(|m| {
            let i = m.inference_stats.unwrap_or_default();
            json!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": d(&i.success),
                    "fail": d(&i.fail),
                    "queue": d(&i.queue),
                    "compute_input": d(&i.compute_input),
                    "compute_infer": d(&i.compute_infer),
                    "compute_output": d(&i.compute_output),
                    "cache_hit": d(&i.cache_hit),
                    "cache_miss": d(&i.cache_miss),
                },
                "batch_stats": m.batch_stats.iter().map(|b| json!({
                    "batch_size": b.batch_size,
                    "compute_input": d(&b.compute_input),
                    "compute_infer": d(&b.compute_infer),
                    "compute_output": d(&b.compute_output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "model_stats": model_stats })
}
