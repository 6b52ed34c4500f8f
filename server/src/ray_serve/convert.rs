//! Ray's deploy schema onto Sluice's config. Each Ray application becomes the Sluice
//! application of the same name:
//! - `import_path` says what it serves ([`ImportPath`]): one deployment, the model, named
//!   `args.name` or else the application's name; or, for `sluice.pipeline:NAME`, the
//!   `deployments` and `pipeline` that `args` declares in Sluice's own shape.
//! - A deployment's fields come from `args` (single-model kinds), then from its `deployments[]`
//!   entry's `user_config`, then from that entry's Ray fields that Sluice's deployments share
//!   (`num_replicas`, `autoscaling_config`, `ray_actor_options`, ...); the later wins.
//!
//! The result is written as a Sluice config (JSON, one value per line) and read by Sluice's own
//! parser, so every check and default is Sluice's. Each line remembers the Ray field it came
//! from, so that an error names the field the user wrote (`applications.0.args.max_batch_size`).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};
use sluice_config::Config;

use super::schema::{self, ImportPath, RayApp};
use super::written::{Doc, Entry, Node, get, set};
use super::{ValidationError, ValidationErrors};

/// Relative paths are resolved against the folder of this (never written) file.
const SOURCE: &str = "ray-serve-deploy.json";

/// A Ray config made into Sluice's.
#[derive(Debug)]
pub struct Converted {
    pub config: Config,
    /// Each application's entry as submitted, for `deployed_app_config`.
    pub submitted: BTreeMap<String, Value>,
}

/// Maps a Ray `ServeDeploySchema` body onto a Sluice config. Relative paths start at `base`;
/// everything but the applications (the model repository, listeners, cluster, tracing) is kept
/// from `current`.
pub fn convert(body: &Value, base: &Path, current: Option<&Config>) -> Result<Converted, ValidationErrors> {
    let deploy = schema::parse(body)?;
    // Repository folders follow the server's completeness rule.
    let marker = current
        .and_then(|c| c.model_repository.as_ref())
        .map_or(sluice_config::DEFAULT_READY_MARKER, |r| r.ready_marker.as_str());
    let mut errors = Vec::new();
    // The server's repository stays (below), and its models are the application `repository`:
    // another of that name would pass for it (a delete of it turned polling off).
    if current.is_some_and(|c| c.model_repository.is_some()) {
        for (i, app) in deploy.applications.iter().enumerate() {
            if app.name == sluice_config::REPOSITORY_APPLICATION {
                let message =
                    format!("the application name `{}` is the model repository's; choose another", app.name);
                errors.push(err(format!("applications.{i}.name"), message));
            }
        }
    }
    let mut notes = Vec::new();
    let apps = deploy
        .applications
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let (node, extra) = application(i, app, (base, marker), &mut errors);
            notes.push(extra);
            (node, format!("applications.{i}"))
        })
        .collect();
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    let mut doc = Doc::default();
    let mut top = vec![Entry::new("applications", Node::List(apps), "applications")];
    // Ray's document has no ceiling of its own: its counts are checked against the server's.
    if let Some(c) = current {
        let most = json!(c.max_replicas_per_deployment);
        top.push(Entry::value("max_replicas_per_deployment", most, "applications"));
    }
    let top = Node::Object(top);
    doc.node("", &top, "applications", false);
    let mut config = sluice_config::parse(&doc.text(), &base.join(SOURCE)).map_err(|e| doc.errors(e))?;
    for ((app, ray), extra) in config.applications.iter_mut().zip(&deploy.applications).zip(notes) {
        app.ignored = deploy.ignored.iter().chain(&ray.ignored).chain(&extra).cloned().collect();
    }
    // Everything but the applications stays as the server has it.
    if let Some(c) = current {
        config =
            sluice_config::Config { applications: config.applications, source: config.source, ..c.clone() };
    }
    let submitted = deploy.applications.into_iter().map(|a| (a.name, a.submitted)).collect();
    Ok(Converted { config, submitted })
}

fn err(loc: impl Into<String>, msg: impl Into<String>) -> ValidationError {
    ValidationError { loc: loc.into(), msg: msg.into() }
}

