use std::path::{Path, PathBuf};

use super::*;

/// A temp dir with an (empty) model file, so `model:` paths resolve.
fn dir_with_model() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluice-config-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("m.onnx"), b"").unwrap();
    dir
}

fn parse_in(text: &str) -> Result<Config, ConfigErrors> {
    let dir = dir_with_model();
    parse(text, &dir.join("app.yaml"))
}

fn errors(text: &str) -> Vec<ConfigError> {
    parse_in(text).expect_err("config should be rejected").0
}

#[test]
fn minimal_config_gets_defaults() {
    let c =
        parse_in("applications:\n  - name: a\n    deployments:\n      - name: iris\n        model: m.onnx\n")
            .unwrap();
    assert_eq!(c.http_options.host, "127.0.0.1");
    assert_eq!(c.http_options.port, 8000);
    assert_eq!(c.http_options.max_body_bytes, 64 * 1024 * 1024);
    let d = &c.applications[0].deployments[0];
    assert_eq!(d.name, "iris");
    assert_eq!(d.version, "1");
    assert_eq!(d.scaling, Scaling::Fixed(1));
    assert!(d.autoscaling().is_none());
    assert_eq!(d.settings, ReplicaSettings::default());
    assert_eq!(d.settings.spin_before_sleep_us, 50);
    assert!(d.settings.share_weights);
    assert_eq!(d.settings.intra_op_threads, 1);
    assert_eq!(d.num_cpus(), 1.0);
    assert_eq!(c.graceful_shutdown_timeout_s, 30.0);
    assert_eq!(c.shutdown_delay_s, 0.0);
    let path = d.model.onnx_path().unwrap();
    assert!(path.is_absolute() || path.starts_with(std::env::temp_dir()));
    assert!(path.ends_with("m.onnx"));
    assert_eq!(d.location, Location { line: 5, column: 16 }, "where the model is written");
}

#[test]
fn flow_style_http_options() {
    let c = parse_in("http_options: {host: 0.0.0.0, port: 9000, max_body_bytes: 10}\n").unwrap();
    assert_eq!(c.http_options.host, "0.0.0.0");
    assert_eq!(c.http_options.port, 9000);
    assert_eq!(c.http_options.max_body_bytes, 10);
}

#[test]
fn unknown_field_names_location_and_suggests() {
    let e =
        errors("applications:\n  - name: a\n    deployments:\n      - name: iris\n        modle: m.onnx\n");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].line, 5, "{}", e[0]);
    assert_eq!(e[0].field, "modle");
    assert!(e[0].message.contains("did you mean `model`"), "{}", e[0]);
    let shown = e[0].to_string();
    assert!(shown.contains("app.yaml:5:"), "{shown}");
}

#[test]
fn unknown_top_level_field_suggests() {
    let e = errors("http_option: {port: 1}\n");
    assert!(e[0].message.contains("did you mean `http_options`"), "{}", e[0]);
    assert_eq!(e[0].line, 1);
}

#[test]
fn far_off_field_lists_valid_fields() {
    let e = errors("zzzzzzzzzz: 1\n");
    assert!(e[0].message.contains("valid fields"), "{}", e[0]);
    assert!(e[0].message.contains("applications"), "{}", e[0]);
}

#[test]
fn wrong_type_names_field_and_line() {
    let e = errors("http_options:\n  port: eighty\n");
    assert_eq!(e[0].line, 2, "{}", e[0]);
    assert_eq!(e[0].field, "port", "{}", e[0]);
}

#[test]
fn missing_required_field_is_an_error() {
    let e = errors("applications:\n  - name: a\n    deployments:\n      - name: iris\n");
    assert!(e[0].message.contains("model"), "{}", e[0]);
}

#[test]
fn missing_model_file_and_duplicates_are_all_reported() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - name: iris\n",
        "        model: nope.onnx\n",
        "      - name: iris\n",
        "        model: m.onnx\n",
        "        num_replicas: 0\n",
    ));
    assert_eq!(e.len(), 3, "{e:?}");
    assert_eq!(e[0].field, "applications[0].deployments[0].model");
    assert_eq!((e[0].line, e[0].column), (5, 16));
    assert!(e[0].message.contains("nope.onnx"));
    assert!(e[0].message.contains("not found"));
    assert_eq!(e[1].field, "applications[0].deployments[1].name");
    assert_eq!(e[1].line, 6);
    assert!(e[1].message.contains("duplicate deployment name `iris`"));
    assert!(e[1].message.contains("line 4"));
    assert_eq!(e[2].field, "applications[0].deployments[1].num_replicas");
    assert_eq!(e[2].line, 8);
}

