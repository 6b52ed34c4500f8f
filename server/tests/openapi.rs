//! The OpenAPI documents: what the server serves is what docs/ holds, and every route the
//! REST and admin routers register is in them (and the other way round).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

fn docs(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs").join(file)
}

async fn fetch(url: &str) -> Value {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200, "{url}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn served_documents_equal_the_committed_ones() {
    let server = common::start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let admin = server.admin_addr().unwrap();
    for (url, file) in [
        (common::url(&server, "/openapi.json"), "openapi.json"),
        (format!("http://{admin}/openapi.json"), "openapi-admin.json"),
    ] {
        let served = fetch(&url).await;
        let committed: Value = serde_json::from_slice(&std::fs::read(docs(file)).unwrap()).unwrap();
        assert!(served == committed, "docs/{file} differs from what {url} serves: run `make openapi`");
        assert!(served["openapi"].as_str().unwrap().starts_with("3."));
    }
    server.shutdown().await;
}

/// `(METHOD, path)` of every `.route("path", get(..).post(..))` in a router's source.
fn registered(source: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for chunk in source.split(".route(\"").skip(1) {
        let (path, rest) = chunk.split_once('"').unwrap();
        // The method router: up to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(i, _)| i)
            .unwrap();
        let expr = &rest[..end];
        for verb in ["get", "post", "put", "delete"] {
            let called = expr.match_indices(&format!("{verb}(")).any(|(i, _)| {
                let before = expr[..i].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if called {
                out.insert((verb.to_uppercase(), path.to_string()));
            }
        }
    }
    out
}

fn documented(ops: &[sluice_server::openapi::Op]) -> BTreeSet<(String, String)> {
    ops.iter().map(|o| (o.verb.as_str().to_string(), o.path.to_string())).collect()
}

#[test]
fn every_route_the_routers_register_is_documented() {
    let rest = registered(include_str!("../src/rest/mod.rs"));
    let admin = registered(include_str!("../src/admin/mod.rs"));
    assert!(rest.len() > 20 && admin.len() > 15, "the source scan found too few routes: {rest:?} {admin:?}");
    assert_eq!(rest, documented(sluice_server::openapi::REST), "REST routes vs openapi::REST");
    assert_eq!(admin, documented(sluice_server::openapi::ADMIN), "admin routes vs openapi::ADMIN");
}

/// Asks the running routers themselves: a TRACE to each documented path answers 405 with an
/// `Allow` header listing the methods registered there, which must be the documented ones.
#[tokio::test]
async fn the_running_routers_register_exactly_the_documented_methods() {
    let server = common::start("      - {name: iris, model: iris/model.onnx}\n", "").await;
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let rest = format!("http://{}", server.http_addr());
    let client = reqwest::Client::new();
    for (base, doc) in [(rest, "/openapi.json"), (admin, "/openapi.json")] {
        let doc = fetch(&format!("{base}{doc}")).await;
        for (path, item) in doc["paths"].as_object().unwrap() {
            let concrete = path
                .replace("{model}", "iris")
                .replace("{version}", "1")
                .replace("{name}", "iris")
                .replace("{app}", "test");
            let r = client.request(reqwest::Method::TRACE, format!("{base}{concrete}")).send().await.unwrap();
            assert_eq!(r.status(), 405, "{base}{path}: not routed");
            let allow: BTreeSet<String> = r.headers()[reqwest::header::ALLOW]
                .to_str()
                .unwrap()
                .split(',')
                .map(|m| m.trim().to_string())
                .filter(|m| m != "HEAD")
                .collect();
            let want: BTreeSet<String> = item.as_object().unwrap().keys().map(|m| m.to_uppercase()).collect();
            assert_eq!(allow, want, "{base}{path}");
        }
    }
    server.shutdown().await;
}
