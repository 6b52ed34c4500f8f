//! `sluice`: serve ONNX models over the Open Inference Protocol from a YAML config.
//!
//! The one place that reads the process environment (besides clap's `env` arguments): the
//! ONNX Runtime location (`ORT_DYLIB_PATH`) and the admin token (the variable the config's
//! `admin_options.token_env` names) are read here and passed to the library.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use cli::{Cli, Command};

/// mimalloc instead of glibc's allocator: a REST request makes about 116 allocations, and at 64
/// connections glibc's malloc and free took ~10 µs of CPU per request (perf); its per-thread
/// arenas also grew RSS in steps for minutes under a soak (docs/reliability.md). With the
/// `malloc-override` feature (default) it serves ONNX Runtime's C++ allocations too.
#[global_allocator]
static ALLOCATOR: sluice_server::alloc::MiMalloc = sluice_server::alloc::MiMalloc;

/// What `RUST_LOG` asks for (default: info).
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

/// The command line, an empty variable read as unset (`SLUICE_RAY_ADDRESS=` turned a local
/// run into a Ray submission to ""; `SLUICE_CACERT=` failed every admin command).
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    fn unset_empty(cmd: clap::Command) -> clap::Command {
        cmd.mut_args(|a| match a.get_env() {
            Some(name) if std::env::var_os(name).is_some_and(|v| v.is_empty()) => a.env(None),
            _ => a,
        })
        .mut_subcommands(unset_empty)
    }
    let matches = unset_empty(Cli::command()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn main() -> ExitCode {
    sluice_deployments::onnx::on_memory_released(sluice_server::alloc::purge_freed_memory);
    let ort_env = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from);
    // Object-storage repositories take each cloud's standard variables.
    let store_env = sluice_controller::StoreEnv::from_vars(std::env::vars());
    let command = parse_cli().command;
    // Serving processes log (and trace) as their config says, once the runtime runs.
    if !matches!(command, Command::Run(_) | Command::Replica(_) | Command::Proxy(_)) {
        let _ = sluice_server::telemetry::init(log_filter(), Default::default(), &Default::default());
    }
    match command {
        Command::Run(args) => {
            let (config, as_written) = match cli::load_config_to_override(&args.config) {
                Ok(c) => (args.apply_overrides(c.clone()), c),
                Err(code) => return code,
            };
            let logs = cli::run::Logs {
                filter: log_filter(),
                format: config.log_format,
                tracing: config.tracing_options.clone(),
            };
            let admin_token = match sluice_server::auth::admin_token(&config.admin_options.token_env) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let ray = config.cluster.ray.clone().unwrap_or_default();
            let ray_address =
                args.ray.clone().or_else(|| Some(ray.address.clone()).filter(|a| !a.is_empty()));
            if args.in_ray_job {
                cli::ray::run_in_job(config, logs, args.ort, ort_env, admin_token, store_env)
            } else if let Some(address) = ray_address {
                let _ = sluice_server::telemetry::init(logs.filter, logs.format, &Default::default());
                let submit = cli::ray::Submit {
                    address,
                    ray_token: cli::ray_token(&ray.token_env),
                    admin_token,
                    working_dir: args.working_dir.clone(),
                    onnxruntime: cli::find_runtime(&args.ort, ort_env),
                    rust_log: std::env::var("RUST_LOG").ok(),
                    overrides: args.override_flags(),
                    admin_tls: args.admin_tls,
                };
                cli::ray::submit(&config, submit)
            } else {
                if config.cluster.ray.is_some() {
                    eprintln!(
                        "warning: `cluster.ray` is set but names no address (nor --ray, SLUICE_RAY_ADDRESS): serving on this machine"
                    );
                }
                let options = sluice_server::StartOptions {
                    admin_token,
                    store_env,
                    as_written: Some(as_written),
                    ..Default::default()
                };
                cli::run::run(config, logs, args.ort, ort_env, options)
            }
        }
        Command::Completions { shell } => {
            // Made whole, then written as any output (clap_complete panics on a write error).
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "sluice",
                &mut script,
            );
            cli::write_out(format_args!("{}", String::from_utf8_lossy(&script)));
            ExitCode::SUCCESS
        }
        Command::Openapi { api } => {
            let doc = match api {
                cli::Api::Rest => sluice_server::openapi::rest(),
                cli::Api::Admin => sluice_server::openapi::admin(),
            };
            match doc.to_pretty_json() {
                Ok(json) => {
                    cli::write_out(format_args!("{json}\n"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Man => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut page) {
                Ok(()) => {
                    cli::write_out(format_args!("{}", String::from_utf8_lossy(&page)));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Replica(args) => {
            cli::replica::replica(args, cli::run::Logs::plain(log_filter()), ort_env, &store_env)
        }
        Command::Proxy(args) => match sluice_server::auth::admin_token("SLUICE_ADMIN_TOKEN") {
            Ok(token) => cli::proxy::proxy(args, cli::run::Logs::plain(log_filter()), ort_env, token),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Validate { config, ort } => cli::validate::validate(&config, ort, ort_env, &store_env),
        Command::Loadtest { args } => cli::loadtest::loadtest(&args),
        Command::Deploy { config, wait, admin } => cli::deploy::deploy(&config, &admin, &wait),
        Command::Status { output, admin } => cli::admin::status(&admin, output),
        Command::Delete { app, admin } => cli::admin::delete(&app, &admin),
        Command::Rollout { action, admin } => cli::admin::rollout(&action, &admin),
        Command::Repository { action, admin } => cli::admin::repository(&action, &admin),
        Command::Job(args) => cli::job::job(args, cli::ray_token("RAY_AUTH_TOKEN")),
    }
}
