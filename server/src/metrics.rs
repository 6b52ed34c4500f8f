//! The Prometheus exporter: installed once per process (before any deployment creates its
//! metric handles), rendered at `GET /metrics`. Names, units and buckets are declared in
//! [`sluice_deployments::metrics`].

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Set in a `sluice proxy` process: see [`render`].
static PROXY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This process is a proxy on another node than the controller's (`sluice proxy`).
pub fn serve_as_proxy() {
    PROXY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The families a proxy leaves out: its replica sets mirror the controller's, whose gauges the
/// head serves already (summed over the head and its proxies, they would count each replica
/// once per process, and a proxy's view that lags could fire the no-ready-replica alert).
const PROXY_LEFT_OUT: &[&str] = {
    use sluice_deployments::metrics::*;
    &[REPLICAS_READY, REPLICAS, REPLICA_RESTARTS]
};

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

/// `GET /metrics`: Prometheus text format, without the series of retired versions and of
/// replicas gone (and in a proxy, without the [`PROXY_LEFT_OUT`] families).
pub async fn render() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    use sluice_deployments::metrics::{BODY_BYTES_READING, gone_labels, gone_replicas, retired};
    // Read as it is scraped (an embedding application's own recorder is not set from here).
    let body = install()
        .map(|h| {
            metrics::gauge!(BODY_BYTES_READING).set(crate::rest::BodyBudget::held_in_process() as f64);
            h.render()
        })
        .unwrap_or_default();
    let mut body = without_gone(body, &retired(), &gone_replicas(), &gone_labels());
    if PROXY.load(std::sync::atomic::Ordering::Relaxed) {
        body = families(&body, |f| !PROXY_LEFT_OUT.contains(&f));
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// The families a `sluice replica` process serves (on its gRPC port): what happens inside it,
/// its queue, model calls, batches and multiplexed models. The head serves the requests
/// (counts, latencies) and the replicas' gauges: served again by each replica, they would be
/// counted twice.
const REPLICA_FAMILIES: &[&str] = {
    use sluice_deployments::metrics::*;
    &[
        QUEUE_DURATION,
        INFERENCE_DURATION,
        BATCH_SIZE,
        // A model that panicked is reloaded inside the process (its actor lives on, and the
        // head, which counts lost actors, never hears of it).
        REPLICA_RESTARTS,
        MULTIPLEX_REQUESTS,
        MULTIPLEX_LOADS,
        MULTIPLEX_EVICTIONS,
        MULTIPLEX_LOAD_DURATION,
    ]
};

/// `GET /metrics` on a replica process's gRPC port: [`render`]'s text, only the
/// [`REPLICA_FAMILIES`].
pub async fn render_replica() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let (header, body) = render().await;
    (header, families(&body, |f| REPLICA_FAMILIES.contains(&f)))
}

/// The lines of `text` (comments included) whose family `keep` keeps (a histogram's `_bucket`,
/// `_sum` and `_count` samples belong to its family: the name without the suffix, where `keep`
/// names it so).
fn families(text: &str, keep: impl Fn(&str) -> bool) -> String {
    let family = |line: &str| -> Option<String> {
        let name = match line.strip_prefix("# ") {
            // `# HELP name …` and `# TYPE name …`.
            Some(comment) => comment.split(' ').nth(1)?,
            None => line.split(['{', ' ']).next()?,
        };
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s));
        Some(base.filter(|b| keep(b)).unwrap_or(name).to_string())
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if family(line).is_some_and(|f| keep(&f)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `text` without the samples labelled with a (model, version) of `retired` (a version whose
/// deployments are all gone; see `sluice_deployments::metrics::retired`), nor those labelled
/// with a (model, version, replica) of `replicas` (a replica gone: the autoscaler removed it,
/// or it was replaced), nor those with a (label, value) of `labels` (a multiplexed deployment
/// deleted, a repository moved or removed).
fn without_gone(
    text: String,
    retired: &HashSet<(String, String)>,
    replicas: &HashSet<(String, String, String)>,
    labels: &HashSet<(&'static str, String)>,
) -> String {
    if retired.is_empty() && replicas.is_empty() && labels.is_empty() {
        return text;
    }
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if labels.iter().any(|(name, value)| label(line, name).is_some_and(|v| v == *value)) {
            continue;
        }
        if let Some((model, version)) = label(line, "model").zip(label(line, "version")) {
            let replica = || label(line, "replica");
            if retired.contains(&(model.clone(), version.clone()))
                || (!replicas.is_empty()
                    && replica().is_some_and(|r| replicas.contains(&(model, version, r))))
            {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The value of label `name` in a sample line (`metric{a="x",name="y"} 1`), unescaped; None
/// for comments and lines without it.
fn label(line: &str, name: &str) -> Option<String> {
    if line.starts_with('#') {
        return None;
    }
    let mut rest = &line[line.find('{')? + 1..];
    loop {
        let (key, after) = rest.split_once("=\"")?;
        // The value runs to the first quote not escaped (`\"`, `\\` and `\n` are escapes).
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        if key == name {
            return Some(value);
        }
        let after = &after[end + 1..];
        if !after.starts_with(',') {
            return None;
        }
        rest = &after[1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_leaves_the_controllers_replica_gauges_out() {
        let text = "# TYPE sluice_replicas_ready gauge\n\
                    sluice_replicas_ready{model=\"m\",version=\"1\"} 2\n\
                    sluice_replicas{model=\"m\",version=\"1\"} 2\n\
                    sluice_request_duration_seconds_count{model=\"m\",version=\"1\",protocol=\"rest\"} 5\n\
                    sluice_replica_in_flight{model=\"m\",version=\"1\",replica=\"0\"} 1\n";
        assert_eq!(
            families(text, |f| !PROXY_LEFT_OUT.contains(&f)),
            "sluice_request_duration_seconds_count{model=\"m\",version=\"1\",protocol=\"rest\"} 5\n\
             sluice_replica_in_flight{model=\"m\",version=\"1\",replica=\"0\"} 1\n"
        );
    }

    #[test]
    fn a_replica_serves_only_what_runs_inside_it() {
        let text = "# HELP sluice_requests_total Requests\n\
                    # TYPE sluice_requests_total counter\n\
                    sluice_requests_total{model=\"m\",version=\"1\",protocol=\"grpc\",outcome=\"success\"} 5\n\
                    # TYPE sluice_batch_size histogram\n\
                    sluice_batch_size_bucket{model=\"m\",version=\"1\",le=\"1\"} 3\n\
                    sluice_batch_size_sum{model=\"m\",version=\"1\"} 7\n\
                    sluice_batch_size_count{model=\"m\",version=\"1\"} 4\n\
                    sluice_replicas_ready{model=\"m\",version=\"1\"} 1\n\
                    sluice_replica_restarts_total{model=\"m\",version=\"1\"} 1\n\
                    sluice_multiplex_loads_total{deployment=\"m\"} 2\n\
                    sluice_queue_duration_seconds_count{model=\"m\",version=\"1\"} 5\n";
        assert_eq!(
            families(text, |f| REPLICA_FAMILIES.contains(&f)),
            "# TYPE sluice_batch_size histogram\n\
             sluice_batch_size_bucket{model=\"m\",version=\"1\",le=\"1\"} 3\n\
             sluice_batch_size_sum{model=\"m\",version=\"1\"} 7\n\
             sluice_batch_size_count{model=\"m\",version=\"1\"} 4\n\
             sluice_replica_restarts_total{model=\"m\",version=\"1\"} 1\n\
             sluice_multiplex_loads_total{deployment=\"m\"} 2\n\
             sluice_queue_duration_seconds_count{model=\"m\",version=\"1\"} 5\n"
        );
    }

    #[test]
    fn the_series_of_retired_versions_are_left_out() {
        let text = "# HELP sluice_replicas_ready Ready replicas\n\
                    sluice_replicas_ready{model=\"m\",version=\"1\"} 0\n\
                    sluice_replicas_ready{model=\"m\",version=\"2\"} 2\n\
                    sluice_requests_total{model=\"m\",version=\"1\",protocol=\"rest\",outcome=\"success\"} 5\n\
                    sluice_multiplex_loads_total{deployment=\"m\"} 1\n\
                    sluice_request_duration_seconds_bucket{model=\"m\",version=\"1\",protocol=\"rest\",le=\"0.1\"} 5\n";
        let retired = HashSet::from([("m".to_string(), "1".to_string())]);
        let none = HashSet::new();
        let kept = without_gone(text.to_string(), &retired, &HashSet::new(), &none);
        assert_eq!(
            kept,
            "# HELP sluice_replicas_ready Ready replicas\n\
             sluice_replicas_ready{model=\"m\",version=\"2\"} 2\n\
             sluice_multiplex_loads_total{deployment=\"m\"} 1\n"
        );
        assert_eq!(without_gone(text.to_string(), &HashSet::new(), &HashSet::new(), &none), text);
        // A replica gone: its series only.
        let text = "sluice_replica_in_flight{model=\"m\",version=\"2\",replica=\"0\"} 0\n\
                    sluice_replica_in_flight{model=\"m\",version=\"2\",replica=\"1\"} 3\n";
        let gone = HashSet::from([("m".to_string(), "2".to_string(), "0".to_string())]);
        assert_eq!(
            without_gone(text.to_string(), &HashSet::new(), &gone, &none),
            "sluice_replica_in_flight{model=\"m\",version=\"2\",replica=\"1\"} 3\n"
        );
        // A multiplexed deployment deleted, a repository moved: their series only.
        let text = "sluice_multiplex_loads_total{deployment=\"gone\"} 1\n\
                    sluice_multiplex_loads_total{deployment=\"kept\"} 2\n\
                    sluice_repository_up{repository=\"s3://old\"} 0\n\
                    sluice_repository_up{repository=\"s3://new\"} 1\n";
        let labels =
            HashSet::from([("deployment", "gone".to_string()), ("repository", "s3://old".to_string())]);
        assert_eq!(
            without_gone(text.to_string(), &HashSet::new(), &HashSet::new(), &labels),
            "sluice_multiplex_loads_total{deployment=\"kept\"} 2\nsluice_repository_up{repository=\"s3://new\"} 1\n"
        );
        assert_eq!(label("x{model=\"a\",version=\"b\"} 1", "version").as_deref(), Some("b"));
        assert_eq!(label("x 1", "model"), None);
        // Quotes and backslashes in a name come escaped.
        let odd = r#"x{model="a\"b\\c",version="1"} 1"#;
        assert_eq!(label(odd, "model").as_deref(), Some(r#"a"b\c"#));
        assert_eq!(label(odd, "version").as_deref(), Some("1"));
    }
}
