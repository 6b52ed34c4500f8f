//! `sluice run CONFIG`: serves until Ctrl-C or SIGTERM, then shuts down gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice_config::Config;
use sluice_server::StartOptions;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The YAML config file.
    pub config: PathBuf,
    /// REST port; overrides `http_options.port` (0 picks a free port).
    #[arg(long, env = "SLUICE_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// gRPC port; overrides `grpc_options.port` (0 picks a free port; the REST port shares one).
    #[arg(long, env = "SLUICE_GRPC_PORT")]
    pub grpc_port: Option<u16>,
    /// Admin API port; overrides `admin_options.port` (0 picks a free port).
    #[arg(long, env = "SLUICE_ADMIN_PORT")]
    pub admin_port: Option<u16>,
    /// REST and gRPC bind address; overrides `http_options.host` and `grpc_options.host`.
    #[arg(long, env = "SLUICE_HTTP_HOST")]
    pub host: Option<String>,
    #[command(flatten)]
    pub ort: super::OrtArgs,
}

impl RunArgs {
    /// The config with the command line's overrides applied.
    pub fn apply_overrides(&self, mut config: Config) -> Config {
        if let Some(p) = self.http_port {
            config.http_options.port = p;
        }
        if let Some(p) = self.grpc_port {
            config.grpc_options.port = p;
        }
        if let Some(p) = self.admin_port {
            config.admin_options.port = p;
        }
        if let Some(h) = &self.host {
            config.grpc_options.host = h.clone();
            config.http_options.host = h.clone();
        }
        config
    }
}

/// Serves `config` (overrides already applied); `ort_env` is `ORT_DYLIB_PATH`.
pub fn run(config: Config, ort: super::OrtArgs, ort_env: Option<PathBuf>, options: StartOptions) -> ExitCode {
    match super::init_runtime(ort, ort_env) {
        Ok(lib) => tracing::info!("ONNX Runtime from {}", lib.display()),
        Err(code) => return code,
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let server = match sluice_server::start(config, options).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            ready = server.wait_ready(std::time::Duration::from_secs(600)) => {
                if ready { tracing::info!("all deployments ready") }
                server.run_until(shutdown_signal()).await;
            }
            () = shutdown_signal() => server.shutdown().await,
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
