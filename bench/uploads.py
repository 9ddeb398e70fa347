#!/usr/bin/env python3
"""Memory held by uploads in flight (issue 21): N concurrent edits, each of IMAGES images of
~MB megabytes, through the release binary against a sandbox that holds each request for DELAY
seconds; reports idle RSS, peak RSS, the bytes in flight and the ratio.

    python3 bench/uploads.py [--concurrency 32] [--images 16] [--mb 3] [--delay 3]

Goal (issue 21): peak RSS <= 1.3 x bytes in flight + idle RSS.
"""
import argparse
import http.client
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(width, height, seed):
    """An incompressible PNG (stored, not deflated) of about width*height*3 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = bytes((seed * 31 + i * 7) % 256 for i in range(width * 3))
    raw = b"".join(b"\x00" + row[y % 7:] + row[:y % 7] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--mb", type=float, default=3)
    ap.add_argument("--delay", type=float, default=3)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "imagegate"))
    args = ap.parse_args()

    side = int((args.mb * 1024 * 1024 / 3) ** 0.5)
    files = [png(side, side, i) for i in range(args.images)]
    boundary = "imagegatebenchboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (("model", "gpt-image-2"), ("prompt", "bench"))]
    for i, f in enumerate(files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image[]"; filename="{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "gw.yaml")
    with open(config, "w") as f:
        f.write(f"""
listen: 127.0.0.1:{port}
admin: {{listen: null}}
data_dir: {tmp}/data
log: {{level: warn}}
state: {{store: none}}
server: {{max_upload_bytes: {len(body) + 1024}, max_upload_memory: {8 * 1024 ** 3}}}
backends:
  sandbox: {{kind: sandbox, delay: {int(args.delay * 1000)}ms, max_concurrency: {args.concurrency}}}
models:
  gpt-image-2: {{rules: gpt-image, timeout: 300s, route: {{targets: [{{backend: sandbox}}]}}}}
tenants:
  bench: {{models: ["*"]}}
keys:
  - {{id: bench, tenant: bench, secret: sk-bench-uploads}}
""")
    gw = subprocess.Popen([args.bin, "serve", "--config", config], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.5)
        idle = rss_mib(gw.pid)
        peak = [idle]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mib(gw.pid))
                time.sleep(0.02)

        statuses = []

        def send():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            conn.request("POST", "/v1/images/edits", body=body, headers={
                "Authorization": "Bearer sk-bench-uploads",
                "Content-Type": f"multipart/form-data; boundary={boundary}"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=send) for _ in range(args.concurrency)]
        started = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.time() - started
        stop.set()
        sampler.join()
        time.sleep(3)
        after = rss_mib(gw.pid)
        time.sleep(27)
        later = rss_mib(gw.pid)
    finally:
        gw.terminate()
        gw.wait(timeout=30)
    in_flight = args.concurrency * len(body) / 1024 / 1024
    ok = statuses.count(200)
    print(f"uploads: {args.concurrency} concurrent edits x {args.images} images x {args.mb} MB "
          f"({len(body) / 1024 / 1024:.1f} MiB a request), sandbox holding each {args.delay}s; {ok}/{len(statuses)} answered 200 in {took:.1f}s")
    print(f"RSS: idle {idle:.1f} MiB, peak {peak[0]:.1f} MiB, {after:.1f} MiB 3 s after, {later:.1f} MiB 30 s after; "
          f"bytes in flight {in_flight:.0f} MiB; (peak - idle) / in flight = {(peak[0] - idle) / in_flight:.2f} "
          f"(goal <= 1.3)")
    return 0 if ok == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
