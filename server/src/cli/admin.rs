//! The subcommands that talk to a running server's admin API: status, delete, rollout (and
//! the calls `deploy` makes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where the admin API is and how to authenticate.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The server's admin API (`HOST:PORT` alone is taken as `http://HOST:PORT`).
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADDRESS",
        default_value = "http://127.0.0.1:8265",
        value_parser = super::http_url
    )]
    pub address: String,
    /// Bearer token, when the server requires one. Checked once parsed, not by clap, whose
    /// refusal would print the value (a secret) in full.
    #[arg(long, global = true, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Give up on an admin API that does not answer a call within SECONDS (connecting takes
    /// at most 10 of them; 0: wait as long as it takes); `sluice deploy` waits its `--timeout`
    /// for the deploy itself.
    #[arg(
        long,
        global = true,
        value_name = "SECONDS",
        env = "SLUICE_REQUEST_TIMEOUT",
        default_value_t = 60.0,
        value_parser = super::seconds
    )]
    pub request_timeout: f64,
    #[command(flatten)]
    pub tls: ClientTls,
}

/// How a command reaches an https:// admin API: the CAs it trusts and the certificate it
/// presents. Global: they may follow a subcommand (`sluice rollout set iris 50 --cacert ca.pem`).
#[derive(clap::Args)]
pub struct ClientTls {
    /// PEM CA certificate(s) to trust for an admin API over https (the only ones trusted).
    #[arg(long, global = true, env = "SLUICE_CACERT")]
    pub cacert: Option<PathBuf>,
    /// PEM client certificate, for an admin API that requires one (with --key, or with the key
    /// in the same file).
    #[arg(long, global = true, env = "SLUICE_CLIENT_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, global = true, env = "SLUICE_CLIENT_KEY")]
    pub key: Option<PathBuf>,
}

impl AdminArgs {
    /// `--token` as the server reads its variable (trailing whitespace left out, see
    /// [`sluice_server::auth::admin_token`]); an error that does not repeat it.
    pub(super) fn bearer(&self) -> Result<Option<String>, String> {
        match &self.token {
            Some(t) => sluice_server::auth::check_token("given (--token or $SLUICE_ADMIN_TOKEN)", t),
            None => Ok(None),
        }
    }

    /// `--request-timeout`, None for 0 (no limit).
    pub(super) fn request_limit(&self) -> Option<std::time::Duration> {
        (self.request_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(self.request_timeout))
    }
}

