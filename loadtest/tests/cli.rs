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
    // 0; past one thread's pacing (the gap rounded to 0 ns and the step never ended); under one
    // a year (the gap overflowed the clock and panicked).
    for rate in ["0", "1e12", "1e-20"] {
        let (code, err) = loadtest(&["--rate", rate, "--requests", "1"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(&format!("bad rate `{rate}`")), "{err}");
    }
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

/// With `--check`, answers that do not match exit 3 once the reports are written (the run
/// exited 0 whatever it found, so a CI job checking a wrong model passed).
#[test]
fn a_check_that_finds_mismatches_exits_3() {
    use std::io::{BufRead, BufReader, Read, Write};
    // An OIP server whose every answer is `y = [-1]`, and 400 for model `bad`; for model
    // `cut`, every other answer has no outputs.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let answered = answered.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    let (mut refused, mut cut) = (false, false);
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        refused |= line.contains("/models/bad/");
                        cut |= line.contains("/models/cut/");
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let n = answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (status, out) = match (refused, cut && n.is_multiple_of(2)) {
                        (true, _) => ("400 Bad Request", r#"{"error":"no"}"#),
                        (false, true) => ("200 OK", r#"{"model_name":"m"}"#),
                        (false, false) => (
                            "200 OK",
                            r#"{"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":[1,1],"data":[-1.0]}]}"#,
                        ),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        out.len()
                    );
                    if conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(out.as_bytes())).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let samples = std::env::temp_dir().join(format!("loadtest-check-{}.json", std::process::id()));
    let case = |y: f64| {
        format!(
            r#"{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}}], "outputs": [{{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [{y}]}}]}}"#
        )
    };
    let run_model = |model: &str| {
        loadtest(&[
            "--url",
            &addr,
            "-m",
            model,
            "--input-data",
            samples.to_str().unwrap(),
            "--check",
            "--requests",
            "5",
            "--warmup",
            "0s",
        ])
    };
    let run = || run_model("m");
    std::fs::write(&samples, case(0.5)).unwrap();
    let (code, err) = run();
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("--check: 5 answer(s) did not match"), "{err}");
    std::fs::write(&samples, case(-1.0)).unwrap();
    let (code, err) = run();
    assert_eq!(code, 0, "{err}");
    // Every request refused: nothing was compared, which is no pass either.
    let (code, err) = run_model("bad");
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no request was answered"), "{err}");
    // Answers that cannot be read failed the check too, though the others matched (they were
    // counted as `bad response` and the run exited 0).
    let (code, err) = run_model("cut");
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("answer(s) did not match the expected outputs or could not be read"), "{err}");
    let _ = std::fs::remove_file(&samples);
}
