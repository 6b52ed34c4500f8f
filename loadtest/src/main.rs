//! The `sluice-loadtest` command line.

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sluice_loadtest::client::{self, Client, Protocol};
use sluice_loadtest::codec::prepare;
use sluice_loadtest::inputs::{Case, load_samples, parse_shape, random_case};
use sluice_loadtest::report::{Report, markdown, write_all};
use sluice_loadtest::run::{Limits, Mode, StepOptions, run_step};

/// Load-test an Open Inference Protocol server. Every run needs --duration or --requests.
#[derive(Parser)]
#[command(name = "sluice-loadtest", version)]
struct Args {
    /// Server address, host:port (REST port for rest-*, gRPC port for grpc and grpc-stream).
    #[arg(long, default_value = "127.0.0.1:8000")]
    url: String,
    /// Model name.
    #[arg(long, short, required_unless_present = "health", default_value = "")]
    model: String,
    /// Model version (empty: the server's choice).
    #[arg(long, default_value = "")]
    model_version: String,
    /// rest-json, rest-binary, grpc, or grpc-stream (Triton's `ModelStreamInfer`: a stream per
    /// closed-loop worker, one request in flight on each; not with --rate or --health).
    #[arg(long, short, default_value = "rest-json")]
    protocol: Protocol,
    /// OIP sample file ({"inputs": [...]} or {"cases": [...]}); without it, random tensors
    /// from the model's metadata. Tensor and request `parameters` are sent as given, and so
    /// is an `outputs` list without `data` (with `data`: the expected outputs for --check).
    #[arg(long)]
    input_data: Option<PathBuf>,
    /// Shape of an input with dynamic dimensions, name:d1,d2 (repeatable).
    #[arg(long = "shape")]
    shapes: Vec<String>,
    /// Rows per request (dimension 0) for random inputs.
    #[arg(long, short, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Closed loop: concurrency levels to sweep, e.g. 1,8,64.
    #[arg(long, value_delimiter = ',', conflicts_with = "rate", value_parser = parse_concurrency)]
    concurrency: Vec<usize>,
    /// Open loop: request rates (per second) to sweep.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    rate: Vec<f64>,
    /// Open-loop arrivals: poisson or constant.
    #[arg(long, default_value = "poisson")]
    distribution: String,
    /// Length of each step, e.g. 10s or 500ms. A step that runs out of time is rated over it
    /// (the answers that came back in it, as wrk does); what it had in flight drains after,
    /// counted in `ok` and the latencies (report.json's `drain_seconds`).
    #[arg(long, value_parser = parse_positive_duration)]
    duration: Option<Duration>,
    /// Requests per step.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,
    /// Unmeasured load before each step.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    warmup: Duration,
    /// How long one request may take before it counts as a `timeout` error (so a server that
    /// stops answering cannot hold the run); latencies are recorded up to it.
    #[arg(long, value_parser = parse_positive_duration, default_value = "30s")]
    timeout: Duration,
    /// Compare each response with the sample file's expected outputs (datatype, shape and
    /// values); mismatches count as errors, and the run exits 3 when there was any, or when
    /// no request was answered at all (after writing its reports).
    #[arg(long)]
    check: bool,
    /// Tolerance for --check when the sample file gives none.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Write report.json, report.md and latency.svg here.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Write every measured request to this CSV file: step, sent_unix_us, latency_us, outcome
    /// (`ok` or the failure kind). Holds one record per request in memory until the run ends.
    #[arg(long)]
    request_log: Option<PathBuf>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Threads of the load generator. Default 1: on a small machine it shares the CPUs with the
    /// server, and one event loop (as `wrk -t1`) disturbs it least.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=1024), usize::from))]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Send the protocol's liveness call instead of inference (REST `GET /v2/health/live`,
    /// gRPC `ServerLive`) over the same connections and concurrency: the floor that infer
    /// numbers compare with. No model or input data needed.
    #[arg(long, conflicts_with_all = ["input_data", "check", "model"])]
    health: bool,
}

