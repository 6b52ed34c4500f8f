//! The memory-release hook (`onnx::on_memory_released`): the server passes mimalloc's purge,
//! which must run after each model load (successful or not) and after a session is dropped, so
//! an idle server does not keep a load's freed buffers resident.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_deployments::onnx::{OnnxBackend, OnnxOptions, init_runtime, on_memory_released};

static PURGES: AtomicUsize = AtomicUsize::new(0);

fn count_purge() {
    PURGES.fetch_add(1, Ordering::SeqCst);
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

#[test]
fn the_release_hook_runs_after_loads_failed_loads_and_drops() {
    init_runtime(Path::new(
        &std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (.cargo/config.toml)"),
    ))
    .unwrap();
    on_memory_released(count_purge);
    let options = OnnxOptions::default();

    let backend = OnnxBackend::load(&models().join("mlp/model.onnx"), &options).unwrap();
    assert_eq!(PURGES.load(Ordering::SeqCst), 1, "after a load");
    drop(backend);
    assert_eq!(PURGES.load(Ordering::SeqCst), 2, "after the session is dropped");

    let broken = models().join("mlp/expected.json"); // not an ONNX model
    assert!(OnnxBackend::load(&broken, &options).is_err());
    assert_eq!(PURGES.load(Ordering::SeqCst), 3, "after a load that failed");
}
