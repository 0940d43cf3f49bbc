#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a while on its stored seed
# corpus, with cargo-fuzz (libFuzzer) on the stable toolchain. What new
# inputs a run finds go to fuzz/found/<target>/ (not committed); a crash is
# written to fuzz/artifacts/ and fails the script.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      default: 15 s each, every target
#
# Environment: FUZZ_PROFILE=dev (default; quick to build, what CI runs) or
# release (optimized, for long runs); FUZZ_JOBS (default 2): targets run at
# once; FUZZ_TARGET_DIR: cargo's target directory (default fuzz/target).
# Needs cargo-fuzz on PATH (.ci/run installs the pinned version).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-15}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sse usage request config)
profile="${FUZZ_PROFILE:-dev}"
jobs="${FUZZ_JOBS:-2}"

flags=(--sanitizer none)
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
  flags+=(--target-dir "$FUZZ_TARGET_DIR")
fi
if [ "$profile" = dev ]; then
  # No debug info: it is most of a dev build's time, and a crash still
  # names the panic's file and line.
  export CARGO_PROFILE_DEV_DEBUG=0
  flags+=(--dev)
fi
# Cargo.lock pins libfuzzer-sys (and so libFuzzer) and the rest; not
# --locked, so that a dependency added to Sluice does not break this step
# before someone refreshes fuzz/Cargo.lock: cargo keeps every pinned version.
cargo fuzz build "${flags[@]}"

dict() {
  case "$1" in
    sse) echo dict/sse.dict ;;
    config) echo dict/toml.dict ;;
    *) echo dict/json.dict ;;
  esac
}

mkdir -p artifacts
run() {
  local t="$1"
  mkdir -p "found/$t"
  # The first corpus directory is where libFuzzer writes what it finds;
  # the stored seeds are only read.
  local rc=0
  cargo fuzz run "${flags[@]}" "$t" "found/$t" "corpus/$t" -- \
    -max_total_time="$secs" -dict="$(dict "$t")" -print_final_stats=1 \
    -artifact_prefix="artifacts/$t-" >"found/$t.log" 2>&1 || rc=$?
  local execs
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "found/$t.log" | grep -o '[0-9]*$' || echo '?')
  if [ "$rc" = 0 ]; then
    echo "fuzz $t: ${secs} s, $execs runs, no crash"
  else
    echo "fuzz $t: FAILED (exit $rc); the log:"
    tail -n 60 "found/$t.log"
  fi
  return "$rc"
}

pids=()
status=0
for t in "${targets[@]}"; do
  run "$t" &
  pids+=("$!")
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do
  wait "$p" || status=1
done
exit "$status"
