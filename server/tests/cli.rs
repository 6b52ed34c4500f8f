//! The `sluice` binary: `validate` exit codes and messages (every model it serves loaded,
//! canaries and repository versions too), `run` serving real requests, SIGTERM draining a
//! request in flight, `deploy` / `status` / `rollout` / `delete` against a running server, and
//! a missing ONNX Runtime reported in one line without a panic.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-configs");
    std::fs::create_dir_all(&dir).unwrap();
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let path = dir.join(name);
    std::fs::write(&path, text.replace("MODELS", models.to_str().unwrap())).unwrap();
    path
}

#[test]
fn validate_accepts_the_example_config() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    let out = sluice().arg("validate").arg(&example).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn validate_reports_every_error_with_location() {
    let path = write_config(
        "bad.yaml",
        "applications:\n  - name: a\n    deployments:\n      - name: m\n        model: missing.onnx\n      - name: m\n        model: MODELS/iris/model.onnx\n",
    );
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:5:16: applications[0].deployments[0].model: model file"), "{err}");
    assert!(err.contains("bad.yaml:6:") && err.contains("duplicate deployment name `m`"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");

    let path = write_config("typo.yaml", "applications:\n  - name: a\n    deploymens: []\n");
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("typo.yaml:3:5") && err.contains("did you mean `deployments`?"), "{err}");
}

#[test]
fn validate_loads_models_and_names_a_broken_one() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(dir.join("broken.onnx"), b"not an onnx file").unwrap();
    let path = write_config(
        "broken.yaml",
        &format!(
            "applications:\n  - name: a\n    deployments:\n      - name: b\n        model: {}\n",
            dir.join("broken.onnx").display()
        ),
    );
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.yaml:5:16: b: cannot load model"), "{err}");
    // A model that loads but cannot be served with its settings: named, as `run` refuses it.
    let path = write_config(
        "unfit.yaml",
        "applications:\n  - name: a\n    deployments:\n      - {name: r, model: MODELS/reshape/model.onnx, max_batch_size: 8}\n",
    );
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("r: max_batch_size is 8 but"), "{err}");
}

/// A model repository in the test's target folder: `versions` of `flowers`, each a copy of
/// the iris fixture or, when `false`, a file that is not a model.
fn repository(name: &str, versions: &[(u32, bool)]) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&repo);
    let iris = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/iris/model.onnx");
    for &(v, good) in versions {
        let d = repo.join("flowers").join(v.to_string());
        std::fs::create_dir_all(&d).unwrap();
        match good {
            true => std::fs::copy(&iris, d.join("model.onnx")).map(drop).unwrap(),
            false => std::fs::write(d.join("model.onnx"), b"not an onnx file").unwrap(),
        }
        // Complete: the ready marker is written last.
        std::fs::write(d.join("READY"), b"").unwrap();
    }
    repo
}

