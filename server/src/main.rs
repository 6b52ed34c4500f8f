//! `sluice`: serve ONNX models over the Open Inference Protocol from a YAML config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Serve ONNX models over the Open Inference Protocol")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve every deployment in CONFIG until interrupted (Ctrl-C or SIGTERM).
    Run {
        /// The YAML config file.
        config: PathBuf,
        /// REST port; overrides `http_options.port` (0 picks a free port).
        #[arg(long, env = "SLUICE_HTTP_PORT")]
        http_port: Option<u16>,
        /// gRPC port; overrides `grpc_options.port` (0 picks a free port; the REST port shares one).
        #[arg(long, env = "SLUICE_GRPC_PORT")]
        grpc_port: Option<u16>,
        /// Admin API port; overrides `admin_options.port` (0 picks a free port).
        #[arg(long, env = "SLUICE_ADMIN_PORT")]
        admin_port: Option<u16>,
        /// REST and gRPC bind address; overrides `http_options.host` and `grpc_options.host`.
        #[arg(long, env = "SLUICE_HTTP_HOST")]
        host: Option<String>,
        #[command(flatten)]
        ort: OrtArgs,
    },
    /// Load-test an Open Inference Protocol server: runs `sluice-loadtest` (installed next to
    /// this binary) with the remaining arguments; `sluice loadtest --help` lists them.
    #[command(disable_help_flag = true)]
    Loadtest {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Deploy CONFIG to a running server (its admin API): declarative, like `serve deploy`.
    Deploy {
        config: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show applications, deployments, versions, replicas, traffic weights and recent events.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove an application from a running server.
    Delete {
        app: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a canary rollout: `set MODEL WEIGHT`, `promote MODEL`, `rollback MODEL`.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check CONFIG and load each model once; print every error found and exit non-zero if any.
    Validate {
        config: PathBuf,
        #[command(flatten)]
        ort: OrtArgs,
    },
}

#[derive(Subcommand)]
enum RolloutAction {
    /// Send WEIGHT percent of unpinned traffic to the canary (stops an automatic rollout).
    Set { model: String, weight: u32 },
    /// Make the canary the primary version; the old one drains and stops.
    Promote { model: String },
    /// Send the canary no more traffic.
    Rollback { model: String },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The server's admin API.
    #[arg(long, env = "SLUICE_ADDRESS", default_value = "http://127.0.0.1:8265")]
    address: String,
    /// Bearer token, when the server requires one.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(clap::Args)]
struct OrtArgs {
    /// ONNX Runtime shared library (libonnxruntime.so). Default: ORT_DYLIB_PATH, then the
    /// project's .ort/ folder made by scripts/install-onnxruntime.sh.
    #[arg(long, env = "SLUICE_ONNXRUNTIME")]
    onnxruntime: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config, ort } => validate(&config, ort),
        Command::Loadtest { args } => loadtest(&args),
        Command::Deploy { config, admin } => {
            let text = match std::fs::read_to_string(&config) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", config.display());
                    return ExitCode::FAILURE;
                }
            };
            let base = std::fs::canonicalize(&config)
                .ok()
                .and_then(|p| p.parent().map(|d| d.display().to_string()))
                .unwrap_or_default();
            admin_call(&admin, reqwest::Method::PUT, "/api/serve/applications", Some(text), Some(base))
        }
        Command::Status { admin } => {
            admin_call(&admin, reqwest::Method::GET, "/api/serve/applications", None, None)
        }
        Command::Delete { app, admin } => {
            admin_call(&admin, reqwest::Method::DELETE, &format!("/api/serve/applications/{app}"), None, None)
        }
        Command::Rollout { action, admin } => {
            let (path, body) = match action {
                RolloutAction::Set { model, weight } => (
                    format!("/api/serve/deployments/{model}/canary"),
                    Some(format!("{{\"weight\": {weight}}}")),
                ),
                RolloutAction::Promote { model } => (format!("/api/serve/deployments/{model}/promote"), None),
                RolloutAction::Rollback { model } => {
                    (format!("/api/serve/deployments/{model}/rollback"), None)
                }
            };
            admin_call(&admin, reqwest::Method::POST, &path, body, None)
        }
        Command::Run { config, http_port, grpc_port, admin_port, host, ort } => {
            run(&config, [http_port, grpc_port, admin_port], host, ort)
        }
    }
}

/// One admin API call; prints the JSON answer, exits non-zero on an error status.
fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
    base_dir: Option<String>,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("{}{path}", admin.address.trim_end_matches('/'));
    let result = rt.block_on(async {
        let mut req = reqwest::Client::new().request(method, &url);
        if let Some(t) = &admin.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = base_dir {
            req = req.header(sluice_server::admin::BASE_DIR_HEADER, b);
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
        Ok((status, text)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or(text);
            if status.is_success() {
                println!("{pretty}");
                ExitCode::SUCCESS
            } else {
                eprintln!("error ({status}): {pretty}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: cannot reach the admin API at {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn loadtest(args: &[String]) -> ExitCode {
    let exe = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("sluice-loadtest")));
    let Some(exe) = exe.filter(|p| p.is_file()) else {
        eprintln!(
            "error: sluice-loadtest is not installed next to sluice; build it with `cargo build --release -p sluice-loadtest`"
        );
        return ExitCode::FAILURE;
    };
    match std::process::Command::new(&exe).args(args).status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", exe.display());
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> Result<sluice_config::Config, ExitCode> {
    sluice_config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!("{} error(s) in {}", errors.0.len(), path.display());
        ExitCode::from(2)
    })
}

fn validate(path: &Path, ort: OrtArgs) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = sluice_server::runtime::init(ort.onnxruntime) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let mut failed = 0;
    for app in &config.applications {
        for d in &app.deployments {
            let options = sluice_deployments::onnx::OnnxOptions { intra_op_threads: 1 };
            let loaded = match &d.builtin {
                Some(b) => sluice_deployments::builtin::factory(b).and_then(|f| f()).map(|_| ()),
                None => sluice_deployments::onnx::OnnxBackend::load(&d.model.value, &options).map(|_| ()),
            };
            if let Err(e) = loaded {
                let loc = d.model.referenced;
                eprintln!("{}:{}:{}: {}: {e}", path.display(), loc.line(), loc.column(), d.name.value);
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} error(s) in {}", path.display());
        return ExitCode::from(2);
    }
    let n: usize = config.applications.iter().map(|a| a.deployments.len()).sum();
    println!("{}: ok ({} application(s), {n} deployment(s))", path.display(), config.applications.len());
    ExitCode::SUCCESS
}

/// `ports`: REST, gRPC and admin port overrides.
fn run(path: &Path, ports: [Option<u16>; 3], host: Option<String>, ort: OrtArgs) -> ExitCode {
    let [http_port, grpc_port, admin_port] = ports;
    let mut config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(p) = http_port {
        config.http_options.port = p;
    }
    if let Some(p) = grpc_port {
        config.grpc_options.port = p;
    }
    if let Some(p) = admin_port {
        config.admin_options.port = p;
    }
    if let Some(h) = host {
        config.grpc_options.host = h.clone();
        config.http_options.host = h;
    }
    match sluice_server::runtime::init(ort.onnxruntime) {
        Ok(lib) => tracing::info!("ONNX Runtime from {}", lib.display()),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let server = match sluice_server::start(config).await {
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
