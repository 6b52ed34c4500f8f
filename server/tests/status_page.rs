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
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
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

/// What a browser could be made to send is refused without a token: a change from a page of
/// another origin, and any call for a host name that is not loopback's (DNS rebinding); the
/// admin API's own errors are JSON; its bodies are bounded in size and time.
#[tokio::test]
async fn the_admin_api_refuses_what_a_web_page_could_send_and_answers_json_errors() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sluice_server::runtime::init(None, None).unwrap();
    let text = "http_options: {host: 127.0.0.1, port: 0, max_body_bytes: 4096, body_read_timeout_s: 0.5}\ngrpc_options: {enabled: false}\nadmin_options: {port: 0}\napplications:\n  - name: shop\n    deployments:\n      - {name: iris, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 25}}\n";
    let config = sluice_config::parse(text, &common::models_dir().join("test.yaml")).unwrap();
    let server = sluice_server::start(config, Default::default()).await.unwrap();
    let addr = server.admin_addr().unwrap();
    let base = format!("http://{addr}");
    let c = client();
    let canary = format!("{base}/api/serve/deployments/iris/canary");
    let json = |r: reqwest::Response| async move { r.json::<serde_json::Value>().await.unwrap() };

    // Another origin: refused (the browser sends a text/plain POST without asking first).
    let r = c
        .post(&canary)
        .header("Origin", "http://evil.example")
        .body(r#"{"weight": 100}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(json(r).await["error"].as_str().unwrap().contains("another origin"));
    // Behind a reverse proxy that rewrites `Host`: the browser's name comes as X-Forwarded-Host.
    let r = c
        .post(&canary)
        .header("Origin", "https://sluice.example.com")
        .header("X-Forwarded-Host", "sluice.example.com")
        .body(r#"{"weight": 25}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The page's own origin, and no origin at all (a command-line client): accepted.
    let r = c.post(&canary).header("Origin", &base).body(r#"{"weight": 30}"#).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(c.post(&canary).body(r#"{"weight": 25}"#).send().await.unwrap().status(), StatusCode::OK);
    // A name that is not loopback's: refused, reading too.
    let status = format!("{base}/api/sluice/status");
    let r = c.get(&status).header("Host", format!("evil.example:{}", addr.port())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(json(r).await["error"].as_str().unwrap().contains("evil.example"));
    let r = c.get(&status).header("Host", format!("localhost:{}", addr.port())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Errors axum writes itself come as JSON too.
    let r = c.get(format!("{base}/api/nope")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(json(r).await["error"].as_str().unwrap().contains("/api/nope"));
    let r = c.get(&canary).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.headers().contains_key("allow"));
    assert_eq!(json(r).await["error"], "Method Not Allowed");
    let r = c.delete(format!("{base}/api/serve/applications/%FF")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(json(r).await["error"].is_string());
    // So does the REST port's, for a path that does not decode.
    let r = c.get(format!("http://{}/v2/models/%FF", server.http_addr())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(json(r).await["error"].as_str().unwrap().contains("UTF-8"));

    // Bodies: over max_body_bytes 413; one that stops arriving 408.
    let r = c.put(format!("{base}/api/serve/applications")).body(vec![b'#'; 8192]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(json(r).await["error"].as_str().unwrap().contains("4096"));
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /api/serve/applications HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 100\r\n\r\nab",
        addr.port()
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), stalled.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    server.shutdown().await;
}

/// The page and every admin answer refuse to be framed (the page's buttons, clicked through an
/// invisible frame on any site) and are not kept in caches; the login form posts the token
/// (a query's lands in proxies' access logs), and behind a TLS proxy the cookie is Secure.
#[tokio::test]
async fn the_page_cannot_be_framed_and_its_login_posts_the_token() {
    let server = start(Some(TOKEN)).await;
    let base = format!("http://{}", server.admin_addr().unwrap());
    let c = client();
    let login = c.get(format!("{base}/")).send().await.unwrap();
    for r in [&login, &c.get(format!("{base}/api/sluice/status")).bearer_auth(TOKEN).send().await.unwrap()] {
        let h = r.headers();
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["content-security-policy"], "frame-ancestors 'none'");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-store");
    }
    let html = login.text().await.unwrap();
    assert!(html.contains("method=\"post\""), "{html}");
    let post = |body: &'static str| {
        c.post(format!("{base}/"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("Origin", &base)
            .body(body)
    };
    assert_eq!(post("token=nope").send().await.unwrap().status(), 401);
    let r = post("token=s3cret%2Btoken").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(set.starts_with(&format!("sluice_admin_token={TOKEN};")) && !set.contains("Secure"), "{set}");
    let r = post("token=s3cret%2Btoken").header("X-Forwarded-Proto", "https").send().await.unwrap();
    assert!(r.headers()[SET_COOKIE].to_str().unwrap().contains("; Secure"));
    // A login from another site's page (logging the browser in with the attacker's token).
    let r = c
        .post(format!("{base}/"))
        .header("Origin", "http://evil.example")
        .body("token=s3cret%2Btoken")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    server.shutdown().await;
}

/// Without a token, an admin API beyond loopback (a Ray job's, on the cluster network) answers
/// a browser only by address: a page whose own name resolves to it (DNS rebinding) is refused,
/// while a command-line client may use any name. A change a browser marks as from another site
/// is refused without an `Origin` too.
#[tokio::test]
async fn beyond_loopback_without_a_token_a_browser_must_use_an_address() {
    sluice_server::runtime::init(None, None).unwrap();
    let text = "http_options: {host: 127.0.0.1, port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {host: 0.0.0.0, port: 0}\napplications:\n  - name: shop\n    deployments:\n      - {name: iris, model: iris/model.onnx, canary: {model: iris/model.onnx, version: \"2\", weight: 25}}\n";
    let config = sluice_config::parse(text, &common::models_dir().join("test.yaml")).unwrap();
    let options = sluice_server::StartOptions { admin_open_on_cluster: true, ..Default::default() };
    let server = sluice_server::start(config, options).await.unwrap();
    let port = server.admin_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let c = client();
    let status = format!("{base}/api/sluice/status");
    let named = |name: &str| c.get(&status).header("Host", format!("{name}:{port}"));
    // A browser by a name: refused; by an address: answered.
    let r = named("rebind.example").header("Sec-Fetch-Mode", "cors").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(r.text().await.unwrap().contains("rebind.example"));
    assert_eq!(named("10.1.2.3").header("Sec-Fetch-Mode", "cors").send().await.unwrap().status(), 200);
    // A client that is no browser, by a name: answered (`sluice status --address http://head:8266`).
    assert_eq!(named("head.cluster").send().await.unwrap().status(), 200);
    // A change marked as from another site, no Origin sent: refused.
    let canary = format!("{base}/api/serve/deployments/iris/canary");
    let r =
        c.post(&canary).header("Sec-Fetch-Site", "same-site").body(r#"{"weight": 50}"#).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .post(&canary)
        .header("Sec-Fetch-Site", "same-origin")
        .body(r#"{"weight": 50}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server.shutdown().await;
}