#[test]
fn validate_loads_canaries_and_every_repository_version() {
    let broken = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("broken-canary.onnx");
    std::fs::write(&broken, b"not an onnx file").unwrap();
    let config = |canary: &str, repo: &PathBuf| {
        format!(
            "model_repository: {{path: {}, version_policy: all, poll_interval_s: 0}}\napplications:\n  - name: a\n    deployments:\n      - name: m\n        model: MODELS/iris/model.onnx\n        canary: {{model: {canary}, version: \"2\"}}\n",
            repo.display()
        )
    };
    // A broken shadow is named too (it was loaded by `run` only, which then refused to start).
    let repo = repository("validate-repo-shadow", &[(1, true)]);
    let text = config("MODELS/iris/model.onnx", &repo).replace(
        "        canary:",
        &format!("        shadow: {{model: {}, version: \"3\"}}\n        canary:", broken.display()),
    );
    let out = sluice().arg("validate").arg(write_config("broken-shadow.yaml", &text)).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(": m shadow version 3: cannot load model"), "{err}");
    // A broken canary and a broken older repository version: both named, nothing else.
    let repo = repository("validate-repo-broken", &[(1, false), (2, true)]);
    let path = write_config("broken-versions.yaml", &config(broken.to_str().unwrap(), &repo));
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(": m canary version 2: cannot load model"), "{err}");
    assert!(err.contains(": flowers version 1: cannot load model"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
    // All good: the deployment, its canary and both repository versions were loaded.
    let repo = repository("validate-repo-good", &[(1, true), (2, true)]);
    let path = write_config("good-versions.yaml", &config("MODELS/iris/model.onnx", &repo));
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok (1 application(s), 2 deployment(s), 4 model(s) loaded)"), "{stdout}");
    // A repository model with a configured deployment's name: refused, as `run` refuses it.
    let both = config("MODELS/iris/model.onnx", &repo).replace("- name: m\n", "- name: flowers\n");
    let path = write_config("in-both.yaml", &both);
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model `flowers` is both in the model repository and in the config"), "{err}");
    // And one with a pipeline's name (it took the pipeline's route, unannounced).
    let pipeline = "    pipeline:\n      name: flowers\n      inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\n      steps: [{name: s, deployment: m, inputs: {input: x}, outputs: {probabilities: p}}]\n      outputs: [p]\n";
    let both = format!("{}{pipeline}", config("MODELS/iris/model.onnx", &repo));
    let path = write_config("in-both-pipeline.yaml", &both);
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model `flowers` is both in the model repository and in the config"), "{err}");
}

#[test]
fn missing_onnxruntime_is_one_clear_line() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    let out = sluice()
        .args(["run", example.to_str().unwrap(), "--onnxruntime", "/nonexistent/libonnxruntime.so"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/libonnxruntime.so") && err.contains("install-onnxruntime.sh"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A port override that puts gRPC on the REST port would drop `grpc_options.tls` (the REST
/// listener, without TLS, serves both): refused as the config check refuses it, before
/// anything starts (here ONNX Runtime would be looked for next, and is not there).
#[test]
fn an_override_that_drops_grpc_tls_is_refused() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-configs");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["grpc-cert.pem", "grpc-key.pem"] {
        std::fs::write(dir.join(f), b"").unwrap();
    }
    let path = write_config(
        "grpc-tls.yaml",
        "http_options: {port: 18000}\ngrpc_options: {port: 18001, tls: {cert_file: grpc-cert.pem, key_file: grpc-key.pem}}\n",
    );
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = sluice()
            .arg("run")
            .arg(&path)
            .args(args)
            .args(["--onnxruntime", "/nonexistent/libonnxruntime.so"])
            .env_remove("SLUICE_HTTP_PORT")
            .env_remove("SLUICE_HTTP_HOST")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (args, env) in [
        (&["--grpc-port", "18000"][..], &[][..]),
        (&["--http-port", "18001"][..], &[][..]),
        (&[][..], &[("SLUICE_GRPC_PORT", "18000")][..]),
    ] {
        let (code, err) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains("grpc-tls.yaml: grpc_options.tls: gRPC shares the REST port here"), "{err}");
        assert!(err.contains("1 error(s) in") && err.contains("--grpc-port"), "{err}");
    }
    // Separate ports pass the check (and stop at the missing ONNX Runtime).
    let (code, err) = run(&["--grpc-port", "18002"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
}

/// `sluice run CONFIG` on free ports, logging at info to a piped stderr.
fn spawn_run(config: &std::path::Path) -> Child {
    spawn_run_env(config, &[])
}

/// [`spawn_run`] with more environment variables.
fn spawn_run_env(config: &std::path::Path, env: &[(&str, &str)]) -> Child {
    sluice()
        .envs(env.iter().copied())
        .arg("run")
        .arg(config)
        .args(["--http-port", "0", "--grpc-port", "0", "--admin-port", "0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A `sluice run` child on free ports, with the addresses it printed. Killed when dropped
/// without [`Running::terminate`] (a test that fails on the way leaves no server running).
struct Running {
    child: KillOnDrop,
    http: String,
    admin: String,
    log: std::thread::JoinHandle<String>,
    /// What it has logged so far.
    logged: std::sync::Arc<std::sync::Mutex<String>>,
}

/// A child killed and reaped when dropped, unless taken out first: a test that fails while a
/// server runs leaves none behind.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("not taken")
    }

    fn id(&self) -> u32 {
        self.0.as_ref().expect("not taken").id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Running {
    fn start(config: &std::path::Path) -> Self {
        Self::start_env(config, &[])
    }

    fn start_env(config: &std::path::Path, env: &[(&str, &str)]) -> Self {
        let mut child = KillOnDrop(Some(spawn_run_env(config, env)));
        let stderr = child.child().stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logged = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let so_far = logged.clone();
        // Keep reading stderr to the end, so the server never writes to a closed pipe.
        let log = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines() {
                let line = line.unwrap();
                for (what, marker) in [
                    ("http", "REST frontend listening on http://"),
                    ("admin", "admin API listening on http://"),
                ] {
                    if let Some(i) = line.find(marker) {
                        let addr =
                            line[i + marker.len()..].split_whitespace().next().unwrap_or("").to_string();
                        let _ = tx.send((what, addr));
                    }
                }
                all.push_str(&line);
                all.push('\n');
                so_far.lock().unwrap().push_str(&format!("{line}\n"));
            }
            all
        });
        let (mut http, mut admin) = (None, None);
        while http.is_none() || admin.is_none() {
            match rx.recv_timeout(Duration::from_secs(60)).expect("the server printed its addresses") {
                ("http", a) => http = Some(a),
                (_, a) => admin = Some(a),
            }
        }
        let running = Self { child, http: http.unwrap(), admin: admin.unwrap(), log, logged };
        let until = Instant::now() + Duration::from_secs(60);
        while running.get(&running.url("/v2/health/ready")).0 != 200 {
            assert!(Instant::now() < until, "the server never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Waits until the server has logged `needle` (at most 30 s, then panics with the log).
    fn wait_logged(&self, needle: &str) {
        let until = Instant::now() + Duration::from_secs(30);
        while !self.logged.lock().unwrap().contains(needle) {
            assert!(Instant::now() < until, "never logged `{needle}`: {}", self.logged.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A GET on its own connection: status and body.
    fn get(&self, url: &str) -> (u16, String) {
        block_on(async {
            match reqwest::get(url).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap()),
                Err(_) => (0, String::new()),
            }
        })
    }

    /// Runs a `sluice` admin subcommand against this server: exit code, stdout, stderr.
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        admin_cli(&format!("http://{}", self.admin), args)
    }

    /// SIGTERM, then the exit status and everything the server logged.
    fn terminate(mut self) -> (ExitStatus, String) {
        let mut child = self.child.0.take().expect("not taken");
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        let status = child.wait().unwrap();
        (status, self.log.join().unwrap())
    }
}

fn admin_cli(address: &str, args: &[&str]) -> (i32, String, String) {
    let out =
        sluice().args(args).env("SLUICE_ADDRESS", address).env_remove("SLUICE_ADMIN_TOKEN").output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// POSTs `body` (with an optional `x-sluice-version`): status and JSON answer.
fn post(url: &str, body: &str, pin: Option<&str>) -> (u16, Value) {
    block_on(async {
        let mut req = reqwest::Client::new().post(url).body(body.to_string());
        if let Some(v) = pin {
            req = req.header("x-sluice-version", v);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    })
}

const IRIS_BODY: &str =
    r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[6.3,3.3,6.0,2.5]}]}"#;

#[test]
fn run_serves_until_terminated() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    let s = Running::start(&example);
    let (status, out) = post(&s.url("/v2/models/iris/infer"), IRIS_BODY, None);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outputs"][0]["data"][0], 2, "virginica: {out}");
    // The example's pipeline answers its plain-JSON route with class names.
    let (_, named) =
        post(&s.url("/iris"), r#"{"features": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}"#, None);
    assert_eq!(named["label"], json!(["setosa", "virginica"]), "{named}");
    // SIGTERM: graceful shutdown, exit 0.
    let (status, log) = s.terminate();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("shutting down"), "{log}");
}

/// `worker_threads` sets how many worker threads the async runtime starts, over tokio's own
/// `TOKIO_WORKER_THREADS` (set to a value it refuses alone here: the key wins, and the variable
/// is not read): the log line gives the runtime's own count (tokio's blocking threads carry
/// the same thread name, so a count of threads by name would include them).
#[test]
fn worker_threads_sets_the_runtime_threads() {
    let config = write_config(
        "workers.yaml",
        "worker_threads: 3\napplications:\n  - name: a\n    deployments:\n      - {name: iris, model: MODELS/iris/model.onnx}\n",
    );
    let s = Running::start_env(&config, &[("TOKIO_WORKER_THREADS", "abc")]);
    let (status, out) = post(&s.url("/v2/models/iris/infer"), IRIS_BODY, None);
    assert_eq!(status, 200, "{out}");
    let (status, log) = s.terminate();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("; 3 worker threads"), "{log}");

    // Without the key, tokio's default: here the environment's count.
    let config = write_config(
        "workers-default.yaml",
        "applications:\n  - name: a\n    deployments:\n      - {name: iris, model: MODELS/iris/model.onnx}\n",
    );
    let (status, log) = Running::start_env(&config, &[("TOKIO_WORKER_THREADS", "5")]).terminate();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("; 5 worker threads"), "{log}");
}

/// Resident memory (`Rss`, kB) of process `pid`'s mappings of `file`.
#[cfg(target_os = "linux")]
fn resident_kib_of(pid: u32, file: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let file = file.to_str().unwrap();
    let mut in_file = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if line.split_whitespace().next().is_some_and(|f| f.contains('-') && !f.ends_with(':')) {
            in_file = line.ends_with(file);
        } else if in_file {
            kib += sluice_server::memory::status_kib(line, "Rss:").unwrap_or(0);
        }
    }
    kib
}

/// How much of `file` is in the page cache, kB (`mincore` on a mapping of it, which reads
/// nothing in).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn cached_kib(file: &std::path::Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0;
    }
    // SAFETY: sysconf reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: a read-only shared mapping of an open file, only given to mincore (never read
    // through), and unmapped before returning; `resident` has one byte per page of it.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(libc::mincore(addr, len, resident.as_mut_ptr()), 0);
        libc::munmap(addr, len);
    }
    resident.iter().filter(|&&r| r & 1 == 1).count() as u64 * page as u64 / 1024
}

/// A private copy of ONNX Runtime's library for one server (see below), removed when dropped,
/// also when an assertion fails first.
#[cfg(target_os = "linux")]
struct LibraryCopy(PathBuf);

#[cfg(target_os = "linux")]
impl LibraryCopy {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("memory-ort");
        std::fs::create_dir_all(&dir).unwrap();
        // Named by this test process too: another run's server may still map its own copy.
        let path = dir.join(format!("libonnxruntime-{name}-{}.so", std::process::id()));
        std::fs::copy(std::env::var("ORT_DYLIB_PATH").unwrap(), &path).unwrap();
        // Written back first: the kernel does not page out pages still to be written.
        std::fs::File::open(&path).unwrap().sync_all().unwrap();
        Self(path)
    }
}