/// One application, and what of it is ignored beyond what [`schema`] found.
/// `files`: where relative paths start, and the ready marker of repository folders.
fn application(
    i: usize,
    app: &RayApp,
    files: (&Path, &str),
    errors: &mut Vec<ValidationError>,
) -> (Node, Vec<String>) {
    let at = format!("applications.{i}");
    let mut entries = vec![Entry::value("name", json!(app.name), format!("{at}.name"))];
    let mut ignored = Vec::new();
    let mut deployments = match &app.import_path {
        ImportPath::Pipeline(name) => {
            if let Some(prefix) = &app.route_prefix {
                entries.push(Entry::value("route_prefix", json!(prefix), format!("{at}.route_prefix")));
            }
            let (deployments, pipeline) = pipeline(&at, name, &app.args, errors);
            entries.extend(pipeline);
            deployments
        }
        _ => {
            let model = single(&at, app, errors);
            if let (Some(_), Some((name, _))) = (&app.route_prefix, get(&model, "name")) {
                let name = name.as_str().unwrap_or_default();
                ignored.push(format!("route_prefix: a single model answers on /v2/models/{name}"));
            }
            vec![model]
        }
    };
    overrides(&at, app, &mut deployments, errors);
    if let [model] = deployments.as_mut_slice() {
        what_it_serves(&at, &app.import_path, app, model, files, errors);
    }
    let list = deployments
        .into_iter()
        .enumerate()
        .map(|(j, d)| {
            let origin =
                get(&d, "name").map_or_else(|| format!("{at}.deployments.{j}"), |(_, o)| o.to_string());
            (Node::Object(d), origin)
        })
        .collect();
    entries.push(Entry::new("deployments", Node::List(list), format!("{at}.import_path")));
    (Node::Object(entries), ignored)
}

/// The one deployment of a single-model application, from `args`.
fn single(at: &str, app: &RayApp, errors: &mut Vec<ValidationError>) -> Vec<Entry> {
    let name = match app.args.get("name") {
        Some(v) => Entry::value("name", v.clone(), format!("{at}.args.name")),
        None => Entry::value("name", json!(app.name), format!("{at}.name")),
    };
    let mut d = vec![name];
    let builtin = matches!(app.import_path, ImportPath::Builtin(_));
    for (k, v) in &app.args {
        let loc = format!("{at}.args.{k}");
        match k.as_str() {
            "name" => {}
            "options" if builtin => {}
            "options" => {
                errors.push(err(loc, "`options` are a built-in step's (import_path: sluice.builtin:STEP)"))
            }
            "model" | "builtin" => errors.push(err(loc, "set by import_path")),
            _ => set(&mut d, k, v.clone(), loc),
        }
    }
    d
}

/// A pipeline's deployments (`args.deployments`) and its `pipeline` entry (`args.pipeline`,
/// named by the import path), in Sluice's shape.
fn pipeline(
    at: &str,
    name: &str,
    args: &Map<String, Value>,
    errors: &mut Vec<ValidationError>,
) -> (Vec<Vec<Entry>>, Option<Entry>) {
    for k in args.keys().filter(|k| !["deployments", "pipeline"].contains(&k.as_str())) {
        errors.push(err(format!("{at}.args.{k}"), "a pipeline's args are `deployments` and `pipeline`"));
    }
    let mut deployments = Vec::new();
    match args.get("deployments") {
        Some(Value::Array(list)) => {
            for (j, d) in list.iter().enumerate() {
                let loc = format!("{at}.args.deployments.{j}");
                match d.as_object() {
                    Some(o) => deployments.push(
                        o.iter().map(|(k, v)| Entry::value(k, v.clone(), format!("{loc}.{k}"))).collect(),
                    ),
                    None => errors.push(err(loc, "Input should be a valid dictionary")),
                }
            }
        }
        Some(_) => errors.push(err(format!("{at}.args.deployments"), "Input should be a valid list")),
        None => errors.push(err(format!("{at}.args.deployments"), "Field required")),
    }
    let loc = format!("{at}.args.pipeline");
    let pipeline = match args.get("pipeline") {
        Some(Value::Object(p)) => {
            if p.contains_key("name") {
                errors.push(err(format!("{loc}.name"), "set by import_path"));
            }
            let mut entries = vec![Entry::value("name", json!(name), format!("{at}.import_path"))];
            entries.extend(p.iter().map(|(k, v)| Entry::value(k, v.clone(), format!("{loc}.{k}"))));
            Some(Entry::new("pipeline", Node::Object(entries), loc))
        }
        Some(_) => {
            errors.push(err(loc, "Input should be a valid dictionary"));
            None
        }
        None => {
            errors.push(err(loc, "Field required"));
            None
        }
    };
    (deployments, pipeline)
}

