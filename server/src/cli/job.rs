//! `sluice job`: training jobs on the Ray cluster Sluice serves from, through Ray's Jobs API
//! (the same jobs `ray job list` shows). `submit` packages a working dir, submits the
//! entrypoint, follows its log live (the `logs/tail` websocket) and exits with the job's
//! outcome: 0 when it succeeded; when it failed, its exit code (1 when Ray has none) after the
//! tail of its log; 2 when it was stopped.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use sluice_server::ray_jobs::{JobDetails, JobRequest, Jobs};

#[derive(clap::Args)]
pub struct JobArgs {
    /// The Ray dashboard (Jobs API; `HOST:PORT` alone is taken as `http://HOST:PORT`).
    /// Default, as `ray job` finds it: `RAY_API_SERVER_ADDRESS`; else `RAY_ADDRESS` when it is
    /// an `http(s)://` URL, the dashboard's port 8265 on its host when it is a cluster address
    /// (`HOST:6379`, as Ray sets it inside a job and KubeRay in a head pod); else
    /// `http://127.0.0.1:8265`.
    #[arg(long, global = true, value_parser = super::http_url)]
    pub ray: Option<String>,
    #[command(subcommand)]
    pub action: JobAction,
}

#[derive(clap::Subcommand)]
pub enum JobAction {
    /// Submit ENTRYPOINT (after `--`) as a Ray job, follow its log and exit with its outcome.
    Submit(SubmitArgs),
    /// A job's status, message and exit code.
    Status { id: String },
    /// A job's driver log (`--follow`: until it ends).
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
    },
    /// Stop a job (Ray sends SIGTERM, then SIGKILL) and wait until it has stopped.
    Stop { id: String },
    /// Every job Ray knows, oldest first.
    List,
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// A folder shipped to the cluster as the job's working dir (its hidden files and build
    /// output left out); the entrypoint runs inside it. Default: none.
    #[arg(long)]
    pub working_dir: Option<PathBuf>,
    /// CPUs reserved for the entrypoint. Default: Ray's (none).
    #[arg(long)]
    pub num_cpus: Option<f64>,
    /// GPUs reserved for the entrypoint. Default: none.
    #[arg(long)]
    pub num_gpus: Option<f64>,
    /// An environment variable for the job, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The job's id. Default: `sluice-job-<time>`. Submitting an id that runs already only
    /// follows it; one of a finished job is refused (as Ray refuses it), so a retry never
    /// runs a finished job again.
    #[arg(long)]
    pub submission_id: Option<String>,
    /// Return once submitted instead of following the log.
    #[arg(long)]
    pub no_wait: bool,
    /// The command the job runs (`python train.py --epochs 3`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub entrypoint: Vec<String>,
}

/// Runs one `sluice job` command; `ray_token` is Ray's auth token, if set.
/// The dashboard `ray job` would use given these variables ([`JobArgs::ray`]). Ray resolves a
/// cluster address through its GCS; the dashboard runs on the same host, at 8265 unless moved.
fn dashboard(api_server: Option<String>, ray_address: Option<String>) -> Result<String, String> {
    const DEFAULT: &str = "http://127.0.0.1:8265";
    if let Some(url) = api_server {
        return super::http_url(&url).map_err(|e| format!("RAY_API_SERVER_ADDRESS: {e}"));
    }
    let Some(address) = ray_address.map(|a| a.trim().to_string()) else { return Ok(DEFAULT.into()) };
    if address.contains("://") {
        return super::http_url(&address).map_err(|e| format!("RAY_ADDRESS: {e}"));
    }
    if address == "auto" || address == "local" {
        return Ok(DEFAULT.into());
    }
    // `HOST:PORT` (or `[IPv6]:PORT`), the cluster's GCS: its host's dashboard.
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => &address,
    };
    super::http_url(&format!("{host}:8265")).map_err(|e| format!("RAY_ADDRESS: {e}"))
}

