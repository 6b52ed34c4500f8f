//! Containers: `sluice` needs no HOME and no writable cache. ONNX Runtime 1.32 (its telemetry
//! library) writes a device id and an SQLite file under `$XDG_CACHE_HOME` (else
//! `$HOME/.cache`)`/Microsoft/DeveloperTools/.onnxruntime` at start and ignores a failure to;
//! `ORT_DISABLE_TELEMETRY=1` keeps it off the filesystem entirely. Sluice itself writes nothing.
//! (A fully read-only root, `unshare -m` + `mount -o remount,bind,ro /`, was checked by hand;
//! it needs privileges CI may not have.)

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn sluice() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    // Nothing from the test's environment: no HOME, no XDG variables.
    c.env_clear().env("PATH", "/usr/bin:/bin").env("RUST_LOG", "info").env("NO_COLOR", "1");
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("readonly-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(dir: &std::path::Path) -> PathBuf {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let path = dir.join("app.yaml");
    let text = format!(
        "http_options: {{port: 0}}\ngrpc_options: {{port: 0}}\nadmin_options: {{port: 0}}\napplications:\n  - name: a\n    deployments:\n      - {{name: iris, model: {}/iris/model.onnx}}\n",
        models.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn serves_without_home_and_with_a_cache_that_cannot_be_written() {
    let dir = scratch("serve");
    // A file where the cache folder would go: nothing can be created under it.
    let blocked = dir.join("not-a-folder");
    std::fs::write(&blocked, b"").unwrap();
    let mut child = sluice()
        .env("XDG_CACHE_HOME", &blocked)
        .args(["run", config(&dir).to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("sluice stopped before serving:\n{log}");
        };
        log.push_str(&line);
        log.push('\n');
        if let Some(i) = line.find("REST frontend listening on http://") {
            break line[i + "REST frontend listening on http://".len()..].trim().to_string();
        }
    };
    let ready = std::net::TcpStream::connect(&addr).and_then(|mut s| {
        use std::io::{Read, Write};
        s.write_all(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    });
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    let answer = ready.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
    assert!(blocked.is_file(), "the blocked cache path is untouched");
}

#[test]
fn with_ort_disable_telemetry_nothing_is_written_under_home() {
    let dir = scratch("home");
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = sluice()
        .env("HOME", &home)
        .env("ORT_DISABLE_TELEMETRY", "1")
        .args(["validate", config(&dir).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(written.is_empty(), "written under HOME: {written:?}");
}
