//! The command line refuses what it cannot run, with one clear line: a rate of 0, a negative
//! duration, and `--check` with a sample case that has no expected outputs.

use std::process::Command;

fn loadtest(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-loadtest")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_rates_durations_and_unchecked_cases_are_refused() {
    let (code, err) = loadtest(&["--rate", "0", "--requests", "1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad rate `0`"), "{err}");
    let (code, err) = loadtest(&["--concurrency", "1", "--duration=-1s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("must be 0 or more"), "{err}");
    let samples = std::env::temp_dir().join(format!("loadtest-cli-{}.json", std::process::id()));
    std::fs::write(
        &samples,
        r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]}"#,
    )
    .unwrap();
    let (code, err) = loadtest(&[
        "--url",
        "127.0.0.1:9",
        "-m",
        "m",
        "--input-data",
        samples.to_str().unwrap(),
        "--check",
        "--requests",
        "1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--check: case 0 of the input data has no expected outputs"), "{err}");
}