pub fn job(args: JobArgs, ray_token: Option<String>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let ray = match args.ray {
        Some(url) => Ok(url),
        None => dashboard(var("RAY_API_SERVER_ADDRESS"), var("RAY_ADDRESS")),
    };
    let ray = match ray {
        Ok(url) => url,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let jobs = Jobs::new(&ray, ray_token);
    match rt.block_on(run(&jobs, args.action)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(jobs: &Jobs, action: JobAction) -> Result<ExitCode, String> {
    match action {
        JobAction::Submit(s) => submit(jobs, s).await,
        JobAction::Status { id } => {
            let job = find(jobs, &id).await?;
            outln!("{}", describe(&job));
            Ok(ExitCode::SUCCESS)
        }
        JobAction::Logs { id, follow } => {
            find(jobs, &id).await?;
            if follow {
                follow_log(jobs, &id).await?;
            } else {
                out!("{}", jobs.logs(&id).await.map_err(|e| e.to_string())?);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobAction::Stop { id } => {
            find(jobs, &id).await?;
            let stopped = jobs.stop(&id).await.map_err(|e| e.to_string())?;
            let job = wait_terminal(jobs, &id, Duration::from_secs(60)).await?;
            if !stopped && !job.is_terminal() {
                return Err(format!("Ray did not stop job {id}: {}", describe(&job)));
            }
            // Told to stop, still running: not a success (a job may drain for longer than
            // this waits; Ray kills it after its RAY_JOB_STOP_WAIT_TIME_S).
            if !job.is_terminal() {
                return Err(format!(
                    "job {id} is still {} 60 s after Ray was told to stop it; `sluice job status {id}` follows it",
                    job.status
                ));
            }
            outln!("{}", describe(&job));
            Ok(ExitCode::SUCCESS)
        }
        JobAction::List => {
            let mut list = jobs.list().await.map_err(|e| e.to_string())?;
            list.sort_by_key(|j| j.start_time.unwrap_or(0));
            outln!("{:<32} {:<10} {:>5}  ENTRYPOINT", "ID", "STATUS", "EXIT");
            for j in list {
                let code = j.driver_exit_code.map_or_else(|| "-".to_string(), |c| c.to_string());
                let entry: String = j.entrypoint.chars().take(60).collect();
                outln!("{:<32} {:<10} {code:>5}  {entry}", j.id(), j.status);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn find(jobs: &Jobs, id: &str) -> Result<JobDetails, String> {
    jobs.job(id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("Ray at {} has no job `{id}`", jobs.address()))
}

async fn submit(jobs: &Jobs, s: SubmitArgs) -> Result<ExitCode, String> {
    let version = jobs.check_version().await.map_err(|e| e.to_string())?;
    let mut env = serde_json::Map::new();
    for kv in &s.env {
        let Some((k, v)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(format!("--env takes KEY=VALUE, got `{kv}`"));
        };
        env.insert(k.to_string(), v.into());
    }
    let mut runtime_env = serde_json::json!({"env_vars": env});
    if let Some(dir) = &s.working_dir {
        let dir = std::fs::canonicalize(dir).map_err(|e| format!("working dir `{}`: {e}", dir.display()))?;
        let mut package = super::package::Package::new();
        package.add_dir(&dir, &[], true)?;
        let (zip, name) = package.finish("sluice-job")?;
        eprintln!("uploading {} as {name} ({:.1} kB)", dir.display(), zip.len() as f64 / 1e3);
        let uri = jobs.upload_package(&name, zip).await.map_err(|e| e.to_string())?;
        runtime_env["working_dir"] = uri.into();
    }
    let id = s.submission_id.clone().unwrap_or_else(|| {
        let ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        format!("sluice-job-{ms}")
    });
    let request = JobRequest {
        entrypoint: s.entrypoint.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" "),
        submission_id: id.clone(),
        runtime_env,
        metadata: [("submitted_by".to_string(), "sluice".to_string())].into(),
        entrypoint_num_cpus: s.num_cpus,
        entrypoint_num_gpus: s.num_gpus,
    };
    let fresh = jobs.submit(&request, false).await.map_err(|e| e.to_string())?;
    eprintln!(
        "{} job {id} on Ray {version} at {}",
        if fresh { "submitted" } else { "already running:" },
        jobs.address()
    );
    if s.no_wait {
        outln!("{id}");
        return Ok(ExitCode::SUCCESS);
    }
    follow_log(jobs, &id).await?;
    let job = wait_terminal(jobs, &id, Duration::from_secs(30)).await?;
    Ok(outcome(jobs, &job).await)
}

/// Prints the log as it comes until the job ends.
async fn follow_log(jobs: &Jobs, id: &str) -> Result<(), String> {
    jobs.tail(id, |chunk| out!("{chunk}")).await.map_err(|e| e.to_string())
}

/// Polls until the job is terminal (the log can end a moment before Ray says so).
async fn wait_terminal(jobs: &Jobs, id: &str, timeout: Duration) -> Result<JobDetails, String> {
    let until = tokio::time::Instant::now() + timeout;
    let mut patience = sluice_server::ray_jobs::Patience::default();
    loop {
        match jobs.job(id).await {
            Ok(Some(job)) if job.is_terminal() || tokio::time::Instant::now() >= until => return Ok(job),
            Ok(Some(_)) => patience.answered(),
            Ok(None) => return Err(format!("Ray at {} has no job `{id}`", jobs.address())),
            // Asked again as while following the log, past `timeout` too.
            Err(e) => patience.failed(e).map_err(|e| e.to_string())?,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The exit code for a finished job; a failed one shows its exit code and the tail of its log.
async fn outcome(jobs: &Jobs, job: &JobDetails) -> ExitCode {
    match job.status.as_str() {
        "SUCCEEDED" => {
            eprintln!("{}", describe(job));
            ExitCode::SUCCESS
        }
        "STOPPED" => {
            eprintln!("{}", describe(job));
            ExitCode::from(2)
        }
        _ => {
            let logs = jobs.logs(job.id()).await.unwrap_or_default();
            let lines: Vec<&str> = logs.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            eprintln!("{}\nlast lines of its log:\n{tail}", describe(job));
            let code = job.driver_exit_code.and_then(|c| u8::try_from(c).ok()).filter(|c| *c != 0);
            ExitCode::from(code.unwrap_or(1))
        }
    }
}

/// One line: id, status, exit code, Ray's message.
fn describe(job: &JobDetails) -> String {
    let mut s = format!("job {} {}", job.id(), job.status);
    if let Some(code) = job.driver_exit_code {
        s.push_str(&format!(" (exit code {code})"));
    }
    if let Some(m) = job.message.as_deref().filter(|m| !m.is_empty()) {
        s.push_str(&format!(": {}", m.trim()));
    }
    s
}

/// A word for the shell that runs the entrypoint.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dashboard comes from `RAY_API_SERVER_ADDRESS`, then from `RAY_ADDRESS` as `ray job`
    /// reads it: a URL as it is, a cluster address (Ray sets `HOST:6379` inside every job,
    /// KubeRay in head pods) as its host's dashboard (it was taken as `http://HOST:6379`, the GCS
    /// port, and every `sluice job` command failed there).
    #[test]
    fn the_dashboard_is_found_as_ray_job_finds_it() {
        let some = |s: &str| Some(s.to_string());
        let found = |api: Option<String>, ray: Option<String>| dashboard(api, ray).unwrap();
        assert_eq!(found(None, None), "http://127.0.0.1:8265");
        assert_eq!(found(some("http://head:9999"), some("10.0.0.1:6379")), "http://head:9999");
        assert_eq!(found(None, some("https://dash.example:443")), "https://dash.example:443");
        assert_eq!(found(None, some("10.0.0.1:6379")), "http://10.0.0.1:8265");
        assert_eq!(found(None, some("[fd00::1]:6379")), "http://[fd00::1]:8265");
        assert_eq!(found(None, some("head-svc")), "http://head-svc:8265");
        assert_eq!(found(None, some("auto")), "http://127.0.0.1:8265");
        assert!(dashboard(None, some("ray://head:10001")).unwrap_err().contains("RAY_ADDRESS"));
    }

    #[test]
    fn entrypoint_words_survive_the_shell_and_failures_say_their_exit_code() {
        assert_eq!(shell_word("train.py"), "train.py");
        assert_eq!(shell_word("--lr=0.1"), "--lr=0.1");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        let job = JobDetails {
            submission_id: Some("j".into()),
            job_id: None,
            status: "FAILED".into(),
            message: Some("Job entrypoint command failed with exit code 3".into()),
            entrypoint: "python t.py".into(),
            driver_exit_code: Some(3),
            start_time: None,
            end_time: None,
        };
        assert_eq!(
            describe(&job),
            "job j FAILED (exit code 3): Job entrypoint command failed with exit code 3"
        );
    }
}
