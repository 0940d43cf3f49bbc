#!/usr/bin/env bash
# Offline checks of deploy/ and of the live metrics exposition:
#   - a live Sluice (against the built-in simulator) takes a little traffic,
#     then `promtool check metrics` reads its /metrics; a second one with
#     [redis] set and Redis unreachable shows the Redis metrics and the local
#     fallback (limits decided by the replica alone) the same way;
#   - `promtool check config` / `check rules` on deploy/prometheus;
#   - the Grafana dashboard is valid JSON and only queries metrics Sluice has;
#   - no shipped file holds a working key: no 64-hex key hash and no
#     plaintext key in the docs, configs and manifests; config/sluice.toml
#     is refused by `sluice check-config` for its placeholder keys and valid
#     once each is a fresh `sluice new-key` hash (deploy/shipped_keys.py);
#   - the compose demo's key maker (deploy/compose/demo-key.sh) run on the
#     host: it prints a key, writes a valid config from the compose one, and
#     a live Sluice on that config takes the printed key (and the same key
#     on the next start);
#   - Kubernetes manifests (if present) against the Kubernetes schemas, and
#     their sluice.toml (and compose's) the same way as config/sluice.toml.
# Usage: deploy/check.sh [path/to/sluice]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${1:-target/debug/sluice}")
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

wait_line() { # file pattern
  for _ in $(seq 1 300); do
    if grep -q "$2" "$1" 2>/dev/null; then grep -m1 "$2" "$1"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; return 1
}

echo "--- live exposition"
"$BIN" simulate --listen 127.0.0.1:0 >"$tmp/sim.log" 2>&1 &
pids+=($!)
sim=$(wait_line "$tmp/sim.log" "simulator listening on" | awk '{print $NF}')
key="sk-check-$(date +%s%N)"
hash=$(printf '%s' "$key" | "$BIN" hash-key)
cat >"$tmp/sluice.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "$sim"
api_key_env = ""
balance_poll_secs = 1
[[tenants]]
name = "check"
key_sha256 = ["$hash"]
[pricing.deepseek-chat]
input_cache_hit = 0.028
input_cache_miss = 0.28
output = 0.42
TOML
SLUICE_LOG_FORMAT=json "$BIN" --config "$tmp/sluice.toml" >"$tmp/gw.log" 2>&1 &
pids+=($!)
line=$(wait_line "$tmp/gw.log" '"sluice listening"')
listen=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listen"])' "$line")
admin=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"])' "$line")
body='{"model":"deepseek-chat","messages":[{"role":"user","content":"promtool"}]}'
for stream in false true false; do
  curl -sf "http://$listen/v1/chat/completions" -H "Authorization: Bearer $key" \
    -d "${body%?},\"stream\":$stream}" >/dev/null
done
curl -s "http://$listen/v1/chat/completions" -H "Authorization: Bearer wrong" -d "$body" >/dev/null
curl -s "http://$listen/v1/chat/completions" -H "Authorization: Bearer $key" \
  -d '{"model":"gpt-unknown","messages":[]}' >/dev/null
for _ in $(seq 1 50); do
  curl -s "http://$admin/metrics" >"$tmp/metrics.txt"
  grep -q '^sluice_upstream_balance' "$tmp/metrics.txt" && break
  sleep 0.1
done
promtool check metrics <"$tmp/metrics.txt"
for m in sluice_requests_total sluice_tokens_total sluice_cost_usd_total sluice_cache_tokens_saved_total \
         sluice_time_to_first_token_seconds_bucket sluice_upstream_balance process_resident_memory_bytes; do
  grep -q "^$m" "$tmp/metrics.txt" || { echo "missing $m after traffic" >&2; exit 1; }
done
echo "metrics: promtool clean, $(grep -c '^sluice_' "$tmp/metrics.txt") sluice series"

echo "--- live exposition with [redis] unreachable"
# A loopback port nothing listens on: Sluice starts anyway, answers with the
# limits decided locally (on_error = "local") and reports Redis down.
closed=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
sed -e 's/^\[\[tenants\]\]$/[redis]\nurl = "redis:\/\/127.0.0.1:'"$closed"'\/0"\n\n&/' \
    -e 's/^name = "check"$/&\nrequests_per_minute = 600/' "$tmp/sluice.toml" >"$tmp/sluice-redis.toml"
"$BIN" check-config --config "$tmp/sluice-redis.toml" | grep '^shared state .*limits shared'
SLUICE_LOG_FORMAT=json "$BIN" --config "$tmp/sluice-redis.toml" >"$tmp/gw-redis.log" 2>&1 &
pids+=($!)
line=$(wait_line "$tmp/gw-redis.log" '"sluice listening"')
listen=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listen"])' "$line")
admin=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"])' "$line")
curl -sf "http://$listen/v1/chat/completions" -H "Authorization: Bearer $key" -d "$body" >/dev/null
curl -s "http://$admin/metrics" >"$tmp/metrics-redis.txt"
promtool check metrics <"$tmp/metrics-redis.txt"
grep -q '^sluice_redis_up 0' "$tmp/metrics-redis.txt" || { echo "sluice_redis_up should be 0" >&2; exit 1; }
for m in sluice_redis_operations_total sluice_redis_duration_seconds_bucket 'sluice_limits_local_fallback_total{tenant="check"}'; do
  grep -qF "$m" "$tmp/metrics-redis.txt" || { echo "missing $m with Redis down" >&2; exit 1; }