#[test]
fn duplicate_names_across_applications() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments: [{name: m, model: m.onnx}]\n",
        "  - name: b\n",
        "    deployments: [{name: m, model: m.onnx}]\n",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("duplicate deployment name"));
    assert_eq!(e[0].line, 5);
}

#[test]
fn invalid_names_are_rejected() {
    for name in ["a/b", "a?b", "a#b", "a%2Fb", "a b", "", "..", "a{v1}"] {
        let e = errors(&format!(
            "applications:\n  - name: a\n    deployments: [{{name: \"{name}\", model: m.onnx}}]\n"
        ));
        assert!(e[0].message.contains("not a valid name"), "{name}: {}", e[0]);
    }
}

#[test]
fn malformed_yaml_is_an_error_with_location() {
    let e = errors("http_options: {port: 1}\napplications: [\n  {name: a,\n");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!((2..=4).contains(&e[0].line), "the error is in the unclosed list, not the first line: {}", e[0]);
}

#[test]
fn unreadable_file_is_an_error() {
    let e = load(Path::new("/nonexistent/app.yaml")).unwrap_err();
    assert!(e.to_string().contains("cannot read config file"), "{e}");
}

#[test]
fn nearest_only_suggests_close_names() {
    let c = vec!["model".to_string(), "name".to_string()];
    assert_eq!(error::nearest("modle", &c).as_deref(), Some("model"));
    assert_eq!(error::nearest("xyzzyq", &c), None);
}

#[test]
fn batching_and_grpc_fields_parse_with_defaults() {
    let c = parse_in(concat!(
        "grpc_options: {port: 9001}\n",
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - name: m\n",
        "        model: m.onnx\n",
        "        max_batch_size: 16\n",
        "        batch_wait_timeout_s: 0.005\n",
        "        preferred_batch_sizes: [4, 8]\n",
        "        pad: {input_ids: 0}\n",
        "        cpu_memory_arena: true\n",
        "        memory_pattern: true\n",
        "        spin_before_sleep_us: 0\n",
        "        share_weights: false\n",
    ))
    .unwrap();
    assert_eq!(c.grpc_options.port, 9001);
    assert!(c.grpc_options.enabled);
    let d = &c.applications[0].deployments[0];
    let s = &d.settings;
    assert_eq!(s.max_batch_size, 16);
    assert_eq!(s.batch_wait_timeout_s, 0.005);
    assert_eq!(s.preferred_batch_sizes, vec![4, 8]);
    assert_eq!(s.pad.get("input_ids"), Some(&0.0));
    assert_eq!(s.max_ongoing_requests, 0);
    assert_eq!(s.request_timeout_s, 30.0);
    assert!(s.warmup);
    assert!(s.cpu_memory_arena);
    assert!(s.memory_pattern);
    assert_eq!(s.spin_before_sleep_us, 0);
    assert!(!s.share_weights);
}

#[test]
fn absurd_limits_are_errors_not_allocations() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - {name: m, model: m.onnx, max_batch_size: 4000000000, max_queued_requests: 2000000,\n",
        "         spin_before_sleep_us: 10001}\n",
    ));
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"applications[0].deployments[0].max_batch_size"), "{e:?}");
    assert!(fields.contains(&"applications[0].deployments[0].max_queued_requests"), "{e:?}");
    assert!(fields.contains(&"applications[0].deployments[0].spin_before_sleep_us"), "{e:?}");
    assert!(e.iter().any(|e| e.message == "must be at most 65536"), "{e:?}");
    assert!(e.iter().any(|e| e.message == "must be at most 10000"), "{e:?}");
}

#[test]
fn batching_values_are_checked() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - name: m\n",
        "        model: m.onnx\n",
        "        preferred_batch_sizes: [4]\n",
        "        pad: {x: 0}\n",
        "        request_timeout_s: 0\n",
        "        batch_wait_timeout_s: -1\n",
    ));
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "applications[0].deployments[0].preferred_batch_sizes",
            "applications[0].deployments[0].pad",
            "applications[0].deployments[0].request_timeout_s",
            "applications[0].deployments[0].batch_wait_timeout_s",
        ],
        "in file order: {e:?}"
    );
    assert!(e[0].message.contains("max_batch_size (0)"), "{}", e[0]);
    assert_eq!(e[3].line, 9);
}

