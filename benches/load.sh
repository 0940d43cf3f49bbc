#!/usr/bin/env bash
# Runs the load benchmark (benches/load.rs) with an fd limit high enough for
# 10 000 idle streams. Needs `taskset` (util-linux); nginx is optional
# (`apt-get install nginx-light`), its row is skipped with the reason if absent;
# so is redis-server (`apt-get install redis-server`, with redis-cli) for the
# Redis rows (sluice-miss-redis, sluice-miss-redis-cache, sluice-hit-redis-*):
# the bench starts its own on a free loopback port.
# SLUICE_BENCH_IDLE_STREAMS=0 skips the 10 000 idle streams.
# SLUICE_BENCH_ROWS=sluice-miss,sluice-miss-cache runs only those rows of the
# main table (and direct); for profiling one path, not for the figures.
# SLUICE_BENCH_BASELINE_BIN=path/to/sluice (older name SLUICE_BENCH_ALT_BIN)
# runs every Sluice row again with that build (rows named ...@base), each
# right after HEAD's in every pass, and ends with a table of HEAD's figures
# over the baseline's; benches/compare.sh REV builds REV and does this.
# SLUICE_BENCH_REMOTE_KEYS=N: distinct answers the sluice-hit-redis-remote row
# reads a pass (default 8 000 quick, 25 000 full; Redis is filled with three
# passes' worth plus the fixed-rate phase's before the run).
# Usage: benches/load.sh [quick]
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec cargo bench --bench load -- "$@"
