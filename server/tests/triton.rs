//! Triton-style model configuration and statistics with real values: `dynamic_batching` with
//! the deployment's preferred sizes, batch wait and queue policy; the version policy a model's
//! versions follow (REST and gRPC); and statistics with Triton's meaning — per-request
//! compute stages and per-batch-size model calls.

mod common;

use common::*;
use serde_json::{Value, json};
use sluice_proto::inference as pb;
use sluice_proto::inference::model_version_policy::{Latest, PolicyChoice, Specific};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_reports_dynamic_batching_and_the_versions_served() {
    let s = start(
        concat!(
            "      - name: iris\n",
            "        model: iris/model.onnx\n",
            "        max_batch_size: 8\n",
            "        batch_wait_timeout_s: 0.002\n",
            "        preferred_batch_sizes: [4, 2]\n",
            "        max_queued_requests: 10\n",
            "        request_timeout_s: 5\n",
            "        canary: {model: iris/model.onnx, version: \"2\", weight: 10}\n",
            "      - {name: dtypes, model: dtypes/model.onnx}\n",
        ),
        "",
    )
    .await;
    let (status, c) = get_json(&s, "/v2/models/iris/config").await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(
        c["dynamic_batching"],
        json!({
            "preferred_batch_size": [2, 4],
            "max_queue_delay_microseconds": 2000,
            "preserve_ordering": false,
            "priority_levels": 0,
            "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": 5_000_000,
                "allow_timeout_override": true,
                "max_queue_size": 10,
            },
        })
    );
    assert_eq!(c["version_policy"], json!({"specific": {"versions": [1, 2]}}), "primary and canary");
    let (_, c) = get_json(&s, "/v2/models/dtypes/config").await;
    assert!(c.get("dynamic_batching").is_none(), "no batching, no batcher: {c}");
    assert_eq!(c["version_policy"], json!({"specific": {"versions": [1]}}));

    let mut grpc = grpc::client(&s).await;
    let req = pb::ModelConfigRequest { name: "iris".into(), version: String::new() };
    let config = grpc.model_config(req).await.unwrap().into_inner().config.unwrap();
    let Some(pb::model_config::SchedulingChoice::DynamicBatching(b)) = config.scheduling_choice else {
        panic!("no dynamic_batching: {config:?}")
    };
    assert_eq!((b.preferred_batch_size, b.max_queue_delay_microseconds), (vec![2, 4], 2000));
    let q = b.default_queue_policy.unwrap();
    assert_eq!(
        (q.default_timeout_microseconds, q.allow_timeout_override, q.max_queue_size),
        (5_000_000, true, 10)
    );
    assert_eq!(
        config.version_policy.unwrap().policy_choice,
        Some(PolicyChoice::Specific(Specific { versions: vec![1, 2] }))
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_model_reports_its_policy_and_grpc_lists_it_when_unloaded() {
    sluice_server::runtime::init(None, None).unwrap();
    let repo = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("triton-repo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    for v in 1..=3 {
        let d = repo.join("flowers").join(v.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(models_dir().join("iris/model.onnx"), d.join("model.onnx")).unwrap();
        // The marker a writer puts last: the version is complete.
        std::fs::write(d.join("READY"), b"").unwrap();
    }
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{port: 0}}\nadmin_options: {{enabled: false}}\nmodel_repository: {{path: {}, poll_interval_s: 0, version_policy: {{latest: 2}}}}\n",
        repo.display()
    );
    let config = sluice_config::parse(&text, &models_dir().join("r.yaml")).unwrap();
    let s = sluice_server::start(config, Default::default()).await.unwrap();
    let (_, c) = get_json(&s, "/v2/models/flowers/config").await;
    assert_eq!(c["version_policy"], json!({"latest": {"num_versions": 2}}), "{c}");
    let mut grpc = grpc::client(&s).await;
    let req = pb::ModelConfigRequest { name: "flowers".into(), version: "2".into() };
    let config = grpc.model_config(req).await.unwrap().into_inner().config.unwrap();
    assert_eq!(
        config.version_policy.unwrap().policy_choice,
        Some(PolicyChoice::Latest(Latest { num_versions: 2 }))
    );

    // Unloaded: gone from the routes, listed by gRPC's index with its reason, as by REST's.
    let r =
        reqwest::Client::new().post(url(&s, "/v2/repository/models/flowers/unload")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let index = grpc.repository_index(pb::RepositoryIndexRequest::default()).await.unwrap().into_inner();
    let unloaded = pb::repository_index_response::ModelIndex {
        name: "flowers".into(),
        version: String::new(),
        state: "UNAVAILABLE".into(),
        reason: "unloaded".into(),
    };
    assert_eq!(index.models, vec![unloaded]);
    let ready_only = pb::RepositoryIndexRequest { ready: true, ..Default::default() };
    assert!(grpc.repository_index(ready_only).await.unwrap().into_inner().models.is_empty());
    s.shutdown().await;
}

fn count_ns(v: &Value) -> (u64, u64) {
    (v["count"].as_u64().unwrap(), v["ns"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_have_tritons_meaning() {
    let s = start(
        "      - {name: mlp, model: mlp/model.onnx, max_batch_size: 32, batch_wait_timeout_s: 0.05}\n      - {name: iris, model: iris/model.onnx}\n",
        "",
    )
    .await;
    let client = reqwest::Client::new();
    let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [1, 2, 3, 4, 5, 6, 7, 8]}]});
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (client, url, body) = (client.clone(), url(&s, "/v2/models/mlp/infer"), body.to_string());
        tasks.push(tokio::spawn(async move { client.post(url).body(body).send().await.unwrap().status() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let (status, stats) = get_json(&s, "/v2/models/mlp/stats").await;
    assert_eq!(status, 200);
    let m = &stats["model_stats"][0];
    let i = &m["inference_stats"];
    assert_eq!(count_ns(&i["success"]).0, 24);
    // Compute stages count requests, like `success`, and each took time.
    for stage in ["compute_input", "compute_infer", "compute_output"] {
        let (count, ns) = count_ns(&i[stage]);
        assert_eq!(count, 24, "{stage}: {m}");
        assert!(ns > 0, "{stage} measured: {m}");
    }
    // batch_stats: one entry per batch size that ran, in order, counting model calls.
    let batches = m["batch_stats"].as_array().unwrap();
    let sizes: Vec<u64> = batches.iter().map(|b| b["batch_size"].as_u64().unwrap()).collect();
    assert!(sizes.windows(2).all(|w| w[0] < w[1]), "{sizes:?}");
    assert!(sizes.iter().any(|&n| n > 1), "concurrent requests were batched: {sizes:?}");
    let calls: u64 = batches.iter().map(|b| count_ns(&b["compute_infer"]).0).sum();
    let rows: u64 =
        batches.iter().map(|b| b["batch_size"].as_u64().unwrap() * count_ns(&b["compute_infer"]).0).sum();
    assert_eq!(calls, m["execution_count"].as_u64().unwrap(), "{m}");
    assert_eq!(rows, 24);
    assert_eq!(m["inference_count"], 24);
    // Each one-row request of a batch is charged the whole batch's time, as in Triton.
    for stage in ["compute_input", "compute_infer", "compute_output"] {
        let per_request: u64 =
            batches.iter().map(|b| b["batch_size"].as_u64().unwrap() * count_ns(&b[stage]).1).sum();
        assert_eq!(per_request, count_ns(&i[stage]).1, "{stage}: {m}");
    }

    // One request alone: no concatenation, but ONNX Runtime's input and output copies count.
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]});
    let r = client.post(url(&s, "/v2/models/iris/infer")).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, stats) = get_json(&s, "/v2/models/iris/stats").await;
    let m = &stats["model_stats"][0];
    for stage in ["compute_input", "compute_infer", "compute_output"] {
        let (count, ns) = count_ns(&m["inference_stats"][stage]);
        assert!(count == 1 && ns > 0, "{stage}: {m}");
    }
    assert_eq!(m["batch_stats"].as_array().unwrap().len(), 1, "{m}");
    assert_eq!(m["batch_stats"][0]["batch_size"], 1);
    assert_eq!(m["execution_count"], 1);

    // The same over gRPC's `ModelStatistics` (tritonclient.grpc's get_inference_statistics was
    // answered UNIMPLEMENTED): one model, every model, and an unknown one.
    let mut grpc = grpc::client(&s).await;
    let asked = |name: &str| pb::ModelStatisticsRequest { name: name.into(), version: String::new() };
    let one = grpc.model_statistics(asked("mlp")).await.unwrap().into_inner();
    let (_, rest) = get_json(&s, "/v2/models/mlp/stats").await;
    assert_eq!(sluice_server::model_stats::to_json(&one), rest, "gRPC and REST read the same counters");
    assert_eq!((one.model_stats[0].name.as_str(), one.model_stats[0].inference_count), ("mlp", 24));
    let all = grpc.model_statistics(asked("")).await.unwrap().into_inner();
    let names: Vec<&str> = all.model_stats.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["iris", "mlp"]);
    let e = grpc.model_statistics(asked("nope")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    s.shutdown().await;
}

/// A model's statistics asked for without a version list every version it serves (a canary's
/// beside the primary's), as Triton answers: one picked by the traffic split answered another
/// version at each call, and perf_analyzer, which compares two readings, read the wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_without_a_version_list_every_version_served() {
    let s = start(
        "      - {name: iris, model: iris/model.onnx, version: \"1\", canary: {model: iris/model.onnx, version: \"2\", weight: 50}}\n",
        "",
    )
    .await;
    for _ in 0..5 {
        let (_, stats) = get_json(&s, "/v2/models/iris/stats").await;
        let versions: Vec<&str> =
            stats["model_stats"].as_array().unwrap().iter().map(|m| m["version"].as_str().unwrap()).collect();
        assert_eq!(versions, ["1", "2"], "{stats}");
    }
    let (_, one) = get_json(&s, "/v2/models/iris/versions/2/stats").await;
    assert_eq!(one["model_stats"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["model_stats"][0]["version"], "2");
    s.shutdown().await;
}
