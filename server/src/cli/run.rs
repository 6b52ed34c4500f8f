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
    /// Run on the Ray cluster whose dashboard is at this URL (`http://HEAD:8265`): Sluice
    /// submits itself as one Ray job and returns once its applications are healthy. Overrides
    /// `cluster.ray.address`.
    #[arg(long, env = "SLUICE_RAY_ADDRESS", value_parser = super::http_url)]
    pub ray: Option<String>,
    /// With --ray: the folder shipped to the cluster as the job's working dir (the config and
    /// the models it names must be inside). Default: the config file's folder.
    #[arg(long)]
    pub working_dir: Option<PathBuf>,
    /// Set by the Ray job's entrypoint: this process is the controller inside the job, talking
    /// to the Ray driver over stdin/stdout.
    #[arg(long, hide = true)]
    pub in_ray_job: bool,
    #[command(flatten)]
    pub ort: super::OrtArgs,
    /// With --ray and `admin_options.tls`: how to reach the job's admin API (last: the heading
    /// holds for the flags after it).
    #[command(flatten, next_help_heading = "With --ray and admin_options.tls")]
    pub admin_tls: super::admin::ClientTls,
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

    /// The overrides as flags, for the Ray job that runs this config again elsewhere (its
    /// entrypoint sees neither this command line nor this environment).
    pub fn override_flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for (flag, port) in [
            ("--http-port", self.http_port),
            ("--grpc-port", self.grpc_port),
            ("--admin-port", self.admin_port),
        ] {
            if let Some(p) = port {
                flags.extend([flag.to_string(), p.to_string()]);
            }
        }
        if let Some(h) = &self.host {
            flags.extend(["--host".to_string(), h.clone()]);
        }
        flags
    }
}

/// How a serving process logs and traces: `RUST_LOG`'s filter, and the config's `log_format`
/// and `tracing_options`.
pub struct Logs {
    pub filter: tracing_subscriber::EnvFilter,
    pub format: sluice_config::LogFormat,
    pub tracing: sluice_config::TracingOptions,
}

impl Logs {
    /// Text logs, no traces.
    pub fn plain(filter: tracing_subscriber::EnvFilter) -> Self {
        Self { filter, format: Default::default(), tracing: Default::default() }
    }
}

/// Serves `config` (overrides already applied); `ort_env` is `ORT_DYLIB_PATH`.
pub fn run(
    config: Config,
    logs: Logs,
    ort: super::OrtArgs,
    ort_env: Option<PathBuf>,
    options: StartOptions,
) -> ExitCode {
    run_with(config, logs, ort, ort_env, move || options, |_| {})
}

/// Checks again what the config check says of the listeners' hosts and ports: the command
/// line's overrides may have changed them since (`--grpc-port` onto the REST port would drop
/// `grpc_options.tls`). Prints every error (exit code 2), as for the file.
pub fn check_addresses(config: &Config) -> Result<(), ExitCode> {
    sluice_config::check_addresses(config).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "{} error(s) in {} with the ports and hosts of the command line (--http-port, --grpc-port, --host, SLUICE_*)",
            errors.0.len(),
            config.source.display()
        );
        ExitCode::from(2)
    })
}

