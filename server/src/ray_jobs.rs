//! A client for Ray's Jobs REST API (the dashboard, port 8265): version check, `working_dir`
//! packages, submit, status, stop, logs. Sluice submits itself through it (`sluice run --ray`).
//! Ray's quirks handled here: the trailing slash `POST /api/jobs/` needs, a non-browser
//! User-Agent (Ray refuses POST/PUT from browsers), the optional bearer token of Ray's token
//! auth, plain-text tracebacks as error bodies, and a reused `submission_id` answered 500.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Ray versions this client and the bridge were built against (the bridge needs named actors
/// and the Jobs API with client-chosen submission ids).
pub const MIN_RAY_VERSION: (u32, u32) = (2, 9);

/// What went wrong talking to Ray.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("cannot reach Ray's dashboard at {url}: {}", crate::error::with_causes(source))]
    Unreachable { url: String, source: reqwest::Error },
    #[error("Ray at {url} is version {version}; Sluice needs Ray {}.{} or newer", MIN_RAY_VERSION.0, MIN_RAY_VERSION.1)]
    Version { url: String, version: String },
    #[error("Ray refused {what} ({status}): {message}")]
    Refused { what: String, status: u16, message: String },
    #[error("unexpected answer from Ray to {what}: {message}")]
    Protocol { what: String, message: String },
    #[error("job `{id}` already exists ({status}); submit under another --submission-id")]
    Exists { id: String, status: String },
}

impl JobsError {
    /// Whether asking again later may succeed: the dashboard unreachable or failing with a 5xx
    /// (restarting, a proxy's 502), not a refusal of the call itself (401, 404).
    pub fn passing(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { status, .. } => *status >= 500,
            Self::Version { .. } | Self::Protocol { .. } | Self::Exists { .. } => false,
        }
    }
}

/// A job as Ray reports it (`JobDetails`; fields Sluice reads).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct JobDetails {
    #[serde(default)]
    pub submission_id: Option<String>,
    #[serde(default)]
    pub job_id: Option<String>,
    pub status: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub entrypoint: String,
    #[serde(default)]
    pub driver_exit_code: Option<i32>,
    #[serde(default)]
    pub start_time: Option<u64>,
    #[serde(default)]
    pub end_time: Option<u64>,
}

impl JobDetails {
    /// STOPPED, SUCCEEDED and FAILED are final.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "STOPPED" | "SUCCEEDED" | "FAILED")
    }
}

/// A job to submit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobRequest {
    pub entrypoint: String,
    pub submission_id: String,
    pub runtime_env: serde_json::Value,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint_num_cpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint_num_gpus: Option<f64>,
}

impl JobDetails {
    /// The job's name: its submission id, else its job id.
    pub fn id(&self) -> &str {
        self.submission_id.as_deref().or(self.job_id.as_deref()).unwrap_or("")
    }
}

/// Ray's dashboard at one address.
#[derive(Clone)]
pub struct Jobs {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// How long the log websocket may stay silent before the log is looked at over HTTP.
    quiet: Duration,
}

impl Jobs {
    /// `address`: `http://HEAD:8265`; `token`: Ray's auth token, when the cluster uses one.
    pub fn new(address: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap_or_default();
        Self {
            base: address.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            http,
            quiet: Duration::from_secs(30),
        }
    }

    /// After `quiet` without a word on the log websocket, [`Jobs::tail`] looks at the job and
    /// its log over HTTP (default 30 s).
    pub fn with_quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    pub fn address(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<(u16, String), JobsError> {
        let resp =
            req.send().await.map_err(|source| JobsError::Unreachable { url: self.base.clone(), source })?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| JobsError::Protocol { what: what.to_string(), message: e.to_string() })?;
        Ok((status, body))
    }

    fn refused(what: &str, status: u16, body: &str) -> JobsError {
        // Ray answers errors with a Python traceback: its last line says what is wrong.
        let message = body.trim().lines().last().unwrap_or("").trim().to_string();
        JobsError::Refused { what: what.to_string(), status, message }
    }

