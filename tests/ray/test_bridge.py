"""The Ray bridge (python/sluice_ray) alone, on a real 2-node Ray cluster.

One cluster for the module (head 127.100.0.1, worker 127.100.0.2, 2 CPUs
each), and one long-lived job (`bridge`) whose controller is a relay the test
drives; the re-adoption and job-stop tests run jobs of their own. The native
replica is replaced by tests/ray/stand_in_child.py. Tests run in file order
and share the actors that `spread_pair` creates; the node-death test is last
because it takes the worker node away. One live driver holds a namespace, so the
jobs that run beside `bridge` use namespaces of their own.

Run: .venv-ray/bin/python -m pytest -v --durations=0 tests/ray   (as root)
"""
from __future__ import annotations

import json
import re

import os
import signal
import time

import pytest

from conftest import Bridge

HEAD_IP, WORKER_IP = "127.100.0.1", "127.100.0.2"
CHILD = "stand_in_child.py"      # relative: resolved against the actor's cwd (the working_dir)


def gone(pid) -> bool:
    """The process does not exist any more (a zombie counts as gone)."""
    if pid is None:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids, timeout=10.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if not gone(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if not gone(p)]


def describe(pids) -> str:
    """What each still-running pid is (for a failed wait_gone)."""
    out = []
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                stat = f.read()
            with open("/proc/%d/cmdline" % p, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            out.append("%d: state %s ppid %s: %s" % (p, *stat.rsplit(")", 1)[1].split()[:2], cmd))
        except OSError:
            out.append("%d: gone" % p)
    return "; ".join(out)


def live_actors(cluster, prefix):
    """Names of the actors Ray's state API reports as not DEAD."""
    st, body = cluster.http_json("GET", cluster.dashboard_url + "/api/v0/actors?limit=10000")
    assert st == 200, body
    return sorted(a["name"] for a in body["data"]["result"]["result"]
                  if (a.get("name") or "").startswith(prefix) and a.get("state") != "DEAD")


def create_cmd(name, *child_args, num_cpus=0.5, **extra):
    opts = extra.pop("options", {})
    opts.setdefault("num_cpus", num_cpus)
    cmd = {"op": "create", "id": "create-" + name, "name": name,
           "argv": [CHILD, "--bind", "{node_ip}:0"] + list(child_args),
           "env": {"STAND_IN": "1"}, "options": opts}
    cmd.update(extra)
    return cmd


@pytest.fixture(scope="module")
def bridge(cluster, package_uri, tmp_path_factory):
    b = Bridge(cluster, package_uri, tmp_path_factory.mktemp("jobA"), "main")
    yield b
    if b.status() not in ("STOPPED", "SUCCEEDED", "FAILED"):
        b.send({"op": "shutdown"})
        try:
            b.wait_terminal(60)
        except AssertionError:
            b.stop()
            b.wait_terminal(60)
    b.close_fifo()


@pytest.fixture(scope="module")
def spread_pair(bridge):
    """Two actors, num_cpus=1 each, at most one per node: one on each node."""
    opts = {"num_cpus": 1.0, "group": "app/spread", "max_replicas_per_node": 1}
    bridge.send(create_cmd("sluice:a1", "--helper", options=dict(opts)))
    bridge.send(create_cmd("sluice:a2", options=dict(opts)))
    return {n: bridge.wait("ready", name=n, timeout=60) for n in ("sluice:a1", "sluice:a2")}


def test_hello_and_nodes(bridge):
    h = bridge.hello
    assert h["ray_version"] == "2.60.0"
    assert h["namespace"] == "sluice-test" and h["node_ip"] == HEAD_IP
    assert h["submission_id"] == bridge.submission_id and h["job_id"]
    assert h["protocol"] == 1 and h["pid"] > 0
    added = {bridge.wait("node_added", node_ip=ip, timeout=10)["node_ip"] for ip in (HEAD_IP, WORKER_IP)}
    assert added == {HEAD_IP, WORKER_IP}
    ev = bridge.request({"op": "nodes"}, "nodes")
    by_ip = {n["node_ip"]: n for n in ev["nodes"]}
    assert set(by_ip) == {HEAD_IP, WORKER_IP}
    assert by_ip[HEAD_IP]["is_head"] and not by_ip[WORKER_IP]["is_head"]
    assert all(n["alive"] and n["resources_total"]["CPU"] == 2.0 for n in by_ip.values())
    assert "CPU" in by_ip[WORKER_IP]["resources_available"]


def test_two_actors_spread_and_answer_http(bridge, cluster, spread_pair):
    a1, a2 = spread_pair["sluice:a1"], spread_pair["sluice:a2"]
    assert {a1["node_ip"], a2["node_ip"]} == {HEAD_IP, WORKER_IP}
    for r in (a1, a2):
        assert r["id"] == "create-" + r["name"]
        assert r["addr"].startswith(r["node_ip"] + ":")   # {node_ip} was substituted
        node = "head" if r["node_ip"] == HEAD_IP else "worker"
        assert r["pid"] in cluster.pids(node) and r["actor_pid"] in cluster.pids(node)
        st, body = cluster.http_json("GET", "http://%s/" % r["addr"])
        assert st == 200 and body["pid"] == r["pid"] and body["name"] == r["name"]
    ev = bridge.request({"op": "list", "prefix": "sluice:a"}, "actors")
    listed = {a["name"]: a for a in ev["actors"]}
    assert set(listed) == {"sluice:a1", "sluice:a2"}
    for n in listed:
        assert listed[n]["addr"] == spread_pair[n]["addr"] and listed[n]["pid"] == spread_pair[n]["pid"]
        assert listed[n]["state"] == "ready"


def test_pending_with_reason(bridge, spread_pair):
    t0 = time.monotonic()
    bridge.send(create_cmd("sluice:big", num_cpus=8))
    # Both nodes still have a free CPU; only max_replicas_per_node=1 keeps it out.
    bridge.send(create_cmd("sluice:a3", options={"num_cpus": 1.0, "group": "app/spread", "max_replicas_per_node": 1}))
    big = bridge.wait("pending", name="sluice:big", timeout=15)
    assert big["id"] == "create-sluice:big" and big["kind"] == "infeasible"
    assert "CPU: 8" in big["reason"] and "no alive node" in big["reason"], big
    a3 = bridge.wait("pending", name="sluice:a3", timeout=15)
    assert a3["kind"] == "resources" and "max_replicas_per_node=1" in a3["reason"], a3
    # Well before the waits' own bounds (the first report comes after pending_after_s, 2 s;
    # a loaded machine adds to Ray's own answers).
    assert time.monotonic() - t0 < 30
    for n in ("sluice:big", "sluice:a3"):
        bridge.request({"op": "kill", "name": n, "grace_s": 1.0}, "killed")
        f = bridge.wait("failed", name=n, timeout=10)
        assert f["id"] == "create-" + n and "killed while starting" in f["message"]
    assert not bridge.find("ready", name="sluice:a3")


def test_kill_leaves_no_process(bridge, cluster, spread_pair):
    a1 = spread_pair["sluice:a1"]
    node = "head" if a1["node_ip"] == HEAD_IP else "worker"
    st, body = cluster.http_json("GET", "http://%s/" % a1["addr"])
    helper = body["helper_pid"]
    assert helper and not gone(helper)
    t0 = time.monotonic()
    ev = bridge.request({"op": "kill", "name": "sluice:a1", "grace_s": 5.0}, "killed", timeout=30)
    took = time.monotonic() - t0
    assert ev["name"] == "sluice:a1"
    pids = [a1["pid"], helper, a1["actor_pid"]]
    assert wait_gone(pids, timeout=10) == [], "left behind: %s" % pids
    assert not set(pids) & set(cluster.pids(node))
    time.sleep(1.0)
    assert not bridge.find("died", name="sluice:a1") and not bridge.find("exited", name="sluice:a1")
    # Killing a name that is already gone still answers killed.
    assert bridge.request({"op": "kill", "name": "sluice:a1"}, "killed")["name"] == "sluice:a1"
    print("kill took %.2f s" % took)


def test_child_kill9_reports_exited(bridge, cluster, spread_pair):
    a2 = spread_pair["sluice:a2"]
    t0 = time.monotonic()
    os.kill(a2["pid"], signal.SIGKILL)
    ev = bridge.wait("exited", name="sluice:a2", timeout=20)
    assert ev["code"] == 128 + 9 and ev["signal"] == 9
    assert "stand-in sluice:a2" in ev["log_tail"]
    assert ev["node_ip"] == a2["node_ip"]
    # The driver released the actor (its resources are free again).
    assert wait_gone([a2["actor_pid"]], timeout=10) == []
    assert not bridge.find("died", name="sluice:a2")
    print("exited reported %.2f s after kill -9" % (time.monotonic() - t0))


def test_exit_codes_and_start_failures(bridge, cluster):
    bridge.send(create_cmd("sluice:e1", "--exit-after", "0.5", "--code", "3"))
    bridge.send(create_cmd("sluice:f1", "--fail-before-listen", "--code", "5"))
    bridge.send(create_cmd("sluice:t1", "--no-listen", startup_timeout_s=2))
    bridge.send({"op": "create", "id": "create-sluice:n1", "name": "sluice:n1", "argv": ["./no-such-binary"],
                 "options": {"num_cpus": 0.5}})
    r = bridge.wait("ready", name="sluice:e1", timeout=60)
    ex = bridge.wait("exited", name="sluice:e1", timeout=30)
    assert ex["code"] == 3 and ex["signal"] is None and "exiting with code 3" in ex["log_tail"]
    f1 = bridge.wait("failed", name="sluice:f1", timeout=60)
    assert "code 5" in f1["message"] and "failing before LISTEN" in f1["log_tail"], f1
    assert f1["node_ip"] in (HEAD_IP, WORKER_IP)
    t1 = bridge.wait("failed", name="sluice:t1", timeout=60)
    assert "no LISTEN line within 2.0 s" in t1["message"] and "not LISTEN" in t1["log_tail"], t1
    n1 = bridge.wait("failed", name="sluice:n1", timeout=60)
    assert "cannot start" in n1["message"] and "no-such-binary" in n1["message"], n1
    assert wait_gone([r["pid"], r["actor_pid"]], timeout=10) == []
    # The failed ones were killed: their names are free again.
    ev = bridge.request({"op": "list", "prefix": "sluice:"}, "actors")
    assert not {"sluice:e1", "sluice:f1", "sluice:t1", "sluice:n1"} & {a["name"] for a in ev["actors"]}


def test_bad_commands_get_errors(bridge):
    bridge.send("this is not json")
    bridge.send("[1, 2]")
    bridge.send({"op": "nope", "id": "e1"})
    bridge.send({"op": "create", "id": "e2", "name": "sluice:x"})
    bridge.send({"op": "create", "id": "e3", "name": "sluice:x", "argv": ["a"], "options": {"num_cpu": 1}})
    bridge.send({"op": "create", "id": "e4", "name": "sluice:x", "argv": ["a"], "options": {"max_replicas_per_node": 2}})
    bridge.send({"op": "kill", "id": "e5"})
    bridge.send({"op": "create", "id": "e6", "name": "sluice:x", "argv": ["a"], "options": {"num_cpus": -1}})
    assert "not JSON" in bridge.wait("error", timeout=10, pred=lambda e: "not JSON" in e["message"])["message"]
    bridge.wait("error", timeout=10, pred=lambda e: "not a JSON object" in e["message"])
    assert "unknown op" in bridge.wait("error", id="e1", timeout=10)["message"]
    assert "argv" in bridge.wait("error", id="e2", timeout=10)["message"]
    assert "num_cpu" in bridge.wait("error", id="e3", timeout=10)["message"]
    assert "group" in bridge.wait("error", id="e4", timeout=10)["message"]
    assert "name" in bridge.wait("error", id="e5", timeout=10)["message"]
    e6 = bridge.wait("error", id="e6", timeout=10)
    assert e6["op"] == "create" and e6["name"] == "sluice:x" and ">= 0" in e6["message"]
    bridge.request({"op": "nodes"}, "nodes")   # still serving


def test_a_second_driver_in_the_namespace_is_refused(bridge, cluster, package_uri, tmp_path):
    """While `bridge` runs, a second driver in its namespace exits at once with an error naming
    the namespace and the job holding it. Its controller never starts, so it neither adopts nor
    kills the first one's actors."""
    keep = bridge.request(create_cmd("sluice:keep"), "ready", timeout=60)
    dup = Bridge(cluster, package_uri, tmp_path / "jobDup", "dup", wait_hello=False)
    job = dup.wait_terminal(60)
    logs = dup.logs()
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 1, (job, logs[-3000:])
    assert "Ray namespace `sluice-test` is already used by another running Sluice instance" in logs, logs[-3000:]
    assert "submission %s" % bridge.submission_id in logs and "job %s" % bridge.hello["job_id"] in logs, logs[-3000:]
    assert dup.events() == [], "its controller started: %s" % dup.events()
    dup.close_fifo()
    # The first driver and its actor go on as they were.
    ev = bridge.request({"op": "list", "prefix": "sluice"}, "actors")
    assert [(a["name"], a["state"], a["pid"]) for a in ev["actors"]] == [("sluice:keep", "ready", keep["pid"])], ev
    st, body = cluster.http_json("GET", "http://%s/" % keep["addr"])
    assert st == 200 and body["pid"] == keep["pid"]
    assert not bridge.find("died", name="sluice:keep") and not bridge.find("exited", name="sluice:keep")
    # The actor that holds the namespace is neither listed (above: prefix `sluice`, as the
    # controller lists at start) nor killable through the bridge.
    err = bridge.request({"op": "kill", "name": "sluice-owner"}, "error")
    assert "holds the namespace" in err["message"], err
    bridge.request({"op": "kill", "name": "sluice:keep", "grace_s": 1.0}, "killed")


def test_a_dead_drivers_actors_go_with_it(cluster, package_uri, tmp_path):
    # A namespace of its own (`bridge` holds the module's); b2 takes it over from b1's dead driver.
    ns = "sluice-test-readopt"
    b1 = Bridge(cluster, package_uri, tmp_path / "jobB", "readopt1", namespace=ns)
    b1.send(create_cmd("sluice:re-1"))
    b1.send(create_cmd("sluice:re-2", "--helper"))
    b1.send(create_cmd("sluice:re-p", num_cpus=8))      # never placed
    s1 = b1.wait("ready", name="sluice:re-1", timeout=60)
    s2 = b1.wait("ready", name="sluice:re-2", timeout=60)
    b1.wait("pending", name="sluice:re-p", timeout=15)
    relay1 = b1.wait("_relay_started", timeout=5)["pid"]
    helper = cluster.http_json("GET", "http://%s/" % s2["addr"])[1]["helper_pid"]
    os.kill(b1.hello["pid"], signal.SIGKILL)      # the driver dies without cleaning up
    assert b1.wait_terminal(30)["status"] == "FAILED"
    # PDEATHSIG took the controller (the relay); 30 s: a loaded 2-core CI machine is slow.
    left = wait_gone([b1.hello["pid"], relay1], timeout=30)
    assert left == [], "driver %d, relay %d left: %s" % (b1.hello["pid"], relay1, describe(left))
    b1.close_fifo()
    # The actors are the driver's (not detached): Ray destroys them with it, and their
    # processes go (they held their CPUs, with nobody serving from them, when detached). Ray
    # kills each actor's worker, whose PDEATHSIG ends its child; a process the child started
    # itself (the stand-in's helper; `sluice replica` starts none) is the child's to end.
    procs = [s1["pid"], s1["actor_pid"], s2["pid"], s2["actor_pid"]]
    left = wait_gone(procs, timeout=60)
    assert left == [], "left after the driver died: %s" % describe(left)
    if not gone(helper):
        os.kill(helper, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while live_actors(cluster, "sluice:re-") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_actors(cluster, "sluice:re-") == []

    # The namespace is free for the next driver, which finds nothing left to adopt.
    b2 = Bridge(cluster, package_uri, tmp_path / "jobC", "readopt2", namespace=ns)
    ev = b2.request({"op": "list", "prefix": "sluice:re-"}, "actors")
    assert ev["actors"] == []
    b2.send({"op": "shutdown"})
    assert b2.wait("shutdown", timeout=30)["killed"] == []
    assert b2.wait_terminal(30)["status"] == "SUCCEEDED"
    b2.close_fifo()


@pytest.mark.parametrize("stop_wait", ["30", None], ids=["stop_wait_30s", "ray_default_3s"])
def test_job_stop_leaves_nothing(cluster, package_uri, tmp_path, stop_wait):
    # With Ray's default 3 s before SIGKILL, the driver shortens its graces to fit.
    b = Bridge(cluster, package_uri, tmp_path / "jobD", "stop",
               env_vars={"RELAY_DRAIN_S": "1", "RAY_JOB_STOP_WAIT_TIME_S": stop_wait},
               namespace="sluice-test-stop-%s" % (stop_wait or "default"))
    b.send(create_cmd("sluice:st-1", "--helper", options={"num_cpus": 0.5, "group": "st", "max_replicas_per_node": 1}))
    b.send(create_cmd("sluice:st-2", "--helper", options={"num_cpus": 0.5, "group": "st", "max_replicas_per_node": 1}))
    rs = [b.wait("ready", name=n, timeout=60) for n in ("sluice:st-1", "sluice:st-2")]
    assert {r["node_ip"] for r in rs} == {HEAD_IP, WORKER_IP}
    infos = [cluster.http_json("GET", "http://%s/" % r["addr"])[1] for r in rs]
    helpers = [i["helper_pid"] for i in infos]
    started = b.wait("_relay_started", timeout=5)
    relay = started["pid"]
    # The driver starts its controller with SIGTERM and SIGINT deliverable, whatever mask the
    # forking thread had: a controller started with SIGTERM blocked never hears of a job stop.
    # The host actors start the replicas the same way (an actor's method runs on a Ray thread).
    terms = {int(signal.SIGTERM), int(signal.SIGINT)}
    assert not terms & set(started["sigmask"]), started
    assert not any(terms & set(i["sigmask"]) for i in infos), infos
    t0, stop_wall = time.monotonic(), time.time()
    assert b.stop().get("stopped") is True
    job = b.wait_terminal(40)
    took = time.monotonic() - t0
    assert job["status"] == "STOPPED"
    # The controller was told, and drained for 1 s. On failure, say which part did not happen:
    # the driver seeing SIGTERM (its log line), the relay recording it, or the relay living that
    # long (its events, timed from the stop).
    if not b.find("_sigterm"):
        with open(b.events_path) as f:
            timed = [json.loads(line) for line in f if line.strip()]
        tail = "\n".join("%+.2f s %s" % (e["t"] - stop_wall, json.dumps(e["ev"])[:200]) for e in timed[-12:])
        logs = b.logs()
        brief = {k: job.get(k) for k in ("status", "message", "driver_exit_code")}
        raise AssertionError("the relay recorded no _sigterm; driver logged its SIGTERM: %s; job: %s\n"
                             "relay's last events (from the stop request):\n%s\ndriver log tail:\n%s"
                             % ("SIGTERM: giving the controller" in logs, brief, tail, logs[-3000:]))
    pids = [p for r in rs for p in (r["pid"], r["actor_pid"])] + helpers + [b.hello["pid"], relay]
    assert wait_gone(pids, timeout=10) == [], pids
    assert not set(pids) & set(cluster.pids())
    assert live_actors(cluster, "sluice:st-") == []     # none left in Ray either
    assert "killed 2 actor(s)" in b.logs()
    b.close_fifo()
    print("job stop -> STOPPED in %.2f s" % took)


def test_worker_node_death_reports_died(bridge, cluster):
    nodes = bridge.request({"op": "nodes"}, "nodes")["nodes"]
    worker = [n for n in nodes if n["node_ip"] == WORKER_IP and n["alive"]][0]
    bridge.send(create_cmd("sluice:w1", options={"num_cpus": 0.5, "node_id": worker["node_id"]}))
    w1 = bridge.wait("ready", name="sluice:w1", timeout=60)
    assert w1["node_id"] == worker["node_id"]
    t0 = time.monotonic()
    assert cluster.kill_raylet("worker")
    died = bridge.wait("died", name="sluice:w1", timeout=90)
    t_died = time.monotonic() - t0
    assert died["node_ip"] == WORKER_IP and died["message"]
    rem = bridge.wait("node_removed", node_id=worker["node_id"], timeout=60)
    assert rem["node_ip"] == WORKER_IP
    t_removed = time.monotonic() - t0
    # Its process went with the actor (the actor's worker exits when its raylet dies).
    assert wait_gone([w1["pid"], w1["actor_pid"]], timeout=30) == []
    assert not bridge.find("exited", name="sluice:w1")
    print("died after %.1f s, node_removed after %.1f s" % (t_died, t_removed))
    # The driver goes on. When the controller exits by itself (code 7), the driver
    # kills what is left and exits with the controller's code.
    last = bridge.request(create_cmd("sluice:last", "--helper"), "ready", timeout=60)
    helper = cluster.http_json("GET", "http://%s/" % last["addr"])[1]["helper_pid"]
    bridge.send("#exit 7")
    job = bridge.wait_terminal(30)
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 7, job
    # The driver sees the controller's stdout close or its exit first, whichever comes first.
    logs = bridge.logs()
    assert re.search(r"controller (exited|closed its stdout): killed 1 actor\(s\)", logs), logs
    assert wait_gone([last["pid"], last["actor_pid"], helper, bridge.hello["pid"]], timeout=10) == []
