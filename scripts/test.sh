#!/usr/bin/env bash
# Runs every test of the project: installs what the tests need (ONNX Runtime library, a Python
# venv with tritonclient), runs the Rust unit and integration tests, then the client
# conformance suite (tests/python) against the real `sluice` binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-onnxruntime.sh
scripts/venv.sh scripts/requirements-test.txt
cargo test --workspace --all-targets
cargo build --bin sluice
SLUICE_BIN="$PWD/target/debug/sluice" .venv/bin/python -m pytest -q tests/python