/// `-.inf` pads an additive attention mask: it is kept, and travels to proxies and Ray replicas
/// (as JSON, where serde_json wrote it `null`, which no replica could read). NaN is refused.
#[test]
fn an_infinite_pad_survives_json_and_nan_is_refused() {
    let text = |v: &str| {
        format!(
            "applications:\n  - name: a\n    deployments:\n      - name: m\n        model: m.onnx\n        \
             max_batch_size: 4\n        pad: {{mask: {v}, x: 1.5}}\n"
        )
    };
    let c = parse_in(&text("-.inf")).unwrap();
    let s = &c.applications[0].deployments[0].settings;
    assert_eq!(s.pad.get("mask"), Some(&f64::NEG_INFINITY));
    let json = serde_json::to_string(s).unwrap();
    let back: crate::ReplicaSettings = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s, "{json}");
    let e = errors(&text(".nan"));
    assert_eq!(e[0].field, "applications[0].deployments[0].pad");
    assert!(e[0].message.contains("`mask`: NaN"), "{}", e[0]);
}

#[test]
fn num_replicas_auto_takes_ray_defaults_and_overrides() {
    let c = parse_in(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - {name: m, model: m.onnx, num_replicas: auto, autoscaling_config: {max_replicas: 4, upscale_delay_s: 0}}\n",
        "      - {name: n, model: m.onnx, autoscaling_config: {min_replicas: 0, max_replicas: 3}}\n",
    ))
    .unwrap();
    let a = c.applications[0].deployments[0].autoscaling().unwrap();
    assert_eq!((a.min_replicas, a.max_replicas, a.initial_replicas), (1, 4, 1));
    assert_eq!(a.target_ongoing_requests, 2.0);
    assert_eq!((a.upscale_delay_s, a.downscale_delay_s), (0.0, 600.0));
    let b = c.applications[0].deployments[1].autoscaling().unwrap();
    assert_eq!((b.min_replicas, b.max_replicas, b.initial_replicas), (0, 3, 0));
    assert_eq!(c.applications[0].deployments[1].initial_replicas(), 0);
}

#[test]
fn a_replica_count_that_is_not_a_number_or_auto_is_a_parse_error() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - {name: o, model: m.onnx, num_replicas: many}\n",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("expected a replica count or `auto`"), "{e:?}");
    assert_eq!(e[0].line, 4, "{e:?}");
}

/// Replica counts above `max_replicas_per_deployment` (default 1024) are refused, naming the
/// field; Ray's default autoscaling ceiling of 100 gives way to a lower one.
#[test]
fn replica_counts_have_a_ceiling() {
    let e = errors(concat!(
        "model_repository: {path: ., num_replicas: 1025}\n",
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - {name: m, model: m.onnx, num_replicas: 1000000}\n",
        "      - {name: n, model: m.onnx, num_replicas: 1024}\n",
        "      - {name: o, model: m.onnx, autoscaling_config: {max_replicas: 2000}}\n",
    ));
    let fields: Vec<(&str, u64)> = e.iter().map(|e| (e.field.as_str(), e.line)).collect();
    assert_eq!(
        fields,
        [
            ("model_repository.num_replicas", 1),
            ("applications[0].deployments[0].num_replicas", 5),
            ("applications[0].deployments[2].autoscaling_config.max_replicas", 7),
        ],
        "{e:?}"
    );
    assert!(e[1].message.contains("1000000 is more than max_replicas_per_deployment (1024)"), "{e:?}");

    let lower = concat!(
        "max_replicas_per_deployment: 8\n",
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - {name: m, model: m.onnx, num_replicas: 8}\n",
        "      - {name: n, model: m.onnx, num_replicas: auto}\n",
    );
    let c = parse_in(lower).unwrap();
    assert_eq!(c.applications[0].deployments[0].scaling, Scaling::Fixed(8));
    assert_eq!(c.applications[0].deployments[1].autoscaling().unwrap().max_replicas, 8);
    let e = errors(&lower.replace("num_replicas: auto", "autoscaling_config: {min_replicas: 9}"));
    assert_eq!(e[0].field, "applications[0].deployments[1].autoscaling_config.min_replicas", "{e:?}");
    let e = errors("applications: []\nmax_replicas_per_deployment: 0\n");
    assert_eq!((e[0].field.as_str(), e[0].line), ("max_replicas_per_deployment", 2), "{e:?}");
    let e = errors("applications: []\n\ngraceful_shutdown_timeout_s: -1\n");
    assert_eq!((e[0].field.as_str(), e[0].line), ("graceful_shutdown_timeout_s", 3), "{e:?}");
    let e = errors("applications: []\nshutdown_delay_s: -0.5\n");
    assert_eq!((e[0].field.as_str(), e[0].line), ("shutdown_delay_s", 2), "{e:?}");
}

