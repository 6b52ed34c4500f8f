//! TLS on REST, gRPC and the admin API, with certificates made here (rcgen): HTTP/2 by ALPN,
//! client certificates for the admin API, certificates reloaded when their files change, and
//! starts refused with a clear error for unusable files or an unauthenticated, exposed admin API.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

/// A CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names` and its key, both PEM.
    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// A fresh folder for one test's files.
fn folder(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    std::fs::write(dir.join(name), text).unwrap();
    dir.join(name).display().to_string()
}

async fn start_with(
    text: &str,
    token: Option<&str>,
) -> Result<sluice_server::Server, sluice_server::StartError> {
    sluice_server::runtime::init(None, None).expect("ONNX Runtime");
    let config = sluice_config::parse(text, &models_dir().join("t.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let options =
        sluice_server::StartOptions { admin_token: token.map(str::to_string), ..Default::default() };
    sluice_server::start(config, options).await
}

fn client(ca: &Ca) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .pool_max_idle_per_host(0)
}

#[tokio::test]
async fn rest_and_admin_serve_tls_with_http2_by_alpn_and_admin_requires_a_client_certificate() {
    let dir = folder("serve");
    let ca = Ca::new("test CA");
    let (cert, key) = ca.sign(&["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = ca.sign(&["sluice-cli"]);
    let (cert, key, ca_file) =
        (write(&dir, "cert.pem", &cert), write(&dir, "key.pem", &key), write(&dir, "ca.pem", &ca.pem()));
    let tls = format!("{{cert_file: {cert}, key_file: {key}}}");
    let s = start_with(
        &format!(
            "http_options: {{port: 0, tls: {tls}}}\ngrpc_options: {{port: 0, tls: {tls}}}\n\
             admin_options: {{port: 0, tls: {{cert_file: {cert}, key_file: {key}, client_ca_file: {ca_file}}}}}\n\
             applications:\n  - name: t\n    deployments:\n      - {{name: iris, model: iris/model.onnx}}\n"
        ),
        None,
    )
    .await
    .unwrap();
    assert!(s.wait_ready(Duration::from_secs(60)).await);
    let https = |addr: std::net::SocketAddr, path: &str| format!("https://{addr}{path}");

    let h2 = client(&ca).build().unwrap();
    let r = h2.get(https(s.http_addr(), "/v2/health/ready")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.version()), (200, reqwest::Version::HTTP_2), "h2 by ALPN");
    let body = json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]});
    let r =
        h2.post(https(s.http_addr(), "/v2/models/iris/infer")).body(body.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h1 = client(&ca).http1_only().build().unwrap();
    let r = h1.get(https(s.http_addr(), "/v2/health/live")).send().await.unwrap();
    assert_eq!((r.status().as_u16(), r.version()), (200, reqwest::Version::HTTP_11));
    assert!(reqwest::get(format!("http://{}/v2/health/live", s.http_addr())).await.is_err(), "no plain HTTP");
    // The gRPC port speaks TLS and HTTP/2 too (tritonclient's side is in tests/python).
    let r = h2.get(https(s.grpc_addr().unwrap(), "/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);

    let admin = s.admin_addr().unwrap();
    assert!(h2.get(https(admin, "/-/healthz")).send().await.is_err(), "no client certificate, no handshake");
    let identity = reqwest::Identity::from_pem(format!("{client_cert}{client_key}").as_bytes()).unwrap();
    let with_cert = client(&ca).identity(identity).build().unwrap();
    let r = with_cert.get(https(admin, "/-/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let stranger = Ca::new("someone else");
    let (other_cert, other_key) = stranger.sign(&["intruder"]);
    let identity = reqwest::Identity::from_pem(format!("{other_cert}{other_key}").as_bytes()).unwrap();
    let wrong = client(&ca).identity(identity).build().unwrap();
    assert!(wrong.get(https(admin, "/-/healthz")).send().await.is_err(), "a certificate of another CA");

    // The CLI talks to it with --cacert, --cert and --key.
    let (client_cert, client_key) =
        (write(&dir, "client.pem", &client_cert), write(&dir, "client.key", &client_key));
    let cli = |with_cert: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(["status", "-o", "json", "--address", &format!("https://{admin}"), "--cacert", &ca_file]);
        if with_cert {
            cmd.args(["--cert", &client_cert, "--key", &client_key]);
        }
        cmd.env_remove("SLUICE_ADMIN_TOKEN");
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let out = cli(true).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("applications"));
    let out = cli(false).await.unwrap();
    assert!(!out.status.success(), "no client certificate");
    s.shutdown().await;
}

#[tokio::test]
async fn a_certificate_changed_on_disk_is_served_to_new_connections() {
    let dir = folder("reload");
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (cert, key) = old_ca.sign(&["127.0.0.1"]);
    let (cert_file, key_file) = (write(&dir, "cert.pem", &cert), write(&dir, "key.pem", &key));
    let s = start_with(
        &format!(
            "http_options: {{port: 0, tls: {{cert_file: {cert_file}, key_file: {key_file}, reload_interval_s: 0.1}}}}\n\
             grpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\n"
        ),
        None,
    )
    .await
    .unwrap();
    let ready = format!("https://{}/v2/health/live", s.http_addr());
    let (trusts_old, trusts_new) = (client(&old_ca).build().unwrap(), client(&new_ca).build().unwrap());
    assert_eq!(trusts_old.get(&ready).send().await.unwrap().status(), 200);
    assert!(trusts_new.get(&ready).send().await.is_err());
    let (cert, key) = new_ca.sign(&["127.0.0.1"]);
    write(&dir, "key.pem", &key);
    write(&dir, "cert.pem", &cert);
    // Picked up at the next check; wait for it (bounded), then the old chain is gone.
    let mut tries = 0;
    while trusts_new.get(&ready).send().await.is_err() {
        tries += 1;
        assert!(tries < 600, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(trusts_old.get(&ready).send().await.is_err());
    s.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_files_and_an_exposed_unauthenticated_admin_api_refuse_to_start() {
    let dir = folder("refuse");
    let bad = write(&dir, "bad.pem", "not a certificate\n");
    let (_, key) = Ca::new("ca").sign(&["x"]);
    let key = write(&dir, "key.pem", &key);
    // No fixed port (the admin API's default, 8265, is a Ray dashboard's on a shared machine):
    // the certificate is what refuses the start.
    let err = start_with(
        &format!(
            "http_options: {{port: 0, tls: {{cert_file: {bad}, key_file: {key}}}}}\n\
             grpc_options: {{enabled: false}}\nadmin_options: {{port: 0}}\n"
        ),
        None,
    )
    .await
    .err()
    .expect("a file without a certificate");
    assert!(err.to_string().contains("bad.pem` holds no PEM certificate"), "{err}");

    let exposed =
        "http_options: {port: 0}\ngrpc_options: {enabled: false}\nadmin_options: {host: 0.0.0.0, port: 0}\n";
    let err = start_with(exposed, None).await.err().expect("an open admin API");
    assert!(matches!(err, sluice_server::StartError::UnauthenticatedAdmin { .. }), "{err}");
    assert!(err.to_string().contains("allow_unauthenticated"), "{err}");
    start_with(exposed, Some("s3cret")).await.expect("with a token").shutdown().await;
    let allowed = exposed.replace("admin_options: {", "admin_options: {allow_unauthenticated: true, ");
    start_with(&allowed, None).await.expect("when the config allows it").shutdown().await;
}

/// `sluice job` (and `sluice run --ray`, the same client) reaches a Ray dashboard served over
/// https whose CA the system trusts (here through `SSL_CERT_FILE`, which the system's store
/// honours); it carried no root certificates at all, so every https dashboard failed.
#[test]
fn sluice_job_trusts_the_systems_roots_for_an_https_dashboard() {
    use std::io::BufRead;
    let dir = folder("dashboard");
    let ca = Ca::new("dashboard CA");
    let (cert, key) = ca.sign(&["localhost", "127.0.0.1"]);
    let (cert, key, ca_file) =
        (write(&dir, "cert.pem", &cert), write(&dir, "key.pem", &key), write(&dir, "ca.pem", &ca.pem()));
    // A stand-in for Ray's Jobs API over https: an empty job list.
    let script = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ray_version": "2.60.0"} if self.path == "/api/version" else []).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    let mut dashboard = std::process::Command::new("python3")
        .args(["-c", script, &cert, &key])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut port = String::new();
    std::io::BufReader::new(dashboard.stdout.take().unwrap()).read_line(&mut port).unwrap();
    let url = format!("https://127.0.0.1:{}", port.trim());
    let list = |ca: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["job", "list", "--ray", &url])
            .env("SSL_CERT_FILE", ca)
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap()
    };
    let trusted = list(&ca_file);
    let other_ca = write(&dir, "other.pem", &Ca::new("another CA").pem());
    let stranger = list(&other_ca);
    // The admin CLI's --cacert trusts that CA only, as curl's does: not the system's too.
    let only = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "--address", &url, "--cacert", &other_ca])
        .env("SSL_CERT_FILE", &ca_file)
        .output()
        .unwrap();
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    let (out, err) = (String::from_utf8_lossy(&trusted.stdout), String::from_utf8_lossy(&trusted.stderr));
    assert!(trusted.status.success(), "{out}\n{err}");
    assert!(out.starts_with("ID "), "{out}");
    let err = String::from_utf8_lossy(&stranger.stderr);
    assert!(!stranger.status.success() && err.contains(&url), "a CA the system does not trust: {err}");
    let err = String::from_utf8_lossy(&only.stderr);
    assert!(!only.status.success() && err.contains("cannot reach the admin API"), "--cacert alone: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}
