#!/usr/bin/env bash
# Compares this tree's Sluice with another commit's in one run of the load
# benchmark: builds REV in a temporary worktree (its own cargo target dir),
# then runs benches/load.sh with SLUICE_BENCH_BASELINE_BIN set to that build,
# so that every Sluice row runs with both builds, pass by pass, and a closing
# table gives HEAD's figures over the baseline's. See benches/README.md,
# "Comparing with a baseline".
#
# Usage: benches/compare.sh [REV] [quick]
#   REV    a commit, tag or branch. Default: where this branch left main
#          (git merge-base HEAD main), or HEAD~1 when HEAD is on main.
#   quick  shorter phases, as with benches/load.sh quick.
# "HEAD" is the working tree as it is, uncommitted changes included.
# The environment of benches/load.sh applies (SLUICE_BENCH_IDLE_STREAMS=0,
# SLUICE_BENCH_ROWS=...). SLUICE_BASELINE_TARGET_DIR=dir builds the baseline
# in that cargo target dir (kept, so a second run against the same REV
# rebuilds little) instead of a temporary one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

rev=""
args=()
for arg in "$@"; do
  case "$arg" in
    quick) args=(quick) ;;
    -h | --help) usage 0 ;;
    -*)
      echo "compare.sh: unknown option $arg" >&2
      usage
      ;;
    *)
      [[ -z $rev ]] || usage
      rev=$arg
      ;;
  esac
done
if [[ -z $rev ]]; then
  rev=$(git merge-base HEAD main 2>/dev/null || true)
  if [[ -z $rev || $rev == "$(git rev-parse HEAD)" ]]; then
    rev=HEAD~1
  fi
fi
if ! base=$(git rev-parse --verify --quiet "$rev^{commit}"); then
  echo "compare.sh: $rev is not a commit" >&2
  exit 2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sluice-baseline.XXXXXX")
cleanup() {
  git -C "$root" worktree remove --force "$tmp/src" >/dev/null 2>&1 || true
  git -C "$root" worktree prune || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "baseline: $(git log -1 --format='%h %s' "$base" | cut -c1-120)"
dirty=""
git diff --quiet HEAD -- || dirty=" (with uncommitted changes)"
echo "HEAD:     $(git log -1 --format='%h %s' HEAD | cut -c1-120)$dirty"

git worktree add --detach --quiet "$tmp/src" "$base"
target=${SLUICE_BASELINE_TARGET_DIR:-$tmp/target}
(cd "$tmp/src" && CARGO_TARGET_DIR=$target cargo build --release --bin sluice)
cp "$target/release/sluice" "$tmp/sluice-baseline"

SLUICE_BENCH_BASELINE_BIN="$tmp/sluice-baseline" benches/load.sh "${args[@]}"
