"""Clients the Ray tests run inside the cluster's network namespaces (the root namespace cannot
reach 127.100.0.x): the admin API, load with per-status counts, and tritonclient checks.

    python clients.py admin METHOD URL TOKEN [BODY_FILE]   -> prints "<status>\\n<body>"
    python clients.py load URL SECONDS CONCURRENCY OUT_JSON  -> counts by status, versions, max latency
    python clients.py triton HTTP_ADDR GRPC_ADDR EXPECTED_JSON -> checks iris through tritonclient
"""
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

IRIS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}


def admin(method, url, token, body_file=None):
    data = open(body_file, "rb").read() if body_file else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, out = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, out = e.code, e.read()
    except Exception as e:  # noqa: BLE001 - reported to the test
        status, out = 0, repr(e).encode()
    sys.stdout.write("%d\n" % status)
    sys.stdout.buffer.write(out)


def load(url, seconds, concurrency, out_path):
    """Requests from `concurrency` threads for `seconds`, or until a file `OUT_PATH.stop`
    appears (a test that waits for what the load makes happen stops it then: a fixed length
    could end first on a loaded machine)."""
    body = json.dumps(IRIS).encode()
    stats = {"ok": 0, "errors": {}, "messages": [], "versions": {}, "max_s": 0.0, "requests": 0}
    lock = threading.Lock()
    end = time.time() + float(seconds)
    stop = str(out_path) + ".stop"

    def worker():
        while time.time() < end and not os.path.exists(stop):
            t = time.time()
            version = None
            try:
                req = urllib.request.Request(url, data=body, method="POST")
                with urllib.request.urlopen(req, timeout=60) as r:
                    code, doc = r.status, json.loads(r.read())
                    version = doc.get("model_version")
            except urllib.error.HTTPError as e:
                code, doc = e.code, e.read().decode(errors="replace")
            except Exception as e:  # noqa: BLE001
                code, doc = type(e).__name__, repr(e)
            took = time.time() - t
            with lock:
                stats["requests"] += 1
                stats["max_s"] = max(stats["max_s"], took)
                if code == 200:
                    stats["ok"] += 1
                    stats["versions"][version] = stats["versions"].get(version, 0) + 1
                else:
                    stats["errors"][str(code)] = stats["errors"].get(str(code), 0) + 1
                    if len(stats["messages"]) < 5:
                        stats["messages"].append(str(doc)[:300])

    threads = [threading.Thread(target=worker) for _ in range(int(concurrency))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(out_path, "w") as f:
        json.dump(stats, f)


def triton(http_addr, grpc_addr, expected_path):
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    case = json.load(open(expected_path))["cases"][0]
    x = np.array(case["inputs"][0]["data"], dtype=np.float32).reshape(case["inputs"][0]["shape"])
    want = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in case["outputs"]}
    for module, addr in ((httpclient, http_addr), (grpcclient, grpc_addr)):
        client = module.InferenceServerClient(addr)
        assert client.is_server_ready(), addr
        inp = module.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("iris", [inp])
        for name, value in want.items():
            np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
    print("ok")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"admin": admin, "load": load, "triton": triton}[cmd](*args)