impl ClientTls {
    /// `builder` trusting --cacert and presenting --cert, or why it cannot be made.
    pub(super) fn client(&self, mut builder: reqwest::ClientBuilder) -> Result<reqwest::Client, String> {
        use sluice_server::error::with_causes;
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        if let Some(ca) = &self.cacert {
            // Only these CAs, as curl's --cacert: not the system's too.
            builder = builder.tls_built_in_root_certs(false);
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
                .map_err(|e| format!("--cacert {}: {}", ca.display(), with_causes(&e)))?;
            // A DER file or a key holds no PEM certificate: nothing would be trusted.
            if certs.is_empty() {
                return Err(format!("--cacert {}: no PEM certificate in it", ca.display()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(key), None) = (&self.key, &self.cert) {
            return Err(format!(
                "--key {} without --cert: give the certificate it is the key of",
                key.display()
            ));
        }
        if let Some(cert) = &self.cert {
            let mut pem = read(cert)?;
            if let Some(key) = &self.key {
                // A certificate file without a final newline would put its END line and the
                // key's BEGIN line on one line, which no PEM reader takes.
                pem.push(b'\n');
                pem.extend(read(key)?);
            }
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                let what =
                    if self.key.is_some() { "with --key" } else { "(no --key: the key in the same file)" };
                format!("--cert {} {what}: {}", cert.display(), with_causes(&e))
            })?;
            builder = builder.identity(identity);
        }
        builder.build().map_err(|e| with_causes(&e))
    }
}

#[derive(clap::Subcommand)]
pub enum RolloutAction {
    /// Send WEIGHT percent of unpinned traffic to the canary (stops an automatic rollout).
    Set { model: String, weight: u32 },
    /// Make the canary the primary version; the old one drains and stops.
    Promote { model: String },
    /// Send the canary no more traffic.
    Rollback { model: String },
}

#[derive(clap::Subcommand)]
pub enum RepositoryAction {
    /// Scan the model repository now for new versions of MODEL (a training job wrote one),
    /// instead of at the next poll.
    Notify { model: String },
}

pub fn repository(action: &RepositoryAction, admin: &AdminArgs) -> ExitCode {
    match action {
        RepositoryAction::Notify { model } => {
            let Some(model) = segment(model, "model") else { return ExitCode::from(2) };
            call(admin, reqwest::Method::POST, &format!("/api/sluice/repository/{model}/notify"), None, None)
        }
    }
}

/// `sluice status`: Sluice's own status (`/api/sluice/status`), as a table or for machines.
pub fn status(admin: &AdminArgs, output: super::status::Output) -> ExitCode {
    let text = match request(admin, reqwest::Method::GET, "/api/sluice/status", None, None, None) {
        Ok(text) => text,
        Err(code) => return code,
    };
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let rendered = serde_json::from_str::<sluice_controller::Status>(&text)
        .map_err(|e| format!("the admin API answered something else than a status ({e}): {text}"))
        .and_then(|s| super::status::render(&s, output, now));
    match rendered {
        Ok(out) => {
            outln!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn delete(app: &str, admin: &AdminArgs) -> ExitCode {
    // Unchecked, an empty name would be `DELETE /api/serve/applications/`: delete them all.
    let Some(app) = segment(app, "application") else { return ExitCode::from(2) };
    call(admin, reqwest::Method::DELETE, &format!("/api/serve/applications/{app}"), None, None)
}

pub fn rollout(action: &RolloutAction, admin: &AdminArgs) -> ExitCode {
    let (model, action, body) = match action {
        RolloutAction::Set { model, weight } => (model, "canary", Some(format!("{{\"weight\": {weight}}}"))),
        RolloutAction::Promote { model } => (model, "promote", None),
        RolloutAction::Rollback { model } => (model, "rollback", None),
    };
    let Some(model) = segment(model, "model") else { return ExitCode::from(2) };
    call(admin, reqwest::Method::POST, &format!("/api/serve/deployments/{model}/{action}"), body, None)
}

/// `name` as one URL path segment ([`sluice_server::ray_jobs::segment`]), or None, with the
/// error printed, when it is empty or a dot segment (which URLs resolve away).
fn segment(name: &str, what: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." {
        eprintln!("error: `{name}` is not a valid {what} name");
        return None;
    }
    Some(sluice_server::ray_jobs::segment(name))
}

/// One admin API call; prints the JSON answer, exits non-zero on an error status.
fn call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
    base_dir: Option<String>,
) -> ExitCode {
    match request(admin, method, path, body, base_dir, None) {
        Ok(text) => {
            outln!("{}", pretty(text));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// JSON pretty-printed; anything else as it is.
pub(super) fn pretty(text: String) -> String {
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text)
}

/// One admin API call: the answer's body, or (printed) why there is none. It gives up after
/// `timeout`, else `--request-timeout`.
pub(super) fn request(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
    base_dir: Option<String>,
    timeout: Option<std::time::Duration>,
) -> Result<String, ExitCode> {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    let ten = std::time::Duration::from_secs(10);
    let builder = match timeout.or_else(|| admin.request_limit()) {
        Some(limit) => reqwest::Client::builder().connect_timeout(limit.min(ten)).timeout(limit),
        None => reqwest::Client::builder().connect_timeout(ten),
    };
    let client = match admin.tls.client(builder) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    let token = match admin.bearer() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(ExitCode::from(2));
        }
    };
    let url = format!("{}{path}", admin.address.trim_end_matches('/'));
    let result = rt.block_on(async {
        let mut req = client.request(method, &url);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = base_dir {
            // Percent-encoded: a header carries visible ASCII only (a folder named in another
            // script would otherwise reach the server unread).
            let escaped = percent_encoding::utf8_percent_encode(&b, sluice_server::admin::BASE_DIR_ESCAPED);
            req = req.header(sluice_server::admin::BASE_DIR_HEADER, escaped.to_string());
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        Ok::<_, reqwest::Error>((status, text))
    });
    match result {
        Ok((status, text)) if status.is_success() => Ok(text),
        Ok((status, text)) => {
            eprintln!("error ({status}): {}", pretty(text));
            Err(ExitCode::FAILURE)
        }
        // A call that took its whole time may still be under way there: a deploy goes on (its
        // models load and warm before the answer), as does a promotion.
        // (Not a connect that timed out: nothing was sent.)
        Err(e) if e.is_timeout() && !e.is_connect() => {
            let within = timeout
                .or_else(|| admin.request_limit())
                .map(|t| format!(" within {t:?}"))
                .unwrap_or_default();
            eprintln!(
                "error: no answer from the admin API at {url}{within}; what it was asked may still be under way there (`sluice status` shows it)"
            );
            Err(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!(
                "error: cannot reach the admin API at {url}: {}",
                sluice_server::error::with_causes(&e)
            );
            Err(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{ClientTls, RolloutAction};
    use crate::cli::{Cli, Command};

    /// --cacert, --cert and --key may follow a nested subcommand, as --address and --token do.
    #[test]
    fn the_tls_flags_may_follow_a_subcommand() {
        let cli = Cli::try_parse_from([
            "sluice", "rollout", "set", "iris", "50", "--cacert", "ca.pem", "--cert", "c.pem", "--key",
            "k.pem",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Rollout { action: RolloutAction::Set { model, weight }, admin } = cli.command else {
            panic!("not `rollout set`")
        };
        assert_eq!((model.as_str(), weight), ("iris", 50));
        let paths =
            [admin.tls.cacert, admin.tls.cert, admin.tls.key].map(|p| p.unwrap().display().to_string());
        assert_eq!(paths, ["ca.pem", "c.pem", "k.pem"]);
        assert!(Cli::try_parse_from(["sluice", "repository", "notify", "m", "--cacert", "ca.pem"]).is_ok());
    }

    /// A certificate file without a final newline still makes an identity with its key file.
    #[test]
    fn a_certificate_without_a_final_newline_pairs_with_its_key() {
        let dir = std::env::temp_dir().join(format!("sluice-cli-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["sluice-cli".to_string()]).unwrap().self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.join("client.pem"), dir.join("client.key"));
        std::fs::write(&cert_file, cert.pem().trim_end()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let tls = ClientTls { cacert: None, cert: Some(cert_file), key: Some(key_file) };
        let built = tls.client(reqwest::Client::builder());
        let _ = std::fs::remove_dir_all(&dir);
        built.unwrap();
    }
}
