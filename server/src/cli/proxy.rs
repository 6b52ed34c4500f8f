//! `sluice proxy`: the REST and gRPC frontends on a node of a Ray cluster
//! (`proxy_location: EveryNode`), following the controller's route table and sending requests
//! straight to the replicas. Started by the controller as a Ray actor pinned to its node;
//! prints `LISTEN <host:port>` once listening with the controller's route table in (before
//! that, readiness answers 503: a proxy that cannot read the table, say with a wrong token,
//! never takes traffic it would answer 404).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sluice_config::Config;
use sluice_server::StartOptions;

#[derive(clap::Args)]
pub struct ProxyArgs {
    /// The controller's admin API (`http://HEAD:8266`), whose route table this proxy follows.
    #[arg(long)]
    pub controller: String,
    /// Address to bind the frontends to (the node's IP).
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub http_port: u16,
    #[arg(long, default_value_t = 8001)]
    pub grpc_port: u16,
    /// Serve REST only.
    #[arg(long)]
    pub no_grpc: bool,
    /// How often to fetch the route table, seconds.
    #[arg(long, default_value_t = 0.5, value_parser = super::seconds)]
    pub poll_s: f64,
    /// The config's frontend limits and timeouts, shutdown, logs and traces, as JSON (the
    /// controller passes its own; default: the config's defaults).
    #[arg(long, value_parser = settings)]
    pub settings: Option<sluice_config::ProxySettings>,
    #[command(flatten)]
    pub process: super::ProcessArgs,
    #[command(flatten)]
    pub ort: super::OrtArgs,
}

/// `token`: the controller's admin token (from the environment, read in main.rs).
pub fn proxy(
    args: ProxyArgs,
    mut logs: super::run::Logs,
    ort_env: Option<PathBuf>,
    token: Option<String>,
) -> ExitCode {
    let mut config = Config::default();
    if let Some(settings) = &args.settings {
        // Checked by the flag's parser.
        let _ = settings.apply(&mut config);
        logs.format = settings.log_format;
        logs.tracing = settings.tracing_options.clone();
    }
    config.http_options.host = args.host.clone();
    config.http_options.port = args.http_port;
    config.grpc_options.host = args.host.clone();
    config.grpc_options.port = args.grpc_port;
    config.grpc_options.enabled = !args.no_grpc;
    config.admin_options.enabled = false;
    args.process.apply(&mut config);
    let follow = sluice_server::snapshot::Follow {
        controller: args.controller,
        token,
        every: Duration::from_secs_f64(args.poll_s.max(0.05)),
    };
    // The replicas' gauges are the controller's to serve.
    sluice_server::metrics::serve_as_proxy();
    // Ready, and `LISTEN` printed, once the controller's first route table is in.
    let options = move || StartOptions { follow: Some(follow), ..StartOptions::default() };
    super::run::run_with(config, logs, args.ort, ort_env, options, move |server| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "LISTEN {}", server.http_addr());
        let _ = out.flush();
    })
}

/// `--settings`: [`sluice_config::ProxySettings`] as JSON, in range.
fn settings(text: &str) -> Result<sluice_config::ProxySettings, String> {
    let settings: sluice_config::ProxySettings = serde_json::from_str(text).map_err(|e| e.to_string())?;
    settings.apply(&mut Config::default())?;
    Ok(settings)
}
