"""Fixtures: the real imagegate binary on a free loopback port, and a fake OpenAI upstream
(stdlib HTTP server speaking the Images API and its error shapes)."""

import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("IMAGEGATE_BIN", str(ROOT / "target" / "debug" / "imagegate"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers by prompt: 'upstream-429' -> 429 with retry-after, 'unsafe' -> content policy."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = body.get("prompt", "")
        if prompt == "upstream-429":
            self.reply(429, {"error": {"message": "Rate limit exceeded for images per minute.",
                                       "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
                       {"retry-after": "2"})
        elif prompt == "unsafe":
            self.reply(400, {"error": {"message": "Your request was rejected as a result of our safety system.",
                                       "type": "invalid_request_error", "param": None,
                                       "code": "content_policy_violation"}})
        else:
            self.reply(500, {"error": {"message": "unexpected", "type": "server_error", "param": None, "code": None}})

    def reply(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="session")
def fake_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory, fake_upstream):
    tmp = tmp_path_factory.mktemp("gw")
    port = free_port()
    config = tmp / "gateway.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{port}
public_url: http://127.0.0.1:{port}
data_dir: {tmp / "data"}
log: {{level: warn}}
backends:
  sandbox: {{kind: sandbox}}
  fake: {{kind: openai, base_url: "{fake_upstream}/v1", api_key: sk-upstream}}
  fake-throttled: {{kind: openai, base_url: "{fake_upstream}/v1", api_key: sk-upstream}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}
  remote: {{rules: dall-e-3, route: {{targets: [{{backend: fake}}]}}}}
  remote-throttled: {{rules: dall-e-3, route: {{targets: [{{backend: fake-throttled}}]}}}}
tenants:
  demo: {{models: ["*"]}}
  tight: {{models: ["*"], limits: {{requests_per_minute: 1}}}}
keys:
  - {{id: demo, tenant: demo, secret: sk-imagegate-demo}}
  - {{id: tight, tenant: tight, secret: sk-tight-limit}}
""")
    proc = subprocess.Popen([BIN, "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("gateway did not start: " + proc.stderr.read().decode())
            time.sleep(0.05)
    yield base
    proc.terminate()
    assert proc.wait(timeout=30) == 0
