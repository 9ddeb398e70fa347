#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (real HTTP over loopback, fake upstreams
# speaking each real protocol, a real S3-compatible server), then the official `openai` Python
# SDK against the real binary. Installs what it needs into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python side: the openai SDK, pytest, moto's S3-compatible server, deploy/ checkers.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

s3_port=$(free_port)
.venv/bin/moto_server -H 127.0.0.1 -p "$s3_port" >target/moto.log 2>&1 &
pids+=($!)
export IMAGEGATE_TEST_S3="http://127.0.0.1:$s3_port"

cargo build --bins
for _ in $(seq 1 100); do
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$IMAGEGATE_TEST_S3/')" 2>/dev/null; then break; fi
  sleep 0.1
done

cargo test --all-targets
.venv/bin/python scripts/check-deploy.py "$PWD/target/debug/imagegate"
IMAGEGATE_BIN="$PWD/target/debug/imagegate" .venv/bin/python -m pytest -q tests/sdk
