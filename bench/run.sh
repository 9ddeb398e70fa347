#!/usr/bin/env bash
# imagegate's benchmark: one command, production settings.
#
# Builds in release mode, starts two fake OpenAI upstreams (small URL answers, and 1.5 MB
# base64 PNG answers), the gateway (API key auth, a tenant rate limit, a concurrency limit, a
# budget and the usage ledger in SQLite, all on) and, when nginx is installed, nginx as a plain
# reverse proxy, and bench/bare_proxy.rs (hyper server + hyper-util client, nothing else: the floor of
# the stack the gateway is built on); drives load with wrk; prints one table. The gateway,
# nginx and the bare proxy are pinned to core 0 (so the gateway, its worker_threads left at
# auto, runs tokio's single-threaded scheduler), the upstreams and wrk to core 1.
#
#   bash bench/run.sh [seconds per run, default 10] [requests per leak-check stretch, default 100000]
#   env: GW_BIN, the gateway binary to measure (default target/release/imagegate; an older
#   build, for before/after runs on one machine)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
leak_n=${2:-100000}
. bench/lib.sh
bench_tools
cargo build --release -q --bins --example fake_upstream --example bare_proxy
GW_BIN=${GW_BIN:-target/release/imagegate}

small_port=19101; large_port=19102; gw_port=19180; bare_port=19170; ng_small=19190; ng_large=19191
write_config
lua small small url
lua large large b64_json
lua convert large url

taskset -c 1 target/release/examples/fake_upstream --port $small_port 2>/dev/null & pids+=($!)
taskset -c 1 target/release/examples/fake_upstream --port $large_port --b64-bytes 1500000 2>/dev/null & pids+=($!)
# The floor of the stack the gateway is built on (hyper server + hyper-util client, nothing else).
taskset -c 0 target/release/examples/bare_proxy --port $bare_port --upstream-port $small_port 2>/dev/null & pids+=($!)
taskset -c 0 "$GW_BIN" serve --config "$tmp/gw.yaml" & gw=$!; pids+=($gw)

if [ -n "$NGINX" ]; then
  mkdir -p "$tmp/ng"
  cat > "$tmp/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $tmp/ng/nginx.pid;
error_log $tmp/ng/error.log error;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $tmp/ng; proxy_temp_path $tmp/ng; fastcgi_temp_path $tmp/ng;
  uwsgi_temp_path $tmp/ng; scgi_temp_path $tmp/ng;
  upstream small { server 127.0.0.1:$small_port; keepalive 128; }
  upstream large { server 127.0.0.1:$large_port; keepalive 128; }
  server { listen 127.0.0.1:$ng_small; location / { proxy_pass http://small; proxy_http_version 1.1;
           proxy_set_header Connection ""; proxy_buffering off; } }
  server { listen 127.0.0.1:$ng_large; location / { proxy_pass http://large; proxy_http_version 1.1;
           proxy_set_header Connection ""; proxy_buffering off; } }
}
NGINX
  taskset -c 0 "$NGINX" -c "$tmp/nginx.conf" & pids+=($!)
fi
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$gw_port/healthz" >/dev/null 2>&1 && break; sleep 0.1
done
sleep 0.5

rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/$gw/status; }
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$gw/status; }
cpu_ticks() { awk '{print $14 + $15}' /proc/$gw/stat; }
idle_rss=$(rss)

