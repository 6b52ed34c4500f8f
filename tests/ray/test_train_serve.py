"""Train, then serve, on one real 2-node Ray cluster (network namespaces, see netns_cluster.py):
a model repository on S3 (moto's server, inside the head's namespace), Sluice on Ray serving
it with a per-model rollout, `sluice job submit` running examples/train/train.py as a Ray job
that writes the next version, the new version taking 10 % as a canary and promoted by itself,
then a broken version rolled back by itself; a failing job shows its exit code and log tail;
Ray's own `ray job list` sees the jobs.

Needs the training packages in the cluster's venv (scripts/requirements-ray.txt: scikit-learn,
skl2onnx, boto3, moto[server]); `SLUICE_RAY_VENV` points at another venv than .venv-ray."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import netns_cluster  # noqa: E402

SLUICE = Path(os.environ.get("SLUICE_BIN", REPO / "target" / "debug" / "sluice"))
VENV = Path(os.environ.get("SLUICE_RAY_VENV", netns_cluster.DEFAULT_VENV))
TOKEN = "train-test-token"
HEAD = netns_cluster.HEAD_IP
S3 = "http://%s:5555" % HEAD
ADMIN = "http://%s:8266" % HEAD
INFER = "http://%s:8000/v2/models/iris/infer" % HEAD
AWS = {"AWS_ENDPOINT_URL": S3, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
       "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}

APP = """\
http_options: {port: 8000}
grpc_options: {enabled: false}
graceful_shutdown_timeout_s: 2
model_repository:
  path: s3://models/repo
  poll_interval_s: 2
  cache_dir: %s
  rollout: {canary_weight: 10, step_percent: 30, interval_s: 2, min_requests: 5, max_error_rate: 0.05}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = netns_cluster.netns_available()
    if reason:
        pytest.skip("Ray netns cluster unavailable: " + reason)
    missing = [m for m in ("ray", "sklearn", "skl2onnx", "boto3", "moto")
               if subprocess.run([str(VENV / "bin" / "python"), "-c", "import " + m], capture_output=True).returncode]
    if missing:
        pytest.skip("the Ray venv %s lacks %s (scripts/venv.sh scripts/requirements-ray.txt .venv-ray)" % (VENV, missing))
    if not SLUICE.exists():
        pytest.skip("no sluice binary at %s (cargo build --bin sluice, or set SLUICE_BIN)" % SLUICE)
    c = netns_cluster.NetnsCluster(tmp_path_factory.mktemp("traincluster"), venv=VENV, head_cpus=3, worker_cpus=2,
                                   system_env=AWS)
    try:
        c.up()
    except netns_cluster.Unavailable as e:
        pytest.skip("Ray netns cluster unavailable: %s" % e)
    try:
        yield c
    finally:
        c.down()


def wait_for(what, check, timeout=60, every=0.5):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError("timed out after %ss waiting for %s (last: %r)" % (timeout, what, last))


def put(c, key, body: bytes):
    st, out = c.http("PUT", "%s/%s" % (S3, key), body=body)
    assert st == 200, (key, st, out[:300])


def admin(c, method, path):
    r = c.check_in("head", [str(VENV / "bin" / "python"), str(HERE / "clients.py"), "admin", method, ADMIN + path, TOKEN])
    assert r.returncode == 0, r.stderr[-2000:]
    status, _, body = r.stdout.partition("\n")
    return int(status), (json.loads(body) if body.strip().startswith("{") else body)


def status(c):
    code, body = admin(c, "GET", "/api/sluice/status")
    assert code == 200, body
    return body


def versions(c):
    d = status(c).get("applications", {}).get("repository", {}).get("deployments", {}).get("iris", {})
    return [(v["version"], v["weight"]) for v in d.get("versions", [])]


def events(c):
    return status(c)["events"]


def event_time(c, text):
    return next((e["time"] for e in events(c) if text in e["message"]), None)


def sluice(c, *args, timeout=240, env=None):
    return c.check_in("head", [str(SLUICE), *args], timeout=timeout, env=c.env(dict(AWS, **(env or {}))))


def load(c, seconds, out):
    return c.run_in("head", [str(VENV / "bin" / "python"), str(HERE / "clients.py"), "load", INFER, str(seconds), "4",
                             str(out)])


