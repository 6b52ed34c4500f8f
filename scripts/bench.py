#!/usr/bin/env python3
"""Sluice's benchmark suite: one Markdown report with ratios to raw ONNX Runtime.

Starts a release `sluice` on bench config (iris and mlp from examples/models; big-mlp, a
256 -> 3x1024 -> 16 MLP made by examples/make_models.py under the output folder; MiniLM-L6 from
../shared/models/minilm or $SLUICE_MINILM_DIR when present, skipped with a message otherwise),
runs `sluice-loadtest` over REST-JSON, REST-binary and gRPC at concurrency 1/8/16/64, measures
resident memory idle and under 10x overload, and, when `wrk` is installed, compares the load
tester with wrk on the same server. Last, resident memory of the largest model with 1, 2 and 4
replicas, each with its own copy of the weights and sharing one. Writes bench-results/report.md
and results.json.

The floor: before the models, the same load tester at the same concurrency levels sends the
protocol's liveness call instead (`--health`: REST `GET /v2/health/live`, gRPC `ServerLive`),
--repeat times each, on the same server; each infer row shows its req/s over the floor's and its
p50 minus the floor's (repetition i against floor repetition i). With root and perf, a last
table counts the server's allocation calls per request at concurrency 1 (perf uprobes on
malloc/calloc/realloc and mimalloc's entry points, as scripts/bench_floor.py does).

Method, per table row (protocol x concurrency), repeated --repeat times (default 3):
  1. an unmeasured warm-up run of the load tester (--warmup s);
  2. the served run (--duration s), between two reads of the model's /stats, so the batch
     sizes the server ran come from batch_stats with the warm-up excluded;
  3. right after, raw in-process ONNX Runtime (deployments/examples/raw_ort.rs, one session on
     one thread like a replica) running that same mix of batch sizes (--raw-duration s).
The ratio of each repetition is served inferences/s over raw samples/s at its mix; the report
shows the median and [min-max] of every number over the repetitions, ratios always with their
spread.

  python3 scripts/bench.py                       # the full suite (about 25 minutes)
  python3 scripts/bench.py --duration 1 --raw-duration 0.5 --warmup 0.3 --models iris \
      --protocols rest-json --concurrency 1,8      # a quick check that it runs

Everything targets 127.0.0.1 and stops by itself.
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_floor  # noqa: E402 (its allocation probes)

ROOT = Path(__file__).resolve().parents[1]
REL = ROOT / "target" / "release"
SLUICE = REL / "sluice"  # --binary
ORT = ROOT / ".ort" / "libonnxruntime.so"
HTTP, GRPC = 18000, 18001
PROTOCOLS = ["rest-json", "rest-binary", "grpc"]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def build():
    subprocess.run(["scripts/install-onnxruntime.sh"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "sluice-loadtest"], cwd=ROOT, check=True)
    # The raw ONNX Runtime baselines: bench.py's models and bench_pipeline.py's MiniLM pipeline.
    for example in ["raw_ort", "raw_pipeline"]:
        subprocess.run(["cargo", "build", "--release", "-p", "sluice-deployments", "--example", example], cwd=ROOT, check=True)
    # `sluice` as scripts/setup.sh builds it: optimised with the committed profile (pgo/).
    subprocess.run(["scripts/build-release.sh"], cwd=ROOT, check=True)


def models(selected, out):
    found = {}
    # One-row requests: the first case of each fixture, with its expected outputs. big-mlp
    # (256 -> 3 x 1024 -> 16, issue 14's larger model) is made once by examples/make_models.py.
    made = out / "models"
    if "big-mlp" in selected and not (made / "big-mlp" / "model.onnx").is_file():
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "examples" / "make_models.py"), str(made),
                        "big-mlp"], check=True)
    for name, d, tolerance in [("iris", ROOT / "examples" / "models", 1e-5), ("mlp", ROOT / "examples" / "models", 1e-5),
                               ("big-mlp", made, 1e-4)]:
        if name in selected:
            case = json.loads((d / name / "expected.json").read_text())["cases"][0]
            samples = out / f"{name}-one-row.json"
            samples.write_text(json.dumps({"tolerance": tolerance, "cases": [case]}))
            found[name] = dict(path=d / name / "model.onnx", samples=samples, seq=1, extra="max_batch_size: 32")
    if "minilm" in selected:
        d = Path(os.environ.get("SLUICE_MINILM_DIR", ROOT.parent / "shared" / "models" / "minilm"))
        if not ((d / "samples.json").is_file() and (d / "model.onnx").is_file()):
            print(f"MiniLM skipped: no model.onnx and samples.json in {d} (set SLUICE_MINILM_DIR)", file=sys.stderr)
        else:
            doc = json.loads((d / "samples.json").read_text())
            single = [c for c in doc["cases"] if c["inputs"][0]["shape"][0] == 1][:1]
            samples = out / "minilm-single.json"
            samples.write_text(json.dumps({"cases": [{"inputs": c["inputs"]} for c in single]}))
            found["minilm"] = dict(path=d / "model.onnx", samples=samples, seq=single[0]["inputs"][0]["shape"][1],
                                   extra="max_batch_size: 64")
    return found


class Server:
    def __init__(self, config):
        self.proc = subprocess.Popen([str(SLUICE), "run", str(config)], stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "RUST_LOG": "warn"})
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            # Exited (its port taken, say): a server answering there is another one.
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice exited with {self.proc.returncode}:\n" + "".join(self.log))
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
        """Model calls by batch size so far (Triton's batch_stats)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/models/{model}/stats") as r:
            s = json.load(r)["model_stats"][0]
        return {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def loadtest(model, protocol, samples, concurrency=None, rate=None, duration=5, warmup=1, requests=None):
    """One step of sluice-loadtest; `model` None sends the liveness call (the floor)."""
    port = GRPC if protocol == "grpc" else HTTP
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(REL / "sluice-loadtest"), "--url", f"127.0.0.1:{port}", "-p", protocol,
               "--warmup", f"{warmup:g}s", "--quiet", "--output-dir", tmp]
        cmd += ["--health"] if model is None else ["-m", model, "--input-data", str(samples)]
        cmd += ["--requests", str(requests)] if requests else ["--duration", f"{duration:g}s"]
        cmd += ["--concurrency", str(concurrency)] if concurrency else ["--rate", str(rate)]
        sh(*cmd)
        return json.loads((Path(tmp) / "report.json").read_text())["steps"][0]


def transport(protocol):
    """Which floor a protocol's rows compare with: REST's for both REST encodings."""
    return "grpc" if protocol == "grpc" else "rest-json"


def raw_ort(path, mix, seq, seconds):
    """Raw ONNX Runtime running `mix` ({batch size: model calls}) on one thread."""
    spec = ",".join(f"{b}:{c}" for b, c in sorted(mix.items()))
    out = sh(str(REL / "examples" / "raw_ort"), str(path), spec, str(seconds), str(seq),
             env={**os.environ, "ORT_DYLIB_PATH": str(ORT)})
    return json.loads(out.strip().splitlines()[-1])


def calls_between(before, after):
    """Model calls by batch size between two /stats reads."""
    diff = {b: after.get(b, 0) - before.get(b, 0) for b in after}
    return {b: c for b, c in diff.items() if c > 0}


def spread(values, fmt="{:.0f}"):
    """`median [min-max]` of the repetitions (just the value when there is one)."""
    if not values:
        return "—"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def measure(server, name, m, protocol, concurrency, args, floor):
    """One repetition of a row: warm-up (unmeasured), served run, raw ONNX Runtime at its mix;
    `floor` is the liveness step of the same repetition, transport and concurrency."""
    loadtest(name, protocol, m["samples"], concurrency=concurrency, duration=args.warmup, warmup=0)
    before = server.stats(name)
    step = loadtest(name, protocol, m["samples"], concurrency=concurrency, duration=args.duration, warmup=0)
    mix = calls_between(before, server.stats(name))
    raw = raw_ort(m["path"], mix or {1: 1}, m["seq"], args.raw_duration)
    calls, rows = sum(mix.values()), sum(b * c for b, c in mix.items())
    only_ones = set(mix) == {1}
    return dict(step=step, mix=mix, raw=raw, avg_batch=rows / calls if calls else 1.0,
                ratio=step["inferences_per_second"] / raw["samples_per_s"],
                floor_ratio=step["throughput"] / floor["throughput"],
                floor_p50=step["latency_us"]["p50"] - floor["latency_us"]["p50"],
                # Comparable only when every model call was one row, as the raw calls were.
                overhead_p50=step["latency_us"]["p50"] - raw["p50_us"] if only_ones else None)


def wrk(model, body, connections, duration):
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(f"wrk.method = 'POST'\nwrk.body = [[{body}]]\n")
    out = sh("wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script),
             f"http://127.0.0.1:{HTTP}/v2/models/{model}/infer")
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def us(label):
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        v = float(m.group(1))
        return v * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    # wrk's rate counts every answer, errors too: a run with errors compares nothing.
    if non2xx or "Socket errors" in out:
        sys.exit(f"wrk against {model}: errors:\n{out}")
    return dict(rps=rps, p50=us("50"), p99=us("99"), errors=0)


def replica_memory(found, out):
    """Report lines: resident memory once ready of the largest model present with 1, 2 and 4 replicas,
    each replica loading its own copy of the weights and the replicas sharing one (`share_weights`).
    One server per cell, alone on the ports, 2 s after it reports ready (nothing served)."""
    name = next((n for n in ("minilm", "big-mlp", "mlp") if n in found), None)
    if name is None:
        return []
    rows = []
    for replicas in (1, 2, 4):
        cells = []
        for share in ("false", "true"):
            config = out / "replicas.yaml"
            config.write_text(
                f"http_options: {{host: 127.0.0.1, port: {HTTP}}}\ngrpc_options: {{host: 127.0.0.1, port: {GRPC}}}\n"
                f"applications:\n  - name: bench\n    deployments:\n"
                f"      - {{name: {name}, model: {found[name]['path']}, num_replicas: {replicas}, share_weights: {share}}}\n")
            server = Server(config)
            try:
                time.sleep(2)
                cells.append(server.rss_kib() / 1024)
            finally:
                server.stop()
        rows.append(f"| {replicas} | {cells[0]:.1f} | {cells[1]:.1f} |")
    size = Path(found[name]["path"]).stat().st_size / 2**20
    return ["## Replicas and memory", "",
            f"Resident memory (MiB) of `sluice` serving {name} ({size:.1f} MiB file) alone, once ready, with each "
            f"replica loading its own copy of the weights and with the replicas sharing one (`share_weights`, the "
            f"default; a one-replica deployment never shares, since the shared copy costs more than one replica's own).",
            "", "| replicas | own copies | shared |", "|---|---|---|"] + rows + [""]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=4, help="seconds of each measured served run")
    ap.add_argument("--raw-duration", type=float, default=2, help="seconds of each raw ONNX Runtime run")
    ap.add_argument("--warmup", type=float, default=1, help="seconds of the unmeasured run before each")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of every row (at least 3 for a report)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--models", default="iris,mlp,big-mlp,minilm")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--concurrency", default="1,8,16,64")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--binary", default=str(REL / "sluice"),
                    help="the sluice binary to measure (default: the release build), e.g. a build of another commit")
    args = ap.parse_args()
    global SLUICE
    SLUICE = Path(args.binary).resolve()
    if args.repeat < 3:
        print(f"note: --repeat {args.repeat}: fewer than 3 repetitions, the spreads mean little", file=sys.stderr)
    protocols = args.protocols.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(args.out).resolve()  # model paths in the written config must not depend on the working directory
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
    served = ("`sluice` release build" if SLUICE == (REL / "sluice").resolve()
              else f"`{SLUICE.relative_to(ROOT) if SLUICE.is_relative_to(ROOT) else SLUICE}`")
    report = ["# Sluice benchmark report", "",
              f"Machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Server: {served}, 1 replica per "
              f"model, 1 intra-op thread, max_batch_size 32 (MiniLM 64), batch_wait_timeout_s 0. The load tester "
              f"runs on the same machine and shares its CPUs.", "",
              f"Every row is {args.repeat} repetitions of: an unmeasured {args.warmup:g} s warm-up run, the served "
              f"run ({args.duration:g} s, closed loop), then raw ONNX Runtime (`Session::run` on one thread, the "
              f"replica's session options) running the same mix of batch sizes the server ran in that run (from "
              f"`/stats` `batch_stats`, warm-up excluded) for {args.raw_duration:g} s. Cells are the median and "
              f"[min–max] over the repetitions. Ratio: served inferences/s over raw samples/s at that mix, per "
              f"repetition. p50 − raw p50: only where every model call was one row (as the raw calls were).", ""]

    server = Server(config)
    results = {}
    try:
        idle_rss = server.rss_kib()
        # The floor: liveness calls through the same load tester, transport and concurrency.
        floors = {}
        report += ["## Floor", "",
                   "The server's own path with no model: `sluice-loadtest --health` (REST `GET /v2/health/live`, "
                   "gRPC `ServerLive`), same connections and concurrency as the rows below, measured first. The "
                   "model tables compare each row with the floor of its transport (both REST encodings with "
                   "REST's).", "",
                   "| transport | concurrency | req/s | p50 µs | p99 µs | errors |", "|---|---|---|---|---|---|"]
        for t in dict.fromkeys(transport(p) for p in protocols):
            for c in levels:
                reps = []
                for _ in range(args.repeat):
                    loadtest(None, t, None, concurrency=c, duration=args.warmup, warmup=0)
                    reps.append(loadtest(None, t, None, concurrency=c, duration=args.duration, warmup=0))
                floors[(t, c)] = reps
                errors = sum(sum(r["errors"].values()) for r in reps)
                report.append(f"| {'grpc' if t == 'grpc' else 'rest'} | {c} | {spread([r['throughput'] for r in reps])} | "
                              f"{spread([r['latency_us']['p50'] for r in reps])} | "
                              f"{spread([r['latency_us']['p99'] for r in reps])} | {errors} |")
        report.append("")
        for name, m in found.items():
            report += [f"## {name}", "",
                       "| protocol | concurrency | req/s | p50 µs | p99 µs | errors | avg batch | raw ORT samples/s at the mix | ratio served/raw | p50 − raw p50 µs | req/s ÷ floor | p50 − floor p50 µs |",
                       "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for protocol in protocols:
                for c in levels:
                    reps = [measure(server, name, m, protocol, c, args, floors[(transport(protocol), c)][i])
                            for i in range(args.repeat)]
                    results[(name, protocol, c)] = reps
                    col = lambda f: [f(r) for r in reps]
                    overhead = [r["overhead_p50"] for r in reps if r["overhead_p50"] is not None]
                    errors = sum(sum(r["step"]["errors"].values()) for r in reps)
                    report.append(
                        f"| {protocol} | {c} | {spread(col(lambda r: r['step']['throughput']))} | "
                        f"{spread(col(lambda r: r['step']['latency_us']['p50']))} | "
                        f"{spread(col(lambda r: r['step']['latency_us']['p99']))} | {errors} | "
                        f"{spread(col(lambda r: r['avg_batch']), '{:.1f}')} | "
                        f"{spread(col(lambda r: r['raw']['samples_per_s']))} | "
                        f"{spread(col(lambda r: r['ratio']), '{:.2f}')} | "
                        f"{spread(overhead) if len(overhead) == len(reps) else '—'} | "
                        f"{spread(col(lambda r: r['floor_ratio']), '{:.2f}')} | {spread(col(lambda r: r['floor_p50']))} |")
            report.append("")

        # Memory at 10x overload: open loop at ten times the best throughput measured, on the
        # slowest model present. REST, so every request reaches the server (one gRPC connection
        # would queue streams in the client beyond HTTP/2's concurrent-stream limit).
        victim = "minilm" if "minilm" in found else "mlp" if "mlp" in found else None
        if victim:
            best = max(statistics.median(r["step"]["throughput"] for r in reps)
                       for (n, _, _), reps in results.items() if n == victim)
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
                       f"p99 of answered {over['latency_us']['p99']:.0f} µs (from each request's scheduled send time); "
                       f"after: {server.rss_kib() / 1024:.1f} MiB.", ""]
            if over["errors"].get("overrun"):
                # The load tester skipped sends with MAX_OUTSTANDING requests already open: the rate
                # is beyond what it can hold open on this machine, and the p99 includes its own
                # backlog, not only the server's queue.
                report += [f"The load tester could not hold this rate: {over['errors']['overrun']} sends skipped as "
                           f"`overrun` (4,096 requests already outstanding), so the p99 above includes its own "
                           f"backlog. The row means most with a slow model (MiniLM-L6 when present).", ""]

        # The load tester against wrk on the same server, same run.
        if shutil.which("wrk") and "iris" in found:
            case = json.loads(Path(found["iris"]["samples"]).read_text())["cases"][0]
            body = json.dumps({"inputs": case["inputs"]})
            one = out / "iris-one.json"
            one.write_text(json.dumps({"cases": [{"inputs": case["inputs"]}]}))
            rounds = max(3, args.repeat)
            report += ["## Load tester against wrk", "",
                       f"One-row iris request, REST JSON, keep-alive, same server; wrk and sluice-loadtest alternate "
                       f"{rounds} times per step ({args.duration:g} s each); medians, and every run's req/s.", "",
                       "| tool | connections | req/s (median) | p50 µs (median) | runs (req/s) |", "|---|---|---|---|---|"]
            med = statistics.median
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
                ratios = [s["throughput"] / w["rps"] for w, s in zip(ws, ls)]
                report.append(f"| ratio loadtest/wrk (per round) | {c} | {spread(ratios, '{:.2f}')} | "
                              f"{l_p50 / w_p50:.2f} (of medians) | |")
            report.append("")

        # Allocation calls in the server per request, one connection (perf uprobes; root).
        probes = bench_floor.alloc_probes(str(SLUICE))
        if probes is None:
            print("no perf uprobes here (needs perf and root): allocations per request left out", file=sys.stderr)
        else:
            count = lambda model, protocol, samples: bench_floor.allocs_per_request(
                server.proc.pid, probes,
                lambda: loadtest(model, protocol, samples, concurrency=1, requests=2000, warmup=0)["ok"])
            report += ["## Allocations per request", "",
                       "Allocation calls in the server, counted with perf uprobes over 2,000 requests at "
                       "concurrency 1 after the rows above: libc's malloc, calloc and realloc, mimalloc's entry "
                       "points for Rust, and the malloc, calloc and realloc the binary exports (mimalloc's, which "
                       "ONNX Runtime calls); the floor is the liveness call.", "",
                       "| request | " + " | ".join(protocols) + " |", "|---|" + "---|" * len(protocols)]
            floor_cells = {t: f"{count(None, t, None):.0f}" for t in dict.fromkeys(transport(p) for p in protocols)}
            report.append("| floor (liveness) | " + " | ".join(floor_cells[transport(p)] for p in protocols) + " |")
            for name, m in found.items():
                report.append(f"| {name} | " + " | ".join(f"{count(name, p, m['samples']):.0f}" for p in protocols)
                              + " |")
            report.append("")
    finally:
        server.stop()
    report += replica_memory(found, out)
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "results.json").write_text(json.dumps({f"{k[0]}/{k[1]}/{k[2]}": v for k, v in results.items()}, indent=1,
                                                 default=str))
    print("\n".join(report))
    print(f"\nwrote {out / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
