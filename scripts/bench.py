#!/usr/bin/env python3
"""Sluice's benchmark suite: one Markdown report with ratios to raw ONNX Runtime.

Starts a release `sluice` on bench config (iris and mlp from examples/models; MiniLM-L6 from
../shared/models/minilm or $SLUICE_MINILM_DIR when present, skipped with a message otherwise),
runs `sluice-loadtest` over REST-JSON, REST-binary and gRPC at concurrency 1/8/16/64, runs the raw
in-process ONNX Runtime baseline (deployments/examples/raw_ort.rs) for the same models and batch
sizes, measures resident memory idle and under 10x overload, and, when `wrk` is installed,
compares the load tester with wrk on the same server. Writes bench-results/report.md.

  python3 scripts/bench.py [--duration 5] [--out bench-results] [--models iris,mlp,minilm]

Everything targets 127.0.0.1 and stops by itself.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REL = ROOT / "target" / "release"
ORT = ROOT / ".ort" / "libonnxruntime.so"
HTTP, GRPC = 18000, 18001
PROTOCOLS = ["rest-json", "rest-binary", "grpc"]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def build():
    subprocess.run(["scripts/install-onnxruntime.sh"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "sluice-server", "-p", "sluice-loadtest"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "sluice-deployments", "--example", "raw_ort"], cwd=ROOT, check=True)


def models(selected, out):
    found = {}
    ex = ROOT / "examples" / "models"
    for name in ("iris", "mlp"):
        if name in selected:
            # One-row requests: the first case of the fixture, with its expected outputs.
            case = json.loads((ex / name / "expected.json").read_text())["cases"][0]
            samples = out / f"{name}-one-row.json"
            samples.write_text(json.dumps({"tolerance": 1e-5, "cases": [case]}))
            found[name] = dict(path=ex / name / "model.onnx", samples=samples, seq=1, extra="max_batch_size: 32")
    if "minilm" in selected:
        d = Path(os.environ.get("SLUICE_MINILM_DIR", ROOT.parent / "shared" / "models" / "minilm"))
        if (d / "model.onnx").is_file():
            doc = json.loads((d / "samples.json").read_text())
            single = [c for c in doc["cases"] if c["inputs"][0]["shape"][0] == 1][:1]
            samples = out / "minilm-single.json"
            samples.write_text(json.dumps({"cases": [{"inputs": c["inputs"]} for c in single]}))
            found["minilm"] = dict(path=d / "model.onnx", samples=samples, seq=single[0]["inputs"][0]["shape"][1],
                                   extra="max_batch_size: 64")
        else:
            print(f"MiniLM skipped: no model.onnx in {d} (set SLUICE_MINILM_DIR)", file=sys.stderr)
    return found


class Server:
    def __init__(self, config):
        self.proc = subprocess.Popen([str(REL / "sluice"), "run", str(config)], stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RUST_LOG": "warn"})
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("sluice did not become ready:\n" + "".join(self.log))

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stats(self, model):
        with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/models/{model}/stats") as r:
            s = json.load(r)["model_stats"][0]
        return s["inference_count"], s["execution_count"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def loadtest(model, protocol, samples, concurrency=None, rate=None, duration=5, warmup=1, extra=()):
    port = GRPC if protocol == "grpc" else HTTP
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(REL / "sluice-loadtest"), "--url", f"127.0.0.1:{port}", "-m", model, "-p", protocol,
               "--input-data", str(samples), "--duration", f"{duration}s", "--warmup", f"{warmup}s", "--quiet",
               "--output-dir", tmp, *extra]
        cmd += ["--concurrency", str(concurrency)] if concurrency else ["--rate", str(rate)]
        sh(*cmd)
        return json.loads((Path(tmp) / "report.json").read_text())["steps"][0]


def raw_ort(path, batch, seq, seconds=3):
    out = sh(str(REL / "examples" / "raw_ort"), str(path), str(batch), str(seconds), str(seq),
             env={**os.environ, "ORT_DYLIB_PATH": str(ORT)})
    return json.loads(out.strip().splitlines()[-1])


def wrk(model, body, connections, duration):
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f"wrk.method = 'POST'\nwrk.body = [[{body}]]\n")
    out = sh("wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
             f"http://127.0.0.1:{HTTP}/v2/models/{model}/infer")
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def us(label):
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        v = float(m.group(1))
        return v * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return dict(rps=rps, p50=us("50"), p99=us("99"), errors=int(non2xx.group(1)) if non2xx else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--models", default="iris,mlp,minilm")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        build()
    found = models(args.models.split(","), out)
    config = out / "bench.yaml"
    lines = [f"http_options: {{host: 127.0.0.1, port: {HTTP}}}", f"grpc_options: {{host: 127.0.0.1, port: {GRPC}}}",
             "applications:", "  - name: bench", "    deployments:"]
    for name, m in found.items():
        lines.append(f"      - {{name: {name}, model: {m['path']}, {m['extra']}, max_queued_requests: 256}}")
    config.write_text("\n".join(lines) + "\n")

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    report = [f"# Sluice benchmark report", "",
              f"Machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Server: `sluice` release build, 1 replica per "
              f"model, 1 intra-op thread, max_batch_size 32 (MiniLM 64), batch_wait_timeout_s 0. The load tester "
              f"runs on the same machine and shares its CPUs. Raw ORT: `Session::run` in a loop on one thread, "
              f"same model, same batch size, same run. Steps: {args.duration} s after 1 s of warm-up.", ""]

    server = Server(config)
    results = {}
    try:
        idle_rss = server.rss_kib()
        for name, m in found.items():
            raw1 = raw_ort(m["path"], 1, m["seq"])
            report += [f"## {name}", "",
                       f"Raw ONNX Runtime, batch 1: p50 {raw1['p50_us']:.1f} µs, mean {raw1['mean_us']:.1f} µs "
                       f"({raw1['runs_per_s']:.0f} runs/s).", "",
                       "| protocol | concurrency | req/s | p50 µs | p99 µs | errors | avg batch | raw ORT samples/s at that batch | throughput ratio | p50 − raw p50 (µs) |",
                       "|---|---|---|---|---|---|---|---|---|---|"]
            for protocol in PROTOCOLS:
                for c in (1, 8, 16, 64):
                    before = server.stats(name)
                    step = loadtest(name, protocol, m["samples"], concurrency=c, duration=args.duration)
                    after = server.stats(name)
                    rows, execs = after[0] - before[0], after[1] - before[1]
                    avg_batch = rows / execs if execs else 1.0
                    b = max(1, round(avg_batch))
                    raw = raw1 if b == 1 else raw_ort(m["path"], b, m["seq"], seconds=2)
                    raw_sps = raw["runs_per_s"] * b
                    ratio = step["inferences_per_second"] / raw_sps
                    lat = step["latency_us"]
                    errors = sum(step["errors"].values())
                    results[(name, protocol, c)] = dict(step=step, avg_batch=avg_batch, raw=raw, ratio=ratio)
                    report.append(f"| {protocol} | {c} | {step['throughput']:.0f} | {lat['p50']:.0f} | {lat['p99']:.0f} | "
                                  f"{errors} | {avg_batch:.1f} | {raw_sps:.0f} (b={b}) | {ratio:.2f} | "
                                  f"{lat['p50'] - raw1['p50_us']:.0f} |")
            report.append("")

        # Memory at 10x overload: open loop at ten times the best throughput measured, on the
        # slowest model present. REST, so every request reaches the server (one gRPC connection
        # would queue streams in the client beyond HTTP/2's concurrent-stream limit).
        victim = "minilm" if "minilm" in found else "mlp" if "mlp" in found else None
        if victim:
            best = max(r["step"]["throughput"] for (n, _, _), r in results.items() if n == victim)
            peak = [server.rss_kib()]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak.append(server.rss_kib())
                    time.sleep(0.05)

            t = threading.Thread(target=sample)
            t.start()
            over = loadtest(victim, "rest-binary", found[victim]["samples"], rate=round(best * 10),
                            duration=args.duration, warmup=0)
            stop.set()
            t.join()
            report += ["## Memory", "",
                       f"Resident memory of `sluice` with {len(found)} model(s) loaded: idle {idle_rss / 1024:.1f} MiB; "
                       f"peak {max(peak) / 1024:.1f} MiB during {args.duration} s of open-loop REST load on {victim} at "
                       f"{round(best * 10)} req/s (10x its best throughput above): {over['ok']} answered, "
                       f"errors {over['errors']} (503s are the admission control shedding load), "
                       f"p99 of answered {over['latency_us']['p99']:.0f} µs; after: {server.rss_kib() / 1024:.1f} MiB.", ""]

        # The load tester against wrk on the same server, same run.
        if shutil.which("wrk") and "iris" in found:
            case = json.loads(Path(found["iris"]["samples"]).read_text())["cases"][0]
            body = json.dumps({"inputs": case["inputs"]})
            one = out / "iris-one.json"
            one.write_text(json.dumps({"cases": [{"inputs": case["inputs"]}]}))
            rounds = 3
            report += ["## Load tester against wrk", "",
                       f"One-row iris request, REST JSON, keep-alive, same server; wrk and sluice-loadtest alternate "
                       f"{rounds} times per step ({args.duration} s each) and the medians are shown: single runs on this "
                       f"shared 2-CPU machine vary by ±15 %.", "",
                       "| tool | connections | req/s (median) | p50 µs (median) | runs (req/s) |", "|---|---|---|---|---|"]
            med = lambda xs: sorted(xs)[len(xs) // 2]
            for c in (1, 16):
                ws, ls = [], []
                for _ in range(rounds):
                    ws.append(wrk("iris", body, c, args.duration))
                    ls.append(loadtest("iris", "rest-json", one, concurrency=c, duration=args.duration, warmup=0))
                w_rps, w_p50 = med([w["rps"] for w in ws]), med([w["p50"] for w in ws])
                l_rps, l_p50 = med([s["throughput"] for s in ls]), med([s["latency_us"]["p50"] for s in ls])
                w_runs = ", ".join("%.0f" % w["rps"] for w in ws)
                l_runs = ", ".join("%.0f" % s["throughput"] for s in ls)
                report.append(f"| wrk | {c} | {w_rps:.0f} | {w_p50:.0f} | {w_runs} |")
                report.append(f"| sluice-loadtest | {c} | {l_rps:.0f} | {l_p50:.0f} | {l_runs} |")
                report.append(f"| ratio loadtest/wrk | {c} | {l_rps / w_rps:.2f} | {l_p50 / w_p50:.2f} | |")
            report.append("")
    finally:
        server.stop()
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "results.json").write_text(json.dumps({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in results.items()}, indent=1))
    print("\n".join(report))
    print(f"\nwrote {out / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
