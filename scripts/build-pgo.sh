#!/usr/bin/env bash
# Makes the profile that release builds are optimised with (profile-guided optimisation, PGO),
# pgo/sluice.profdata.gz, from this checkout, then builds target/release/sluice with it:
#   1. an instrumented build (target/pgo-gen) serves a training load on loopback: REST JSON,
#      REST binary and gRPC inference (unary and ModelStreamInfer) of the example models at 1,
#      16 and 64 connections, one and eight rows per request, a two-step pipeline and the
#      liveness calls (sluice-loadtest, about 90 s);
#   2. its profile is merged with rustup's llvm-profdata (the `llvm-tools` component, which
#      this script installs) into pgo/sluice.profdata.gz, and pgo/rustc-version names the
#      compiler (a profile is read only by the LLVM that wrote it);
#   3. scripts/build-release.sh builds target/release/sluice with it.
# Run it after the request path changes, and commit pgo/: every release build
# (scripts/setup.sh, scripts/build-release.sh) uses the committed profile, so only this script
# needs the instrumented build and the rustup component. Same sources, features and release
# profile as a plain release build; only the code layout and the compiler's inlining and branch
# decisions follow the profile. docs/benchmarks.md has what it gains. About 2 release builds of
# time (~25 min on 2 cores).
#
#   scripts/build-pgo.sh            # then: git add pgo/ && git commit
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -n "${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}${CARGO_BUILD_RUSTFLAGS:-}" ]; then
    echo "build-pgo: unset RUSTFLAGS, CARGO_ENCODED_RUSTFLAGS and CARGO_BUILD_RUSTFLAGS: the profile is made for the build scripts/build-release.sh makes, which has none" >&2
    exit 1
fi
scripts/install-onnxruntime.sh  # the training load runs the server (a fresh clone has no .ort/)
HOST=$(rustc -vV | sed -n 's/^host: //p')
rustup component add llvm-tools >/dev/null
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata
[ -x "$PROFDATA" ] || { echo "llvm-profdata not found at $PROFDATA" >&2; exit 1; }
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$ROOT/.ort/libonnxruntime.so}
DATA=$ROOT/target/pgo-data
rm -rf "$DATA"
mkdir -p "$DATA"

# --target: the flags apply to the server's code, not to build scripts and proc macros. The
# build that uses the profile (scripts/build-release.sh) passes it too, so that its functions
# have the same symbols as those the profile names.
CARGO_ENCODED_RUSTFLAGS="-Cprofile-generate=$DATA" \
    cargo build --release --bin sluice --target "$HOST" --target-dir target/pgo-gen
cargo build --release -p sluice-loadtest --bin sluice-loadtest
LOADTEST=$ROOT/target/release/sluice-loadtest

PORT=${PORT:-18700}
WORK=$(mktemp -d)
SERVER=
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
M=$ROOT/examples/models
cat > "$WORK/config.yaml" <<YAML
http_options: {host: 127.0.0.1, port: $PORT}
grpc_options: {host: 127.0.0.1, port: $((PORT + 1))}
admin_options: {enabled: false}
applications:
  - name: train
    deployments:
      - {name: mlp, model: $M/mlp/model.onnx, num_replicas: 2, max_batch_size: 32}
      - {name: iris, model: $M/iris/model.onnx, max_batch_size: 32}
  - name: pipe
    deployments:
      - {name: iris-model, model: $M/iris/model.onnx, max_batch_size: 32}
      - {name: iris-label, builtin: {argmax: {labels: $M/iris/labels.txt}}, max_batch_size: 32}
    pipeline:
      name: iris-classifier
      inputs: [{name: features, datatype: FP32, shape: [-1, 4]}]
      steps:
        - {name: classify, deployment: iris-model, inputs: {input: features}, outputs: {probabilities: probabilities}}
        - {name: name-it, deployment: iris-label, inputs: {x: probabilities}, outputs: {label: label}}
      outputs: [label, probabilities]
YAML
RUST_LOG=warn "target/pgo-gen/$HOST/release/sluice" run "$WORK/config.yaml" &
SERVER=$!
ready=
for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$SERVER" 2>/dev/null || { echo "the instrumented server did not start" >&2; exit 1; }
    sleep 0.2
done
[ -n "$ready" ] || { echo "the instrumented server was not ready within 60 s" >&2; exit 1; }
load() {  # PORT ARGS...: one 2 s step; a failed request is fatal (a profile of error paths is no use)
    local port=$1
    shift
    "$LOADTEST" --url "127.0.0.1:$port" --duration 2s --warmup 200ms --quiet "$@" >"$WORK/load.txt" \
        || { cat "$WORK/load.txt" >&2; exit 1; }
    # The report's one step row: | protocol | step | ok | errors | ...; errors must be 0.
    awk -F'|' '$3 ~ /concurrency/ { gsub(/ /, "", $5); if ($5 != "0" || $4 + 0 == 0) bad = 1; rows++ }
               END { exit (bad || rows != 1) }' "$WORK/load.txt" \
        || { echo "training step failed: $*" >&2; cat "$WORK/load.txt" >&2; exit 1; }
}
for c in 1 16 64; do
    load "$PORT" --health --concurrency $c
    load $((PORT + 1)) --health --protocol grpc --concurrency $c
    for p in rest-json rest-binary; do
        load "$PORT" -m mlp --protocol $p --input-data "$M/mlp/expected.json" --concurrency $c
        load "$PORT" -m mlp --protocol $p --batch 8 --concurrency $c
    done
    load $((PORT + 1)) -m mlp --protocol grpc --input-data "$M/mlp/expected.json" --concurrency $c
    load $((PORT + 1)) -m mlp --protocol grpc --batch 8 --concurrency $c
    load $((PORT + 1)) -m mlp --protocol grpc-stream --input-data "$M/mlp/expected.json" --concurrency $c
    load "$PORT" -m iris --input-data "$M/iris/expected.json" --concurrency $c
    load "$PORT" -m iris-classifier --batch 4 --concurrency $c
done
kill -TERM "$SERVER"
wait "$SERVER" || { echo "the instrumented server did not stop cleanly" >&2; exit 1; }
SERVER=
"$PROFDATA" merge -o "$DATA/merged.profdata" "$DATA"/*.profraw
mkdir -p pgo
gzip -9 -n -c "$DATA/merged.profdata" > pgo/sluice.profdata.gz
rustc -V > pgo/rustc-version
SLUICE_PGO=1 scripts/build-release.sh
echo "target/release/sluice: release build optimised with the new profile in pgo/ (commit it)"
