//! TLS for a listener (rustls with the ring provider): the certificate chain, its key and
//! optionally the CAs whose client certificates are accepted, read from PEM files, offering
//! HTTP/2 and HTTP/1.1 by ALPN. The files are checked every `reload_interval_s` and loaded
//! again when one changed, for new connections; a set of files that fails to load (say, a
//! certificate written before its key) keeps the previous configuration until it loads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use sluice_config::TlsOptions;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read `{}`: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("`{}` holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("`{}` is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("`{}` is not valid PEM: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("client CA certificates in `{}`: {message}", path.display())]
    ClientCa { path: PathBuf, message: String },
    #[error("certificate `{}` with key `{}`: {source}", cert.display(), key.display())]
    Config { cert: PathBuf, key: PathBuf, source: rustls::Error },
}

/// A listener's TLS configuration, swapped whole when its files change.
pub struct TlsConfig {
    options: TlsOptions,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' (modification time, length) when they were last loaded.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl TlsConfig {
    /// Loads the files once (failing with a message naming the file) and, when
    /// `reload_interval_s` is above 0, checks them for changes until `stop` turns true.
    pub fn start(options: &TlsOptions, stop: watch::Receiver<bool>) -> Result<Arc<Self>, TlsError> {
        let stamps = stamps(options);
        let config = Arc::new(build(options)?);
        let tls = Arc::new(Self {
            options: options.clone(),
            current: RwLock::new(config),
            stamps: Mutex::new(stamps),
        });
        if options.reload_interval_s > 0.0 {
            tokio::spawn(watch_files(
                Arc::downgrade(&tls),
                Duration::from_secs_f64(options.reload_interval_s),
                stop,
            ));
        }
        Ok(tls)
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(PoisonError::into_inner).clone())
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.options.client_ca_file.is_some()
    }

    /// Loads the files again if one changed since they were last loaded; true when the new
    /// configuration is in force.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.options);
        let mut last = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == now {
            return Ok(false);
        }
        let config = build(&self.options)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        *last = now;
        Ok(true)
    }
}

async fn watch_files(tls: std::sync::Weak<TlsConfig>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        tokio::select! {
            () = crate::listen::stopped(&mut stop) => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(tls) = tls.upgrade() else { return };
        match tls.reload_if_changed() {
            Ok(reloaded) => {
                if reloaded {
                    tracing::info!("TLS certificate `{}` reloaded", tls.options.cert_file.display());
                }
                failing = false;
            }
            // Logged once per failing spell (it is retried at every check), not every time.
            Err(e) => {
                if !failing {
                    tracing::error!(
                        "TLS files changed but cannot be loaded (keeping the previous ones): {e}"
                    );
                }
                failing = true;
            }
        }
    }
}

fn stamps(options: &TlsOptions) -> Vec<Option<(SystemTime, u64)>> {
    options
        .files()
        .into_iter()
        .map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_path_buf(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The rustls server configuration the options describe.
fn build(options: &TlsOptions) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates(&options.cert_file)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&options.key_file)?)
        .map_err(|e| TlsError::Key { path: options.key_file.clone(), message: e.to_string() })?;
    let config_error =
        |source| TlsError::Config { cert: options.cert_file.clone(), key: options.key_file.clone(), source };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_error)?;
    let builder = match &options.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let ca_error = |message: String| TlsError::ClientCa { path: path.clone(), message };
            let mut roots = RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ca_error(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_error)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
