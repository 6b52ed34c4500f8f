//! TLS and connection settings of the listeners (`http_options.tls`, `grpc_options.tls`,
//! `admin_options.tls`, and the connection limits in `http_options`), and their checks.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::types::{AdminOptions, GrpcOptions, HttpOptions};

/// The most connections a listener may hold open (a semaphore of that many permits is made
/// at start; a value past the runtime's own limit killed every listener after "listening").
pub const MAX_CONNECTIONS: usize = 1 << 24;

/// TLS on one listener. Paths are relative to the config file (absolute once resolved).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM certificate chain, the server's own certificate first.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates. When set, every client must present a certificate signed by one of
    /// them (mutual TLS); the handshake fails otherwise. Default none.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Seconds between checks of the files' modification times; changed files are loaded for
    /// new connections (a file that fails to load keeps the previous one). 0: never. Default 10.
    #[serde(default = "TlsOptions::default_reload_interval_s")]
    pub reload_interval_s: f64,
}

impl TlsOptions {
    pub const DEFAULT_RELOAD_INTERVAL_S: f64 = 10.0;

    fn default_reload_interval_s() -> f64 {
        Self::DEFAULT_RELOAD_INTERVAL_S
    }

    /// Every file this TLS setting reads.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files
    }
}

/// The shortest `reload_interval_s` other than 0 (never).
const MIN_RELOAD_INTERVAL_S: f64 = 0.1;

/// One problem: (field, message).
type Problem = (String, String);

/// Checks the listeners' connection limits, TLS files and (with `addresses`) hosts and ports,
/// and makes TLS paths absolute against `base` (the config file's folder).
pub(crate) fn check_listeners(
    http: &mut HttpOptions,
    grpc: &mut GrpcOptions,
    admin: &mut AdminOptions,
    base: &Path,
    addresses: bool,
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut positive = |field: &str, value: f64| {
        if !(value > 0.0 && value <= crate::MAX_SECONDS) {
            let message = format!("must be more than 0 seconds, at most {:e}", crate::MAX_SECONDS);
            problems.push((format!("http_options.{field}"), message));
        }
    };
    positive("header_read_timeout_s", http.header_read_timeout_s);
    positive("body_read_timeout_s", http.body_read_timeout_s);
    positive("body_total_timeout_s", http.body_total_timeout_s);
    positive("write_timeout_s", http.write_timeout_s);
    if !(0.0..=crate::MAX_SECONDS).contains(&http.idle_timeout_s) {
        let message = format!("must be 0 (never) to {:e} seconds", crate::MAX_SECONDS);
        problems.push(("http_options.idle_timeout_s".into(), message));
    }
    if !(1..=MAX_CONNECTIONS).contains(&http.max_connections) {
        let message = format!("must be 1 to {MAX_CONNECTIONS}");
        problems.push(("http_options.max_connections".into(), message));
    }
    if !(1..=crate::types::MAX_STREAM_IN_FLIGHT).contains(&grpc.stream_max_in_flight) {
        let message = format!("must be 1 to {}", crate::types::MAX_STREAM_IN_FLIGHT);
        problems.push(("grpc_options.stream_max_in_flight".into(), message));
    }
    if addresses {
        problems.extend(check_addresses(http, grpc, admin));
    }
    for (name, tls) in
        [("http_options", &mut http.tls), ("grpc_options", &mut grpc.tls), ("admin_options", &mut admin.tls)]
    {
        if let Some(tls) = tls {
            check_tls(name, tls, base, &mut problems);
        }
    }
    problems
}

/// Whether gRPC is served on the REST listener: enabled, on the same host and a fixed port.
fn grpc_shares_rest_port(http: &HttpOptions, grpc: &GrpcOptions) -> bool {
    grpc.enabled && grpc.port == http.port && grpc.host == http.host && http.port != 0
}

