"""The Ray actor that hosts one native Sluice process (a replica or a proxy).

One detached, named actor per process. The actor:

* starts the process from a thread of its own that lives as long as the
  process (PR_SET_PDEATHSIG follows the *thread* that forked), in its own
  session and process group (``start_new_session``: ``process_group=`` needs
  Python 3.11, and Ray runs on older ones) with PDEATHSIG=SIGTERM, so that the
  process dies with the actor and ``stop()`` can signal its whole tree;
* replaces ``{node_ip}`` in argv with this node's IP and resolves a relative
  argv[0] against the actor's cwd (the job's working_dir on this node);
* waits for the line ``LISTEN <host:port>`` on the process's stdout and keeps
  every other stdout/stderr line in a bounded ring buffer (the "log tail"),
  echoing them to its own stderr;
* answers ``wait_ready()``, ``run()``, ``info()`` and ``stop()`` concurrently
  (it is created with ``max_concurrency`` > 1, i.e. a threaded actor).

``NamespaceOwner`` is the other actor class: the tiny, non-detached actor by
which a running driver holds its Ray namespace (see ``driver.claim_namespace``).

This module is imported by the driver and pickled *by value* into the actor,
so a worker node does not need ``sluice_ray`` on its ``sys.path``.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Dict, List, Optional

LISTEN_PREFIX = "LISTEN "
PR_SET_PDEATHSIG = 1


def load_prctl():
    """libc's prctl, for `child_setup`: looked up in the parent before it forks
    (loading a library in the forked child of a threaded Ray worker can deadlock
    on a lock another thread held), and passed in, not kept in a module global
    (Ray pickles this module's classes, and a ctypes function cannot be)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except Exception:
        return None


def preexec():
    """The `preexec_fn` for a child: `child_setup` with prctl found here."""
    return functools.partial(child_setup, load_prctl())


def child_setup(prctl=None) -> None:
    """Runs in a forked child before exec: SIGTERM when its parent dies
    (PR_SET_PDEATHSIG), and SIGTERM and SIGINT unblocked. A child inherits the
    signal mask of the thread that forked it, and Ray blocks signals in some of
    its threads (SIGINT in every process): a child started with SIGTERM blocked
    would not see a job stop, a kill or its parent's death."""
    if prctl is not None:
        try:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except Exception:
            pass
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGINT])
    except Exception:
        pass


def resolve_argv0(argv0: str, cwd: str) -> str:
    """A relative argv[0] with a slash is taken relative to cwd; a bare name is
    taken from cwd when such a file exists there, else left for the PATH."""
    if os.path.isabs(argv0):
        return argv0
    if os.sep in argv0:
        return os.path.normpath(os.path.join(cwd, argv0))
    candidate = os.path.join(cwd, argv0)
    if os.path.isfile(candidate):
        return candidate
    return argv0


def exit_fields(returncode: Optional[int]) -> Dict[str, Optional[int]]:
    """Popen's returncode as the protocol's (code, signal): a child killed by
    signal N reports code 128+N and signal N, like a shell."""
    if returncode is None:
        return {"code": None, "signal": None}
    if returncode < 0:
        return {"code": 128 - returncode, "signal": -returncode}
    return {"code": returncode, "signal": None}


