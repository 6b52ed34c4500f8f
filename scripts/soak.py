#!/usr/bin/env python3
"""Chaos and soak: Sluice under steady load with faults mixed in, for a bounded time.

Starts the chaos server (a release build of server/examples/chaos.rs: Sluice plus a `sleep`
step and a `panic_below_zero` step) on 127.0.0.1, measures its capacity on iris (closed loop,
`sluice-loadtest`), then runs the load tester open loop at half that rate: first alone
(steady state), then for --minutes with, at the same time,

  - ONNX Runtime errors (the `reshape` model fed a bad shape: 500),
  - slow models running past the request's deadline (`sleep`, 1 s, timeout 100 ms: 504),
  - replica panics (`panic_below_zero`: 500; the replica reloads),
  - clients disconnecting mid-request (half a body, a whole request then gone, half headers),
  - good requests to the faulty models (they keep answering 200).

Every chaos request must end with its expected status (a client-side timeout counts as a
hang), every load-test request must be answered, the server's RSS and open file descriptors
must stay flat (sampled every --sample-seconds), and SIGTERM must stop it within its grace
period with exit 0. Writes soak-results/report.md, samples.csv and summary.json; exits 1 when
a check fails.

  python3 scripts/soak.py [--minutes 10] [--steady-seconds 60] [--out soak-results] [--no-build]
  python3 scripts/soak.py --minutes 0.34 --steady-seconds 5 --capacity-seconds 5 --profile debug --no-build
                          # a ~40 s smoke run on the debug build `cargo test --all-targets` made

Loopback only; everything stops by itself.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release"
MODELS = ROOT / "examples" / "models"
GRACE_S = 5

CONFIG = f"""
graceful_shutdown_timeout_s: {GRACE_S}
http_options: {{host: 127.0.0.1, port: 0}}
grpc_options: {{host: 127.0.0.1, port: 0}}
admin_options: {{enabled: false}}
applications:
  - name: soak
    deployments:
      - {{name: iris, model: {MODELS}/iris/model.onnx, num_replicas: 2, max_batch_size: 16, max_queued_requests: 256}}
      - {{name: reshape, model: {MODELS}/reshape/model.onnx}}
      - {{name: slow, builtin: {{custom: {{name: sleep}}}}, num_replicas: 2, warmup: false, max_queued_requests: 16}}
      - {{name: flaky, builtin: {{custom: {{name: panic_below_zero}}}}, num_replicas: 2}}
