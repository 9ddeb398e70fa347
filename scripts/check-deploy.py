#!/usr/bin/env python3
"""Checks deploy/ as far as this machine allows (no Docker engine, no cluster):

- every YAML file parses and passes yamllint (relaxed);
- the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate --strict);
- the gateway configs inside deploy/ pass `imagegate check` (with placeholder secrets);
- the Dockerfile parses, its final stage runs as non-root with a HEALTHCHECK, and every COPY
  source exists in the repository;
- the compose file's services, dependencies, volumes and mounted files are consistent;
- the systemd unit passes `systemd-analyze verify` where systemd-analyze exists.
Run from the repository root with the binary built: python3 scripts/check-deploy.py BIN
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
BIN = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/debug/imagegate")
VENV_BIN = Path(sys.executable).parent
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


yaml_files = sorted(ROOT.glob("deploy/**/*.yaml")) + [ROOT / "gateway.yaml"]
for f in yaml_files:
    try:
        list(yaml.safe_load_all(f.read_text()))
        check(True, f"{f.relative_to(ROOT)} parses")
    except yaml.YAMLError as e:
        check(False, f"{f.relative_to(ROOT)} parses: {e}")
lint = subprocess.run([str(VENV_BIN / "yamllint"), "-d", "{extends: relaxed, rules: {line-length: disable}}",
                       *map(str, yaml_files)], capture_output=True, text=True)
check(lint.returncode == 0, "yamllint (relaxed)" + ("" if lint.returncode == 0 else "\n" + lint.stdout))

k8s = sorted(ROOT.glob("deploy/kubernetes/*.yaml"))
kv = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", *map(str, k8s)],
                    capture_output=True, text=True)
check(kv.returncode == 0, "kubernetes-validate --strict" + ("" if kv.returncode == 0 else "\n" + kv.stdout + kv.stderr))

# The gateway configs shipped inside deploy/ are valid imagegate configs.
placeholders = {k: "x" * 40 for k in ["OPENAI_API_KEY", "URL_SIGNING_KEY", "S3_ACCESS_KEY", "S3_SECRET_KEY"]}
placeholders.update(PUBLIC_URL="https://images.example.com", S3_BUCKET="b", S3_ENDPOINT="http://minio:9000",
                    DEFAULT_KEY_SHA256="0" * 64, PG_URL="postgres://u:p@db:5432/imagegate",
                    REDIS_URL="redis://redis:6379/0")
env = {**os.environ, **placeholders}
configs = [ROOT / "deploy/docker/cluster.yaml"]
with tempfile.TemporaryDirectory() as tmp:
    for doc in yaml.safe_load_all((ROOT / "deploy/kubernetes/imagegate.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            p = Path(tmp) / "configmap-gateway.yaml"
            p.write_text(doc["data"]["gateway.yaml"])
            configs.append(p)
    for c in configs:
        r = subprocess.run([BIN, "check", "--config", str(c)], capture_output=True, text=True, env=env)
        check(r.returncode == 0, f"imagegate check {c.name}" + ("" if r.returncode == 0 else "\n" + r.stderr))

dockerfile = ROOT / "deploy/docker/Dockerfile"
df = DockerfileParser(path=str(dockerfile))
stages = [i for i in df.structure if i["instruction"] == "FROM"]
check(len(stages) >= 2, "Dockerfile is multi-stage")
final = [i for i in df.structure if i["startline"] > stages[-1]["startline"]]
users = [i["value"] for i in final if i["instruction"] == "USER"]
check(bool(users) and not users[-1].startswith("root") and users[-1] != "0", "final stage runs as non-root")
check(any(i["instruction"] == "HEALTHCHECK" for i in final), "final stage has a HEALTHCHECK")
for i in df.structure:
    if i["instruction"] == "COPY" and "--from" not in i["value"]:
        for src in i["value"].split()[:-1]:
            check((ROOT / src).exists(), f"Dockerfile COPY source {src} exists")

# The build stage must copy everything `cargo build` reads: the manifest, the lock file, the
# sources, the bench example, the migrations sqlx embeds and the model catalog include_str!
# embeds at compile time.
copied = set()
for i in df.structure:
    if i["instruction"] == "COPY" and "--from" not in i["value"]:
        copied.update(p.rstrip("/") for p in i["value"].split()[:-1])
for needed in ["Cargo.toml", "Cargo.lock", "src", "bench", "migrations", "catalog"]:
    check(needed in copied, f"Dockerfile copies {needed} for the build")

compose = yaml.safe_load((ROOT / "deploy/docker/compose.yaml").read_text())
services = compose["services"]
volumes = set((compose.get("volumes") or {}).keys())
for name, svc in services.items():
    deps = svc.get("depends_on", [])
    for d in (deps if isinstance(deps, list) else deps.keys()):
        check(d in services, f"compose: {name} depends on existing service {d}")
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if src.startswith("."):
            check((ROOT / "deploy/docker" / src).exists(), f"compose: {name} mounts existing file {src}")
        else:
            check(src in volumes, f"compose: {name} uses declared volume {src}")
    if "build" in svc:
        ctx = ROOT / "deploy/docker" / svc["build"]["context"]
        check((ctx / svc["build"]["dockerfile"]).exists(), f"compose: {name} builds from an existing Dockerfile")
check(sum(1 for s in services.values() if s.get("image") == "imagegate:latest") >= 2, "compose: two gateway replicas")
for needed in ["postgres", "redis", "minio", "lb"]:
    check(needed in services, f"compose: has {needed}")

unit = ROOT / "deploy/systemd/imagegate.service"
if shutil.which("systemd-analyze"):
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "imagegate.service"
        copy.write_text(unit.read_text().replace("/usr/local/bin/imagegate", str(Path(BIN).resolve())))
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        check(r.returncode == 0 and not out, "systemd-analyze verify" + (f"\n{out}" if out else ""))
else:
    print("skip systemd-analyze (not installed)")

print(f"{len(failures)} failed" if failures else "deploy checks passed")
sys.exit(1 if failures else 0)