/// The listener checks that hang on their hosts and ports alone: run again by
/// [`crate::check_addresses`] once the command line changed them.
fn check_addresses(http: &HttpOptions, grpc: &GrpcOptions, admin: &AdminOptions) -> Vec<Problem> {
    let mut problems = Vec::new();
    if grpc_shares_rest_port(http, grpc) && grpc.tls.is_some() {
        problems.push((
            "grpc_options.tls".into(),
            "gRPC shares the REST port here, so `http_options.tls` serves both; remove this one".into(),
        ));
    }
    // Two listeners on one port that cannot both bind it: a config error, not a bind error
    // at start (gRPC on the REST port and host is one listener, on purpose).
    let rest = ("http_options", http.host.as_str(), http.port);
    let mut others = Vec::new();
    if grpc.enabled && !grpc_shares_rest_port(http, grpc) {
        others.push(("grpc_options", grpc.host.as_str(), grpc.port));
    }
    if admin.enabled {
        others.push(("admin_options", admin.host.as_str(), admin.port));
    }
    for (i, &(field, host, port)) in others.iter().enumerate() {
        for &(taken_by, taken_host, taken_port) in std::iter::once(&rest).chain(&others[..i]) {
            if clash((host, port), (taken_host, taken_port)) {
                problems.push((
                    format!("{field}.port"),
                    format!("{host}:{port} is {taken_by}'s ({taken_host}:{taken_port}); give each listener its own port"),
                ));
            }
        }
    }
    problems
}

/// Whether two listeners cannot both bind: one port (not 0, a free one each), on one host or
/// where either is every address.
fn clash(a: (&str, u16), b: (&str, u16)) -> bool {
    let every = |h: &str| matches!(h, "0.0.0.0" | "::" | "[::]");
    a.1 != 0 && a.1 == b.1 && (a.0 == b.0 || every(a.0) || every(b.0))
}

/// [`check_addresses`] as the config's errors, naming its file.
pub(crate) fn address_errors(config: &crate::Config) -> Vec<crate::ConfigError> {
    check_addresses(&config.http_options, &config.grpc_options, &config.admin_options)
        .into_iter()
        .map(|(field, message)| crate::ConfigError {
            field,
            message,
            ..crate::ConfigError::file(&config.source, "")
        })
        .collect()
}

