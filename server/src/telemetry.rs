//! Logs and traces. Logs go to stderr as text or JSON lines (`log_format`), filtered by
//! `RUST_LOG`. With `tracing_options.otlp_endpoint`, every request also becomes an
//! OpenTelemetry trace exported over OTLP/gRPC: the frontend's `request` span (joined to the
//! caller's trace when it sent a W3C `traceparent` header or gRPC metadata), the deployment's
//! `infer` span with `queue` (admission) and `model` (the batch's model call) inside it, the
//! REST `encode`, and a pipeline's `step` spans. These spans are DEBUG-level `tracing` spans:
//! they cost nothing when neither logs nor traces ask for them.

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use sluice_config::{LogFormat, TracingOptions};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Why logging or tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing_options.otlp_endpoint `{endpoint}`: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a global logger is already set: {0}")]
    Subscriber(String),
}

/// Keeps the trace exporter alive; dropping it sends what is left.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends every finished span now (tests and shutdown).
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

/// How long the spans still buffered at exit may take to reach the collector (the SDK's own
/// default, 5 s, spent against a collector that does not answer, took a shutdown past
/// `graceful_shutdown_timeout_s` by that much, and a pod's grace ended it with SIGKILL).
const FLUSH_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown_with_timeout(FLUSH_AT_EXIT);
        }
    }
}

/// Sets the process's logger (and tracer, with an endpoint). `filter` is what `RUST_LOG` asks
/// for (the binary reads it). Call once, inside a tokio runtime when tracing is on.
pub fn init(
    filter: EnvFilter,
    format: LogFormat,
    tracing: &TracingOptions,
) -> Result<Telemetry, TelemetryError> {
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            // Every span the line happened in (a model call's span has the model; the request's
            // around it has the trace id), not the innermost alone.
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let Some(endpoint) = &tracing.otlp_endpoint else {
        Registry::default().with(logs).try_init().map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
        return Ok(Telemetry { provider: None });
    };
    let exporter =
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TelemetryError::Exporter { endpoint: endpoint.clone(), message: e.to_string() })?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(tracing.sample_ratio))))
        .with_resource(
            opentelemetry_sdk::Resource::builder().with_service_name(tracing.service_name.clone()).build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer("sluice");
    // Traces take the request path's spans, whatever the log filter says.
    let spans = Targets::new()
        .with_target("sluice", LevelFilter::DEBUG)
        .with_target("sluice_server", LevelFilter::DEBUG)
        .with_target("sluice_deployments", LevelFilter::DEBUG)
        .with_target("tower_http::trace", LevelFilter::DEBUG);
    let traces = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans);
    Registry::default()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(Telemetry { provider: Some(provider) })
}

/// Reads W3C trace context from request headers (gRPC metadata are HTTP/2 headers too).
struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Whether anything records request spans: `RUST_LOG` at DEBUG for Sluice, or OpenTelemetry
/// export (`init` must have run). The REST and gRPC frontends add their tracing layer only then:
/// even with nothing recording, it costs every request a clock read, span checks on every poll
/// and a second boxed response body.
pub fn request_spans_recorded() -> bool {
    tracing::enabled!(target: "sluice_server", tracing::Level::DEBUG)
}

/// The span of one request at a frontend (REST, gRPC, admin): a child of the caller's trace
/// when it sent `traceparent`, with the trace id recorded for the logs.
pub fn request_span<B>(req: &axum::http::Request<B>) -> tracing::Span {
    let span = tracing::debug_span!(
        target: "sluice_server",
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        trace_id = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    // W3C trace context read here, not through the global propagator (a no-op unless traces
    // are exported): the logs carry the caller's trace id either way.
    use opentelemetry::propagation::TextMapPropagator;
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&HeaderExtractor(req.headers()));
    let callers = parent.span().span_context().trace_id();
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let own = span.context().span().span_context().trace_id();
    let trace_id = if own == opentelemetry::trace::TraceId::INVALID { callers } else { own };
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}
