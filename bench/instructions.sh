#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: the gateway (same production-like
# config as bench/run.sh: key auth, limits, budget, SQLite ledger) and the bare relay
# (bench/bare_proxy.rs, the floor of the stack). Unlike req/s on a shared 2-core VM (±25%
# between runs), the count is repeatable to a few percent, so it shows what a change to the hot
# path saves. All threads are counted (the SQLite writer too). Under callgrind the gateway runs
# ~50x slower, so the ledger's batches are smaller than at full speed and its share is
# overstated.
#
#   bash bench/instructions.sh [seconds of load, default 10]
# CG_OUT=DIR keeps the callgrind files there (callgrind_annotate --inclusive=yes FILE);
# GW_BIN=PATH counts another gateway binary (an A/B against an older build).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
for tool in wrk valgrind; do
  if ! command -v $tool >/dev/null; then
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $tool >/dev/null
  fi
done
cargo build --release -q --bins --example fake_upstream --example bare_proxy

. bench/lib.sh
small_port=19201; large_port=19202; gw_port=19280; bare_port=19270
write_config
lua small small url

taskset -c 1 target/release/examples/fake_upstream --port $small_port 2>/dev/null & pids+=($!)
taskset -c 1 target/release/examples/fake_upstream --port $large_port --b64-bytes 1500000 2>/dev/null & pids+=($!)

# count NAME PORT COMMAND...: starts COMMAND under callgrind on core 0, warms it up, counts
# the instructions of $secs seconds of wrk -c16 and prints them per request.
count() {
  local name=$1 port=$2; shift 2
  taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$name.%p" "$@" \
    >"$tmp/$name.log" 2>&1 & local pid=$!; pids+=($pid)
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2
  done
  taskset -c 1 wrk -t1 -c16 -d2s -s "$tmp/small.lua" "http://127.0.0.1:$port/v1/images/generations" >/dev/null
  callgrind_control -z $pid >/dev/null 2>&1
  local out n errors
  out=$(taskset -c 1 wrk -t1 -c16 -d"${secs}s" -s "$tmp/small.lua" "http://127.0.0.1:$port/v1/images/generations")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  errors=$(echo "$out" | wrk_failures)
  callgrind_control -d $pid >/dev/null 2>&1
  kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true
  local total
  total=$(cat "$tmp"/cg."$name".*.[0-9]* 2>/dev/null | awk '/^summary:/ {s += $2} END {print s + 0}')
  [ -n "${CG_OUT:-}" ] && mkdir -p "$CG_OUT" && cp "$tmp"/cg."$name".* "$CG_OUT"/
  awk -v n="$n" -v t="$total" -v name="$name" -v e="$errors" 'BEGIN {
    printf "%-8s %8.0f instructions per request (%d requests%s)\n", name, t / n, n, (e > 0 ? ", " e " failed!" : "") }'
}

echo "instructions per request, callgrind, c=16, ${secs}s, small answers ($(date -u +%F))"
count gateway $gw_port "${GW_BIN:-target/release/imagegate}" serve --config "$tmp/gw.yaml"
count bare $bare_port target/release/examples/bare_proxy --port $bare_port --upstream-port $small_port