/// `worker_threads`: absent is the runtime's default (one per CPU); 1 to 1024 is kept;
/// 0, above 1024 and a non-integer are refused, naming the key.
#[test]
fn worker_threads_are_checked() {
    assert_eq!(parse_in("applications: []\n").unwrap().worker_threads, None);
    assert_eq!(parse_in("worker_threads: 1\n").unwrap().worker_threads, Some(1));
    assert_eq!(parse_in("worker_threads: 3\n").unwrap().worker_threads, Some(3));
    assert_eq!(parse_in("worker_threads: 1024\n").unwrap().worker_threads, Some(1024));
    for bad in ["0", "1025"] {
        // On its line (the second here), like a type error.
        let e = errors(&format!("applications: []\nworker_threads: {bad}\n"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].field.as_str(), e[0].line), ("worker_threads", 2), "{e:?}");
        assert!(e[0].message.contains("must be 1 to 1024"), "{e:?}");
    }
    let e = errors("worker_threads: two\n");
    assert_eq!((e[0].field.as_str(), e[0].line), ("worker_threads", 1), "{e:?}");
    let changed = parse_in("worker_threads: 2\n").unwrap();
    assert_eq!(
        changed.server_settings_changed(&parse_in("worker_threads: 3\n").unwrap()),
        ["worker_threads"]
    );
}

/// `release_startup_memory`: on unless the config says false; anything but a boolean is refused,
/// naming the key; a change is a server setting (read at start).
#[test]
fn release_startup_memory_is_a_boolean_defaulting_to_true() {
    assert!(parse_in("applications: []\n").unwrap().release_startup_memory);
    assert!(crate::Config::default().release_startup_memory);
    assert!(parse_in("release_startup_memory: true\n").unwrap().release_startup_memory);
    let off = parse_in("release_startup_memory: false\n").unwrap();
    assert!(!off.release_startup_memory);
    let e = errors("applications: []\nrelease_startup_memory: sometimes\n");
    assert_eq!((e[0].field.as_str(), e[0].line), ("release_startup_memory", 2), "{e:?}");
    assert_eq!(
        off.server_settings_changed(&parse_in("applications: []\n").unwrap()),
        ["release_startup_memory"]
    );
}

#[test]
fn autoscaling_value_errors_name_the_field() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - {name: m, model: m.onnx, num_replicas: 2, autoscaling_config: {max_replicas: 4}}\n",
        "      - {name: n, model: m.onnx, autoscaling_config: {min_replicas: 3, max_replicas: 2}}\n",
    ));
    let fields: Vec<(&str, u64)> = e.iter().map(|e| (e.field.as_str(), e.line)).collect();
    assert_eq!(
        fields,
        [
            ("applications[0].deployments[0].autoscaling_config", 4),
            ("applications[0].deployments[1].autoscaling_config.max_replicas", 5),
            ("applications[0].deployments[1].autoscaling_config.initial_replicas", 5),
        ],
        "{e:?}"
    );
    assert!(e[0].message.contains("cannot be set together with a fixed num_replicas"), "{e:?}");
}

/// A multiplexed deployment's requests name models of its folder, which a canary or shadow (one
/// model file) does not have: refused (the canary's share of them was answered 400, and its
/// gate saw none of them).
#[test]
fn a_multiplexed_deployment_takes_no_canary_or_shadow() {
    let e = errors(concat!(
        "applications:
",
        "  - name: a
",
        "    deployments:
",
        "      - name: tenants
",
        "        multiplex: {path: .}\n",
        "        canary: {model: m.onnx, version: \"2\", weight: 10}\n",
        "        shadow: {model: m.onnx, version: \"3\"}\n",
    ));
    for field in ["canary", "shadow"] {
        let at = format!("applications[0].deployments[0].{field}");
        let found = e.iter().find(|e| e.field == at).unwrap_or_else(|| panic!("{at}: {e:?}"));
        assert!(found.message.starts_with("a multiplexed deployment cannot have a"), "{found:?}");
        assert_eq!(found.line, if field == "canary" { 6 } else { 7 }, "{found:?}");
    }
}

#[test]
fn a_shadow_agreement_gate_is_a_fraction_and_takes_the_deployments_one_shadow() {
    let e = errors(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - name: m\n",
        "        model: m.onnx\n",
        "        canary: {model: m.onnx, version: \"2\", rollout: {min_shadow_agreement: 1.5}}\n",
        "        shadow: {model: m.onnx, version: \"3\"}\n",
    ));
    let found: Vec<(&str, &str)> = e.iter().map(|e| (e.field.as_str(), e.message.as_str())).collect();
    assert!(
        found.contains(&(
            "applications[0].deployments[0].canary.rollout.min_shadow_agreement",
            "is a fraction: 0 to 1"
        )),
        "{e:?}"
    );
    assert!(
        found.iter().any(|(f, m)| *f == "applications[0].deployments[0].shadow" && m.contains("one shadow")),
        "{e:?}"
    );
    let c = parse_in(concat!(
        "applications:\n",
        "  - name: a\n",
        "    deployments:\n",
        "      - name: m\n",
        "        model: m.onnx\n",
        "        canary: {model: m.onnx, version: \"2\", rollout: {min_shadow_agreement: 0.99}}\n",
    ))
    .unwrap();
    let rollout = c.applications[0].deployments[0].canary.as_ref().unwrap().rollout.clone().unwrap();
    assert_eq!(rollout.min_shadow_agreement, Some(0.99));
    assert_eq!(Rollout::default().min_shadow_agreement, None, "no gate unless asked");
}

