#!/usr/bin/env python3
"""Interactive latency with and without a batch on the same local pool (issue 24): a sandbox
node with `max_concurrency: 2` and 200 ms jobs; one interactive client sends requests one
after another for --seconds; the second run also has a 2,000-line batch queued on the same
model. The batch may only take the capacity interactive traffic leaves.

    cargo build --release --bin imagegate
    python3 bench/batch_interference.py [--seconds 30]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time
import urllib.request
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycommon import batch_file_form, free_port, wait_up  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "imagegate")




def call(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def run(seconds, with_batch):
    port = free_port()
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "gw.yaml")
    with open(config, "w") as f:
        f.write(f"""
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {tmp}/data
log: {{level: error}}
backends:
  node: {{kind: sandbox, delay: 200ms, max_concurrency: 2, max_queue: 100}}
models:
  sd: {{rules: dall-e-2, price: free, route: {{targets: [{{backend: node}}]}}}}
tenants:
  t: {{models: ["*"]}}
keys:
  - {{id: k, tenant: t, secret: sk-bench}}
""")
    gw = subprocess.Popen([BIN, "serve", "--config", config], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_up(f"{base}/healthz")
    auth = {"authorization": "Bearer sk-bench"}
    batch_id = None
    if with_batch:
        lines = "\n".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/images/generations",
                                      "body": {"model": "sd", "prompt": "p", "size": "256x256"}})
                          for i in range(2000)).encode()
        body, content_type = batch_file_form(lines)
        f = call(f"{base}/v1/files", body, {**auth, "content-type": content_type})
        b = call(f"{base}/v1/batches", json.dumps({"input_file_id": f["id"], "endpoint": "/v1/images/generations",
                                                    "completion_window": "24h"}).encode(),
                 {**auth, "content-type": "application/json"})
        batch_id = b["id"]
        time.sleep(2)  # the batch fills the node first
    lat = []
    end = time.time() + seconds
    body = json.dumps({"model": "sd", "prompt": "p", "size": "256x256", "response_format": "b64_json"}).encode()
    while time.time() < end:
        t0 = time.monotonic()
        call(f"{base}/v1/images/generations", body, {**auth, "content-type": "application/json"})
        lat.append(time.monotonic() - t0)
    done = None
    if batch_id:
        done = call(f"{base}/v1/batches/{batch_id}", headers=auth)["request_counts"]["completed"]
    gw.terminate()
    lat.sort()
    q = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000)
    return {"batch": with_batch, "interactive_requests": len(lat), "p50_ms": q(0.5), "p99_ms": q(0.99),
            "batch_lines_done": done, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=30)
    args = ap.parse_args()
    for with_batch in (False, True):
        print(json.dumps(run(args.seconds, with_batch)))


if __name__ == "__main__":
    main()
