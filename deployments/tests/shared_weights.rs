//! Replicas of one ONNX model sharing its weights (`share_weights`): the initializers read from
//! the file, sessions built on them answering as a session with its own copy does, and the
//! factory for a config deployment reading them once for all its replicas.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sluice_config::{Model, ReplicaSettings};
use sluice_deployments::onnx::{OnnxBackend, OnnxOptions, init_runtime};
use sluice_deployments::weights::{self, MIN_SHARED_BYTES, SharedWeights};
use sluice_deployments::{Backend, DataType, NamedTensor, Tensor, backend_factory};

/// The tests of this file read weights one at a time: one of them counts the reads.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models")
}

fn runtime() {
    init_runtime(Path::new(
        &std::env::var_os("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (.cargo/config.toml)"),
    ))
    .unwrap();
}

/// Runs every case of the mlp fixture's expected.json through `backend` and compares both outputs.
fn answers_the_mlp_cases(backend: &mut dyn Backend, what: &str) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models().join("mlp/expected.json")).unwrap()).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    };
    let cases = expected["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let input = &case["inputs"][0];
        let shape: Vec<usize> =
            input["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let bytes: Vec<u8> = floats(&input["data"]).iter().flat_map(|x| x.to_le_bytes()).collect();
        let x = Tensor::new(DataType::Fp32, shape, bytes.into()).unwrap();
        let names: Vec<String> = case["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect();
        let out = backend.infer(vec![NamedTensor { name: "x".into(), tensor: x }], &names).unwrap();
        for (got, want) in out.iter().zip(case["outputs"].as_array().unwrap()) {
            let got: Vec<f32> = got
                .tensor
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let want = floats(&want["data"]);
            assert_eq!(got.len(), want.len(), "{what}, case {}", case["name"]);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{what}, case {}: {got:?} against {want:?}", case["name"]);
            }
        }
    }
}

#[test]
fn reads_the_initializers_at_or_above_the_threshold() {
    runtime();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mlp = models().join("mlp/model.onnx");
    // w1 [8, 16], b1 [16], w2 [16, 4], b2 [4], float32.
    let all = SharedWeights::read(&mlp, 0).unwrap();
    assert_eq!((all.count(), all.bytes()), (4, (128 + 16 + 64 + 4) * 4));
    let mut names: Vec<&str> = all.initializers().map(|(name, _)| name).collect();
    names.sort_unstable();
    assert_eq!(names, ["b1", "b2", "w1", "w2"]);
    let large = SharedWeights::read(&mlp, 64).unwrap();
    assert_eq!((large.count(), large.bytes()), (3, (128 + 16 + 64) * 4));
    assert_eq!(
        SharedWeights::read(&mlp, MIN_SHARED_BYTES).unwrap().count(),
        0,
        "the fixture's weights are all small"
    );

    let err = SharedWeights::read(&models().join("mlp/expected.json"), 0).unwrap_err().to_string();
    assert!(err.contains("expected.json") && err.contains("not an ONNX model"), "{err}");
    let err = SharedWeights::read(&models().join("mlp/missing.onnx"), 0).unwrap_err().to_string();
    assert!(err.contains("missing.onnx"), "{err}");
}

#[test]
fn sessions_on_shared_initializers_answer_as_their_own_copy_does() {
    runtime();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mlp = models().join("mlp/model.onnx");
    let options = OnnxOptions::default();
    let weights = Arc::new(SharedWeights::read(&mlp, 0).unwrap());
    let mut first = OnnxBackend::load_shared(&mlp, &options, Arc::clone(&weights)).unwrap();
    let mut second = OnnxBackend::load_shared(&mlp, &options, Arc::clone(&weights)).unwrap();
    // Each session holds every shared value (ONNX Runtime reads the caller's buffer), besides the
    // one in `weights`.
    for (name, value) in weights.initializers() {
        assert_eq!(Arc::strong_count(value), 3, "initializer `{name}`");
    }
    answers_the_mlp_cases(&mut first, "first replica");
    answers_the_mlp_cases(&mut second, "second replica");
    drop(first);
    drop(second);
    for (name, value) in weights.initializers() {
        assert_eq!(Arc::strong_count(value), 1, "initializer `{name}` after the sessions dropped");
    }
    let mut own = OnnxBackend::load(&mlp, &options).unwrap();
    answers_the_mlp_cases(&mut own, "a session with its own copy");
}

