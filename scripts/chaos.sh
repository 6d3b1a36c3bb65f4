#!/usr/bin/env bash
# Chaos soak (tests/src/bin/chaos-soak.rs): 500 concurrent streams through orchestratord over 3
# test-engine-double pools (fake engines) for DURATION seconds (default 60) while, at random
# intervals from a seeded RNG, engines are SIGKILLed or SIGSTOPped for a few seconds and
# pool-managerd is SIGKILLed and restarted on its socket; clients also drop streams on purpose and
# slow readers stall. It prints the tally (completed, typed failures, dropped, cut off, broken),
# leaked leases and engine processes and the daemons' RSS, and exits non-zero when a stream broke
# or anything leaked. Loopback and Unix sockets only; it takes DURATION plus about 30 s after the
# build (the dev profile, as the tests use: a correctness check, with overflow checks on, not a
# benchmark). Extra arguments go to chaos-soak (--seed N to replay a run, --concurrency N, --help).
# The daemons' logs go to CHAOS_LOG (default: a temporary file, named at the start).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
log=${CHAOS_LOG:-$(mktemp /tmp/chaos-soak.XXXXXX.log)}
echo "chaos.sh: daemon logs in $log" >&2
exec "${CARGO_TARGET_DIR:-target}/debug/chaos-soak" --duration-secs "${DURATION:-60}" "$@" 2>"$log"
