#!/usr/bin/env bash
# Throughput and latency of small answers, direct to the fake upstream and through the gateway
# (auth and a tenant rate limit on), with wrk. The gateway is pinned to core 0, the fake
# upstream and wrk to core 1. A first cut of the benchmark issue's script: it does not yet
# compare with nginx, measure CPU per request or large answers.
#   bash bench/throughput.sh [duration_seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -q --bins --example fake_upstream
tmp=$(mktemp -d)
up_port=19100; gw_port=19180
cat > "$tmp/gw.yaml" <<YAML
listen: 127.0.0.1:$gw_port
admin: {listen: null}
data_dir: $tmp/data
state: {store: none}
log: {level: error}
backends:
  up: {kind: openai, base_url: "http://127.0.0.1:$up_port/v1", api_key: sk-up}
models:
  bench: {rules: {sizes: [1024x1024], max_n: 10}, route: {targets: [{backend: up}]}}
tenants:
  t: {models: ["*"], limits: {requests_per_minute: 100000000, images_per_minute: 100000000}}
keys:
  - {id: bench, tenant: t, secret: sk-bench-key-0001}
YAML
cat > "$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"bench","prompt":"a fox","response_format":"url"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench-key-0001"
LUA
taskset -c 1 target/release/examples/fake_upstream --port $up_port 2>/dev/null &
up=$!
taskset -c 0 target/release/imagegate serve --config "$tmp/gw.yaml" &
gw=$!
trap 'kill $up $gw 2>/dev/null; rm -rf "$tmp"' EXIT
sleep 1
echo "machine: $(nproc) cores, $(date -u +%F); gateway on core 0, upstream and wrk on core 1"
run() { # name url connections
  out=$(taskset -c 1 wrk -t1 -c"$3" -d"${secs}s" --latency -s "$tmp/post.lua" "$2")
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p90=$(echo "$out" | awk '$1=="90%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  printf "%-10s c=%-3s %10s req/s  p50 %8s  p90 %8s  p99 %8s\n" "$1" "$3" "$rps" "$p50" "$p90" "$p99"
}
for c in 1 64; do
  run direct "http://127.0.0.1:$up_port/v1/images/generations" $c
  run gateway "http://127.0.0.1:$gw_port/v1/images/generations" $c
done
echo "gateway RSS: $(awk '/VmRSS/ {print $2" kB"}' /proc/$gw/status), peak $(awk '/VmHWM/ {print $2" kB"}' /proc/$gw/status)"
