//! Following a Ray job's log (`sluice job submit` without `--no-wait`) against a stand-in
//! dashboard on loopback: when Ray's log websocket closes while the job still runs (a proxy's
//! idle timeout during a quiet training epoch), the log goes on by polling from the bytes
//! already shown, each byte printed once, until the job ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

const LOG: &str = "epoch 1\nepoch 2\ndone\n";

/// The dashboard: the websocket sends the first line and closes (or, `silent`, keeps the
/// connection open and says nothing more); the job reads RUNNING for its first three looks,
/// then SUCCEEDED; the whole log is `LOG`.
async fn dashboard() -> String {
    stand_in(false).await
}

async fn stand_in(silent: bool) -> String {
    stand_in_failing(silent, 0..0).await
}

/// The stand-in whose answers to the job's looks numbered in `failing` are 502s (a dashboard
/// restarting behind a proxy).
async fn stand_in_failing(silent: bool, failing: std::ops::Range<usize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let looks = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve(stream, looks.clone(), silent, failing.clone()));
        }
    });
    format!("http://{addr}")
}

async fn serve(stream: TcpStream, looks: Arc<AtomicUsize>, silent: bool, failing: std::ops::Range<usize>) {
    let mut head = [0u8; 1024];
    let n = stream.peek(&mut head).await.unwrap();
    let request = String::from_utf8_lossy(&head[..n]).into_owned();
    let path = request.split(' ').nth(1).unwrap_or("").to_string();
    if path.ends_with("/logs/tail") {
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        ws.send(Message::text("epoch 1\n")).await.unwrap();
        if silent {
            // Held open, never another word: a connection gone without a FIN.
            tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        }
        // Dropped without a close frame: the connection just ends.
        return;
    }
    let mut stream = stream;
    let mut buf = vec![0u8; 4096];
    let _ = stream.read(&mut buf).await;
    let mut code = "200 OK";
    let body = if path.ends_with("/logs") {
        serde_json::json!({ "logs": LOG }).to_string()
    } else {
        let look = looks.fetch_add(1, Ordering::SeqCst);
        if failing.contains(&look) {
            code = "502 Bad Gateway";
        }
        let status = if look < 3 { "RUNNING" } else { "SUCCEEDED" };
        serde_json::json!({"submission_id": "j", "status": status, "entrypoint": "train"}).to_string()
    };
    let answer = format!(
        "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_stream_that_ends_early_goes_on_by_polling() {
    let jobs = sluice_server::ray_jobs::Jobs::new(&dashboard().await, None);
    let mut printed = String::new();
    jobs.tail("j", |chunk| printed.push_str(chunk)).await.unwrap();
    assert_eq!(printed, LOG, "every line once, the rest after the websocket ended");
    let job = jobs.job("j").await.unwrap().unwrap();
    assert!(job.is_terminal(), "followed until the job ended: {}", job.status);
}

/// A job submitted under an id Ray already has, finished: refused as Ray refuses an id in use
/// (it was deleted and run again: a retry of a finished training trained again), unless the
/// caller starts a serving job anew (`sluice run --ray`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_id_is_not_run_again() {
    let jobs = sluice_server::ray_jobs::Jobs::new(&dashboard().await, None);
    // The stand-in's job reads SUCCEEDED after three looks.
    while !jobs.job("j").await.unwrap().unwrap().is_terminal() {}
    let request = sluice_server::ray_jobs::JobRequest {
        entrypoint: "train".into(),
        submission_id: "j".into(),
        ..Default::default()
    };
    let e = jobs.submit(&request, false).await.unwrap_err().to_string();
    assert!(e.contains("job `j` already exists (SUCCEEDED)"), "{e}");
}

/// A log websocket that goes silent (held open, never closed) while the log grows: the log is
/// looked at over HTTP after the quiet time and followed by polling (it waited on the dead
/// connection for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_log_stream_goes_on_by_polling() {
    let jobs = sluice_server::ray_jobs::Jobs::new(&stand_in(true).await, None)
        .with_quiet(std::time::Duration::from_millis(200));
    let mut printed = String::new();
    let follow = jobs.tail("j", |chunk| printed.push_str(chunk));
    tokio::time::timeout(std::time::Duration::from_secs(60), follow).await.expect("still waiting").unwrap();
    assert_eq!(printed, LOG, "every line once");
}

/// A dashboard that fails a few calls while the job runs (restarting behind a proxy: 502) is
/// asked again: the log is followed to its end (one failed call ended the follow, and
/// `sluice job submit` said the job failed while it ran on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_failing_for_a_moment_does_not_end_the_follow() {
    let jobs = sluice_server::ray_jobs::Jobs::new(&stand_in_failing(false, 1..3).await, None);
    let mut printed = String::new();
    let follow = jobs.tail("j", |chunk| printed.push_str(chunk));
    tokio::time::timeout(std::time::Duration::from_secs(60), follow).await.expect("still waiting").unwrap();
    assert_eq!(printed, LOG, "every line once");
}
