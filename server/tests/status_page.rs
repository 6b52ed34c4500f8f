//! The admin port's status page (`GET /`): server-rendered deployments and weights, and its
//! token login (a cookie the admin API then accepts); without the token, neither the page nor
//! the API calls its script makes answer. tests/python/test_status_page.py drives it in
//! headless Chromium.

mod common;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

const TOKEN: &str = "s3cret+token";

async fn start(token: Option<&str>) -> sluice_server::Server {
    sluice_server::runtime::init(None, None).expect("ONNX Runtime (run scripts/install-onnxruntime.sh)");
    let text = "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {port: 0}\nadmin_options: {port: 0}\napplications:\n  - name: shop\n    deployments:\n      - {name: iris, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 25}}\n";
    let config = sluice_config::parse(text, &common::models_dir().join("test.yaml")).unwrap();
    let options =
        sluice_server::StartOptions { admin_token: token.map(str::to_string), ..Default::default() };
    let server = sluice_server::start(config, options).await.expect("server starts");
    assert!(server.wait_ready(std::time::Duration::from_secs(60)).await);
    server
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test]
async fn the_page_renders_deployments_and_weights() {
    let server = start(None).await;
    let base = format!("http://{}", server.admin_addr().unwrap());
    let r = client().get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(html.contains("<b>iris</b>"), "{html}");
    assert!(
        html.contains(r#"id="w:shop/iris/1">75%"#) && html.contains(r#"id="w:shop/iris/2">25%"#),
        "{html}"
    );
    assert!(html.contains("setInterval(poll, 2000)"), "the polling script is inline");
    server.shutdown().await;
}

#[tokio::test]
async fn without_the_token_the_page_and_its_api_calls_are_refused() {
    let server = start(Some(TOKEN)).await;
    let base = format!("http://{}", server.admin_addr().unwrap());
    let c = client();
    // No token: the login form, and the calls the page's script makes answer 401.
    let r = c.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let html = r.text().await.unwrap();
    assert!(html.contains("name=\"token\"") && !html.contains("iris"), "{html}");
    assert_eq!(c.get(format!("{base}/api/sluice/status")).send().await.unwrap().status(), 401);
    let canary = format!("{base}/api/serve/deployments/iris/canary");
    assert_eq!(c.post(&canary).body(r#"{"weight": 50}"#).send().await.unwrap().status(), 401);
    // A wrong token, in the query or the cookie, changes nothing.
    assert_eq!(c.get(format!("{base}/?token=nope")).send().await.unwrap().status(), 401);
    let wrong = "sluice_admin_token=nope";
    assert_eq!(
        c.get(format!("{base}/api/sluice/status")).header(COOKIE, wrong).send().await.unwrap().status(),
        401
    );

    // The right one logs in: an HttpOnly cookie, and on to `/` without it in the address.
    let r = c.get(format!("{base}/?token=s3cret%2Btoken")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[LOCATION], "/");
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    assert_eq!(cookie, format!("sluice_admin_token={TOKEN}"));
    let r = c.get(format!("{base}/")).header(COOKIE, &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<b>iris</b>"));
    assert_eq!(
        c.get(format!("{base}/api/sluice/status")).header(COOKIE, &cookie).send().await.unwrap().status(),
        200
    );
    let r = c.post(&canary).header(COOKIE, &cookie).body(r#"{"weight": 50}"#).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let status: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status["applications"]["shop"]["deployments"]["iris"]["versions"][1]["weight"], 50);
    // The bearer header still works.
    let r = c.get(format!("{base}/api/sluice/status")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    server.shutdown().await;
}
