#!/usr/bin/env python3
"""What shadows, multiplexing and concurrent pipeline branches cost, measured on a release build.

  1. Shadow: the primary's p50/p99 (iris, REST JSON, sluice-loadtest at concurrency 1 and 8)
     alone and with a shadow at 100 % (iris-v2, which differs on some rows).
  2. Multiplexing: one replica holding 2 models of a folder of 3 (iris copies): the latency of
     a request whose model is held (hit) and of one whose model must be loaded first (miss,
     the 3 ids in turn so that each evicts the next), one client, keep-alive.
  3. Pipelines: two 5 ms steps (the chaos example's `sleep` step) as two branches on the same
     input, and the same two steps in sequence; one client.

Configurations alternate within each of --repeat rounds (default 3); the report gives the median
and [min-max] over the rounds. Loopback only; stops by itself. Writes bench-results/routing.md.

  cargo build --release -p sluice-server -p sluice-loadtest --example chaos
  python3 scripts/bench_routing.py
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT = ROOT / ".ort" / "libonnxruntime.so"
MODELS = ROOT / "examples" / "models"
HTTP = 18200

HEAD = f"http_options: {{host: 127.0.0.1, port: {HTTP}}}\ngrpc_options: {{enabled: false}}\napplications:\n"

SHADOW_OFF = "  - name: a\n    deployments:\n      - {{name: iris, model: {m}/iris/model.onnx}}\n"
SHADOW_ON = (
    "  - name: a\n    deployments:\n      - {{name: iris, model: {m}/iris/model.onnx, "
    "shadow: {{model: {m}/iris-v2/model.onnx, version: \"2\", percent: 100}}}}\n"
)
MULTIPLEX = (
    "  - name: t\n    deployments:\n"
    "      - {{name: tenants, multiplex: {{path: {tenants}, max_num_models_per_replica: 2}}, num_replicas: 1}}\n"
)
PIPELINE = """  - name: p
    deployments:
      - {{name: first, builtin: {{custom: {{name: sleep}}}}}}
      - {{name: second, builtin: {{custom: {{name: sleep}}}}}}
    pipeline:
      name: two
      inputs: [{{name: x, datatype: FP32, shape: [-1]}}]
      steps:
        - {{name: a, deployment: first, inputs: {{x: x}}, outputs: {{y: ya}}}}
        - {{name: b, deployment: second, inputs: {{x: {b_input}}}, outputs: {{y: yb}}}}
      outputs: [ya, yb]
