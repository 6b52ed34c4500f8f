#!/usr/bin/env python3
"""Sluice on Ray, measured on this machine (a 2-node Ray cluster in network namespaces, see
tests/ray/netns_cluster.py; needs root):

- the cost of the hop: the small MLP at concurrency 1 and 64 through the head's frontends to a
  replica in a Ray actor on the head node, against the same replica in one local process, with
  the same load tester (release builds), in the same run;
- node-loss recovery: with a replica on the worker, its raylet is killed; the time until both
  replicas serve from the head again;
- memory of the Ray side per replica (the actor process and the `sluice replica` it hosts).

    python3 scripts/bench_cluster.py [--duration 5] [--out bench-results]

Two nodes on one 2-core machine share its CPUs: this is a functional check and a measure of the
hop, not a scaling claim. Everything runs on loopback addresses and stops by itself.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ray"))
import netns_cluster  # noqa: E402

REL = ROOT / "target" / "release"
TOKEN = "bench-token"


def loadtest(url, model, concurrency, duration, samples, ns=None):
    cmd = [str(REL / "sluice-loadtest"), "--url", url, "-m", model, "--input-data", str(samples),
           "--concurrency", ",".join(map(str, concurrency)), "--duration", f"{duration}s", "--warmup", "1s",
           "--quiet", "--output-dir"]
    out = Path(tempfile.mkdtemp(prefix="bench-lt-"))
    cmd.append(str(out))
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return report["steps"]


def step_row(step):
    lat = step["latency_us"]
    return step["throughput"], lat["p50"], lat["p99"], sum(step["errors"].values())


def samples_file(tmp):
    case = json.loads((ROOT / "examples/models/mlp/expected.json").read_text())["cases"][0]
    path = tmp / "mlp-one-row.json"
    path.write_text(json.dumps({"cases": [{"inputs": case["inputs"]}]}))
    return path


def local(tmp, concurrency, duration, samples):
    cfg = tmp / "local.yaml"
    cfg.write_text(f"http_options: {{port: 18100}}\ngrpc_options: {{enabled: false}}\nadmin_options: {{enabled: false}}\n"
                   f"applications:\n  - name: a\n    deployments:\n      - {{name: mlp, model: {ROOT}/examples/models/mlp/model.onnx}}\n")
    p = subprocess.Popen([str(REL / "sluice"), "run", str(cfg)], stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    try:
        for _ in range(200):
            try:
                if urllib.request.urlopen("http://127.0.0.1:18100/v2/health/ready", timeout=1).status == 200:
                    break
            except Exception:  # noqa: BLE001
                time.sleep(0.1)
        return loadtest("127.0.0.1:18100", "mlp", concurrency, duration, samples)
    finally:
        p.terminate()
        p.wait(timeout=30)


def admin(c, path):
    r = c.check_in("head", ["curl", "-s", "-H", f"Authorization: Bearer {TOKEN}", f"http://{netns_cluster.HEAD_IP}:8266{path}"])
    return json.loads(r.stdout)


def versions(c, name):
    for app in admin(c, "/api/sluice/status")["applications"].values():
        if name in app["deployments"]:
            return app["deployments"][name]["versions"][0]
    return None


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def on_ray(tmp, concurrency, duration, samples):
    work = tmp / "app"
    (work / "models").mkdir(parents=True)
    shutil.copytree(ROOT / "examples/models/mlp", work / "models/mlp")
    (work / "app.yaml").write_text(
        "http_options: {port: 8000}\ngrpc_options: {enabled: false}\ngraceful_shutdown_timeout_s: 2\n"
        "applications:\n  - name: a\n    deployments:\n"
        "      - {name: mlp, model: models/mlp/model.onnx, num_replicas: 1, num_cpus: 1, "
        "ray_actor_options: {resources: {head: 0.5}}, health_check_period_s: 1, health_check_timeout_s: 3}\n"
        "      - {name: spread, model: models/mlp/model.onnx, num_replicas: 2, num_cpus: 1, "
        "max_replicas_per_node: 1, health_check_period_s: 1, health_check_timeout_s: 3}\n")
    c = netns_cluster.NetnsCluster(tmp / "cluster", head_cpus=4, worker_cpus=2, head_resources={"head": 1})
    c.up()
    results = {}
    try:
        env = c.env({"SLUICE_ADMIN_TOKEN": TOKEN, "RUST_LOG": "warn"})
        t = time.time()
        r = c.check_in("head", [str(REL / "sluice"), "run", str(work / "app.yaml"), "--ray", c.dashboard_url], timeout=600, env=env)
        if r.returncode != 0:
            raise SystemExit(f"sluice run --ray failed:\n{r.stderr[-3000:]}")
        results["submit_s"] = time.time() - t
        results["steps"] = loadtest(f"{netns_cluster.HEAD_IP}:8000", "mlp", concurrency, duration, samples, ns=c.ns["head"])
        # Memory of the Ray side, per replica: the host actor and the replica it runs.
        mem = []
        for node in ("head", "worker"):
            for pid in c.pids(node):
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                except OSError:
                    continue
                if "ProcessHost" in cmd:
                    mem.append(("actor", rss_kib(pid)))
                elif cmd.startswith(str(Path("_sluice/sluice"))) or "/sluice\0replica" in cmd or "sluice\0replica" in cmd:
                    mem.append(("replica", rss_kib(pid)))
        results["memory"] = mem
        # Node loss: the `spread` replica on the worker goes with its raylet.
        v = versions(c, "spread")
        on_worker = [n for n in v["nodes"] if n["node_ip"] == netns_cluster.WORKER_IP]
        if on_worker:
            lost = time.time()
            c.kill_raylet("worker")
            while time.time() - lost < 120:
                v = versions(c, "spread")
                if v["ready_replicas"] == 2 and all(n["node_ip"] == netns_cluster.HEAD_IP for n in v["nodes"]):
                    results["recovery_s"] = time.time() - lost
                    break
                time.sleep(0.2)
        c.http("POST", c.dashboard_url + "/api/jobs/sluice-app/stop")
        time.sleep(5)
    finally:
        c.down()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or netns_cluster.netns_available():
        raise SystemExit("needs root and `ip netns` (a Ray cluster in network namespaces)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "sluice-server", "-p", "sluice-loadtest"], cwd=ROOT, check=True)
    concurrency = [1, 64]
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        tmp = Path(tmp)
        samples = samples_file(tmp)
        local_steps = local(tmp, concurrency, args.duration, samples)
        ray = on_ray(tmp, concurrency, args.duration, samples)
    lines = ["## Sluice on Ray (scripts/bench_cluster.py)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before: {os.getloadavg()[0]:.1f}. "
             "MLP (8→16→4), REST JSON, one row per request, 1 replica, sluice-loadtest (release).", "",
             "| where the replica runs | concurrency | req/s | p50 µs | p99 µs | errors |", "|---|---|---|---|---|---|"]
    for label, steps in (("this process (local)", local_steps), ("Ray actor on the head (one gRPC hop)", ray["steps"])):
        for c, s in zip(concurrency, steps):
            rps, p50, p99, err = step_row(s)
            lines.append(f"| {label} | {c} | {rps:.0f} | {p50:.0f} | {p99:.0f} | {err} |")
    for c, a, b in zip(concurrency, local_steps, ray["steps"]):
        lines.append("")
        lines.append(f"Hop cost at c={c}: p50 {step_row(b)[1] - step_row(a)[1]:+.0f} µs, "
                     f"throughput ratio Ray/local {step_row(b)[0] / step_row(a)[0]:.2f}.")
    lines.append("")
    lines.append(f"Submit to healthy: {ray['submit_s']:.1f} s. Node-loss recovery (raylet killed → both replicas "
                 f"serving from the head): {ray.get('recovery_s', float('nan')):.1f} s.")
    mem = ray["memory"]
    actors = [k for w, k in mem if w == "actor"]
    reps = [k for w, k in mem if w == "replica"]
    if actors and reps:
        lines.append(f"Memory per replica on Ray: host actor {sum(actors) / len(actors) / 1024:.0f} MiB RSS + "
                     f"`sluice replica` {sum(reps) / len(reps) / 1024:.0f} MiB RSS ({len(reps)} replicas measured).")
    text = "\n".join(lines) + "\n"
    (out / "cluster.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
