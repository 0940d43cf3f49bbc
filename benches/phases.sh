#!/usr/bin/env bash
# Where a miss and a hit spend their CPU: profiles the release `sluice`
# under callgrind (instructions, repeatable whatever else runs on the VM)
# while a small keep-alive client sends it N cache misses that bypass the
# cache (`cache-control: no-store`), N misses that are keyed and stored
# (distinct bodies) and N hits, each batch dumped separately; attributes
# every instruction of a batch to a phase of the request path
# (benches/phases/attribute.py); then runs the same batches without valgrind
# to measure CPU µs per request (user and system time), and prints the table
# with the µs spread over the phases. See benches/README.md, "Where a miss
# and a hit spend their CPU".
#
# Usage: benches/phases.sh [REV]
#   REV  also profile that commit (built in a temporary worktree with a
#        target dir of its own) and print its columns beside this tree's.
# "HEAD" is the working tree as it is, uncommitted changes included.
# Environment:
#   PHASES_N=5000          requests per batch under callgrind
#   PHASES_NATIVE_N=20000  requests per batch without valgrind (µs figures)
#   PHASES_NATIVE_ROUNDS=5 rounds of the batches without valgrind (the least
#                          CPU a request of each batch is taken)
#   PHASES_CONNS=16        client connections (keep-alive, closed loop)
#   PHASES_ACCESS_LOG=1    access log on (default off, as in the load bench)
#   PHASES_OUT=dir         keep the profiles and logs there (default: a
#                          temporary directory, removed)
#   PHASES_BASELINE_TARGET_DIR=dir  cargo target dir for REV's build (kept)
# Needs valgrind (callgrind_control, vgdb), python3, taskset, rustc and
# c++filt (binutils).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

rev=""
for arg in "$@"; do
  case "$arg" in
    -h | --help) usage 0 ;;
    -*) usage ;;
    *)
      [[ -z $rev ]] || usage
      rev=$arg
      ;;
  esac
done
for tool in valgrind callgrind_control python3 taskset rustc c++filt; do
  command -v "$tool" >/dev/null || {
    echo "phases.sh: $tool is not installed" >&2
    exit 2
  }
done

N=${PHASES_N:-5000}
NATIVE_N=${PHASES_NATIVE_N:-20000}
NATIVE_ROUNDS=${PHASES_NATIVE_ROUNDS:-5}
CONNS=${PHASES_CONNS:-16}
WARM=500
KEY="sk-sluice-phases-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_SHA=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sluice-phases.XXXXXX")
out=${PHASES_OUT:-$tmp/out}
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  if [[ -d $tmp/src ]]; then
    git -C "$root" worktree remove --force "$tmp/src" >/dev/null 2>&1 || true
    git -C "$root" worktree prune || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- builds ---------------------------------------------------------------
target=${CARGO_TARGET_DIR:-$root/target}
cargo build --release --bin sluice
head_bin=$tmp/sluice-head
cp "$target/release/sluice" "$head_bin"
head_desc="$(git log -1 --format='%h' HEAD)"
git diff --quiet HEAD -- src Cargo.toml Cargo.lock || head_desc="$head_desc+"
rustc -O --edition 2021 -o "$tmp/client" benches/phases/client.rs
sha_rlib=$(find "$target/release/deps" -name 'libsha2-*.rlib' -printf '%T@ %p\n' |
  sort -rn | head -1 | cut -d' ' -f2)
rustc -O --edition 2021 -L "dependency=$target/release/deps" \
  --extern "sha2=$sha_rlib" -o "$tmp/sha" benches/phases/sha.rs

base_bin=""
if [[ -n $rev ]]; then
  base=$(git rev-parse --verify --quiet "$rev^{commit}") || {
    echo "phases.sh: $rev is not a commit" >&2
    exit 2
  }
  git worktree add --detach --quiet "$tmp/src" "$base"
  btarget=${PHASES_BASELINE_TARGET_DIR:-$tmp/target}
  (cd "$tmp/src" && CARGO_TARGET_DIR=$btarget cargo build --release --bin sluice)
  base_bin=$tmp/sluice-base
  cp "$btarget/release/sluice" "$base_bin"
  base_desc=$(git log -1 --format='%h' "$base")
