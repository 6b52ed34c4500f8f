//! A model repository on S3, against a real S3-protocol server the test starts: moto's
//! (`moto_server`, from `moto[server]` in scripts/requirements-test.txt; found in `.venv/bin`
//! or at `$SLUICE_MOTO_SERVER`; the test says so and passes without it). Objects are written
//! with plain HTTP PUTs, as any S3 client would.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sluice_controller::StoreEnv;

const IRIS_BODY: &str =
    r#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}"#;

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_binary() -> Option<PathBuf> {
    let from_env = std::env::var_os("SLUICE_MOTO_SERVER").map(PathBuf::from);
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server");
    from_env.into_iter().chain([venv]).find(|p| p.is_file())
}

async fn start_moto() -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        eprintln!(
            "SKIPPED: no moto_server (pip install 'moto[server]' into .venv, or set SLUICE_MOTO_SERVER)"
        );
        return None;
    };
    // The port is picked here and bound by moto after: another process can take it in between,
    // so a moto that exits (its port taken) is started again on another, and only an answer
    // that is S3's (a bucket listing) counts as moto's.
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let mut moto = Moto { child, url: format!("http://127.0.0.1:{port}") };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/", moto.url)).await
                && r.text().await.is_ok_and(|body| body.contains("ListAllMyBucketsResult"))
            {
                return Some(moto);
            }
            if moto.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < until, "moto_server did not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("moto_server exited five times (its port taken each time?)")
}

async fn put(moto: &Moto, key: &str, body: Vec<u8>) {
    // Unsigned: moto lets an unsigned request write an object again only when it is public.
    let put = reqwest::Client::new().put(format!("{}/{key}", moto.url));
    let r = put.header("x-amz-acl", "public-read-write").body(body).send().await.unwrap();
    assert!(r.status().is_success(), "PUT {key}: {}", r.status());
}

