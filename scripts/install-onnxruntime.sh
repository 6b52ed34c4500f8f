#!/usr/bin/env bash
# Installs the ONNX Runtime shared library into .ort/ (gitignored), taken from the
# `onnxruntime` wheel on PyPI. Sluice loads it at run time (ort's `load-dynamic`).
# Idempotent: does nothing when the library is already there.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.32.0}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.ort"
lib="$dest/libonnxruntime.so"
if [ -f "$lib" ]; then
  exit 0
fi
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "installing ONNX Runtime $ORT_VERSION into $dest" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "onnxruntime==$ORT_VERSION"
python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "onnxruntime-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if "/capi/libonnxruntime.so" in n]
    if not names:
        sys.exit(f"no libonnxruntime.so in {wheel}")
    for n in names:
        with z.open(n) as src, open(os.path.join(dest, os.path.basename(n)), "wb") as out:
            out.write(src.read())
PY
real="$(ls "$dest"/libonnxruntime.so.* | head -1)"
ln -sf "$(basename "$real")" "$lib"
echo "ONNX Runtime library: $lib -> $(basename "$real")" >&2
