#!/usr/bin/env bash
# Runs every check and test of the project (what CI runs: .ci/run). Installs what they need
# (ONNX Runtime library, cargo-machete, Python venvs with tritonclient, the KServe SDK and
# Ray), then: the release build's profile (pgo/) against the toolchain, formatting, unused
# dependencies, clippy with warnings as errors, the Rust unit and integration tests, the
# client conformance suite (tests/python; Ray's `serve` CLI comes from .venv-ray) against the
# real `sluice` binary, and the Ray cluster tests (tests/ray: a 2-node Ray cluster in network
# namespaces; skipped with a message where `ip netns` is unavailable).
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests run target/debug/sluice: builds go there whatever the machine sets.
unset CARGO_TARGET_DIR
started=$SECONDS
step() { printf '\n== %s (%d s in)\n' "$*" "$((SECONDS - started))" >&2; }
# Each step has a time limit, so a step that hangs fails naming itself rather than eating CI's
# whole budget (clean runs take a fraction of each: ~14 min in all on 2 CPUs). The step stays in
# this script's process group (`--foreground`), so Ctrl-C stops it as before; past its limit it
# gets SIGINT (pytest then tears its Ray clusters down), and SIGKILL a minute later; both go to
# the step's own process (cargo, pytest), which ends its children, and the run fails either way.
within() {
    local limit=$1; shift
    local rc=0 began=$SECONDS
    timeout --foreground --signal=INT --kill-after=60 "$limit" "$@" || rc=$?
    # 124: timed out; 137 only counts as that where the limit had passed (the OOM killer too).
    if [ "$rc" = 124 ] || { [ "$rc" = 137 ] && [ $((SECONDS - began)) -ge "$limit" ]; }; then
        echo "scripts/test.sh: \`$*\` passed its limit of $limit s" >&2
    fi
    return "$rc"
}
step "setup"
within 600 scripts/install-onnxruntime.sh
within 1200 scripts/install-tools.sh
within 900 scripts/venv.sh scripts/requirements-test.txt
within 600 scripts/install-perf-analyzer.sh
within 900 scripts/venv.sh scripts/requirements-ray.txt .venv-ray
step "pgo/: the release build's profile was made by this toolchain"
# A profile is read only by the LLVM that wrote it: with another rustc, scripts/build-release.sh
# falls back to a plain build. A toolchain change comes with `make pgo` and a new pgo/.
made_by=$(cat pgo/rustc-version)
if [ "$(rustc -V)" != "$made_by" ] || ! gzip -t pgo/sluice.profdata.gz; then
    echo "pgo/ was made by $made_by, the toolchain is $(rustc -V) (or the profile is unreadable): run make pgo and commit pgo/" >&2
    exit 1
fi
step "cargo fmt --check"
within 300 cargo fmt --all --check
step "cargo machete"
within 600 cargo machete
step "cargo clippy"
within 1800 cargo clippy --locked --workspace --all-targets -- -D warnings
step "cargo test"
within 2400 cargo test --locked --workspace --all-targets
within 600 cargo build --bin sluice
step "client conformance (tests/python)"
# The status page's browser test must run here, not skip (scripts/install-tools.sh installs
# chromium), and so must perf_analyzer's (scripts/install-perf-analyzer.sh).
SLUICE_REQUIRE_CHROMIUM=1 SLUICE_REQUIRE_PERF_ANALYZER=1 SLUICE_BIN="$PWD/target/debug/sluice" \
    within 1200 .venv/bin/python -m pytest -q --timeout=300 tests/python
step "Ray cluster (tests/ray)"
# Per test (a module's cluster start counts in its first test): pytest-timeout names the one that hangs.
SLUICE_BIN="$PWD/target/debug/sluice" within 2400 .venv-ray/bin/python -m pytest -q -rs --timeout=900 tests/ray
