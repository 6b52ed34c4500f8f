//! Admin API authentication: the bearer token is compared in constant time, and the admin API
//! is not exposed beyond loopback without a way to authenticate unless the config says so.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::HeaderValue;
use subtle::ConstantTimeEq;

use crate::StartError;

/// The admin token in the environment variable `var`: None when unset or empty. Trailing
/// whitespace is left out (a token written to a file, a Kubernetes secret made from one, ends
/// in a newline no client sends). A value that is not UTF-8, or holds a character a bearer
/// header or the status page's cookie cannot carry (whitespace, control characters, `"`, `,`,
/// `;`, `\`, beyond ASCII), is an error naming the variable: before, the first read as no
/// token at all and the others as a token no client could send.
pub fn admin_token(var: &str) -> Result<Option<String>, String> {
    os_token(var, std::env::var_os(var).as_deref())
}

/// [`admin_token`] of the variable's value, if set.
fn os_token(var: &str, value: Option<&std::ffi::OsStr>) -> Result<Option<String>, String> {
    let Some(value) = value else { return Ok(None) };
    let Some(value) = value.to_str() else {
        return Err(format!("the admin token in ${var} is not UTF-8"));
    };
    token_from(var, value)
}

/// [`admin_token`] of a value read.
pub fn token_from(var: &str, value: &str) -> Result<Option<String>, String> {
    check_token(&format!("in ${var}"), value)
}

/// [`token_from`] for a token that came from `whence` ("in $VAR", "given with --token"). The
/// error never holds the token itself, which ends up in logs.
pub fn check_token(whence: &str, value: &str) -> Result<Option<String>, String> {
    let token = value.trim_end();
    if token.is_empty() {
        return Ok(None);
    }
    // RFC 6265's cookie-octet, which is also what a header value may hold.
    let allowed =
        |c: char| matches!(c, '\x21' | '\x23'..='\x2b' | '\x2d'..='\x3a' | '\x3c'..='\x5b' | '\x5d'..='\x7e');
    match token.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(format!(
            "the admin token {whence} holds {c:?}, which a bearer header or cookie cannot carry: \
             use printable ASCII without whitespace, `\"`, `,`, `;` or `\\`"
        )),
        None => Ok(Some(token.to_string())),
    }
}

/// Whether an `Authorization` header carries `Bearer <token>`. The comparison takes the same
/// time wherever the first wrong byte is (only the length can show).
pub fn bearer_matches(header: Option<&HeaderValue>, token: &str) -> bool {
    bearer_bytes_match(header.map(HeaderValue::as_bytes), token)
}

/// [`bearer_matches`] over the header's bytes (a gRPC metadata value's too).
pub fn bearer_bytes_match(header: Option<&[u8]>, token: &str) -> bool {
    let Some(given) = header.and_then(|v| v.strip_prefix(b"Bearer ")) else {
        return false;
    };
    token_matches(given, token)
}

/// What a repository load or unload on an inference port answers without the admin token
/// (when one is set): these calls change what serves, as the admin API's do.
pub const CONTROL_NEEDS_TOKEN: &str =
    "loading and unloading repository models needs the admin token: send `Authorization: Bearer <token>`";

/// What a repository load or unload on an inference port reachable beyond loopback answers
/// when no admin token is set.
pub const CONTROL_CLOSED: &str = "loading and unloading repository models on a port reachable beyond loopback needs \
     the admin token (the variable admin_options.token_env names) or admin_options.allow_unauthenticated: true; \
     the admin API can do it too";

/// Who may load and unload repository models on an inference port (Triton's repository
/// calls, which change what serves as the admin API's do). The admin API's own rule
/// ([`check_admin_exposure`]) carried over: a token when one is set; else anyone on a loopback
/// port or with `allow_unauthenticated`; else no one (client certificates the admin API may
/// require are not asked for on the inference ports).
#[derive(Clone, Debug)]
pub enum Control {
    /// Callers that send the admin token.
    Token(Arc<str>),
    /// Anyone, by the host names `hosts` allows, as the admin API without a token
    /// ([`browser_refusal`]).
    Open { hosts: Hosts },
    /// No one.
    Closed,
}

/// The `Host` names a port that changes what serves answers. Without a token, a web page
/// whose own name resolves to the server's address (DNS rebinding) is same-origin to the
/// browser, and could use it by that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hosts {
    /// Any (a token is set: such a page cannot send it).
    Any,
    /// Loopback names only (no token, a loopback port).
    Loopback,
    /// A browser's calls (they carry `Origin` or `Sec-Fetch-*`) by an address or a loopback
    /// name only, other clients' by any name (no token, a port beyond loopback: a Ray job's
    /// admin API on the cluster network; a rebinding page always has a name).
    AddressesForBrowsers,
}

