#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests (real HTTP over loopback), then the
# official `openai` Python SDK against the real binary. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --bins
cargo test --all-targets

# The SDK compatibility suite, in a virtualenv of its own.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
IMAGEGATE_BIN="$PWD/target/debug/imagegate" .venv/bin/python -m pytest -q tests/sdk