#[test]
fn model_paths_are_absolute_when_the_config_path_is_relative() {
    // Tests run in the crate's folder, where Cargo.toml stands in for a model file.
    let text = "applications:\n  - name: a\n    deployments: [{name: m, model: Cargo.toml}]\n";
    let model = |source: &Path| match &parse(text, source).unwrap().applications[0].deployments[0].model {
        types::Model::Onnx(path) => path.clone(),
        other => panic!("{other:?}"),
    };
    let relative = model(Path::new("c.yaml"));
    assert!(relative.is_absolute(), "{relative:?}");
    assert_eq!(relative, model(&std::env::current_dir().unwrap().join("c.yaml")));
}

#[test]
fn a_wrong_type_in_a_flow_mapping_names_its_field() {
    let e = errors(
        "applications:\n  - name: a\n    deployments:\n      - {name: x, model: m.onnx, max_batch_size: -1}\n",
    );
    assert_eq!(e[0].field, "max_batch_size", "{}", e[0]);
    let e = errors(
        r#"{"applications": [{"name": "a", "deployments": [{"name": "x", "model": "m.onnx", "num_replicas": "many"}]}]}"#,
    );
    assert!(e[0].field.contains("num_replicas"), "{}", e[0]);
    let e = errors(
        "applications:\n  - name: a\n    deployments:\n      - name: x\n        model: m.onnx\n        max_batch_size: -1\n",
    );
    assert_eq!(e[0].field, "max_batch_size", "{}", e[0]);
}

#[test]
fn with_a_model_repository_no_application_may_take_its_name() {
    let e = errors(
        "model_repository: {path: .}\napplications:\n  - name: repository\n    deployments: [{name: m, model: m.onnx}]\n",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("`repository` is the model repository's"), "{}", e[0]);
    // Without one, the name is free.
    assert!(
        parse_in("applications:\n  - name: repository\n    deployments: [{name: m, model: m.onnx}]\n")
            .is_ok()
    );
}

#[test]
fn a_model_path_that_is_a_folder_is_named_so() {
    let e = errors("applications:\n  - name: a\n    deployments: [{name: m, model: .}]\n");
    assert!(e[0].message.contains("is a folder, not a file"), "{}", e[0]);
}

/// A route prefix no request could reach is refused: a pattern, a character clients send
/// escaped or that ends the path, one of the server's own paths.
#[test]
fn route_prefixes_hold_no_patterns_and_no_path_a_request_cannot_match() {
    for prefix in
        ["/{x}", "/a b", "/café", "/x%41", "/a?b", "/a#b", "/-/healthz", "/-/routes", "/openapi.json"]
            .into_iter()
            .chain(["/v2", "/v2/models/m", "/metrics", "/metrics/x", "/-", "/openapi.json/x", "/a/"])
    {
        let e = errors(&format!(
            "applications:\n  - name: a\n    route_prefix: \"{prefix}\"\n    deployments: [{{name: m, model: m.onnx}}]\n"
        ));
        assert!(
            e.iter().any(|e| e.message.contains("visible ASCII other than `? # % { }`")),
            "{prefix}: {e:?}"
        );
    }
    // Beside the server's paths but not under them: no request of the server's own can match.
    for prefix in ["/", "/v2x", "/v20/embed", "/metricsx", "/-x", "/openapi.jsonx"] {
        let e = errors(&format!(
            "applications:\n  - name: a\n    route_prefix: \"{prefix}\"\n    deployments: [{{name: m, model: m.onnx}}]\n"
        ));
        assert!(!e.iter().any(|e| e.message.contains("visible ASCII")), "{prefix}: {e:?}");
    }
}

/// A pipeline application, `name` its name and pipeline's, serving `route` at `prefix`.
fn pipeline_app(name: &str, deployment: &str, prefix: &str, route: &str) -> String {
    format!(
        "  - name: {name}
    route_prefix: {prefix}
    deployments: [{{name: {deployment}, model: m.onnx}}]
    pipeline:
      name: {name}
      inputs: [{{name: x, datatype: FP32, shape: [-1, 4]}}, {{name: z, datatype: FP32, shape: [-1, 4]}}]
      steps: [{{name: s, deployment: {deployment}, inputs: {{a: x, b: z}}, outputs: {{y: y}}}}]
      outputs: [y]
      route: {route}
"
    )
}

