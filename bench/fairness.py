#!/usr/bin/env python3
"""Fair sharing of a one-job node (issue 27): tenant A keeps 50 requests in flight, tenant B
sends one request every 2 s; the node (a sandbox backend with `delay: 1s`, `max_concurrency:
1`) does one 1-second job at a time and the model's timeout is 20 s. Reports B's latency
(its wait is the latency less the 1 s job), A's throughput, and A's shed (503) and timed-out
(504) requests; once with the fair queues and shedding (the default), once as FIFO.

    cargo build --release --bin imagegate
    python3 bench/fairness.py [--seconds 60]
"""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pycommon import free_port, wait_up  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "imagegate")




async def post(port, key):
    body = json.dumps({"model": "sd", "prompt": "p", "size": "256x256", "response_format": "b64_json"}).encode()
    head = (f"POST /v1/images/generations HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n")
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status, time.monotonic() - started


async def load(port, seconds):
    end = time.monotonic() + seconds
    a = {"200": 0, "503": 0, "504": 0, "other": 0}
    b = []

    async def worker():
        while time.monotonic() < end:
            status, _ = await post(port, "sk-tenant-a")
            a[str(status) if str(status) in a else "other"] += 1
            if status == 503:
                await asyncio.sleep(1)  # an SDK honours retry-after; 1 s keeps A pushing

    async def b_sender():
        while time.monotonic() < end:
            asyncio.get_running_loop().create_task(one_b())
            await asyncio.sleep(2)

    async def one_b():
        status, took = await post(port, "sk-tenant-b")
        b.append((status, took))

    await asyncio.gather(*(worker() for _ in range(50)), b_sender())
    await asyncio.sleep(25)  # let B's last requests finish
    return a, b


def run(seconds, fair):
    port = free_port()
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "gw.yaml")
    with open(config, "w") as f:
        f.write(f"""
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {tmp}/data
log: {{level: error}}
server: {{fair_queues: {str(fair).lower()}, shed_before_deadline: {str(fair).lower()}}}
backends:
  node: {{kind: sandbox, delay: 1s, max_concurrency: 1, max_queue: 200, queue_timeout: 60s}}
models:
  sd: {{rules: dall-e-2, price: free, timeout: 20s, route: {{targets: [{{backend: node}}]}}}}
tenants:
  a: {{models: ["*"]}}
  b: {{models: ["*"]}}
keys:
  - {{id: a, tenant: a, secret: sk-tenant-a}}
  - {{id: b, tenant: b, secret: sk-tenant-b}}
""")
    gw = subprocess.Popen([BIN, "serve", "--config", config], stderr=subprocess.DEVNULL)
    wait_up(f"http://127.0.0.1:{port}/healthz")
    a, b = asyncio.run(load(port, seconds))
    gw.terminate()
    gw.wait()
    ok = sorted(t for s, t in b if s == 200)
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None
    return {
        "mode": "fair + shedding" if fair else "FIFO",
        "b_requests": len(b), "b_ok": len(ok),
        "b_other": sorted({s for s, _ in b if s != 200}),
        "b_wait_p50_s": round(pct(0.5) - 1, 2) if ok else None,
        "b_wait_p99_s": round(pct(0.99) - 1, 2) if ok else None,
        "a_ok_per_s": round(a["200"] / seconds, 2),
        "a_shed_503": a["503"], "a_timed_out_504": a["504"], "a_other": a["other"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit("build the release binary first: cargo build --release --bin imagegate")
    for fair in (True, False):
        print(json.dumps(run(args.seconds, fair)))


if __name__ == "__main__":
    main()
