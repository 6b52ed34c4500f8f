"""Ray's own `serve` CLI (unmodified, from `ray[serve]==2.60.0`) against a live Sluice: `serve
deploy` of a Ray Serve config, `serve status` (values checked), `serve config`, a second deploy
that swaps the model, a refused config in Ray's words, and `serve shutdown`.

The CLI lives in its own venv (Ray's dependencies do not mix with tritonclient's); it is found
at $SLUICE_SERVE_CLI, else .venv-ray/bin/serve. Without it every test here is skipped with a
message saying how to install it (CI installs it: scripts/requirements-ray.txt).
"""
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import MODELS, ROOT, Sluice

SERVE = os.environ.get("SLUICE_SERVE_CLI", str(ROOT / ".venv-ray" / "bin" / "serve"))

IRIS = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}

EMPTY = """
http_options: {{host: 127.0.0.1, port: {http}}}
grpc_options: {{host: 127.0.0.1, port: {grpc}}}
admin_options: {{port: 0}}
applications: []
"""

# A Ray Serve config as a Ray user writes it, with fields Sluice ignores (and says so).
RAY_CONFIG = """
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: iris
    route_prefix: /iris
    import_path: sluice.onnx:{model}
    runtime_env:
      working_dir: https://example.invalid/iris_app.zip
    args:
      max_batch_size: 8
    deployments:
      - name: iris
        num_replicas: 2
        graceful_shutdown_timeout_s: 20
        user_config:
          version: "{version}"
  - name: top2
    import_path: sluice.builtin:top_k
    args:
      max_batch_size: 4
      options: {{k: 2, labels: {models}/iris/labels.txt}}
"""


def serve_cli_works():
    if not Path(SERVE).is_file():
        return False
    return subprocess.run([SERVE, "--help"], capture_output=True, timeout=120).returncode == 0


pytestmark = pytest.mark.skipif(
    not serve_cli_works(),
    reason=f"Ray's serve CLI is not at {SERVE} (or lacks ray[serve]): "
    "install it with `.venv-ray/bin/pip install -r scripts/requirements-ray.txt`, "
    "or point SLUICE_SERVE_CLI at one",
)


@pytest.fixture(scope="module")
def sluice(tmp_path_factory):
    s = Sluice(tmp_path_factory.mktemp("serve-cli"), config=EMPTY)
    yield s
    assert s.stop() == 0, "".join(s.log)


def serve(sluice, *args, ok=True):
    """Runs `serve ARGS -a ADMIN`; returns (exit code, stdout + stderr)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([SERVE, *args, "-a", sluice.admin], capture_output=True, text=True, timeout=120, env=env)
    out = p.stdout + p.stderr
    if ok:
        assert p.returncode == 0, out
    return p.returncode, out


def deploy(sluice, tmp_path, model, version):
    cfg = tmp_path / f"ray-{version}.yaml"
    cfg.write_text(RAY_CONFIG.format(model=model, version=version, models=MODELS))
    return serve(sluice, "deploy", str(cfg))


def status_until(sluice, app, want, timeout=60):
    deadline = time.time() + timeout
    while True:
        status = yaml.safe_load(serve(sluice, "status")[1])
        if status["applications"].get(app, {}).get("status") == want:
            return status
        assert time.time() < deadline, f"{app} never {want}: {status}"
        time.sleep(0.2)


def infer(sluice, model):
    req = urllib.request.Request(f"http://{sluice.http}/v2/models/{model}/infer", data=json.dumps(IRIS).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_deploy_status_config_swap_and_shutdown(sluice, tmp_path):
    code, out = deploy(sluice, tmp_path, MODELS / "iris" / "model.onnx", "1")
    assert "Sent deploy request successfully" in out, out

    status = status_until(sluice, "iris", "RUNNING")
    status = status_until(sluice, "top2", "RUNNING")
    assert list(status["proxies"].values()) == ["HEALTHY"], status
    iris = status["applications"]["iris"]
    assert iris["last_deployed_time_s"] > 1.7e9
    for ignored in ["runtime_env", "proxy_location", "http_options", "graceful_shutdown_timeout_s", "route_prefix"]:
        assert ignored in iris["message"], iris["message"]
    dep = iris["deployments"]["iris"]
    assert dep["status"] == "HEALTHY" and dep["status_trigger"] == "CONFIG_UPDATE_COMPLETED", dep
    assert dep["replica_states"] == {"RUNNING": 2}, dep
    assert status["applications"]["top2"]["deployments"]["top2"]["replica_states"] == {"RUNNING": 1}
    assert infer(sluice, "iris")[1]["model_version"] == "1"

    # `serve config` prints back exactly what was deployed, per application.
    configs = list(yaml.safe_load_all(serve(sluice, "config")[1]))
    iris_config = next(c for c in configs if c["name"] == "iris")
    assert iris_config["import_path"] == f"sluice.onnx:{MODELS / 'iris' / 'model.onnx'}"
    assert iris_config["args"] == {"max_batch_size": 8}
    assert iris_config["deployments"][0]["user_config"] == {"version": "1"}
    assert yaml.safe_load(serve(sluice, "config", "-n", "top2")[1])["import_path"] == "sluice.builtin:top_k"

    # A second deploy swaps the model file and version, live.
    v2 = tmp_path / "iris-v2.onnx"
    shutil.copy(MODELS / "iris" / "model.onnx", v2)
    deploy(sluice, tmp_path, v2, "2")
    deadline = time.time() + 60
    while infer(sluice, "iris")[1].get("model_version") != "2":
        assert time.time() < deadline, "version 2 never served"
        time.sleep(0.1)
    status_until(sluice, "iris", "RUNNING")
    iris_config = yaml.safe_load(serve(sluice, "config", "-n", "iris")[1])
    assert iris_config["import_path"] == f"sluice.onnx:{v2}"

    # Shutdown: every application goes, and the server stays up for the next deploy.
    code, out = serve(sluice, "shutdown", "-y")
    assert "Sent shutdown request" in out, out
    assert yaml.safe_load(serve(sluice, "status")[1])["applications"] == {}
    assert infer(sluice, "iris")[0] == 404


def test_a_config_sluice_cannot_serve_is_refused_in_rays_words(sluice, tmp_path):
    cfg = tmp_path / "python-app.yaml"
    cfg.write_text("applications:\n  - name: fruit\n    import_path: fruit.deployment_graph\n")
    code, out = serve(sluice, "deploy", str(cfg), ok=False)
    assert code != 0
    assert "Request failed with status code 400: 1 validation error for ServeDeploySchema" in out, out
    assert "applications.0.import_path\n  `fruit.deployment_graph` is not a Sluice model reference" in out, out
    assert "fruit" not in yaml.safe_load(serve(sluice, "status")[1])["applications"]