impl Hosts {
    /// The rule for a port without a token bound at `bound`.
    pub fn without_token(bound: SocketAddr) -> Self {
        if bound.ip().is_loopback() { Self::Loopback } else { Self::AddressesForBrowsers }
    }
}

/// Why [`Control::check`] refused a call.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No token, or the wrong one: 401, `UNAUTHENTICATED`.
    NeedsToken,
    /// Not on this port: 403, `PERMISSION_DENIED`.
    Closed,
}

impl Control {
    /// The rule for a port bound at `bound`.
    pub fn for_port(
        token: Option<&Arc<str>>,
        admin: &sluice_config::AdminOptions,
        bound: SocketAddr,
    ) -> Self {
        match token.filter(|t| !t.is_empty()) {
            Some(t) => Self::Token(t.clone()),
            None if bound.ip().is_loopback() || admin.allow_unauthenticated => {
                Self::Open { hosts: Hosts::without_token(bound) }
            }
            None => Self::Closed,
        }
    }

    /// Whether a call with this `Authorization` value may load or unload.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refused> {
        match self {
            Self::Open { .. } => Ok(()),
            Self::Closed => Err(Refused::Closed),
            Self::Token(t) if bearer_bytes_match(authorization, t) => Ok(()),
            Self::Token(_) => Err(Refused::NeedsToken),
        }
    }
}

/// What a web page could make a browser send to a port that changes what serves, refused (the
/// admin API's rule, and the inference ports' repository load and unload): a change from a
/// page of another origin (its `Origin` names another host than the request's, or, where a
/// browser sent no `Origin`, its `Sec-Fetch-Site` says another site or port: a form or a
/// `no-cors` `fetch` is sent without asking first), and a call by a host name `hosts` does not
/// allow (DNS rebinding). The refusal's message, for a 403.
pub fn browser_refusal(
    headers: &axum::http::HeaderMap,
    authority: Option<&str>,
    changes: bool,
    hosts: Hosts,
    what: &str,
) -> Option<String> {
    use axum::http::header;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).or(authority).unwrap_or("");
    let from_browser = [header::ORIGIN.as_str(), "sec-fetch-site", "sec-fetch-mode"]
        .iter()
        .any(|h| headers.contains_key(*h));
    match hosts {
        Hosts::Loopback if !host.is_empty() && !is_loopback_host(host) => {
            return Some(format!(
                "host `{host}` refused: without a token {what} answers only loopback names (localhost, 127.0.0.1, \
                 [::1]); set a token to reach it by another name"
            ));
        }
        Hosts::AddressesForBrowsers if from_browser && !host.is_empty() && !is_address_host(host) => {
            return Some(format!(
                "host `{host}` refused: without a token {what} answers a browser only by address or a loopback \
                 name (a page whose own name resolves here could use it); set a token to reach it by name"
            ));
        }
        _ => {}
    }
    if changes
        && !headers.contains_key(header::ORIGIN)
        && let Some(site) = headers.get("sec-fetch-site")
        && matches!(site.as_bytes(), b"cross-site" | b"same-site")
    {
        return Some(format!(
            "a call from another site or port (Sec-Fetch-Site: {}) is refused: {what} takes no cross-site requests",
            String::from_utf8_lossy(site.as_bytes())
        ));
    }
    if changes && let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        // Behind a reverse proxy that sends its upstream's address as `Host`, the name the
        // browser used comes as `X-Forwarded-Host` (a page of another site cannot set it: that
        // header would make the browser ask first, and no cross-site call is allowed).
        let forwarded = headers.get("x-forwarded-host").and_then(|h| h.to_str().ok());
        let same = origin.split_once("://").is_some_and(|(_, authority)| {
            authority.eq_ignore_ascii_case(host)
                || forwarded.is_some_and(|f| authority.eq_ignore_ascii_case(f.trim()))
        });
        if !same {
            return Some(format!(
                "a call from another origin (`{origin}`) is refused: {what} takes no cross-site requests"
            ));
        }
    }
    None
}

/// The name or address of a `Host` header, without its port or brackets.
fn host_name(host: &str) -> &str {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host
            .rsplit_once(':')
            .map_or(host, |(name, port)| if port.bytes().all(|b| b.is_ascii_digit()) { name } else { host }),
    };
    name.trim_end_matches('.')
}

/// Whether `host` (a `Host` header) is an IP address or a loopback name: what no other site's
/// page can be same-origin with.
fn is_address_host(host: &str) -> bool {
    is_loopback_host(host) || host_name(host).parse::<std::net::IpAddr>().is_ok()
}

