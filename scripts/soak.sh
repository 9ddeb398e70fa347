#!/usr/bin/env bash
# The multi-replica soak (scripts/soak.py): two release replicas behind nginx sharing
# PostgreSQL, Redis and an S3-compatible store, mixed traffic, replica B kill -9ed midway;
# exits non-zero if any invariant breaks. Usage: scripts/soak.sh [SECONDS] (default 120;
# the README's figure uses 1800). Installs nginx-light and redis-server when missing (root).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-120}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
cargo build --release --bin imagegate
exec .venv/bin/python scripts/soak.py --seconds "$seconds" --bin "$PWD/target/release/imagegate" \
  --nginx "$(command -v nginx || echo /usr/sbin/nginx)" --moto "$PWD/.venv/bin/moto_server"
