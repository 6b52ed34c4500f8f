#!/usr/bin/env bash
# A flamegraph (SVG) of a `sluice` binary serving the tiny MLP (examples/models/mlp, 2
# replicas, batching 32) to wrk at 64 connections, REST JSON: where the server's CPU time goes
# per request. perf samples the server for --seconds with DWARF call graphs; inferno (installed
# with cargo into .tools/ when missing) folds the stacks and draws the SVG.
#
#   scripts/flamegraph.sh [--binary target/release/sluice] [--out bench-results/flame.svg]
#                         [--connections 64] [--seconds 5] [--title "..."]
#
# Needs perf (linux-perf) and wrk; root, or perf_event_paranoid <= 1. Loopback only; stops by
# itself.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$ROOT/target/release/sluice OUT=$ROOT/bench-results/flame.svg CONNS=64 SECONDS_=5 TITLE=""
while [ $# -gt 0 ]; do
  case $1 in
    --binary) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --seconds) SECONDS_=$2; shift 2 ;;
    --title) TITLE=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for tool in perf wrk; do
  command -v $tool >/dev/null || { echo "needs $tool (apt-get install linux-perf wrk)" >&2; exit 1; }
done
TOOLS=$ROOT/.tools/bin
if [ ! -x "$TOOLS/inferno-flamegraph" ]; then
  cargo install --locked --quiet inferno --version 0.12.8 --root "$ROOT/.tools"
fi

TMP=$(mktemp -d)
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

. "$ROOT/scripts/tiny-mlp.sh"
tiny_mlp_config "$ROOT" 18110 flame > "$TMP/config.yaml"
tiny_mlp_post_lua "$ROOT" > "$TMP/post.lua"

ORT_DYLIB_PATH=$ROOT/.ort/libonnxruntime.so RUST_LOG=warn "$BIN" run "$TMP/config.yaml" 2>"$TMP/server.log" &
PID=$!
for _ in $(seq 300); do
  curl -sf http://127.0.0.1:18110/v2/health/ready >/dev/null && break
  kill -0 "$PID" 2>/dev/null || { cat "$TMP/server.log" >&2; exit 1; }
  sleep 0.1
done
URL=http://127.0.0.1:18110/v2/models/mlp/infer
CPU=$(($(nproc) - 1))
taskset -c $CPU wrk -t1 -c"$CONNS" -d2s -s "$TMP/post.lua" $URL >/dev/null
taskset -c $CPU wrk -t1 -c"$CONNS" -d$((SECONDS_ + 4))s -s "$TMP/post.lua" $URL >"$TMP/wrk.txt" &
WRK=$!
sleep 2
perf record -q -F 499 --call-graph dwarf,16384 -p "$PID" -o "$TMP/perf.data" -- sleep "$SECONDS_" 2>/dev/null
wait $WRK
RPS=$(awk '/Requests\/sec/ {print $2}' "$TMP/wrk.txt")
mkdir -p "$(dirname "$OUT")"
perf script -i "$TMP/perf.data" 2>/dev/null | "$TOOLS/inferno-collapse-perf" --all \
  | "$TOOLS/inferno-flamegraph" --title "${TITLE:-$(basename "$BIN")}: tiny MLP, c=$CONNS, $RPS req/s (wrk, same run)" \
      --width 1600 --minwidth 0.2 >"$OUT"
echo "$OUT ($RPS req/s while sampled)"