    /// The cluster's Ray version; an error when Ray is unreachable or too old.
    pub async fn check_version(&self) -> Result<String, JobsError> {
        let (status, body) =
            self.send("GET /api/version", self.request(reqwest::Method::GET, "/api/version")).await?;
        if status != 200 {
            return Err(Self::refused("GET /api/version", status, &body));
        }
        #[derive(Deserialize)]
        struct Version {
            ray_version: String,
        }
        let v: Version = serde_json::from_str(&body)
            .map_err(|e| JobsError::Protocol { what: "GET /api/version".into(), message: e.to_string() })?;
        let mut parts = v.ray_version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < MIN_RAY_VERSION {
            return Err(JobsError::Version { url: self.base.clone(), version: v.ray_version });
        }
        Ok(v.ray_version)
    }

    /// Uploads a `working_dir` package under `name` (`sluice-<hash>.zip`) unless Ray has it;
    /// returns its URI for `runtime_env.working_dir`.
    pub async fn upload_package(&self, name: &str, zip: Vec<u8>) -> Result<String, JobsError> {
        let path = format!("/api/packages/gcs/{name}");
        let (status, _) = self.send("GET package", self.request(reqwest::Method::GET, &path)).await?;
        if status != 200 {
            let what = format!("PUT {path}");
            let (status, body) =
                self.send(&what, self.request(reqwest::Method::PUT, &path).body(zip)).await?;
            if status != 200 {
                return Err(Self::refused(&what, status, &body));
            }
        }
        Ok(format!("gcs://{name}"))
    }

    /// Submits a job. A job already submitted under the same id is left as it is and
    /// reported (`Ok(false)`) while it runs; a finished one is deleted and submitted again when
    /// `again_when_finished` (a serving job started anew), else refused as Ray refuses an id
    /// in use (a client's own id is what makes a retry safe: a finished training ran again).
    pub async fn submit(&self, job: &JobRequest, again_when_finished: bool) -> Result<bool, JobsError> {
        if let Some(existing) = self.job(&job.submission_id).await? {
            if !existing.is_terminal() {
                return Ok(false);
            }
            if !again_when_finished {
                return Err(JobsError::Exists { id: job.submission_id.clone(), status: existing.status });
            }
            self.delete(&job.submission_id).await?;
        }
        let what = "POST /api/jobs/";
        let (status, body) =
            self.send(what, self.request(reqwest::Method::POST, "/api/jobs/").json(job)).await?;
        match status {
            200 => Ok(true),
            // Submitted meanwhile by someone else (Ray's wording, which KubeRay matches too).
            500 if body.contains("already exists") => Ok(false),
            _ => Err(Self::refused(what, status, &body)),
        }
    }

    /// A job's details, or None when Ray knows no such job.
    pub async fn job(&self, id: &str) -> Result<Option<JobDetails>, JobsError> {
        let what = format!("GET /api/jobs/{id}");
        let (status, body) = self
            .send(&what, self.request(reqwest::Method::GET, &format!("/api/jobs/{}", segment(id))))
            .await?;
        match status {
            200 => serde_json::from_str(&body)
                .map(Some)
                .map_err(|e| JobsError::Protocol { what, message: e.to_string() }),
            404 => Ok(None),
            _ => Err(Self::refused(&what, status, &body)),
        }
    }

    /// Every job Ray knows.
    pub async fn list(&self) -> Result<Vec<JobDetails>, JobsError> {
        let what = "GET /api/jobs/";
        let (status, body) = self.send(what, self.request(reqwest::Method::GET, "/api/jobs/")).await?;
        if status != 200 {
            return Err(Self::refused(what, status, &body));
        }
        serde_json::from_str(&body)
            .map_err(|e| JobsError::Protocol { what: what.into(), message: e.to_string() })
    }

    /// Asks Ray to stop a job (SIGTERM, then SIGKILL after `RAY_JOB_STOP_WAIT_TIME_S`).
    pub async fn stop(&self, id: &str) -> Result<bool, JobsError> {
        let what = format!("POST /api/jobs/{id}/stop");
        let (status, body) = self
            .send(&what, self.request(reqwest::Method::POST, &format!("/api/jobs/{}/stop", segment(id))))
            .await?;
        if status != 200 {
            return Err(Self::refused(&what, status, &body));
        }
        #[derive(Deserialize)]
        struct Stopped {
            stopped: bool,
        }
        serde_json::from_str::<Stopped>(&body)
            .map(|s| s.stopped)
            .map_err(|e| JobsError::Protocol { what, message: e.to_string() })
    }