class ProcessHost:
    """Hosts one native process. Created by the driver as an actor it owns (not detached)."""

    def __init__(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None,
                 log_lines: int = 50, echo: bool = True, meta: Optional[dict] = None):
        import ray  # imported here: this class is pickled by value

        self.name = name
        self.meta = dict(meta or {})   # what the driver wants back on adoption (group, demand)
        self.node_ip = ray.util.get_node_ip_address()
        try:
            self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:
            self.node_id = None
        self.actor_pid = os.getpid()
        self.cwd = os.getcwd()
        self.echo = echo
        self._cond = threading.Condition()
        self._tail: deque = deque(maxlen=max(1, int(log_lines)))
        self.addr: Optional[str] = None
        self.pid: Optional[int] = None
        self.returncode: Optional[int] = None
        self.spawn_error: Optional[str] = None
        self.started_at = time.time()
        self.ready_at: Optional[float] = None
        self.exited_at: Optional[float] = None
        self._stopping = False
        self._reaped = False   # the child was reaped: its group id may be another's now

        argv = [str(a).replace("{node_ip}", self.node_ip) for a in argv]
        if argv:
            argv[0] = resolve_argv0(argv[0], self.cwd)
        self.argv = argv
        child_env = dict(os.environ)
        child_env.update({str(k): str(v).replace("{node_ip}", self.node_ip) for k, v in (env or {}).items()})
        child_env.setdefault("SLUICE_RAY_ACTOR_NAME", name)
        child_env.setdefault("SLUICE_NODE_IP", self.node_ip)
        if self.node_id:
            child_env.setdefault("SLUICE_NODE_ID", self.node_id)
        # The spawning thread must live as long as the child (PDEATHSIG is per thread).
        self._thread = threading.Thread(target=self._supervise, args=(child_env,),
                                        name="sluice-child", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ internals
    def _log(self, line: str) -> None:
        with self._cond:
            self._tail.append(line)
        if self.echo:
            try:
                sys.stderr.write("[%s] %s\n" % (self.name, line))
                sys.stderr.flush()
            except Exception:
                pass

    def _pump_stderr(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self._log(raw.decode("utf-8", "replace").rstrip("\r\n"))
        stream.close()

    def _supervise(self, env: Dict[str, str]) -> None:
        if not self.argv:
            self._finish_spawn_error("empty argv")
            return
        try:
            p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env, cwd=self.cwd,
                                 start_new_session=True, preexec_fn=preexec(), close_fds=True)
        except Exception as e:  # not found, not executable, ...
            self._finish_spawn_error("cannot start %r: %s" % (self.argv[0], e))
            return
        with self._cond:
            self.pid = p.pid
            self._cond.notify_all()
        err = threading.Thread(target=self._pump_stderr, args=(p.stderr,), name="sluice-stderr", daemon=True)
        err.start()
        out = threading.Thread(target=self._pump_stdout, args=(p.stdout,), name="sluice-stdout", daemon=True)
        out.start()
        # The process's exit, not its pipes' end (a helper it started holds them open: its
        # exit went unseen until the helper's). Waited for without reaping it, whatever is
        # left of its group goes while the leader's id still names the group: once reaped, the
        # id is free, and a signal to it later (stop()) could reach another process's group.
        exited = False
        try:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
            exited = True
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        if not exited:   # not waited for above: not under the lock, which stop() needs meanwhile
            p.wait()
        with self._cond:   # an exited child's reap is immediate; stop() signals only before it
            rc = p.wait()
            self._reaped = True
        out.join(timeout=2.0)
        err.join(timeout=2.0)
        with self._cond:
            self.returncode = rc
            self.exited_at = time.time()
            self._cond.notify_all()

    def _pump_stdout(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if self.addr is None and line.startswith(LISTEN_PREFIX):
                with self._cond:
                    self.addr = line[len(LISTEN_PREFIX):].strip()
                    self.ready_at = time.time()
                    self._cond.notify_all()
                if self.echo:
                    sys.stderr.write("[%s] %s\n" % (self.name, line))
                    sys.stderr.flush()
            else:
                self._log(line)
        stream.close()

    def _finish_spawn_error(self, msg: str) -> None:
        self._log(msg)
        with self._cond:
            self.spawn_error = msg
            self.returncode = 127
            self.exited_at = time.time()
            self._cond.notify_all()

    def _tail_text(self) -> str:
        with self._cond:
            return "\n".join(self._tail)

    # ------------------------------------------------------------ remote API
    def info(self) -> dict:
        with self._cond:
            d = {"name": self.name, "node_id": self.node_id, "node_ip": self.node_ip,
                 "pid": self.pid, "actor_pid": self.actor_pid, "addr": self.addr,
                 "argv": self.argv, "started_at": self.started_at, "ready_at": self.ready_at,
                 "meta": self.meta}
            d.update(exit_fields(self.returncode))
            d["exited"] = self.returncode is not None
        return d

    def wait_ready(self, timeout_s: float) -> dict:
        """Blocks until LISTEN, the child's exit, or timeout_s."""
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        with self._cond:
            while self.addr is None and self.returncode is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=min(left, 1.0))
            addr, rc = self.addr, self.returncode
        d = self.info()
        if addr is not None:
            d["ok"] = True
            return d
        d["ok"] = False
        if self.spawn_error:
            d["message"] = self.spawn_error
        elif rc is not None:
            ef = exit_fields(rc)
            d["message"] = "process exited before LISTEN (code %s%s)" % (
                ef["code"], ", signal %d" % ef["signal"] if ef["signal"] else "")
        else:
            d["message"] = "no LISTEN line within %.1f s" % float(timeout_s)
        d["log_tail"] = self._tail_text()
        return d

    def run(self, max_wait_s: Optional[float] = None) -> Optional[dict]:
        """Blocks until the child exits; returns {code, signal, log_tail}.
        With max_wait_s, returns None when it is still running by then (the
        caller calls again), so an abandoned call never pins a thread for long."""
        deadline = None if max_wait_s is None else time.monotonic() + float(max_wait_s)
        with self._cond:
            while self.returncode is None:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(timeout=min(left, 5.0))
                else:
                    self._cond.wait(timeout=5.0)
            rc = self.returncode
        d = exit_fields(rc)
        d["log_tail"] = self._tail_text()
        d["stopped"] = self._stopping
        return d

    def stop(self, grace_s: float = 5.0) -> dict:
        """SIGTERM to the child's process group, up to grace_s for it to exit,
        then SIGKILL to the group. Returns info()."""
        self._stopping = True
        with self._cond:
            pid, rc = self.pid, self.returncode
        if pid is not None:
            if rc is None:
                self._signal_group(pid, signal.SIGTERM)
                deadline = time.monotonic() + max(0.0, float(grace_s))
                with self._cond:
                    while self.returncode is None and time.monotonic() < deadline:
                        self._cond.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            # Whatever is left of the group (the leader or its helpers) goes now; a leader
            # already reaped took its group with it (_supervise), and its id may be another's.
            self._signal_group(pid, signal.SIGKILL)
            with self._cond:
                end = time.monotonic() + 5.0
                while self.returncode is None and time.monotonic() < end:
                    self._cond.wait(timeout=0.1)
        return self.info()

    def _signal_group(self, pid: int, sig: int) -> None:
        """Signals the child's group, unless the child was reaped (checked and sent under the
        lock _supervise reaps under, so the id cannot be freed in between)."""
        with self._cond:
            if self._reaped:
                return
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def ping(self) -> bool:
        return True


class NamespaceOwner:
    """Holds a Ray namespace for one running driver. The driver creates it
    non-detached (it is the owner, so Ray destroys it, and frees its name, when
    the driver's process dies) and named ``sluice-owner`` in the namespace; it
    only answers who holds the namespace (job, submission, pid, node, start)."""

    def __init__(self, holder: dict):
        self.holder = dict(holder)

    def info(self) -> dict:
        return dict(self.holder)
