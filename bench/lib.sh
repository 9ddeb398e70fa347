# What bench/run.sh, bench/inflight.sh and bench/instructions.sh share: the tools (bench_tools), a scratch directory ($tmp) and the
# processes to stop on exit ($pids, removed and killed by an EXIT trap), the gateway's
# production-like config and wrk's request scripts. Set $gw_port, $small_port and $large_port
# before write_config.

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

key=sk-bench-key-0001

# bench_tools: installs wrk, and nginx-light unless NO_NGINX is set, from Debian's packages when
# missing; sets $NGINX to nginx's path (empty: its rows are skipped).
bench_tools() {
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
  if ! command -v wrk >/dev/null; then
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  fi
  NGINX=""
  [ -n "${NO_NGINX:-}" ] && return 0
  if ! command -v nginx >/dev/null; then
    (as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null) \
      || echo "nginx could not be installed: its rows are skipped"
  fi
  NGINX=$(command -v nginx || ls /usr/sbin/nginx 2>/dev/null || true)
}

# write_config: $tmp/gw.yaml (API key auth, tenant rate and concurrency limits, a budget, the
# SQLite usage ledger; log level error, as nginx's access_log off).
write_config() {
cat > "$tmp/gw.yaml" <<YAML
listen: 127.0.0.1:$gw_port
public_url: http://127.0.0.1:$gw_port
admin: {listen: null}
data_dir: $tmp/data
state: {store: sqlite}
log: {level: error}
backends:
  small: {kind: openai, base_url: "http://127.0.0.1:$small_port/v1", api_key: sk-up}
  large: {kind: openai, base_url: "http://127.0.0.1:$large_port/v1", api_key: sk-up, max_image_bytes: 4000000}
models:
  small: {rules: {sizes: [1024x1024], max_n: 10}, price: {default_micro_usd: 1000}, route: {targets: [{backend: small}]}}
  large: {rules: {sizes: [1024x1024], max_n: 10}, price: {default_micro_usd: 1000}, route: {targets: [{backend: large}]}}
tenants:
  bench:
    models: ["*"]
    limits:
      requests_per_minute: 100000000
      images_per_minute: 100000000
      concurrent_requests: 100000
      budget: {micro_usd: 9000000000000000, period: monthly}
keys:
  - {id: bench, tenant: bench, secret_sha256: $(printf %s "$key" | target/release/imagegate hash-key)}
YAML
}

# lua FILE MODEL RESPONSE_FORMAT: $tmp/FILE.lua, a POST of a small request, and
# $tmp/FILE-stop.lua, the same request with a response() that stops wrk's thread after
# $STOP_AFTER answers. Only the -stop script defines response(): when a script has one, wrk
# copies every answer's headers and body into Lua strings for it, on the load generator's core
# (0.9-1.2 ms of core 1 per 2 MB answer, and more for some proxies' answers than for
# others'), which then measures wrk rather than the proxy. Failed requests are counted by wrk
# itself ("Non-2xx or 3xx responses", "Socket errors"; see wrk_failures).
lua() {
  cat > "$tmp/$1.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"$2","prompt":"a fox in the snow","size":"1024x1024","response_format":"$3"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
LUA
  cat "$tmp/$1.lua" - > "$tmp/$1-stop.lua" <<'LUA'
local n = 0
local limit = tonumber(os.getenv("STOP_AFTER") or "0")
function response(status)
  n = n + 1
  if limit > 0 and n >= limit then wrk.thread:stop() end
end
LUA
}

# wrk_failures: the number of non-2xx/3xx answers and socket errors in wrk's report on stdin.
wrk_failures() {
  awk '/Non-2xx or 3xx responses:/ {n += $NF}
       /Socket errors:/ {for (i = 3; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i + 0}
       END {print n + 0}'
}