fn env(moto: &Moto) -> StoreEnv {
    StoreEnv::from_vars(
        [
            ("AWS_ENDPOINT", moto.url.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

fn config(path: &str, cache: &std::path::Path) -> sluice_config::Config {
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\n\
         model_repository: {{path: \"{path}\", poll_interval_s: 0, cache_dir: {}, max_version_bytes: 1000}}\n",
        cache.display()
    );
    sluice_config::parse(&text, &models_dir().join("c.yaml")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_repository_serves_complete_versions_downloads_only_what_changed_and_survives_an_outage() {
    let Some(moto) = start_moto().await else { return };
    sluice_server::runtime::init(None, None).unwrap();
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("s3-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let iris = std::fs::read(models_dir().join("iris/model.onnx")).unwrap();
    put(&moto, "models", Vec::new()).await; // the bucket
    put(&moto, "models/repo/flowers/1/model.onnx", iris.clone()).await;
    put(&moto, "models/repo/flowers/1/notes.txt", b"first".to_vec()).await;
    put(&moto, "models/repo/flowers/1/READY", Vec::new()).await;

    // A missing bucket: one clear error naming the URL; nothing starts.
    let e = match sluice_server::start(
        config("s3://nosuchbucket/repo", &cache),
        sluice_server::StartOptions { store_env: env(&moto), ..Default::default() },
    )
    .await
    {
        Ok(_) => panic!("a missing bucket started"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("model repository `s3://nosuchbucket/repo`") && e.contains("not found"), "{e}");

    let options = sluice_server::StartOptions { store_env: env(&moto), ..Default::default() };
    let s = sluice_server::start(config("s3://models/repo", &cache), options).await.unwrap();
    let client = reqwest::Client::new();
    let admin = format!("http://{}", s.admin_addr().unwrap());
    let infer = || async {
        let r = client.post(url(&s, "/v2/models/flowers/infer")).body(IRIS_BODY).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let status = || async {
        client.get(format!("{admin}/api/sluice/status")).send().await.unwrap().json::<Value>().await.unwrap()
    };
    let notify = || async {
        client.post(format!("{admin}/api/sluice/repository/flowers/notify")).send().await.unwrap()
    };
    assert_eq!(infer().await.1["model_version"], "1");
    let model_path = || async {
        let st = status().await;
        let d = &st["applications"][sluice_config::REPOSITORY_APPLICATION]["deployments"]["flowers"];
        PathBuf::from(d["versions"][0]["model"].as_str().unwrap_or_else(|| panic!("{st}")))
    };
    // What serves is marked used between polls too (this server never polls): another server
    // sharing the cache would have pruned it an hour after this one's last apply.
    let in_use = model_path().await.parent().unwrap().to_path_buf();
    let unused = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::open(&in_use).unwrap().set_modified(unused).unwrap();
    let marked = || std::fs::metadata(&in_use).unwrap().modified().unwrap().elapsed().unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while marked() > Duration::from_secs(60) {
        assert!(Instant::now() < until, "the folder in use was not marked used again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = (iris.len() + 5) as u64;
    assert_eq!(status().await["repository"]["downloaded_bytes"], first);

    // Half-uploaded version 2 (no marker yet): listed as incomplete, never loaded.
    put(&moto, "models/repo/flowers/2/model.onnx", iris.clone()).await;
    assert_eq!(notify().await.status(), 200);
    assert_eq!(status().await["repository"]["incomplete"], serde_json::json!(["flowers/2"]));
    assert_eq!(infer().await.1["model_version"], "1");

    // Complete: swapped in. Its model.onnx has the same tag as version 1's and is linked from
    // the cache; only the changed small file is downloaded.
    put(&moto, "models/repo/flowers/2/notes.txt", b"second!".to_vec()).await;
    put(&moto, "models/repo/flowers/2/READY", Vec::new()).await;
    let r = notify().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(infer().await.1["model_version"], "2");
    let downloaded = status().await["repository"]["downloaded_bytes"].as_u64().unwrap();
    assert_eq!(downloaded - first, 7, "only notes.txt of version 2 was downloaded");
    let events: Vec<String> = status().await["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        events.iter().any(|e| e == "fetched version 2: 7 bytes in 1 file(s) from s3://models/repo"),
        "{events:?}"
    );

    // A version above max_version_bytes is refused alone (it failed every apply, so no other
    // model was updated), and a model whose name the store escapes is fetched by the key it
    // is listed under (it was asked for escaped twice, never found).
    let mlp = std::fs::read(models_dir().join("mlp/model.onnx")).unwrap();
    assert!(mlp.len() > 1000 && iris.len() + 7 < 1000);
    put(&moto, "models/repo/big/1/model.onnx", mlp).await;
    put(&moto, "models/repo/big/1/READY", Vec::new()).await;
    let r = client.post(format!("{admin}/api/sluice/repository/big/notify")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let e = r.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("version 1 of `big` was rejected") && e.contains("above max_version_bytes (1000)"),
        "{e}"
    );
    // `~` is a valid model name's, and the store escapes it.
    for key in ["x~y/1/model.onnx", "flowers/3/model.onnx"] {
        put(&moto, &format!("models/repo/{key}"), iris.clone()).await;
        put(&moto, &format!("models/repo/{}", key.replace("model.onnx", "READY")), Vec::new()).await;
    }
    let r = client.post(format!("{admin}/api/sluice/repository/x~y/notify")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(infer().await.1["model_version"], "3", "the other models are updated");
    let r = client.post(url(&s, "/v2/models/x~y/infer")).body(IRIS_BODY).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // Version 3 rewritten in place with a file that does not load: refused, and the copy loaded
    // before serves on. The files it was loaded from are still on disk as they were, for a
    // replica that starts later (they were overwritten in the cache, and a scale-up or a
    // restart loaded the broken file).
    let serving = model_path().await;
    put(&moto, "models/repo/flowers/3/model.onnx", b"not a model".to_vec()).await;
    let r = notify().await;
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    assert_eq!(infer().await.1["model_version"], "3");
    assert_eq!(model_path().await, serving);
    assert_eq!(std::fs::read(&serving).unwrap(), iris, "the running copy's file in the cache");
    // Fixed in place: served from its new contents. The old ones stay while the retired copy
    // drains, and are removed at a later change once no one has used them for an hour.
    put(
        &moto,
        "models/repo/flowers/3/model.onnx",
        std::fs::read(models_dir().join("iris-v2/model.onnx")).unwrap(),
    )
    .await;
    let r = notify().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let fixed = model_path().await;
    assert_ne!(fixed, serving);
    assert_eq!(infer().await, (200, infer().await.1));
    assert!(serving.exists() && fixed.exists());
    // An hour unused (another server sharing the cache would have marked it used meanwhile).
    std::fs::File::open(serving.parent().unwrap()).unwrap().set_modified(unused).unwrap();
    put(&moto, "models/repo/later/1/model.onnx", iris.clone()).await;
    put(&moto, "models/repo/later/1/READY", Vec::new()).await;
    let r = client.post(format!("{admin}/api/sluice/repository/later/notify")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(!serving.exists() && fixed.exists());
    // The store goes away: what serves keeps serving; status and notify say why.
    drop(moto);
    let r = notify().await;
    assert_eq!(r.status(), 503);
    let e = r.json::<Value>().await.unwrap()["error"].as_str().unwrap().to_string();
    assert!(e.contains("model repository `s3://models/repo` is unreachable"), "{e}");
    assert_eq!(infer().await, (200, infer().await.1));
    assert_eq!(infer().await.1["model_version"], "3");
    let st = status().await;
    assert_eq!(st["repository"]["reachable"], false, "{st}");
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&cache);
}

/// A version whose files cannot be fetched (here the cache cannot write them: a file stands
/// where the version's folder goes) is left out and named, other models' new versions are applied (one such
/// version failed every apply), and it is fetched again once it can be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_cannot_be_fetched_holds_back_no_other_and_is_fetched_again() {
    let Some(moto) = start_moto().await else { return };
    sluice_server::runtime::init(None, None).unwrap();
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("s3-held-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let iris = std::fs::read(models_dir().join("iris/model.onnx")).unwrap();
    put(&moto, "models", Vec::new()).await;
    put(&moto, "models/repo/a/1/model.onnx", iris.clone()).await;
    put(&moto, "models/repo/a/1/READY", Vec::new()).await;
    let options = sluice_server::StartOptions { store_env: env(&moto), ..Default::default() };
    let s = sluice_server::start(config("s3://models/repo", &cache), options).await.unwrap();
    let client = reqwest::Client::new();
    let admin = format!("http://{}", s.admin_addr().unwrap());
    let infer = |model: &'static str| {
        let (client, url) = (client.clone(), url(&s, &format!("/v2/models/{model}/infer")));
        async move {
            let r = client.post(url).body(IRIS_BODY).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let notify = |model: &'static str| {
        let (client, admin) = (client.clone(), admin.clone());
        async move {
            let r =
                client.post(format!("{admin}/api/sluice/repository/{model}/notify")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(infer("a").await.1["model_version"], "1");

    // The store's folder in the cache (one per store URL); b's model file cannot be written.
    let store_dir = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
    let in_the_way = store_dir.join("b/1");
    std::fs::create_dir_all(store_dir.join("b")).unwrap();
    std::fs::write(&in_the_way, b"a file where the version's folder goes").unwrap();
    put(&moto, "models/repo/b/1/model.onnx", iris.clone()).await;
    put(&moto, "models/repo/b/1/READY", Vec::new()).await;
    let (status, text) = notify("b").await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("version 1 of `b` could not be fetched") && text.contains("tried again"), "{text}");
    assert_eq!(infer("b").await.0, 404);
    let st: Value =
        client.get(format!("{admin}/api/sluice/status")).send().await.unwrap().json().await.unwrap();
    assert_eq!(st["repository"]["not_fetched"][0]["model"], "b", "{st}");

    // Another model's new version is applied meanwhile.
    put(&moto, "models/repo/a/2/model.onnx", std::fs::read(models_dir().join("iris-v2/model.onnx")).unwrap())
        .await;
    put(&moto, "models/repo/a/2/READY", Vec::new()).await;
    let (status, text) = notify("a").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(infer("a").await.1["model_version"], "2");

    // Once the file can be written, the next scan fetches it.
    std::fs::remove_file(&in_the_way).unwrap();
    let (status, text) = notify("b").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(infer("b").await, (200, infer("b").await.1));
    assert_eq!(infer("b").await.1["model_version"], "1");
    let st: Value =
        client.get(format!("{admin}/api/sluice/status")).send().await.unwrap().json().await.unwrap();
    assert!(st["repository"].get("not_fetched").is_none(), "{st}");
    s.shutdown().await;
    drop(moto);
    let _ = std::fs::remove_dir_all(&cache);
}
