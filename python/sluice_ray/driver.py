"""The Ray job driver that hosts the Sluice controller.

Run as the job's entrypoint, with the job's working_dir as cwd:

    python -m sluice_ray.driver [--namespace sluice] [--grace-s 10] -- ./sluice controller ...

It connects to Ray (``ray.init(address="auto")``: inside a job that is the job's
cluster), starts the controller (the argv after ``--``) as its child with
PR_SET_PDEATHSIG=SIGTERM and SIGTERM/SIGINT unblocked, and speaks JSON lines
with it:

* the child writes COMMANDS to its stdout, one JSON object per line;
* the driver writes EVENTS to the child's stdin, one JSON object per line;
* the child's stderr is inherited (it goes to the job log).

Commands: create, kill, nodes, list, shutdown. Events: hello, node_added,
node_removed, pending, ready, failed, killed, nodes, actors, exited, died,
error, shutdown. python/README.md gives every field.

One live driver holds a namespace: before it starts the controller it
creates ``sluice-owner``, a named, NON-detached actor (``host.NamespaceOwner``)
that Ray destroys with the driver's process. A driver that finds that name held
by a driver whose job is still running exits with an error (code 1) and never
starts its controller, so it touches none of the other instance's actors (see
``claim_namespace``).

Every other actor is a named ``ProcessHost`` (see host.py) in the namespace
given by --namespace, owned by this driver (not detached: should the driver die
before it kills them, Ray destroys them with it). The driver watches each actor's long-running ``run()``
call with ``ray.wait`` and reports ``exited`` (the child exited; the actor is
then released) or ``died`` (the actor died: its node was lost, or it was killed
from outside). Actors killed on purpose report only ``killed``.

When the child exits or closes its stdout, or sends ``shutdown``, the driver
kills every actor it created or adopted and exits with the child's exit code
(``os._exit``: a Python driver that exits normally after using Ray takes ~3 s).
On SIGTERM (Ray's job stop) it forwards SIGTERM to the child, gives it up to
--grace-s to drain (commands are still served meanwhile), then kills every
actor and exits. Ray SIGKILLs the job after RAY_JOB_STOP_WAIT_TIME_S (default
3 s): submit the job with that env var >= grace_s + kill_grace_s + 3, or the
driver shortens both graces to fit in Ray's window.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from . import PROTOCOL_VERSION
from . import host as _host

IMPLICIT_RESOURCE_PREFIX = "node:__internal_implicit_resource_"
HEAD_NODE_RESOURCE = "node:__internal_head__"
CREATE_OPTION_KEYS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type",
                      "max_replicas_per_node", "group", "node_id", "soft"}
RUN_MAX_WAIT_S = 60.0   # a run() call returns None after this; the watcher calls again
UNKNOWN = "UNKNOWN"   # an actor state Ray could not be asked for (see Driver._actor_state)
# The actor by which a running driver holds its namespace (non-detached: it dies with the
# driver's process, and Ray frees its name then). `list` never shows it, `kill` refuses it.
OWNER_NAME = "sluice-owner"
# A holder whose job has ended (its driver died) loses its name as soon as Ray processes the
# driver's death, well under a second; one still named after this long is killed, and the
# name taken.
OWNER_TAKEOVER_S = 5.0
OWNER_ANSWER_S = 2.0    # how long the holder may take to say who it is, for the error message
NAMESPACE_TAKEN_EXIT = 1


def _log(msg: str) -> None:
    try:
        sys.stderr.write("sluice_ray.driver: %s\n" % msg)
        sys.stderr.flush()
    except Exception:
        pass


def _num(v: Any, what: str, allow_none: bool = False, integer: bool = False) -> Optional[float]:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise ValueError("%s must be a number, got %r" % (what, v))
    if v < 0:
        raise ValueError("%s must be >= 0, got %r" % (what, v))
    if integer and int(v) != v:
        raise ValueError("%s must be an integer, got %r" % (what, v))
    return int(v) if integer else float(v)


def _fmt_res(res: Dict[str, float]) -> str:
    def f(x: float) -> str:
        return ("%d" % x) if float(x).is_integer() else ("%.4g" % x)
    items = []
    for k in sorted(res):
        if k.startswith("node:") and not k.startswith(IMPLICIT_RESOURCE_PREFIX):
            continue
        if k == "object_store_memory":
            continue
        v = res[k]
        if k == "memory":
            items.append("memory: %.0f MiB" % (v / 2 ** 20))
        else:
            items.append("%s: %s" % (k, f(v)))
    return "{" + ", ".join(items) + "}"


class ActorRec:
    """What the driver knows about one actor it created or adopted."""

    def __init__(self, name: str, handle, origin: str, cmd_id=None, demand=None, group=None,
                 node_pin=None):
        self.name = name
        self.handle = handle
        self.actor_id = handle._actor_id.hex()
        self.origin = origin              # "created" | "adopted"
        self.cmd_id = cmd_id
        self.demand: Dict[str, float] = demand or {}
        self.group = group
        self.node_pin = node_pin
        self.state = "starting"           # starting | ready
        self.info: Dict[str, Any] = {}
        self.run_ref = None
        self.retry_at = 0.0
        self.killing = False


class Driver:
    def __init__(self, args: argparse.Namespace, child_argv: List[str]):
        self.args = args
        self.child_argv = child_argv
        self.namespace = args.namespace
        self.lock = threading.RLock()
        self.actors: Dict[str, ActorRec] = {}
        # Names killed while their create was registering them with Ray (reserved, no handle
        # yet): the create kills the actor as soon as it has one.
        self.killed_reserved: set = set()
        self.emit_lock = threading.Lock()
        self.stdin_open = True
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.shutdown_requested = False
        self.stdout_eof = False
        self.sigterm_at: Optional[float] = None
        self.child: Optional[subprocess.Popen] = None
        self.actor_cls = None
        self.owner = None        # our NamespaceOwner handle: held for the driver's lifetime
        self.known_nodes: Dict[str, dict] = {}
        self._nodes_cache: Optional[Tuple[float, List[dict]]] = None

    # ------------------------------------------------------------------ I/O
    def emit(self, ev: Dict[str, Any]) -> None:
        data = (json.dumps(ev, separators=(",", ":"), default=str) + "\n").encode()
        with self.emit_lock:
            if not self.stdin_open or self.child is None or self.child.stdin is None:
                return
            try:
                self.child.stdin.write(data)
                self.child.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.stdin_open = False

    def error(self, cmd: Optional[dict], message: str) -> None:
        cmd = cmd if isinstance(cmd, dict) else {}
        name = cmd.get("name")
        self.emit({"event": "error", "id": cmd.get("id"), "op": cmd.get("op") if isinstance(cmd.get("op"), str) else None,
                   "name": name if isinstance(name, str) else None, "message": message})

    def _reader(self) -> None:
        assert self.child is not None and self.child.stdout is not None
        for raw in iter(self.child.stdout.readline, b""):
            try:
                self.handle_line(raw.decode("utf-8", "replace"))
            except Exception as e:  # never let a bad line kill the reader
                self.error(None, "internal error handling a command: %s" % e)
        self.stdout_eof = True
        self.wake.set()

    def handle_line(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        try:
            cmd = json.loads(line)
        except ValueError as e:
            self.error(None, "malformed command line (not JSON: %s): %.200s" % (e, line))
            return
        if not isinstance(cmd, dict):
            self.error(None, "malformed command line (not a JSON object): %.200s" % line)
            return
        op = cmd.get("op")
        handlers = {"create": self.op_create, "kill": self.op_kill, "nodes": self.op_nodes,
                    "list": self.op_list}
        if op == "shutdown":
            self.shutdown_requested = True
            self.wake.set()
            return
        fn = handlers.get(op) if isinstance(op, str) else None
        if fn is None:
            self.error(cmd, "unknown op %r (expected create, kill, nodes, list or shutdown)" % (op,))
            return
        try:
            threading.Thread(target=self._guard, args=(fn, cmd), name="sluice-%s" % op, daemon=True).start()
        except RuntimeError as e:  # no thread to be had (a pids limit): the command's own error
            self.error(cmd, "cannot start a thread for %s: %s" % (op, e))

    def _guard(self, fn, cmd: dict) -> None:
        try:
            fn(cmd)
        except ValueError as e:
            self.error(cmd, str(e))
        except Exception as e:
            _log("error in %s: %s" % (cmd.get("op"), traceback.format_exc()))
            self.error(cmd, "%s: %s" % (type(e).__name__, e))

    # ------------------------------------------------------------ Ray helpers
    def _actor_state(self, actor_id: str) -> Optional[str]:
        """Ray's state of the actor; None where Ray knows no such actor, UNKNOWN where it
        could not be asked (its control store restarting): never taken for dead."""
        import ray
        try:
            info = ray._private.state.actors(actor_id=actor_id)
            return info.get("State") if info else None
        except Exception:
            return UNKNOWN

    def _wait_dead(self, actor_id: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._actor_state(actor_id) in ("DEAD", None):
                return
            time.sleep(0.1)

    def node_list(self, max_age_s: float = 0.0) -> List[dict]:
        """Every node Ray knows (dead ones too, alive=False). With max_age_s, a
        list fetched that recently is reused."""
        with self.lock:
            cached = self._nodes_cache
        if max_age_s > 0 and cached and time.monotonic() - cached[0] <= max_age_s:
            return [dict(n) for n in cached[1]]
        out = self._fetch_nodes()
        with self.lock:
            self._nodes_cache = (time.monotonic(), out)
        return [dict(n) for n in out]

    def _fetch_nodes(self) -> List[dict]:
        import ray
        try:
            avail = ray._private.state.available_resources_per_node()
        except Exception:
            avail = {}
        out = []
        for n in ray.nodes():
            nid = n.get("NodeID")
            total = dict(n.get("Resources") or {})
            out.append({
                "node_id": nid,
                "node_ip": n.get("NodeManagerAddress"),
                "alive": bool(n.get("Alive")),
                "is_head": bool(n.get("IsHead")) or HEAD_NODE_RESOURCE in total,
                "resources_total": total,
                "resources_available": dict(avail.get(nid, {})) if n.get("Alive") else {},
            })
        return out

    # ------------------------------------------------------------ create
    def _parse_create(self, cmd: dict) -> Tuple[str, List[str], Dict[str, str], dict, float]:
        name = cmd.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("create: 'name' must be a non-empty string")
        if name == OWNER_NAME:
            raise ValueError("create: the name %r is reserved (the driver holds the namespace with it)" % name)
        argv = cmd.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("create %s: 'argv' must be a non-empty list of strings" % name)
        env = cmd.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                for k, v in env.items()):
            raise ValueError("create %s: 'env' must be an object of string values" % name)
        env = {k: str(v) for k, v in env.items()}
        opts = cmd.get("options") or {}
        if not isinstance(opts, dict):
            raise ValueError("create %s: 'options' must be an object" % name)
        unknown = set(opts) - CREATE_OPTION_KEYS
        if unknown:
            raise ValueError("create %s: unknown option(s) %s (known: %s)" % (
                name, ", ".join(sorted(unknown)), ", ".join(sorted(CREATE_OPTION_KEYS))))
        timeout = cmd.get("startup_timeout_s", 120)
        timeout = _num(timeout, "startup_timeout_s")
        return name, argv, env, opts, timeout

    def _ray_options(self, name: str, opts: dict) -> Tuple[dict, Dict[str, float], Optional[str], Optional[str]]:
        """Maps the protocol's options onto .options(...). Returns (options, demand, group, pin)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        num_cpus = _num(opts.get("num_cpus", 1.0), "options.num_cpus")
        num_gpus = _num(opts.get("num_gpus", 0.0), "options.num_gpus")
        memory = _num(opts.get("memory"), "options.memory", allow_none=True, integer=True)
        resources = opts.get("resources") or {}
        if not isinstance(resources, dict):
            raise ValueError("create %s: options.resources must be an object" % name)
        resources = {str(k): _num(v, "options.resources[%s]" % k) for k, v in resources.items()}
        for k in resources:
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError("create %s: options.resources may not name %s (use num_cpus/num_gpus/memory)" % (name, k))
        accel = opts.get("accelerator_type")
        if accel is not None and (not isinstance(accel, str) or not accel):
            raise ValueError("create %s: options.accelerator_type must be a string or null" % name)
        mrpn = _num(opts.get("max_replicas_per_node"), "options.max_replicas_per_node", allow_none=True, integer=True)
        group = opts.get("group")
        if group is not None and not isinstance(group, str):
            raise ValueError("create %s: options.group must be a string" % name)
        if mrpn is not None and mrpn > 0:
            if not group:
                raise ValueError("create %s: options.max_replicas_per_node needs options.group "
                                 "(the set of actors the limit counts, e.g. app/deployment)" % name)
            # As Ray Serve does: an implicit per-node resource of which every node has 1, each
            # replica asking for 1/N of it, rounded down to Ray's unit of 0.0001 (Ray rounds an
            # amount to the nearest unit: six of 1/6 = 0.1667 needed 1.0002, and one of six
            # replicas per node never fitted). Exact for N up to 100, the most the config takes.
            resources[IMPLICIT_RESOURCE_PREFIX + group] = math.floor(10000 / mrpn) / 10000
        node_id = opts.get("node_id")
        if node_id is not None and (not isinstance(node_id, str) or not node_id):
            raise ValueError("create %s: options.node_id must be a node id string or null" % name)
        soft = bool(opts.get("soft", False))
        o: Dict[str, Any] = {
            # Owned by this driver (not detached): Ray destroys them if the driver dies
            # without killing them (SIGKILL after Ray's stop window, the OOM killer).
            "name": name, "namespace": self.namespace, "lifetime": "non_detached",
            "max_restarts": 0, "max_task_retries": 0,
            "max_concurrency": self.args.max_concurrency,
            "num_cpus": num_cpus, "num_gpus": num_gpus,
        }
        if resources:
            o["resources"] = resources
        if memory is not None:
            o["memory"] = memory
        if accel:
            o["accelerator_type"] = accel
        if node_id:
            o["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)
        else:
            o["scheduling_strategy"] = "SPREAD"   # Ray Serve's default
        demand = {"CPU": num_cpus, "GPU": num_gpus}
        demand.update(resources)
        if memory:
            demand["memory"] = float(memory)
        if accel:
            demand["accelerator_type:" + accel] = 0.001
        demand = {k: v for k, v in demand.items() if v > 0}
        return o, demand, group, node_id

    def _pending_reason(self, rec: ActorRec, state: Optional[str]) -> Tuple[str, str]:
        """(kind, reason): kind is infeasible | resources | starting."""
        nodes = [n for n in self.node_list(max_age_s=1.0) if n["alive"]]
        if rec.node_pin:
            nodes = [n for n in nodes if n["node_id"] == rec.node_pin]
            if not nodes:
                return "infeasible", "pinned to node %s, which is not alive" % rec.node_pin
        need = rec.demand

        def short(have: Dict[str, float]) -> List[str]:
            return [k for k, v in need.items()
                    if have.get(k, 1.0 if k.startswith(IMPLICIT_RESOURCE_PREFIX) else 0.0) + 1e-9 < v]

        # Ray does not report how much of an implicit (max_replicas_per_node)
        # resource is in use: count it from the actors this driver manages.
        implicit = {k: v for k, v in need.items() if k.startswith(IMPLICIT_RESOURCE_PREFIX)}
        if implicit:
            with self.lock:
                others = [r for r in self.actors.values() if r is not None and r is not rec]
            for n in nodes:
                avail = dict(n["resources_available"])
                for k in implicit:
                    used = sum(r.demand.get(k, 0.0) for r in others if r.info.get("node_id") == n["node_id"])
                    avail[k] = max(0.0, 1.0 - used)
                n["resources_available"] = avail

        feasible = [n for n in nodes if not short(n["resources_total"])]
        if not feasible:
            desc = "; ".join("%s has %s" % (n["node_ip"], _fmt_res(n["resources_total"])) for n in nodes)
            return "infeasible", "no alive node has %s in total (%s)" % (_fmt_res(need), desc or "no alive nodes")
        lacks = []
        for n in feasible:
            s = short(n["resources_available"])
            if not s:
                return "starting", ("resources %s are free on %s; actor state %s: waiting for a worker "
                                    "process or its runtime_env" % (_fmt_res(need), n["node_ip"], state))
            parts = []
            for k in s:
                if k.startswith(IMPLICIT_RESOURCE_PREFIX):
                    parts.append("room under max_replicas_per_node=%d for group %r" % (
                        round(1.0 / need[k]), k[len(IMPLICIT_RESOURCE_PREFIX):]))
                else:
                    parts.append("%s (%g of %g free)" % (k, n["resources_available"].get(k, 0.0), need[k]))
            lacks.append("%s lacks %s" % (n["node_ip"], ", ".join(parts)))
        return "resources", "waiting for free resources %s: %s" % (_fmt_res(need), "; ".join(lacks))

    def op_create(self, cmd: dict) -> None:
        import ray
        cid = cmd.get("id")
        name, argv, env, opts, timeout = self._parse_create(cmd)
        ray_opts, demand, group, pin = self._ray_options(name, opts)
        with self.lock:
            if name in self.actors:
                raise ValueError("create: an actor named %r is already managed by this driver (kill it first)" % name)
            if self.stopping.is_set():
                raise ValueError("create %s: the driver is shutting down" % name)
            self.actors[name] = None  # reserve the name
        try:
            handle = self.actor_cls.options(**ray_opts).remote(
                name, argv, env, self.args.log_lines, not self.args.no_echo,
                {"group": group, "demand": demand, "node_pin": pin})
        except Exception as e:
            with self.lock:
                self.actors.pop(name, None)
                self.killed_reserved.discard(name)
            raise ValueError("create %s: %s" % (name, e))
        rec = ActorRec(name, handle, "created", cmd_id=cid, demand=demand, group=group, node_pin=pin)
        with self.lock:
            self.actors[name] = rec
            late = self.stopping.is_set()   # kill_all may have run without it
            killed = name in self.killed_reserved
            self.killed_reserved.discard(name)
        if killed:
            # Its kill came while Ray registered it (and was answered): it is not left to run,
            # wait for resources, or bring the autoscaler a node for it.
            self._kill_rec(rec, 0.0)
            self._drop(rec)
            self.emit({"event": "failed", "id": cid, "name": name, "node_ip": None,
                       "message": "killed while starting", "log_tail": ""})
            return
        if late:
            self._kill_rec(rec, 0.0)
            self._drop(rec)
            self.emit({"event": "failed", "id": cid, "name": name, "node_ip": None,
                       "message": "the driver is shutting down", "log_tail": ""})
            return
        ready_ref = handle.wait_ready.remote(timeout)
        t0 = time.monotonic()
        alive_since: Optional[float] = None
        last_pending: Optional[float] = None
        next_check = 0.0
        while True:
            done, _ = ray.wait([ready_ref], timeout=0.5)
            if done:
                break
            if rec.killing:
                # A kill for it is under way; it answers the kill, we answer the create.
                self.emit({"event": "failed", "id": cid, "name": name, "node_ip": rec.info.get("node_ip"),
                           "message": "killed while starting", "log_tail": ""})
                return
            now = time.monotonic()
            state = self._actor_state(rec.actor_id)
            if state == "ALIVE":
                alive_since = alive_since or now
                if now - alive_since > timeout + 30:   # the actor does not answer at all
                    self._kill_rec(rec, 0.0)
                    self._drop(rec)
                    self.emit({"event": "failed", "id": cid, "name": name, "node_ip": None,
                               "message": "the actor did not answer within %.0f s" % (timeout + 30), "log_tail": ""})
                    return
            elif state == "DEAD":
                break  # ray.get below raises the reason
            elif now - t0 >= self.args.pending_after_s and now >= next_check and (
                    last_pending is None or now - last_pending >= self.args.pending_every_s):
                next_check = now + 1.0
                try:
                    kind, reason = self._pending_reason(rec, state)
                except Exception as e:
                    kind, reason = "unknown", "actor state %s (%s)" % (state, e)
                # Free resources but no actor yet: a worker process or the runtime_env
                # is still starting; worth a word only when it takes long.
                if kind != "starting" or now - t0 >= self.args.pending_every_s:
                    last_pending = now
                    self.emit({"event": "pending", "id": cid, "name": name, "kind": kind, "reason": reason,
                               "state": state, "waited_s": round(now - t0, 1)})
        try:
            r = ray.get(ready_ref, timeout=60)
        except Exception as e:
            killed = rec.killing
            if not killed and self._actor_state(rec.actor_id) != "DEAD":
                # Unreachable for a moment (its node's network), not dead: a detached actor
                # left alive here would finish loading and hold its resources unseen, while a
                # replacement starts. Killed before it is forgotten.
                self._kill_rec(rec, 0.0)
            self._drop(rec)
            self.emit({"event": "failed", "id": cid, "name": name, "node_ip": rec.info.get("node_ip"),
                       "message": "killed while starting" if killed else "actor died while starting: %s" % _short_err(e),
                       "log_tail": ""})
            return
        rec.info = {k: r.get(k) for k in ("node_id", "node_ip", "pid", "actor_pid", "addr")}
        if not r.get("ok"):
            self._kill_rec(rec, 0.0)
            self._drop(rec)
            self.emit({"event": "failed", "id": cid, "name": name, "node_ip": r.get("node_ip"),
                       "message": r.get("message", "failed"), "log_tail": r.get("log_tail", "")})
            return
        with self.lock:
            if not rec.killing:
                rec.state = "ready"
                rec.run_ref = handle.run.remote(RUN_MAX_WAIT_S)
                # Under the lock: no exited/died for it can be emitted before this.
                self.emit(dict({"event": "ready", "id": cid, "name": name}, **rec.info))
                return
        self.emit({"event": "failed", "id": cid, "name": name, "node_ip": rec.info.get("node_ip"),
                   "message": "killed while starting", "log_tail": ""})

    def _drop(self, rec: ActorRec) -> None:
        with self.lock:
            if self.actors.get(rec.name) is rec:
                del self.actors[rec.name]

    # ------------------------------------------------------------ kill
    def _kill_rec(self, rec: ActorRec, grace: float) -> None:
        """Stops the child (TERM the group, grace, KILL), then ray.kill, then waits
        until the GCS reports the actor DEAD (so its resources are free)."""
        rec.killing = True
        self._kill_handle(rec.handle, rec.actor_id, grace)

    def _kill_handle(self, handle, actor_id: str, grace: float) -> None:
        import ray
        # One whose state could not be read may be alive: stopped too (a kill during a
        # control-store restart skipped the drain and left its process running).
        if self._actor_state(actor_id) in ("ALIVE", UNKNOWN):
            try:
                # stop() takes `grace`, then kills the group; a node that does not answer
                # (partitioned, still ALIVE to the GCS) must not hold ray.kill past Ray's
                # stop window.
                ray.get(handle.stop.remote(grace), timeout=grace + 2.0)
            except Exception as e:
                _log("stop(%s) failed: %s" % (actor_id, _short_err(e)))
        try:
            ray.kill(handle, no_restart=True)
        except Exception as e:
            _log("ray.kill(%s) failed: %s" % (actor_id, _short_err(e)))
        self._wait_dead(actor_id)

    def op_kill(self, cmd: dict) -> None:
        import ray
        name = cmd.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("kill: 'name' must be a non-empty string")
        if name == OWNER_NAME:
            raise ValueError("kill: %r is how the driver holds the namespace, not a replica or proxy" % name)
        grace = _num(cmd.get("grace_s", 5.0), "grace_s")
        with self.lock:
            reserved = name in self.actors and self.actors[name] is None
            if reserved:
                self.killed_reserved.add(name)
            rec = self.actors.get(name)
            if rec is not None:
                rec.killing = True
        if reserved:
            pass  # its create kills it once Ray has registered it
        elif rec is not None:
            self._kill_rec(rec, grace)
            self._drop(rec)
        else:
            try:
                handle = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                handle = None
            if handle is not None:
                self._kill_handle(handle, handle._actor_id.hex(), grace)
        self.emit({"event": "killed", "id": cmd.get("id"), "name": name})

    # ------------------------------------------------------------ nodes, list
    def op_nodes(self, cmd: dict) -> None:
        self.emit({"event": "nodes", "id": cmd.get("id"), "nodes": self.node_list()})

    def op_list(self, cmd: dict) -> None:
        """The live named actors of the namespace whose name starts with prefix.
        Those this driver does not manage yet are adopted: watched like its own
        and killed at shutdown. The namespace's OWNER_NAME (this driver's, or
        nobody's) is never listed. state: ready (LISTEN seen), starting (process
        running, no LISTEN yet), pending (actor not placed yet) or unreachable
        (placed, but did not answer within 10 s)."""
        import ray
        prefix = cmd.get("prefix", "")
        if not isinstance(prefix, str):
            raise ValueError("list: 'prefix' must be a string")
        names = sorted(n for n in ray.util.list_named_actors(all_namespaces=False)
                       if n.startswith(prefix) and n != OWNER_NAME)
        fields = ("node_id", "node_ip", "pid", "actor_pid", "addr")
        out: Dict[str, dict] = {}
        handles, refs = {}, {}
        for n in names:
            with self.lock:
                rec = self.actors.get(n)
            if rec is not None:   # ours already
                e = {"name": n, "state": "ready" if rec.state == "ready" else "pending"}
                e.update({k: rec.info.get(k) for k in fields})
                out[n] = e
                continue
            try:
                handles[n] = ray.get_actor(n, namespace=self.namespace)
            except ValueError:
                continue  # gone meanwhile
            st = self._actor_state(handles[n]._actor_id.hex())
            if st == "DEAD":
                continue
            if st == "ALIVE":
                refs[n] = handles[n].info.remote()
            else:
                out[n] = dict({"name": n, "state": "pending"}, **{k: None for k in fields})
        if refs:
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=10.0)
        infos: Dict[str, dict] = {}
        for n, ref in refs.items():
            try:
                info = ray.get(ref, timeout=0.1)
            except Exception:
                out[n] = dict({"name": n, "state": "unreachable"}, **{k: None for k in fields})
                continue
            if info.get("exited") or info.get("pid") is None:
                # A host whose process is gone is of no use to anyone: release it.
                threading.Thread(target=self._kill_handle, args=(handles[n], handles[n]._actor_id.hex(), 0.0),
                                 daemon=True).start()
                continue
            infos[n] = info
            out[n] = dict({"name": n, "state": "ready" if info.get("addr") else "starting"},
                          **{k: info.get(k) for k in fields})
        with self.lock:
            for n, h in handles.items():
                if n not in out or n in self.actors or self.stopping.is_set():
                    continue
                meta = infos.get(n, {}).get("meta") or {}
                rec = ActorRec(n, h, "adopted", demand=meta.get("demand"), group=meta.get("group"),
                               node_pin=meta.get("node_pin"))
                rec.state = "ready"
                rec.info = {k: out[n][k] for k in fields}
                rec.run_ref = h.run.remote(RUN_MAX_WAIT_S)
                self.actors[n] = rec
        self.emit({"event": "actors", "id": cmd.get("id"), "actors": [out[n] for n in sorted(out)]})

    # ------------------------------------------------------------ watchers
    def _death_watcher(self) -> None:
        import ray
        from ray.exceptions import RayActorError
        try:
            from ray.exceptions import ActorUnavailableError
        except ImportError:  # Ray before 2.11: an unreachable actor is reported as dead
            class ActorUnavailableError(Exception):  # type: ignore[no-redef]
                pass
        while not self.stopping.is_set():
            # Nothing it calls may end the thread: no exit or death would be reported
            # again, and a process that exited would hold its resources unseen.
            try:
                now = time.monotonic()
                with self.lock:
                    recs = [r for r in self.actors.values()
                            if r is not None and r.run_ref is not None and not r.killing]
                    for r in recs:
                        if r.retry_at and now >= r.retry_at:
                            r.retry_at = 0.0
                            r.run_ref = r.handle.run.remote(RUN_MAX_WAIT_S)
                    watch = {r.run_ref: r for r in recs if not r.retry_at}
                if not watch:
                    self.stopping.wait(0.25)
                    continue
                try:
                    done, _ = ray.wait(list(watch), num_returns=len(watch), timeout=0.5, fetch_local=True)
                except Exception as e:
                    _log("ray.wait failed: %s" % _short_err(e))
                    self.stopping.wait(0.5)
                    continue
                for ref in done:
                    rec = watch[ref]
                    try:
                        res = ray.get(ref)
                    except ActorUnavailableError:
                        # Temporarily unreachable (e.g. its node is failing): ask again
                        # until Ray says it is dead or it answers.
                        with self.lock:
                            rec.retry_at = time.monotonic() + 1.0
                        continue
                    except RayActorError as e:
                        if rec.killing:
                            continue
                        self._drop(rec)
                        self.emit({"event": "died", "name": rec.name, "node_id": rec.info.get("node_id"),
                                   "node_ip": rec.info.get("node_ip"), "message": _short_err(e)})
                        continue
                    except Exception as e:
                        _log("run(%s) raised: %s" % (rec.name, _short_err(e)))
                        with self.lock:
                            rec.retry_at = time.monotonic() + 1.0
                        continue
                    if res is None:  # still running after RUN_MAX_WAIT_S: call again
                        with self.lock:
                            if not rec.killing:
                                rec.run_ref = rec.handle.run.remote(RUN_MAX_WAIT_S)
                        continue
                    if rec.killing or res.get("stopped"):
                        continue
                    threading.Thread(target=self._on_exited, args=(rec, res), daemon=True).start()
            except Exception:
                _log("death watcher: %s" % traceback.format_exc())
                self.stopping.wait(0.5)

    def _on_exited(self, rec: ActorRec, res: dict) -> None:
        with self.lock:
            if rec.killing:
                return
            rec.killing = True   # releasing it ourselves: no "died" for it
        self._kill_rec(rec, 0.0)
        self._drop(rec)
        self.emit({"event": "exited", "name": rec.name, "code": res.get("code"), "signal": res.get("signal"),
                   "node_id": rec.info.get("node_id"), "node_ip": rec.info.get("node_ip"),
                   "log_tail": res.get("log_tail", "")})

    @staticmethod
    def _node_event(kind: str, n: dict) -> dict:
        ev = {"event": kind}
        ev.update(n)
        return ev

    def _node_watcher(self) -> None:
        while not self.stopping.is_set():
            try:
                nodes = {n["node_id"]: n for n in self.node_list() if n["alive"]}
            except Exception as e:
                _log("node poll failed: %s" % _short_err(e))
                nodes = None
            if nodes is not None:
                for nid, n in nodes.items():
                    if nid not in self.known_nodes:
                        self.emit(self._node_event("node_added", n))
                for nid, n in list(self.known_nodes.items()):
                    if nid not in nodes:
                        self.emit({"event": "node_removed", "node_id": nid, "node_ip": n["node_ip"]})
                self.known_nodes = nodes
            self.stopping.wait(self.args.node_poll_s)

    # ------------------------------------------------------------ lifecycle
    def kill_all(self, grace: float) -> List[str]:
        with self.lock:
            recs = [r for r in self.actors.values() if r is not None]
            for r in recs:
                r.killing = True
        threads = []
        for r in recs:
            t = threading.Thread(target=self._kill_rec, args=(r, grace), daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + grace + 20.0
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self.lock:
            for r in recs:
                if self.actors.get(r.name) is r:
                    del self.actors[r.name]
        return [r.name for r in recs]

    # ------------------------------------------------------------ the namespace
    def claim_namespace(self) -> Optional[str]:
        """Holds the namespace for as long as this driver lives, or says why not.

        Creates OWNER_NAME, a named actor that is NOT detached: this driver owns
        it, and Ray destroys an owned actor, and frees its name, when its owner's
        process dies (crash and SIGKILL included). Ray registers an actor's name
        atomically (a second registration of a held name fails), so at most one
        live driver holds the namespace. Returns None once it is ours.

        When the name is held: by a driver whose job is still running (or whose
        job Ray does not know), returns the error to report; this driver then
        exits without starting its controller, so it touches none of that
        instance's actors. By a driver whose job has ended (it died, and Ray is
        still releasing the name), waits up to OWNER_TAKEOVER_S for the name to
        come free, then kills the holder and takes it. The detached actors such a
        dead run left are then adopted or killed through `list`, as before."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        ctx = ray.get_runtime_context()
        holder_info = {"namespace": self.namespace, "job_id": ctx.get_job_id(),
                       "submission_id": self.submission_id(), "pid": os.getpid(),
                       "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                       "started_at": time.time()}
        owner_cls = ray.remote(_host.NamespaceOwner)
        # Restarted if its worker alone dies (the name stays reserved meanwhile); it dies with
        # this driver whatever its restarts, as every non-detached actor dies with its owner.
        opts = {"name": OWNER_NAME, "namespace": self.namespace, "lifetime": "non_detached",
                "num_cpus": 0, "max_restarts": -1, "max_task_retries": 0,
                # Next to the driver: its worker starts where the job's runtime_env is ready.
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=ctx.get_node_id(), soft=True)}
        stale_since: Optional[float] = None
        free_misses = 0
        give_up = time.monotonic() + OWNER_TAKEOVER_S + 30.0
        while True:
            try:
                # Named actors register with the GCS synchronously: this raises
                # (ActorAlreadyExistsError) when the name is held.
                self.owner = owner_cls.options(**opts).remote(holder_info)
                return None
            except Exception as e:
                create_error = e
            try:
                holder = ray.get_actor(OWNER_NAME, namespace=self.namespace)
            except ValueError:
                holder = None
            if holder is None:
                # Freed between our attempt and the look-up: try again. A create that
                # fails while the name is free is another error.
                free_misses += 1
                if free_misses > 20:
                    raise RuntimeError("cannot create %s in namespace %r: %s"
                                       % (OWNER_NAME, self.namespace, _short_err(create_error)))
                time.sleep(0.1)
                continue
            job = self._holder_job(holder)
            if job["job_id"] and job["job_id"] == ctx.get_job_id():
                # Ours: a create that registered the name and then raised.
                self.owner = holder
                return None
            now = time.monotonic()
            if job["dead"] is not True:
                info = self._holder_info(holder)
                # A holder that answers runs: refused at once. One that does not (its driver's
                # node may be dying, and Ray has not noticed yet; or the job table could not
                # be read) is asked again until give_up, then refused: never taken over
                # while it may be alive.
                if info is not None or now > give_up:
                    return self._refusal(holder, job, info or {})
                time.sleep(0.5)
                continue
            stale_since = stale_since or now
            if now - stale_since >= OWNER_TAKEOVER_S:
                _log("namespace %r: the %s of job %s, which has ended, still holds the name after %.0f s; "
                     "killing it" % (self.namespace, OWNER_NAME, job["job_id"], now - stale_since))
                try:
                    ray.kill(holder, no_restart=True)
                except Exception as e:
                    _log("ray.kill(%s) failed: %s" % (OWNER_NAME, _short_err(e)))
            if now > give_up:
                raise RuntimeError("namespace %r: the %s of ended job %s does not go away"
                                   % (self.namespace, OWNER_NAME, job["job_id"]))
            time.sleep(0.25)

    @staticmethod
    def _holder_job(holder) -> Dict[str, Any]:
        """The job of the actor holding OWNER_NAME, from the GCS: its id, and
        whether it has ended (dead: True/False, None when Ray does not say)."""
        import ray
        out: Dict[str, Any] = {"job_id": None, "dead": None, "driver_ip": None, "driver_pid": None,
                               "start_ms": None}
        aid = holder._actor_id
        try:
            out["job_id"] = aid.job_id.hex()        # an actor id embeds its job's id
        except Exception:
            pass
        try:
            a = ray._private.state.actors(actor_id=aid.hex())
            out["job_id"] = a.get("JobID") or out["job_id"]
        except Exception:
            pass
        try:
            for j in ray._private.state.jobs():
                if out["job_id"] and j.get("JobID") == out["job_id"]:
                    out.update(dead=bool(j.get("IsDead")), driver_ip=j.get("DriverIPAddress") or None,
                               driver_pid=j.get("DriverPid") or None, start_ms=j.get("StartTime") or None)
        except Exception as e:
            _log("cannot read Ray's job table: %s" % _short_err(e))
        return out

    @staticmethod
    def _holder_info(holder) -> Optional[Dict[str, Any]]:
        """What the holder says of itself, or None when it does not answer in
        OWNER_ANSWER_S (starting, restarting, or its process or node is gone)."""
        import ray
        try:
            return ray.get(holder.info.remote(), timeout=OWNER_ANSWER_S) or {}
        except Exception:
            return None

    def _refusal(self, holder, job: Dict[str, Any], info: Dict[str, Any]) -> str:
        """The error for a namespace another live driver holds, naming it (from what
        it said of itself, else from the job table)."""
        parts = ["job %s" % (info.get("job_id") or job.get("job_id") or "?")]
        if info.get("submission_id"):
            parts.append("submission %s" % info["submission_id"])
        pid, ip = info.get("pid") or job.get("driver_pid"), info.get("node_ip") or job.get("driver_ip")
        if pid:
            parts.append("driver pid %s%s" % (pid, " on %s" % ip if ip else ""))
        started = info.get("started_at") or (job["start_ms"] / 1000.0 if job.get("start_ms") else None)
        if started:
            parts.append("started %s" % time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)))
        return ("Ray namespace `%s` is already used by another running Sluice instance (%s); "
                "give this one its own `cluster.ray.namespace` (driver option --namespace), "
                "or stop the other one first" % (self.namespace, ", ".join(parts)))

    def _on_sigterm(self, signum, frame) -> None:
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
        self.wake.set()

    @staticmethod
    def submission_id() -> Optional[str]:
        sid = os.environ.get("RAY_JOB_SUBMISSION_ID")
        if sid:
            return sid
        try:  # Ray 2.60 passes it in the job config's metadata
            cfg = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
            return (cfg.get("metadata") or {}).get("job_submission_id") or None
        except ValueError:
            return None

    def _budget(self) -> Tuple[float, float]:
        """(child drain time, actor kill grace) after SIGTERM, fitted into Ray's
        RAY_JOB_STOP_WAIT_TIME_S when running as a submitted job."""
        grace, kgrace = self.args.grace_s, self.args.kill_grace_s
        if not self.submission_id():
            return grace, kgrace
        try:
            window = float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3"))
        except ValueError:
            window = 3.0
        budget = window - 1.0               # margin for ray.kill and os._exit
        if grace + kgrace + 1.5 <= budget:
            return grace, kgrace
        child = min(grace, max(0.5, budget - kgrace - 1.5))
        kg = min(kgrace, max(0.2, budget - child - 1.5))
        return child, kg

    def run(self) -> int:
        import ray
        a = self.args
        ray.init(address=a.address or "auto", namespace=self.namespace,
                 log_to_driver=not a.no_actor_logs, configure_logging=True, logging_level="WARNING")
        # Pickle the host class by value: workers need not import sluice_ray.
        try:
            ray.cloudpickle.register_pickle_by_value(_host)
        except Exception as e:
            _log("register_pickle_by_value failed (%s); workers must import sluice_ray" % e)
        self.actor_cls = ray.remote(_host.ProcessHost)
        # Before anything can list, adopt or kill actors of the namespace: hold it.
        refused = self.claim_namespace()
        if refused is not None:
            _log("error: %s" % refused)
            sys.stderr.flush()
            return NAMESPACE_TAKEN_EXIT
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)
        env = dict(os.environ)
        env["SLUICE_RAY_PROTOCOL"] = str(PROTOCOL_VERSION)
        env["SLUICE_RAY_NAMESPACE"] = self.namespace
        try:
            self.child = subprocess.Popen(self.child_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=None, env=env, preexec_fn=_host.preexec(), close_fds=True)
        except OSError as e:
            _log("cannot start the controller %r: %s" % (self.child_argv, e))
            os._exit(127)
        ctx = ray.get_runtime_context()
        self.emit({"event": "hello", "protocol": PROTOCOL_VERSION, "ray_version": ray.__version__,
                   "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                   "namespace": self.namespace, "job_id": ctx.get_job_id(),
                   "submission_id": self.submission_id(), "pid": os.getpid()})
        for target, nm in ((self._node_watcher, "sluice-nodes"), (self._death_watcher, "sluice-deaths"),
                           (self._reader, "sluice-reader")):
            threading.Thread(target=target, name=nm, daemon=True).start()

        term_deadline: Optional[float] = None
        kill_grace = a.kill_grace_s
        while True:
            if self.sigterm_at is not None and term_deadline is None:
                child_wait, kill_grace = self._budget()
                _log("SIGTERM: giving the controller %.1f s, then killing actors (grace %.1f s)" % (child_wait, kill_grace))
                try:
                    self.child.send_signal(signal.SIGTERM)
                except Exception:
                    pass
                term_deadline = self.sigterm_at + child_wait
            if self.child.poll() is not None or self.stdout_eof or self.shutdown_requested:
                break
            if term_deadline is not None and time.monotonic() >= term_deadline:
                break
            self.wake.wait(0.2)
            self.wake.clear()

        why = ("shutdown command" if self.shutdown_requested else "SIGTERM" if self.sigterm_at is not None
               else "controller exited" if self.child.poll() is not None else "controller closed its stdout")
        with self.lock:
            self.stopping.set()
        killed = self.kill_all(kill_grace)
        _log("%s: killed %d actor(s)" % (why, len(killed)))
        if self.shutdown_requested:
            self.emit({"event": "shutdown", "killed": sorted(killed)})
        with self.emit_lock:
            self.stdin_open = False
            try:
                self.child.stdin.close()
            except Exception:
                pass
        # Let the controller finish on its own, then make sure it is gone.
        wait = 2.0 if self.sigterm_at is not None else a.grace_s
        try:
            rc = self.child.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.child.send_signal(signal.SIGTERM)
            try:
                rc = self.child.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                self.child.kill()
                rc = self.child.wait()
        code = _host.exit_fields(rc)["code"] or 0
        _log("exiting with code %d" % code)
        sys.stderr.flush()
        return code


def _short_err(e: BaseException, limit: int = 1500) -> str:
    s = "%s: %s" % (type(e).__name__, e)
    return s if len(s) <= limit else s[:limit] + "..."


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    if "--" not in argv:
        own, child = argv, []
    else:
        i = argv.index("--")
        own, child = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m sluice_ray.driver",
                                 description="Hosts the Sluice controller in a Ray job (JSON lines on its stdio).",
                                 usage="%(prog)s [options] -- <controller argv...>")
    ap.add_argument("--namespace", default="sluice", help="Ray namespace of the actors (default: sluice)")
    ap.add_argument("--address", default=None, help="Ray address (default: auto, i.e. the job's cluster)")
    ap.add_argument("--grace-s", type=float, default=10.0,
                    help="on SIGTERM, how long the controller may drain before actors are killed (default 10)")
    ap.add_argument("--kill-grace-s", type=float, default=5.0,
                    help="SIGTERM-to-SIGKILL grace for each actor's process at shutdown (default 5)")
    ap.add_argument("--log-lines", type=int, default=50, help="lines kept in each actor's log tail (default 50)")
    ap.add_argument("--max-concurrency", type=int, default=16, help="threads of each host actor (default 16)")
    ap.add_argument("--node-poll-s", type=float, default=1.0, help="node watcher period (default 1)")
    ap.add_argument("--pending-after-s", type=float, default=2.0, help="first pending event after (default 2)")
    ap.add_argument("--pending-every-s", type=float, default=10.0, help="repeat pending events every (default 10)")
    ap.add_argument("--no-actor-logs", action="store_true", help="do not stream actor logs into the job log")
    ap.add_argument("--no-echo", action="store_true", help="actors do not echo their process's output to stderr")
    args = ap.parse_args(own)
    if not child:
        ap.error("missing the controller command after --")
    return args, child


def main(argv: Optional[List[str]] = None) -> None:
    args, child = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = Driver(args, child).run()
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    main()
