#!/usr/bin/env python3
"""Sluice's own path against the machine's floor, for one or more `sluice` binaries in one run.

The floor is `GET /v2/health/live` on the same server, with the same load tool (wrk, one
thread pinned to the last CPU) and concurrency: it costs the HTTP stack and nothing of the
model path. For each binary (label=path; e.g. a build of an older commit beside this one):

  - c=1, tiny MLP (examples/models/mlp, 2 replicas, batching 32), REST JSON: infer p50 minus
    live p50 (the time Sluice's own path adds to a request);
  - c=64: infer req/s divided by live req/s, the server's threads free to run on any CPU
    (wrk's included), and again with the server restarted on the CPUs wrk does not use
    (`taskset`; its runtime then starts one worker per CPU it may use): the client and the
    server each on their own CPUs, so that a request that costs the server more CPU does not
    also take it from the client that sends the next one;
  - c=1: gRPC p50 minus REST JSON p50 (sluice-loadtest for both, the same load tester);
  - where h2load is installed (Debian's nghttp2-client), the same with h2load for both (HTTP/1.1
    for REST JSON, HTTP/2 for gRPC ModelInfer), a client in C whose own cost is small, and the
    server's CPU time per request for each: what the server adds for gRPC, apart from the
    client's HTTP/2 work (which sluice-loadtest's gRPC client pays on the same two CPUs);
  - the server's CPU time per request at c=1 (infer and live): on a server that is not
    waiting for the CPU, the own-path difference is this CPU time;
  - idle RSS once the model is loaded and before any request, and again once the server is
    idle after all the loads (what the requests brought back or grew);
  - the server's CPU time per request at c=64 (infer and live): steadier than req/s on a
    machine shared with others, since time the server waits for the CPU does not count;
  - allocations per request at c=1 (infer and live): malloc, calloc and realloc calls (libc's,
    and mimalloc's aligned ones where the binary links it) counted with perf uprobes while wrk
    runs (rows left out where perf probes are not available; needs root).

Binaries alternate within each repetition (--repeat, default 3) so that both see the same
machine; the report gives the median and [min-max]. Loopback only; stops by itself.

  python3 scripts/bench_floor.py --binary before=/path/to/old/sluice --binary after=target/release/sluice
  python3 scripts/bench_floor.py --binary a=target/release/sluice --binary b=target/release/sluice \
      --fields 'b=run_inline_under_us: 0'     # one setting compared
  python3 scripts/bench_floor.py --binary kept=target/release/sluice --binary released=target/release/sluice \
      --top 'kept=release_startup_memory: false'  # a top-level setting compared
  python3 scripts/bench_floor.py --binary two=target/release/sluice --binary one=target/release/sluice \
      --env 'one=TOKIO_WORKER_THREADS=1'          # an environment variable compared
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT = ROOT / ".ort" / "libonnxruntime.so"
HTTP, GRPC = 18100, 18101
# The CPUs this process may use (a cpuset or taskset can leave out some of the machine's): wrk
# is pinned to the last of them, and the server's own-CPU reading runs on the others.
CPUS = sorted(os.sched_getaffinity(0))
CLIENT_CPU = str(CPUS[-1])

CONFIG = """{top}http_options: {{host: 127.0.0.1, port: {http}}}
grpc_options: {{host: 127.0.0.1, port: {grpc}}}
applications:
  - name: floor
    deployments:
      - {{name: mlp, model: {model}, num_replicas: 2, max_batch_size: 32{fields}}}
