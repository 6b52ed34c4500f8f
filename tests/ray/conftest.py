"""Fixtures for the Ray bridge tests: one real 2-node Ray cluster per module
(network namespaces, see netns_cluster.py), a working_dir package uploaded
once, and `Bridge`: a Ray job running ``python -m sluice_ray.driver`` whose
child is a relay controller. The test writes commands into a FIFO that the
relay forwards to the driver, and the relay appends every event it receives
to a file the test reads (the job runs on this machine, only its network is
namespaced)."""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import stat
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import netns_cluster  # noqa: E402

NAMESPACE = "sluice-test"

# The stand-in controller: forwards the lines the test writes into a FIFO to
# its stdout (commands for the driver) and records every event it reads on
# stdin into a JSON-lines file. A line "#exit N" makes it exit with code N; it
# also exits (0) when its stdin or the FIFO closes, and on SIGTERM after
# RELAY_DRAIN_S. `_relay_started` gives the signal mask it was started with.
#
# SIGTERM is blocked in every thread and taken by sigwait in the main thread:
# a Python handler runs only once the main thread's eval loop has control, and
# one that must first interrupt a blocking read is not run in every case (a
# fresh-clone CI run saw the relay ignore three SIGTERMs until SIGKILL).
RELAY_SOURCE = r'''
import json, os, signal, sys, threading, time
fifo, events_path = sys.argv[1], sys.argv[2]
drain_s = float(os.environ.get("RELAY_DRAIN_S", "0"))
inherited_mask = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM]))
out = open(events_path, "a", buffering=1)
lock = threading.Lock()
def record(ev):
    with lock:
        out.write(json.dumps({"t": time.time(), "ev": ev}) + "\n")
def finish(code):
    record({"event": "_exit", "code": code})
    sys.stdout.flush()
    os._exit(code)
def pump():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            ev = {"event": "_unparsable", "line": line}
        record(ev)
    record({"event": "_stdin_eof"})
    finish(0)   # like the controller: the driver closed our stdin, we are done
def forward():
    with open(fifo, "r") as f:
        for line in f:
            if line.startswith("#exit "):
                finish(int(line.split()[1]))
            sys.stdout.write(line)
            sys.stdout.flush()
    finish(0)
threading.Thread(target=pump, daemon=True).start()
record({"event": "_relay_started", "pid": os.getpid(), "ppid": os.getppid(),
        "protocol_env": os.environ.get("SLUICE_RAY_PROTOCOL"), "sigmask": inherited_mask})
threading.Thread(target=forward, daemon=True).start()
signal.sigwait([signal.SIGTERM])
record({"event": "_sigterm", "pid": os.getpid()})
time.sleep(drain_s)
finish(0)
'''