/// The requests of every step as CSV, in send order within each step.
fn write_request_log(steps: &[sluice_loadtest::stats::StepResult], file: std::fs::File) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(file);
    writeln!(out, "step,sent_unix_us,latency_us,outcome")?;
    for step in steps {
        let start_us = (step.started_unix_s * 1e6) as u64;
        let mut requests: Vec<_> = step.requests.iter().collect();
        requests.sort_by_key(|r| r.sent);
        for r in requests {
            let sent = start_us + r.sent.as_micros() as u64;
            // One field: a server's message may hold commas, quotes or line breaks.
            let outcome =
                r.error.as_deref().unwrap_or("ok").replace(',', ";").replace(['"', '\n', '\r'], " ");
            writeln!(out, "{},{sent},{},{outcome}", step.label, r.latency.as_micros())?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The highest open-loop rate taken: past it one thread could not pace the sends (at a few
/// billion a second the gap between them rounded to 0 ns, and a step never ended).
const MAX_RATE: f64 = 10_000_000.0;

fn parse_rate(s: &str) -> Result<f64, String> {
    // At least one request a year: a longer gap would overflow the clock (it panicked).
    let min = 1.0 / MAX_SECONDS;
    match s.trim().parse::<f64>() {
        Ok(r) if (min..=MAX_RATE).contains(&r) => Ok(r),
        _ => Err(format!("bad rate `{s}`: requests per second, from one a year ({min:.1e}) to {MAX_RATE:e}")),
    }
}

/// The longest duration taken (a year): longer ones would overflow the clock's arithmetic.
const MAX_SECONDS: f64 = 365.0 * 86_400.0;

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(s.trim().find(|c: char| c.is_alphabetic()).unwrap_or(s.trim().len()));
    let n: f64 = num.parse().map_err(|_| format!("bad duration `{s}` (e.g. 10s, 500ms)"))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(format!("bad duration `{s}`: must be 0 or more"));
    }
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in `{s}` (ms, s, m)")),
    };
    if secs > MAX_SECONDS {
        return Err(format!("bad duration `{s}`: at most a year"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A step's length or a request's timeout: 0 would send nothing, or fail every request.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("bad duration `{s}`: must be above 0")),
        d => Ok(d),
    }
}

fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_CONCURRENCY).contains(&n) => Ok(n),
        _ => Err(format!("bad concurrency `{s}`: 1 to {MAX_CONCURRENCY}")),
    }
}

/// Each closed-loop worker holds a connection (REST) or a stream.
const MAX_CONCURRENCY: usize = 100_000;