fi

# --- SHA-256 calibration (see benches/phases/sha.rs) -----------------------
ns_per_block=$(taskset -c 0 "$tmp/sha" | sed 's/ns_per_block=//')
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$out/sha.cg" "$tmp/sha" 10000 \
  >/dev/null 2>&1
instr_per_block=$(python3 benches/phases/attribute.py --inclusive \
  '^sha2::sha256::compress256$' "$out/sha.cg" 10000)

# --- the simulated upstream (core 1, with the client) ----------------------
taskset -c 1 env TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$head_bin" simulate \
  --listen 127.0.0.1:0 >"$out/simulator.out" 2>"$out/simulator.err" &
pids+=($!)
for _ in $(seq 100); do
  grep -q 'listening on' "$out/simulator.out" 2>/dev/null && break
  sleep 0.1
done
sim=$(grep -o 'http://[0-9.:]*' "$out/simulator.out" | head -1)
[[ -n $sim ]] || {
  echo "phases.sh: the simulator did not start" >&2
  exit 1
}

cat >"$out/sluice.toml" <<EOF
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstream]
base_url = "$sim"
api_key_env = ""
balance_poll_secs = 0
first_byte_timeout_secs = 3600
idle_timeout_secs = 3600
[cache]
enabled = true
[[tenants]]
name = "bench"
key_sha256 = ["$KEY_SHA"]
requests_per_minute = 100000000
request_burst = 100000000
tokens_per_minute = 1000000000000
max_concurrent = 100000
EOF
if [[ ${PHASES_ACCESS_LOG:-0} == 1 ]]; then
  log_filter="warn,sluice=info"
else
  log_filter="warn,sluice=info,sluice::access=off"
fi

# start_sluice NAME CMD...: starts it on core 0; sets $pid and $addr.
start_sluice() {
  local name=$1
  shift
  taskset -c 0 env TOKIO_WORKER_THREADS=1 SLUICE_LOG_FORMAT=json \
    RUST_LOG="$log_filter" "$@" --config "$out/sluice.toml" \
    >"$out/$name.out" 2>"$out/$name.err" &
  pid=$!
  pids+=("$pid")
  addr=""
  for _ in $(seq 600); do
    addr=$(grep -o '"listen":"[0-9.:]*"' "$out/$name.err" 2>/dev/null |
      head -1 | sed 's/"listen":"//; s/"//') || true
    [[ -n $addr ]] && return
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "phases.sh: $name did not start:" >&2
  tail -5 "$out/$name.err" >&2
  exit 1
}

