#!/usr/bin/env python3
"""A real 2-node Ray cluster in two network namespaces, for tests.

Layout (see shared/reference/ray.md section 2):

    netns <prefix><owner>h  --veth--  netns <prefix><owner>w
    127.100.0.1 (head, GCS :6379,        127.100.0.2 (worker)
                 dashboard :8265)

Each node has its own ``--temp-dir`` (short paths under /tmp: Ray puts Unix
sockets there). Usage stats are off. Nothing outside the two namespaces is ever
signalled: teardown stops exactly the pids that ``ip netns pids`` lists for
them (TERM, then KILL), then deletes the namespaces (which destroys the veth
pair). ``ray stop``, ``pkill`` and ``killall`` are never used.

Namespace names carry the pid of the process that owns the cluster
(``slray<pid>h``/``slray<pid>w``); a later run removes those whose owner is
dead. Clusters made by the CLI ``up`` (``slrayc<pid>…``) are left alone by
that sweep; ``down`` (or ``sweep --all``) removes them.

CLI:  python tests/ray/netns_cluster.py up|down|status|sweep --dir RUN
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

PREFIX = "slray"          # test-owned clusters: slray<pid>h / slray<pid>w
CLI_PREFIX = "slrayc"     # CLI-owned clusters:  slrayc<pid>h / slrayc<pid>w
VETH_PREFIX = "slr"       # veth ends: slr<pid>a (head side) / slr<pid>b (worker side)
HEAD_IP = "127.100.0.1"
WORKER_IP = "127.100.0.2"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
_NS_RE = re.compile(r"^(slrayc?)(\d+)([hw])$")
_VETH_RE = re.compile(r"^slrc?(\d+)[ab]$")
_TMP_RE = re.compile(r"^(slrayc?)-(\d+)([hw])-")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-ray"


class Unavailable(RuntimeError):
    """Raised when network namespaces cannot be used here (not root, no `ip`)."""


def _sh(argv: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def netns_available() -> Optional[str]:
    """None when `ip netns` works here, else the reason it does not."""
    if os.geteuid() != 0:
        return "network namespaces need root (euid is %d)" % os.geteuid()
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    try:
        r = _sh(["ip", "netns", "list"], check=False, timeout=10)
    except Exception as e:  # pragma: no cover
        return "`ip netns list` failed: %s" % e
    if r.returncode != 0:
        return "`ip netns list` failed: %s" % r.stderr.strip()
    return None


def list_netns() -> List[str]:
    r = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> List[int]:
    r = _sh(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in r.stdout.split() if x.strip().isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie counts as dead.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_netns_processes(namespaces: Iterable[str], term_wait_s: float = 3.0) -> int:
    """TERM then KILL every process inside the given namespaces. Returns how many
    processes were signalled. Touches nothing outside them."""
    namespaces = [ns for ns in namespaces if ns in set(list_netns())]
    signalled = set()
    for sig, wait in ((signal.SIGTERM, term_wait_s), (signal.SIGKILL, 5.0)):
        pids = [p for ns in namespaces for p in netns_pids(ns)]
        for p in pids:
            try:
                os.kill(p, sig)
                signalled.add(p)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not any(_pid_alive(p) for ns in namespaces for p in netns_pids(ns)):
                break
            time.sleep(0.1)
        else:
            continue
        break
    # Wait until they are reaped, not just dying (their parent, or init, reaps them).
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(os.path.exists("/proc/%d" % p) for p in signalled):
        time.sleep(0.05)
    return len(signalled)


def delete_netns(namespaces: Iterable[str]) -> None:
    for ns in namespaces:
        if ns in set(list_netns()):
            _sh(["ip", "netns", "del", ns], check=False)


def _root_links() -> List[str]:
    r = _sh(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in r.stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            names.append(parts[1].strip().split("@")[0])
    return names


def sweep_leftovers(include_cli: bool = False, verbose: bool = False) -> List[str]:
    """Remove namespaces (and stray root veths) left by runs whose owner process
    is gone. CLI-made clusters are only removed with include_cli."""
    removed = []
    groups: Dict[str, List[str]] = {}
    for ns in list_netns():
        m = _NS_RE.match(ns)
        if not m:
            continue
        prefix, owner = m.group(1), int(m.group(2))
        if prefix == CLI_PREFIX and not include_cli:
            continue
        if prefix == PREFIX and owner != os.getpid() and _pid_alive(owner):
            continue  # a live parallel run
        if prefix == PREFIX and owner == os.getpid():
            continue  # our own, live cluster
        groups.setdefault(prefix + str(owner), []).append(ns)
    for key, nss in groups.items():
        n = stop_netns_processes(nss)
        delete_netns(nss)
        removed.extend(nss)
        if verbose:
            print("swept %s (%d processes)" % (", ".join(nss), n), file=sys.stderr)
    present = set(list_netns())
    for entry in os.listdir("/tmp"):
        m = _TMP_RE.match(entry)
        if not m or (m.group(1) + m.group(2) + m.group(3)) in present:
            continue
        owner = int(m.group(2))
        if m.group(1) == PREFIX and (owner == os.getpid() or _pid_alive(owner)):
            continue
        if m.group(1) == CLI_PREFIX and not include_cli:
            continue
        shutil.rmtree(os.path.join("/tmp", entry), ignore_errors=True)
        removed.append("/tmp/" + entry)
    for link in _root_links():
        m = _VETH_RE.match(link)
        if m and (include_cli or not _pid_alive(int(m.group(1)))) and int(m.group(1)) != os.getpid():
            _sh(["ip", "link", "del", link], check=False)
            removed.append(link)
    return removed


class NetnsCluster:
    """A 2-node Ray cluster: head in one netns, worker in another.

    node names are "head" and "worker"."""

    def __init__(
        self,
        run_dir: os.PathLike,
        venv: os.PathLike = DEFAULT_VENV,
        head_cpus: float = 2,
        worker_cpus: float = 2,
        head_resources: Optional[Dict[str, float]] = None,
        worker_resources: Optional[Dict[str, float]] = None,
        object_store_memory: int = 100 * 1024 * 1024,
        system_env: Optional[Dict[str, str]] = None,
        cli: bool = False,
        owner: Optional[int] = None,
    ):
        self.run_dir = Path(run_dir).resolve()
        self.venv = Path(venv).resolve()
        self.python = str(self.venv / "bin" / "python")
        self.cpus = {"head": head_cpus, "worker": worker_cpus}
        self.resources = {"head": head_resources or {}, "worker": worker_resources or {}}
        self.object_store_memory = object_store_memory
        self.system_env = dict(system_env or {})
        self.owner = owner if owner is not None else os.getpid()
        prefix = CLI_PREFIX if cli else PREFIX
        self._prefix = prefix
        self.ns = {"head": "%s%dh" % (prefix, self.owner), "worker": "%s%dw" % (prefix, self.owner)}
        vp = VETH_PREFIX + ("c" if cli else "")
        self.veth = {"head": "%s%da" % (vp, self.owner), "worker": "%s%db" % (vp, self.owner)}
        self.ip = {"head": HEAD_IP, "worker": WORKER_IP}
        self.temp_dirs: Dict[str, str] = {}
        self.timings: Dict[str, float] = {}
        self._up = False

    # ----------------------------------------------------------- addresses
    @property
    def gcs_address(self) -> str:
        return "%s:%d" % (HEAD_IP, GCS_PORT)

    @property
    def dashboard_url(self) -> str:
        return "http://%s:%d" % (HEAD_IP, DASHBOARD_PORT)

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        e = dict(os.environ)
        e["PATH"] = str(self.venv / "bin") + os.pathsep + e.get("PATH", "")
        e["RAY_USAGE_STATS_ENABLED"] = "0"
        # A home of the cluster's own: Ray reads ~/.ray (an auth_token left there by any local
        # Ray, on a developer's machine say, made every node of this cluster fail to start).
        home = self.run_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        e["HOME"] = str(home)
        e.pop("RAY_AUTH_TOKEN", None)
        e.pop("RAY_AUTH_TOKEN_PATH", None)
        e.pop("RAY_ADDRESS", None)
        e.pop("VIRTUAL_ENV", None)
        e.pop("PYTHONPATH", None)
        if extra:
            e.update(extra)
        return e

    # ----------------------------------------------------------- running
    def _ns_of(self, node_or_ns: str) -> str:
        return self.ns.get(node_or_ns, node_or_ns)

    def run_in(self, node_or_ns: str, argv: List[str], **popen_kwargs) -> subprocess.Popen:
        """Start argv inside a namespace ("head", "worker" or a netns name).
        The environment defaults to self.env() (venv on PATH)."""
        popen_kwargs.setdefault("env", self.env())
        return subprocess.Popen(["ip", "netns", "exec", self._ns_of(node_or_ns)] + list(argv), **popen_kwargs)

    def check_in(self, node_or_ns: str, argv: List[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        return subprocess.run(["ip", "netns", "exec", self._ns_of(node_or_ns)] + list(argv),
                              capture_output=True, text=True, timeout=timeout, **kw)

    def http(self, method: str, url: str, body: Optional[bytes] = None, body_file: Optional[str] = None,
             node: str = "head", timeout: float = 30) -> "tuple[int, bytes]":
        """An HTTP request made from inside a namespace (the root namespace cannot
        reach 127.100.0.x). Returns (status, body); status 0 on a connection error."""
        script = r"""
