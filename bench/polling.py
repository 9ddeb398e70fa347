#!/usr/bin/env python3
"""The submit-and-poll engine under load (issue 22): N concurrent generations through the
release binary to a fake BFL API whose tasks finish 2-5 s after submission; reports the
gateway's peak RSS, its CPU seconds over the run, its thread count, the upstream's submit and
poll counts, and how many requests succeeded.

    cargo build --release --bin imagegate --example fake_bfl
    .venv/bin/python bench/polling.py [--concurrency 5000]
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
from pycommon import free_port, proc_stats, wait_up  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")






async def run(args, port):
    body = json.dumps({"model": "flux", "prompt": "a bench", "size": "256x256",
                       "response_format": "b64_json"}).encode()
    request = (f"POST /v1/images/generations HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
               f"authorization: Bearer sk-bench\r\ncontent-type: application/json\r\n"
               f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body

    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        await reader.read()
        writer.close()
        return status
    return await asyncio.gather(*(one() for _ in range(args.concurrency)), return_exceptions=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=5000)
    args = ap.parse_args()
    fake_port, gw_port = free_port(), free_port()
    fake = subprocess.Popen([os.path.join(RELEASE, "examples", "fake_bfl"), "--port", str(fake_port)],
                            stderr=subprocess.DEVNULL)
    wait_up(f"http://127.0.0.1:{fake_port}/stats")
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "gw.yaml")
    with open(config, "w") as f:
        f.write(f"""
listen: 127.0.0.1:{gw_port}
admin: {{listen: null}}
data_dir: {tmp}/data
log: {{level: error}}
backends:
  bfl: {{kind: bfl, base_url: "http://127.0.0.1:{fake_port}/v1", api_key: bench, poll_interval: 500ms,
         max_poll_interval: 2s, image_hosts: ["127.0.0.1"], allow_private_image_hosts: true,
         max_queue: 100000}}
models:
  flux: {{rules: dall-e-2, price: dall-e-2, timeout: 60s, route: {{targets: [{{backend: bfl, model: flux-pro-1.1}}]}}}}
tenants:
  bench: {{models: ["*"]}}
keys:
  - {{id: bench, tenant: bench, secret: sk-bench}}
""")
    gw = subprocess.Popen([os.path.join(RELEASE, "imagegate"), "serve", "--config", config],
                          stderr=subprocess.DEVNULL)
    wait_up(f"http://127.0.0.1:{gw_port}/healthz")
    idle_rss, cpu0, threads0 = proc_stats(gw.pid)
    peak = {"rss": idle_rss, "threads": threads0}

    async def sample():
        while True:
            rss, _, threads = proc_stats(gw.pid)
            peak["rss"], peak["threads"] = max(peak["rss"], rss), max(peak["threads"], threads)
            await asyncio.sleep(0.1)

    async def go():
        sampler = asyncio.create_task(sample())
        started = time.time()
        statuses = await run(args, gw_port)
        sampler.cancel()
        return statuses, time.time() - started

    statuses, wall = asyncio.run(go())
    _, cpu1, _ = proc_stats(gw.pid)
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{fake_port}/stats").read())
    ok = sum(1 for s in statuses if s == 200)
    errors = {}
    for s in statuses:
        if s != 200:
            errors[str(s)] = errors.get(str(s), 0) + 1
    print(json.dumps({
        "concurrency": args.concurrency, "ok": ok, "errors": errors, "wall_s": round(wall, 2),
        "gateway_cpu_s": round(cpu1 - cpu0, 2), "idle_rss_mib": round(idle_rss, 1),
        "peak_rss_mib": round(peak["rss"], 1), "threads_idle": threads0, "threads_peak": peak["threads"],
        "upstream_submits": stats["submits"], "upstream_polls": stats["polls"],
        "polls_per_job": round(stats["polls"] / max(stats["submits"], 1), 2),
    }, indent=1))
    gw.terminate()
    fake.terminate()


if __name__ == "__main__":
    main()
