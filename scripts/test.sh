#!/usr/bin/env bash
# Runs every test of the project: installs what the tests need (ONNX Runtime library, Python
# venv for client tests), then the Rust unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-onnxruntime.sh
cargo test --workspace --all-targets