import sys, json, urllib.request, urllib.error
method, url, path, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
data = sys.stdin.buffer.read() if path == '-' else (open(path, 'rb').read() if path else None)
req = urllib.request.Request(url, data=data, method=method, headers={'User-Agent': 'sluice-tests/1', 'Content-Type': 'application/json' if path == '-' else 'application/octet-stream'})
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        status, out = r.status, r.read()
except urllib.error.HTTPError as e:
    status, out = e.code, e.read()
except Exception as e:
    status, out = 0, repr(e).encode()
sys.stdout.write(str(status) + '\n'); sys.stdout.flush(); sys.stdout.buffer.write(out)
"""
        path = "-" if body is not None else (body_file or "")
        r = subprocess.run(["ip", "netns", "exec", self._ns_of(node), self.python, "-c", script,
                            method, url, path, str(timeout)],
                           input=body if body is not None else b"", capture_output=True,
                           timeout=timeout + 15, env=self.env())
        if r.returncode != 0 or b"\n" not in r.stdout:
            raise RuntimeError("http helper failed: %r %r" % (r.stdout[-500:], r.stderr[-2000:]))
        head, _, out = r.stdout.partition(b"\n")
        return int(head), out

    def http_json(self, method: str, url: str, obj=None, **kw):
        status, out = self.http(method, url, body=json.dumps(obj).encode() if obj is not None else None, **kw)
        try:
            return status, json.loads(out)
        except ValueError:
            return status, out.decode(errors="replace")

    # ----------------------------------------------------------- lifecycle
    def _create_namespaces(self) -> None:
        h, w = self.ns["head"], self.ns["worker"]
        va, vb = self.veth["head"], self.veth["worker"]
        cmds = [
            ["ip", "netns", "add", h],
            ["ip", "netns", "add", w],
            ["ip", "link", "add", va, "type", "veth", "peer", "name", vb],
            ["ip", "link", "set", va, "netns", h],
            ["ip", "link", "set", vb, "netns", w],
        ]
        for ns, dev, ip in ((h, va, HEAD_IP), (w, vb, WORKER_IP)):
            x = ["ip", "netns", "exec", ns]
            cmds += [
                x + ["ip", "link", "set", "lo", "up"],
                # lo keeps only 127.0.0.1/32 so that 127.100.0.0/24 can live on the veth
                x + ["ip", "addr", "del", "127.0.0.1/8", "dev", "lo"],
                x + ["ip", "addr", "add", "127.0.0.1/32", "dev", "lo"],
                x + ["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"],
                x + ["sysctl", "-qw", "net.ipv4.conf.%s.route_localnet=1" % dev],
                x + ["ip", "addr", "add", ip + "/24", "dev", dev],
                x + ["ip", "link", "set", dev, "up"],
            ]
        for c in cmds:
            r = _sh(c, check=False)
            if r.returncode != 0:
                raise RuntimeError("%s failed: %s" % (" ".join(c), r.stderr.strip()))

    def _ray_start(self, node: str) -> None:
        td = self.temp_dirs[node]
        argv = ["ray", "start", "--temp-dir=" + td, "--node-ip-address=" + self.ip[node],
                "--num-cpus=%s" % self.cpus[node], "--num-gpus=0",
                "--object-store-memory=%d" % self.object_store_memory, "--disable-usage-stats"]
        if self.resources[node]:
            argv.append("--resources=" + json.dumps(self.resources[node]))
        if node == "head":
            argv += ["--head", "--port=%d" % GCS_PORT, "--include-dashboard=true",
                     "--dashboard-host=0.0.0.0", "--dashboard-port=%d" % DASHBOARD_PORT]
        else:
            argv += ["--address=" + self.gcs_address]
        t0 = time.monotonic()
        log = open(self.run_dir / ("ray-start-%s.log" % node), "w")
        r = self.check_in(node, argv, timeout=180, env=self.env(self.system_env))
        log.write(r.stdout + r.stderr)
        log.close()
        self.timings["ray_start_" + node] = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError("ray start (%s) failed (%d):\n%s\n%s" % (node, r.returncode, r.stdout[-3000:], r.stderr[-3000:]))

    def alive_nodes(self) -> List[dict]:
        status, body = self.http_json("GET", "http://127.0.0.1:%d/api/v0/nodes?limit=100" % DASHBOARD_PORT)
        if status != 200 or not isinstance(body, dict):
            return []
        res = body.get("data", {}).get("result", {}).get("result", [])
        return [n for n in res if n.get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 60) -> List[dict]:
        deadline = time.monotonic() + timeout
        nodes: List[dict] = []
        while time.monotonic() < deadline:
            try:
                nodes = self.alive_nodes()
            except Exception:
                nodes = []
            if len(nodes) >= n:
                return nodes
            time.sleep(0.5)
        raise TimeoutError("cluster has %d alive nodes, wanted %d" % (len(nodes), n))

    def up(self, timeout: float = 120) -> "NetnsCluster":
        reason = netns_available()
        if reason:
            raise Unavailable(reason)
        if not (self.venv / "bin" / "ray").exists():
            raise Unavailable("no Ray in %s (pip install -r scripts/requirements-ray.txt)" % self.venv)
        sweep_leftovers()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for node in ("head", "worker"):
            # Ray puts Unix sockets under the temp dir: keep the path short.
            self.temp_dirs[node] = tempfile.mkdtemp(prefix="%s-%d%s-" % (self._prefix, self.owner, node[0]), dir="/tmp")
        t0 = time.monotonic()
        self._up = True
        atexit.register(self.down)
        self._install_sigterm_handler()
        try:
            self._create_namespaces()
            self._ray_start("head")
            self._ray_start("worker")
            self.wait_nodes(2, timeout=timeout)
            # The dashboard's job endpoints come up a bit after the node table.
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                st, _ = self.http("GET", "http://127.0.0.1:%d/api/jobs/" % DASHBOARD_PORT)
                if st == 200:
                    break
                time.sleep(0.5)
        except BaseException:
            self.down()
            raise
        self.timings["up"] = time.monotonic() - t0
        self._save_state()
        return self

    def _install_sigterm_handler(self) -> None:
        """atexit does not run on SIGTERM: tear down first, then die of it as usual. The cluster
        torn down is the one up now: the handler is this cluster's from its start on (one
        installed by an earlier module's cluster tore that one down, already down, and left this
        one's daemons and namespaces running)."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous not in (signal.SIG_DFL, None) and not getattr(previous, "netns_cluster", False):
            return  # someone else's handler (pytest's, a wrapper's): left alone

        def on_term(signum, frame):
            try:
                self.down()
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
        on_term.netns_cluster = True
        signal.signal(signal.SIGTERM, on_term)

    def _save_state(self) -> None:
        state = {"ns": self.ns, "veth": self.veth, "ip": self.ip, "temp_dirs": self.temp_dirs,
                 "owner": self.owner, "gcs_address": self.gcs_address,
                 "dashboard_url": self.dashboard_url, "venv": str(self.venv)}
        (self.run_dir / "cluster.json").write_text(json.dumps(state, indent=2))

    @classmethod
    def load(cls, run_dir: os.PathLike) -> "NetnsCluster":
        state = json.loads((Path(run_dir) / "cluster.json").read_text())
        c = cls(run_dir, venv=state["venv"], owner=state["owner"],
                cli=state["ns"]["head"].startswith(CLI_PREFIX))
        c.temp_dirs = state["temp_dirs"]
        c._up = True
        return c

    def pids(self, node: Optional[str] = None) -> List[int]:
        nodes = [node] if node else ["head", "worker"]
        return [p for n in nodes for p in netns_pids(self.ns[n])]

    def find_pids(self, node: str, comm: str) -> List[int]:
        out = []
        for p in self.pids(node):
            try:
                with open("/proc/%d/comm" % p) as f:
                    if f.read().strip() == comm:
                        out.append(p)
            except OSError:
                pass
        return out

    def kill_raylet(self, node: str = "worker") -> List[int]:
        """SIGKILL the raylet of a node (for node-death tests). Returns the pids killed."""
        pids = self.find_pids(node, "raylet")
        for p in pids:
            os.kill(p, signal.SIGKILL)
        return pids

    def memory(self) -> Dict[str, Dict[str, int]]:
        """RSS and PSS (KiB) of the processes in each namespace."""
        out = {}
        for node in ("head", "worker"):
            rss = pss = n = 0
            for p in self.pids(node):
                try:
                    with open("/proc/%d/smaps_rollup" % p) as f:
                        for line in f:
                            if line.startswith("Rss:"):
                                rss += int(line.split()[1])
                            elif line.startswith("Pss:"):
                                pss += int(line.split()[1])
                    n += 1
                except OSError:
                    pass
            out[node] = {"processes": n, "rss_kib": rss, "pss_kib": pss}
        return out

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        nss = list(self.ns.values())
        stop_netns_processes(nss)
        delete_netns(nss)
        links = set(_root_links())
        for v in self.veth.values():
            if v in links:
                _sh(["ip", "link", "del", v], check=False)
        for td in self.temp_dirs.values():
            shutil.rmtree(td, ignore_errors=True)
        try:
            atexit.unregister(self.down)
        except Exception:
            pass