/// What every request to a JSON route would fail on is refused at load: an input from no field
/// or from two, an output in two fields; and what would silently replace another's route: a
/// route_prefix or a pipeline name used twice across applications.
#[test]
fn json_routes_and_pipeline_names_that_cannot_work_are_refused() {
    let ok = "{request: {features: x, more: z}, response: {out: y}}";
    parse_in(&format!("applications:\n{}", pipeline_app("p", "m", "/p", ok))).unwrap();
    let messages = |text: String| errors(&text).into_iter().map(|e| e.message).collect::<Vec<_>>();
    let e = messages(format!(
        "applications:\n{}",
        pipeline_app("p", "m", "/p", "{request: {features: x}, response: {out: y, copy: y}}")
    ));
    assert!(e.iter().any(|m| m.contains("the pipeline input `z` comes from no field")), "{e:?}");
    assert!(e.iter().any(|m| m.contains("the pipeline output `y` goes to more than one field")), "{e:?}");
    let e = messages(format!(
        "applications:\n{}",
        pipeline_app("p", "m", "/p", "{request: {a: x, b: x, c: z}, response: {out: y}}")
    ));
    assert!(e.iter().any(|m| m.contains("the pipeline input `x` comes from more than one field")), "{e:?}");
    let e = messages(format!(
        "applications:\n{}{}",
        pipeline_app("p", "m", "/same", ok),
        pipeline_app("q", "n", "/same", ok)
    ));
    assert!(e.iter().any(|m| m.contains("`/same` is already another application's route_prefix")), "{e:?}");
    let e = messages(format!(
        "applications:\n{}{}",
        pipeline_app("p", "m", "/p", ok),
        pipeline_app("p2", "p", "/q", ok)
    ));
    assert!(
        e.iter().any(|m| m.contains("duplicate deployment name `p`")),
        "a deployment named like a pipeline: {e:?}"
    );
    let e = messages(format!(
        "applications:\n{}  - name: other\n    deployments: [{{name: n2, model: m.onnx}}]\n    pipeline:\n      name: p\n      inputs: [{{name: x, datatype: FP32, shape: [-1, 4]}}]\n      steps: [{{name: s, deployment: n2, inputs: {{a: x}}, outputs: {{y: y}}}}]\n      outputs: [y]\n",
        pipeline_app("p", "m", "/p", ok)
    ));
    assert!(e.iter().any(|m| m.contains("`p` is already the name of a deployment or pipeline")), "{e:?}");
}

/// A pipeline input or output listed twice is refused at load: every request that names no
/// outputs failed on the second copy of one (500), and two specs of one input typed the
/// request and the steps differently.
#[test]
fn a_pipeline_tensor_listed_twice_is_refused() {
    let app = |inputs: &str, outputs: &str| {
        format!(
            "applications:\n  - name: p\n    deployments: [{{name: m, model: m.onnx}}]\n    pipeline:\n      name: p\n      inputs: {inputs}\n      steps: [{{name: s, deployment: m, inputs: {{a: x}}, outputs: {{y: y}}}}]\n      outputs: {outputs}\n"
        )
    };
    let x = "{name: x, datatype: FP32, shape: [-1, 4]}";
    parse_in(&app(&format!("[{x}]"), "[y]")).unwrap();
    let e = errors(&app(&format!("[{x}]"), "[y, y]"));
    assert!(e.iter().any(|e| e.message.contains("output `y` is listed more than once")), "{e:?}");
    let e = errors(&app(&format!("[{x}, {{name: x, datatype: INT64, shape: [-1, 4]}}]"), "[y]"));
    assert!(e.iter().any(|e| e.message.contains("input `x` is listed more than once")), "{e:?}");
}

/// A duration too long to add to a clock reading is refused at load (it panicked the control
/// loop, which then stopped autoscaling, rollouts and repository polls, or the start).
#[test]
fn durations_past_a_billion_seconds_are_refused() {
    let e = errors(
        "graceful_shutdown_timeout_s: 1e20\napplications:\n  - name: a\n    deployments:\n      - {name: m, model: m.onnx, autoscaling_config: {min_replicas: 1, max_replicas: 2, downscale_delay_s: 1e20, metrics_interval_s: 1e19}}\n",
    );
    let messages: Vec<String> = e.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    for field in ["graceful_shutdown_timeout_s", "downscale_delay_s", "metrics_interval_s"] {
        assert!(messages.iter().any(|m| m.contains(field) && m.contains("1e9")), "{field}: {messages:?}");
    }
    parse_in("graceful_shutdown_timeout_s: 1e9\napplications:\n  - name: a\n    deployments: [{name: m, model: m.onnx}]\n")
        .unwrap();
}