#[cfg(target_os = "linux")]
impl std::ops::Deref for LibraryCopy {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(target_os = "linux")]
impl Drop for LibraryCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `release_startup_memory` (on by default) pages out the code only loading ran: most of ONNX
/// Runtime's library, which registering its kernels touched, and drops it from the page cache
/// (the machine's memory, not only the process's count). With the key false, the pages stay.
/// The server answers correctly after it, reading back the code a request runs. Memory, not
/// time, is compared. Each server loads its own copy of the library: the kernel keeps a page
/// that another process maps too, and other tests' servers map the shared one. (On a tmpfs
/// target folder the copy's pages could not be paged out: they have no file on disk.)
#[cfg(target_os = "linux")]
#[test]
fn release_startup_memory_pages_out_what_loading_touched() {
    let serve = |name: &str, key: &str| {
        let config = write_config(
            &format!("memory-{name}.yaml"),
            &format!(
                "{key}applications:\n  - name: a\n    deployments:\n      - {{name: iris, model: MODELS/iris/model.onnx}}\n"
            ),
        );
        let library = LibraryCopy::new(name);
        let s = Running::start_env(&config, &[("ORT_DYLIB_PATH", library.to_str().unwrap())]);
        (s, library)
    };
    let (kept, library) = serve("kept", "release_startup_memory: false\n");
    std::thread::sleep(Duration::from_secs(1));
    let kept_kib = resident_kib_of(kept.child.id(), &library);
    let kept_cached = cached_kib(&library);
    let (status, out) = post(&kept.url("/v2/models/iris/infer"), IRIS_BODY, None);
    assert_eq!((status, &out["outputs"][0]["data"][0]), (200, &json!(2)), "{out}");
    let (status, log) = kept.terminate();
    drop(library);
    assert!(status.success(), "{status:?}: {log}");
    assert!(!log.contains("released start-up memory"), "{log}");

    let (released, library) = serve("released", "");
    // The release runs once every deployment is ready, so shortly after the ready answer; it
    // is logged once done (a SIGTERM before then ended it half-way, and the log lacked it).
    released.wait_logged("released start-up memory: resident");
    let until = Instant::now() + Duration::from_secs(30);
    let measure = || (resident_kib_of(released.child.id(), &library), cached_kib(&library));
    let (mut released_kib, mut released_cached) = measure();
    while (released_kib + 10_000 > kept_kib || released_cached + 10_000 > kept_cached)
        && Instant::now() < until
    {
        std::thread::sleep(Duration::from_millis(50));
        (released_kib, released_cached) = measure();
    }
    assert!(
        released_kib + 10_000 <= kept_kib,
        "ONNX Runtime's library resident: {released_kib} kB released, {kept_kib} kB kept"
    );
    assert!(
        released_cached + 10_000 <= kept_cached,
        "ONNX Runtime's library in the page cache: {released_cached} kB released, {kept_cached} kB kept"
    );
    let (status, out) = post(&released.url("/v2/models/iris/infer"), IRIS_BODY, None);
    assert_eq!((status, &out["outputs"][0]["data"][0]), (200, &json!(2)), "{out}");
    let (status, log) = released.terminate();
    drop(library);
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("released start-up memory: resident"), "{log}");
}

/// After the start-up release, a model loaded later (here deployed through the admin API) hands
/// back the code building its session touched: about 5 MB of ONNX Runtime's library per
/// deploy stayed resident before. The server loads its own copy of the library, as above.
#[cfg(target_os = "linux")]
#[test]
fn a_model_deployed_later_hands_back_the_code_its_load_touched() {
    let app =
        "applications:\n  - name: a\n    deployments:\n      - {name: iris, model: MODELS/iris/model.onnx}\n";
    let first = write_config("memory-deploy-1.yaml", app);
    let second = write_config(
        "memory-deploy-2.yaml",
        &format!("{app}      - {{name: mlp, model: MODELS/mlp/model.onnx, num_replicas: 2}}\n"),
    );
    let library = LibraryCopy::new("deploy");
    let s = Running::start_env(&first, &[("ORT_DYLIB_PATH", library.to_str().unwrap())]);
    let resident = || resident_kib_of(s.child.id(), &library);
    // The start-up release runs once every deployment is ready: wait until the library's
    // resident pages have fallen (about 19 MB before, 4 after) and stay put.
    let until = Instant::now() + Duration::from_secs(30);
    let mut started = resident();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = resident();
        if (now < 10_000 && now == started) || Instant::now() > until {
            break;
        }
        started = now;
    }
    assert!(started < 10_000, "the start-up release ran: {started} kB of the library resident");

    let (code, out, err) = s.cli(&["deploy", second.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let deployed = resident();
    let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,8],"data":[0,0,0,0,0,0,0,0]}]}"#;
    let (status, out) = post(&s.url("/v2/models/mlp/infer"), body, None);
    assert_eq!(status, 200, "{out}");
    let (status, out) = post(&s.url("/v2/models/iris/infer"), IRIS_BODY, None);
    assert_eq!((status, &out["outputs"][0]["data"][0]), (200, &json!(2)), "{out}");
    let (status, log) = s.terminate();
    drop(library);
    assert!(status.success(), "{status:?}: {log}");
    // Two sessions built (one per replica), each paged out what it added; the warm-ups read
    // back what the new model's calls run.
    assert!(
        deployed < started + 2_500,
        "ONNX Runtime's library resident: {started} kB before the deploy, {deployed} kB after"
    );
}

/// `log_format: json` with Sluice's debug level: a line logged during a request carries every
/// span it happened in, the request's (with the caller's trace id) first; only the innermost
/// was there, so a line inside a model call had no trace id.
#[test]
fn json_logs_carry_the_spans_of_a_request() {
    let config = write_config(
        "json-logs.yaml",
        "log_format: json\napplications:\n  - name: a\n    deployments:\n      - {name: iris, model: MODELS/iris/model.onnx}\n",
    );
    let (_child, rx) = spawn_lines(
        sluice()
            .arg("run")
            .arg(&config)
            .args(["--http-port", "0", "--grpc-port", "0", "--admin-port", "0"])
            .env("RUST_LOG", "info,sluice_server=debug,sluice_deployments=debug,tower_http=debug"),
        Stream::Stderr,
    );
    let mut seen = Vec::new();
    let url = format!("http://{}", listening_at(&rx, &mut seen));
    let until = Instant::now() + Duration::from_secs(60);
    while block_on(reqwest::get(format!("{url}/v2/health/ready"))).map_or(0, |r| r.status().as_u16()) != 200 {
        assert!(Instant::now() < until, "the server never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let status = block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{url}/v2/models/iris/infer"))
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .body(IRIS_BODY)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    });
    assert_eq!(status, 200);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no line with the request's spans; logged:\n{}", seen.join("\n")));
        let json: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = json["spans"].as_array().cloned().unwrap_or_default();
        if spans.first().is_some_and(|s| s["name"] == "request" && s["trace_id"] == trace) {
            assert_eq!(spans[0]["path"], "/v2/models/iris/infer", "{line}");
            break;
        }
        seen.push(line);
    }
}

/// Which output of a child [`spawn_lines`] reads (the other goes nowhere).
#[derive(Clone, Copy, PartialEq)]
enum Stream {
    Stdout,
    Stderr,
    /// Both, their lines into one channel as each comes.
    Both,
}

/// Starts `command` with its `stream` read line by line on a thread of its own (to the end, so
/// the child never writes to a closed pipe); killed when the child handle is dropped.
fn spawn_lines(command: &mut Command, stream: Stream) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let piped = |read: bool| if read { Stdio::piped() } else { Stdio::null() };
    let (stdout, stderr) = (stream != Stream::Stderr, stream != Stream::Stdout);
    let mut child = KillOnDrop(Some(command.stdout(piped(stdout)).stderr(piped(stderr)).spawn().unwrap()));
    let mut reads: Vec<Box<dyn std::io::Read + Send>> = Vec::new();
    if stdout {
        reads.push(Box::new(child.child().stdout.take().unwrap()));
    }
    if stderr {
        reads.push(Box::new(child.child().stderr.take().unwrap()));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    for read in reads {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(read).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

/// The address a server or proxy started with `--http-port 0` listens on, from its log (`RUST_LOG`
/// at `info` or finer, plain or JSON): the port is its own, where one picked beforehand and handed
/// to it could be taken by another process in between. The lines up to it go to `seen`.
fn listening_at(rx: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<String>) -> String {
    const MARKER: &str = "accepting connections on ";
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let line = rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no `{MARKER}` line within 60 s; logged:\n{}", seen.join("\n")));
        let addr =
            line.find(MARKER).map(|i| line[i + MARKER.len()..].split_whitespace().next().unwrap_or_default());
        let addr = addr.map(str::to_string);
        seen.push(line);
        if let Some(addr) = addr {
            return addr;
        }
    }
}

/// Starts `command` and returns what it logged up to its first line containing `needle`
/// (60 s at most), then ends it.
fn logged_until(command: &mut Command, needle: &str) -> String {
    let (_child, rx) = spawn_lines(command.env("RUST_LOG", "info").env("NO_COLOR", "1"), Stream::Stderr);
    let mut seen = String::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) else {
            panic!("no line with `{needle}` within 60 s:\n{seen}");
        };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            return seen;
        }
    }
}