def _main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["up", "down", "status", "sweep"])
    ap.add_argument("--dir", default=None, help="run directory (state file, logs)")
    ap.add_argument("--venv", default=str(DEFAULT_VENV))
    ap.add_argument("--head-cpus", type=float, default=2)
    ap.add_argument("--worker-cpus", type=float, default=2)
    ap.add_argument("--head-resources", default="{}", help='JSON, e.g. {"head":1}')
    ap.add_argument("--worker-resources", default="{}")
    ap.add_argument("--all", action="store_true", help="sweep: also CLI-made clusters")
    a = ap.parse_args(argv)
    if a.cmd == "sweep":
        print("\n".join(sweep_leftovers(include_cli=a.all, verbose=True)))
        return 0
    if not a.dir:
        ap.error("--dir is required")
    if a.cmd == "up":
        c = NetnsCluster(a.dir, venv=a.venv, head_cpus=a.head_cpus, worker_cpus=a.worker_cpus,
                         head_resources=json.loads(a.head_resources),
                         worker_resources=json.loads(a.worker_resources), cli=True)
        c.up()
        atexit.unregister(c.down)   # the CLI cluster outlives this process
        c._up = False
        print(json.dumps({"ns": c.ns, "gcs": c.gcs_address, "dashboard": c.dashboard_url,
                          "timings_s": {k: round(v, 2) for k, v in c.timings.items()}}, indent=2))
        return 0
    c = NetnsCluster.load(a.dir)
    if a.cmd == "status":
        print(json.dumps({"ns": c.ns, "namespaces_present": [n for n in c.ns.values() if n in list_netns()],
                          "alive_nodes": [(n["node_ip"], n["node_id"]) for n in c.alive_nodes()],
                          "memory": c.memory()}, indent=2))
        return 0
    c.down()
    print("down: %s" % ", ".join(c.ns.values()))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
