#!/usr/bin/env bash
# Sets up a fresh clone: ONNX Runtime library (.ort/), Python venv (.venv/), example models
# (examples/models/), release build. Idempotent; each step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-onnxruntime.sh
scripts/venv.sh
.venv/bin/python examples/make_models.py
cargo build --release --bin sluice
