//! The command line refuses what it cannot run, with one clear line: a rate of 0, a negative
//! duration, counts and lengths of 0 (a step that sends nothing, a timeout every request
//! meets), durations past the clock's range, `--check` with a sample case that has no expected
//! outputs, and a request log it could not write (before the run, not after it).

use std::process::Command;

fn loadtest(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-loadtest")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `--check` with the sample file at `samples` is refused: a case has no expected outputs.
fn refused_unchecked(samples: &std::path::Path) {
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
    refused_unchecked(&samples);
    // An empty outputs list expects nothing: refused the same way, not a check that passes all.
    std::fs::write(
        &samples,
        r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}], "outputs": []}"#,
    )
    .unwrap();
    refused_unchecked(&samples);
    let _ = std::fs::remove_file(&samples);
}

#[test]
fn zero_counts_and_lengths_and_endless_durations_are_refused() {
    for (args, says) in [
        (&["--concurrency", "0", "--requests", "1"][..], "bad concurrency `0`"),
        (&["--concurrency", "1,0", "--requests", "1"], "bad concurrency `0`"),
        (&["--requests", "0"], "--requests"),
        (&["--duration", "0s"], "must be above 0"),
        (&["--requests", "1", "--timeout", "0"], "must be above 0"),
        (&["--requests", "1", "--batch", "0"], "--batch"),
        (&["--requests", "1", "--threads", "0"], "--threads"),
        (&["--duration", "100000000000000000000"], "at most a year"),
        (&["--requests", "1", "--timeout", "10000000000000000000s"], "at most a year"),
    ] {
        let (code, err) = loadtest(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A request log that cannot be written fails the command before its run, not after it (when
/// the report was lost with it).
#[test]
fn an_unwritable_request_log_is_refused_before_the_run() {
    let (code, err) = loadtest(&[
        "--url",
        "127.0.0.1:9",
        "--health",
        "--requests",
        "1",
        "--request-log",
        "/nonexistent-folder/requests.csv",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("creating /nonexistent-folder/requests.csv"), "{err}");
}