def build_package(dest: Path) -> Path:
    """The job's working_dir as a zip: sluice_ray/ at the root (so that
    `python -m sluice_ray.driver` works from the working_dir), the stand-in
    child (executable) and the relay controller."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(arcname: str, data: bytes, mode: int = 0o644) -> None:
            zi = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            zi.external_attr = (stat.S_IFREG | mode) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
        pkg = REPO / "python" / "sluice_ray"
        for p in sorted(pkg.glob("*.py")):
            add("sluice_ray/" + p.name, p.read_bytes())
        add("stand_in_child.py", (HERE / "stand_in_child.py").read_bytes(), 0o755)
        add("relay_controller.py", RELAY_SOURCE.encode())
    data = buf.getvalue()
    path = dest / ("sluice-test-%s.zip" % hashlib.sha256(data).hexdigest()[:16])
    path.write_bytes(data)
    return path


class Bridge:
    """One Ray job: the sluice_ray driver with the relay as its controller. One live driver
    holds a namespace (a second one there exits at once, without hello): jobs that run beside
    the module's long-lived one get a namespace of their own."""

    _ids = itertools.count(1)

    def __init__(self, cluster: netns_cluster.NetnsCluster, package_uri: str, workdir: Path, tag: str,
                 driver_args: str = "", env_vars: Optional[dict] = None, namespace: str = NAMESPACE,
                 wait_hello: bool = True):
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fifo = self.workdir / "cmd.fifo"
        self.events_path = self.workdir / "events.jsonl"
        if not self.fifo.exists():
            os.mkfifo(self.fifo)
        self.events_path.touch()
        # O_RDWR: opening does not block, and the relay never sees EOF until close().
        self.fd: Optional[int] = os.open(self.fifo, os.O_RDWR)
        self.submission_id = "sluice-test-%s-%d-%d" % (tag, os.getpid(), next(Bridge._ids))
        self.namespace = namespace
        entrypoint = ("python -m sluice_ray.driver --namespace %s %s -- python relay_controller.py %s %s"
                      % (namespace, driver_args, self.fifo, self.events_path))
        env = {"RAY_JOB_STOP_WAIT_TIME_S": "30"}
        env.update(env_vars or {})
        env = {k: v for k, v in env.items() if v is not None}   # None: leave Ray's default
        body = {"entrypoint": entrypoint, "submission_id": self.submission_id,
                "runtime_env": {"working_dir": package_uri, "env_vars": env}}
        st, resp = cluster.http_json("POST", cluster.dashboard_url + "/api/jobs/", body)
        if st != 200:
            raise RuntimeError("job submit failed: %s %s" % (st, resp))
        self.t_submit = time.monotonic()
        self.hello = self.wait("hello", timeout=60) if wait_hello else None

    # -------------------------------------------------------------- commands
    def send(self, cmd) -> None:
        line = cmd if isinstance(cmd, str) else json.dumps(cmd)
        os.write(self.fd, (line.rstrip("\n") + "\n").encode())

    def request(self, cmd: dict, answer: str, timeout: float = 60) -> dict:
        cmd = dict(cmd)
        cmd.setdefault("id", "c%d" % next(Bridge._ids))
        self.send(cmd)
        return self.wait(answer, timeout=timeout, id=cmd["id"])

    def close_fifo(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -------------------------------------------------------------- events
    def events(self) -> List[dict]:
        out = []
        with open(self.events_path) as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line)["ev"])
        return out

    def find(self, event: str, **fields) -> List[dict]:
        return [e for e in self.events() if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    def wait(self, event: str, timeout: float = 60, pred: Optional[Callable[[dict], bool]] = None,
             **fields) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.find(event, **fields):
                if pred is None or pred(e):
                    return e
            if time.monotonic() > deadline:
                raise AssertionError("no %s event %s within %.0f s; events so far:\n%s\njob: %s\nlog tail:\n%s" % (
                    event, fields, timeout, "\n".join(json.dumps(e)[:400] for e in self.events()),
                    self.status(), self.logs()[-4000:]))
            time.sleep(0.1)

    # -------------------------------------------------------------- the job
    def job(self) -> dict:
        st, body = self.cluster.http_json("GET", self.cluster.dashboard_url + "/api/jobs/" + self.submission_id)
        return body if st == 200 and isinstance(body, dict) else {}

    def status(self) -> Optional[str]:
        return self.job().get("status")

    def logs(self) -> str:
        st, body = self.cluster.http_json("GET", self.cluster.dashboard_url + "/api/jobs/%s/logs" % self.submission_id)
        return body.get("logs", "") if isinstance(body, dict) else str(body)

    def stop(self) -> dict:
        st, body = self.cluster.http_json("POST", self.cluster.dashboard_url + "/api/jobs/%s/stop" % self.submission_id, {})
        return body

    def wait_terminal(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.job()
            if j.get("status") in ("STOPPED", "SUCCEEDED", "FAILED"):
                return j
            time.sleep(0.2)
        raise AssertionError("job %s not terminal after %.0f s: %s" % (self.submission_id, timeout, self.job()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns_cluster.netns_available()
    if reason:
        pytest.skip("Ray netns cluster unavailable: " + reason)
    if not (netns_cluster.DEFAULT_VENV / "bin" / "ray").exists():
        pytest.skip("no Ray venv at %s (python3 -m venv .venv-ray && .venv-ray/bin/pip install -r "
                    "scripts/requirements-ray.txt)" % netns_cluster.DEFAULT_VENV)
    c = netns_cluster.NetnsCluster(tmp_path_factory.mktemp("raycluster"))
    try:
        c.up()
    except netns_cluster.Unavailable as e:
        pytest.skip("Ray netns cluster unavailable: %s" % e)
    sys.stderr.write("\n[ray cluster up in %.1f s: %s]\n" % (c.timings.get("up", 0), c.ns))
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def package_uri(cluster, tmp_path_factory) -> str:
    path = build_package(tmp_path_factory.mktemp("pkg"))
    url = cluster.dashboard_url + "/api/packages/gcs/" + path.name
    st, _ = cluster.http("GET", url)
    if st != 200:
        st, body = cluster.http("PUT", url, body_file=str(path))
        assert st == 200, "package upload failed: %s %r" % (st, body[:500])
    return "gcs://" + path.name