done
if grep -q '^sluice_redis_up' "$tmp/metrics.txt"; then echo "sluice_redis_up without [redis]" >&2; exit 1; fi
echo "metrics: promtool clean with Redis down, sluice_redis_up 0, local fallback counted"

echo "--- shipped keys"
python3 -B deploy/shipped_keys.py "$BIN"

echo "--- compose demo key"
# deploy/compose/demo-key.sh as the demo-key service runs it, with host paths.
mkdir "$tmp/demo"
demo_key() {
  SLUICE_BIN="$BIN" DEMO_TEMPLATE=deploy/compose/sluice.toml DEMO_DIR="$tmp/demo" \
    sh deploy/compose/demo-key.sh >"$tmp/demo-key.log" 2>&1 || { cat "$tmp/demo-key.log" >&2; exit 1; }
  sed -n 's/^key: *//p' "$tmp/demo-key.log"
}
demo_key=$(demo_key)
case $demo_key in sk-sluice-?*) ;; *) echo "demo-key printed no key" >&2; cat "$tmp/demo-key.log" >&2; exit 1 ;; esac
grep -qF "Authorization: Bearer $demo_key" "$tmp/demo-key.log" || { echo "demo-key printed no curl line" >&2; exit 1; }
grep -qF "\"$(printf '%s' "$demo_key" | "$BIN" hash-key)\"" "$tmp/demo/sluice.toml" \
  || { echo "the demo config does not hold the printed key's hash" >&2; exit 1; }
if grep -q '"REPLACE-ME' "$tmp/demo/sluice.toml"; then echo "the demo config kept a placeholder" >&2; exit 1; fi
grep -qx 'base_url = "http://simulator:8000"' "$tmp/demo/sluice.toml" \
  || { echo "the demo config's upstream is not the simulator" >&2; exit 1; }
[ "$(demo_key)" = "$demo_key" ] || { echo "demo-key made another key on its second start" >&2; exit 1; }
# The gateway as the sluice service runs it on that config (simulator and
# Redis at local addresses): the printed key is let in, another is not.
SLUICE_LOG_FORMAT=json SLUICE_UPSTREAM_URL="$sim" SLUICE_REDIS_URL="redis://127.0.0.1:$closed/0" \
  SLUICE_LISTEN=127.0.0.1:0 SLUICE_ADMIN_LISTEN=127.0.0.1:0 \
  "$BIN" --config "$tmp/demo/sluice.toml" >"$tmp/gw-demo.log" 2>&1 &
pids+=($!)
line=$(wait_line "$tmp/gw-demo.log" '"sluice listening"')
listen=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["listen"])' "$line")
curl -sf "http://$listen/v1/chat/completions" -H "Authorization: Bearer $demo_key" -d "$body" >/dev/null \
  || { echo "the gateway refused the demo's printed key" >&2; exit 1; }
other=$("$BIN" new-key | sed -n 's/^key: *//p')
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$listen/v1/chat/completions" -H "Authorization: Bearer $other" -d "$body")
[ "$code" = 401 ] || { echo "the demo gateway answered $code to another key" >&2; exit 1; }
echo "demo: demo-key printed a key, wrote a valid config from deploy/compose/sluice.toml, the gateway took the key"

echo "--- prometheus config and rules"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml

echo "--- grafana dashboard"
python3 - deploy/grafana/sluice-dashboard.json "$tmp/metrics.txt" "$tmp/metrics-redis.txt" <<'PY'
import glob, json, re, sys
exposed = {l.split("{")[0].split(" ")[0] for m in sys.argv[2:] for l in open(m) if l and not l.startswith("#")}
# Vectors without samples yet are not exposed; take their names from the source.
defined = {n for f in glob.glob("src/**/*.rs", recursive=True) for n in re.findall(r'"(sluice_[a-z_]+)"', open(f).read())}
families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exposed} | exposed | defined
dash = json.load(open(sys.argv[1]))
panels = dash["panels"]
assert panels, "dashboard has panels"
for p in panels:
    for t in p.get("targets", []):
        for name in re.findall(r"\b(sluice_[a-z_]+|process_[a-z_]+)", t["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in families or base in families, f"panel {p['title']!r} queries unknown metric {name}"
print(f"dashboard: {len(panels)} panels, every query names a live metric")
PY

if [ -d deploy/k8s ]; then
  echo "--- kubernetes manifests"
  bash deploy/k8s/check.sh "$BIN"
fi
