//! `sluice`: serve ONNX models over the Open Inference Protocol from a YAML config.
//!
//! The one place that reads the process environment (besides clap's `env` arguments): the
//! ONNX Runtime location (`ORT_DYLIB_PATH`) and the admin token (the variable the config's
//! `admin_options.token_env` names) are read here and passed to the library.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let ort_env = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from);
    match Cli::parse().command {
        Command::Run(args) => {
            let config = match cli::load_config(&args.config) {
                Ok(c) => args.apply_overrides(c),
                Err(code) => return code,
            };
            let admin_token = std::env::var(&config.admin_options.token_env).ok();
            cli::run::run(config, args.ort, ort_env, sluice_server::StartOptions { admin_token })
        }
        Command::Validate { config, ort } => cli::validate::validate(&config, ort, ort_env),
        Command::Loadtest { args } => cli::loadtest::loadtest(&args),
        Command::Deploy { config, admin } => cli::admin::deploy(&config, &admin),
        Command::Status { admin } => cli::admin::status(&admin),
        Command::Delete { app, admin } => cli::admin::delete(&app, &admin),
        Command::Rollout { action, admin } => cli::admin::rollout(&action, &admin),
    }
}