    /// Deletes a finished job (its logs stay on the cluster).
    pub async fn delete(&self, id: &str) -> Result<(), JobsError> {
        let what = format!("DELETE /api/jobs/{id}");
        let (status, body) = self
            .send(&what, self.request(reqwest::Method::DELETE, &format!("/api/jobs/{}", segment(id))))
            .await?;
        if status != 200 {
            return Err(Self::refused(&what, status, &body));
        }
        Ok(())
    }

    /// A job's whole driver log so far.
    pub async fn logs(&self, id: &str) -> Result<String, JobsError> {
        let what = format!("GET /api/jobs/{id}/logs");
        let (status, body) = self
            .send(&what, self.request(reqwest::Method::GET, &format!("/api/jobs/{}/logs", segment(id))))
            .await?;
        if status != 200 {
            return Err(Self::refused(&what, status, &body));
        }
        #[derive(Deserialize)]
        struct Logs {
            logs: String,
        }
        serde_json::from_str::<Logs>(&body)
            .map(|l| l.logs)
            .map_err(|e| JobsError::Protocol { what, message: e.to_string() })
    }
}

impl Jobs {
    /// Streams a job's driver log to `out` chunk by chunk as it is written (the log so far
    /// first), until the job ends: Ray's `logs/tail` websocket, or where that cannot be opened
    /// (an `https://` dashboard: no TLS websocket here; a proxy in between) by polling the whole
    /// log every second and passing on what is new. A websocket that closes or breaks while
    /// the job still runs (a proxy's idle timeout during a quiet epoch) goes on by polling,
    /// from the bytes already shown; so does one that stays silent while the log grows or the
    /// job ends (a connection dropped without a word: a NAT's idle timeout, a partition).
    pub async fn tail(&self, id: &str, mut out: impl FnMut(&str)) -> Result<(), JobsError> {
        let mut shown = 0;
        let mut counted = |chunk: &str| {
            shown += chunk.len();
            out(chunk)
        };
        let streamed = self.tail_websocket(id, &mut counted).await;
        match streamed {
            Err(TailError::BeforeFirstFrame(e)) => tracing::debug!("no log websocket ({e}); polling the log"),
            // A dashboard that does not answer now is asked again while polling.
            Ok(()) | Err(TailError::Jobs(_))
                if self.job(id).await.is_ok_and(|j| j.is_none_or(|j| j.is_terminal())) =>
            {
                return Ok(());
            }
            Ok(()) => tracing::debug!("the log websocket closed while the job runs; polling the log"),
            Err(TailError::Jobs(e)) => tracing::debug!("the log websocket broke ({e}); polling the log"),
            Err(TailError::Silent) => tracing::debug!("the log websocket went silent; polling the log"),
        }
        self.tail_polling(id, shown, &mut out).await
    }