/// Applies each `deployments[]` entry to the deployment it names.
fn overrides(at: &str, app: &RayApp, deployments: &mut [Vec<Entry>], errors: &mut Vec<ValidationError>) {
    let single = !matches!(app.import_path, ImportPath::Pipeline(_));
    for (j, o) in app.deployments.iter().enumerate() {
        let loc = format!("{at}.deployments.{j}");
        let named = |d: &Vec<Entry>| get(d, "name").is_some_and(|(v, _)| v.as_str() == Some(&o.name));
        let Some(d) = deployments.iter_mut().find(|d| named(d)) else {
            let names: Vec<String> = deployments
                .iter()
                .filter_map(|d| get(d, "name"))
                .map(|(v, _)| format!("`{}`", v.as_str().unwrap_or_default()))
                .collect();
            let msg = format!(
                "application `{}` has no deployment `{}`; it has {}",
                app.name,
                o.name,
                names.join(", ")
            );
            errors.push(err(format!("{loc}.name"), msg));
            continue;
        };
        for (k, v) in &o.user_config {
            let field = format!("{loc}.user_config.{k}");
            match k.as_str() {
                "name" => errors.push(err(field, "a deployment's name is not set in user_config")),
                "model" | "builtin" if single => errors.push(err(field, "set by import_path")),
                _ => set(d, k, v.clone(), field),
            }
        }
        for (k, v, field) in &o.fields {
            set(d, k, v.clone(), field.clone());
        }
    }
}

/// The model of a single-model application, from its import path.
fn what_it_serves(
    at: &str,
    import_path: &ImportPath,
    app: &RayApp,
    d: &mut Vec<Entry>,
    (base, marker): (&Path, &str),
    errors: &mut Vec<ValidationError>,
) {
    let origin = format!("{at}.import_path");
    let builtin = |step: Node| Entry::new("builtin", step, origin.clone());
    match import_path {
        ImportPath::Onnx(path) => set(d, "model", json!(path), origin),
        ImportPath::Repository(path) => repository(at, &base.join(path), marker, d, errors),
        ImportPath::Builtin(step) => {
            let (options, loc) = match app.args.get("options") {
                Some(o) => (o.clone(), format!("{at}.args.options")),
                None => (json!({}), origin.clone()),
            };
            d.push(builtin(Node::Object(vec![Entry::value(step, options, loc)])));
        }
        ImportPath::Custom(name) => {
            d.push(builtin(Node::Value(json!({"custom": {"name": name}}))));
        }
        ImportPath::Pipeline(_) => {}
    }
}

/// A model folder in Triton's layout: the version the deployment names (`version`), else the
/// newest complete one (holding `model.onnx` and the ready `marker`, as in `model_repository`).
fn repository(at: &str, dir: &Path, marker: &str, d: &mut Vec<Entry>, errors: &mut Vec<ValidationError>) {
    let versions = complete_versions(dir, marker);
    let origin = format!("{at}.import_path");
    let chosen = match get(d, "version") {
        Some((v, loc)) => {
            let wanted = v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
            match wanted.filter(|w| versions.contains(w)) {
                Some(w) => Some(w),
                None => {
                    let have: Vec<String> = versions.iter().map(u64::to_string).collect();
                    let msg = format!("`{}` has no version {v} (it has: {})", dir.display(), have.join(", "));
                    errors.push(err(loc, msg));
                    None
                }
            }
        }
        None => match versions.last() {
            Some(&newest) => {
                set(d, "version", json!(newest.to_string()), origin.clone());
                Some(newest)
            }
            None => {
                let rule = if marker.is_empty() { String::new() } else { format!(" and `{marker}`") };
                let msg = format!("no complete version in `{}` (`<N>/model.onnx`{rule})", dir.display());
                errors.push(err(&origin, msg));
                None
            }
        },
    };
    if let Some(v) = chosen {
        let model = dir.join(v.to_string()).join("model.onnx");
        set(d, "model", json!(model.display().to_string()), origin);
    }
}

