#!/usr/bin/env python3
"""A stand-in for a native Sluice replica, for the bridge tests.

Binds HOST:PORT (default 127.0.0.1:0), prints ``LISTEN host:port`` on stdout
and answers every GET with 200 and a JSON body {"pid", "name", "helper_pid",
"sigmask"} (sigmask: the signals blocked when it started).
Chatter goes to stderr (and one line to stdout) so the actor's log tail has
something in it.

Options:
  --bind HOST:PORT        address to bind (the actor passes {node_ip}:0)
  --exit-after S          exit by itself S seconds after LISTEN, with --code
  --code N                exit code for --exit-after / --fail-before-listen
  --fail-before-listen    print an error and exit with --code before LISTEN
  --no-listen             never print LISTEN (for startup timeouts)
  --ignore-term           ignore SIGTERM (so only SIGKILL stops it)
  --helper                start a `sleep` helper in the same process group
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", default="127.0.0.1:0")
    ap.add_argument("--exit-after", type=float, default=None)
    ap.add_argument("--code", type=int, default=0)
    ap.add_argument("--fail-before-listen", action="store_true")
    ap.add_argument("--no-listen", action="store_true")
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--helper", action="store_true")
    a = ap.parse_args()
    name = os.environ.get("SLUICE_RAY_ACTOR_NAME", "?")
    sigmask = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    print("stand-in %s: pid %d starting, argv %s" % (name, os.getpid(), sys.argv[1:]), file=sys.stderr, flush=True)
    if a.fail_before_listen:
        print("stand-in %s: failing before LISTEN as asked (code %d)" % (name, a.code), file=sys.stderr, flush=True)
        sys.exit(a.code)

    helper = None
    if a.helper:
        helper = subprocess.Popen(["sleep", "100000"])

    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(signum, frame):
            print("stand-in %s: SIGTERM, exiting" % name, file=sys.stderr, flush=True)
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"pid": os.getpid(), "name": name,
                               "helper_pid": helper.pid if helper else None, "sigmask": sigmask}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass

    host, port = a.bind.rsplit(":", 1)
    srv = ThreadingHTTPServer((host, int(port)), H)
    print("stand-in %s: a line on stdout that is not LISTEN" % name, flush=True)
    if not a.no_listen:
        print("LISTEN %s:%d" % (host, srv.server_address[1]), flush=True)
    if a.exit_after is not None:
        def later():
            time.sleep(a.exit_after)
            print("stand-in %s: exiting with code %d as asked" % (name, a.code), file=sys.stderr, flush=True)
            os._exit(a.code)
        threading.Thread(target=later, daemon=True).start()
    srv.serve_forever()


if __name__ == "__main__":
    main()
