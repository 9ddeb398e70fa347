#!/usr/bin/env python3
"""A large batch through the release binary (issue 24): N generation lines (default 10,000)
against the fast fake upstream (bench/fake_upstream.rs, URL answers); reports lines per
second from `in_progress` to `completed`, the gateway's CPU per line and its peak RSS.

    cargo build --release --bin imagegate --example fake_upstream
    python3 bench/batch.py [--lines 10000]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycommon import batch_file_form, free_port, proc_stats, wait_up  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")





def call(url, data=None, headers=None, method=None):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=10_000)
    args = ap.parse_args()
    up, port = free_port(), free_port()
    fake = subprocess.Popen([os.path.join(RELEASE, "examples", "fake_upstream"), "--port", str(up)],
                            stderr=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "gw.yaml")
    with open(config, "w") as f:
        f.write(f"""
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {tmp}/data
log: {{level: error}}
backends:
  up: {{kind: openai, base_url: "http://127.0.0.1:{up}/v1", api_key: sk-bench, image_hosts: ["images.example"]}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: up}}]}}}}
tenants:
  bench: {{models: ["*"]}}
keys:
  - {{id: bench, tenant: bench, secret: sk-bench}}
""")
    gw = subprocess.Popen([os.path.join(RELEASE, "imagegate"), "serve", "--config", config],
                          stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_up(f"{base}/healthz")
    auth = {"authorization": "Bearer sk-bench"}
    lines = "\n".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/images/generations",
                                  "body": {"model": "dall-e-2", "prompt": f"p{i}", "size": "256x256"}})
                      for i in range(args.lines)).encode()
    body, content_type = batch_file_form(lines)
    f = call(f"{base}/v1/files", body, {**auth, "content-type": content_type})
    rss0, cpu0 = proc_stats(gw.pid)[:2]
    peak = [rss0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc_stats(gw.pid)[:2][0])
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    b = call(f"{base}/v1/batches", json.dumps({"input_file_id": f["id"], "endpoint": "/v1/images/generations",
                                                "completion_window": "24h"}).encode(),
             {**auth, "content-type": "application/json"})
    while b["status"] not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.5)
        b = call(f"{base}/v1/batches/{b['id']}", headers=auth)
    stop.set()
    _, cpu1 = proc_stats(gw.pid)[:2]
    took = b["completed_at"] - b["in_progress_at"]
    print(json.dumps({"lines": args.lines, "status": b["status"], "counts": b["request_counts"],
                      "in_progress_to_completed_s": took,
                      "lines_per_s": round(args.lines / max(took, 1), 1),
                      "gateway_cpu_ms_per_line": round((cpu1 - cpu0) * 1000 / args.lines, 3),
                      "idle_rss_mib": round(rss0, 1), "peak_rss_mib": round(peak[0], 1)}))
    gw.terminate()
    fake.terminate()


if __name__ == "__main__":
    sys.exit(main())
