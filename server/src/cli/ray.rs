//! `sluice run --ray URL`: Sluice on a Ray cluster, as one Ray job.
//!
//! Outside the cluster ([`submit`]): packages the config's folder, this binary, ONNX Runtime and
//! the Python bridge into a `working_dir`, uploads it, submits the job under a fixed
//! `submission_id` (`sluice-<config name>`: submitting twice is idempotent) and waits until the
//! job runs and every deployment is healthy. Inside the job ([`run_in_job`]): the entrypoint is
//! the bridge's Python driver, which starts this binary as `sluice run CONFIG --in-ray-job`; it
//! serves as usual, with replicas as Ray actors, talking to the driver over stdin/stdout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_config::Config;
use sluice_controller::cluster::{Cluster, ProxyOptions, RayCluster, RayOptions, bridge};
use sluice_controller::{ApplicationState, DeploymentState, Status};
use sluice_server::StartOptions;
use sluice_server::ray_jobs::{JobRequest, Jobs};

/// The bridge's Python files, shipped in every job's working dir.
const BRIDGE: [(&str, &str); 3] = [
    ("sluice_ray/__init__.py", include_str!("../../../python/sluice_ray/__init__.py")),
    ("sluice_ray/driver.py", include_str!("../../../python/sluice_ray/driver.py")),
    ("sluice_ray/host.py", include_str!("../../../python/sluice_ray/host.py")),
];

/// Where Sluice's own files go inside the working dir.
const OWN: &str = "_sluice";

/// What `submit` needs besides the config.
pub struct Submit {
    pub address: String,
    pub ray_token: Option<String>,
    pub admin_token: Option<String>,
    pub working_dir: Option<PathBuf>,
    /// ONNX Runtime, found as `sluice run` would (flag, ORT_DYLIB_PATH, project folder).
    /// The ONNX Runtime library to ship, or why there is none.
    pub onnxruntime: Result<PathBuf, String>,
    /// `RUST_LOG` to pass on to the job, if set.
    pub rust_log: Option<String>,
    /// The command line's overrides of the config (`--http-port 8100`, ...), passed on to the
    /// job's `sluice run`.
    pub overrides: Vec<String>,
    /// How to reach the job's admin API when `admin_options.tls` is set (`--cacert`, `--cert`,
    /// `--key`).
    pub admin_tls: super::admin::ClientTls,
}

/// What a config cannot do on Ray, one sentence each naming the setting: checked by `sluice
/// run --ray` before the job is submitted (`submitting`: it follows the job through the admin
/// API), and inside the job for what its proxies need.
fn unsupported_on_ray(config: &Config, submitting: bool) -> Vec<String> {
    let every_node = config.proxy_location == sluice_config::ProxyLocation::EveryNode;
    let mut out = Vec::new();
    if !config.admin_options.enabled && (submitting || every_node) {
        out.push(
            "admin_options.enabled is false: on Ray, `sluice run --ray` follows the job through the admin API, \
             and proxy_location: EveryNode proxies read their routes there; enable it (with a token in $SLUICE_ADMIN_TOKEN)"
                .to_string(),
        );
    }
    // The default loopback address is bound to every address inside the job (`run_in_job`);
    // another loopback name would keep the admin API, which the proxies follow, to the head.
    let admin_host = config.admin_options.host.trim_start_matches('[').trim_end_matches(']');
    let loopback = admin_host.eq_ignore_ascii_case("localhost")
        || admin_host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if every_node && loopback && config.admin_options.host != sluice_config::HttpOptions::default().host {
        out.push(format!(
            "proxy_location: EveryNode proxies on the other nodes read their routes from the admin API, which \
             admin_options.host `{}` keeps to the head; leave it out (the job then binds every address) or \
             name an address the nodes reach",
            config.admin_options.host
        ));
    }
    // The job's listeners are found by their ports (`sluice run --ray` follows the admin API
    // there and prints the frontends', proxies take the same ones on every node): a port the
    // job picks itself is one no one can find (`--admin-port 0` waited out the start timeout
    // on port 0).
    let listeners = [
        ("http_options.port", true, config.http_options.port),
        ("grpc_options.port", config.grpc_options.enabled, config.grpc_options.port),
        ("admin_options.port", config.admin_options.enabled, config.admin_options.port),
    ];
    for (field, _, _) in listeners.iter().filter(|(_, enabled, port)| *enabled && *port == 0) {
        out.push(format!("{field} is 0: on Ray the job's listeners are found by their ports; name one"));
    }
    if every_node {
        let tls = [
            ("http_options.tls", config.http_options.tls.is_some()),
            ("grpc_options.tls", config.grpc_options.tls.is_some()),
            ("admin_options.tls", config.admin_options.tls.is_some()),
        ];
        for (field, _) in tls.iter().filter(|(_, set)| *set) {
            out.push(format!(
                "proxy_location: EveryNode does not carry {field} to the proxies on the other nodes (they would \
                 serve plain text, or not reach the admin API); use proxy_location: HeadOnly, or terminate TLS \
                 in front of the nodes"
            ));
        }
    }
    out
}

