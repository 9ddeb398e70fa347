#!/usr/bin/env python3
"""Peak memory of the gateway under large base64 answers.

Starts the release gateway (pinned to core 0) in front of bench's fake upstream (core 1),
fires CONCURRENCY parallel requests for n=N images of SIZE raw bytes each (base64 in the
answer, b64_json asked by the client: the passthrough path), several rounds, and reports the
gateway's idle RSS and its peak RSS (VmHWM). Run: python3 bench/memory.py [--n 10]
[--size 1500000] [--concurrency 16] [--rounds 3] [--format b64_json|url]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
    return 0


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--size", type=int, default=1_500_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--format", default="b64_json")
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--bins", "--example", "fake_upstream"],
                   cwd=ROOT, check=True)
    up_port, gw_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"""
listen: 127.0.0.1:{gw_port}
admin: {{listen: null}}
data_dir: {tmp / 'data'}
log: {{level: warn}}
backends:
  up: {{kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", api_key: sk-bench}}
models:
  bench: {{rules: {{sizes: [1024x1024], max_n: 10}}, route: {{targets: [{{backend: up}}]}}}}
tenants:
  t: {{models: ["*"], limits: {{requests_per_minute: 1000000, images_per_minute: 10000000}}}}
keys:
  - {{id: bench, tenant: t, secret: sk-bench-key}}
""")
    up = subprocess.Popen(["taskset", "-c", "1", str(ROOT / "target/release/examples/fake_upstream"),
                           "--port", str(up_port), "--b64-bytes", str(args.size)],
                          stderr=subprocess.DEVNULL)
    gw = subprocess.Popen(["taskset", "-c", "0", str(ROOT / "target/release/imagegate"), "serve",
                           "--config", str(cfg)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_port(up_port)
        wait_port(gw_port)
        time.sleep(0.3)
        idle = status(gw.pid, "VmRSS")
        body = json.dumps({"model": "bench", "prompt": "p", "n": args.n,
                           "response_format": args.format}).encode()
        received = []

        def one():
            req = urllib.request.Request(f"http://127.0.0.1:{gw_port}/v1/images/generations", data=body,
                                         headers={"Authorization": "Bearer sk-bench-key",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                received.append(len(r.read()))

        started = time.time()
        for _ in range(args.rounds):
            threads = [threading.Thread(target=one) for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elapsed = time.time() - started
        peak = status(gw.pid, "VmHWM")
        after = status(gw.pid, "VmRSS")
        total = sum(received)
        answer_mb = total / len(received) / 1e6
        print(f"machine: {os.cpu_count()} cores; gateway pinned to core 0, fake upstream to core 1")
        print(f"requests: {len(received)} ({args.concurrency} concurrent x {args.rounds} rounds), "
              f"n={args.n}, {args.size} raw bytes per image, response_format={args.format}")
        images_mb = len(received) * args.n * args.size / 1e6
        print(f"answer size: {answer_mb:.2f} MB each; {total / elapsed / 1e6:.0f} MB/s of answers, "
              f"{images_mb / elapsed:.0f} MB/s of images (raw) through the gateway")
        print(f"gateway RSS idle: {idle / 1024:.1f} MiB; peak: {peak / 1024:.1f} MiB; after: {after / 1024:.1f} MiB")
        upstream_mb = args.n * args.size * 4 / 3 / 1e6
        print(f"peak / (concurrency x upstream answer of {upstream_mb:.1f} MB): "
              f"{peak / 1024 / (args.concurrency * upstream_mb / 1.048576):.2f}")
    finally:
        gw.terminate()
        up.terminate()
        gw.wait()
        up.wait()


if __name__ == "__main__":
    sys.exit(main())