/// Serves `config`, calling `on_ready` once every replica is warm, until Ctrl-C, SIGTERM or
/// (inside a Ray job) the Ray driver going away.
pub fn run_with(
    config: Config,
    logs: Logs,
    ort: super::OrtArgs,
    ort_env: Option<PathBuf>,
    options: impl FnOnce() -> StartOptions,
    on_ready: impl FnOnce(&sluice_server::Server),
) -> ExitCode {
    if let Err(code) = check_addresses(&config) {
        return code;
    }
    let release_memory = config.release_startup_memory;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // tokio reads TOKIO_WORKER_THREADS itself where the count is not set, and panics on a
    // value it cannot use (0, `abc`): read here, held to the config's bounds, and only where
    // `worker_threads` is not set (the key wins, whatever the variable holds).
    let from_env = match std::env::var("TOKIO_WORKER_THREADS").ok().filter(|v| !v.trim().is_empty()) {
        _ if config.worker_threads.is_some() => None,
        None => None,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=sluice_config::MAX_WORKER_THREADS).contains(&n) => Some(n),
            _ => {
                let most = sluice_config::MAX_WORKER_THREADS;
                eprintln!(
                    "error: TOKIO_WORKER_THREADS must be 1 to {most} (the runtime's threads), got `{v}`"
                );
                return ExitCode::from(2);
            }
        },
    };
    if let Some(n) = config.worker_threads.or(from_env) {
        builder.worker_threads(n as usize);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the trace exporter's connection needs it.
    let telemetry = {
        let _in_runtime = rt.enter();
        sluice_server::telemetry::init(logs.filter, logs.format, &logs.tracing)
    };
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Each listener may hold `max_connections` (the gRPC port may share REST's: counted anyway).
    let listeners = 1 + u64::from(config.grpc_options.enabled) + u64::from(config.admin_options.enabled);
    let wanted = (config.http_options.max_connections as u64).saturating_mul(listeners).saturating_add(64);
    if let Some(warning) = sluice_server::listen::raise_open_files(wanted) {
        tracing::warn!("{warning}");
    }
    match super::init_runtime(ort, ort_env) {
        Ok(lib) => {
            tracing::info!(
                "ONNX Runtime from {}; {} worker threads",
                lib.display(),
                rt.metrics().num_workers()
            )
        }
        Err(code) => return code,
    }
    let code = rt.block_on(async {
        // Listened for before anything starts: a signal while the server starts (its ports open
        // before it returns) stops it gracefully instead of killing the process.
        let mut signal = std::pin::pin!(shutdown_signal());
        // Made inside the runtime: a Ray cluster's bridge spawns tasks.
        let options = options();
        let cluster = options.cluster.clone();
        // A proxy is ready once it has the controller's table (its load waits for the first):
        // waiting for every replica in it kept a new node's proxy from starting while one
        // replica elsewhere was not ready, until the driver killed it for never listening.
        let proxy = options.follow.is_some();
        let starting = match sluice_server::bind(config, options).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        // A signal while the models load gives the load up (a large model can take minutes);
        // the listeners close as the runtime ends.
        let loaded = tokio::select! {
            loaded = starting.load() => loaded,
            () = &mut signal => {
                tracing::info!("stopped while the deployments loaded");
                return ExitCode::SUCCESS;
            }
        };
        let server = match loaded {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stop = async {
            match &cluster {
                sluice_controller::cluster::Cluster::Ray(ray) => tokio::select! {
                    () = signal => {}
                    () = ray.closed() => tracing::warn!("the Ray driver went away; shutting down"),
                },
                sluice_controller::cluster::Cluster::Local => signal.await,
            }
        };
        tokio::pin!(stop);
        // A signal while the models load, or while start-up memory is released, stops the
        // server there (the release and the LISTEN lines of a replica told to stop skipped).
        let stopped = tokio::select! {
            ready = async {
                proxy || server.wait_ready(std::time::Duration::from_secs(600)).await
            } => {
                let started = async {
                    if ready {
                        if release_memory {
                            release_startup_memory(&server).await;
                        }
                        tracing::info!("all deployments ready");
                        on_ready(&server);
                    }
                };
                tokio::select! {
                    () = started => false,
                    () = &mut stop => true,
                }
            }
            () = &mut stop => true,
        };
        if stopped {
            server.shutdown().await;
        } else {
            server.run_until(stop).await;
        }
        tracing::info!("stopped");
        ExitCode::SUCCESS
    });
    drop(telemetry);
    // A load given up on a signal may still run on a blocking thread (ONNX Runtime building a
    // session): the process does not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Pages out the code only starting ran and warms the deployments again (the config's
/// `release_startup_memory`), and says what it did.
async fn release_startup_memory(server: &sluice_server::Server) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    match server.release_startup_memory().await {
        Ok((p, warmed)) => tracing::info!(
            "released start-up memory: resident {:.1} MiB before, {:.1} MiB after ({} mappings paged out, {warmed} deployments warmed up again)",
            mib(p.before),
            mib(p.after),
            p.mappings
        ),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => tracing::debug!("start-up memory kept: {e}"),
        Err(e) => tracing::warn!("could not release start-up memory: {e}"),
    }
}

/// Signals this close to the first are one stop (a Ray job's stop sends two: see
/// `shutdown_signal`); a person's second Ctrl-C comes later.
const SAME_SIGNAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves on SIGTERM or SIGINT (Ctrl-C). Both are listened for from the call on, not from the
/// first poll: a signal that arrives before the future is awaited is not lost, nor left to its
/// default action (ending the process at once). A second signal after that ends the process at
/// once (exit 130), without waiting for `shutdown_delay_s` and the graceful drain; one within
/// [`SAME_SIGNAL`] of the first is taken as the same stop.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        [signal(SignalKind::terminate()), signal(SignalKind::interrupt())]
    };
    async move {
        #[cfg(unix)]
        {
            let [term, int] = signals;
            let (mut term, mut int) = (term.ok(), int.ok());
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = next(&mut term) => {},
                () = next(&mut int) => {},
            }
            tracing::info!("shutting down (a second signal ends the process at once)");
            let first = std::time::Instant::now();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = next(&mut term) => {},
                        () = next(&mut int) => {},
                    }
                    if first.elapsed() >= SAME_SIGNAL {
                        break;
                    }
                    // Ray's job stop signals the job's whole process tree, and the driver
                    // passes its own signal on too: both are the one stop, which drains.
                    tracing::info!(
                        "a second signal within {SAME_SIGNAL:?} of the first: taken as the same stop"
                    );
                }
                tracing::warn!("second signal: exiting now, without draining");
                std::process::exit(130);
            });
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::RunArgs;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    /// `sluice run --ray` passes the command line's overrides on to the job's `sluice run`.
    #[test]
    fn the_overrides_become_flags_again() {
        let cli = Cli::parse_from([
            "sluice",
            "app.yaml",
            "--http-port",
            "8100",
            "--host",
            "0.0.0.0",
            "--admin-port",
            "0",
        ]);
        assert_eq!(
            cli.run.override_flags(),
            ["--http-port", "8100", "--admin-port", "0", "--host", "0.0.0.0"]
        );
        assert!(Cli::parse_from(["sluice", "app.yaml"]).run.override_flags().is_empty());
    }
}