"""


def mlp_body():
    cases = json.loads((ROOT / "examples/models/mlp/expected.json").read_text())["cases"]
    return json.dumps({"inputs": cases[0]["inputs"]})


def wait_ready(proc, timeout=60):
    until = time.time() + timeout
    while time.time() < until:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("server not ready")


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ALLOC_FUNCTIONS = ["malloc", "calloc", "realloc"]
# The Rust global allocator when a binary links mimalloc (server/src/alloc.rs): what `MiMalloc`'s
# alloc, alloc_zeroed and realloc call for alignments above a word (all of them in builds before
# 2026-12-05, which used the mimalloc crate's allocator). For smaller alignments it calls
# mi_malloc and mi_realloc, which are the exported malloc and realloc (counted there), and
# mi_zalloc (MI_ZALLOC, probed where the binary has it).
MI_FUNCTIONS = ["mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"]
MI_ZALLOC = "mi_zalloc"


def file_offset(binary, vaddr):
    """Where virtual address `vaddr` of an ELF file lies in the file (what perf probe takes)."""
    for line in subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            offset, start, size = int(f[1], 16), int(f[2], 16), int(f[4], 16)
            if start <= vaddr < start + size:
                return vaddr - start + offset
    raise ValueError(f"{vaddr:#x} is in no loadable segment of {binary}")


def alloc_probes(binary):
    """perf uprobe events on the allocation entry points the binary calls: its libc's malloc,
    calloc and realloc (ONNX Runtime's, and Rust's without mimalloc), plus mimalloc's when the
    binary links it, plus the binary's own malloc, calloc and realloc when it exports them
    (mimalloc's override: then ONNX Runtime's calls land there, not in libc); None when they
    cannot be set (no perf, not root)."""
    if not shutil.which("perf"):
        return None
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    m = re.search(r"libc\.so\.6 => (\S+)", ldd)
    if not m:
        return None
    wanted = [(m.group(1), "probe_libc", f, f) for f in ALLOC_FUNCTIONS]
    local = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True).stdout
    symbols = local.split()
    if all(f in symbols for f in MI_FUNCTIONS):
        # One group per binary: two binaries may both be called `sluice`.
        # Event names are unique across groups for perf, so they carry the group's hash too.
        tag = hashlib.sha1(str(Path(binary).resolve()).encode()).hexdigest()[:8]
        group = "alloc_" + tag
        wanted += [(binary, group, f.replace("_aligned", "") + "_" + tag, f) for f in MI_FUNCTIONS]
        # Exported by the binary (mimalloc's override): probed by file offset, since perf's
        # lookup by name finds inlined code that debuginfo also calls `malloc`.
        exported = subprocess.run(["nm", "-D", "--defined-only", binary], capture_output=True, text=True).stdout
        addresses = {name: int(addr, 16) for addr, _, name in
                     (line.split() for line in exported.splitlines() if len(line.split()) == 3)}
        if all(f in addresses for f in ALLOC_FUNCTIONS):
            wanted += [(binary, group, f"c_{f}_{tag}", f"0x{file_offset(binary, addresses[f]):x}")
                       for f in ALLOC_FUNCTIONS]
        zalloc = [int(f[0], 16) for f in (line.split() for line in local.splitlines())
                  if len(f) == 3 and f[2] == MI_ZALLOC]
        if zalloc:
            wanted.append((binary, group, f"zalloc_{tag}", f"0x{file_offset(binary, zalloc[0]):x}"))
    # A binary rebuilt at the same path keeps its group name: probes left from an earlier run
    # would sit at the old build's addresses and count nothing, so its group is set afresh.
    for group in {group for path, group, _, _ in wanted if path == binary}:
        subprocess.run(["perf", "probe", "-q", "-d", f"{group}:*"], capture_output=True)
    for path, group, event, function in wanted:  # "already exists" on a second run is fine
        subprocess.run(["perf", "probe", "-q", "-x", path, "--add", f"{group}:{event}={function}"],
                       capture_output=True)
    listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True).stdout
    events = [f"{group}:{event}" for _, group, event, _ in wanted if f"{group}:{event} " in listed]
    return events if len(events) == len(wanted) else None


def allocs_per_request(pid, events, send):
    """Allocation calls in the server per request while `send()` runs (it returns how many
    requests it sent)."""
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(events), "-p", str(pid)],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    requests = send()
    perf.send_signal(2)
    lines = perf.communicate(timeout=30)[1].splitlines()
    counts = [line.split(",")[0] for line in lines if any(e in line for e in events)]
    return sum(int(c) for c in counts if c.isdigit()) / requests


def wrk(path, conns, seconds, script=None):
    """(req/s, p50 µs, requests) of wrk on one thread pinned to the last CPU."""
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{HTTP}{path}"], check=True, text=True, capture_output=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"50%\s+([\d.]+)(us|ms|s)\b", out)
    p50 = float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
    if "Non-2xx" in out or "Socket errors" in out:
        sys.exit(f"wrk saw errors on {path}:\n{out}")
    return rps, p50, int(re.search(r"(\d+) requests in", out).group(1))


def grpc_infer_body():
    """ModelInferRequest for the tiny MLP's first case (FP32 contents), framed as one gRPC
    message: encoded here so that h2load can send it."""
    def varint(n):
        out = bytearray()
        while True:
            out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number, payload):
        payload = payload.encode() if isinstance(payload, str) else payload
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    x = json.loads(mlp_body())["inputs"][0]
    tensor = (field(1, x["name"]) + field(2, x["datatype"]) + field(3, b"".join(varint(d) for d in x["shape"]))
              + field(5, field(6, struct.pack(f"<{len(x['data'])}f", *x["data"]))))
    message = field(1, "mlp") + field(5, tensor)
    return b"\0" + struct.pack(">I", len(message)) + message


def h2load(pid, url, seconds, tmp, args):
    """(p50 µs, server CPU µs per request) of h2load at one connection, one request at a time,
    pinned to the last CPU: 2,000 requests to warm up, then 10,000 per second of `seconds`."""
    log = Path(tmp) / "h2load.log"
    cmd = ["taskset", "-c", CLIENT_CPU, "h2load", "-c1", "-m1"] + args
    subprocess.run(cmd + ["-n", "2000", url], check=True, capture_output=True)
    log.unlink(missing_ok=True)  # h2load appends to it
    before = cpu_seconds(pid)
    out = subprocess.run(cmd + ["-n", str(seconds * 10000), f"--log-file={log}", url],
                         check=True, capture_output=True, text=True).stdout
    spent = cpu_seconds(pid) - before
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    if "0 failed, 0 errored, 0 timeout" not in out or any(row[1] != "200" for row in rows):
        sys.exit(f"h2load saw errors on {url}:\n{out}")
    durations = sorted(int(row[2]) for row in rows)
    return durations[len(durations) // 2], spent / len(rows) * 1e6


def h2load_pair(pid, seconds, tmp):
    """REST JSON infer (HTTP/1.1) and gRPC ModelInfer, each with h2load."""
    body = Path(tmp) / "infer.json"
    body.write_text(mlp_body())
    grpc = Path(tmp) / "infer.grpc"
    grpc.write_bytes(grpc_infer_body())
    url = f"http://127.0.0.1:{GRPC}/inference.GRPCInferenceService/ModelInfer"
    headers = ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    # h2load does not read trailers: check the gRPC status once with curl.
    status = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "--data-binary", f"@{grpc}", "-D", "-",
                             "-o", os.devnull] + headers + [url], capture_output=True, text=True).stdout
    if "grpc-status: 0" not in status:
        sys.exit(f"the encoded ModelInfer request was not answered OK:\n{status}")
    r = {}
    r["h2load_rest_p50"], r["h2load_rest_cpu_us"] = h2load(
        pid, f"http://127.0.0.1:{HTTP}/v2/models/mlp/infer", seconds, tmp,
        ["--h1", "-d", str(body), "-H", "content-type: application/json"])
    r["h2load_grpc_p50"], r["h2load_grpc_cpu_us"] = h2load(pid, url, seconds, tmp, ["-d", str(grpc)] + headers)
    r["h2load_grpc_minus_rest_us"] = r["h2load_grpc_p50"] - r["h2load_rest_p50"]
    r["h2load_grpc_minus_rest_cpu_us"] = r["h2load_grpc_cpu_us"] - r["h2load_rest_cpu_us"]
    return r


def loadtest(tool, protocol, seconds, tmp):
    """p50 of one-row requests at c=1 (the first case of the mlp's expected.json, as wrk and
    h2load send; the file's other case is a 5-row batch, which the load tester took in turn)."""
    port = GRPC if protocol == "grpc" else HTTP
    out = Path(tmp) / f"lt-{protocol}"
    one_row = Path(tmp) / "one-row.json"
    cases = json.loads((ROOT / "examples/models/mlp/expected.json").read_text())["cases"]
    one_row.write_text(json.dumps({"cases": cases[:1]}))
    subprocess.run(
        [tool, "--url", f"127.0.0.1:{port}", "-m", "mlp", "-p", protocol, "--concurrency", "1",
         "--duration", f"{seconds}s", "--warmup", "1s", "--quiet", "--output-dir", str(out),
         "--input-data", str(one_row)],
        check=True, capture_output=True, text=True,
    )
    report = json.loads((out / "report.json").read_text())
    step = (report["steps"] if isinstance(report, dict) else report)[0]
    # A run whose requests failed has no latency to compare (its percentiles read 0).
    if not step.get("ok") or step.get("errors"):
        sys.exit(f"sluice-loadtest {protocol}: {step.get('ok')} ok, errors {step.get('errors')}")
    return step["latency_us"]["p50"]


def c64(pid, seconds, script, tag=""):
    """live and infer req/s at c=64, and the server's CPU per request (keys `{live,infer}_c64{tag}_*`)."""
    r = {}
    for key, path, lua in [("live", "/v2/health/live", None), ("infer", "/v2/models/mlp/infer", script)]:
        before = cpu_seconds(pid)
        r[f"{key}_c64{tag}_rps"], _, n = wrk(path, 64, seconds, lua)
        r[f"{key}_c64{tag}_cpu_us"] = (cpu_seconds(pid) - before) / n * 1e6
    return r


def c64_own_cpus(binary, cfg, env, seconds, script):
    """c=64 infer and live req/s, and the server's CPU per request, with the server on every CPU
    but the last (wrk's)."""
    cpus = ",".join(str(c) for c in CPUS[:-1])
    proc = subprocess.Popen(["taskset", "-c", cpus, binary, "run", str(cfg)], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc)
        wrk("/v2/health/live", 64, 1)  # warm-up
        wrk("/v2/models/mlp/infer", 64, 1, script)
        r = c64(proc.pid, seconds, script, "_own")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    r["c64_own_ratio"] = r["infer_c64_own_rps"] / r["live_c64_own_rps"]
    return r


def measure(binary, tool, seconds, tmp, script, fields="", probes=None, top="", extra_env=None):
    cfg = Path(tmp) / "floor.yaml"
    model = ROOT / "examples/models/mlp/model.onnx"
    cfg.write_text(CONFIG.format(top=f"{top}\n" if top else "", http=HTTP, grpc=GRPC, model=model,
                                 fields=f", {fields}" if fields else ""))
    env = {**os.environ, "ORT_DYLIB_PATH": str(ORT), "RUST_LOG": "warn", **(extra_env or {})}
    r = c64_own_cpus(binary, cfg, env, seconds, script) if len(CPUS) > 1 else {}
    proc = subprocess.Popen([binary, "run", str(cfg)], env=env, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc)
        time.sleep(1)
        r["idle_rss_mb"] = rss_mb(proc.pid)
        wrk("/v2/health/live", 1, 1)  # warm-up
        wrk("/v2/models/mlp/infer", 1, 1, script)
        for key, path, lua in [("live", "/v2/health/live", None), ("infer", "/v2/models/mlp/infer", script)]:
            before = cpu_seconds(proc.pid)
            _, r[f"{key}_c1_p50"], n = wrk(path, 1, seconds, lua)
            r[f"{key}_c1_cpu_us"] = (cpu_seconds(proc.pid) - before) / n * 1e6
        r.update(c64(proc.pid, seconds, script))
        if probes:
            infer, live = "/v2/models/mlp/infer", "/v2/health/live"
            r["infer_allocs"] = allocs_per_request(proc.pid, probes, lambda: wrk(infer, 1, 2, script)[2])
            r["live_allocs"] = allocs_per_request(proc.pid, probes, lambda: wrk(live, 1, 2)[2])
        r["rest_c1_p50"] = loadtest(tool, "rest-json", seconds, tmp)
        r["grpc_c1_p50"] = loadtest(tool, "grpc", seconds, tmp)
        if shutil.which("h2load"):
            r.update(h2load_pair(proc.pid, seconds, tmp))
        time.sleep(1)
        r["loaded_rss_mb"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    r["own_c1_us"] = r["infer_c1_p50"] - r["live_c1_p50"]
    r["own_c1_cpu_us"] = r["infer_c1_cpu_us"] - r["live_c1_cpu_us"]
    r["c64_ratio"] = r["infer_c64_rps"] / r["live_c64_rps"]
    r["grpc_minus_rest_us"] = r["grpc_c1_p50"] - r["rest_c1_p50"]
    return r


def fmt(values, digits):
    med = statistics.median(values)
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", required=True, help="label=path of a sluice binary")
    ap.add_argument("--fields", action="append", default=[],
                    help="label=YAML fields added to that binary's deployment, e.g. 'noinline=run_inline_under_us: 0'")
    ap.add_argument("--top", action="append", default=[],
                    help="label=a top-level YAML line for that binary's config, e.g. 'kept=release_startup_memory: false'")
    ap.add_argument("--env", action="append", default=[],
                    help="label=NAME=VALUE: an environment variable for that binary's server, e.g. 'one=TOKIO_WORKER_THREADS=1'")
    ap.add_argument("--loadtest", default=str(ROOT / "target/release/sluice-loadtest"))
    ap.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "floor.md"))
    args = ap.parse_args()
    if not shutil.which("wrk") or not shutil.which("taskset"):
        sys.exit("needs wrk and taskset (apt-get install wrk util-linux)")
    binaries = [b.split("=", 1) for b in args.binary]
    fields = dict(f.split("=", 1) for f in args.fields)
    tops = dict(t.split("=", 1) for t in args.top)
    envs = {}
    for e in args.env:
        label, name, value = e.split("=", 2)
        envs.setdefault(label, {})[name] = value
    results = {label: [] for label, _ in binaries}
    probes = {label: alloc_probes(path) for label, path in binaries}
    if not all(probes.values()):
        print("no perf uprobes here: allocation counts left out", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        body = mlp_body().replace("\\", "\\\\").replace('"', '\\"')
        script.write_text(f'wrk.method = "POST"\nwrk.body = "{body}"\nwrk.headers["Content-Type"] = "application/json"\n')
        for i in range(args.repeat):
            for label, path in binaries:
                r = measure(path, args.loadtest, args.duration, tmp, str(script), fields.get(label, ""), probes[label],
                            tops.get(label, ""), envs.get(label))
                print(f"[{i + 1}/{args.repeat}] {label}: {json.dumps({k: round(v, 2) for k, v in r.items()})}", flush=True)
                results[label].append(r)
    rows = [
        ("c=1 REST JSON, tiny MLP: infer p50 − live p50 (µs)", "own_c1_us", 0),
        ("  infer p50 (µs)", "infer_c1_p50", 0),
        ("  live p50 (µs)", "live_c1_p50", 0),
        ("  server CPU per infer request − per live request (µs)", "own_c1_cpu_us", 1),
        ("c=64, the server on any CPU: infer req/s ÷ live req/s", "c64_ratio", 2),
        ("  infer req/s", "infer_c64_rps", 0),
        ("  live req/s", "live_c64_rps", 0),
        ("  server CPU per infer request (µs)", "infer_c64_cpu_us", 1),
        ("  server CPU per live request (µs)", "live_c64_cpu_us", 1),
    ] + ([
        ("c=64, the server on the CPUs wrk does not use: infer req/s ÷ live req/s", "c64_own_ratio", 2),
        ("  infer req/s", "infer_c64_own_rps", 0),
        ("  live req/s", "live_c64_own_rps", 0),
        ("  server CPU per infer request (µs)", "infer_c64_own_cpu_us", 1),
        ("  server CPU per live request (µs)", "live_c64_own_cpu_us", 1),
    ] if len(CPUS) > 1 else []) + [
        ("c=1: gRPC p50 − REST JSON p50 (µs, sluice-loadtest)", "grpc_minus_rest_us", 0),
    ] + ([
        ("c=1: gRPC p50 − REST JSON p50 (µs, h2load for both)", "h2load_grpc_minus_rest_us", 0),
        ("  REST JSON p50 (µs, h2load)", "h2load_rest_p50", 0),
        ("  gRPC p50 (µs, h2load)", "h2load_grpc_p50", 0),
        ("  server CPU per gRPC request − per REST JSON request (µs)", "h2load_grpc_minus_rest_cpu_us", 1),
    ] if all("h2load_grpc_p50" in r for rs in results.values() for r in rs) else []) + [
        ("idle RSS, tiny MLP × 2 replicas (MB)", "idle_rss_mb", 1),
        ("  RSS once idle again after all the loads above (MB)", "loaded_rss_mb", 1),
    ] + ([
        ("allocations per infer request, c=1 (malloc, calloc, realloc; libc and mimalloc)", "infer_allocs", 0),
        ("allocations per live request, c=1", "live_allocs", 0),
    ] if all(probes.values()) else [])
    labels = [label for label, _ in binaries]
    lines = [
        "# Sluice's own path against the floor",
        "",
        f"`scripts/bench_floor.py`, {args.repeat} repetitions of {args.duration} s per measurement, "
        f"binaries alternating; median [min-max]. {len(CPUS)} CPUs; wrk on one thread pinned to the last.",
        "",
        "| what | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, key, digits in rows:
        lines.append(f"| {name} | " + " | ".join(fmt([r[key] for r in results[l]], digits) for l in labels) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
