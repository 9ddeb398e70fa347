"""The public API against its OpenAPI 3.1 document (docs/openapi.json, served at
/openapi.json): Schemathesis generates requests from the document, valid and invalid, for every
operation and checks that each answer has a documented status and content type, matches its
documented schema (errors are OpenAI-shaped), that no request gets a 5xx, and that requests the
document says are invalid are refused."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("IMAGEGATE_BIN", str(ROOT / "target" / "release" / "imagegate"))
KEY = "sk-schema-fuzz-key"
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,negative_data_rejection")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data):
    port = free_port()
    config = Path(data) / "gateway.yaml"
    config.write_text(f"""
listen: 127.0.0.1:{port}
public_url: http://127.0.0.1:{port}
data_dir: {data}
log: {{level: error}}
admin: {{listen: null}}
backends:
  sandbox: {{kind: sandbox}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}
tenants:
  fuzz: {{models: ["*"]}}
keys:
  - {{id: fuzz, tenant: fuzz, secret: {KEY}}}
""")
    proc = subprocess.Popen([BIN, "serve", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(Path(data) / "log", "w"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1)
            return proc, base
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the gateway did not start")


def test_the_served_document_is_the_repository_one():
    with tempfile.TemporaryDirectory() as data:
        proc, base = start(data)
        try:
            served = urllib.request.urlopen(base + "/openapi.json", timeout=5).read()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert json.loads(served) == json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert json.loads(served)["openapi"].startswith("3.1")


def test_schemathesis_finds_no_undocumented_answer_and_no_server_error():
    examples = os.environ.get("SCHEMATHESIS_EXAMPLES", "100")
    seed = os.environ.get("SCHEMATHESIS_SEED", "3")
    schemathesis = str(Path(os.sys.executable).parent / "schemathesis")
    with tempfile.TemporaryDirectory() as data:
        proc, base = start(data)
        try:
            run = subprocess.run(
                [schemathesis, "run", base + "/openapi.json", "-H", f"Authorization: Bearer {KEY}",
                 "--checks", CHECKS, "-n", examples, "--seed", seed, "--no-color",
                 "--request-timeout", "60"],
                capture_output=True, text=True, timeout=1800,
                env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    summary = run.stdout[run.stdout.find("SUMMARY"):]
    print(summary)
    assert run.returncode == 0, run.stdout[-20000:]
    assert "generated" in summary and " passed" in summary
    assert alive, "the gateway died under the fuzzer"