@pytest.fixture(scope="module")
def serving(cluster, tmp_path_factory):
    c = cluster
    c.run_in("head", [str(VENV / "bin" / "moto_server"), "-H", HEAD, "-p", "5555"],
             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("moto in the head's namespace", lambda: c.http("GET", S3 + "/")[0] == 200, timeout=60)
    put(c, "models", b"")
    put(c, "models/repo/iris/1/model.onnx", (REPO / "examples/models/iris/model.onnx").read_bytes())
    put(c, "models/repo/iris/1/READY", b"")
    work = tmp_path_factory.mktemp("trainapp")
    (work / "app.yaml").write_text(APP % (work / "cache"))
    t = time.time()
    r = sluice(c, "run", str(work / "app.yaml"), "--ray", c.dashboard_url, env={"SLUICE_ADMIN_TOKEN": TOKEN})
    assert r.returncode == 0, "sluice run --ray failed:\n%s\n%s" % (r.stdout, r.stderr[-4000:])
    sys.stderr.write("\n[sluice on Ray with an S3 repository in %.1f s]\n" % (time.time() - t))
    yield work
    c.http("POST", c.dashboard_url + "/api/jobs/sluice-app/stop")


def test_a_trained_version_rolls_out_as_a_canary_and_is_promoted(cluster, serving, tmp_path):
    c = cluster
    assert versions(c) == [("1", 100)]
    # Until the promotion (each rollout step waits for requests on the canary; the training
    # job's length varies with the machine's load): stopped then.
    p = load(c, 300, tmp_path / "load.json")
    t = time.time()
    r = sluice(c, "job", "submit", "--ray", c.dashboard_url, "--working-dir", str(REPO / "examples" / "train"),
               "--submission-id", "train-iris-1", "--env", "SLUICE_ADMIN_TOKEN=" + TOKEN, "--",
               "python", "train.py", "--repository", "s3://models/repo", "--model", "iris", "--notify", ADMIN)
    assert r.returncode == 0, "training job failed:\n%s\n%s" % (r.stdout[-3000:], r.stderr[-3000:])
    assert "wrote iris version 2" in r.stdout and "best: C=" in r.stdout, r.stdout
    assert "job train-iris-1 SUCCEEDED" in r.stderr, r.stderr
    job_s = time.time() - t
    # The canary takes its 10 % (the notify made the scan at once), steps up, and is promoted.
    canary = wait_for("a canary of version 2", lambda: ("2", 10) in versions(c) or event_time(c, "canary version 2 started"),
                      timeout=60)
    assert canary
    wait_for("the promotion of version 2", lambda: versions(c) == [("2", 100)], timeout=120)
    Path(str(tmp_path / "load.json") + ".stop").touch()
    p.wait(timeout=120)
    stats = json.loads((tmp_path / "load.json").read_text())
    assert stats["errors"] == {}, stats
    assert stats["versions"].get("1", 0) > 0 and stats["versions"].get("2", 0) > 0, stats
    started, promoted = event_time(c, "canary version 2 started at 10%"), event_time(c, "promoted version 2 (was 1)")
    written = event_time(c, "repository notified")
    assert started and promoted and written, events(c)
    sys.stderr.write("\n[training job %.1f s; version written -> canary taking traffic %.2f s; canary -> promoted "
                     "%.1f s]\n" % (job_s, started - written, promoted - started))
    # Ray's own CLI sees the same job.
    r = c.check_in("head", [str(VENV / "bin" / "ray"), "job", "list", "--address", c.dashboard_url], timeout=60,
                   env=c.env())
    assert "train-iris-1" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    r = sluice(c, "job", "list", "--ray", c.dashboard_url)
    assert r.returncode == 0 and "train-iris-1" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout
    r = sluice(c, "job", "status", "train-iris-1", "--ray", c.dashboard_url)
    assert r.returncode == 0 and "job train-iris-1 SUCCEEDED (exit code 0)" in r.stdout, r.stdout + r.stderr
    r = sluice(c, "job", "logs", "train-iris-1", "--ray", c.dashboard_url)
    assert r.returncode == 0 and "wrote iris version 2" in r.stdout, r.stdout + r.stderr


def test_a_broken_version_is_rolled_back_by_itself(cluster, serving, tmp_path):
    c = cluster
    put(c, "models/repo/iris/3/model.onnx", (REPO / "examples/models/broken/model.onnx").read_bytes())
    put(c, "models/repo/iris/3/READY", b"")
    p = load(c, 300, tmp_path / "load.json")  # ended below, once the rollback is seen
    r = sluice(c, "repository", "notify", "iris", "--address", ADMIN, "--token", TOKEN)
    assert r.returncode == 0, r.stderr
    wait_for("the rollback of version 3", lambda: event_time(c, "rolled back canary version 3"), timeout=90)
    wait_for("version 3 retired", lambda: versions(c) == [("2", 100)], timeout=30)
    rejected = status(c)["repository"]["rejected"]
    assert [(r["model"], r["version"]) for r in rejected] == [("iris", 3)], rejected
    p.terminate()
    p.wait(timeout=30)


def test_a_failing_job_shows_its_exit_code_and_log_tail(cluster, serving):
    r = sluice(cluster, "job", "submit", "--ray", cluster.dashboard_url, "--", "python", "-c",
               "import sys; print('training blew up'); sys.exit(3)")
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert "FAILED (exit code 3)" in r.stderr and "training blew up" in r.stderr, r.stderr


def test_a_job_is_stopped_on_request(cluster, serving):
    r = sluice(cluster, "job", "submit", "--ray", cluster.dashboard_url, "--submission-id", "sleeper", "--no-wait",
               "--", "python", "-c", "import time; print('sleeping', flush=True); time.sleep(300)")
    assert r.returncode == 0 and r.stdout.strip() == "sleeper", (r.stdout, r.stderr)
    wait_for("the job to run", lambda: "RUNNING" in sluice(cluster, "job", "status", "sleeper", "--ray",
                                                             cluster.dashboard_url).stdout, timeout=60)
    r = sluice(cluster, "job", "stop", "sleeper", "--ray", cluster.dashboard_url, timeout=90)
    assert r.returncode == 0 and "job sleeper STOPPED" in r.stdout, (r.stdout, r.stderr)
    r = sluice(cluster, "job", "status", "nope", "--ray", cluster.dashboard_url)
    assert r.returncode == 1 and "has no job `nope`" in r.stderr, r.stderr