/// Whether `host` (a `Host` header: a name or address, with or without a port) is loopback's.
pub fn is_loopback_host(host: &str) -> bool {
    let name = host_name(host);
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// Whether `given` is the token (the status page's cookie or login), in constant time as above.
pub fn token_matches(given: &[u8], token: &str) -> bool {
    given.ct_eq(token.as_bytes()).into()
}

/// Refuses an admin API bound beyond loopback with neither a token nor client certificates,
/// unless `allow_unauthenticated` is set.
pub fn check_admin_exposure(
    admin: &sluice_config::AdminOptions,
    token: Option<&str>,
    bound: SocketAddr,
) -> Result<(), StartError> {
    let has_token = token.is_some_and(|t| !t.is_empty());
    let has_client_certs = admin.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
    if bound.ip().is_loopback() || has_token || has_client_certs || admin.allow_unauthenticated {
        return Ok(());
    }
    Err(StartError::UnauthenticatedAdmin { addr: bound })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert!(bearer_matches(Some(&h("Bearer s3cret")), "s3cret"));
        for wrong in ["Bearer s3crex", "Bearer s3cret ", "Bearer s3cre", "bearer s3cret", "s3cret", "Bearer "]
        {
            assert!(!bearer_matches(Some(&h(wrong)), "s3cret"), "{wrong:?}");
        }
        assert!(!bearer_matches(None, "s3cret"));
    }

    /// A token read from a file keeps no trailing newline; one no header or cookie can carry,
    /// or not UTF-8, is an error naming its variable (not UTF-8, it read as no token at all).
    #[test]
    fn the_admin_token_is_read_as_a_client_can_send_it() {
        assert_eq!(token_from("T", "s3cret\n"), Ok(Some("s3cret".into())));
        assert_eq!(token_from("T", "  \n"), Ok(None));
        for bad in ["two words", "a;b", "caf\u{e9}", "tab\tin"] {
            let e = token_from("T", bad).unwrap_err();
            assert!(e.contains("$T"), "{bad:?}: {e}");
        }
        use std::os::unix::ffi::OsStrExt;
        let not_utf8 = std::ffi::OsStr::from_bytes(&[0xff, 0x41]);
        assert!(os_token("T", Some(not_utf8)).unwrap_err().contains("not UTF-8"));
        assert_eq!(os_token("T", None), Ok(None));
    }

    #[test]
    fn repository_control_on_an_inference_port_follows_the_admin_apis_rule() {
        let open: SocketAddr = "0.0.0.0:8000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let mut admin = sluice_config::AdminOptions::default();
        let token: Arc<str> = Arc::from("s3cret");
        let with_token = Control::for_port(Some(&token), &admin, open);
        assert_eq!(with_token.check(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(with_token.check(Some(b"Bearer nope")), Err(Refused::NeedsToken));
        assert_eq!(with_token.check(None), Err(Refused::NeedsToken));
        assert_eq!(Control::for_port(None, &admin, local).check(None), Ok(()));
        assert_eq!(Control::for_port(None, &admin, open).check(None), Err(Refused::Closed));
        let empty: Arc<str> = Arc::from("");
        assert_eq!(Control::for_port(Some(&empty), &admin, open).check(None), Err(Refused::Closed));
        admin.allow_unauthenticated = true;
        assert_eq!(Control::for_port(None, &admin, open).check(None), Ok(()));
    }

    #[test]
    fn beyond_loopback_the_admin_api_needs_a_way_to_authenticate() {
        let open: SocketAddr = "0.0.0.0:8265".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8265".parse().unwrap();
        let mut admin = sluice_config::AdminOptions::default();
        assert!(matches!(
            check_admin_exposure(&admin, None, open),
            Err(StartError::UnauthenticatedAdmin { .. })
        ));
        assert!(check_admin_exposure(&admin, Some(""), open).is_err(), "an empty token is no token");
        assert!(check_admin_exposure(&admin, None, local).is_ok());
        assert!(check_admin_exposure(&admin, Some("t"), open).is_ok());
        admin.allow_unauthenticated = true;
        assert!(check_admin_exposure(&admin, None, open).is_ok());
        admin.allow_unauthenticated = false;
        admin.tls = Some(sluice_config::TlsOptions {
            cert_file: "c".into(),
            key_file: "k".into(),
            client_ca_file: Some("ca".into()),
            reload_interval_s: 0.0,
        });
        assert!(check_admin_exposure(&admin, None, open).is_ok());
    }
}
