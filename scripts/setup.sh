#!/usr/bin/env bash
# Sets up a fresh clone: ONNX Runtime library (.ort/), Python venv (.venv/), example models
# (examples/models/, where missing), release build (scripts/build-release.sh: optimised with
# the committed profile in pgo/). Idempotent; each step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-onnxruntime.sh
scripts/venv.sh
# The example models ship in the repository (`make models` makes them all again; newer
# converter versions write other bytes); made here only where one is missing.
for m in iris iris-v2 mlp dtypes reshape broken tiny-encoder; do
  if [ ! -f "examples/models/$m/model.onnx" ]; then
    .venv/bin/python examples/make_models.py
    break
  fi
done
scripts/build-release.sh
