#!/bin/sh
# The compose demo profile's one-shot "demo-key" service (the image's
# demo-key target: the sluice binary and a busybox shell). It makes the demo
# tenant's key when the demo starts, writes the gateway's config and prints
# the key, as `sluice demo` does:
#   - the key: kept in the demo-config volume, so every later start prints
#     the same one (a gateway still running from the last `up` keeps
#     accepting it); the first start, or one after `docker compose down -v`,
#     makes a new one with `sluice new-key`;
#   - the config: deploy/compose/sluice.toml (mounted read-only, left as it
#     is) with the key's hash in place of the placeholder and the simulator
#     as upstream (no upstream key), checked with `sluice check-config`,
#     written where the sluice service reads it (SLUICE_CONFIG=/demo/sluice.toml).
# Plain POSIX sh; deploy/k8s/check.sh runs it on the host too.
# Env: SLUICE_BIN, DEMO_TEMPLATE, DEMO_DIR, DEMO_UPSTREAM_URL, DEMO_BASE_URL.
set -eu
sluice=${SLUICE_BIN:-/usr/local/bin/sluice}
template=${DEMO_TEMPLATE:-/etc/sluice/sluice.toml}
dir=${DEMO_DIR:-/demo}
upstream=${DEMO_UPSTREAM_URL:-http://simulator:8000}
base=${DEMO_BASE_URL:-http://localhost:8080/v1}
placeholder=REPLACE-ME-run-sluice-new-key

fail() { echo "demo-key: $*" >&2; exit 1; }

is_key() { # sk-sluice- and at least 32 alphanumerics
  case $1 in sk-sluice-*) ;; *) return 1 ;; esac
  rest=${1#sk-sluice-}
  case $rest in *[!A-Za-z0-9]*) return 1 ;; esac
  [ "${#rest}" -ge 32 ]
}

key=
if [ -s "$dir/key" ]; then
  key=$(cat "$dir/key")
  is_key "$key" || key=
fi
if [ -z "$key" ]; then
  key=$("$sluice" new-key | sed -n 's/^key: *//p')
  is_key "$key" || fail "\`sluice new-key\` printed no key"
  (umask 077 && printf '%s\n' "$key" >"$dir/key.tmp")
  mv "$dir/key.tmp" "$dir/key"
fi
hash=$(printf '%s' "$key" | "$sluice" hash-key)
case $hash in *[!0-9a-f]* | "") fail "\`sluice hash-key\` printed no hash" ;; esac
[ "${#hash}" -eq 64 ] || fail "\`sluice hash-key\` printed no hash"

grep -q "\"$placeholder\"" "$template" ||
  fail "$template (deploy/compose/sluice.toml) has no \"$placeholder\" key for the demo tenant: the demo fills in the shipped file's placeholder"
{
  echo "# Written by the compose demo's demo-key service from $template: the"
  echo "# demo key's hash in place of the placeholder, the simulator as upstream."
  sed -e "s/\"$placeholder\"/\"$hash\"/" \
      -e "s|^base_url = .*|base_url = \"$upstream\"|" \
      -e 's|^api_key_env = .*|api_key_env = ""|' \
      "$template"
} >"$dir/sluice.toml.tmp"
if grep -q '"REPLACE-ME' "$dir/sluice.toml.tmp"; then
  fail "$template has more than one placeholder key; the demo fills in one"
fi
if ! check=$("$sluice" check-config --config "$dir/sluice.toml.tmp" 2>&1); then
  printf '%s\n' "$check" >&2
  fail "the demo config is invalid"
fi
mv "$dir/sluice.toml.tmp" "$dir/sluice.toml"

cat <<EOF
Sluice compose demo: the simulated DeepSeek upstream behind the gateway.

key:      $key
base URL: $base

curl $base/chat/completions \\
  -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
  -d '{"model":"deepseek-chat","messages":[{"role":"user","content":"Hello"}],"stream":true}'

The key stays the same on every start of the demo until
\`docker compose -f deploy/compose.yaml down -v\` (then the next start makes a
new one). Print it again: \`docker compose -f deploy/compose.yaml logs demo-key\`.
EOF