# on_cpu PID: "NS UTIME STIME": the process's time on a CPU in ns (all its
# threads, /proc/PID/task/*/schedstat: precise, and without the time other
# processes ran), and its user and system time in clock ticks.
on_cpu() {
  local ns
  ns=$(cat /proc/"$1"/task/*/schedstat | awk '{ s += $1 } END { printf "%.0f", s }')
  echo "$ns $(cut -d' ' -f14,15 "/proc/$1/stat")"
}

stop_sluice() {
  kill -TERM "$pid"
  wait "$pid" || true
}

# client N MODE: N requests; checks that every answer has the state asked.
client() {
  local n=$1 mode=$2 want=$3 line
  line=$("$tmp/client" "$addr" "$n" "$CONNS" "$mode" "$KEY")
  [[ $line == *" 200/$want=$n"* ]] || {
    echo "phases.sh: expected $n answers 200/$want, got: $line" >&2
    exit 1
  }
}

# The batches. Misses of the keyed batch carry distinct bodies (tag `m`);
# the hits all send the warm-up's fixed body, stored by then.
warm_up() {
  client "$WARM" nostore bypass
  client "$WARM" distinct:w miss
  client 1 fixed miss
  client "$WARM" fixed hit
}
BATCHES=(bypass miss hit)
batch() {
  case $1 in
    bypass) client "$2" nostore bypass ;;
    miss) client "$2" "distinct:$3" miss ;;
    hit) client "$2" fixed hit ;;
  esac
}

# profile NAME BIN: callgrind dumps of each batch, then the native run.
profile() {
  local name=$1 bin=$2 b
  echo "== $name: callgrind, $N requests a batch" >&2
  start_sluice "$name-callgrind" valgrind --tool=callgrind --demangle=no \
    --callgrind-out-file="$out/$name.cg.%p" "$bin"
  warm_up
  callgrind_control -d warm-up "$pid" >/dev/null
  for b in "${BATCHES[@]}"; do
    batch "$b" "$N" m
    callgrind_control -d "$b" "$pid" >/dev/null
  done
  stop_sluice
  for b in "${BATCHES[@]}"; do
    f=$(grep -l "^desc: Trigger: dump $b\$" "$out/$name.cg.$pid".* | head -1)
    mv "$f" "$out/$name.$b.cg"
  done

  echo "== $name: without valgrind, $NATIVE_ROUNDS rounds of $NATIVE_N requests a batch" >&2
  start_sluice "$name-native" "$bin"
  warm_up
  : >"$out/$name.native.rounds"
  local round
  for round in $(seq "$NATIVE_ROUNDS"); do
    for b in "${BATCHES[@]}"; do
      local t0 t1
      t0="$(on_cpu "$pid")"
      batch "$b" "$NATIVE_N" "n$round"
      t1="$(on_cpu "$pid")"
      echo "$b $t0 $t1" >>"$out/$name.native.rounds"
    done
  done
  stop_sluice
  # Per batch: the round with the least CPU a request (other load on the
  # VM only ever adds), split into user and system time in the proportion
  # of all rounds' ticks.
  python3 - "$out/$name.native.rounds" "$NATIVE_N" >"$out/$name.native" <<'PY'
import sys, collections
rounds = collections.defaultdict(list)
for line in open(sys.argv[1]):
    b, ns0, u0, s0, ns1, u1, s1 = line.split()
    rounds[b].append((int(ns1) - int(ns0), int(u1) - int(u0), int(s1) - int(s0)))
n = int(sys.argv[2])
for b, rs in rounds.items():
    best = min(ns for ns, _, _ in rs) / n / 1000
    user = sum(u for _, u, _ in rs) / max(1, sum(u + s for _, u, s in rs))
    print(b, f"{best * user:.3f}", f"{best * (1 - user):.3f}")
PY
}

# table NAME: the table of one build, a column per batch.
table() {
  local name=$1 b cols=() cpu=()
  for b in "${BATCHES[@]}"; do
    cols+=("$b=$out/$name.$b.cg:$N")
    read -r _ u s < <(grep "^$b " "$out/$name.native")
    cpu+=(--cpu "$b=$u,$s")
  done
  python3 benches/phases/attribute.py --sha "$instr_per_block,$ns_per_block" \
    "${cpu[@]}" "${cols[@]}"
}

profile head "$head_bin"
[[ -z $base_bin ]] || profile base "$base_bin"

echo
echo "HEAD: $(git log -1 --format='%h %s' HEAD | cut -c1-100)"
[[ -z $base_bin ]] || echo "REV:  $(git log -1 --format='%h %s' "$base" | cut -c1-100)"
echo "$N requests a batch under callgrind, $NATIVE_ROUNDS × $NATIVE_N without, $CONNS connections;" \
  "SHA-256: $instr_per_block instructions a block under valgrind, $ns_per_block ns natively"
echo
echo "### $head_desc (HEAD)"
echo
table head
if [[ -n $base_bin ]]; then
  echo
  echo "### $base_desc"
  echo
  table base
  echo
  echo "### $head_desc against $base_desc, instructions a request"
  echo
  cols=()
  for b in "${BATCHES[@]}"; do
    cols+=("$b $head_desc=$out/head.$b.cg:$N" "$b $base_desc=$out/base.$b.cg:$N")
  done
  python3 benches/phases/attribute.py --compact "${cols[@]}"
fi