/// The numeric versions of a model folder that are complete, ascending: `<N>/model.onnx` and
/// `<N>/<marker>` (any folder with `model.onnx` when the marker is empty).
fn complete_versions(dir: &Path, marker: &str) -> Vec<u64> {
    let complete =
        |v: &Path| v.join("model.onnx").is_file() && (marker.is_empty() || v.join(marker).is_file());
    let mut versions: Vec<u64> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| complete(&e.path()))
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    versions
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use sluice_config::{Builtin, Model, Scaling};

    use super::*;

    fn models() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
    }

    fn errors(body: Value) -> Vec<(String, String)> {
        let e = convert(&body, &models(), None).unwrap_err();
        e.0.into_iter().map(|e| (e.loc, e.msg)).collect()
    }

    #[test]
    fn an_onnx_app_takes_args_then_user_config_then_ray_fields() {
        let app = json!({
            "name": "clf",
            "route_prefix": "/clf",
            "import_path": "sluice.onnx:iris/model.onnx",
            "runtime_env": {"working_dir": "s3://bucket/x.zip"},
            "args": {"max_batch_size": 8, "version": "1", "num_replicas": 3},
            "deployments": [{
                "name": "clf",
                "num_replicas": 2,
                "max_queued_requests": -1,
                "user_config": {"version": "7", "batch_wait_timeout_s": 0.002},
                "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1, "resources": {"tpu": 2}},
                "max_replicas_per_node": 1,
                "health_check_timeout_s": 5,
            }],
        });
        // What the server runs with besides its applications stays.
        let current = Config { graceful_shutdown_timeout_s: 7.0, ..Config::default() };
        let body = json!({"applications": [app.clone()], "proxy_location": "EveryNode"});
        let c = convert(&body, &models(), Some(&current)).unwrap();
        assert_eq!(c.config.graceful_shutdown_timeout_s, 7.0);
        assert_eq!(c.config.source, models().join(SOURCE));
        let a = &c.config.applications[0];
        assert_eq!(a.name, "clf");
        assert_eq!(a.route_prefix, None, "a single model has no JSON route");
        let d = &a.deployments[0];
        assert_eq!(d.name, "clf");
        assert_eq!(d.model, Model::Onnx(models().join("iris/model.onnx")));
        assert_eq!(d.version, "7", "user_config over args");
        assert_eq!(d.scaling, Scaling::Fixed(2), "the Ray field over args");
        assert_eq!((d.settings.max_batch_size, d.settings.batch_wait_timeout_s), (8, 0.002));
        assert_eq!(d.settings.max_queued_requests, 64, "-1 keeps Sluice's bound");
        assert_eq!(d.num_cpus(), 0.5);
        let p = &d.settings.placement;
        assert_eq!((p.num_gpus, p.resources["tpu"], p.max_replicas_per_node), (1.0, 2.0, Some(1)));
        assert_eq!(d.settings.health_check.timeout_s, 5.0);
        let ignored = a.ignored.join("\n");
        for field in [
            "proxy_location (top level): ",
            "runtime_env: ",
            "deployments[clf].max_queued_requests: -1",
            "route_prefix: a single model answers on /v2/models/clf",
        ] {
            assert!(ignored.contains(field), "{field} in {ignored}");
        }
        assert_eq!(c.submitted["clf"], app, "deployed_app_config is what was sent");
    }

    #[test]
    fn builtin_custom_and_pipeline_import_paths() {
        let body = json!({"applications": [
            {"name": "top", "import_path": "sluice.builtin:top_k", "args": {"options": {"k": 2}, "max_batch_size": 4}},
            {"name": "f", "import_path": "sluice.custom:to_fahrenheit"},
            {"name": "iris-app", "route_prefix": "/iris", "import_path": "sluice.pipeline:iris-classifier",
             "args": {
                "deployments": [
                    {"name": "iris-model", "model": "iris/model.onnx", "max_batch_size": 32},
                    {"name": "iris-label", "builtin": {"argmax": {"labels": "iris/labels.txt"}}, "max_batch_size": 32}
                ],
                "pipeline": {
                    "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
                    "steps": [
                        {"name": "classify", "deployment": "iris-model", "inputs": {"input": "features"}, "outputs": {"probabilities": "p"}},
                        {"name": "name-it", "deployment": "iris-label", "inputs": {"x": "p"}, "outputs": {"label": "label"}}
                    ],
                    "outputs": ["label"],
                    "route": {"request": {"features": "features"}, "response": {"label": "label"}}
                }},
             "deployments": [{"name": "iris-label", "num_replicas": 2}]}
        ]});
        let c = convert(&body, &models(), None).unwrap();
        let [top, f, pipe] = c.config.applications.as_slice() else { panic!() };
        assert_eq!(top.deployments[0].model, Model::Builtin(Builtin::TopK { k: 2, labels: None }));
        assert_eq!(top.deployments[0].settings.max_batch_size, 4);
        assert_eq!(f.deployments[0].model, Model::Builtin(Builtin::Custom { name: "to_fahrenheit".into() }));
        assert_eq!(pipe.route_prefix.as_deref(), Some("/iris"));
        assert_eq!(pipe.pipeline.as_ref().unwrap().name, "iris-classifier");
        assert_eq!(
            pipe.deployments[1].scaling,
            Scaling::Fixed(2),
            "deployments[] reaches a pipeline's steps"
        );
    }

    #[test]
    fn a_repository_model_serves_its_newest_complete_version_or_the_one_named() {
        let repo = std::env::temp_dir().join(format!("sluice-ray-repo-{}", std::process::id()));
        for v in [1, 3, 4] {
            std::fs::create_dir_all(repo.join(v.to_string())).unwrap();
            std::fs::copy(models().join("iris/model.onnx"), repo.join(format!("{v}/model.onnx"))).unwrap();
            // Version 4 is still being written: no ready marker yet.
            if v != 4 {
                std::fs::write(repo.join(format!("{v}/READY")), b"").unwrap();
            }
        }
        let app = |extra: Value| {
            let mut a = json!({"name": "r", "import_path": format!("sluice.repository:{}", repo.display())});
            a["deployments"] = json!([{"name": "r", "user_config": extra}]);
            json!({"applications": [a]})
        };
        let newest = convert(&app(json!({})), &models(), None).unwrap();
        let d = &newest.config.applications[0].deployments[0];
        assert_eq!((d.version.as_str(), &d.model), ("3", &Model::Onnx(repo.join("3/model.onnx"))));
        let named = convert(&app(json!({"version": 1})), &models(), None).unwrap();
        assert_eq!(named.config.applications[0].deployments[0].model, Model::Onnx(repo.join("1/model.onnx")));
        let e = errors(app(json!({"version": "7"})));
        assert_eq!(e[0].0, "applications.0.deployments.0.user_config.version");
        assert!(e[0].1.contains("has no version \"7\" (it has: 1, 3)"), "{e:?}");
        std::fs::remove_dir_all(&repo).unwrap();
    }

    #[test]
    fn sluice_errors_name_the_ray_field_that_caused_them() {
        let e = errors(json!({"applications": [
            {"name": "a", "import_path": "sluice.onnx:nope.onnx", "args": {"max_bach_size": 8}},
            {"name": "b", "import_path": "sluice.onnx:iris/model.onnx",
             "deployments": [{"name": "b", "user_config": {"max_batch_size": "lots"}}]},
        ]}));
        assert_eq!(e.len(), 1, "a YAML-level error stops the parse: {e:?}");
        assert_eq!(e[0].0, "applications.0.args.max_bach_size");
        assert!(e[0].1.contains("did you mean `max_batch_size`?"), "{e:?}");

        let e = errors(json!({"applications": [
            {"name": "b", "import_path": "sluice.onnx:iris/model.onnx",
             "deployments": [{"name": "b", "user_config": {"max_batch_size": "lots"}}]},
        ]}));
        assert_eq!(e[0].0, "applications.0.deployments.0.user_config.max_batch_size", "{e:?}");
        assert!(!e[0].1.contains("line"), "no line of a file the user never saw: {e:?}");

        // A problem with a key inside a mapping is named at that key.
        let e = errors(json!({"applications": [
            {"name": "b", "import_path": "sluice.onnx:iris/model.onnx",
             "deployments": [{"name": "b", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 9}}]},
        ]}));
        assert_eq!(e[0].0, "applications.0.deployments.0.autoscaling_config.initial_replicas", "{e:?}");

        let e = errors(json!({"applications": [
            {"name": "a", "import_path": "sluice.onnx:nope.onnx", "args": {"num_replicas": 0}},
            {"name": "b", "import_path": "sluice.onnx:iris/model.onnx", "args": {"name": "a"}},
        ]}));
        let find = |loc: &str| e.iter().find(|(l, _)| l == loc).map(|(_, m)| m.as_str()).unwrap_or_default();
        assert!(find("applications.0.import_path").contains("nope.onnx` not found"), "{e:?}");
        assert!(find("applications.0.args.num_replicas").contains("at least 1"), "{e:?}");
        assert!(find("applications.1.args.name").starts_with("duplicate deployment name `a`;"), "{e:?}");
        assert!(
            !find("applications.1.args.name").contains("line"),
            "no line of a file the user never saw: {e:?}"
        );
        let e = errors(json!({"applications": [
            {"name": "c", "import_path": "sluice.onnx:iris/model.onnx", "deployments": [{"name": "C"}]},
        ]}));
        assert_eq!(
            e,
            [(
                "applications.0.deployments.0.name".into(),
                "application `c` has no deployment `C`; it has `c`".into()
            )]
        );
    }

    /// On a server with a model repository, an application may not take the repository's
    /// name: it passed for the repository's models (a delete of it turned polling off).
    #[test]
    fn the_repository_applications_name_is_refused_when_the_server_has_one() {
        let body =
            json!({"applications": [{"name": "repository", "import_path": "sluice.onnx:iris/model.onnx"}]});
        let text = format!("model_repository: {{path: {}}}\n", models().display());
        let current = sluice_config::parse(&text, &models().join("c.yaml")).unwrap();
        let e = convert(&body, &models(), Some(&current)).unwrap_err();
        assert_eq!(e.0[0].loc, "applications.0.name", "{:?}", e.0);
        assert!(e.0[0].msg.contains("is the model repository's"), "{:?}", e.0);
        assert!(convert(&body, &models(), None).is_ok(), "no repository, no clash");
    }

    /// A Ray deploy's replica counts are checked against the server's
    /// `max_replicas_per_deployment` (its document has none, so the default of 1024 was used),
    /// and `auto`'s ceiling of 100 is lowered to it.
    #[test]
    fn replica_counts_are_held_to_the_servers_ceiling() {
        let current = sluice_config::parse(
            "max_replicas_per_deployment: 8
",
            &models().join("c.yaml"),
        )
        .unwrap();
        let app = |replicas: Value| {
            json!({"applications": [{"name": "a", "import_path": "sluice.onnx:iris/model.onnx",
                                     "deployments": [{"name": "a", "num_replicas": replicas}]}]})
        };
        let e = convert(&app(json!(500)), &models(), Some(&current)).unwrap_err();
        assert_eq!(e.0[0].loc, "applications.0.deployments.0.num_replicas", "{:?}", e.0);
        assert!(e.0[0].msg.contains("more than max_replicas_per_deployment (8)"), "{:?}", e.0);
        assert!(convert(&app(json!(500)), &models(), None).is_ok(), "no server: its default of 1024");
        let c = convert(&app(json!("auto")), &models(), Some(&current)).unwrap();
        let scaling = &c.config.applications[0].deployments[0].scaling;
        assert!(matches!(scaling, sluice_config::Scaling::Auto(a) if a.max_replicas == 8), "{scaling:?}");
        assert_eq!(c.config.max_replicas_per_deployment, 8);
    }
}
