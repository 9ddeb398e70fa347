#!/usr/bin/env bash
# Memory per request in flight: N requests held open against a slow upstream.
#
# An image request spends seconds waiting on its upstream, so a busy gateway holds many more
# requests open than a web proxy of the same throughput. This holds N connections busy with
# wrk (each sends its next request as soon as its answer comes) against bench's fake upstream
# answering after DELAY ms, for N = 1,000, 5,000 and 10,000 by default, through the gateway
# (production config: key auth, limits, a budget, the SQLite ledger) and through nginx
# (plain reverse proxy, keep-alive to the upstream, one worker) and bench/bare_proxy.rs (hyper
# server + hyper-util client, nothing else: the floor of the stack), and prints per N:
# throughput, failures, p99, peak RSS (VmHWM) and (peak - idle) / N. The gateway is a fresh
# process for each N (its peak is its own), and so is nginx; nginx's figure is its worker's, not its master's.
# After the largest N it reads the gateway's RSS again SETTLE seconds after the load stopped.
#
# Gateway and nginx on core 0; the upstream and wrk on core 1 (as bench/run.sh).
#
#   bash bench/inflight.sh [seconds per run, default 20] [N list, default "1000 5000 10000"]
#   env: DELAY (ms, default 2000), SETTLE (s, default 60), NO_NGINX=1, GW_BIN (the gateway
#   binary, default target/release/imagegate: an older build for a before/after run),
#   ONLY (the proxies to run, default "gateway bare nginx")
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
counts=${2:-"1000 5000 10000"}
delay=${DELAY:-2000}
settle=${SETTLE:-60}
only=" ${ONLY:-gateway bare nginx} "

. bench/lib.sh
bench_tools

# Each request in flight holds a client socket and an upstream socket in the proxy, and one
# socket each in wrk and the upstream: 10,000 in flight needs ~20,500 descriptors in the proxy.
# Where the hard limit is lower and cannot be raised (no CAP_SYS_RESOURCE, as in some
# containers), a count that cannot fit is lowered to the largest that does, and said so.
max=0; for n in $counts; do [ "$n" -gt "$max" ] && max=$n; done
need=$((2 * max + 512))
if [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
fi
fits=$(( ($(ulimit -n) - 512) / 2 / 500 * 500 ))
if [ "$fits" -lt "$max" ]; then
  echo "N=$max needs $need open files per process; the hard limit here is $(ulimit -Hn) and cannot be"
  echo "raised (this needs root with CAP_SYS_RESOURCE, or LimitNOFILE): counts over $fits run as N=$fits"
  counts=$(for n in $counts; do [ "$n" -gt "$fits" ] && echo "$fits" || echo "$n"; done | tr '\n' ' ')
  max=$fits; need=$((2 * max + 512))
fi

cargo build --release -q --bins --example fake_upstream --example bare_proxy
GW_BIN=${GW_BIN:-target/release/imagegate}

up_port=19201; gw_port=19280; ng_port=19290; bare_port=19270
small_port=$up_port; large_port=$up_port
write_config
lua small small url

taskset -c 1 target/release/examples/fake_upstream --port $up_port --delay-ms "$delay" 2>/dev/null & pids+=($!)

kib() { awk -v f="$2" '$1 == f":" {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
wait_up() {
  for _ in $(seq 1 200); do
    curl -s -o /dev/null "http://127.0.0.1:$1/" 2>/dev/null && return 0; sleep 0.05
  done
  echo "port $1 never answered"; exit 1
}

if [ -n "$NGINX" ]; then
  mkdir -p "$tmp/ng"
  cat > "$tmp/nginx.conf" <<NGINX
worker_processes 1;
worker_rlimit_nofile $need;
daemon off;
pid $tmp/ng/nginx.pid;
error_log $tmp/ng/error.log error;
events { worker_connections $need; }
http {
  access_log off;
  client_body_temp_path $tmp/ng; proxy_temp_path $tmp/ng; fastcgi_temp_path $tmp/ng;
  uwsgi_temp_path $tmp/ng; scgi_temp_path $tmp/ng;
  upstream up { server 127.0.0.1:$up_port; keepalive $max; }
  server { listen 127.0.0.1:$ng_port backlog=$need; keepalive_requests 1000000;
           location / { proxy_pass http://up; proxy_http_version 1.1;
           proxy_set_header Connection ""; proxy_read_timeout 60s; } }
}
NGINX
fi

# run LABEL PORT N PID -> one row; sets $peak_kib (the process's VmHWM after the run)
run() {
  local label=$1 port=$2 n=$3 pid=$4 idle out rps p99 failed
  idle=$(kib "$pid" VmRSS)
  out=$(taskset -c 1 wrk -t2 -c"$n" -d"${secs}s" --timeout 30s --latency -s "$tmp/small.lua" \
        "http://127.0.0.1:$port/v1/images/generations" 2>&1)
  peak_kib=$(kib "$pid" VmHWM)
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  failed=$(echo "$out" | wrk_failures)
  printf "%-8s N=%-6s %9s req/s  p99 %8s  failed %-6s idle %6s MiB  peak %7s MiB  %6.1f KiB per request in flight\n" \
    "$label" "$n" "$rps" "$p99" "$failed" "$(mib "$idle")" "$(mib "$peak_kib")" \
    "$(awk -v p="$peak_kib" -v i="$idle" -v n="$n" 'BEGIN {print (p - i) / n}')"
}

echo "in-flight memory: $(date -u +%F), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
echo "upstream delay ${delay} ms, ${secs}s per run; gateway and nginx on core 0, upstream and wrk on core 1"
echo
for n in $counts; do
  if [[ $only == *" gateway "* ]]; then
  taskset -c 0 "$GW_BIN" serve --config "$tmp/gw.yaml" & gw=$!; pids+=($gw)
  wait_up $gw_port
  sleep 0.5
  run gateway $gw_port "$n" "$gw"
  if [ "$n" = "$max" ]; then
    sleep "$settle"
    echo "         gateway RSS ${settle}s after the load stopped: $(mib "$(kib "$gw" VmRSS)") MiB"
  fi
  kill "$gw"; wait "$gw" 2>/dev/null || true
  fi
  if [[ $only == *" bare "* ]]; then
  taskset -c 0 target/release/examples/bare_proxy --port $bare_port --upstream-port $up_port 2>/dev/null & bare=$!; pids+=($bare)
  wait_up $bare_port
  sleep 0.5
  run bare $bare_port "$n" "$bare"
  kill "$bare"; wait "$bare" 2>/dev/null || true
  fi
  if [ -n "$NGINX" ] && [[ $only == *" nginx "* ]]; then
    taskset -c 0 "$NGINX" -c "$tmp/nginx.conf" & ng=$!; pids+=($ng)
    wait_up $ng_port
    sleep 0.5
    run nginx $ng_port "$n" "$(pgrep -P "$ng" | head -1)"
    kill "$ng"; wait "$ng" 2>/dev/null || true
  fi
done