"""


def build(profile):
    subprocess.run(["scripts/install-onnxruntime.sh"], cwd=ROOT, check=True)
    release = ["--release"] if profile == "release" else []
    for what in (["-p", "sluice-loadtest", "--bin", "sluice-loadtest"], ["-p", "sluice-server", "--example", "chaos"]):
        subprocess.run(["cargo", "build", *what, *release], cwd=ROOT, check=True)


class Server:
    def __init__(self, config: Path):
        # As in production: no backtraces. The soak makes a model panic thousands of times, and
        # with RUST_BACKTRACE set each panic symbolises a backtrace on the thread that ran the
        # model (an async worker, for calls run inline), stalling it for milliseconds.
        env = {**os.environ, "RUST_BACKTRACE": "0"}
        self.proc = subprocess.Popen([str(BIN / "examples" / "chaos"), str(config)], stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.http = self.grpc = None
        self.log = []
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                if m := re.search(r"REST frontend listening on http://(\S+)", line):
                    self.http = m.group(1)
                if m := re.search(r"gRPC frontend listening on (\S+)", line):
                    self.grpc = m.group(1)
                if self.http and self.grpc:
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120):
            self.proc.kill()
            sys.exit("the chaos server did not start:\n" + "".join(self.log))

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def threads(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def stop(self):
        """SIGTERM; returns (exit code, seconds to exit) or (None, None) if it hung."""
        started = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(GRACE_S + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None, None
        return code, time.time() - started


def loadtest(server, out: Path, seconds=None, rate=None, concurrency=None):
    cmd = [str(BIN / "sluice-loadtest"), "--url", server.http, "-m", "iris", "-p", "rest-json",
           "--input-data", str(MODELS / "iris" / "expected.json"), "--quiet", "--output-dir", str(out),
           "--duration", f"{seconds}s", "--warmup", "1s"]
    cmd += ["--rate", str(rate)] if rate else ["--concurrency", str(concurrency)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / "report.json").read_text())["steps"][0]


def post(server, model, body, timeout=30):
    req = urllib.request.Request(f"http://{server.http}/v2/models/{model}/infer", data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (TimeoutError, socket.timeout):
        return "hang", ""
    except OSError as e:
        return f"transport: {e}", ""


def x(value):
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [value]}]}


# (name, model, body, fitting statuses, text each answer must contain). 503 (the model's queue
# is full, Retry-After) is a fitting refusal for the slow model, which the soak keeps busy.
FAULTS = [
    ("onnxruntime error", "reshape", {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [5], "data": [1, 2, 3, 4, 5]},
        {"name": "shape", "datatype": "INT64", "shape": [2], "data": [2, 3]}]}, {500: "ONNX Runtime"}),
    ("slow past deadline", "slow", {**x(300.0), "parameters": {"timeout": 50000}},
     {504: "timed out", 503: "overloaded"}),
    ("replica panic", "flaky", x(-1.0), {500: "panicked"}),
    ("slow within deadline", "slow", x(1.0), {200: "outputs", 503: "overloaded"}),
    ("flaky, good input", "flaky", x(1.0), {200: "outputs"}),
]

def disconnect(server, how):
    """A client that goes away mid-request; returns True when the server took it cleanly."""
    host, port = server.http.rsplit(":", 1)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]})
    head = f"POST /v2/models/iris/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as s:
        if how == "half body":
            s.sendall((head + body[: len(body) // 2]).encode())
        elif how == "whole request, no read":
            s.sendall((head + body).encode())
        elif how == "half headers":
            s.sendall(head[:20].encode())
        # Closing here is the disconnect; RST instead of FIN for the rudest ones.
        if how != "half headers":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    return True


def chaos(server, until, outcomes, problems, lock):
    i = 0
    kinds = ["half body", "whole request, no read", "half headers"]
    while time.time() < until:
        name, model, body, fitting = FAULTS[i % len(FAULTS)]
        status, answer = post(server, model, body)
        with lock:
            outcomes[f"{name}: {status}"] += 1
            if status not in fitting or fitting[status] not in answer:
                problems.append(f"{name}: got {status} {answer[:200]!r}, want one of {fitting}")
        kind = kinds[i % len(kinds)]
        try:
            disconnect(server, kind)
            with lock:
                outcomes[f"disconnect ({kind})"] += 1
        except OSError as e:
            with lock:
                problems.append(f"disconnect ({kind}): {e}")
        i += 1
        time.sleep(0.05)


def sample(server, until, every, samples, started):
    while time.time() < until:
        samples.append((round(time.time() - started, 1), server.rss_kib(), server.fds(), server.threads()))
        time.sleep(every)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--steady-seconds", type=float, default=60)
    ap.add_argument("--sample-seconds", type=float, default=5)
    ap.add_argument("--chaos-threads", type=int, default=2)
    ap.add_argument("--out", default="soak-results")
    ap.add_argument("--capacity-seconds", type=float, default=10)
    ap.add_argument("--profile", choices=["release", "debug"], default="release",
                    help="which build to run (debug: only for a smoke run; its numbers mean little)")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    global BIN
    BIN = ROOT / "target" / args.profile
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_build:
        build(args.profile)
    config = Path(tempfile.mkdtemp(prefix="sluice-soak-")) / "soak.yaml"
    config.write_text(CONFIG)
    server = Server(config)
    summary = {"minutes": args.minutes, "profile": args.profile}
    try:
        capacity = loadtest(server, out / "capacity", seconds=args.capacity_seconds, concurrency=16)
        rate = max(10, int(capacity["throughput"] / 2))
        summary["capacity_rps"] = round(capacity["throughput"], 1)
        summary["rate_rps"] = rate
        print(f"capacity {capacity['throughput']:.0f}/s; soaking at {rate}/s", file=sys.stderr)
        steady = loadtest(server, out / "steady", seconds=args.steady_seconds, rate=rate)
        samples, outcomes, problems, lock = [], Counter(), [], threading.Lock()
        started = time.time()
        until = started + args.minutes * 60
        threads = [threading.Thread(target=sample, args=(server, until, args.sample_seconds, samples, started))]
        threads += [threading.Thread(target=chaos, args=(server, until, outcomes, problems, lock))
                    for _ in range(args.chaos_threads)]
        for t in threads:
            t.start()
        soaked = loadtest(server, out / "chaos", seconds=args.minutes * 60, rate=rate)
        for t in threads:
            t.join()
        samples.append((round(time.time() - started, 1), server.rss_kib(), server.fds(), server.threads()))
    finally:
        code, took = server.stop()
    (out / "server.log").write_text("".join(server.log))
    with open(out / "samples.csv", "w") as f:
        f.write("seconds,rss_kib,fds,threads\n")
        f.writelines(f"{s},{r},{d},{t}\n" for s, r, d, t in samples)
    # Flat: after the first minute (warm-up: allocator arenas, connection buffers), RSS within
    # 10 % and fds within 8. A run shorter than 2 minutes is too short to tell.
    warm = [s for s in samples if s[0] >= 60] or samples
    rss0, rss1 = warm[0][1], samples[-1][1]
    fd0, fd1 = warm[0][2], samples[-1][2]
    long_enough = args.minutes >= 2
    checks = {
        "every chaos request answered as expected": not problems,
        # 503 + Retry-After (a full queue) is a fitting refusal; `overrun` counts sends the load
        # generator itself made late. Anything else (a transport error, another status) fails.
        "load-test requests answered or refused with 503": all(
            k in ("http 503", "overrun") for p in (steady, soaked) for k in p["errors"]),
        "SIGTERM: exit 0 within the grace period": code == 0 and took is not None and took <= GRACE_S + 2,
    }
    if long_enough:
        checks["RSS flat (end within 10 % of minute 1)"] = rss1 <= rss0 * 1.10
        checks["fds flat (end within 8 of minute 1)"] = fd1 <= fd0 + 8
    summary.update({
        "steady": {"p50_ms": steady["latency_us"]["p50"] / 1000, "p99_ms": steady["latency_us"]["p99"] / 1000,
                   "ok": steady["ok"], "errors": steady["errors"]},
        "chaos": {"p50_ms": soaked["latency_us"]["p50"] / 1000, "p99_ms": soaked["latency_us"]["p99"] / 1000,
                  "ok": soaked["ok"], "errors": soaked["errors"]},
        "rss_kib": {"start": samples[0][1], "minute_1": rss0, "end": rss1, "max": max(s[1] for s in samples)},
        "fds": {"start": samples[0][2], "minute_1": fd0, "end": fd1, "max": max(s[2] for s in samples)},
        "chaos_outcomes": dict(sorted(outcomes.items())),
        "problems": problems[:50],
        "shutdown": {"exit_code": code, "seconds": took},
        "checks": checks,
    })
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary, samples))
    print((out / "report.md").read_text())
    sys.exit(0 if all(checks.values()) else 1)


def report(s, samples):
    lines = [f"# Soak: {s['minutes']} min at {s['rate_rps']}/s (half of {s['capacity_rps']}/s measured)", "",
             "| phase | ok | errors | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for phase in ("steady", "chaos"):
        p = s[phase]
        lines.append(f"| {phase} | {p['ok']} | {sum(p['errors'].values())} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} |")
    lines += ["", "| chaos request: outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s["chaos_outcomes"].items()]
    lines += ["", "| seconds | RSS MiB | fds | threads |", "|---|---|---|---|"]
    step = max(1, len(samples) // 20)
    for t, rss, fds, threads in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        lines.append(f"| {t:.0f} | {rss / 1024:.1f} | {fds} | {threads} |")
    took = s["shutdown"]["seconds"]
    lines += ["", f"Shutdown (SIGTERM): exit {s['shutdown']['exit_code']} after "
              f"{'no answer' if took is None else f'{took:.2f} s'}.", ""]
    lines += [f"- {'ok ' if v else 'FAILED'} {k}" for k, v in s["checks"].items()]
    if s["problems"]:
        lines += ["", "Problems (first 50):"] + [f"- {p}" for p in s["problems"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
