#!/usr/bin/env python3
"""Control-plane measurements on a release `sluice` (written to bench-results/control.md):

1. Time from a load step to the added replica serving (autoscaling, upscale_delay_s: 0).
2. Live swaps under load at concurrency 32 (REST JSON): the load tester logs every request
   (--request-log), and for each swap the requests in flight across its window (sent before the
   deploy call returned, answered after it was made) are reported: how many, how many failed,
   their p50, p99 and max, against the same run's other requests and a run without swaps.
3. Observed canary share against the set weight, with the 95 % binomial interval of the draw.

  python3 scripts/bench_control.py                  # after `scripts/build-release.sh && cargo build --release -p sluice-loadtest`
  python3 scripts/bench_control.py --swaps 1 --segment 0.5 --steady 1 --canary-requests 500   # quick check
Everything targets 127.0.0.1 and stops by itself.
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REL = ROOT / "target" / "release"
MODELS = ROOT / "examples" / "models"
HTTP, ADMIN = 18100, 18165
IRIS = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]})


def config(deployments):
    return (f"http_options: {{host: 127.0.0.1, port: {HTTP}}}\ngrpc_options: {{enabled: false}}\n"
            f"admin_options: {{port: {ADMIN}}}\napplications:\n  - name: app\n    deployments:\n{deployments}")


class Server:
    def __init__(self, text, tmp):
        self.cfg = Path(tmp) / "control.yaml"
        self.cfg.write_text(text)
        self.proc = subprocess.Popen([str(REL / "sluice"), "run", str(self.cfg)], stderr=subprocess.DEVNULL,
                                     env={**os.environ, "RUST_LOG": "warn"})
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sluice did not start")

    def status(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/api/sluice/status") as r:
            return json.load(r)

    def deploy(self, text):
        req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/api/serve/applications", data=text.encode(),
                                     method="PUT", headers={"x-sluice-base-dir": str(self.cfg.parent)})
        with urllib.request.urlopen(req) as r:
            return r.status

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def loadtest(model, concurrency, duration, out, request_log=None):
    cmd = [str(REL / "sluice-loadtest"), "--url", f"127.0.0.1:{HTTP}", "-m", model, "--concurrency", str(concurrency),
           "--duration", f"{duration:g}s", "--warmup", "0s", "--quiet", "--output-dir", out]
    if request_log:
        cmd += ["--request-log", str(request_log)]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((Path(out) / "report.json").read_text())["steps"][0]


def read_log(path):
    """(sent µs since the epoch, latency µs, outcome) of every logged request."""
    with open(path, newline="") as f:
        return [(int(r["sent_unix_us"]), int(r["latency_us"]), r["outcome"]) for r in csv.DictReader(f)]


def summary(latencies):
    """p50, p99 and max (nearest rank) of a list of latencies in µs."""
    if not latencies:
        return "—"
    xs = sorted(latencies)
    rank = lambda q: xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]
    return f"{rank(0.5)} / {rank(0.99)} / {xs[-1]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--swaps", type=int, default=3, help="live swaps in the logged run")
    ap.add_argument("--segment", type=float, default=1.5, help="seconds of load before, between and after swaps")
    ap.add_argument("--steady", type=float, default=5, help="seconds of the run without swaps")
    ap.add_argument("--canary-requests", type=int, default=5000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Control plane measurements", ""]
    with tempfile.TemporaryDirectory() as tmp:
        # 1. Load step -> added replica serving.
        s = Server(config(
            f"      - name: m\n        model: {MODELS}/mlp/model.onnx\n        num_replicas: auto\n"
            "        autoscaling_config: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 2,"
            " upscale_delay_s: 0, downscale_delay_s: 600, metrics_interval_s: 0.1, look_back_period_s: 0.5}\n"), tmp)
        try:
            result = {}

            def step():
                result["load"] = loadtest("m", 32, 6, str(Path(tmp) / "step"))

            t = threading.Thread(target=step)
            t0 = time.time()
            t.start()
            served = None
            while time.time() - t0 < 6:
                v = s.status()["applications"]["app"]["deployments"]["m"]["versions"][0]
                if v["ready_replicas"] >= 2:
                    served = time.time() - t0
                    break
                time.sleep(0.01)
            t.join()
            lines.append(f"1. Load step (mlp, 0 → 32 concurrent clients) to the second replica ready and serving: "
                         f"**{served:.2f} s** (upscale_delay_s 0, metrics_interval_s 0.1, look_back_period_s 0.5). "
                         f"The step itself: {result['load']['throughput']:.0f} req/s, errors {result['load']['errors']}."
                         if served is not None else "1. No scale-up observed within 6 s.")
        finally:
            s.stop()

        # 2. Live swaps under load at concurrency 32, each request logged.
        dep = f"      - {{name: m, model: {MODELS}/iris/model.onnx, num_replicas: 1, version: \"VERSION\"}}\n"
        s = Server(config(dep.replace("VERSION", "1")), tmp)
        try:
            steady = loadtest("m", 32, args.steady, str(Path(tmp) / "steady"))
            log = Path(tmp) / "swaps.csv"
            length = args.segment * (args.swaps + 1)
            result = {}

            def during():
                result["run"] = loadtest("m", 32, length, str(Path(tmp) / "swap"), request_log=log)

            t = threading.Thread(target=during)
            t.start()
            windows = []
            for i in range(args.swaps):
                time.sleep(args.segment)
                t0 = time.time()
                s.deploy(config(dep.replace("VERSION", str(i + 2))))
                windows.append((t0, time.time()))
            t.join()
            requests = read_log(log)
            run = result["run"]
            lines += [
                f"2. Live swaps of iris (version N → N+1: new replica loaded and warmed, traffic moved, old drained) "
                f"under {length:g} s of closed-loop load at concurrency 32 (REST JSON): **{sum(run['errors'].values())} "
                f"failed** of {run['ok'] + sum(run['errors'].values())} requests. Requests in flight across each swap "
                f"window (sent before the deploy call returned and answered after it was made), latency p50 / p99 / max "
                f"in µs:", "",
                "| | deploy call (s) | requests | failed | p50 / p99 / max µs |", "|---|---|---|---|---|"]
            inside = set()
            for i, (t0, t1) in enumerate(windows):
                a, b = int(t0 * 1e6), int(t1 * 1e6)
                hit = [k for k, (sent, lat, _) in enumerate(requests) if sent < b and sent + lat > a]
                inside.update(hit)
                failed = sum(1 for k in hit if requests[k][2] != "ok")
                lines.append(f"| swap {i + 1} | {t1 - t0:.3f} | {len(hit)} | {failed} | "
                             f"{summary([requests[k][1] for k in hit])} |")
            rest = [lat for k, (_, lat, _) in enumerate(requests) if k not in inside]
            lines.append(f"| same run, every other request | | {len(rest)} | "
                         f"{sum(1 for k, r in enumerate(requests) if k not in inside and r[2] != 'ok')} | {summary(rest)} |")
            sl = steady["latency_us"]
            lines.append(f"| steady run, no swap ({args.steady:g} s) | | {steady['ok'] + sum(steady['errors'].values())} | "
                         f"{sum(steady['errors'].values())} | {sl['p50']:.0f} / {sl['p99']:.0f} / {sl['max']:.0f} |")
            lines.append("")
        finally:
            s.stop()

        # 3. Canary share.
        s = Server(config(f"      - {{name: m, model: {MODELS}/iris/model.onnx, canary: "
                          f"{{model: {MODELS}/iris/model.onnx, version: \"2\", weight: 10}}}}\n"), tmp)
        try:
            n, canary = args.canary_requests, 0
            for _ in range(n):
                req = urllib.request.Request(f"http://127.0.0.1:{HTTP}/v2/models/m/infer", data=IRIS.encode())
                with urllib.request.urlopen(req) as r:
                    canary += json.load(r)["model_version"] == "2"
            half = 1.96 * math.sqrt(0.1 * 0.9 / n) * 100
            lines.append(f"3. Canary at weight 10 %: {canary} of {n} requests went to it: **{100 * canary / n:.2f} %** "
                         f"(a fair 10 % draw of {n} lands in {10 - half:.2f}–{10 + half:.2f} % 95 times in 100; the split "
                         f"is seeded from entropy, so each run draws anew).")
        finally:
            s.stop()
    text = "\n".join(lines) + "\n"
    (out / "control.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
