"""The Ray driver's bookkeeping without a cluster: Ray's actor class is a stand-in, so each
interleaving of commands is reached on purpose rather than by timing."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from sluice_ray import driver  # noqa: E402


class _Handle:
    class _Id:
        def hex(self):
            return "a1"

    _actor_id = _Id()


class _HeldActorClass:
    """`.options(...).remote(...)` blocks until `release` is set, as Ray's registration of a
    named actor does for a moment."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def options(self, **_):
        return self

    def remote(self, *_):
        self.entered.set()
        assert self.release.wait(10)
        return _Handle()


def _driver():
    args, _ = driver.parse_args(["--namespace", "t", "--", "true"])
    d = driver.Driver(args, ["true"])
    d.events = []
    d.emit = d.events.append
    d.killed = []
    d._ray_options = lambda name, opts: ({}, {}, None, None)

    def kill_rec(rec, grace):
        rec.killing = True
        d.killed.append(rec.name)

    d._kill_rec = kill_rec
    return d


def test_a_kill_while_the_actor_registers_is_carried_out_once_it_has_registered(monkeypatch):
    import ray

    # No Ray here: a call that would start a local one (and leave ~/.ray/auth_token behind,
    # which the cluster tests' nodes then fail on) finds no actor instead.
    def no_actor(*_, **__):
        raise ValueError("no Ray in this test")

    monkeypatch.setattr(ray, "get_actor", no_actor)
    d = _driver()
    d.actor_cls = _HeldActorClass()
    create = {"op": "create", "id": 1, "name": "sluice:m:1:r-0", "argv": ["sluice", "replica"]}
    t = threading.Thread(target=d.op_create, args=(create,))
    t.start()
    assert d.actor_cls.entered.wait(10)
    d.op_kill({"op": "kill", "name": "sluice:m:1:r-0", "grace_s": 0})
    assert {"event": "killed", "id": None, "name": "sluice:m:1:r-0"} in d.events
    d.actor_cls.release.set()
    t.join(10)
    assert not t.is_alive()
    assert d.killed == ["sluice:m:1:r-0"], d.events
    assert "sluice:m:1:r-0" not in d.actors
    assert [e["event"] for e in d.events] == ["killed", "failed"], d.events


def test_max_replicas_per_node_fits_exactly_that_many_in_rays_units():
    """Each replica asks for 1/N of the group's per-node resource, rounded down to Ray's unit
    of 0.0001: N fit in the node's 1 and N + 1 do not, for every N the config takes (1/6 was
    sent as 0.1666…, which Ray rounds to 0.1667: six needed 1.0002 and only five ran)."""
    args, _ = driver.parse_args(["--namespace", "t", "--", "true"])
    d = driver.Driver(args, ["true"])
    for n in range(1, 101):
        options, _, _, _ = d._ray_options("sluice:x", {"group": "app/d", "max_replicas_per_node": n})
        (share,) = options["resources"].values()
        units = round(share * 10000)
        assert abs(share * 10000 - units) < 1e-6, (n, share)
        assert n * units <= 10000 < (n + 1) * units, (n, share)


def test_a_command_with_no_thread_to_run_on_is_answered_as_its_own_error(monkeypatch):
    """A thread that cannot start (a pids limit) fails that command by its op and name: an
    unattributed error left Rust counting the create as starting for good."""
    d = _driver()

    class NoThread:
        def __init__(self, *_, **__):
            pass

        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(driver.threading, "Thread", NoThread)
    d.handle_line('{"op": "create", "id": 3, "name": "sluice:m:1:r-0", "argv": ["sluice", "replica"]}')
    (e,) = d.events
    assert (e["event"], e["id"], e["op"], e["name"]) == ("error", 3, "create", "sluice:m:1:r-0"), e
    assert "can't start new thread" in e["message"], e


def test_a_kill_while_rays_control_store_cannot_be_asked_still_stops_the_process(monkeypatch):
    """An actor whose state Ray could not give (its control store restarting) is stopped with
    its drain: taken for dead, it was killed without stop(), and its process ran on."""
    import ray

    def unreachable(**_):
        raise ConnectionError("GCS unavailable")

    monkeypatch.setattr(ray._private.state, "actors", unreachable)
    monkeypatch.setattr(ray, "kill", lambda *_, **__: None)
    stopped = []

    class Stop:
        def remote(self, grace):
            stopped.append(grace)
            return "stop-ref"

    class Handle:
        stop = Stop()

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: None)
    d = _driver()
    d._wait_dead = lambda actor_id, timeout=5.0: None
    d._kill_handle(Handle(), "a1", 2.0)
    assert stopped == [2.0]


def test_the_death_watcher_outlives_a_failing_call(monkeypatch):
    """A call in the death watcher that raises (asking an actor to run again, under Ray's
    load) leaves the thread watching: it ended, and no exit was reported again."""
    import ray

    d = _driver()
    d.stopping = threading.Event()
    calls = []

    class Run:
        def remote(self, _wait):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("the first call fails")
            return "run-ref"

    class Handle(_Handle):
        run = Run()

    rec = driver.ActorRec("sluice:m:1:r-0", Handle(), "created")
    rec.run_ref = "run-ref"
    rec.retry_at = 1.0  # due: the watcher calls run() again, which fails once
    d.actors[rec.name] = rec
    monkeypatch.setattr(ray, "wait", lambda refs, **_: (list(refs), []))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: {"code": 3})
    exited = threading.Event()
    d._kill_rec = lambda rec, grace: None
    d.emit = lambda e: (d.events.append(e), e["event"] == "exited" and exited.set())
    t = threading.Thread(target=d._death_watcher, daemon=True)
    t.start()
    try:
        assert exited.wait(10), d.events
    finally:
        d.stopping.set()
        t.join(10)
    assert [e["event"] for e in d.events] == ["exited"], d.events
    assert d.events[0]["code"] == 3


def _host(monkeypatch, script):
    """A ProcessHost running `sh -c script`, outside any actor (no Ray started)."""
    import ray
    from sluice_ray import host

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")

    def no_context():
        raise RuntimeError("no Ray in this test")

    monkeypatch.setattr(ray, "get_runtime_context", no_context)
    return host.ProcessHost("sluice:t", ["/bin/sh", "-c", script], echo=False)


def test_a_process_that_exits_takes_its_group_with_it_and_is_never_signalled_after(monkeypatch, tmp_path):
    """The group of a process that exits on its own goes before the process is reaped (its
    helpers lived on until a stop), and stop() sends nothing after the reap: the group's id
    was then free, and SIGKILL to it could reach another replica's group."""
    import os
    import signal
    import time

    helper = tmp_path / "helper.pid"
    h = _host(monkeypatch, "sleep 60 & echo $! > %s; exit 3" % helper)
    assert h.run(30)["code"] == 3
    pid = int(helper.read_text())
    until = time.monotonic() + 10
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # A zombie of its own group is gone for this purpose too (or reaped meanwhile).
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except FileNotFoundError:
            break
        assert time.monotonic() < until, "the helper outlived its leader"
        time.sleep(0.05)
    sent = []
    monkeypatch.setattr(os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    h.stop(0)
    assert sent == [], "signalled a group whose leader was reaped: %r" % sent
    assert signal.SIGKILL not in [s for _, s in sent]
