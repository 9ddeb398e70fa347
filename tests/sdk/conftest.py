"""Fixtures: the real imagegate binary on a free loopback port, and a fake OpenAI upstream
(stdlib HTTP server speaking the Images API and its error shapes)."""

import base64
import hashlib
import json
import os
import struct
import zlib
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


def png(width, height):
    """A real (solid grey) PNG of the given size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# Every multipart request the fake received: {"path", "fields", "files": [(name, filename, bytes)]}.
UPLOADS = []
# The gateway's admin API (filled in by the gateway fixture).
ADMIN = {"base": None, "token": "sdk-admin-token"}

# Every JSON body the fake received, in order.
JSON_BODIES = []


def parse_multipart(content_type, raw):
    """A multipart/form-data body as (text fields, [(name, filename, bytes)]), with the stdlib."""
    from email.parser import BytesParser
    from email.policy import HTTP
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    fields, files = {}, []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        data = part.get_payload(decode=True)
        if filename is None:
            fields[name] = data.decode()
        else:
            files.append((name, filename, data))
    return fields, files


USAGE = {"input_tokens": 50, "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
         "output_tokens": 4160, "total_tokens": 4210}


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers by prompt: 'upstream-429' -> 429 with retry-after, 'unsafe' -> content policy.
    GPT image models get the GPT image dialect, streamed as server-sent events on stream=true."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def gpt_image(self, body, event="image_generation"):
        for bad in ("response_format", "style"):
            if bad in body:
                return self.reply(400, {"error": {"message": f"Unknown parameter: '{bad}'.",
                                                  "type": "invalid_request_error", "param": bad, "code": None}})
        size = body.get("size", "auto")
        w, h = (1024, 1024) if size == "auto" else map(int, size.split("x"))
        image = base64.b64encode(png(w, h)).decode()
        common = {"background": "opaque", "output_format": body.get("output_format", "png"),
                  "quality": "medium", "size": f"{w}x{h}"}
        if not body.get("stream"):
            return self.reply(200, {"created": 1745000000, **common,
                                    "data": [{"b64_json": image}] * body.get("n", 1), "usage": USAGE})
        events = [{"type": f"{event}.partial_image", "b64_json": image, "partial_image_index": i,
                   "created_at": 1745000000, **common} for i in range(body.get("partial_images", 0))]
        events.append({"type": f"{event}.completed", "b64_json": image, "created_at": 1745000000,
                       **common, "usage": USAGE})
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True

    # Black Forest Labs (submit, then poll) and Gemini (generateContent), as section 7 of
    # UPSTREAMS.md describes them: enough for the SDK to generate through both kinds.
    BFL_TASKS = {}

    def bfl_submit(self, body):
        if self.headers.get("x-key") != "bfl-sdk-key":
            return self.reply(403, {"detail": "Not authenticated"})
        task = f"t{len(self.BFL_TASKS) + 1}"
        self.BFL_TASKS[task] = {"w": body["width"], "h": body["height"], "polls": 0}
        host = self.headers["host"]
        self.reply(200, {"id": task, "polling_url": f"http://{host}/bfl/v1/get_result?id={task}"})

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/bfl/v1/get_result":
            task = self.BFL_TASKS.get(query.removeprefix("id="))
            if task is None or self.headers.get("x-key") != "bfl-sdk-key":
                return self.reply(404, {"detail": "Task not found"})
            task["polls"] += 1
            if task["polls"] < 2:
                return self.reply(200, {"id": query, "status": "Pending"})
            sample = f"http://{self.headers['host']}/bfl/files/{task['w']}x{task['h']}.png"
            return self.reply(200, {"id": query, "status": "Ready", "result": {"sample": sample}})
        if path.startswith("/bfl/files/"):
            w, h = map(int, path.rsplit("/", 1)[1].removesuffix(".png").split("x"))
            data = png(w, h)
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.reply(404, {"detail": "Not Found"})

    def gemini(self, body):
        if self.headers.get("x-goog-api-key") != "gemini-sdk-key":
            return self.reply(403, {"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}})
        ratio = body["generationConfig"]["imageConfig"]["aspectRatio"]
        w, h = {"1:1": (1024, 1024), "16:9": (1344, 768), "9:16": (768, 1344)}.get(ratio, (1024, 1024))
        image = base64.b64encode(png(w, h)).decode()
        self.reply(200, {"candidates": [{"content": {"parts": [{"text": "A calm sea."},
                                                               {"inlineData": {"mimeType": "image/png", "data": image}}]},
                                         "finishReason": "STOP"}],
                         "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1290,
                                           "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}]}})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["content-length"]))
        if self.path.startswith("/bfl/v1/"):
            return self.bfl_submit(json.loads(raw))
        if self.path.startswith("/gemini/"):
            return self.gemini(json.loads(raw))
        if self.headers["content-type"].startswith("multipart/form-data"):
            body, files = parse_multipart(self.headers["content-type"], raw)
            UPLOADS.append({"path": self.path, "fields": body, "files": files})
            event = "image_edit"
        else:
            body, event = json.loads(raw), "image_generation"
            JSON_BODIES.append(body)
        for key in ("n", "partial_images"):
            if key in body:
                body[key] = int(body[key])
        if "stream" in body:
            body["stream"] = body["stream"] in (True, "true")
        prompt = body.get("prompt", "")
        if body.get("model", "").startswith("gpt-image"):
            self.gpt_image(body, event)
        elif prompt == "upstream-429":
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
    admin_port = free_port()
    ADMIN["base"] = f"http://127.0.0.1:{admin_port}"
    token_sha = hashlib.sha256(ADMIN["token"].encode()).hexdigest()
    config = tmp / "gateway.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}, tokens_sha256: [{token_sha}]}}
webhooks: {{allow_private_hosts: true, allow_http: true}}
public_url: http://127.0.0.1:{port}
data_dir: {tmp / "data"}
log: {{level: warn}}
backends:
  sandbox: {{kind: sandbox}}
  slow-sandbox: {{kind: sandbox, delay: 1500ms}}
  fake: {{kind: openai, base_url: "{fake_upstream}/v1", api_key: sk-upstream}}
  fake-throttled: {{kind: openai, base_url: "{fake_upstream}/v1", api_key: sk-upstream}}
  fake-bfl: {{kind: bfl, base_url: "{fake_upstream}/bfl/v1", api_key: bfl-sdk-key, poll_interval: 50ms,
              image_hosts: ["127.0.0.1"], allow_private_image_hosts: true}}
  fake-gemini: {{kind: gemini, base_url: "{fake_upstream}/gemini/v1beta", api_key: gemini-sdk-key}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}
  slow: {{rules: dall-e-2, route: {{targets: [{{backend: slow-sandbox}}]}}}}
  remote: {{rules: dall-e-3, route: {{targets: [{{backend: fake}}]}}}}
  remote-throttled: {{rules: dall-e-3, route: {{targets: [{{backend: fake-throttled}}]}}}}
  gpt-image-2: {{rules: gpt-image-2, route: {{targets: [{{backend: fake, dialect: gpt-image}}]}}}}
  flux-kontext-pro: {{rules: flux-kontext-pro, route: {{targets: [{{backend: fake-bfl}}]}}}}
  gemini-3-pro-image: {{rules: gemini-3-pro-image, route: {{targets: [{{backend: fake-gemini}}]}}}}
  gpt-image-1.5: {{rules: gpt-image-1.5, route: {{targets: [{{backend: fake, dialect: gpt-image}}]}}}}
  gpt-image-2.5-sunburst: {{rules: gpt-image-2.5-sunburst, route: {{targets: [{{backend: fake, dialect: gpt-image}}]}}}}
  dall-e-3-on-gpt: {{rules: dall-e-3, route: {{targets: [{{backend: fake, model: gpt-image-2, dialect: gpt-image}}]}}}}
tenants:
  demo: {{models: ["*"]}}
  tight: {{models: ["*"], limits: {{requests_per_minute: 1}}}}
  quick: {{models: ["*"], limits: {{requests_per_minute: 30, burst: 1}}}}
  broke: {{models: ["*"], limits: {{budget: {{micro_usd: 16000, period: total}}}}}}
keys:
  - {{id: demo, tenant: demo, secret: sk-imagegate-demo}}
  - {{id: tight, tenant: tight, secret: sk-tight-limit}}
  - {{id: quick, tenant: quick, secret: sk-quick-limit}}
  - {{id: broke, tenant: broke, secret: sk-broke-budget}}
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
