"""The Batch API through the official `openai` SDK: upload a JSONL file, create a batch, poll it
to `completed`, download the output and check every line's image; cancel a batch mid-way; a
bad file fails with line numbers; another tenant's ids are 404."""

import base64
import json
import struct
import time

import openai
import pytest
from openai import OpenAI


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def client(gateway):
    return OpenAI(api_key="sk-imagegate-demo", base_url=f"{gateway}/v1", max_retries=0)


def jsonl(lines):
    return ("\n".join(json.dumps(l) for l in lines) + "\n").encode()


def line(custom_id, model="dall-e-2", size="256x256", **body):
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/images/generations",
            "body": {"model": model, "prompt": f"tile {custom_id}", "size": size,
                     "response_format": "b64_json", **body}}


def wait_for(client, batch_id, states, seconds=90):
    end = time.time() + seconds
    while time.time() < end:
        b = client.batches.retrieve(batch_id)
        if b.status in states:
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} stuck in {b.status}")


def test_a_batch_runs_to_completed_and_every_line_is_in_the_output(client):
    lines = [line(f"req-{i}", size=["256x256", "512x512"][i % 2]) for i in range(12)]
    f = client.files.create(file=("tiles.jsonl", jsonl(lines)), purpose="batch")
    assert (f.purpose, f.bytes) == ("batch", len(jsonl(lines)))
    assert client.files.retrieve(f.id).filename == "tiles.jsonl"
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                              completion_window="24h", metadata={"job": "tiles"})
    assert b.status in ("validating", "in_progress")
    assert b.metadata == {"job": "tiles"}
    b = wait_for(client, b.id, {"completed", "failed"})
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (12, 12, 0)
    assert b.completed_at and b.output_file_id and b.error_file_id is None
    out = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(l["custom_id"] for l in lines)
    for o in out:
        assert o["response"]["status_code"] == 200
        assert o["response"]["request_id"]
        i = int(o["custom_id"].split("-")[1])
        side = [256, 512][i % 2]
        image = base64.b64decode(o["response"]["body"]["data"][0]["b64_json"])
        assert png_size(image) == (side, side)
    assert b.id in [x.id for x in client.batches.list(limit=100)]


def test_cancel_mid_way_ends_cancelled_with_the_rest_uncharged(client):
    lines = [line(f"slow-{i}", model="slow") for i in range(30)]
    f = client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h")
    time.sleep(1)
    b = client.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled")
    b = wait_for(client, b.id, {"cancelled"})
    assert b.cancelled_at
    done = b.request_counts.completed
    assert done < 30
    errors = [json.loads(l) for l in client.files.content(b.error_file_id).text.splitlines()]
    cancelled = [e for e in errors if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(cancelled) + done == 30


def test_a_bad_file_fails_the_batch_naming_its_lines(client):
    lines = [line("ok-1"), line("ok-1"), {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}},
             line("big", size="1792x1024"), line("nobody", model="no-such-model")]
    f = client.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h")
    assert b.status == "failed"
    got = [(e.line, e.code, e.param) for e in b.errors.data]
    assert got == [(2, "duplicate_custom_id", "custom_id"), (3, "mismatched_url", "url"),
                   (4, "invalid_request", "body.size"), (5, "invalid_request", "body.model")]
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert e.value.param == "endpoint"


def test_another_tenants_file_and_batch_are_404(client, gateway):
    f = client.files.create(file=("mine.jsonl", jsonl([line("m-1")])), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h")
    other = OpenAI(api_key="sk-tight-limit", base_url=f"{gateway}/v1", max_retries=0)
    for call in (lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
                 lambda: other.batches.retrieve(b.id), lambda: other.batches.cancel(b.id),
                 lambda: other.batches.create(input_file_id=f.id, endpoint="/v1/images/generations",
                                              completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert f.id not in [x.id for x in other.files.list()]
    wait_for(client, b.id, {"completed"})


def test_a_batch_webhook_verifies_with_the_sdks_unwrap(client):
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from conftest import ADMIN, free_port

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        req = urllib.request.Request(f"{ADMIN['base']}/admin/v1/tenants/demo/webhooks", method="POST",
                                     data=json.dumps({"url": f"http://127.0.0.1:{port}/hook"}).encode(),
                                     headers={"authorization": f"Bearer {ADMIN['token']}",
                                              "content-type": "application/json"})
        hook = json.loads(urllib.request.urlopen(req).read())
        assert hook["secret"].startswith("whsec_")
        f = client.files.create(file=("one.jsonl", jsonl([line("w-1")])), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/images/generations", completion_window="24h")
        wait_for(client, b.id, {"completed"})
        end = time.time() + 30
        while time.time() < end and not any(json.loads(body)["data"]["id"] == b.id for _, body in received):
            time.sleep(0.1)
        headers, body = next((h, body) for h, body in received if json.loads(body)["data"]["id"] == b.id)
        event = client.webhooks.unwrap(body, headers, secret=hook["secret"])
        assert (event.type, event.data.id) == ("batch.completed", b.id)
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(body, headers, secret="whsec_" + base64.b64encode(b"x" * 32).decode())
    finally:
        server.shutdown()
