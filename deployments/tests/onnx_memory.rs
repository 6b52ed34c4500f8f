//! ONNX Runtime's memory: the release hook (`onnx::on_memory_released`; the server passes
//! mimalloc's purge), which must run after each model load, successful or not, and after a
//! session is dropped, so that an idle server does not keep a load's freed buffers resident;
//! and `cpu_memory_arena` and `memory_pattern`, on and off.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_deployments::onnx::{OnnxBackend, OnnxOptions, init_runtime, on_memory_released};
use sluice_deployments::{Backend, DataType, NamedTensor, Tensor};

static PURGES: AtomicUsize = AtomicUsize::new(0);
/// The tests of this file load models one at a time: the hook counts every load.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    on_memory_released(count_purge);
    let options = OnnxOptions::default();
    let start = PURGES.load(Ordering::SeqCst);

    let backend = OnnxBackend::load(&models().join("mlp/model.onnx"), &options).unwrap();
    assert_eq!(PURGES.load(Ordering::SeqCst) - start, 1, "after a load");
    drop(backend);
    assert_eq!(PURGES.load(Ordering::SeqCst) - start, 2, "after the session is dropped");

    let broken = models().join("mlp/expected.json"); // not an ONNX model
    assert!(OnnxBackend::load(&broken, &options).is_err());
    assert_eq!(PURGES.load(Ordering::SeqCst) - start, 3, "after a load that failed");
}

/// `cpu_memory_arena` and `memory_pattern` on and off: each way loads, and gives the model's
/// expected answer on every call (with the memory pattern on, the second call of a shape runs
/// from the plan the first one made).
#[test]
fn every_memory_setting_answers_the_expected_outputs() {
    init_runtime(Path::new(
        &std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (.cargo/config.toml)"),
    ))
    .unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("mlp/expected.json")).unwrap()).unwrap();
    let case = &expected["cases"][0];
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let input = floats(&case["inputs"][0]["data"]);
    let want = floats(&case["outputs"][0]["data"]);
    assert_eq!(case["outputs"][0]["name"], "logits");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (arena, pattern) in [(false, false), (true, false), (false, true), (true, true)] {
        let options =
            OnnxOptions { cpu_memory_arena: arena, memory_pattern: pattern, ..OnnxOptions::default() };
        let mut backend = OnnxBackend::load(&models().join("mlp/model.onnx"), &options).unwrap();
        for call in 0..2 {
            let what = format!("arena {arena}, memory pattern {pattern}, call {call}");
            let bytes: Vec<u8> = input.iter().flat_map(|x| x.to_le_bytes()).collect();
            let x = Tensor::new(DataType::Fp32, vec![1, input.len()], bytes.into()).unwrap();
            let out =
                backend.infer(vec![NamedTensor { name: "x".into(), tensor: x }], &["logits".into()]).unwrap();
            let got: Vec<f32> = out[0]
                .tensor
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(got.len(), want.len(), "{what}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{what}: {got:?} against {want:?}");
            }
        }
    }
}
