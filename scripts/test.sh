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

# A throwaway PostgreSQL database for the key store suite (started if the server is down).
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
pg_db="imagegate_test_$$_$RANDOM"
psql -q -h 127.0.0.1 -U postgres -c "CREATE DATABASE $pg_db" >/dev/null
export IMAGEGATE_TEST_PG="postgres://postgres@127.0.0.1:5432/$pg_db"
cleanup_pg() { psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $pg_db WITH (FORCE)" >/dev/null 2>&1 || true; }
trap 'cleanup; cleanup_pg' EXIT

# A private Redis for the limits shared across replicas (installed if the machine lacks it).
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
fi
if command -v redis-server >/dev/null 2>&1; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    >target/redis.log 2>&1 &
  pids+=($!)
  export IMAGEGATE_TEST_REDIS="redis://127.0.0.1:$redis_port/0"
elif [ -n "${CI:-}" ]; then
  echo "redis-server is missing and could not be installed" >&2
  exit 1
fi

cargo build --bins
for _ in $(seq 1 100); do
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$IMAGEGATE_TEST_S3/')" 2>/dev/null; then break; fi
  sleep 0.1
done

if [ -n "${IMAGEGATE_TEST_REDIS:-}" ]; then
  for _ in $(seq 1 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
fi

# The official openai Node package for the SDK suite (node installed if the machine lacks it).
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
fi
if command -v npm >/dev/null 2>&1; then
  (cd tests/node && npm ci --no-audit --no-fund --silent)
elif [ -n "${CI:-}" ]; then
  echo "node/npm are missing and could not be installed" >&2
  exit 1
fi

cargo test --all-targets
.venv/bin/python scripts/check-deploy.py "$PWD/target/debug/imagegate"
IMAGEGATE_BIN="$PWD/target/debug/imagegate" .venv/bin/python -m pytest -q tests/sdk

# The release binary for the last suites. In CI the debug build's ~3 GB go first: a CI disk
# once filled up here (a clean clone's target/ holds both profiles otherwise).
if [ -n "${CI:-}" ]; then
  rm -rf target/debug
fi
df -h . | tail -n1
cargo build --release --bin imagegate

# The public API against its OpenAPI document (docs/openapi.json), fuzzed by Schemathesis.
IMAGEGATE_BIN="$PWD/target/release/imagegate" .venv/bin/python -m pytest -q -s tests/schema

# The console in a real headless Chromium: Debian's chromium and chromedriver (installed if
# missing), driven by Selenium with the system driver named (SE_OFFLINE: nothing downloaded),
# against the release binary. Screenshots land in target/browser-screenshots/.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
if command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then
  SE_OFFLINE=true IMAGEGATE_BIN="$PWD/target/release/imagegate" .venv/bin/python -m pytest -q tests/browser
elif [ -n "${CI:-}" ]; then
  echo "chromium and chromium-driver are missing and could not be installed" >&2
  exit 1
fi

# The two-replica soak, short: two release replicas behind nginx sharing PostgreSQL, Redis and
# S3, one kill -9ed midway; exits non-zero on any lost or doubled request, row or micro-dollar.
# (The README's figure is a 30-minute run: scripts/soak.sh 1800.)
scripts/soak.sh "${IMAGEGATE_SOAK_SECONDS:-120}"
