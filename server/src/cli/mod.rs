//! The `sluice` command line: the arguments (clap), and one module per group of subcommands.
//! Nothing here reads the environment: `main.rs` does, and passes values in.

/// `print!` that ends the process quietly (exit 0) when stdout's reader has gone (`sluice job
/// logs ID | head`), as SIGPIPE ends other tools, rather than with a panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

/// [`out!`] with a newline, for `println!`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod admin;
pub mod deploy;
pub mod job;
pub mod loadtest;
pub mod package;
pub mod proxy;
pub mod ray;
pub mod replica;
pub mod run;
pub mod status;
pub mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "Serve ONNX models over the Open Inference Protocol")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve every deployment in CONFIG until interrupted (Ctrl-C or SIGTERM).
    Run(run::RunArgs),
    /// Load-test an Open Inference Protocol server: runs `sluice-loadtest` (installed next to
    /// this binary) with the remaining arguments; `sluice loadtest --help` lists them.
    #[command(disable_help_flag = true)]
    Loadtest {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Deploy CONFIG to a running server (its admin API): declarative, like `serve deploy`.
    /// By default it then waits until every deployment is ready, printing each change of
    /// ready replicas (`app/model: 1/2 replicas ready`).
    Deploy {
        config: PathBuf,
        #[command(flatten)]
        wait: deploy::WaitArgs,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Show applications, deployments, versions, replicas ready/desired, traffic weights,
    /// requests per second, p50/p99 latency (over the last 30 s), queue depth and last events.
    Status {
        /// `table` to read (`wide`: with where each replica runs), `json` or `yaml` for
        /// machines (the admin API's whole status).
        #[arg(short, long, value_enum, default_value = "table")]
        output: status::Output,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Remove an application from a running server.
    Delete {
        app: String,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Change a canary rollout: `set MODEL WEIGHT`, `promote MODEL`, `rollback MODEL`.
    Rollout {
        #[command(subcommand)]
        action: admin::RolloutAction,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// The model repository of a running server: `notify MODEL` scans it now.
    Repository {
        #[command(subcommand)]
        action: admin::RepositoryAction,
        #[command(flatten)]
        admin: admin::AdminArgs,
    },
    /// Training jobs on the Ray cluster (Ray's Jobs API): `submit`, `status`, `logs`, `stop`,
    /// `list`. Ray's own `ray job` commands see the same jobs.
    Job(job::JobArgs),
    /// Serve one replica of one deployment version for a controller elsewhere (Ray actors
    /// start it); prints `LISTEN <addr>` once warm.
    #[command(hide = true)]
    Replica(replica::ReplicaArgs),
    /// Serve the REST and gRPC frontends on a cluster node, following a controller's routes
    /// (the controller starts it with `proxy_location: EveryNode`).
    #[command(hide = true)]
    Proxy(proxy::ProxyArgs),
    /// Print a shell completion script: `sluice completions bash > /etc/bash_completion.d/sluice`
    /// (also zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `sluice man > sluice.1 && man ./sluice.1`.
    Man,
    /// Print the OpenAPI document of the REST frontend (`rest`) or the admin API (`admin`),
    /// as the server answers it at `GET /openapi.json` on that port.
    Openapi {
        #[arg(value_enum, default_value = "rest")]
        api: Api,
    },
    /// Check CONFIG and load each model once (canaries and model-repository versions too);
    /// print every error found and exit non-zero if any.
    Validate {
        config: PathBuf,
        #[command(flatten)]
        ort: OrtArgs,
    },
}

/// Which HTTP API.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Api {
    Rest,
    Admin,
}

/// Where ONNX Runtime comes from.
#[derive(clap::Args)]
pub struct OrtArgs {
    /// ONNX Runtime shared library (libonnxruntime.so). Default: ORT_DYLIB_PATH (unless
    /// empty), then the library the binary was built against, the project's .ort/ folder made
    /// by scripts/install-onnxruntime.sh, and libonnxruntime.so next to the binary.
    #[arg(long, env = "SLUICE_ONNXRUNTIME")]
    pub onnxruntime: Option<PathBuf>,
}

/// The process settings `sluice proxy` and `sluice replica` take as flags: the controller
/// passes the config's on a Ray cluster.
#[derive(clap::Args)]
pub struct ProcessArgs {
    /// Threads of the async runtime, 1 to 1024 (a proxy gets the config's `worker_threads`, a
    /// replica the CPUs it reserves, rounded up); default one per CPU.
    #[arg(long, value_parser = worker_threads())]
    pub worker_threads: Option<u32>,
    /// Keep the memory only starting needed (the config's `release_startup_memory: false`);
    /// by default it is handed back once ready.
    #[arg(long)]
    pub keep_startup_memory: bool,
}

impl ProcessArgs {
    /// Sets the config's keys these flags stand for.
    pub fn apply(&self, config: &mut sluice_config::Config) {
        config.worker_threads = self.worker_threads;
        config.release_startup_memory = !self.keep_startup_memory;
    }
}

/// `--worker-threads`: 1 to [`sluice_config::MAX_WORKER_THREADS`], as the config's key.
fn worker_threads() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(sluice_config::MAX_WORKER_THREADS))
}

/// A flag's SECONDS: 0 to [`sluice_config::MAX_SECONDS`], as the config's durations (`inf` or
/// `1e20` would panic where it becomes a `Duration`).
fn seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if (0.0..=sluice_config::MAX_SECONDS).contains(&s) => Ok(s),
        Ok(_) => Err(format!("must be 0 to {:e} seconds", sluice_config::MAX_SECONDS)),
        Err(e) => Err(format!("not a number of seconds: {e}")),
    }
}