declare -A P50 P99
# run NAME URL CONNECTIONS LUA [bytes per answer] -> prints a row, fills P50/P99[NAME c]
run() {
  local name=$1 url=$2 c=$3 script=$4 bytes=${5:-0} before after out
  before=$(cpu_ticks)
  out=$(taskset -c 1 wrk -t1 -c"$c" -d"${secs}s" --latency -s "$tmp/$script.lua" "$url" 2>"$tmp/wrk.err")
  after=$(cpu_ticks)
  local rps p50 p90 p99 total
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  total=$(echo "$out" | awk '/requests in/ {print $1}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p90=$(echo "$out" | awk '$1=="90%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  P50["$name $c"]=$p50; P99["$name $c"]=$p99
  local extra=""
  if [ "$name" = gateway ] && [ "${total:-0}" -gt 0 ]; then
    extra=$(awk -v t=$((after - before)) -v n="$total" 'BEGIN {printf "cpu %.1f us/req", t * 10000 / n}')
  fi
  if [ "$bytes" -gt 0 ]; then
    extra="$extra $(awk -v r="$rps" -v b="$bytes" 'BEGIN {printf "%.0f MB/s", r * b / 1e6}')"
  fi
  local errors; errors=$(echo "$out" | wrk_failures)
  [ "$errors" -gt 0 ] && extra="$extra ($errors failed!)"
  printf "%-9s %-22s c=%-3s %9s req/s  p50 %8s  p90 %8s  p99 %8s  %s\n" "$name" "$script" "$c" "$rps" "$p50" "$p90" "$p99" "$extra"
}
us() { # wrk latency (e.g. 213.00us, 1.20ms) -> microseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /ms$/) n *= 1000; else if (v ~ /[0-9]s$/ && v !~ /us$/) n *= 1000000; printf "%.0f", n }'
}

echo "imagegate benchmark: $(date -u +%F), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
echo "gateway and nginx pinned to core 0; upstreams and wrk (1 thread) on core 1; ${secs}s per run."
echo "gateway: key auth, rate + concurrency limits, a budget and the SQLite usage ledger on."
echo
small=/v1/images/generations
for c in 1 64; do
  run direct "http://127.0.0.1:$small_port$small" $c small
  [ -n "$NGINX" ] && run nginx "http://127.0.0.1:$ng_small$small" $c small
  run bare "http://127.0.0.1:$bare_port$small" $c small
  run gateway "http://127.0.0.1:$gw_port$small" $c small
done
answer=$(curl -s -X POST "http://127.0.0.1:$large_port$small" -H 'content-type: application/json' -d '{"n":1}' | wc -c)
run direct "http://127.0.0.1:$large_port$small" 16 large "$answer"
[ -n "$NGINX" ] && run nginx "http://127.0.0.1:$ng_large$small" 16 large "$answer"
run gateway "http://127.0.0.1:$gw_port$small" 16 large "$answer"
run gateway "http://127.0.0.1:$gw_port$small" 16 convert 1500000
echo "  (convert: b64 from the upstream, url to the client: decode + store + sign; MB/s of raw image)"
run gateway "http://127.0.0.1:$gw_port$small" 64 large "$answer"
peak64=$(hwm)

echo
for c in 1; do
  d50=$(us "${P50[direct $c]}"); d99=$(us "${P99[direct $c]}")
  g50=$(us "${P50[gateway $c]}"); g99=$(us "${P99[gateway $c]}")
  printf "overhead c=%s   gateway p50 +%s us, p99 +%s us" "$c" $((g50 - d50)) $((g99 - d99))
  if [ -n "$NGINX" ]; then
    n50=$(us "${P50[nginx $c]}"); n99=$(us "${P99[nginx $c]}")
    printf "   nginx p50 +%s us, p99 +%s us" $((n50 - d50)) $((n99 - d99))
  fi
  b50=$(us "${P50[bare $c]}"); b99=$(us "${P99[bare $c]}")
  printf "   bare hyper relay p50 +%s us, p99 +%s us" $((b50 - d50)) $((b99 - d99))
  echo
done
echo "gateway RSS: idle $idle_rss MiB, peak $peak64 MiB (after 64 large answers in flight)"

# Leak check, on a fresh gateway (mimalloc returns memory as it goes on allocating, not while
# idle, so after the large runs a baseline would hold what they left): RSS after its first
# 1,000 requests, after $leak_n more and after $leak_n more again, each read after one
# allocator trim period. The first stretch includes the warm-up of bounded caches (SQLite's
# page cache fills to its 2 MiB cap in the ledger writer's thread); a leak keeps growing
# through the second. (wrk's thread:stop() stops sending but wrk still runs out its duration,
# so the 1,000 take one 1 s run and the rest are counted over 5 s runs.)
kill "$gw"; wait "$gw" 2>/dev/null || true
taskset -c 0 "$GW_BIN" serve --config "$tmp/gw.yaml" & gw=$!; pids+=($gw)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$gw_port/healthz" >/dev/null 2>&1 && break; sleep 0.1
done
STOP_AFTER=1000 taskset -c 1 wrk -t1 -c16 -d1s -s "$tmp/small-stop.lua" "http://127.0.0.1:$gw_port$small" >/dev/null 2>&1
sleep 3  # one allocator trim period
readings=("$(rss)")
counts=()
for _ in 1 2; do
  done_n=0
  while [ "$done_n" -lt "$leak_n" ]; do
    n=$(taskset -c 1 wrk -t1 -c16 -d5s -s "$tmp/small.lua" "http://127.0.0.1:$gw_port$small" 2>/dev/null | awk '/requests in/ {print $1}')
    done_n=$((done_n + ${n:-0}))
    [ "${n:-0}" -gt 0 ] || break
  done
  sleep 3  # one allocator trim period
  readings+=("$(rss)"); counts+=("$done_n")
done
awk -v a="${readings[0]}" -v b="${readings[1]}" -v c="${readings[2]}" -v n1="${counts[0]}" -v n2="${counts[1]}" 'BEGIN {
  printf "leak check: RSS %s MiB after 1,000 requests, %s MiB after %d more (%+.1f%%), %s MiB after %d more again (%+.1f%%)\n",
    a, b, n1, (b - a) * 100 / a, c, n2, (c - b) * 100 / b }'
rows=$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from usage_ledger").fetchone()[0])' "$tmp/data/imagegate.db")
echo "usage ledger rows written: $rows"
