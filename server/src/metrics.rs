//! The Prometheus exporter: installed once per process (before any deployment creates its
//! metric handles), rendered at `GET /metrics`. Names, units and buckets are declared in
//! [`sluice_deployments::metrics`].

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (first call only) and returns its handle; `None` when another
/// recorder was installed first (an embedding application's).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in sluice_deployments::metrics::BUCKETS {
                builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets).ok()?;
            }
            let handle = builder.install_recorder().ok()?;
            sluice_deployments::metrics::describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .as_ref()
}

/// `GET /metrics`: Prometheus text format.
pub async fn render() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let body = install().map(|h| h.render()).unwrap_or_default();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