/// Ray's own resources under `resources`, and a fractional GPU count above 1, are refused at
/// load: the job's driver (or Ray) would refuse every replica's start.
#[test]
fn ray_resources_the_driver_refuses_are_refused_at_load() {
    let text = |options: &str| {
        format!(
            "applications:\n  - name: a\n    deployments:\n      - {{name: m, model: m.onnx, ray_actor_options: {options}}}\n"
        )
    };
    let e = errors(&text("{resources: {GPU: 1}}"));
    assert!(
        e.iter()
            .any(|e| e.field.ends_with("ray_actor_options.resources.GPU") && e.message.contains("num_gpus")),
        "{e:?}"
    );
    let e = errors(&text("{num_gpus: 1.5}"));
    assert!(
        e.iter()
            .any(|e| e.field.ends_with("ray_actor_options.num_gpus") && e.message.contains("whole number")),
        "{e:?}"
    );
    parse_in(&text("{num_gpus: 0.5, resources: {TPU: 1}}")).unwrap();
    parse_in(&text("{num_gpus: 2}")).unwrap();
}

/// A ready marker no listing can see (a dot-name: listings leave those out) and a version
/// policy that selects nothing are refused: either would serve no repository model, silently.
#[test]
fn a_repository_that_could_serve_nothing_is_refused() {
    for (repository, field, message) in [
        ("{path: ., ready_marker: .complete}", "model_repository.ready_marker", "not beginning with a dot"),
        ("{path: ., version_policy: {latest: 0}}", "model_repository.version_policy", "at least 1"),
        (
            "{path: ., version_policy: {specific: []}}",
            "model_repository.version_policy",
            "at least one version",
        ),
    ] {
        let e = errors(&format!("model_repository: {repository}\n"));
        assert_eq!(e.len(), 1, "{repository}: {e:?}");
        assert_eq!(e[0].field, field, "{e:?}");
        assert!(e[0].message.contains(message), "{e:?}");
    }
    assert!(
        parse_in("model_repository: {path: ., ready_marker: DONE, version_policy: {latest: 2}}\n").is_ok()
    );
    assert!(parse_in("model_repository: {path: ., ready_marker: \"\"}\n").is_ok(), "no marker at all");
}

/// Values that were accepted and broke later are refused at load, naming the field: a
/// connection limit past the runtime's (every listener died after "listening"), an infinite
/// autoscaling target (the status it showed could not be read back), a hundred thousand
/// ONNX Runtime threads per replica, a sample ratio outside 0–1, a pipeline name no URL can
/// carry, a repository with zero replicas (silently one) or batches past the limit.
#[test]
fn values_that_broke_later_are_refused_at_load() {
    let app = |deployment: &str| {
        format!(
            "applications:\n  - name: a\n    deployments:\n      - {{name: m, model: m.onnx{deployment}}}\n"
        )
    };
    for (text, field) in [
        (format!("http_options: {{max_connections: 3000000000000000000}}\n{}", app("")), "http_options.max_connections"),
        (app(", autoscaling_config: {target_ongoing_requests: .inf}"), "target_ongoing_requests"),
        (app(", intra_op_threads: 100000"), "applications[0].deployments[0].intra_op_threads"),
        (format!("tracing_options: {{sample_ratio: 5}}\n{}", app("")), "tracing_options.sample_ratio"),
        (format!("tracing_options: {{sample_ratio: .nan}}\n{}", app("")), "tracing_options.sample_ratio"),
        (format!("tracing_options: {{otlp_endpoint: 'otel:4317'}}\n{}", app("")), "tracing_options.otlp_endpoint"),
        (format!("tracing_options: {{otlp_endpoint: 'https://otel:4317'}}\n{}", app("")), "tracing_options.otlp_endpoint"),
        (format!("tracing_options: {{otlp_endpoint: ''}}\n{}", app("")), "tracing_options.otlp_endpoint"),
        (format!("tracing_options: {{otlp_endpoint: 'http://'}}\n{}", app("")), "tracing_options.otlp_endpoint"),
        ("model_repository: {path: ., num_replicas: 0}\n".to_string(), "model_repository.num_replicas"),
        ("model_repository: {path: ., max_batch_size: 100000}\n".to_string(), "model_repository.max_batch_size"),
        (
            "applications:\n  - name: p\n    deployments: [{name: m, model: m.onnx}]\n    pipeline:\n      name: \"a{b}\"\n      inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\n      steps: [{name: s, deployment: m, inputs: {a: x}, outputs: {y: y}}]\n      outputs: [y]\n".to_string(),
            "applications[0].pipeline.name",
        ),
    ] {
        let e = errors(&text);
        assert!(e.iter().any(|e| e.field.ends_with(field)), "{field}: {e:?}");
    }
    parse_in(&format!(
        "http_options: {{max_connections: 100000}}\ntracing_options: {{sample_ratio: 0.5, otlp_endpoint: 'http://otel:4317'}}\n{}",
        app(", intra_op_threads: 8")
    ))
    .unwrap();
}