fn main() {
    let args = Args::parse();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build();
    let result = match rt {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.duration.is_none() && args.requests.is_none() {
        bail!("give --duration or --requests: every run must stop by itself");
    }
    // Found unwritable now, not after the whole run (which then lost its report too).
    let request_log = match &args.request_log {
        Some(path) => {
            Some(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?)
        }
        None => None,
    };
    // A REST connection per closed-loop worker, or per outstanding open-loop request; gRPC
    // multiplexes its calls on one.
    let connections = match (args.protocol, args.rate.is_empty()) {
        (client::Protocol::Grpc | client::Protocol::GrpcStream, _) => 1,
        (_, true) => args.concurrency.iter().copied().max().unwrap_or(1) as u64,
        (_, false) => sluice_loadtest::run::MAX_OUTSTANDING,
    };
    if let Some(note) = sluice_loadtest::run::raise_open_files(connections) {
        eprintln!("warning: {note}");
    }
    if args.protocol == client::Protocol::GrpcStream && (!args.rate.is_empty() || args.health) {
        bail!("grpc-stream is closed loop (--concurrency) and sends inference (not --health)");
    }
    let addrs: Vec<_> =
        args.url.to_socket_addrs().with_context(|| format!("resolving {}", args.url))?.collect();
    if !args.allow_remote && !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!("{} is not a loopback address; pass --allow-remote to load a remote server", args.url);
    }
    let cases = match &args.input_data {
        Some(path) => load_samples(path, args.tolerance)?,
        // Liveness calls carry no tensors.
        None if args.health => vec![Case::no_tensors()],
        None => {
            if args.check {
                bail!("--check needs --input-data with expected outputs");
            }
            let shapes: HashMap<String, Vec<u64>> =
                args.shapes.iter().map(|s| parse_shape(s)).collect::<Result<_>>()?;
            // Bounded like a request: a server that accepts and never answers cannot hold the run.
            let inputs = tokio::time::timeout(
                args.timeout,
                client::model_inputs(args.protocol, &args.url, &args.model, &args.model_version),
            )
            .await
            .with_context(|| {
                format!("the model's metadata did not come within --timeout ({:?})", args.timeout)
            })??;
            vec![random_case(&inputs, &shapes, args.batch, 42)?]
        }
    };
    let prepared = Arc::new(
        cases.iter().map(|c| prepare(c, &args.model, &args.model_version)).collect::<Result<Vec<_>>>()?,
    );
    // A case without expected outputs would pass --check unchecked.
    if args.check
        && let Some(k) = prepared.iter().position(|p| p.expected.is_none())
    {
        bail!("--check: case {k} of the input data has no expected outputs to compare with");
    }
    // Bounded as the metadata fetch is: a host that drops the connect's packets held the run for
    // the kernel's SYN retries (about two minutes) whatever --timeout said.
    let connect = Client::connect(args.protocol, &args.url, &args.model, &args.model_version);
    let mut client = tokio::time::timeout(args.timeout, connect)
        .await
        .with_context(|| format!("no connection to {} within --timeout ({:?})", args.url, args.timeout))??;
    if args.health {
        client = client.liveness();
    }
    let client = Arc::new(client);
    let poisson = match args.distribution.as_str() {
        "poisson" => true,
        "constant" => false,
        other => bail!("unknown --distribution {other} (poisson, constant)"),
    };
    let modes: Vec<Mode> = if !args.rate.is_empty() {
        args.rate.iter().map(|&rate| Mode::Open { rate, poisson }).collect()
    } else if !args.concurrency.is_empty() {
        args.concurrency.iter().map(|&concurrency| Mode::Closed { concurrency }).collect()
    } else {
        vec![Mode::Closed { concurrency: 1 }]
    };
    let limits = Limits { duration: args.duration, requests: args.requests };
    let mut steps = Vec::new();
    for mode in modes {
        if !args.warmup.is_zero() {
            let warm = Limits { duration: Some(args.warmup), requests: None };
            let options = StepOptions { timeout: Some(args.timeout), ..StepOptions::default() };
            run_step(client.clone(), prepared.clone(), mode, warm, options, None).await;
        }
        let progress = (!args.quiet).then(|| {
            let pb = match args.requests {
                Some(n) => ProgressBar::new(n),
                None => ProgressBar::new_spinner(),
            };
            pb.set_style(
                ProgressStyle::with_template("{spinner} {msg} {pos} requests {elapsed} [{bar:30}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(format!("{mode:?}"));
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        });
        let options = StepOptions {
            check: args.check,
            request_log: args.request_log.is_some(),
            timeout: Some(args.timeout),
        };
        let mut result =
            run_step(client.clone(), prepared.clone(), mode, limits, options, progress.clone()).await;
        if let Some(pb) = progress {
            pb.finish_and_clear();
        }
        result.protocol = args.protocol.to_string();
        steps.push(result);
    }
    print!("{}", markdown(&steps));
    if let Some(dir) = &args.output_dir {
        let report = Report {
            target: args.url.clone(),
            model: args.model.clone(),
            protocol: args.protocol.to_string(),
            steps,
        };
        write_all(&report, dir)?;
        eprintln!("wrote {}/report.json, report.md, latency.svg", dir.display());
        steps = report.steps;
    }
    if let (Some(file), Some(path)) = (request_log, &args.request_log) {
        write_request_log(&steps, file).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    // An answer that could not be read (a binary output past the body, no outputs, contents
    // cut short) failed the check as surely as one that read other values.
    let failed = |kind: &str| kind == "mismatch" || kind.starts_with("bad response");
    let mismatches: u64 =
        steps.iter().flat_map(|s| &s.errors).filter(|(kind, _)| failed(kind)).map(|(_, n)| n).sum();
    if args.check && mismatches > 0 {
        eprintln!(
            "error: --check: {mismatches} answer(s) did not match the expected outputs or could not be read"
        );
        std::process::exit(3);
    }
    // Nothing compared at all (every request failed: a wrong model answering 400) is no pass.
    if args.check && steps.iter().all(|s| s.ok == 0) {
        eprintln!("error: --check: no request was answered, so nothing matched the expected outputs");
        std::process::exit(3);
    }
    Ok(())
}