/// What [`out!`] does: writes and flushes; a reader that went away ends the process (exit 0),
/// another write error with a message (exit 1).
pub fn write_out(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// A URL flag (`--address`, `--ray`): `http://` or `https://` and a host; a bare `HOST:PORT`
/// is taken as `http://HOST:PORT`, as Ray's own CLI takes its dashboard's (it failed later as
/// reqwest's "builder error").
fn http_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    let url = if text.contains("://") { text.to_string() } else { format!("http://{text}") };
    let (scheme, rest) = url.split_once("://").unwrap_or(("", &url));
    if !matches!(scheme, "http" | "https") {
        return Err(format!("`{text}`: the URL must be http:// or https:// (a dashboard or admin API)"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.rsplit_once(':').map_or(authority, |(host, _)| host).is_empty() {
        return Err(format!("`{text}` names no host"));
    }
    reqwest::Url::parse(&url).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    Ok(url)
}

/// Ray's auth token as `ray` itself finds it: the variable `var` names (`RAY_AUTH_TOKEN` by
/// default), else the file `RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token` (where
/// `ray get-auth-token --generate` writes it: read only from the variable, a user set up so had
/// every call refused 401). Whitespace around it is left out.
pub fn ray_token(var: &str) -> Option<String> {
    ray_token_from(
        std::env::var(var).ok(),
        std::env::var_os("RAY_AUTH_TOKEN_PATH").map(PathBuf::from),
        std::env::var_os("HOME").map(PathBuf::from),
    )
}

fn ray_token_from(value: Option<String>, path: Option<PathBuf>, home: Option<PathBuf>) -> Option<String> {
    let token = |t: String| Some(t.trim().to_string()).filter(|t| !t.is_empty());
    if let Some(t) = value.and_then(token) {
        return Some(t);
    }
    let file = path.filter(|p| !p.as_os_str().is_empty()).or_else(|| Some(home?.join(".ray/auth_token")))?;
    std::fs::read_to_string(file).ok().and_then(token)
}

/// Loads ONNX Runtime from the flag, else `ORT_DYLIB_PATH` (`env`), else the project folder;
/// prints one line and fails when it cannot.
pub fn init_runtime(ort: OrtArgs, env: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    sluice_server::runtime::init(ort.onnxruntime, env).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

/// The ONNX Runtime library `sluice run` would load, without loading it (an explicit path
/// that names no file is an error, as when loading: it was skipped for the next one).
pub fn find_runtime(ort: &OrtArgs, env: Option<PathBuf>) -> Result<PathBuf, String> {
    sluice_server::runtime::find(ort.onnxruntime.clone(), env)
        .map(|(path, _)| path)
        .map_err(|e| e.to_string())
}

/// Reads and validates a config file, printing every error (exit code 2) when it is wrong.
pub fn load_config(path: &Path) -> Result<sluice_config::Config, ExitCode> {
    report(path, sluice_config::load(path))
}

/// [`load_config`] for `sluice run`, whose flags may move a listener: its hosts and ports are
/// checked once the flags are applied (`run::check_addresses`).
pub fn load_config_to_override(path: &Path) -> Result<sluice_config::Config, ExitCode> {
    report(path, sluice_config::load_before_overrides(path))
}

fn report(
    path: &Path,
    loaded: Result<sluice_config::Config, sluice_config::ConfigErrors>,
) -> Result<sluice_config::Config, ExitCode> {
    loaded.map_err(|errors| {
        eprintln!("{errors}");
        eprintln!("{} error(s) in {}", errors.0.len(), path.display());
        ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command, ray_token_from};

    #[test]
    fn rays_token_is_found_where_ray_finds_it() {
        let dir = std::env::temp_dir().join(format!("sluice-ray-token-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(".ray")).unwrap();
        std::fs::write(dir.join(".ray/auth_token"), "from-home\n").unwrap();
        std::fs::write(dir.join("elsewhere"), "from-path").unwrap();
        let home = || Some(dir.clone());
        assert_eq!(ray_token_from(Some(" set ".into()), None, home()).as_deref(), Some("set"));
        assert_eq!(ray_token_from(Some(String::new()), None, home()).as_deref(), Some("from-home"));
        assert_eq!(ray_token_from(None, Some(dir.join("elsewhere")), home()).as_deref(), Some("from-path"));
        assert_eq!(ray_token_from(None, None, Some(dir.join("nowhere"))), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Durations on the command line are checked when parsed, not where they become a
    /// `Duration` (which panics on `inf`).
    #[test]
    fn seconds_flags_are_finite_and_at_most_a_billion() {
        let deploy = |timeout: &str| {
            Cli::try_parse_from([
                "sluice".to_string(),
                "deploy".into(),
                "app.yaml".into(),
                format!("--timeout={timeout}"),
            ])
        };
        for bad in ["inf", "1e20", "NaN", "-1", "soon"] {
            let err = deploy(bad).err().unwrap_or_else(|| panic!("--timeout {bad} accepted")).to_string();
            assert!(err.contains("--timeout") && err.contains(" seconds"), "{err}");
        }
        let Command::Deploy { wait, .. } = deploy("1e9").unwrap().command else { panic!("not deploy") };
        assert_eq!(wait.timeout, 1e9);
        assert!(deploy("0").is_ok() && deploy("2.5").is_ok());
        let proxy = |poll: &str| {
            Cli::try_parse_from([
                "sluice",
                "proxy",
                "--controller",
                "http://h:8266",
                "--host",
                "h",
                "--poll-s",
                poll,
            ])
        };
        assert!(proxy("inf").is_err() && proxy("0.5").is_ok());
    }
}
