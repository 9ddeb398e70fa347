#!/usr/bin/env python3
"""A multi-replica soak, everything on 127.0.0.1: two gateway replicas behind nginx sharing
PostgreSQL, Redis and an S3-compatible store (moto); mixed traffic from many keys (generations
in both formats, streaming, idempotent retries, keys revoked mid-run, budgets that run out);
replica B `kill -9`ed midway and restarted. Afterwards it checks, and exits 1 on any difference:

  1. every 200 the clients saw has exactly one ledger row;
  2. each budget's spent equals the sum of its ledger charges;
  3. no budget went over;
  4. each rate-limited key's admitted requests are within its limit;
  5. no idempotent retry generated twice (and each was answered as a replay);
  6. no revoked key served a request sent more than a second after its revocation.

Run by scripts/soak.sh (which builds the release binary and finds the tools):
    python3 scripts/soak.py --seconds 120 --bin target/release/imagegate --nginx /usr/sbin/nginx
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

ADMIN = "soak-admin-token-0123456789"
SIGNING = "soak-signing-key-0123456789abcdef0123456789"
DALLE2_256 = 16_000  # micro-dollars per image (catalog price of dall-e-2 at 256x256)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, deadline=30):
    end = time.time() + deadline
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{url} did not come up")


def psql(db_url, sql):
    out = subprocess.run(["psql", "-At", "-F", "\t", db_url, "-c", sql], check=True,
                         capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


class Cluster:
    def __init__(self, args, tmp):
        self.args, self.tmp, self.procs = args, tmp, {}
        self.db = f"soak_{os.getpid()}_{random.randrange(10**6)}"
        subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c", f"CREATE DATABASE {self.db}"], check=True)
        self.db_url = f"postgres://postgres@127.0.0.1:5432/{self.db}"
        self.redis_port, self.s3_port, self.lb_port = free_port(), free_port(), free_port()
        self.ports = {"a": (free_port(), free_port()), "b": (free_port(), free_port())}
        self.spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        self.spawn("s3", [args.moto, "-H", "127.0.0.1", "-p", str(self.s3_port)])
        wait_up(f"http://127.0.0.1:{self.s3_port}/")
        req = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/soak", method="PUT")
        urllib.request.urlopen(req, timeout=10)
        for name in "ab":
            self.write_config(name)
            self.start(name)
        self.nginx()

    def spawn(self, name, cmd, **kw):
        log = open(os.path.join(self.tmp, f"{name}.log"), "a")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, **kw)

    def write_config(self, name):
        port, admin = self.ports[name]
        with open(os.path.join(self.tmp, f"{name}.yaml"), "w") as f:
            f.write(f"""
listen: 127.0.0.1:{port}
public_url: http://127.0.0.1:{self.lb_port}
data_dir: {self.tmp}/data-{name}
log: {{level: error}}
admin: {{listen: "127.0.0.1:{admin}", tokens_sha256: ["{hash_key(self.args.bin, ADMIN)}"]}}
state:
  store: postgres
  postgres: "{self.db_url}"
  redis: {{url: "redis://127.0.0.1:{self.redis_port}/0"}}
images:
  store: s3
  signing_key: "{SIGNING}"
  s3: {{bucket: soak, endpoint: "http://127.0.0.1:{self.s3_port}", region: us-east-1,
        access_key_id: testing, secret_access_key: testing, path_style: true}}
backends:
  sandbox: {{kind: sandbox}}
models:
  dall-e-2: {{rules: dall-e-2, route: {{targets: [{{backend: sandbox}}]}}}}
  dall-e-3: {{rules: dall-e-3, route: {{targets: [{{backend: sandbox}}]}}}}
  gpt-local: {{rules: gpt-image-2, route: {{targets: [{{backend: sandbox}}]}}}}
""")

    def start(self, name):
        port, admin = self.ports[name]
        self.spawn(name, [self.args.bin, "serve", "--config", os.path.join(self.tmp, f"{name}.yaml")])
        wait_up(f"http://127.0.0.1:{port}/healthz")

    def kill9(self, name):
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def nginx(self):
        a, b = self.ports["a"][0], self.ports["b"][0]
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
daemon off; worker_processes 1; pid {self.tmp}/nginx.pid; error_log {self.tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; client_body_temp_path {self.tmp}/nginx-body; proxy_temp_path {self.tmp}/nginx-proxy;
  upstream gw {{ server 127.0.0.1:{a} max_fails=1 fail_timeout=2s; server 127.0.0.1:{b} max_fails=1 fail_timeout=2s; keepalive 32; }}
  server {{
    listen 127.0.0.1:{self.lb_port};
    location / {{ proxy_pass http://gw; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_read_timeout 120s; }}
  }}
}}
""")
        self.spawn("nginx", [self.args.nginx, "-c", conf, "-e", os.path.join(self.tmp, "nginx-error.log")])
        wait_up(f"http://127.0.0.1:{self.lb_port}/healthz")

    def admin(self, method, path, body=None):
        url = f"http://127.0.0.1:{self.ports['a'][1]}/admin/v1{path}"
        req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-c",
                        f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)"], capture_output=True)


