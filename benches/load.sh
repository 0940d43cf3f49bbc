#!/usr/bin/env bash
# Runs the load benchmark (benches/load.rs) with an fd limit high enough for
# 10 000 idle streams. Needs `taskset` (util-linux); nginx is optional
# (`apt-get install nginx-light`), its row is skipped with the reason if absent;
# so is redis-server (`apt-get install redis-server`, with redis-cli) for the
# sluice-miss-redis row: the bench starts its own on a free loopback port.
# SLUICE_BENCH_IDLE_STREAMS=0 skips the 10 000 idle streams.
# Usage: benches/load.sh [quick]
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec cargo bench --bench load -- "$@"
