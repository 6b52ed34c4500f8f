//! The status page: `GET /` on the admin port. The server renders the applications,
//! deployments, versions, weights and replicas into `status.html`; its one inline script then
//! reads `/api/sluice/status` every 2 s, keeps the last 5 minutes of req/s, p50, p99 and queue
//! depth per version for its sparklines, and drives canary weight, promote and rollback
//! through the admin API. No build step: the HTML is embedded with `include_str!`.
//!
//! With an admin token, the login form's `POST /` (`token=T`, urlencoded; `GET /?token=T` for
//! scripts) answers with a cookie holding the token (HttpOnly, SameSite=Strict; Secure over TLS
//! or behind a TLS proxy) that the admin API accepts like the bearer header, and redirects to
//! `/`. Every admin answer refuses to be framed (`frame-ancestors 'none'`).

use std::fmt::Write;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use sluice_controller::Status;

use super::AdminState;

/// The cookie the login sets.
pub const COOKIE: &str = "sluice_admin_token";

const PAGE: &str = include_str!("status.html");
const SLOT: &str = "<!--SERVER-RENDERED-->";

const LOGIN: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sluice status: log in</title>
<style>body { font: 14px system-ui, sans-serif; margin: 3em; } input { width: 24em; }</style></head>
<body><h1>Sluice status</h1><p>This admin API requires its token (<code>admin_options.token_env</code>).</p>
<form method="post" action="/"><input type="password" name="token" placeholder="admin token" autofocus>
<button>log in</button></form></body></html>"#;

pub async fn page(State(s): State<AdminState>) -> Html<String> {
    Html(PAGE.replacen(SLOT, &render(&s.status()), 1))
}

/// 401 with the login form (the token was missing or wrong).
pub fn login() -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, super::BEARER_CHALLENGE.clone())], Html(LOGIN))
        .into_response()
}

/// `?token=T` was right: keep it in a cookie and show the page without it in the address.
/// `secure`: the admin API is served over TLS, so the browser must never send the cookie over
/// plain HTTP (cookies are per host, not per port: the REST port would get it too).
pub fn logged_in(token: &str, secure: bool) -> Response {
    let secure = if secure { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
    (StatusCode::SEE_OTHER, [(header::SET_COOKIE, cookie), (header::LOCATION, "/".to_string())])
        .into_response()
}

/// The most of a login form's body read (`token=...`, urlencoded).
pub const LOGIN_MAX_BYTES: usize = 4096;

/// The token in the request's `sluice_admin_token` cookie, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The `token` query parameter of a URI's query, percent-decoded.
pub fn query_token(query: Option<&str>) -> Option<String> {
    let raw = query?.split('&').find_map(|kv| kv.strip_prefix("token="))?.replace('+', " ");
    percent_encoding::percent_decode_str(&raw).decode_utf8().ok().map(|t| t.into_owned())
}

/// What the page shows before its script runs: each application's table, without traffic.
fn render(status: &Status) -> String {
    let mut html = String::new();
    for (app, a) in &status.applications {
        let state = state_name(a.status);
        let _ = write!(html, "<h2>{} <span class=\"state {state}\">{state}</span></h2>", escape(app));
        html.push_str(
            "<table><tr><th>deployment</th><th>status</th><th>version</th><th>weight</th><th>replicas</th></tr>",
        );
        for (name, d) in &a.deployments {
            for v in &d.versions {
                let key = format!("{app}/{name}/{}", v.version);
                let _ = write!(
                    html,
                    "<tr data-key=\"{k}\"><td><b>{n}</b></td><td>{s}</td><td>{v}{c}</td><td class=\"num\" id=\"w:{k}\">{w}%</td><td class=\"num\">{r}/{t}</td></tr>",
                    k = escape(&key),
                    n = escape(name),
                    s = state_name(d.status),
                    v = escape(&v.version),
                    c = if v.canary { " (canary)" } else { "" },
                    w = v.weight,
                    r = v.ready_replicas,
                    t = v.replicas,
                );
            }
        }
        html.push_str("</table>");
    }
    html
}

/// A state's name as the API spells it (`DEPLOY_FAILED`): letters and `_` only.
fn state_name(state: impl serde::Serialize) -> String {
    serde_json::to_value(state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_cookie_and_the_query() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; sluice_admin_token=s3cret; b=2".parse().unwrap());
        assert_eq!(cookie_token(&h), Some("s3cret"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
        assert_eq!(query_token(Some("x=1&token=a%2Bb+c")).as_deref(), Some("a+b c"));
        assert_eq!(query_token(Some("x=1")), None);
        assert_eq!(query_token(None), None);
    }

    /// Over TLS the cookie is `Secure`: browsers keep cookies per host, not per port, and
    /// would send it in the clear to the host's plain-HTTP ports.
    #[test]
    fn the_login_cookie_is_secure_over_tls() {
        let cookie =
            |secure| logged_in("t", secure).headers()[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(cookie(true).ends_with("SameSite=Strict; Secure"), "{}", cookie(true));
        assert!(!cookie(false).contains("Secure"), "{}", cookie(false));
    }

    #[test]
    fn escapes_html() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