/// `--worker-threads 3`, with `TOKIO_WORKER_THREADS=5` in the environment (what the runtime
/// would take without the flag), makes the command log 3 worker threads; `0` and `1025` are
/// refused (exit 2, naming the flag) before anything starts: a command that starts instead is
/// ended after 60 s and the test fails.
fn takes_worker_threads(command: impl Fn() -> Command) {
    let log = logged_until(
        command().args(["--worker-threads", "3"]).env("TOKIO_WORKER_THREADS", "5"),
        "worker threads",
    );
    assert!(log.contains("; 3 worker threads"), "{log}");
    let refused = |mut command: Command, what: &str| {
        let mut child =
            KillOnDrop(Some(command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()));
        let until = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.child().try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < until, "{what} was not refused within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.child().stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{what}: {stderr}");
        stderr
    };
    for n in ["0", "1025"] {
        let mut c = command();
        c.args(["--worker-threads", n]);
        let stderr = refused(c, &format!("--worker-threads {n}"));
        assert!(stderr.contains("--worker-threads"), "{stderr}");
    }
    // Nor does tokio's own variable, where the flag is not given: tokio panicked on these.
    for n in ["0", "abc", "100000"] {
        let mut c = command();
        c.env("TOKIO_WORKER_THREADS", n);
        let stderr = refused(c, &format!("TOKIO_WORKER_THREADS={n}"));
        assert!(stderr.contains("TOKIO_WORKER_THREADS must be 1 to 1024"), "{stderr}");
    }
}

/// The command hands back its start-up memory once ready (logged before `all deployments
/// ready`), unless given `--keep-startup-memory` (how the controller passes the config's
/// `release_startup_memory: false`).
fn takes_keep_startup_memory(command: impl Fn() -> Command) {
    let log = logged_until(&mut command(), "all deployments ready");
    assert!(log.contains("released start-up memory: resident"), "{log}");
    let log = logged_until(command().arg("--keep-startup-memory"), "all deployments ready");
    assert!(!log.contains("released start-up memory"), "{log}");
}

/// `sluice proxy --worker-threads N` (how the controller passes the config's `worker_threads`
/// to a Ray node's proxy) sizes the proxy's runtime; out of range is refused. It keeps its
/// start-up memory when told to.
#[test]
fn proxy_takes_worker_threads_and_keep_startup_memory() {
    // A controller to follow (with no models): a proxy starts once its route table is in.
    let controller = Running::start(&write_config("proxy-controller.yaml", "applications: []\n"));
    let admin = format!("http://{}", controller.admin);
    let proxy = || {
        let mut c = sluice();
        c.args(["proxy", "--controller", &admin, "--host", "127.0.0.1", "--http-port", "0"])
            .arg("--no-grpc")
            .env_remove("SLUICE_ADMIN_TOKEN");
        c
    };
    takes_worker_threads(proxy);
    takes_keep_startup_memory(proxy);
}

