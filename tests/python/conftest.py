"""Starts the real `sluice` binary on free ports for the client conformance tests."""
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "examples" / "models"
BIN = os.environ.get("SLUICE_BIN", str(ROOT / "target" / "debug" / "sluice"))

CONFIG = """
http_options: {{host: 127.0.0.1, port: {http}}}
grpc_options: {{host: 127.0.0.1, port: {grpc}}}
admin_options: {{port: 0}}
applications:
  - name: conformance
    deployments:
      - {{name: iris, model: {models}/iris/model.onnx, max_batch_size: 8}}
      - {{name: mlp, model: {models}/mlp/model.onnx, num_replicas: 2, max_batch_size: 64}}
      - {{name: dtypes, model: {models}/dtypes/model.onnx}}
  - name: embed
    route_prefix: /embed
    deployments:
      - {{name: tok, builtin: {{tokenizer: {{path: {models}/tiny-encoder/tokenizer.json}}}}, max_batch_size: 16}}
      - {{name: encoder, model: {models}/tiny-encoder/model.onnx, max_batch_size: 16, pad: {{input_ids: 0, attention_mask: 0, token_type_ids: 0}}}}
      - {{name: pool, builtin: {{mean_pool: {{normalize: true}}}}, max_batch_size: 16, pad: {{hidden: 0, mask: 0}}}}
    pipeline:
      name: embeddings
      inputs: [{{name: text, datatype: BYTES, shape: [-1]}}]
      steps:
        - {{name: tokenize, deployment: tok, inputs: {{text: text}}, outputs: {{input_ids: ids, attention_mask: mask, token_type_ids: types}}}}
        - {{name: encode, deployment: encoder, inputs: {{input_ids: ids, attention_mask: mask, token_type_ids: types}}, outputs: {{last_hidden_state: hidden}}}}
        - {{name: pool, deployment: pool, inputs: {{hidden: hidden, mask: mask}}, outputs: {{embedding: embedding}}}}
      outputs: [embedding]
      route: {{request: {{text: text}}, response: {{embeddings: embedding}}}}
"""


class Sluice:
    def __init__(self, tmp: Path, http_port: int = 0, grpc_port: int = 0, config: str = CONFIG, ssl_context=None):
        """`sluice run` on `config` (CONFIG unless given; `{http}`, `{grpc}` and `{models}` are
        filled in), with the addresses it printed: `http`, `grpc`, `admin`. `ssl_context` (for a
        TLS config) verifies the server while waiting for readiness."""
        cfg = tmp / f"sluice-{http_port}-{grpc_port}.yaml"
        cfg.write_text(config.format(http=http_port, grpc=grpc_port, models=MODELS))
        self.proc = subprocess.Popen(
            [BIN, "run", str(cfg)], stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "info"}
        )
        self.log = []
        self.http = self.grpc = self.admin = None
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"REST frontend listening on https?://(\S+)", line)
                if m:
                    self.http = m.group(1)
                m = re.search(r"gRPC frontend listening on (\S+)", line)
                if m:
                    self.grpc = m.group(1)
                m = re.search(r"admin API listening on (http://\S+)", line)
                if m:
                    self.admin = m.group(1)
                if self.http and self.grpc and self.admin:
                    found.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.time() + 60
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                reader.join(5)
                raise RuntimeError("sluice did not start:\n" + "".join(self.log))
        # Listening comes first; ready follows once every replica has warmed up.
        deadline = time.time() + 60
        while True:
            try:
                scheme = "https" if ssl_context else "http"
                url = f"{scheme}://{self.http}/v2/health/ready"
                if urllib.request.urlopen(url, timeout=5, context=ssl_context).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("sluice never became ready:\n" + "".join(self.log))
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


@pytest.fixture(scope="session")
def sluice(tmp_path_factory):
    s = Sluice(tmp_path_factory.mktemp("sluice"))
    yield s
    code = s.stop()
    assert code == 0, "sluice exited with %s:\n%s" % (code, "".join(s.log))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def shared_port_sluice(tmp_path_factory):
    # The port is picked here and bound by sluice after: another process can take it in between,
    # so a start that finds it taken (sluice exits saying so) tries another.
    for attempt in range(5):
        port = free_port()
        try:
            s = Sluice(tmp_path_factory.mktemp("shared"), http_port=port, grpc_port=port)
            break
        except RuntimeError as e:
            if "cannot listen" not in str(e) or attempt == 4:
                raise
    yield s
    code = s.stop()
    assert code == 0, "sluice (shared port) exited with %s:\n%s" % (code, "".join(s.log))


def expected(model):
    return json.loads((MODELS / model / "expected.json").read_text())
