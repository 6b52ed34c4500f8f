#!/usr/bin/env python3
"""Control-plane measurements on a release `sluice` (appended to bench-results/control.md):

1. Time from a load step to the added replica serving (autoscaling, upscale_delay_s: 0).
2. A live swap under load at concurrency 32: failed requests during the swap, and p99 during the
   swap against steady state (sluice-loadtest, same run).
3. Observed canary share against the set weight (5,000 requests).

  python3 scripts/bench_control.py [--out bench-results]   (after `cargo build --release`)
Everything targets 127.0.0.1 and stops by itself.
"""
import argparse
import json
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
        with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/api/serve/applications") as r:
            return json.load(r)

    def deploy(self, text):
        req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/api/serve/applications", data=text.encode(),
                                     method="PUT", headers={"x-sluice-base-dir": str(self.cfg.parent)})
        with urllib.request.urlopen(req) as r:
            return r.status

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def loadtest(model, concurrency, duration, out):
    cmd = [str(REL / "sluice-loadtest"), "--url", f"127.0.0.1:{HTTP}", "-m", model, "--concurrency", str(concurrency),
           "--duration", f"{duration}s", "--warmup", "0s", "--quiet", "--output-dir", out]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((Path(out) / "report.json").read_text())["steps"][0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
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

        # 2. Live swap under load at concurrency 32.
        dep = f"      - {{name: m, model: {MODELS}/iris/model.onnx, num_replicas: 1, version: \"VERSION\"}}\n"
        s = Server(config(dep.replace("VERSION", "1")), tmp)
        try:
            steady = loadtest("m", 32, 5, str(Path(tmp) / "steady"))
            result = {}

            def during():
                result["swap"] = loadtest("m", 32, 5, str(Path(tmp) / "swap"))

            t = threading.Thread(target=during)
            t.start()
            time.sleep(1.5)
            t_swap = time.time()
            s.deploy(config(dep.replace("VERSION", "2")))
            swap_s = time.time() - t_swap
            t.join()
            sw = result["swap"]
            lines.append(
                f"2. Live swap of iris (version 1 → 2, new replica loaded and warmed, traffic moved, old drained) during "
                f"5 s at concurrency 32 (REST JSON): **{sum(sw['errors'].values())} failed** of "
                f"{sw['ok'] + sum(sw['errors'].values())} requests; the deploy call took {swap_s:.2f} s. "
                f"p99 during the swap window {sw['latency_us']['p99']:.0f} µs (p50 {sw['latency_us']['p50']:.0f}) vs steady "
                f"{steady['latency_us']['p99']:.0f} µs (p50 {steady['latency_us']['p50']:.0f}); throughput "
                f"{sw['throughput']:.0f} vs {steady['throughput']:.0f} req/s.")
        finally:
            s.stop()

        # 3. Canary share.
        s = Server(config(f"      - {{name: m, model: {MODELS}/iris/model.onnx, canary: "
                          f"{{model: {MODELS}/iris/model.onnx, version: \"2\", weight: 10}}}}\n"), tmp)
        try:
            n, canary = 5000, 0
            for _ in range(n):
                req = urllib.request.Request(f"http://127.0.0.1:{HTTP}/v2/models/m/infer", data=IRIS.encode())
                with urllib.request.urlopen(req) as r:
                    canary += json.load(r)["model_version"] == "2"
            lines.append(f"3. Canary at weight 10 %: {canary} of {n} requests went to it: **{100 * canary / n:.2f} %**.")
        finally:
            s.stop()
    text = "\n".join(lines) + "\n"
    (out / "control.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
