#!/usr/bin/env bash
# Where the server's threads and wrk run at 64 connections, the server free to use any CPU and
# wrk on one thread pinned to the last CPU (bench_floor.py's "c=64, the server on any CPU"):
# each thread's time on each CPU per request, the CPUs' idle time, wake-ups (who woke whom, on
# which CPU) and migrations, from the scheduler's tracepoints (perf, system-wide) over a few
# seconds of load. Serves the tiny MLP (examples/models/mlp, 2 replicas, batching 32).
#
#   scripts/where_threads_run.sh BINARY [infer|live] [SECONDS]
#   scripts/where_threads_run.sh target/release/sluice infer 2
#
# Needs perf (linux-perf) and wrk, and root (system-wide tracepoints). Tracing costs the
# machine some CPU: the request rate it prints is lower than bench_floor's. Loopback only;
# stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=${1:?usage: scripts/where_threads_run.sh BINARY [infer|live] [SECONDS]}
MODE=${2:-infer}
SECS=${3:-2}
PORT=${PORT:-18120}
for tool in perf wrk; do
  command -v $tool >/dev/null || { echo "needs $tool (apt-get install linux-perf wrk)" >&2; exit 1; }
done
DIR=$(mktemp -d)
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
}
trap cleanup EXIT
. scripts/tiny-mlp.sh
tiny_mlp_config "$PWD" "$PORT" threads > "$DIR/config.yaml"
tiny_mlp_post_lua "$PWD" > "$DIR/post.lua"
case $MODE in
  infer) WRK=(-s "$DIR/post.lua" "http://127.0.0.1:$PORT/v2/models/mlp/infer") ;;
  live) WRK=("http://127.0.0.1:$PORT/v2/health/live") ;;
  *) echo "mode is infer or live, not $MODE" >&2; exit 2 ;;
esac
ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.ort/libonnxruntime.so} RUST_LOG=warn "$BINARY" run "$DIR/config.yaml" 2>"$DIR/server.log" &
PID=$!
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
  kill -0 "$PID" 2>/dev/null || { cat "$DIR/server.log" >&2; exit 1; }
  sleep 0.1
done
CPU=$(($(nproc) - 1))
taskset -c $CPU wrk -t1 -c64 -d1s "${WRK[@]}" >/dev/null
taskset -c $CPU wrk -t1 -c64 -d$((SECS + 3))s "${WRK[@]}" >"$DIR/wrk.txt" &
LOAD=$!
sleep 1.5
perf record -q -a -e sched:sched_switch,sched:sched_wakeup,sched:sched_migrate_task \
  -o "$DIR/perf.data" -- sleep "$SECS" 2>/dev/null
wait $LOAD
SERVER_TIDS=$(ls "/proc/$PID/task" | tr '\n' ' ')
perf script -i "$DIR/perf.data" -F comm,tid,cpu,time,event,trace 2>/dev/null >"$DIR/events.txt"
RPS=$(awk '/Requests\/sec/ {print $2}' "$DIR/wrk.txt")
python3 - "$DIR/events.txt" "$RPS" "$SERVER_TIDS" "$MODE" <<'PY'
import collections, re, sys
events, rps, tids, mode = sys.argv[1], float(sys.argv[2]), set(sys.argv[3].split()), sys.argv[4]
line_re = re.compile(r"^\s*(.+?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$")
names = {}
def who(comm, tid):
    if tid == "0":
        return "idle"
    if tid in tids:
        return "server " + ("frontend" if comm.startswith("tokio") else comm)
    return comm if comm == "wrk" else "other"
ran = collections.defaultdict(float)
on_cpu = {}
woke = collections.Counter()
moved = collections.Counter()
first = last = None
for line in open(events):
    m = line_re.match(line)
    if not m:
        continue
    comm, tid, cpu, t, event, rest = m.groups()
    cpu, t = int(cpu), float(t)
    first = t if first is None else first
    last = t
    if event == "sched_switch":
        s = re.search(r"prev_comm=(.*) prev_pid=(\d+) .*==> next_comm=(.*) next_pid=(\d+)", rest)
        if cpu in on_cpu:
            ran[(on_cpu[cpu][0], cpu)] += t - on_cpu[cpu][1]
        on_cpu[cpu] = (who(s.group(3), s.group(4)), t)
    elif event == "sched_wakeup":
        s = re.search(r"comm=(.*) pid=(\d+) prio=\d+ target_cpu=(\d+)", rest)
        woke[(who(comm, tid), cpu, who(s.group(1), s.group(2)), int(s.group(3)))] += 1
    elif event == "sched_migrate_task":
        s = re.search(r"comm=(.*) pid=(\d+) prio=\d+ orig_cpu=(\d+) dest_cpu=(\d+)", rest)
        moved[(who(s.group(1), s.group(2)), int(s.group(3)), int(s.group(4)))] += 1
span = last - first
requests = rps * span
print(f"{mode}: {rps:,.0f} req/s while traced ({span:.2f} s, ~{requests:,.0f} requests)")
print("\n| thread | CPU | µs per request | share of the CPU |\n|---|---|---|---|")
for (name, cpu), secs in sorted(ran.items()):
    if name != "other" and secs / span >= 0.005:
        print(f"| {name} | {cpu} | {secs / requests * 1e6:.2f} | {secs / span:.2f} |")
print("\n| woken by (CPU) | woken (CPU) | per 1,000 requests |\n|---|---|---|")
for (by, c1, whom, c2), n in woke.most_common(12):
    if whom.startswith("server") or whom == "wrk":
        print(f"| {by} ({c1}) | {whom} ({c2}) | {n / requests * 1000:.1f} |")
server_moves = sum(n for (name, _, _), n in moved.items() if name.startswith("server"))
print(f"\nserver threads moved between CPUs: {server_moves / requests * 1000:.2f} per 1,000 requests")
PY
