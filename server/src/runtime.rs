//! Finding and loading the ONNX Runtime shared library: `--onnxruntime`, then `ORT_DYLIB_PATH`,
//! then the project's own install folder (`.ort/`, made by scripts/install-onnxruntime.sh).

use std::path::PathBuf;

/// Where `scripts/install-onnxruntime.sh` put the library when this binary was built.
const BUILD_TIME_PATH: Option<&str> = option_env!("ORT_DYLIB_PATH");

/// The places to look, in order, with where each came from.
pub fn candidates(flag: Option<PathBuf>) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    if let Some(p) = flag {
        out.push((p, "--onnxruntime"));
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        out.push((PathBuf::from(p), "ORT_DYLIB_PATH"));
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

/// Loads ONNX Runtime from the first candidate that exists. An explicit `--onnxruntime` or
/// `ORT_DYLIB_PATH` that does not exist is an error rather than silently skipped.
pub fn init(flag: Option<PathBuf>) -> Result<PathBuf, String> {
    const HOW: &str = "install it with `scripts/install-onnxruntime.sh` or pass --onnxruntime PATH";
    for (path, source) in candidates(flag) {
        if !path.is_file() {
            if source == "--onnxruntime" || source == "ORT_DYLIB_PATH" {
                return Err(format!(
                    "ONNX Runtime library `{}` (from {source}) not found; {HOW}",
                    path.display()
                ));
            }
            continue;
        }
        return sluice_deployments::onnx::init_runtime(&path).map(|()| path.clone()).map_err(|e| {
            format!("cannot load ONNX Runtime from `{}` ({source}): {e}; {HOW}", path.display())
        });
    }
    Err(format!("ONNX Runtime library not found; {HOW}"))
}
