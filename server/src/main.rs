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
    /// Check CONFIG and load each model once; print every error found and exit non-zero if any.
    Validate {
        config: PathBuf,
        #[command(flatten)]
        ort: OrtArgs,
    },
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
        Command::Run { config, http_port, grpc_port, admin_port, host, ort } => {
            run(&config, [http_port, grpc_port, admin_port], host, ort)
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
            if let Err(e) = sluice_deployments::onnx::OnnxBackend::load(&d.model.value, &options) {
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