def hash_key(binary, secret):
    return subprocess.run([binary, "hash-key"], input=secret, capture_output=True, text=True, check=True).stdout.strip()


class Traffic:
    """Worker threads sending mixed requests through nginx; every answer recorded."""

    def __init__(self, port, keys, seconds):
        self.port, self.keys, self.until = port, keys, time.time() + seconds
        self.lock = threading.Lock()
        self.seen = []          # dicts: id, key, status, sent, replay, idem
        self.revoked = {}       # key id -> time the revocation returned
        self.replay_bad = []    # idempotent retries not answered as a replay of the same body

    def post(self, conn, key, body, headers=None):
        rid = "soak-" + uuid.uuid4().hex
        h = {"authorization": f"Bearer {key['secret']}", "content-type": "application/json", "x-request-id": rid}
        h.update(headers or {})
        sent = time.time()
        try:
            conn.request("POST", "/v1/images/generations", json.dumps(body), h)
            resp = conn.getresponse()
            data = resp.read()
            status, replayed = resp.status, resp.getheader("idempotent-replayed") == "true"
        except (OSError, http.client.HTTPException):
            conn.close()
            status, data, replayed = 0, b"", False
        with self.lock:
            self.seen.append({"id": rid, "key": key["id"], "status": status, "sent": sent,
                              "replay": replayed, "idem": (headers or {}).get("idempotency-key")})
        return status, data, replayed

    def worker(self, seed):
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while time.time() < self.until:
            key = rng.choice(self.keys)
            kind = rng.random()
            if kind < 0.45:
                self.post(conn, key, {"model": "dall-e-2", "prompt": "soak", "size": "256x256", "response_format": "b64_json"})
            elif kind < 0.65:
                status, data, _ = self.post(conn, key, {"model": "dall-e-2", "prompt": "soak url", "size": "256x256"})
                if status == 200:
                    url = json.loads(data)["data"][0]["url"]
                    path = url.split(f":{self.port}", 1)[1]
                    conn.request("GET", path)
                    img = conn.getresponse()
                    body = img.read()
                    if img.status != 200 or not body.startswith(b"\x89PNG"):
                        with self.lock:
                            self.replay_bad.append(f"hosted image {path}: {img.status}")
            elif kind < 0.80:
                self.post(conn, key, {"model": "gpt-local", "prompt": "soak stream", "size": "1024x1024", "stream": True})
            else:
                idem = "soak-idem-" + uuid.uuid4().hex
                body = {"model": "dall-e-2", "prompt": "soak idem", "size": "256x256", "response_format": "b64_json"}
                first, data1, _ = self.post(conn, key, body, {"idempotency-key": idem})
                if first == 200:
                    second, data2, replayed = self.post(conn, key, body, {"idempotency-key": idem})
                    if second == 200 and (not replayed or data1 != data2):
                        with self.lock:
                            self.replay_bad.append(idem)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=120)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--moto", required=True)
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="imagegate-soak-")
    cluster = Cluster(args, tmp)
    failures = []
    try:
        keys, budgets, limited = [], {}, {}
        for t in range(6):
            tenant = f"soak-t{t}"
            # Two tenants with budgets small enough to run out during the run.
            budget = {"micro_usd": 40 * DALLE2_256, "period": "daily"} if t < 2 else None
            cluster.admin("POST", "/tenants", {"id": tenant, "models": ["*"], "budget": budget,
                                               "limits": {"requests_per_minute": 6000}})
            if budget:
                budgets[tenant] = budget["micro_usd"]
            for k in range(3):
                limits = {"requests_per_minute": 60} if k == 0 else None
                key = cluster.admin("POST", "/keys", {"tenant": tenant, "name": f"k{k}", "limits": limits})
                keys.append({"id": key["id"], "secret": key["secret"], "tenant": tenant})
                if limits:
                    limited[key["id"]] = limits["requests_per_minute"]
        time.sleep(1.5)  # every replica sees the new keys
        traffic = Traffic(cluster.lb_port, keys, args.seconds)
        threads = [threading.Thread(target=traffic.worker, args=(i,)) for i in range(args.workers)]
        started = time.time()
        for th in threads:
            th.start()
        # Keys revoked at 40% of the run; replica B killed at 50% and restarted 3 s later.
        time.sleep(args.seconds * 0.4)
        for key in (keys[4], keys[10]):
            cluster.admin("POST", f"/keys/{key['id']}/revoke")
            traffic.revoked[key["id"]] = time.time()
        time.sleep(max(0.0, started + args.seconds * 0.5 - time.time()))
        cluster.kill9("b")
        killed_at = time.time() - started
        time.sleep(3)
        cluster.start("b")
        for th in threads:
            th.join()
        time.sleep(3)  # the ledgers' last group commits

        seen = traffic.seen
        ok = [s for s in seen if s["status"] == 200]
        rows = psql(cluster.db_url, "SELECT request_id, key_id, tenant, status, cost_micro_usd, idempotency_key FROM usage_ledger")
        by_id = {}
        for r in rows:
            by_id.setdefault(r[0], []).append(r)
        # 1. every 200 seen (a replay has no row of its own) has exactly one ledger row.
        missing = [s["id"] for s in ok if not s["replay"] and len([r for r in by_id.get(s["id"], []) if r[3] == "200"]) != 1]
        doubled = [rid for rid, rs in by_id.items() if len(rs) > 1]
        if missing:
            failures.append(f"{len(missing)} 200s without exactly one ledger row, e.g. {missing[:3]}")
        if doubled:
            failures.append(f"{len(doubled)} request ids with two ledger rows, e.g. {doubled[:3]}")
        # 2. and 3. budgets: spent equals the ledger's charges, and never over the limit.
        spent = {r[0]: int(r[1]) for r in psql(cluster.db_url, "SELECT scope, spent FROM budget_usage")}
        charged = {}
        for r in rows:
            charged[r[2]] = charged.get(r[2], 0) + int(r[4])
        money_diff = 0
        for tenant in {k["tenant"] for k in keys}:
            scope = f"tenant:{tenant}"
            if tenant in budgets:
                money_diff += abs(spent.get(scope, 0) - charged.get(tenant, 0))
                if spent.get(scope, 0) != charged.get(tenant, 0):
                    failures.append(f"{scope}: spent {spent.get(scope, 0)} but the ledger charged {charged.get(tenant, 0)}")
                if spent.get(scope, 0) > budgets[tenant]:
                    failures.append(f"{scope}: spent {spent[scope]} over its budget {budgets[tenant]}")
        # 4. rate-limited keys: admitted (anything but a 429 from the limiter) within
        #    burst + rate x time.
        elapsed = time.time() - started
        for key_id, rpm in limited.items():
            admitted = len([r for r in rows if r[1] == key_id])
            cap = rpm + rpm * elapsed / 60
            if admitted > cap:
                failures.append(f"key {key_id}: {admitted} admitted over its limit of {cap:.0f}")
        # 5. idempotent retries: one generation per key, and the retry answered as a replay.
        idem_rows = {}
        for r in rows:
            if r[5]:
                idem_rows[r[5]] = idem_rows.get(r[5], 0) + 1
        twice = [k for k, n in idem_rows.items() if n > 1]
        if twice:
            failures.append(f"{len(twice)} idempotency keys generated twice, e.g. {twice[:3]}")
        if traffic.replay_bad:
            failures.append(f"{len(traffic.replay_bad)} retries or hosted images answered wrongly, e.g. {traffic.replay_bad[:3]}")
        # 6. revoked keys.
        late = [s for s in ok if s["key"] in traffic.revoked and s["sent"] > traffic.revoked[s["key"]] + 1.0]
        if late:
            failures.append(f"{len(late)} requests served for a revoked key more than 1 s after revocation")

        statuses = {}
        for s in seen:
            statuses[s["status"]] = statuses.get(s["status"], 0) + 1
        print(json.dumps({
            "seconds": round(elapsed, 1), "requests": len(seen), "statuses": statuses,
            "ledger_rows": len(rows), "replica_b_killed_at_s": round(killed_at, 1),
            "lost_200s": len(missing), "doubled_rows": len(doubled), "money_diff_micro_usd": money_diff,
            "idempotent_twice": len(twice), "revoked_served_late": len(late),
            "budgets_spent": {t: spent.get(f"tenant:{t}", 0) for t in budgets},
        }, indent=2))
    finally:
        cluster.stop()
        if not os.environ.get("KEEP_SOAK"):
            shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print("SOAK FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(1)
    print("soak passed: every invariant holds")


if __name__ == "__main__":
    main()
