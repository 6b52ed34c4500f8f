//! The `sluice` binary: `validate` exit codes and messages, `run` serving real requests, and a
//! missing ONNX Runtime reported in one line without a panic.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

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

#[test]
fn run_serves_until_terminated() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/iris.yaml");
    let mut child = sluice()
        .args(["run", example.to_str().unwrap(), "--http-port", "0", "--grpc-port", "0", "--admin-port", "0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading stderr to the end, so the server never writes to a closed pipe.
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if let Some(i) = line.find("listening on http://") {
                let _ = tx.send(line[i + "listening on http://".len()..].trim().to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let addr = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("server printed its address");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = r#"{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[6.3,3.3,6.0,2.5]}]}"#;
    let out: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/v2/models/iris/infer"))
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(out["outputs"][0]["data"][0], 2, "virginica: {out}");
    // The example's pipeline answers its plain-JSON route with class names.
    let named: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("http://{addr}/iris"))
            .body(r#"{"features": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}"#)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(named["label"], serde_json::json!(["setosa", "virginica"]), "{named}");
    // SIGTERM: graceful shutdown, exit 0.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "{status:?}: {log}");
    assert!(log.contains("shutting down"), "{log}");
}
