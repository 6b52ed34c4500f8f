//! The repository's metrics (names, units and help declared in `sluice_deployments::metrics`).

use sluice_deployments::metrics::{
    REPOSITORY_DOWNLOADED_BYTES, REPOSITORY_REJECTED, REPOSITORY_SCANS, REPOSITORY_UP,
};

/// A listing of the repository at `url` succeeded or failed.
pub(crate) fn scanned(url: &str, ok: bool) {
    metrics::gauge!(REPOSITORY_UP, "repository" => url.to_string()).set(if ok { 1.0 } else { 0.0 });
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!(REPOSITORY_SCANS, "repository" => url.to_string(), "outcome" => outcome).increment(1);
}

/// Bytes fetched from the store into the cache.
pub(crate) fn downloaded(bytes: u64) {
    metrics::counter!(REPOSITORY_DOWNLOADED_BYTES).increment(bytes);
}

/// A version was rejected (it failed to load, or its canary was rolled back).
pub(crate) fn rejected(model: &str) {
    metrics::counter!(REPOSITORY_REJECTED, "model" => model.to_string()).increment(1);
}