/// `sluice proxy --settings JSON` (how the controller passes the config's frontend limits,
/// timeouts, shutdown, logs and traces to a Ray node's proxy, which served with the defaults
/// whatever the config said) serves by them; settings out of range are refused.
#[test]
fn proxy_serves_by_the_settings_it_is_given() {
    let controller = Running::start(&write_config(
        "proxy-settings-controller.yaml",
        "applications: []
",
    ));
    let admin = format!("http://{}", controller.admin);
    let mut settings = sluice_config::ProxySettings::of(&sluice_config::Config::default());
    settings.max_body_bytes = 1000;
    settings.log_format = sluice_config::LogFormat::Json;
    let proxy = |settings: &str| {
        let mut c = sluice();
        c.args(["proxy", "--controller", &admin, "--host", "127.0.0.1", "--http-port", "0"])
            .args(["--no-grpc", "--settings", settings])
            .env_remove("SLUICE_ADMIN_TOKEN")
            .env("RUST_LOG", "info");
        c
    };
    let (_proxy, logged) =
        spawn_lines(&mut proxy(&serde_json::to_string(&settings).unwrap()), Stream::Stderr);
    let mut lines = Vec::new();
    let addr = listening_at(&logged, &mut lines);
    for line in &lines {
        let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(json.get("fields").is_some() || json.get("message").is_some(), "{json}");
    }
    let until = Instant::now() + Duration::from_secs(60);
    while controller.get(&format!("http://{addr}/v2/health/live")).0 != 200 {
        assert!(Instant::now() < until, "the proxy never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = post(&format!("http://{addr}/v2/models/m/infer"), &"x".repeat(2000), None);
    assert_eq!(answer.0, 413, "{answer:?}");
    assert!(answer.1.to_string().contains("max_body_bytes is 1000"), "{answer:?}");

    settings.write_timeout_s = -1.0;
    let out = proxy(&serde_json::to_string(&settings).unwrap()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("http_options.write_timeout_s must be more than 0"), "{stderr}");
}

/// A proxy is ready, and prints `LISTEN` (which the controller waits for), only once it has
/// the controller's route table: one refused it (a wrong token) said ready at once and answered
/// 404 for every model, for good. It polls again meanwhile, and starts when it gets one.
#[test]
fn a_proxy_that_cannot_read_the_route_table_is_not_ready() {
    let config = write_config(
        "proxy-controller-token.yaml",
        "admin_options: {token_env: SLUICE_TEST_PROXY_TOKEN}\napplications: []\n",
    );
    let controller = Running::start_env(&config, &[("SLUICE_TEST_PROXY_TOKEN", "right")]);
    // Its log (stderr, for the address it listens on) and what it prints (stdout, `LISTEN`).
    let proxy = |token: &str| {
        let controller = format!("http://{}", controller.admin);
        spawn_lines(
            sluice()
                .args(["proxy", "--controller", &controller, "--host", "127.0.0.1"])
                .args(["--http-port", "0", "--no-grpc", "--poll-s", "0.1"])
                .env("SLUICE_ADMIN_TOKEN", token)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
            Stream::Both,
        )
    };
    let ready = |addr: &str| controller.get(&format!("http://{addr}/v2/health/ready")).0;

    let (refused, lines) = proxy("wrong");
    let mut seen = Vec::new();
    let addr = listening_at(&lines, &mut seen);
    let until = Instant::now() + Duration::from_secs(60);
    while controller.get(&format!("http://{addr}/v2/health/live")).0 != 200 {
        assert!(Instant::now() < until, "the proxy never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..10 {
        assert_eq!(ready(&addr), 503, "ready without the controller's routes");
        std::thread::sleep(Duration::from_millis(100));
    }
    seen.extend(lines.try_iter());
    assert!(!seen.iter().any(|l| l.starts_with("LISTEN")), "LISTEN printed without the controller's routes");
    drop(refused);

    let (_proxy, lines) = proxy("right");
    // Read from two pipes, `LISTEN` may come before the log line with the address.
    let mut seen = Vec::new();
    let addr = listening_at(&lines, &mut seen);
    let until = Instant::now() + Duration::from_secs(60);
    let listen = loop {
        if let Some(line) = seen.iter().find(|l| l.starts_with("LISTEN")) {
            break line.clone();
        }
        let line = lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .expect("LISTEN once the routes are in");
        seen.push(line);
    };
    assert_eq!(listen, format!("LISTEN {addr}"));
    assert_eq!(ready(&addr), 200);
}

/// A proxy is ready, and prints `LISTEN`, once it has the controller's table, whatever the
/// replicas in it say: it waited for every one to be ready, so a new node's proxy did not start
/// while one replica elsewhere was not (starting, or failing its checks), and the driver killed
/// it for never listening, again and again. Here a stand-in controller's table holds one
/// replica, not ready.
#[test]
fn a_proxy_listens_while_a_replica_in_its_table_is_not_ready() {
    let spec = |name: &str| json!({"name": name, "datatype": "FP32", "shape": [-1, 4]});
    let version = json!({
        "metadata": {"platform": "onnxruntime_onnx", "inputs": [spec("x")], "outputs": [spec("y")]},
        "settings": sluice_config::ReplicaSettings::default(),
        "max_replicas": 1,
        "replicas": [{"name": "sluice:m:1:a-0", "addr": "127.0.0.1:9", "node_id": "n1", "node_ip": "127.0.0.1", "pid": 1, "ready": false}],
    });
    let body = json!({"models": {"m": {"versions": {"1": version}, "split": [["1", 100]]}}, "pipelines": []})
        .to_string();
    let controller = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = format!("http://{}", controller.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in controller.incoming().flatten() {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(body.as_bytes()));
        }
    });
    let (_proxy, printed) = spawn_lines(
        sluice()
            .args(["proxy", "--controller", &admin, "--host", "127.0.0.1", "--http-port", "0", "--no-grpc"])
            .env_remove("SLUICE_ADMIN_TOKEN"),
        Stream::Stdout,
    );
    let line = printed.recv_timeout(Duration::from_secs(60)).expect("LISTEN once the table is in");
    assert!(line.starts_with("LISTEN 127.0.0.1:"), "{line}");
}

/// The `--spec` of a replica serving the iris fixture, as the controller writes it.
fn iris_replica_spec() -> String {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/iris/model.onnx");
    let spec = sluice_controller::cluster::ReplicaSpec {
        deployment: "iris".into(),
        version: "1".into(),
        model: sluice_config::Model::Onnx(model),
        settings: sluice_config::ReplicaSettings::default(),
        fetch: None,
    };
    serde_json::to_string(&spec).unwrap()
}

/// `sluice replica` of `spec` on a free loopback port with `args` besides, and the address it
/// printed once warm.
fn start_replica(spec: &str, args: &[&str]) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(Some(
        sluice()
            .args(["replica", "--listen", "127.0.0.1:0", "--spec", spec, "--graceful-shutdown-timeout", "1"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let mut lines = BufReader::new(child.child().stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the replica printed its address").unwrap();
        if let Some(addr) = line.strip_prefix("LISTEN ") {
            break addr.to_string();
        }
    };
    (child, addr)
}

/// One iris request of `rows` rows (zeros) over gRPC, as raw contents.
fn iris_grpc_request(rows: usize) -> sluice_proto::inference::ModelInferRequest {
    use sluice_proto::inference::model_infer_request::InferInputTensor;
    sluice_proto::inference::ModelInferRequest {
        model_name: "iris".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![vec![0u8; rows * 16].into()],
        ..Default::default()
    }
}

/// `sluice replica --max-body-bytes N` (the server's own limit, which the controller passes to
/// a Ray replica) bounds the gRPC messages the replica takes: it took tonic's 64 MiB default
/// whatever the server's limit, so a larger request the server accepted failed at the replica.
#[test]
fn replica_takes_the_servers_message_limit() {
    use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    let (_child, addr) = start_replica(&iris_replica_spec(), &["--max-body-bytes", "1000"]);
    let request = iris_grpc_request;
    block_on(async {
        let mut c = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
        c.model_infer(request(2)).await.expect("a message under the limit");
        let e = c.model_infer(request(100)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("over the limit of"), "{e}");
    });
}

/// A replica process serves what runs inside it (its model calls, batches, queue) at
/// `GET /metrics` on its gRPC address, for Prometheus to scrape where the head lists it; the
/// requests are the head's to count, so their series are left out.
#[test]
fn a_replica_serves_its_model_calls_at_metrics_on_its_grpc_address() {
    use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    let (_child, addr) = start_replica(&iris_replica_spec(), &[]);
    let request = iris_grpc_request(3);
    let text = block_on(async {
        let mut c = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
        c.model_infer(request).await.expect("the replica answers");
        let r = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    });
    let sample = |name: &str| {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(sample("sluice_inference_duration_seconds_count{model=\"iris\""), Some(1.0), "{text}");
    assert_eq!(sample("sluice_batch_size_count{model=\"iris\""), Some(1.0), "{text}");
    assert!(sample("sluice_queue_duration_seconds_count{model=\"iris\"").is_some(), "{text}");
    assert!(!text.contains("sluice_requests_total") && !text.contains("sluice_replicas_ready"), "{text}");
}

/// A replica process serving a multiplexed deployment says which models it holds with each
/// answer to a model's request, so that its controller sends a model's requests where it is
/// loaded (it took each model a replica was ever sent to be held there for good). A client of
/// a server's own port is not told (another tenant's models are not its business).
#[test]
fn a_multiplexed_replica_says_which_models_it_holds() {
    use sluice_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-held-models");
    let iris = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/iris/model.onnx");
    for id in ["a", "b"] {
        std::fs::create_dir_all(dir.join(id)).unwrap();
        std::fs::copy(&iris, dir.join(id).join("model.onnx")).unwrap();
    }
    let spec = sluice_controller::cluster::ReplicaSpec {
        deployment: "tenants".into(),
        version: "1".into(),
        model: sluice_config::Model::Multiplexed { dir, max_models_per_replica: 1 },
        settings: sluice_config::ReplicaSettings::default(),
        fetch: None,
    };
    let (_child, addr) = start_replica(&serde_json::to_string(&spec).unwrap(), &[]);
    let said = |metadata: &tonic::metadata::MetadataMap| {
        let ids = metadata.get_bin(sluice_deployments::HELD_MODELS_HEADER_BIN)?.to_bytes().unwrap();
        let seq = metadata.get(sluice_deployments::HELD_MODELS_SEQ_HEADER).expect("numbered");
        Some((String::from_utf8(ids.to_vec()).unwrap(), seq.to_str().unwrap().parse::<u64>().unwrap()))
    };
    let held = block_on(async {
        let mut c = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let mut held = Vec::new();
        for id in ["a", "b"] {
            let mut request = tonic::Request::new(sluice_proto::inference::ModelInferRequest {
                model_name: "tenants".into(),
                ..iris_grpc_request(1)
            });
            request.metadata_mut().insert(sluice_deployments::MULTIPLEX_HEADER, id.parse().unwrap());
            let answer = c.model_infer(request).await.expect("the replica answers");
            held.push(said(answer.metadata()));
        }
        // A failure says it too (a model that failed to load is not held).
        let mut request = tonic::Request::new(sluice_proto::inference::ModelInferRequest {
            model_name: "tenants".into(),
            ..iris_grpc_request(1)
        });
        request.metadata_mut().insert(sluice_deployments::MULTIPLEX_HEADER, "nobody".parse().unwrap());
        let status = c.model_infer(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
        held.push(said(status.metadata()));
        held
    });
    // Each list is numbered after the one before (the head takes none older than one it took).
    let said = |ids: &str, seq| Some((ids.to_string(), seq));
    assert_eq!(held, [said("a\0", 1), said("b\0", 2), said("b\0", 3)]);
    // The head's side: a deployment whose replica is that process, reached as the controller
    // reaches it, takes the replica to hold what it said (only `b` now; `a` was evicted).
    let held = block_on(async {
        use sluice_deployments::{DataType, Deployment, DeploymentSpec, ModelMetadata, TensorSpec};
        let tensor = |name: &str, dtype, shape: Vec<i64>| TensorSpec { name: name.into(), dtype, shape };
        let metadata = ModelMetadata {
            platform: "onnxruntime_onnx".into(),
            inputs: vec![tensor("input", DataType::Fp32, vec![-1, 4])],
            outputs: vec![
                tensor("label", DataType::Int64, vec![-1]),
                tensor("probabilities", DataType::Fp32, vec![-1, 3]),
            ],
        };
        let mut spec = DeploymentSpec::new("tenants");
        (spec.version, spec.multiplexed, spec.max_replicas) = ("1".into(), true, 1);
        let d = Deployment::start_remote(spec, metadata).unwrap();
        let info = sluice_deployments::RemoteInfo { addr: addr.clone(), ..Default::default() };
        let replica = sluice_controller::cluster::GrpcReplica::new(info, "tenants", "1").unwrap();
        let id = d.add_remote(std::sync::Arc::new(replica));
        d.set_replica_ready(id, true);
        let x = sluice_deployments::Tensor::new(DataType::Fp32, vec![1, 4], vec![0u8; 16].into()).unwrap();
        for model in ["a", "b"] {
            let inputs = vec![sluice_deployments::NamedTensor { name: "input".into(), tensor: x.clone() }];
            let request = sluice_deployments::InferRequest {
                inputs,
                model_id: Some(model.into()),
                ..Default::default()
            };
            d.infer(request).await.expect("the replica answers through the head's deployment");
        }
        // An id the replica does not have: claimed for the request, and dropped by its failure's
        // word.
        let inputs = vec![sluice_deployments::NamedTensor { name: "input".into(), tensor: x.clone() }];
        let request = sluice_deployments::InferRequest {
            inputs,
            model_id: Some("nobody".into()),
            ..Default::default()
        };
        assert!(d.infer(request).await.is_err());
        d.held_models()
    });
    assert_eq!(held, [std::sync::Arc::<str>::from("b")]);
}

/// `sluice replica --worker-threads N` (the controller gives a Ray replica the CPUs it
/// reserves) sizes the replica's runtime; out of range is refused. It keeps its start-up memory
/// when told to.
#[test]
fn replica_takes_worker_threads_and_keep_startup_memory() {
    let spec = iris_replica_spec();
    let replica = || {
        let mut c = sluice();
        c.args(["replica", "--listen", "127.0.0.1:0", "--spec", &spec]);
        c
    };
    takes_worker_threads(replica);
    takes_keep_startup_memory(replica);
}

/// A spec longer than Linux takes in one argument (128 KiB; here 300 KiB, padded with the
/// whitespace JSON allows) reaches the replica in the controller's pieces, which it joins: one
/// `--spec` that long could not even be passed (the process was never started, E2BIG). A
/// piece that begins with `-` (here the pad value -1, placed at the first cut) is a piece,
/// not a flag.
#[test]
fn replica_joins_a_spec_given_in_pieces() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/iris/model.onnx");
    let mut settings = sluice_config::ReplicaSettings { max_batch_size: 4, ..Default::default() };
    settings.pad = [("input".to_string(), -1.0)].into();
    let spec = sluice_controller::cluster::ReplicaSpec {
        deployment: "iris".into(),
        version: "1".into(),
        model: sluice_config::Model::Onnx(model),
        settings,
        fetch: None,
    };
    let spec = serde_json::to_string(&spec).unwrap();
    let at = spec.find("-1").expect("the pad value in the spec");
    let pad = sluice_controller::cluster::SPEC_ARG_BYTES - at;
    let long = format!("{}{}{}", &spec[..at], " ".repeat(pad), &spec[at..]);
    let long = format!("{}{}{}", &long[..long.len() - 1], " ".repeat(200 * 1024), "}");
    assert!(sluice_controller::cluster::spec_args(&long)[1].starts_with("--spec=-1"));
    let whole = sluice().args(["replica", "--listen", "127.0.0.1:0", "--spec", &long]).output();
    assert_eq!(whole.map_err(|e| e.raw_os_error()).err(), Some(Some(libc::E2BIG)));
    let mut child = KillOnDrop(Some(
        sluice()
            .args(["replica", "--listen", "127.0.0.1:0", "--graceful-shutdown-timeout", "1"])
            .args(sluice_controller::cluster::spec_args(&long))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let mut lines = BufReader::new(child.child().stdout.take().unwrap()).lines();
    let printed = lines.find_map(|l| l.ok().and_then(|l| l.strip_prefix("LISTEN ").map(str::to_string)));
    assert!(printed.is_some(), "the replica printed no address: it did not take its spec");
}

/// SIGTERM the moment the server logs that its ports are open (before its models are ready):
/// a graceful stop, exit 0, not the process ended by the signal. The handler used to be installed
/// only once the server had started, and a signal in between ended the process.
#[test]
fn sigterm_while_starting_stops_gracefully() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    for _ in 0..3 {
        let (status, log) = sigterm_once_listening(&mut KillOnDrop(Some(spawn_run(&example))));
        assert!(status.success(), "{status:?}\n{log}");
        assert!(log.contains("shutting down"), "{log}");
    }
}

/// A second signal during a graceful stop ends the process at once (exit 130), rather than
/// after `shutdown_delay_s` and the drain: here a 30 s delay. One that comes at once after the
/// first (as a Ray job's stop sends the controller and its driver passes on) is the same stop.
#[test]
fn a_second_signal_ends_the_process_at_once() {
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-second-signal.yaml");
    let iris = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/iris/model.onnx");
    std::fs::write(
        &config,
        format!(
            "shutdown_delay_s: 30\napplications:\n  - name: a\n    deployments:\n      - {{name: iris, model: {}}}\n",
            iris.display()
        ),
    )
    .unwrap();
    let mut child = KillOnDrop(Some(spawn_run(&config)));
    let mut lines = BufReader::new(child.child().stderr.take().unwrap()).lines();
    let mut log = String::new();
    let mut wait_for = |what: &str, log: &mut String| loop {
        let Some(Ok(line)) = lines.next() else { panic!("sluice stopped before {what}:\n{log}") };
        log.push_str(&line);
        log.push('\n');
        if line.contains(what) {
            return;
        }
    };
    wait_for("all deployments ready", &mut log);
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    wait_for("a second signal ends the process at once", &mut log);
    // Within the second the process takes as the same stop: sent directly (a `kill` process
    // forked on a loaded machine could come later).
    signal(child.id(), libc::SIGTERM);
    wait_for("taken as the same stop", &mut log);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(child.child().try_wait().unwrap().is_none(), "ended by the signal it took as the same:\n{log}");
    let signalled = std::time::Instant::now();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let status = child.child().wait().unwrap();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "{:?}\n{log}", signalled.elapsed());
}

/// Sends `signal` to process `pid`.
#[allow(unsafe_code)]
fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes any pid and signal number; it only fails (ESRCH) if the process
    // is gone, which the caller's next step reports.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Sends SIGTERM to a `sluice run` child the moment it logs that its ports are open; its exit
/// status and everything it logged (the log ends when the process does).
fn sigterm_once_listening(child: &mut KillOnDrop) -> (std::process::ExitStatus, String) {
    let mut lines = BufReader::new(child.child().stderr.take().unwrap()).lines();
    let mut log = String::new();
    loop {
        let Some(Ok(line)) = lines.next() else { panic!("sluice stopped before starting:\n{log}") };
        log.push_str(&line);
        log.push('\n');
        if line.contains("accepting connections") {
            break;
        }
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    for line in lines.map_while(Result::ok) {
        log.push_str(&line);
        log.push('\n');
    }
    (child.child().wait().unwrap(), log)
}

/// SIGTERM while the models load stops the server at once with exit 0, rather than once the
/// load ends: here the load waits on an object store (a listener that never answers, with a
/// 300 s store timeout).
#[test]
fn sigterm_while_the_models_load_gives_the_load_up() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let config = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-silent-store.yaml");
    std::fs::write(
        &config,
        "model_repository: {path: \"s3://bucket/models\", store_timeout_s: 300}\nadmin_options: {port: 0}\n",
    )
    .unwrap();
    let env = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    // A load still waiting would hold the process (and the log) for 300 s.
    let (status, log) = sigterm_once_listening(&mut KillOnDrop(Some(spawn_run_env(&config, &env))));
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("stopped while the deployments loaded"), "{log}");
    drop(silent);
}

#[test]
fn sigterm_lets_a_request_in_flight_finish() {
    // A lone request waits 3 s for its batch to fill: long enough to be in flight at SIGTERM.
    let path = write_config(
        "drain.yaml",
        "applications:\n  - name: a\n    deployments:\n      - {name: iris, model: MODELS/iris/model.onnx, max_batch_size: 8, batch_wait_timeout_s: 3}\n",
    );
    let s = Running::start(&path);
    let url = s.url("/v2/models/iris/infer");
    let request = std::thread::spawn(move || {
        let answer = post(&url, IRIS_BODY, None);
        (answer, Instant::now())
    });
    // In flight: a replica holds it.
    let held = |metrics: &str| {
        metrics.lines().any(|l| {
            l.starts_with("sluice_replica_in_flight{") && l.contains("model=\"iris\"") && l.ends_with(" 1")
        })
    };
    let until = Instant::now() + Duration::from_secs(30);
    while !held(&s.get(&s.url("/metrics")).1) {
        assert!(Instant::now() < until, "the request never reached a replica");
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    let (status, log) = s.terminate();
    let ((code, out), answered) = request.join().unwrap();
    assert_eq!(code, 200, "{out}\n{log}");
    assert_eq!(out["outputs"][0]["data"], json!([2]), "{out}");
    assert!(answered > signalled, "answered after SIGTERM, not before");
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn deploy_status_rollout_and_delete_drive_a_running_server() {
    let first = write_config(
        "admin-first.yaml",
        "applications:\n  - name: app\n    deployments:\n      - {name: m, model: MODELS/iris/model.onnx}\n",
    );
    let s = Running::start(&first);
    let (code, out, err) = s.cli(&["status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["applications"]["app"]["deployments"]["m"]["versions"][0]["version"], "1", "{out}");

    // deploy: a canary for m (no traffic yet) and a new built-in step deployment.
    let second = write_config(
        "admin-second.yaml",
        "applications:\n  - name: app\n    deployments:\n      - {name: m, model: MODELS/iris/model.onnx, canary: {model: MODELS/iris/model.onnx, version: \"2\", weight: 0}}\n      - {name: top, builtin: {top_k: {k: 2}}}\n",
    );
    let (code, out, err) = s.cli(&["deploy", second.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("app/top: 1/1 replicas ready"), "deploy prints replicas coming up: {out}");
    let top = |s: &Running| {
        let body = r#"{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[0.1,0.7,0.2,0.0]}],"outputs":[{"name":"index"}]}"#;
        let (code, out) = post(&s.url("/v2/models/top/infer"), body, None);
        assert_eq!(code, 200, "{out}");
        out["outputs"][0]["data"].clone()
    };
    assert_eq!(top(&s), json!([1, 2]));
    let version = |s: &Running, pin: Option<&str>| {
        let (code, out) = post(&s.url("/v2/models/m/infer"), IRIS_BODY, pin);
        assert_eq!(code, 200, "{out}");
        out["model_version"].as_str().unwrap().to_string()
    };
    let all_answered_by = |s: &Running, want: &str| (0..20).all(|_| version(s, None) == want);
    assert!(all_answered_by(&s, "1"));
    assert_eq!(version(&s, Some("2")), "2");

    // rollout set / rollback / promote.
    let (code, _, err) = s.cli(&["rollout", "set", "m", "100"]);
    assert_eq!(code, 0, "{err}");
    assert!(all_answered_by(&s, "2"), "weight 100: the canary answers");
    let (code, _, err) = s.cli(&["rollout", "rollback", "m"]);
    assert_eq!(code, 0, "{err}");
    assert!(all_answered_by(&s, "1"), "rolled back");
    let (code, out, err) = s.cli(&["rollout", "promote", "m"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let versions = &status["applications"]["app"]["deployments"]["m"]["versions"];
    assert_eq!(versions.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(versions[0]["version"], "2");
    assert!(all_answered_by(&s, "2"), "promoted");
    let (code, _, err) = s.cli(&["rollout", "promote", "m"]);
    assert_eq!(code, 1);
    assert!(err.contains("error (409 Conflict)") && err.contains("deployment `m` has no canary"), "{err}");

    // A bad config changes nothing; a changed step setting swaps in.
    let bad = write_config(
        "admin-bad.yaml",
        "applications:\n  - name: app\n    deployments:\n      - {name: top, builtin: {top_k: {k: 2}}, num_replicas: -1}\n",
    );
    let (code, _, err) = s.cli(&["deploy", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("error (400 Bad Request)") && err.contains("num_replicas"), "{err}");
    assert_eq!(version(&s, None), "2", "nothing changed");
    let third = write_config(
        "admin-third.yaml",
        "applications:\n  - name: app\n    deployments:\n      - {name: m, model: MODELS/iris/model.onnx, version: \"2\"}\n      - {name: top, builtin: {top_k: {k: 3}}}\n",
    );
    let (code, _, err) = s.cli(&["deploy", third.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(top(&s), json!([1, 2, 0]), "k = 3 serves");
    assert!(all_answered_by(&s, "2"));

    // delete: a name is one path segment (an empty one would have meant "delete them all").
    let (code, _, err) = s.cli(&["delete", ""]);
    assert_eq!(code, 2);
    assert!(err.contains("`` is not a valid application name"), "{err}");
    let (code, _, err) = s.cli(&["delete", "app?x"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown application `app?x`"), "{err}");
    assert_eq!(s.get(&s.url("/v2/models/m")).0, 200, "nothing was deleted");
    let (code, _, err) = s.cli(&["delete", "app"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.get(&s.url("/v2/models/m")).0, 404);
    let (code, _, err) = s.cli(&["delete", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("error (404 Not Found)") && err.contains("unknown application `nope`"), "{err}");
    let (status, log) = s.terminate();
    assert!(status.success(), "{status:?}: {log}");

    // No server there: one clear line, exit 1.
    let (code, _, err) = admin_cli("http://127.0.0.1:9", &["status"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the admin API at http://127.0.0.1:9/api/sluice/status"), "{err}");
}

#[test]
fn deploy_waits_until_every_deployment_is_ready() {
    let first = write_config(
        "wait-first.yaml",
        "applications:\n  - name: app\n    deployments:\n      - {name: m, model: MODELS/iris/model.onnx}\n",
    );
    let s = Running::start(&first);
    let second = write_config(
        "wait-second.yaml",
        "applications:\n  - name: app\n    deployments:\n      - {name: m, model: MODELS/iris/model.onnx, num_replicas: 3}\n      - {name: mlp, model: MODELS/mlp/model.onnx, num_replicas: 2}\n",
    );
    let (code, out, err) = s.cli(&["deploy", second.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // The server runs with `--http-port 0` and the like; the file's own listeners are not
    // reported as changed (they were, on every deploy).
    assert!(!err.contains("not applied"), "{err}");
    assert!(out.contains("app/m: 3/3 replicas ready"), "{out}");
    assert!(out.contains("app/mlp: 2/2 replicas ready"), "{out}");
    assert!(out.trim_end().ends_with("deployed: 2 deployment(s) ready"), "{out}");
    // Once it returns, everything serves.
    let (code, out, _) = s.cli(&["status", "-o", "json"]);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    for d in ["m", "mlp"] {
        assert_eq!(status["applications"]["app"]["deployments"][d]["status"], "HEALTHY", "{out}");
    }
    // --no-wait: the server's answer (the status) as before.
    let (code, out, err) = s.cli(&["deploy", "--no-wait", first.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert!(answer["applications"]["app"]["deployments"]["mlp"].is_null(), "{out}");
    // A server setting that only a restart changes: deployed, and said not to be applied.
    let threads = write_config(
        "wait-threads.yaml",
        "worker_threads: 3\napplications:\n  - name: app\n    deployments:\n      - {name: m, model: MODELS/iris/model.onnx}\n",
    );
    let (code, _, err) = s.cli(&["deploy", threads.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning: not applied: worker_threads: a server setting, read at start"), "{err}");
    let (status, log) = s.terminate();
    assert!(status.success(), "{status:?}: {log}");
}

/// An admin API whose deployment `app/slow` stays at 1 of 2 ready replicas: the deploy is
/// accepted, the wait times out and names it. (A real server brings replicas up in well under
/// a second; this stands in for one that cannot.)
#[test]
fn deploy_timeout_names_the_deployments_not_ready() {
    use std::io::{Read, Write};
    let status = json!({
        "applications": {"app": {"status": "RUNNING", "deployments": {
            "fast": {"status": "HEALTHY", "autoscaling": null, "versions": [
                {"version": "1", "model": null, "weight": 100, "replicas": 1, "ready_replicas": 1, "queued": 0, "in_flight": 0}]},
            "slow": {"status": "UPSCALING", "autoscaling": null, "versions": [
                {"version": "1", "model": null, "weight": 100, "replicas": 2, "ready_replicas": 1, "queued": 0, "in_flight": 0}]}
        }}},
        "events": []
    })
    .to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            // Read the head and any body (small: one read each is enough here).
            let mut buf = [0u8; 65536];
            let _ = conn.read(&mut buf);
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{status}",
                status.len()
            );
            let _ = conn.write_all(reply.as_bytes());
        }
    });
    let config = write_config("wait-stub.yaml", "applications: []\n");
    let started = Instant::now();
    let (code, out, err) =
        admin_cli(&format!("http://{addr}"), &["deploy", "--timeout", "1", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        out.contains("app/fast: 1/1 replicas ready") && out.contains("app/slow: 1/2 replicas ready"),
        "{out}"
    );
    assert!(err.contains("not ready after 1s: app/slow (1/2 replicas ready)"), "{err}");
    assert!(!err.contains("app/fast"), "{err}");
}

#[test]
fn status_prints_a_table_and_the_machine_forms() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    let s = Running::start(&example);
    let status = |args: &[&str]| {
        let (code, out, err) = s.cli(&[&["status"], args].concat());
        assert_eq!(code, 0, "{err}");
        out
    };
    let table = status(&[]);
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    let header = ["APPLICATION", "DEPLOYMENT", "STATUS", "VERSION", "READY", "WEIGHT", "REQ/S", "P50", "P99"];
    assert_eq!(lines[0][..9], header);
    assert_eq!(lines[0][9..], ["QUEUE", "LAST", "EVENT"]);
    // One row per deployment of examples/iris.yaml, warmed and taking all the traffic.
    let row = |d: &str| {
        lines.iter().find(|l| l.get(1) == Some(&d)).unwrap_or_else(|| panic!("{d}: {table}")).clone()
    };
    assert_eq!(row("mlp")[..6], ["classifiers", "mlp", "HEALTHY", "1", "2/2", "100%"]);
    assert_eq!(row("iris-label")[..6], ["iris-app", "iris-label", "HEALTHY", "1", "1/1", "100%"]);
    assert!(row("iris").join(" ").contains("ago: started version 1 with 1 replica(s)"), "{table}");
    let json: Value = serde_json::from_str(&status(&["-o", "json"])).unwrap();
    assert_eq!(json["applications"]["classifiers"]["deployments"]["mlp"]["versions"][0]["ready_replicas"], 2);
    assert!(status(&["-o", "yaml"]).contains("status: RUNNING"));
    // Wide: where each replica runs (this process, on loopback).
    let pid = s.child.id();
    let wide = status(&["-o", "wide"]);
    let mlp = wide.lines().find(|l| l.contains(" mlp ")).unwrap_or_default();
    assert!(mlp.ends_with(&format!("127.0.0.1/{pid},127.0.0.1/{pid}")), "{wide}");
    let (status, log) = s.terminate();
    assert!(status.success(), "{status:?}: {log}");
}

#[test]
fn completions_and_the_man_page_cover_the_subcommands() {
    let out = sluice().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_sluice()") && script.contains("validate") && script.contains("rollout"),
        "{script}"
    );
    let out = sluice().arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH sluice"), "{page}");
    assert!(page.contains("deploy") && page.contains("status"), "{page}");
    let out = sluice().args(["completions", "nosuchshell"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses an unknown shell");
}

/// An admin API that accepts connections and never answers (a stopped process, a proxy
/// holding the connection): `sluice status` gives up after `--request-timeout`, and
/// `sluice deploy` by its `--timeout`. Both waited for good; a command not done within 60 s is
/// ended and the test fails.
#[test]
fn admin_commands_give_up_on_a_server_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let config = write_config(
        "silent-deploy.yaml",
        "applications:\n  - name: a\n    deployments: [{name: m, model: MODELS/iris/model.onnx}]\n",
    );
    for args in [
        vec!["status".to_string(), "--request-timeout".into(), "1".into()],
        vec!["deploy".to_string(), config.display().to_string(), "--timeout".into(), "1".into()],
    ] {
        let mut child = KillOnDrop(Some(
            sluice()
                .args(&args)
                .args(["--address", &address])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        let until = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.child().try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < until, "`sluice {}` still waits after 60 s", args[0]);
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.child().stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}: {stderr}");
        // Said as a call that ran out of time, which may still be under way there (it read
        // "cannot reach the admin API ... error sending request").
        assert!(
            stderr.contains("no answer from the admin API at") && stderr.contains("within 1s"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("may still be under way"), "{args:?}: {stderr}");
    }
}

/// The admin commands' errors say why: the cause under reqwest's "error sending request", a
/// URL without a scheme taken as http://, a scheme that is not http refused by name, a bad
/// token refused without printing it, and TLS flags that could not work refused up front.
#[test]
fn admin_errors_say_why_and_never_the_token() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let status = |args: &[&str]| {
        let out = sluice().arg("status").args(args).env_remove("SLUICE_ADMIN_TOKEN").output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for address in [format!("http://{closed}"), closed.to_string()] {
        let (code, err) = status(&["--address", &address]);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(&format!("http://{closed}/api/sluice/status")), "{err}");
        assert!(err.contains("Connection refused"), "{err}");
    }
    let (code, err) = status(&["--address", "ray://head:10001"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must be http:// or https://"), "{err}");
    let (code, err) = status(&["--address", &format!("http://{closed}"), "--token", "s3cret;x"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the admin token given (--token or $SLUICE_ADMIN_TOKEN) holds ';'"), "{err}");
    assert!(!err.contains("s3cret"), "the token was printed: {err}");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let not_pem = dir.join("cli-not-a-certificate.der");
    std::fs::write(&not_pem, [0x30u8, 0x82, 0x01, 0x0a]).unwrap();
    let (code, err) =
        status(&["--address", &format!("https://{closed}"), "--cacert", not_pem.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no PEM certificate in it"), "{err}");
    let (code, err) =
        status(&["--address", &format!("https://{closed}"), "--key", not_pem.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("without --cert"), "{err}");
}

/// A command-line port can move a listener off a clash in the file (the file was refused
/// before the flags were applied); without the flag the clash is refused as before.
/// (Both stop at the missing ONNX Runtime, or the address check, before listening.)
#[test]
fn a_port_flag_can_resolve_a_clash_in_the_file() {
    let path = write_config(
        "clashing-ports.yaml",
        "http_options: {port: 18265}\nadmin_options: {port: 18265}\napplications: []\n",
    );
    let run = |args: &[&str]| {
        let out = sluice()
            .arg("run")
            .arg(&path)
            .args(args)
            .args(["--onnxruntime", "/nonexistent/libonnxruntime.so"])
            .env_remove("SLUICE_HTTP_PORT")
            .env_remove("SLUICE_ADMIN_PORT")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("admin_options.port"), "{err}");
    let (code, err) = run(&["--admin-port", "18266"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/libonnxruntime.so"), "{err}");
    // `sluice validate` has no flags to apply: the clash is an error there.
    let out = sluice().arg("validate").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `sluice run --ray` checks the listeners as the job on Ray will have them (the admin API's
/// default port moved to 8266 beside Ray's dashboard) before anything is sent: a REST port of
/// 8266 failed the job once uploaded, naming a port the config did not.
#[test]
fn run_on_ray_checks_the_listeners_as_the_job_has_them() {
    let iris = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models/iris/model.onnx");
    let config = write_config(
        "ray-port-clash.yaml",
        &format!(
            "http_options: {{port: 8266}}\napplications:\n  - name: a\n    deployments: [{{name: iris, model: {}}}]\n",
            iris.display()
        ),
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = sluice().arg("run").arg(&config).args(["--ray", &format!("http://{closed}")]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("admin_options.port") && err.contains("as the job on Ray listens"), "{err}");
}

/// `sluice run --ray` with an `--onnxruntime` that names no file says so before asking Ray
/// anything (it shipped whichever library it found next, or blamed the install).
#[test]
fn run_on_ray_refuses_a_missing_onnxruntime_by_name() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = sluice()
        .args(["run", example.to_str().unwrap(), "--ray", &format!("http://{closed}")])
        .args(["--onnxruntime", "/nonexistent/ort-gpu/libonnxruntime.so"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/ort-gpu/libonnxruntime.so") && err.contains("not found"), "{err}");
}

/// Output to a reader that has gone (`sluice openapi rest | head -c0`) ends the command
/// quietly, exit 0: it panicked with "failed printing to stdout: Broken pipe" (the completion
/// script too; the man page said "error: Broken pipe", exit 1).
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    for args in [&["openapi", "rest"][..], &["completions", "bash"], &["man"]] {
        // The pipe's reading end closed before the command starts: its first write fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = sluice().args(args).stdout(writer).stderr(Stdio::piped()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// An empty `SLUICE_*` variable reads as unset, as a shell's `VAR=` means: `SLUICE_CACERT=`
/// failed every admin command on reading the file "".
#[test]
fn an_empty_variable_is_unset() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = sluice()
        .args(["status", "--address", &format!("http://{closed}"), "--request-timeout", "5"])
        .env("SLUICE_CACERT", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("cannot read"), "the empty variable was read as a file: {stderr}");
}
