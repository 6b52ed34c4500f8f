#!/usr/bin/env bash
# Instructions per request on one path of a `sluice` build, counted by valgrind's callgrind:
# repeatable to within 1 % whatever else the machine runs (wall-clock and CPU-time numbers on a
# shared machine vary by ±20 %; run each build a few times to compare changes near 1 %; the
# spread comes from timers and from the one request in eight that yields). User-space only
# (the kernel's share, syscalls and wake-ups, is not counted); one connection, one request at a
# time (the c=1 path: concurrency effects such as batching are not seen).
#
#   scripts/instructions.sh BINARY [PATH] [REQUESTS]
#   scripts/instructions.sh target/release/sluice /v2/models/mlp/infer 2000
#   scripts/instructions.sh /path/to/older/sluice /v2/health/live
#   ROWS=32 scripts/instructions.sh target/release/sluice   # 32 rows of 8 numbers per request
#
# Serves examples/models/mlp (2 replicas, batching 32) on 127.0.0.1:$PORT (default 18200),
# with run_inline_under_us at INLINE_US (default 1000000): under valgrind a model call takes ~50
# times as long, which would send every request to the replica threads, where natively (~10 µs a
# call) it runs on the frontend's thread. INLINE_US=0 counts the replica-thread path;
# sends 200 unmeasured requests, then REQUESTS (default 2000) with callgrind collecting, over one
# keep-alive connection without Accept-Encoding (as wrk sends them). Needs valgrind. Prints
# "PATH instructions/request: N". Stops the server it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=${1:?usage: scripts/instructions.sh BINARY [PATH] [REQUESTS]}
REQUEST_PATH=${2:-/v2/models/mlp/infer}
REQUESTS=${3:-2000}
PORT=${PORT:-18200}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
cat > "$DIR/config.yaml" <<YAML
http_options: {host: 127.0.0.1, port: $PORT}
grpc_options: {host: 127.0.0.1, port: $((PORT + 1))}
admin_options: {enabled: false}
applications:
  - name: instructions
    deployments:
      - {name: mlp, model: $PWD/examples/models/mlp/model.onnx, num_replicas: 2, max_batch_size: 32, run_inline_under_us: ${INLINE_US:-1000000}}
YAML
ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so} RUST_LOG=warn \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$DIR/out.%p" \
    "$BINARY" run "$DIR/config.yaml" 2>"$DIR/valgrind.log" &
SERVER=$!
send() {  # N requests on one connection
    python3 - "$PORT" "$REQUEST_PATH" "$1" <<'PY'
import http.client, json, os, random, sys
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cases = json.load(open("examples/models/mlp/expected.json"))["cases"]
rows = int(os.environ.get("ROWS", "1"))
inputs = cases[0]["inputs"]
if rows > 1:  # rows of numbers from a fixed seed, printed as clients print them (repr)
    random.seed(7)
    inputs = [dict(inputs[0], shape=[rows, 8], data=[random.uniform(-3, 3) for _ in range(rows * 8)])]
body = json.dumps({"inputs": inputs}).encode()
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.putrequest("POST" if path.endswith("/infer") else "GET", path, skip_accept_encoding=True)
    if path.endswith("/infer"):
        c.putheader("Content-Type", "application/json")
        c.putheader("Content-Length", str(len(body)))
        c.endheaders(body)
    else:
        c.endheaders()
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"{path}: HTTP {r.status}")
PY
}
for _ in $(seq 1 600); do
    kill -0 "$SERVER" 2>/dev/null || { cat "$DIR/valgrind.log" >&2; exit 1; }
    curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && break
    sleep 0.5
done
send 200
callgrind_control -i on "$SERVER" >/dev/null 2>&1
send "$REQUESTS"
callgrind_control -i off "$SERVER" >/dev/null 2>&1
callgrind_control -d "$SERVER" >/dev/null 2>&1
kill "$SERVER"
wait "$SERVER" 2>/dev/null || true
TOTAL=0
for f in "$DIR"/out.*; do
    n=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen++ {gsub(",", "", $1); print $1}')  # no early exit: pipefail
    if [[ $n =~ ^[0-9]+$ ]]; then TOTAL=$((TOTAL + n)); fi  # an empty dump prints "."
done
echo "$REQUEST_PATH instructions/request: $((TOTAL / REQUESTS))"