fn check_tls(owner: &str, tls: &mut TlsOptions, base: &Path, problems: &mut Vec<Problem>) {
    let mut resolve = |field: &str, path: &mut PathBuf| {
        *path = base.join(&*path);
        if !path.is_file() {
            problems.push((format!("{owner}.tls.{field}"), format!("file `{}` not found", path.display())));
        }
    };
    resolve("cert_file", &mut tls.cert_file);
    resolve("key_file", &mut tls.key_file);
    if let Some(ca) = &mut tls.client_ca_file {
        resolve("client_ca_file", ca);
    }
    // A shorter interval only makes the watcher spin on the files' metadata.
    let r = tls.reload_interval_s;
    if !(r == 0.0 || (MIN_RELOAD_INTERVAL_S..=crate::MAX_SECONDS).contains(&r)) {
        problems.push((
            format!("{owner}.tls.reload_interval_s"),
            format!("must be 0 (never) or {MIN_RELOAD_INTERVAL_S} to 1e9 seconds"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use crate::{ConfigErrors, parse};

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sluice-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["cert.pem", "key.pem", "ca.pem"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        dir
    }

    fn parse_in(text: &str) -> Result<crate::Config, ConfigErrors> {
        parse(text, &dir().join("app.yaml"))
    }

    #[test]
    fn connection_limits_have_defaults_and_tls_is_off() {
        let c = parse_in("{}").unwrap();
        assert_eq!(c.http_options.header_read_timeout_s, 30.0);
        assert_eq!(c.http_options.body_read_timeout_s, 30.0);
        assert_eq!(c.http_options.max_connections, 4096);
        assert!(
            c.http_options.tls.is_none() && c.grpc_options.tls.is_none() && c.admin_options.tls.is_none()
        );
        assert!(!c.admin_options.allow_unauthenticated);
    }

    #[test]
    fn tls_paths_resolve_against_the_config_file() {
        let c = parse_in(
            "http_options: {tls: {cert_file: cert.pem, key_file: key.pem}}\n\
             admin_options: {allow_unauthenticated: true, tls: {cert_file: cert.pem, key_file: key.pem, client_ca_file: ca.pem, reload_interval_s: 0}}\n",
        )
        .unwrap();
        let tls = c.http_options.tls.unwrap();
        assert_eq!(tls.cert_file, dir().join("cert.pem"));
        assert_eq!(tls.reload_interval_s, 10.0);
        let admin = c.admin_options.tls.unwrap();
        assert_eq!(admin.client_ca_file, Some(dir().join("ca.pem")));
        assert_eq!(admin.reload_interval_s, 0.0);
        assert!(c.admin_options.allow_unauthenticated);
    }

    #[test]
    fn bad_listener_values_are_each_reported() {
        let errors = parse_in(
            "http_options: {port: 9000, header_read_timeout_s: 0, body_read_timeout_s: 1e20, body_total_timeout_s: -3, write_timeout_s: 0, idle_timeout_s: -1, max_connections: 0}\n\
             grpc_options: {port: 9000, tls: {cert_file: cert.pem, key_file: key.pem}, stream_max_in_flight: 0}\n\
             admin_options: {tls: {cert_file: nope.pem, key_file: key.pem, reload_interval_s: 0.000001}}\n",
        )
        .unwrap_err();
        let text = errors.to_string();
        for want in [
            "http_options.header_read_timeout_s: must be more than 0 seconds, at most 1e9",
            "http_options.body_read_timeout_s: must be more than 0 seconds",
            "http_options.body_total_timeout_s: must be more than 0 seconds",
            "http_options.write_timeout_s: must be more than 0 seconds",
            "http_options.idle_timeout_s: must be 0 (never) to 1e9 seconds",
            "http_options.max_connections: must be 1 to 16777216",
            "grpc_options.tls: gRPC shares the REST port here",
            "grpc_options.stream_max_in_flight: must be 1 to 65536",
            "admin_options.tls.cert_file: file `",
            "admin_options.tls.reload_interval_s: must be 0 (never) or 0.1 to 1e9 seconds",
        ] {
            assert!(text.contains(want), "want {want:?} in:\n{text}");
        }
    }

    /// A port changed after the file was checked (`sluice run --grpc-port`) is checked again.
    #[test]
    fn addresses_are_checked_again_after_a_change() {
        let mut c = parse_in(
            "http_options: {port: 9000}\ngrpc_options: {port: 9001, tls: {cert_file: cert.pem, key_file: key.pem}}\n",
        )
        .unwrap();
        assert!(crate::check_addresses(&c).is_ok());
        c.grpc_options.port = 9000;
        let text = crate::check_addresses(&c).unwrap_err().to_string();
        assert!(
            text.starts_with(&format!("{}: grpc_options.tls: gRPC shares the REST port", c.source.display())),
            "{text}"
        );
        c.grpc_options.host = "127.0.0.2".into();
        assert!(crate::check_addresses(&c).is_ok(), "another host is another listener");
        // Every address overlaps the REST host's: not one listener, and not two that bind.
        c.grpc_options.host = "0.0.0.0".into();
        c.grpc_options.tls = None;
        let text = crate::check_addresses(&c).unwrap_err().to_string();
        assert!(
            text.contains("grpc_options.port: 0.0.0.0:9000 is http_options's (127.0.0.1:9000)"),
            "{text}"
        );
        // The admin API on the REST port (a command-line override), or on gRPC's.
        c.grpc_options.host = "127.0.0.1".into();
        c.grpc_options.port = 9001;
        c.admin_options.port = 9000;
        let text = crate::check_addresses(&c).unwrap_err().to_string();
        assert!(text.contains("admin_options.port: 127.0.0.1:9000 is http_options's"), "{text}");
        c.admin_options.port = 9001;
        let text = crate::check_addresses(&c).unwrap_err().to_string();
        assert!(text.contains("admin_options.port: 127.0.0.1:9001 is grpc_options's"), "{text}");
        c.admin_options.enabled = false;
        assert!(crate::check_addresses(&c).is_ok(), "no admin API, no clash");
    }

    /// A clash of listeners in the file is an error where the file is all there is (`load`,
    /// `parse`), not where flags may move a listener after (`load_before_overrides`) or where a
    /// running server keeps its own listeners (`parse_to_deploy`).
    #[test]
    fn a_listener_clash_is_checked_only_where_nothing_moves_it_after() {
        let text = "http_options: {port: 9100}\nadmin_options: {port: 9100}\n";
        let path = std::env::temp_dir().join(format!("clash-{}.yaml", std::process::id()));
        assert!(crate::parse(text, &path).unwrap_err().to_string().contains("admin_options.port"));
        let c = crate::parse_to_deploy(text, &path).unwrap();
        assert!(crate::check_addresses(&c).is_err());
        std::fs::write(&path, text).unwrap();
        assert!(crate::load(&path).is_err());
        assert!(crate::load_before_overrides(&path).is_ok());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_tls_block_needs_both_files() {
        let errors = parse_in("http_options: {tls: {cert_file: cert.pem}}\n").unwrap_err();
        assert!(errors.to_string().contains("key_file"), "{errors}");
    }
}