/// Every fixture model, with every initializer shared (shape constants, int64 tables, the
/// embedding of the tiny encoder, a `Reshape` target), loads as it does on its own.
#[test]
fn every_fixture_model_loads_on_all_its_initializers_shared() {
    runtime();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let options = OnnxOptions::default();
    let mut shared_any = 0;
    for name in ["iris", "iris-v2", "mlp", "dtypes", "tiny-encoder", "broken"] {
        let path = models().join(name).join("model.onnx");
        let weights = Arc::new(SharedWeights::read(&path, 0).unwrap());
        shared_any += weights.count();
        let shared =
            OnnxBackend::load_shared(&path, &options, weights).unwrap_or_else(|e| panic!("{name}: {e}"));
        let own = OnnxBackend::load(&path, &options).unwrap();
        assert_eq!(shared.metadata(), own.metadata(), "{name}");
    }
    assert!(shared_any >= 8, "the fixtures have initializers: {shared_any}");
}

#[test]
fn the_config_factory_reads_the_weights_once_for_all_replicas() {
    runtime();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = Model::Onnx(models().join("mlp/model.onnx"));
    // (share_weights, max_replicas) -> reads of the file for 3 replicas alive at once.
    for (share_weights, max_replicas, reads) in [(true, 3, 1), (false, 3, 0), (true, 1, 0)] {
        let what = format!("share_weights {share_weights}, max_replicas {max_replicas}");
        let settings = ReplicaSettings { share_weights, ..ReplicaSettings::default() };
        let factory = backend_factory(&model, &settings, max_replicas, "m").unwrap();
        let before = weights::reads();
        let mut replicas: Vec<_> = (0..3).map(|_| factory().unwrap()).collect();
        assert_eq!(weights::reads() - before, reads, "{what}");
        for (i, replica) in replicas.iter_mut().enumerate() {
            answers_the_mlp_cases(replica.as_mut(), &format!("{what}, replica {i}"));
        }
        // A replacement while others run reuses the weights; after the last replica is gone,
        // the next one reads them again.
        replicas.pop();
        replicas.push(factory().unwrap());
        assert_eq!(weights::reads() - before, reads, "{what}: a replacement");
        replicas.clear();
        let _again = factory().unwrap();
        assert_eq!(weights::reads() - before, 2 * reads, "{what}: after all replicas stopped");
    }
    // A model file replaced while replicas run: the next replica reads the new file's weights
    // rather than giving the old ones to a session of the new file.
    let dir = std::env::temp_dir().join(format!("sluice-shared-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("model.onnx");
    std::fs::copy(models().join("mlp/model.onnx"), &copy).unwrap();
    let factory = backend_factory(&Model::Onnx(copy.clone()), &ReplicaSettings::default(), 2, "m").unwrap();
    let before = weights::reads();
    let _first = factory().unwrap();
    let _second = factory().unwrap();
    assert_eq!(weights::reads() - before, 1);
    let mut bytes = std::fs::read(&copy).unwrap();
    // A second `doc_string` (field 6) replaces the first: the same weights in a file of another
    // size, which is what tells it changed.
    bytes.extend_from_slice(&[0x32, 0x01, b'x']);
    std::fs::write(&copy, &bytes).unwrap();
    let mut third = factory().unwrap();
    assert_eq!(weights::reads() - before, 2, "the replaced file is read again");
    answers_the_mlp_cases(third.as_mut(), "a replica of the replaced file");
    // Rewritten at the same size with its modification time kept (`cp -p`, `rsync -a`): read
    // again too (the size and modification time alone called it the same file).
    let mtime = std::fs::metadata(&copy).unwrap().modified().unwrap();
    let last = bytes.len() - 1;
    bytes[last] = b'y';
    std::fs::write(&copy, &bytes).unwrap();
    std::fs::File::options().write(true).open(&copy).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), mtime);
    let _fourth = factory().unwrap();
    assert_eq!(weights::reads() - before, 3, "the rewritten file is read again");
    std::fs::remove_dir_all(&dir).unwrap();

    // A file ONNX Runtime cannot load fails with its reason, shared or not.
    let broken = Model::Onnx(models().join("mlp/expected.json"));
    for share_weights in [true, false] {
        let settings = ReplicaSettings { share_weights, ..ReplicaSettings::default() };
        let err = backend_factory(&broken, &settings, 2, "m").unwrap()()
            .err()
            .expect("a JSON file loads as a model")
            .to_string();
        assert!(err.contains("mlp/expected.json") && err.contains("Protobuf parsing failed"), "{err}");
    }
}

/// The files a model's external weights are read from, found in the model file; none for a
/// model that keeps its weights inside, or a file that is not a model.
#[test]
fn external_weights_files_are_found_in_the_model() {
    let dir = models().join("mlp-external");
    assert_eq!(weights::external_files(&dir.join("model.onnx")), [dir.join("weights.bin")]);
    assert!(weights::external_files(&models().join("mlp").join("model.onnx")).is_empty());
    assert!(weights::external_files(&models().join("mlp").join("expected.json")).is_empty());
    assert!(weights::external_files(&dir.join("missing.onnx")).is_empty());
}
