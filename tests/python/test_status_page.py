"""The admin port's status page in headless Chromium, driven over the DevTools protocol: log in
with the token, see deployments and canary weights in the rendered DOM, change the weight
through the admin API and watch the page follow, then set it with the page's own controls.

Skipped when Chromium is not installed, unless SLUICE_REQUIRE_CHROMIUM=1 (scripts/test.sh sets
it: CI fails rather than skips). With SLUICE_STATUS_SCREENSHOT=PATH it saves a screenshot
(docs/status-page.png is made so)."""
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import Sluice

TOKEN = "page-test-token"

CONFIG = """
http_options: {{host: 127.0.0.1, port: {http}}}
grpc_options: {{host: 127.0.0.1, port: {grpc}}}
admin_options: {{port: 0}}
applications:
  - name: shop
    deployments:
      - {{name: iris, model: {models}/iris/model.onnx, num_replicas: 2, canary: {{model: {models}/iris/model.onnx, version: "2", weight: 10}}}}
      - {{name: mlp, model: {models}/mlp/model.onnx}}
"""

IRIS = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [6.3, 3.3, 6.0, 2.5]}]})


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("SLUICE_REQUIRE_CHROMIUM") == "1":
        pytest.fail("Chromium is required (SLUICE_REQUIRE_CHROMIUM=1) but not installed")
    pytest.skip("Chromium is not installed (apt-get install chromium)")


class Browser:
    """One headless Chromium page, over the DevTools protocol (websocket-client)."""

    def __init__(self, binary, profile):
        import websocket

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1400,900",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.time() < deadline, "Chromium did not start"
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg["result"]

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def navigate(self, url):
        self.call("Page.navigate", url=url)

    def wait_for(self, expr, want, timeout=10):
        deadline = time.time() + timeout
        while True:
            got = self.eval(expr)
            if got == want:
                return
            if time.time() > deadline:
                raise AssertionError(f"{expr}: {got!r}, not {want!r} after {timeout}s; page: {self.eval('document.body && document.body.innerText')!r}")
            time.sleep(0.1)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def admin_post(base, path, body):
    req = urllib.request.Request(base + path, data=body.encode(), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    return json.load(urllib.request.urlopen(req, timeout=10))


def weight(key):
    return f"(document.getElementById('w:{key}') || {{}}).textContent"


def test_status_page_follows_the_canary_weight(tmp_path, monkeypatch):
    binary = chromium()
    monkeypatch.setenv("SLUICE_ADMIN_TOKEN", TOKEN)
    server = Sluice(tmp_path, config=CONFIG)
    browser = Browser(binary, tmp_path / "chromium")
    try:
        # Without the token: the login form, and the status API refuses the page's call.
        browser.navigate(server.admin + "/")
        browser.wait_for("!!document.querySelector('input[name=token]')", True)
        browser.wait_for("fetch('/api/sluice/status').then(r => r.status)", 401)

        # Log in through the form: the cookie is set and the page shows the deployments.
        browser.eval(f"document.querySelector('input[name=token]').value = '{TOKEN}'; document.querySelector('form').submit()")
        browser.wait_for("location.pathname + location.search", "/")
        browser.wait_for("document.body.innerText.includes('iris') && document.body.innerText.includes('mlp')", True)
        browser.wait_for(weight("shop/iris/1"), "90%")
        browser.wait_for(weight("shop/iris/2"), "10%")
        browser.wait_for("document.cookie", "")  # HttpOnly: the script cannot read it
        browser.wait_for("!!document.querySelector('.controls[data-deployment=iris]')", True)

        # The weight changes through the admin API: the page follows within a few seconds.
        admin_post(server.admin, "/api/serve/deployments/iris/canary", '{"weight": 40}')
        browser.wait_for(weight("shop/iris/2"), "40%", timeout=30)
        browser.wait_for(weight("shop/iris/1"), "60%", timeout=30)

        # The page's own control posts the weight (with the cookie).
        browser.eval("""(() => { const box = document.querySelector('.controls[data-deployment=iris]');
            box.querySelector('input').value = 70; box.querySelector('button[data-action=canary]').click(); })()""")
        browser.wait_for(weight("shop/iris/2"), "70%", timeout=30)

        shot = os.environ.get("SLUICE_STATUS_SCREENSHOT")
        if shot:
            # Some traffic and a few polls, so that the sparklines have a shape.
            for _ in range(12):
                for _ in range(40):
                    urllib.request.urlopen(urllib.request.Request(
                        f"http://{server.http}/v2/models/iris/infer", data=IRIS.encode(), method="POST"), timeout=10)
                time.sleep(2)
            import base64
            png = browser.call("Page.captureScreenshot", format="png")["data"]
            with open(shot, "wb") as f:
                f.write(base64.b64decode(png))
    finally:
        browser.close()
        code = server.stop()
    assert code == 0, "".join(server.log)
