//! `sluice replica`: serves one replica of one deployment version (its own batcher and ONNX
//! Runtime session) on an internal gRPC address, for a controller elsewhere (a Ray actor starts
//! it on its node). Prints `LISTEN <host:port>` on stdout once warm; runs until SIGTERM, then
//! finishes what it holds.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice_config::{Application, Config, Deployment, Location, Scaling};
use sluice_controller::cluster::ReplicaSpec;
use sluice_server::StartOptions;

#[derive(clap::Args)]
pub struct ReplicaArgs {
    /// What to serve: a JSON `ReplicaSpec` (deployment, version, model, settings), as the
    /// controller writes it. Given more than once, the pieces are joined in order (the
    /// controller splits a spec longer than one argument may be).
    #[arg(long, required = true, action = clap::ArgAction::Append)]
    pub spec: Vec<String>,
    /// Address for the gRPC endpoint, `HOST:PORT` (port 0: any free port).
    #[arg(long)]
    pub listen: String,
    /// The largest gRPC message taken, in bytes (the server's `http_options.max_body_bytes`).
    #[arg(long, default_value_t = sluice_config::HttpOptions::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// How long the replica finishes its requests once told to stop (the server's
    /// `graceful_shutdown_timeout_s`).
    #[arg(long, value_name = "SECONDS", value_parser = super::seconds)]
    pub graceful_shutdown_timeout: Option<f64>,
    #[command(flatten)]
    pub process: super::ProcessArgs,
    #[command(flatten)]
    pub ort: super::OrtArgs,
}

pub fn replica(
    args: ReplicaArgs,
    logs: super::run::Logs,
    ort_env: Option<PathBuf>,
    store_env: &sluice_controller::StoreEnv,
) -> ExitCode {
    let mut spec: ReplicaSpec = match serde_json::from_str(&args.spec.concat()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: --spec is not a replica spec: {e}");
            return ExitCode::from(2);
        }
    };
    // A version of an object-storage repository: into this node's cache first.
    if let Some(origin) = &spec.fetch {
        let fetched = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(origin.fetch(store_env)).map_err(|e| e.to_string()));
        match fetched {
            Ok(path) => spec.model = sluice_config::Model::Onnx(path),
            Err(e) => {
                eprintln!("error: fetching version {} of `{}`: {e}", origin.version, origin.model);
                return ExitCode::FAILURE;
            }
        }
    }
    let Some((host, port)) =
        args.listen.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
    else {
        eprintln!("error: --listen must be HOST:PORT, got `{}`", args.listen);
        return ExitCode::from(2);
    };
    let mut config = Config::default();
    config.grpc_options.host = host.to_string();
    config.grpc_options.port = port;
    config.http_options.port = 0;
    config.admin_options.enabled = false;
    config.http_options.max_body_bytes = args.max_body_bytes.max(1);
    // No budget of its own: its callers are the server's frontends, whose requests are bounded
    // by each deployment's `max_ongoing_requests` and `max_queued_requests` once read (a
    // replica refusing them as overloaded would be taken for a failing one).
    config.http_options.max_body_bytes_in_flight = usize::MAX;
    if let Some(s) = args.graceful_shutdown_timeout {
        config.graceful_shutdown_timeout_s = s;
    }
    args.process.apply(&mut config);
    config.applications = vec![Application::new(
        "replica",
        vec![Deployment {
            name: spec.deployment,
            version: spec.version,
            model: spec.model,
            settings: spec.settings,
            scaling: Scaling::Fixed(1),
            canary: None,
            shadow: None,
            extra_versions: Vec::new(),
            location: Location::default(),
        }],
    )];
    super::run::run_with(
        config,
        logs,
        args.ort,
        ort_env,
        || StartOptions { replica: true, ..StartOptions::default() },
        |server| {
            use std::io::Write;
            if let Some(addr) = server.grpc_addr() {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "LISTEN {addr}");
                let _ = out.flush();
            }
        },
    )
}