"""


class Server:
    def __init__(self, binary, config, tmp):
        path = Path(tmp) / "routing.yaml"
        path.write_text(HEAD + config)
        env = {**os.environ, "ORT_DYLIB_PATH": str(ORT), "RUST_LOG": "warn"}
        # `sluice run CONFIG`; the chaos example takes the config alone.
        argv = [str(binary), str(path)] if Path(binary).name == "chaos" else [str(binary), "run", str(path)]
        self.proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
        until = time.time() + 60
        while time.time() < until:
            if self.proc.poll() is not None:
                sys.exit(f"{binary} exited with {self.proc.returncode} on:\n{config}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        sys.exit("server not ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


def loadtest(tool, concurrency, seconds, tmp):
    out = Path(tmp) / f"lt-{concurrency}"
    subprocess.run(
        [str(tool), "--url", f"127.0.0.1:{HTTP}", "-m", "iris", "-p", "rest-json", "--concurrency", str(concurrency),
         "--duration", f"{seconds}s", "--warmup", "1s", "--quiet", "--output-dir", str(out),
         "--input-data", str(MODELS / "iris/expected.json")],
        check=True, capture_output=True, text=True,
    )
    step = json.loads((out / "report.json").read_text())["steps"][0]
    if step.get("errors"):
        sys.exit(f"load test errors: {step}")
    return step["latency_us"]["p50"], step["latency_us"]["p99"], step["throughput"]


def timed(conn, path, body, headers, n):
    """Latencies (µs) of n sequential POSTs on one keep-alive connection."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("POST", path, body, headers)
        r = conn.getresponse()
        data = r.read()
        out.append((time.perf_counter() - t) * 1e6)
        if r.status != 200:
            sys.exit(f"{path} answered {r.status}: {data[:300]}")
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rel = ROOT / "target" / "release"
    ap.add_argument("--sluice", default=str(rel / "sluice"))
    ap.add_argument("--chaos", default=str(rel / "examples" / "chaos"))
    ap.add_argument("--loadtest", default=str(rel / "sluice-loadtest"))
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300, help="per multiplex / pipeline measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "routing.md"))
    args = ap.parse_args()
    res = {}

    def add(key, value):
        res.setdefault(key, []).append(value)

    iris = json.loads((MODELS / "iris/expected.json").read_text())["cases"][0]
    iris_body = json.dumps({"inputs": iris["inputs"]})
    sleep_body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [5.0]}]})
    json_headers = {"Content-Type": "application/json"}
    with tempfile.TemporaryDirectory() as tmp:
        tenants = Path(tmp) / "tenants"
        for t in ["t0", "t1", "t2"]:
            (tenants / t).mkdir(parents=True)
            shutil.copy(MODELS / "iris/model.onnx", tenants / t / "model.onnx")
        for i in range(args.repeat):
            for label, cfg in [("off", SHADOW_OFF), ("on", SHADOW_ON)]:
                with Server(args.sluice, cfg.format(m=MODELS), tmp):
                    for c in [1, 8]:
                        p50, p99, rps = loadtest(args.loadtest, c, args.duration, tmp)
                        add(f"shadow_{label}_c{c}_p50", p50)
                        add(f"shadow_{label}_c{c}_p99", p99)
                        add(f"shadow_{label}_c{c}_rps", rps)
            with Server(args.sluice, MULTIPLEX.format(tenants=tenants), tmp):
                conn = http.client.HTTPConnection("127.0.0.1", HTTP)
                path = "/v2/models/tenants/infer"
                hdr = lambda t: {**json_headers, "serve_multiplexed_model_id": t}
                timed(conn, path, iris_body, hdr("t0"), 50)
                hits = timed(conn, path, iris_body, hdr("t0"), args.requests)
                misses = []
                for k in range(args.requests):
                    misses += timed(conn, path, iris_body, hdr(f"t{k % 3}"), 1)
                conn.close()
                add("mux_hit_p50", pct(hits, 0.5))
                add("mux_hit_p99", pct(hits, 0.99))
                add("mux_miss_p50", pct(misses, 0.5))
                add("mux_miss_p99", pct(misses, 0.99))
            for label, b_input in [("branches", "x"), ("sequence", "ya")]:
                with Server(args.chaos, PIPELINE.format(b_input=b_input), tmp):
                    conn = http.client.HTTPConnection("127.0.0.1", HTTP)
                    timed(conn, "/v2/models/two/infer", sleep_body, json_headers, 20)
                    lat = timed(conn, "/v2/models/two/infer", sleep_body, json_headers, args.requests)
                    conn.close()
                    add(f"pipe_{label}_p50", pct(lat, 0.5))
                    add(f"pipe_{label}_p99", pct(lat, 0.99))
            print(f"[{i + 1}/{args.repeat}] " + json.dumps({k: round(v[-1]) for k, v in res.items()}), flush=True)

    def f(key):
        v = res[key]
        return f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]"

    lines = [
        "# Shadows, multiplexing and pipeline branches",
        "",
        f"`scripts/bench_routing.py`, {args.repeat} rounds, configurations alternating; median [min-max] "
        f"over the rounds. {os.cpu_count()} CPUs, the load tester on the same machine.",
        "",
        f"Shadow at 100 % (iris, REST JSON, sluice-loadtest, {args.duration} s per run):",
        "",
        "| concurrency | p50 µs without | p50 µs with | p99 µs without | p99 µs with | req/s without | req/s with |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in [1, 8]:
        lines.append(
            f"| {c} | {f(f'shadow_off_c{c}_p50')} | {f(f'shadow_on_c{c}_p50')} | {f(f'shadow_off_c{c}_p99')} "
            f"| {f(f'shadow_on_c{c}_p99')} | {f(f'shadow_off_c{c}_rps')} | {f(f'shadow_on_c{c}_rps')} |"
        )
    lines += [
        "",
        f"Multiplexing (iris copies, 1 replica holding 2 of 3 models, one client, {args.requests} requests each):",
        "",
        "| request | p50 µs | p99 µs |",
        "|---|---|---|",
        f"| model held (hit) | {f('mux_hit_p50')} | {f('mux_hit_p99')} |",
        f"| model loaded first (miss, evicting another) | {f('mux_miss_p50')} | {f('mux_miss_p99')} |",
        "",
        f"Pipeline of two 5 ms steps (one client, {args.requests} requests each):",
        "",
        "| form | p50 µs | p99 µs |",
        "|---|---|---|",
        f"| two branches on the same input | {f('pipe_branches_p50')} | {f('pipe_branches_p99')} |",
        f"| the same steps in sequence | {f('pipe_sequence_p50')} | {f('pipe_sequence_p99')} |",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