/// Checks on settings that carry no location of their own (listeners, the repository, tracing,
/// the cluster) point at the line and column of the key they name, in block and flow style.
#[test]
fn errors_in_server_settings_name_their_line() {
    let text = "# a comment\nhttp_options:\n  host: 127.0.0.1\n  max_body_bytes: 0\ntracing_options: {sample_ratio: 5}\nmodel_repository:\n  path: .\n  rollout:\n    interval_s: 1\n    canary_weight: 0\n";
    let e = errors(text);
    let at = |field: &str| {
        let e = e.iter().find(|e| e.field == field).unwrap_or_else(|| panic!("{field}: {e:?}"));
        (e.line, e.column)
    };
    assert_eq!(at("http_options.max_body_bytes"), (4, 3));
    assert_eq!(at("tracing_options.sample_ratio"), (5, 19));
    assert_eq!(at("model_repository.rollout.canary_weight"), (10, 5));
    // A key left at its default: its parent's line.
    let e = errors("model_repository:\n  path: .\n  version_policy: {latest: 0}\n");
    assert_eq!((e[0].field.as_str(), e[0].line, e[0].column), ("model_repository.version_policy", 3, 3));
    // The same key name deeper in another mapping is not taken for a top-level one.
    assert_eq!(
        crate::error::locate("a:\n  http_options: 1\nhttp_options: {b: 2}\n", "http_options.b"),
        Some((3, 16))
    );
    assert_eq!(crate::error::locate("{\"http_options\": {\"b\": 0}}", "http_options.b"), None);
}

/// The bytes of request bodies held at once: read, and never below one body's limit (a body
/// that large could never be read).
#[test]
fn body_bytes_in_flight_are_at_least_one_body() {
    let c = parse_in("http_options: {max_body_bytes: 10, max_body_bytes_in_flight: 10}\n").unwrap();
    assert_eq!((c.http_options.max_body_bytes, c.http_options.max_body_bytes_in_flight), (10, 10));
    assert_eq!(parse_in("{}\n").unwrap().http_options.max_body_bytes_in_flight, 1 << 30);
    let e = errors("http_options:\n  max_body_bytes: 2147483648\n");
    let e = e.iter().find(|e| e.field == "http_options.max_body_bytes_in_flight").expect("refused");
    assert!(e.message.contains("at least http_options.max_body_bytes (2147483648)"), "{e:?}");
}

/// `cluster.ray`'s two timeouts: read, and refused at 0 naming the field.
#[test]
fn ray_start_timeouts_are_read_and_bounded() {
    let app = "applications:\n  - name: a\n    deployments:\n      - {name: m, model: m.onnx}\n";
    let c = parse_in(&format!("cluster: {{ray: {{replica_start_timeout_s: 1800}}}}\n{app}")).unwrap();
    let ray = c.cluster.ray.unwrap();
    assert_eq!((ray.start_timeout_s, ray.replica_start_timeout_s), (600.0, 1800.0));
    for field in ["start_timeout_s", "replica_start_timeout_s"] {
        let e = errors(&format!("cluster: {{ray: {{{field}: 0}}}}\n{app}"));
        assert!(e.iter().any(|e| e.field == format!("cluster.ray.{field}")), "{e:?}");
    }
}

/// `max_replicas_per_node` is Ray Serve's 1 to 100: each replica asks Ray for 1/N of a
/// per-node resource held to four decimals, exact only that far.
#[test]
fn max_replicas_per_node_is_one_to_a_hundred() {
    let config = |n: u32| {
        format!(
            "applications:\n  - name: a\n    deployments:\n      - {{name: m, model: m.onnx, max_replicas_per_node: {n}}}\n"
        )
    };
    for n in [0, 101] {
        let e = errors(&config(n));
        assert_eq!(e[0].field, "applications[0].deployments[0].max_replicas_per_node", "{e:?}");
        assert_eq!(e[0].message, "must be 1 to 100", "{e:?}");
    }
    for n in [1, 100] {
        assert!(parse_in(&config(n)).is_ok(), "{n}");
    }
}