    async fn tail_websocket(&self, id: &str, out: &mut impl FnMut(&str)) -> Result<(), TailError> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let Some(rest) = self.base.strip_prefix("http://") else {
            return Err(TailError::BeforeFirstFrame("not a plain http:// dashboard".into()));
        };
        let url = format!("ws://{rest}/api/jobs/{}/logs/tail", segment(id));
        let mut req = url.into_client_request().map_err(|e| TailError::BeforeFirstFrame(e.to_string()))?;
        let agent = concat!("sluice/", env!("CARGO_PKG_VERSION"));
        req.headers_mut().insert("user-agent", http_value(agent)?);
        if let Some(t) = &self.token {
            req.headers_mut().insert("authorization", http_value(&format!("Bearer {t}"))?);
        }
        let connect = tokio_tungstenite::connect_async(req);
        let (mut ws, _) = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| TailError::BeforeFirstFrame("no answer within 10 s".into()))?
            .map_err(|e| TailError::BeforeFirstFrame(e.to_string()))?;
        let mut passed = 0;
        loop {
            let frame = match tokio::time::timeout(self.quiet, ws.next()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                // Nothing for a while: a quiet job, or a connection gone without a word. The
                // job and its log over HTTP tell which.
                Err(_) => {
                    let ended = self.job(id).await.map_err(TailError::Jobs)?.is_none_or(|j| j.is_terminal());
                    if ended || self.logs(id).await.map_err(TailError::Jobs)?.len() > passed {
                        return Err(TailError::Silent);
                    }
                    continue;
                }
            };
            match frame {
                Ok(Message::Text(text)) => {
                    passed += text.len();
                    out(text.as_str())
                }
                Ok(Message::Binary(data)) => {
                    let text = String::from_utf8_lossy(&data);
                    passed += text.len();
                    out(&text)
                }
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(TailError::Jobs(JobsError::Protocol {
                        what: format!("the log of job {id}"),
                        message: e.to_string(),
                    }));
                }
            }
        }
        Ok(())
    }

    /// Polls the whole log and passes on what is new past `shown` bytes: every second, less
    /// often as the log grows (a second more per MB, at most every 10 s: a 200 MB log fetched
    /// whole every second).
    async fn tail_polling(
        &self,
        id: &str,
        mut shown: usize,
        out: &mut impl FnMut(&str),
    ) -> Result<(), JobsError> {
        let mut patience = Patience::default();
        loop {
            let polled = async {
                Ok::<_, JobsError>((
                    self.job(id).await?.is_none_or(|j| j.is_terminal()),
                    self.logs(id).await?,
                ))
            };
            let (ended, logs) = match polled.await {
                Ok(polled) => {
                    patience.answered();
                    polled
                }
                Err(e) => {
                    patience.failed(e)?;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Some(new) = logs.get(shown..).filter(|n| !n.is_empty()) {
                out(new);
                shown = logs.len();
            }
            if ended {
                return Ok(());
            }
            let every = Duration::from_secs(1 + (logs.len() as u64 >> 20)).min(Duration::from_secs(10));
            tokio::time::sleep(every).await;
        }
    }
}

/// How long a followed job's dashboard may fail every call in a row before the follow gives up.
pub const LOST_AFTER: Duration = Duration::from_secs(300);

/// The dashboard's failures in a row while a job is followed: one that may pass (a restart, a
/// proxy's 502: [`JobsError::passing`]) is asked again, up to [`LOST_AFTER`] of them (one failed
/// call ended a follow of an hours-long job, and the command said it failed while it ran on).
#[derive(Default)]
pub struct Patience {
    failing_since: Option<tokio::time::Instant>,
}

impl Patience {
    /// An answer came: the failures in a row start again from none.
    pub fn answered(&mut self) {
        self.failing_since = None;
    }

    /// A call failed with `e`: `Ok` to ask again (said once per spell), else `e` back.
    pub fn failed(&mut self, e: JobsError) -> Result<(), JobsError> {
        if !e.passing() {
            return Err(e);
        }
        if self.failing_since.is_none() {
            tracing::warn!("Ray's dashboard did not answer ({e}); asking again for up to 5 minutes");
        }
        let since = *self.failing_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= LOST_AFTER { Err(e) } else { Ok(()) }
    }
}

enum TailError {
    /// The websocket could not be opened: polling may still work.
    BeforeFirstFrame(String),
    Jobs(JobsError),
    /// The websocket said nothing while the log grew or the job ended.
    Silent,
}

fn http_value(s: &str) -> Result<tokio_tungstenite::tungstenite::http::HeaderValue, TailError> {
    s.parse().map_err(|_| TailError::BeforeFirstFrame("a header value is not valid".into()))
}

/// `name` as one URL path segment: every byte but RFC 3986's unreserved ones escaped (a job id
/// with `#`, `?` or `/` reached Ray as another path: `exp#1` was asked for as `exp`). The admin
/// commands name applications and models with it too.
pub fn segment(name: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(name, RESERVED).to_string()
}

#[cfg(test)]
mod tests {
    /// A follow asks again after a 5xx (a dashboard restarting, a proxy's 502), never after a
    /// refusal of the call itself (a wrong token, a job deleted): those waited 5 minutes.
    #[test]
    fn only_a_dashboard_failing_is_asked_again() {
        let refused =
            |status| super::JobsError::Refused { what: "GET".into(), status, message: String::new() };
        assert!(refused(502).passing() && refused(503).passing());
        assert!(!refused(401).passing() && !refused(404).passing());
        assert!(!super::JobsError::Protocol { what: "GET".into(), message: String::new() }.passing());
    }

    #[test]
    fn a_job_id_is_one_path_segment() {
        assert_eq!(super::segment("exp#1/a b?c"), "exp%231%2Fa%20b%3Fc");
        assert_eq!(super::segment("train-42_x.y~"), "train-42_x.y~");
        assert_eq!(super::segment("é"), "%C3%A9");
    }
}
