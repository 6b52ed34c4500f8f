//! Finding and loading the ONNX Runtime shared library: `--onnxruntime`, then `ORT_DYLIB_PATH`
//! (unless empty), then the project's own install folder (`.ort/`, made by
//! scripts/install-onnxruntime.sh: where it was when the binary was built, then beside
//! `target/`), then `libonnxruntime.so` next to the binary.

use std::path::PathBuf;

/// Where `scripts/install-onnxruntime.sh` put the library when this binary was built.
const BUILD_TIME_PATH: Option<&str> = option_env!("ORT_DYLIB_PATH");

/// The places to look, in order, with where each came from. `flag` is `--onnxruntime`,
/// `env` the value of `ORT_DYLIB_PATH` (the binary reads both; the library reads no
/// environment).
pub fn candidates(flag: Option<PathBuf>, env: Option<PathBuf>) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    if let Some(p) = flag {
        out.push((p, "--onnxruntime"));
    }
    if let Some(p) = env.filter(|p| !p.as_os_str().is_empty()) {
        out.push((p, "ORT_DYLIB_PATH"));
    }
    if let Some(p) = BUILD_TIME_PATH {
        out.push((PathBuf::from(p), "project install folder"));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        // target/{debug,release}/sluice -> <repo>/.ort
        out.push((dir.join("../../.ort/libonnxruntime.so"), "project install folder"));
        out.push((dir.join("libonnxruntime.so"), "next to the binary"));
    }
    out
}

/// The first candidate that exists, and where it came from. An explicit `--onnxruntime` or
/// `ORT_DYLIB_PATH` that does not exist is an error rather than silently skipped.
pub fn find(flag: Option<PathBuf>, env: Option<PathBuf>) -> Result<(PathBuf, &'static str), RuntimeError> {
    for (path, source) in candidates(flag, env) {
        if path.is_file() {
            return Ok((path, source));
        }
        if source == "--onnxruntime" || source == "ORT_DYLIB_PATH" {
            return Err(RuntimeError::Missing { path, origin: source });
        }
    }
    Err(RuntimeError::NotFound)
}

/// Loads ONNX Runtime from [`find`]'s library.
pub fn init(flag: Option<PathBuf>, env: Option<PathBuf>) -> Result<PathBuf, RuntimeError> {
    let (path, source) = find(flag, env)?;
    sluice_deployments::onnx::init_runtime(&path).map(|()| path.clone()).map_err(|error| RuntimeError::Load {
        path,
        origin: source,
        error,
    })
}

const HOW: &str = "install it with `scripts/install-onnxruntime.sh` or pass --onnxruntime PATH";

/// ONNX Runtime could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library `{}` (from {origin}) not found; {HOW}", path.display())]
    Missing { path: PathBuf, origin: &'static str },
    #[error("cannot load ONNX Runtime from `{}` ({origin}): {error}; {HOW}", path.display())]
    Load { path: PathBuf, origin: &'static str, error: sluice_deployments::LoadError },
    #[error("ONNX Runtime library not found; {HOW}")]
    NotFound,
}