/// The listeners as the job serves them: Ray's dashboard holds 8265 on the head (the admin
/// API's default moves to 8266), and clients reach the frontends from other hosts (a loopback
/// host listens on every address).
fn as_in_the_job(config: &mut Config) {
    config.admin_options.port = sluice_server::ray_admin_port(config);
    let loopback = sluice_config::HttpOptions::default().host;
    for host in [&mut config.http_options.host, &mut config.grpc_options.host, &mut config.admin_options.host]
    {
        if *host == loopback {
            *host = "0.0.0.0".into();
        }
    }
}

/// Submits `config` to Ray and waits until it serves; prints where.
pub fn submit(config: &Config, s: Submit) -> ExitCode {
    // Checked as the job will listen, before anything is packaged and sent (a clash the job's
    // changes make, `http_options.port: 8266` beside the moved admin port, failed the job after
    // its upload, naming a port the config did not).
    let mut in_the_job = config.clone();
    as_in_the_job(&mut in_the_job);
    if let Err(code) = super::run::check_addresses(&in_the_job) {
        eprintln!(
            "(as the job on Ray listens: the admin API's default port 8265 moved to 8266 beside Ray's dashboard, \
             and loopback hosts on 0.0.0.0)"
        );
        return code;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(submit_and_wait(config, s)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn submit_and_wait(config: &Config, s: Submit) -> Result<(), String> {
    if let Some(first) = unsupported_on_ray(config, true).into_iter().next() {
        return Err(first);
    }
    let admin_tls = config.admin_options.tls.as_ref();
    if admin_tls.is_some_and(|t| t.client_ca_file.is_some()) && s.admin_tls.cert.is_none() {
        return Err("admin_options.tls.client_ca_file: the admin API asks for a client certificate, which \
                    `sluice run --ray` needs to follow the job there; pass --cert (and --key)"
            .into());
    }
    // Made before anything is uploaded: a file that cannot be read fails now.
    let admin_client = s.admin_tls.client(reqwest::Client::builder().timeout(Duration::from_secs(5)))?;
    // This machine's, looked for before Ray is asked anything.
    let ort = s.onnxruntime.clone()?;
    let jobs = Jobs::new(&s.address, s.ray_token.clone());
    let ray_version = jobs.check_version().await.map_err(|e| e.to_string())?;
    let ray = config.cluster.ray.clone().unwrap_or_default();
    let working_dir = match &s.working_dir {
        Some(d) => d.clone(),
        None => config.source.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")),
    };
    let working_dir = std::fs::canonicalize(&working_dir)
        .map_err(|e| format!("working dir `{}`: {e}", working_dir.display()))?;
    let source =
        std::fs::canonicalize(&config.source).map_err(|e| format!("`{}`: {e}", config.source.display()))?;
    let config_rel = source.strip_prefix(&working_dir).map_err(|_| {
        format!("the config `{}` is not inside the working dir `{}`", source.display(), working_dir.display())
    })?;
    eprintln!("packaging {} for Ray {ray_version} at {}", working_dir.display(), s.address);
    let (zip, name) = package(&working_dir, &ort)?;
    eprintln!("uploading {name} ({:.1} MB)", zip.len() as f64 / 1e6);
    let uri = jobs.upload_package(&name, zip).await.map_err(|e| e.to_string())?;
    let stem = config_rel.file_stem().and_then(|s| s.to_str()).unwrap_or("app");
    let id = format!("sluice-{}", stem.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-"));
    let (grace_s, kill_grace_s, stop_wait_s) = stop_times(config);
    let mut env = serde_json::Map::new();
    env.insert("ORT_DYLIB_PATH".into(), format!("{OWN}/libonnxruntime.so").into());
    env.insert("RAY_JOB_STOP_WAIT_TIME_S".into(), format!("{stop_wait_s}").into());
    if let Some(t) = &s.admin_token {
        env.insert(config.admin_options.token_env.clone(), t.clone().into());
    }
    if let Some(l) = &s.rust_log {
        env.insert("RUST_LOG".into(), l.clone().into());
    }
    let mut entrypoint = format!(
        "python -m sluice_ray.driver --namespace {} --grace-s {} --kill-grace-s {} -- {OWN}/sluice run {} --in-ray-job",
        shell_word(&ray.namespace),
        grace_s,
        kill_grace_s,
        shell_word(&config_rel.display().to_string()),
    );
    for word in &s.overrides {
        entrypoint.push(' ');
        entrypoint.push_str(&shell_word(word));
    }
    let job = JobRequest {
        entrypoint,
        submission_id: id.clone(),
        runtime_env: serde_json::json!({"working_dir": uri, "env_vars": env}),
        metadata: [("sluice_config".to_string(), config_rel.display().to_string())].into(),
        ..JobRequest::default()
    };
    let fresh = jobs.submit(&job, true).await.map_err(|e| e.to_string())?;
    eprintln!("{} job {id}", if fresh { "submitted" } else { "already running:" });
    let admin = admin_url(&s.address, config)?;
    let apps: Vec<&str> = config.applications.iter().map(|a| a.name.as_str()).collect();
    let apps = Expected { apps, repository: config.model_repository.is_some() };
    let timeout = Duration::from_secs_f64(ray.start_timeout_s);
    wait_healthy(&jobs, &id, &admin_client, &admin, s.admin_token.as_deref(), &apps, timeout).await?;
    let host = host_of(&s.address)?;
    outln!("Sluice is running on Ray {ray_version} as job {id}");
    outln!("  REST   {}://{host}:{}", scheme(config.http_options.tls.is_some()), config.http_options.port);
    if config.grpc_options.enabled {
        outln!("  gRPC   {host}:{}", config.grpc_options.port);
    }
    let mut status = format!("sluice status --address {admin}");
    for (flag, path) in
        [("--cacert", &s.admin_tls.cacert), ("--cert", &s.admin_tls.cert), ("--key", &s.admin_tls.key)]
    {
        if let Some(p) = path {
            status.push_str(&format!(" {flag} {}", shell_word(&p.display().to_string())));
        }
    }
    outln!("  admin  {admin}   ({status})");
    Ok(())
}

/// The host of a URL (`http://HOST:PORT/...`).
fn host_of(url: &str) -> Result<String, String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    if host.is_empty() { Err(format!("`{url}` has no host")) } else { Ok(host.to_string()) }
}

/// Where the admin API of the job answers: the Ray head, on the admin port (https with
/// `admin_options.tls`).
fn admin_url(ray_address: &str, config: &Config) -> Result<String, String> {
    let scheme = scheme(config.admin_options.tls.is_some());
    Ok(format!("{scheme}://{}:{}", host_of(ray_address)?, sluice_server::ray_admin_port(config)))
}

fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// Waits until the job runs and every deployment of the admin API's status is healthy; on a
/// failed job, the error carries the tail of its log.
async fn wait_healthy(
    jobs: &Jobs,
    id: &str,
    http: &reqwest::Client,
    admin: &str,
    token: Option<&str>,
    apps: &Expected<'_>,
    timeout: Duration,
) -> Result<(), String> {
    let until = Instant::now() + timeout;
    let mut last = String::from("the job has not started");
    while Instant::now() < until {
        // A dashboard that does not answer for a moment (restarting, a proxy in between) is
        // asked again until the deadline, as the admin API is; the job itself may be fine.
        let job = match jobs.job(id).await {
            Ok(job) => job.ok_or_else(|| format!("Ray lost job {id}"))?,
            Err(e) => {
                last = format!("Ray's dashboard did not answer: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if job.is_terminal() {
            let logs = jobs.logs(id).await.unwrap_or_default();
            let tail: Vec<&str> = logs.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "job {id} ended {} ({}); last lines of its log:\n{}",
                job.status,
                job.message.unwrap_or_default(),
                tail.join("\n")
            ));
        }
        if job.status == "RUNNING" {
            let mut req = http.get(format!("{admin}/api/sluice/status"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => match r.json::<Status>().await {
                    Ok(status) => match unhealthy(&status, apps) {
                        None => return Ok(()),
                        Some(why) => last = why,
                    },
                    Err(e) => last = format!("admin API answered something else: {e}"),
                },
                Ok(r) => last = format!("admin API answered {}", r.status()),
                Err(e) => {
                    last = format!(
                        "admin API not reachable yet at {admin}: {}",
                        sluice_server::error::with_causes(&e)
                    )
                }
            }
        } else {
            last = format!("job {id} is {}", job.status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("not healthy within {} s: {last}", timeout.as_secs()))
}

/// What the config deploys: its applications, and whether it has a model repository.
struct Expected<'a> {
    apps: Vec<&'a str>,
    repository: bool,
}

/// The first deployment that is not healthy yet, and why.
fn unhealthy(status: &Status, expected: &Expected<'_>) -> Option<String> {
    // The admin API answers while the models still load: an application not listed yet is
    // not deployed yet.
    // A config with no application is up once the admin API answers, and a model repository
    // once the models it lists are deployed (an empty one: at once; waiting for an application
    // to appear there never ended).
    if let Some(app) = expected.apps.iter().find(|a| !status.applications.contains_key(**a)) {
        return Some(format!("{app}: not deployed yet"));
    }
    let name = sluice_config::REPOSITORY_APPLICATION;
    if expected.repository {
        match &status.repository {
            None => return Some(format!("{name}: not listed yet")),
            Some(r) if !r.models.is_empty() && !status.applications.contains_key(name) => {
                return Some(format!("{name}: not deployed yet"));
            }
            Some(_) => {}
        }
    }
    for (app, a) in &status.applications {
        if matches!(a.status, ApplicationState::Deploying | ApplicationState::DeployFailed) {
            let why = if a.message.is_empty() { "deploying" } else { a.message.as_str() };
            return Some(format!("{app}: {why}"));
        }
        for (name, d) in &a.deployments {
            if d.status != DeploymentState::Healthy {
                let waiting: Vec<&String> = d.versions.iter().flat_map(|v| &v.waiting).collect();
                let why = if waiting.is_empty() {
                    "starting".to_string()
                } else {
                    waiting.iter().map(|w| w.as_str()).collect::<Vec<_>>().join("; ")
                };
                return Some(format!("{app}/{name}: {why}"));
            }
        }
    }
    None
}

/// A word for the shell that runs the entrypoint.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The working dir as a zip: the folder's files, this binary (stripped of debug info when
/// `strip` is there), ONNX Runtime, and the bridge; named by its content hash.
fn package(dir: &Path, ort: &Path) -> Result<(Vec<u8>, String), String> {
    let mut zip = super::package::Package::new();
    zip.add_dir(dir, &[OWN, "sluice_ray"], false)?;
    for (name, text) in BRIDGE {
        zip.add(name, text.as_bytes(), false)?;
    }
    zip.add(&format!("{OWN}/sluice"), &own_binary()?, true)?;
    let lib = std::fs::read(ort).map_err(|e| format!("reading `{}`: {e}", ort.display()))?;
    zip.add(&format!("{OWN}/libonnxruntime.so"), &lib, false)?;
    zip.finish("sluice")
}

/// This binary, without its debug info when `strip` is on the machine (the upload is capped
/// at 100 MiB and a debug build is far larger).
fn own_binary() -> Result<Vec<u8>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let stripped = std::env::temp_dir().join(format!("sluice-stripped-{}", std::process::id()));
    let ok = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    let path = if ok { &stripped } else { &exe };
    let data = std::fs::read(path).map_err(|e| format!("reading `{}`: {e}", path.display()));
    let _ = std::fs::remove_file(&stripped);
    data
}

/// Inside the job: `config` served with replicas as Ray actors.
pub fn run_in_job(
    mut config: Config,
    logs: super::run::Logs,
    ort: super::OrtArgs,
    ort_env: Option<PathBuf>,
    admin_token: Option<String>,
    store_env: sluice_controller::StoreEnv,
) -> ExitCode {
    if let Some(first) = unsupported_on_ray(&config, false).into_iter().next() {
        eprintln!("error: {first}");
        return ExitCode::FAILURE;
    }
    as_in_the_job(&mut config);
    // The cluster network is the trust boundary Ray's own dashboard (which runs any job it is
    // sent) already draws: without a token the admin API is as open as it, and says so (on
    // standard error: the log is not set up before the server runs). The inference ports,
    // often exposed beyond the cluster, keep repository load and unload closed.
    let admin_open_on_cluster =
        admin_token.as_deref().is_none_or(str::is_empty) && !config.admin_options.host.starts_with("127.");
    if admin_open_on_cluster {
        eprintln!(
            "warning: admin API open to the cluster network without a token, as Ray's dashboard is; \
             set ${} when submitting to require one",
            config.admin_options.token_env
        );
    }
    let options = ray_options(
        &config,
        admin_token.clone(),
        std::env::current_exe().unwrap_or_default(),
        std::env::current_dir().unwrap_or_default(),
    );
    super::run::run_with(
        config,
        logs,
        ort,
        ort_env,
        move || {
            let (commands, events) = bridge::stdio();
            let ray: Arc<RayCluster> = RayCluster::start(commands, events, options);
            StartOptions {
                admin_token,
                cluster: Cluster::Ray(ray),
                store_env,
                as_written: None,
                follow: None,
                replica: false,
                admin_open_on_cluster,
            }
        },
        |_| {},
    )
}

/// How the controller runs replicas (and `EveryNode` proxies) on Ray for `config`: the config's
/// process settings (`worker_threads` for proxies, `release_startup_memory` for both) go to
/// their command lines.
fn ray_options(
    config: &Config,
    admin_token: Option<String>,
    binary: PathBuf,
    working_dir: PathBuf,
) -> RayOptions {
    let proxies = (config.proxy_location == sluice_config::ProxyLocation::EveryNode).then(|| ProxyOptions {
        admin_port: config.admin_options.port,
        http_port: config.http_options.port,
        grpc_port: config.grpc_options.enabled.then_some(config.grpc_options.port),
        token: admin_token,
        worker_threads: config.worker_threads,
        release_startup_memory: config.release_startup_memory,
        settings: sluice_config::ProxySettings::of(config),
    });
    RayOptions {
        binary,
        working_dir,
        grace: Duration::from_secs_f64(config.graceful_shutdown_timeout_s),
        startup_timeout: Duration::from_secs_f64(
            config.cluster.ray.as_ref().map_or(DEFAULT_REPLICA_START_S, |r| r.replica_start_timeout_s),
        ),
        proxies,
        release_startup_memory: config.release_startup_memory,
        max_body_bytes: config.http_options.max_body_bytes,
    }
}

/// `cluster.ray.replica_start_timeout_s` where the config has no `cluster.ray`.
const DEFAULT_REPLICA_START_S: f64 = 300.0;

/// The job's stop, in seconds: how long its driver gives the controller to stop before it
/// kills the actors (the controller's own stop: `shutdown_delay_s` serving while not ready,
/// then the drain, and a margin); how long each actor it kills then has (a proxy's stop is the
/// same delay and drain: the driver's default of 5 s cut a proxy in its delay); and Ray's wait
/// between the stop signal and SIGKILL (room for both, and the driver's own margin of 3).
fn stop_times(config: &Config) -> (u64, u64, u64) {
    let stop = (config.shutdown_delay_s + config.graceful_shutdown_timeout_s).ceil() as u64;
    (stop + 2, stop + 5, stop * 2 + 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::admin::ClientTls;

    /// A config with no application (a repository still empty) is up once the admin API
    /// answers; one with applications waits for each.
    #[test]
    fn a_config_with_no_application_is_up_once_the_admin_answers() {
        let status: Status =
            serde_json::from_value(serde_json::json!({"applications": {}, "events": []})).unwrap();
        let expect = |apps: Vec<&'static str>, repository| Expected { apps, repository };
        assert_eq!(unhealthy(&status, &expect(vec![], false)), None);
        assert_eq!(unhealthy(&status, &expect(vec!["a"], false)).as_deref(), Some("a: not deployed yet"));
        assert_eq!(
            unhealthy(&status, &expect(vec![], true)).as_deref(),
            Some("repository: not listed yet"),
            "a repository not listed yet"
        );
        // A repository that lists models: up once they are deployed; an empty one at once.
        let with = |models: serde_json::Value| -> Status {
            let repository = serde_json::json!({"url": "s3://m/r", "reachable": true, "last_scan_s": 1.0, "models": models, "downloaded_bytes": 0});
            serde_json::from_value(
                serde_json::json!({"applications": {}, "events": [], "repository": repository}),
            )
            .unwrap()
        };
        assert_eq!(
            unhealthy(&with(serde_json::json!({"iris": [1]})), &expect(vec![], true)).as_deref(),
            Some("repository: not deployed yet")
        );
        assert_eq!(unhealthy(&with(serde_json::json!({})), &expect(vec![], true)), None);
    }

    /// A dashboard that does not answer once (restarting) is asked again, not the end of the
    /// wait: here it then reports the job failed, and the wait says so with its log.
    #[tokio::test]
    async fn a_dashboard_that_does_not_answer_once_is_asked_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for n in 0.. {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 2048];
                let read = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    continue; // closed without an answer
                }
                let request = String::from_utf8_lossy(&buf[..read]).into_owned();
                let body = match request.split(' ').nth(1).unwrap_or("").ends_with("/logs") {
                    true => serde_json::json!({"logs": "loading\nout of memory\n"}),
                    false => serde_json::json!({"submission_id": "j", "status": "FAILED", "entrypoint": "x"}),
                }
                .to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let jobs = Jobs::new(&format!("http://{addr}"), None);
        let http = reqwest::Client::new();
        let none = Expected { apps: Vec::new(), repository: false };
        let e = wait_healthy(&jobs, "j", &http, "http://127.0.0.1:9", None, &none, Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(e.contains("ended FAILED") && e.contains("out of memory"), "{e}");
    }

    /// The config's process settings reach the replicas' and proxies' options.
    #[test]
    fn ray_options_carry_the_process_settings() {
        let mut config = Config::default();
        let options = ray_options(&config, None, "sluice".into(), "/w".into());
        assert!(options.release_startup_memory && options.proxies.is_none());
        config.proxy_location = sluice_config::ProxyLocation::EveryNode;
        config.release_startup_memory = false;
        config.worker_threads = Some(3);
        config.graceful_shutdown_timeout_s = 7.0;
        assert_eq!(stop_times(&config), (9, 12, 24));
        config.shutdown_delay_s = 5.0;
        let (grace, kill, wait) = stop_times(&config);
        assert_eq!(
            (grace, kill, wait),
            (14, 17, 34),
            "the delay counts in the controller's and each proxy's stop"
        );
        assert!(grace + kill + 3 <= wait, "both fit Ray's wait, with the driver's margin");
        config.shutdown_delay_s = 0.0;
        let options = ray_options(&config, Some("t".into()), "sluice".into(), "/w".into());
        assert!(!options.release_startup_memory);
        assert_eq!(options.startup_timeout, Duration::from_secs(300), "no cluster.ray: the default");
        config.cluster.ray =
            Some(sluice_config::RayOptions { replica_start_timeout_s: 1800.0, ..Default::default() });
        let options = ray_options(&config, Some("t".into()), "sluice".into(), "/w".into());
        assert_eq!(
            options.startup_timeout,
            Duration::from_secs(1800),
            "a replica may take this long to start"
        );
        assert_eq!(options.grace, Duration::from_secs(7));
        let proxies = options.proxies.expect("EveryNode starts proxies");
        assert!(!proxies.release_startup_memory);
        assert_eq!((proxies.worker_threads, proxies.token.as_deref()), (Some(3), Some("t")));
    }

    /// Settings Ray cannot honour are refused, naming them; the default config is not.
    #[test]
    fn settings_ray_cannot_honour_are_refused_by_name() {
        let mut config = Config::default();
        assert!(unsupported_on_ray(&config, true).is_empty());
        config.http_options.tls = Some(
            serde_json::from_value(serde_json::json!({"cert_file": "c.pem", "key_file": "k.pem"})).unwrap(),
        );
        assert!(unsupported_on_ray(&config, true).is_empty(), "TLS on the head alone is fine");
        config.proxy_location = sluice_config::ProxyLocation::EveryNode;
        let refused = unsupported_on_ray(&config, false);
        assert_eq!(refused.len(), 1);
        assert!(refused[0].contains("EveryNode does not carry http_options.tls"), "{refused:?}");
        config.admin_options.enabled = false;
        assert!(unsupported_on_ray(&config, false)[0].contains("admin_options.enabled is false"));
        // A job submitted by hand with frontends on the head only needs no admin API.
        config.proxy_location = sluice_config::ProxyLocation::HeadOnly;
        config.http_options.tls = None;
        assert!(unsupported_on_ray(&config, false).is_empty());
        assert!(unsupported_on_ray(&config, true)[0].contains("admin_options.enabled is false"));
        // The proxies follow the admin API: another loopback name than the default (which the
        // job binds to every address) would keep it to the head.
        config.admin_options.enabled = true;
        config.proxy_location = sluice_config::ProxyLocation::EveryNode;
        for host in ["localhost", "::1", "[::1]", "127.0.0.2"] {
            config.admin_options.host = host.into();
            let refused = unsupported_on_ray(&config, true);
            assert!(refused.len() == 1 && refused[0].contains("keeps to the head"), "{host}: {refused:?}");
        }
        for host in ["127.0.0.1", "0.0.0.0", "10.0.0.1"] {
            config.admin_options.host = host.into();
            assert!(unsupported_on_ray(&config, true).is_empty(), "{host}");
        }
        // A port the job would pick itself is one no one finds.
        config.admin_options.port = 0;
        config.http_options.port = 0;
        let refused = unsupported_on_ray(&config, true);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0].starts_with("http_options.port is 0")
                && refused[1].starts_with("admin_options.port is 0")
        );
        config.grpc_options.enabled = false;
        config.grpc_options.port = 0;
        assert_eq!(unsupported_on_ray(&config, true).len(), 2, "a disabled listener's port is not looked at");
    }

    fn tls(client_ca: bool) -> sluice_config::TlsOptions {
        let mut tls = serde_json::json!({"cert_file": "c.pem", "key_file": "k.pem"});
        if client_ca {
            tls["client_ca_file"] = "ca.pem".into();
        }
        serde_json::from_value(tls).unwrap()
    }

    /// The job's admin API is followed over https when it serves TLS.
    #[test]
    fn the_admin_url_follows_admin_tls() {
        let mut config = Config::default();
        assert_eq!(admin_url("http://10.0.0.5:8265", &config).unwrap(), "http://10.0.0.5:8266");
        config.admin_options.tls = Some(tls(false));
        assert_eq!(admin_url("http://10.0.0.5:8265", &config).unwrap(), "https://10.0.0.5:8266");
        config.admin_options.port = 9443;
        assert_eq!(admin_url("https://head.example/", &config).unwrap(), "https://head.example:9443");
    }

    /// An admin API that asks for a client certificate without --cert, or a --cacert that
    /// cannot be read, fails before anything is uploaded (not after start_timeout_s).
    #[test]
    fn admin_tls_the_command_cannot_follow_is_refused_up_front() {
        let submit = |config: &Config, admin_tls: ClientTls| {
            let s = Submit {
                address: "http://127.0.0.1:1".into(),
                ray_token: None,
                admin_token: None,
                working_dir: None,
                onnxruntime: Err("no library in this test".into()),
                rust_log: None,
                overrides: Vec::new(),
                admin_tls,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(submit_and_wait(config, s)).unwrap_err()
        };
        let no_files = || ClientTls { cacert: None, cert: None, key: None };
        let mut config = Config::default();
        config.admin_options.tls = Some(tls(true));
        let err = submit(&config, no_files());
        assert!(err.contains("admin_options.tls.client_ca_file") && err.contains("--cert"), "{err}");
        config.admin_options.tls = Some(tls(false));
        let missing = ClientTls { cacert: Some("/nonexistent/ca.pem".into()), ..no_files() };
        let err = submit(&config, missing);
        assert!(err.contains("cannot read /nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn hosts_and_shell_words() {
        assert_eq!(host_of("http://127.100.0.1:8265").unwrap(), "127.100.0.1");
        assert_eq!(host_of("https://head.example/").unwrap(), "head.example");
        assert_eq!(shell_word("app.yaml"), "app.yaml");
        assert_eq!(shell_word("my app's.yaml"), r"'my app'\''s.yaml'");
        assert_eq!(shell_word(""), "''", "an empty word stays a word");
    }
}
