//! Ray's dashboard API on a live server, replaying what KubeRay's RayService controller sends
//! (`PUT /api/serve/applications/` with its serveConfigV2 as JSON and `X-Ray-Authorization`,
//! `GET /api/serve/applications/?api_type=declarative`, the proxy's `GET /-/healthz`) and what
//! Ray's serve CLI reads (`/api/ray/version`, instance details, `DELETE`), checking the answers
//! field by field. The real `serve` CLI runs against Sluice in tests/python/test_ray_serve_cli.py.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const TOKEN: &str = "kuberay-token";
const IRIS_BODY: &str =
    r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#;

struct Dashboard {
    server: sluice_server::Server,
    client: reqwest::Client,
}

impl Dashboard {
    /// A server with no application, its relative paths starting at examples/models.
    async fn start() -> Self {
        sluice_server::runtime::init(None, None).unwrap();
        let text =
            "http_options: {port: 0}\ngrpc_options: {port: 0}\nadmin_options: {port: 0}\napplications: []\n";
        let config = sluice_config::parse(text, &models_dir().join("ray.yaml")).unwrap();
        let options = sluice_server::StartOptions { admin_token: Some(TOKEN.into()), ..Default::default() };
        Self { server: sluice_server::start(config, options).await.unwrap(), client: reqwest::Client::new() }
    }

    fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.admin_addr().unwrap())
    }

    /// A call as KubeRay's dashboard client makes it.
    fn kuberay(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.admin(path)).header("x-ray-authorization", format!("Bearer {TOKEN}"))
    }

    async fn put(&self, config: &Value) -> (u16, String) {
        let r = self
            .kuberay(reqwest::Method::PUT, "/api/serve/applications/")
            .header("content-type", "application/json")
            .body(config.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn details(&self) -> Value {
        let r = self.kuberay(reqwest::Method::GET, "/api/serve/applications/?api_type=declarative").send();
        let r = r.await.unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Polls until application `app` has `status` (deploys run in the background, as in Ray).
    async fn until(&self, app: &str, status: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let d = self.details().await;
            if d["applications"][app]["status"] == status {
                return d;
            }
            assert!(Instant::now() < deadline, "{app} never became {status}: {d:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn infer(&self, model: &str) -> Value {
        let r =
            self.client.post(url(&self.server, &format!("/v2/models/{model}/infer"))).body(IRIS_BODY).send();
        r.await.unwrap().json().await.unwrap()
    }
}

/// A RayService serveConfigV2 in the shape of KubeRay's samples, serving the iris fixture.
fn service_config(import_path: &str, user_config: Value) -> Value {
    json!({
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": "fruit",
            "route_prefix": "/fruit",
            "import_path": import_path,
            "runtime_env": {"working_dir": "https://example.invalid/test_dag.zip"},
            "deployments": [{
                "name": "fruit",
                "num_replicas": 2,
                "max_replicas_per_node": 1,
                "graceful_shutdown_timeout_s": 20,
                "user_config": user_config,
                "ray_actor_options": {"num_cpus": 0.1},
            }],
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kuberay_deploys_reads_status_swaps_and_shuts_down() {
    let d = Dashboard::start().await;
    // The serve CLI's version check, and Ray's jobs one.
    for path in ["/api/ray/version", "/api/version"] {
        let v: Value = d.kuberay(reqwest::Method::GET, path).send().await.unwrap().json().await.unwrap();
        assert_eq!(
            (v["ray_version"].as_str(), v["version"].as_str()),
            (Some("2.60.0"), Some("4")),
            "{path}: {v}"
        );
    }
    // Deploy: accepted at once, then DEPLOYING until both replicas are warm, then RUNNING.
    let config = service_config("sluice.onnx:iris/model.onnx", json!({"max_batch_size": 8, "version": "1"}));
    assert_eq!(d.put(&config).await, (200, String::new()));
    let details = d.until("fruit", "RUNNING").await;
    assert!(details["controller_info"]["node_id"].is_string(), "{details:#}");
    let node = &details["controller_info"]["node_id"];
    assert_eq!(details["proxies"][node.as_str().unwrap()]["status"], "HEALTHY");
    let app = &details["applications"]["fruit"];
    assert_eq!(app["deployed_app_config"], config["applications"][0], "what KubeRay sent, back");
    assert_eq!(app["source"], "declarative");
    assert_eq!(app["route_prefix"], "/v2/models/fruit", "a single model answers on its OIP path");
    assert!(app["last_deployed_time_s"].as_f64().unwrap() > 1.7e9, "{app}");
    let message = app["message"].as_str().unwrap();
    for ignored in
        ["proxy_location", "http_options", "runtime_env", "graceful_shutdown_timeout_s", "route_prefix"]
    {
        assert!(message.contains(ignored), "{ignored} listed as ignored: {message}");
    }
    let dep = &app["deployments"]["fruit"];
    assert_eq!(
        (dep["status"].as_str(), dep["status_trigger"].as_str()),
        (Some("HEALTHY"), Some("CONFIG_UPDATE_COMPLETED"))
    );
    assert_eq!(dep["target_num_replicas"], 2);
    assert_eq!(dep["deployment_config"]["num_replicas"], 2);
    assert_eq!(dep["required_resources"], json!({"CPU": 0.1}));
    let replicas = dep["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2, "{dep:#}");
    for r in replicas {
        assert_eq!(r["state"], "RUNNING");
        assert_eq!(r["pid"], std::process::id(), "replica threads run in the server's process");
        assert_eq!(&r["node_id"], node);
        assert_eq!(r["node_ip"], "127.0.0.1");
        assert!(r["start_time_s"].as_f64().unwrap() > 1.7e9);
    }
    assert_eq!(d.infer("fruit").await["model_version"], "1");
    // Sluice's own status says why each field is ignored.
    let ours: Value =
        d.kuberay(reqwest::Method::GET, "/api/sluice/status").send().await.unwrap().json().await.unwrap();
    let ignored = ours["applications"]["fruit"]["ignored"].to_string();
    assert!(ignored.contains("runtime_env: Sluice runs no Python"), "{ignored}");

    // A second deploy swaps the model: a new file at version 2, live.
    let v2 = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("iris-v2-{}.onnx", std::process::id()));
    std::fs::copy(models_dir().join("iris/model.onnx"), &v2).unwrap();
    let swapped = service_config(&format!("sluice.onnx:{}", v2.display()), json!({"version": "2"}));
    assert_eq!(d.put(&swapped).await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.infer("fruit").await["model_version"] != "2" {
        assert!(Instant::now() < deadline, "version 2 never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let details = d.until("fruit", "RUNNING").await;
    assert_eq!(
        details["applications"]["fruit"]["deployed_app_config"]["import_path"],
        format!("sluice.onnx:{}", v2.display())
    );

    // The proxy answers KubeRay's probe, and the routes by application.
    let health = d.client.get(url(&d.server, "/-/healthz")).send().await.unwrap();
    assert_eq!((health.status().as_u16(), health.text().await.unwrap()), (200, "success".to_string()));
    let routes: Value = d.client.get(url(&d.server, "/-/routes")).send().await.unwrap().json().await.unwrap();
    assert_eq!(routes, json!({"/v2/models/fruit": "fruit"}));

    // Shutdown (`serve shutdown`): every application goes; the instance stays.
    let r = d.kuberay(reqwest::Method::DELETE, "/api/serve/applications/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let details = d.details().await;
    assert_eq!(details["applications"], json!({}));
    assert!(details["controller_info"]["node_id"].is_string());
    assert_eq!(d.infer("fruit").await["error"], "unknown model `fruit`");
    d.server.shutdown().await;
}

/// Deploys run in the background; two sent one after the other are applied in that order
/// (the last one stays), and a shutdown sent after a deploy leaves nothing, as in Ray.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_apply_in_the_order_sent_and_a_shutdown_after_them_wins() {
    let d = Dashboard::start().await;
    let named = |name: &str| {
        let mut c = service_config("sluice.onnx:iris/model.onnx", json!({}));
        c["applications"][0]["name"] = json!(name);
        c["applications"][0]["route_prefix"] = json!(format!("/{name}"));
        c["applications"][0]["deployments"][0]["name"] = json!(name);
        c["applications"][0]["deployments"][0]["num_replicas"] = json!(1);
        c
    };
    let settled = || tokio::time::sleep(Duration::from_millis(300));
    for round in 0..6 {
        let (first, second) = (format!("first{round}"), format!("second{round}"));
        assert_eq!(d.put(&named(&first)).await.0, 200);
        assert_eq!(d.put(&named(&second)).await.0, 200);
        d.until(&second, "RUNNING").await;
        settled().await;
        let apps = d.details().await["applications"].clone();
        assert_eq!(apps[&second]["status"], "RUNNING", "round {round}: {apps:#}");
        assert!(apps.get(&first).is_none(), "round {round}: the earlier config came back: {apps:#}");
    }
    // Until no application is listed (the change is applied in the background), then still
    // none a moment later.
    let until_none = || async {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while d.details().await["applications"] != json!({}) {
            assert!(std::time::Instant::now() < until, "{:#}", d.details().await["applications"]);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        settled().await;
    };
    for round in 0..6 {
        assert_eq!(d.put(&named(&format!("late{round}"))).await.0, 200);
        let r = d.kuberay(reqwest::Method::DELETE, "/api/serve/applications/").send().await.unwrap();
        assert_eq!(r.status(), 200);
        until_none().await;
        assert_eq!(d.details().await["applications"], json!({}), "round {round}");
    }
    // How a RayService removes every application: Ray's frontend options and no application.
    assert_eq!(d.put(&named("kept")).await.0, 200);
    d.until("kept", "RUNNING").await;
    let none = json!({"http_options": {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 30}, "applications": []});
    assert_eq!(d.put(&none).await, (200, String::new()));
    until_none().await;
    assert_eq!(d.details().await["applications"], json!({}));
    d.server.shutdown().await;
}

/// A deploy sent while a shutdown waits for its turn is applied after it (as in Ray), and keeps
/// the config it was sent with: the shutdown, once done, wiped every submitted entry, the later
/// deploy's too, so `serve config` found none for a running application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_sent_during_a_shutdown_keeps_its_config() {
    let held = common::held::Held::register_load("held-load-shutdown");
    let d = Dashboard::start().await;
    let named = |name: &str, import_path: &str| {
        let mut c = service_config(import_path, json!({}));
        c["applications"][0]["name"] = json!(name);
        c["applications"][0]["route_prefix"] = json!(format!("/{name}"));
        c["applications"][0]["deployments"][0]["name"] = json!(name);
        c["applications"][0]["deployments"][0]["num_replicas"] = json!(1);
        c
    };
    // A deploy whose model's load the test holds: it holds the controller's turn.
    assert_eq!(d.put(&named("slow", "sluice.custom:held-load-shutdown")).await.0, 200);
    held.started().await;
    let delete = tokio::spawn(d.kuberay(reqwest::Method::DELETE, "/api/serve/applications/").send());
    // Until the delete waits for its turn behind the held deploy (a fixed sleep could end
    // first on a loaded machine, and the later deploy then came before the delete).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while d.server.controller().changes_in_line() == 0 {
        assert!(std::time::Instant::now() < until, "the delete never reached the controller");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(d.put(&named("later", "sluice.onnx:iris/model.onnx")).await.0, 200);
    for _ in 0..4 {
        held.release();
    }
    assert_eq!(delete.await.unwrap().unwrap().status(), 200);
    let app = d.until("later", "RUNNING").await["applications"]["later"].clone();
    assert_eq!(app["deployed_app_config"]["name"], "later", "{app:#}");
    d.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_are_refused_in_rays_words_and_failed_deploys_say_why() {
    let d = Dashboard::start().await;
    let good = service_config("sluice.onnx:iris/model.onnx", json!({}));
    assert_eq!(d.put(&good).await.0, 200);
    d.until("fruit", "RUNNING").await;

    // Refused before anything starts, every error at the field the user wrote.
    let mut bad = good.clone();
    bad["applications"][0]["import_path"] = json!("fruit.deployment_graph");
    bad["applications"][0]["deployments"][0]["user_config"] = json!({"max_bach_size": 8});
    let (status, text) = d.put(&bad).await;
    assert_eq!(status, 400);
    assert!(text.starts_with("1 validation error for ServeDeploySchema\napplications.0.import_path\n  `fruit.deployment_graph` is not a Sluice model reference; use sluice.onnx:PATH"), "{text}");
    bad["applications"][0]["import_path"] = json!("sluice.onnx:iris/model.onnx");
    let (status, text) = d.put(&bad).await;
    assert_eq!(status, 400);
    assert!(text.contains("\napplications.0.deployments.0.user_config.max_bach_size\n  unknown field `max_bach_size`, did you mean `max_batch_size`? [type=value_error]"), "{text}");
    assert_eq!(d.details().await["applications"]["fruit"]["status"], "RUNNING", "nothing changed");

    // Accepted but cannot load: DEPLOY_FAILED with why, and the old version keeps serving.
    let broken = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("garbage-{}.onnx", std::process::id()));
    std::fs::write(&broken, b"not an onnx model").unwrap();
    assert_eq!(d.put(&service_config(&format!("sluice.onnx:{}", broken.display()), json!({}))).await.0, 200);
    let details = d.until("fruit", "DEPLOY_FAILED").await;
    let message = details["applications"]["fruit"]["message"].as_str().unwrap();
    assert!(message.contains("deployment `fruit` version 1: cannot load model"), "{message}");
    assert!(d.infer("fruit").await["outputs"].is_array(), "the running version still answers");

    // `api_type` as Ray checks it.
    let r =
        d.kuberay(reqwest::Method::GET, "/api/serve/applications/?api_type=imperative").send().await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["applications"], json!({}));
    let r = d.kuberay(reqwest::Method::GET, "/api/serve/applications/?api_type=bogus").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        "Invalid 'api_type' value: 'bogus'. Must be one of: imperative, declarative"
    );
    // Without the token, nothing.
    let r = d.client.get(d.admin("/api/serve/applications/")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A Ray config written as YAML (`sluice deploy ray.yaml`, curl), paths from the base-dir
    // header: the same as JSON, and it replaces the failed application.
    let yaml = "applications:\n  - name: yaml\n    import_path: sluice.onnx:model.onnx\n";
    let r = d
        .kuberay(reqwest::Method::PUT, "/api/serve/applications")
        .header("x-sluice-base-dir", models_dir().join("iris").display().to_string())
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let details = d.until("yaml", "RUNNING").await;
    assert_eq!(
        details["applications"]["yaml"]["deployed_app_config"]["import_path"],
        "sluice.onnx:model.onnx"
    );
    assert!(details["applications"]["fruit"].is_null(), "declarative: what the config omits goes");
    d.server.shutdown().await;
}

/// A controller with no application, publishing into the route table it answers with.
fn bare_controller() -> (std::sync::Arc<sluice_router::Router>, std::sync::Arc<sluice_controller::Controller>)
{
    let routes = std::sync::Arc::new(sluice_router::Router::new(sluice_router::RouteTable::default()));
    let controller = sluice_controller::Controller::new(
        routes.clone(),
        Duration::from_secs(1),
        Default::default(),
        Default::default(),
    );
    (routes, controller)
}

/// A background deploy that has not started yet when a delete of everything comes is
/// dropped, not applied after it (one runtime thread: the deploy's task cannot run before the
/// delete unless the delete waits for it).
#[tokio::test]
async fn a_shutdown_right_after_a_deploy_leaves_nothing() {
    sluice_server::runtime::init(None, None).unwrap();
    let (routes, controller) = bare_controller();
    let text = "applications:\n  - name: a\n    deployments: [{name: m, model: iris/model.onnx}]\n";
    let config = sluice_config::parse(text, &models_dir().join("c.yaml")).unwrap();
    controller.deploy(config.clone());
    controller.delete(None).await.unwrap();
    // Whatever the deploy's task does, it does now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(controller.status().applications.is_empty(), "{:?}", controller.status().applications.keys());
    assert!(routes.route("m", Default::default()).is_err(), "the deploy ran after the delete");
    // A deploy of one application, then a delete of another: the deploy is applied first.
    controller.deploy(config);
    assert!(controller.delete(Some("b")).await.is_err(), "no application `b`");
    assert!(routes.route("m", Default::default()).is_ok());
}

/// A deploy sent after a delete of everything is applied after it, not dropped by it nor
/// deleted with the rest: the deploy already running ran every queued one, the later one too,
/// before the delete took its turn (and a delete that came first dropped it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_sent_after_a_delete_is_applied_after_it() {
    sluice_server::runtime::init(None, None).unwrap();
    let held = common::held::Held::register_load("held-load-delete");
    let (routes, controller) = bare_controller();
    let config = |text: &str| sluice_config::parse(text, &models_dir().join("c.yaml")).unwrap();
    let slow = "applications:\n  - name: a\n    deployments: [{name: m, builtin: {custom: {name: held-load-delete}}}]\n";
    controller.deploy(config(slow));
    held.started().await;
    // The first deploy's task holds the controller (its model's load held), the delete waits.
    let deleting = {
        let c = controller.clone();
        tokio::spawn(async move { c.delete(None).await })
    };
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while controller.changes_in_line() == 0 {
        assert!(std::time::Instant::now() < until, "the delete never waited for its turn");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    controller
        .deploy(config("applications:\n  - name: b\n    deployments: [{name: n, model: iris/model.onnx}]\n"));
    for _ in 0..4 {
        held.release();
    }
    deleting.await.unwrap().unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while routes.route("n", Default::default()).is_err() {
        assert!(
            std::time::Instant::now() < until,
            "the deploy sent after the delete was lost: {:?}",
            controller.status().applications.keys()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(routes.route("m", Default::default()).is_err(), "deleted");
    assert_eq!(controller.status().applications.keys().collect::<Vec<_>>(), ["b"]);
}

#[tokio::test]
async fn a_draining_proxy_fails_kuberays_probe() {
    let (routes, controller) = bare_controller();
    let (draining, rx) = tokio::sync::watch::channel(false);
    let (_phase, phase) = tokio::sync::watch::channel(sluice_server::readiness::Phase::Serving);
    let readiness = sluice_server::readiness::Readiness::new(phase, routes.clone());
    let state = sluice_server::rest::AppState::new(sluice_server::rest::Shared {
        routes,
        controller,
        readiness,
        max_body_bytes: 1024,
        draining: rx,
        control: sluice_server::auth::Control::Open { hosts: sluice_server::auth::Hosts::Any },
    });
    let app = sluice_server::rest::router(state, &sluice_config::HttpOptions::default());
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            use tower::ServiceExt;
            let req = axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
            let r = app.oneshot(req).await.unwrap();
            let status = r.status().as_u16();
            let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(get("/-/healthz").await, (200, "success".into()));
    assert_eq!(get("/-/routes").await, (200, "{}".into()));
    draining.send_replace(true);
    for path in ["/-/healthz", "/-/routes"] {
        assert_eq!(get(path).await, (503, "This node is being drained.".into()), "{path}");
    }
}
