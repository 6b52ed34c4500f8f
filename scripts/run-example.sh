#!/usr/bin/env bash
# One command from a fresh clone to a running server: set up, then serve examples/iris.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/sluice run examples/iris.yaml "$@"
