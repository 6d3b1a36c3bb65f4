#!/usr/bin/env bash
# Builds the workspace and starts pool-managerd in ./.run against the test engine double (a fake
# llama-server: no model or GPU needed), then shows the registry over the socket and the debug
# shim. Leaves both running; `scripts/demo.sh stop` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
run="$PWD/.run"
shim="127.0.0.1:${DEMO_SHIM_PORT:-9200}"

stop() {
    for name in pool-managerd engine; do
        if [ -f "$run/$name.pid" ]; then
            kill "$(cat "$run/$name.pid")" 2>/dev/null || true
            rm -f "$run/$name.pid"
        fi
    done
}

if [ "${1:-}" = "stop" ]; then
    stop
    echo "stopped"
    exit 0
fi

command -v cargo >/dev/null || { echo "demo: needs a Rust toolchain (cargo); see https://rustup.rs" >&2; exit 1; }
cargo build --release --workspace --bins
bin="$PWD/target/release"
stop
mkdir -p "$run"

"$bin/test-engine-double" --listen "$run/engine.sock" --slots 4 >"$run/engine.out" 2>"$run/engine.log" &
echo $! >"$run/engine.pid"

cat >"$run/config.toml" <<TOML
[debug_http]
listen = "$shim"

[[pool]]
id = "demo"
model = "demo-model"
engine = "llamacpp"
endpoint = "$run/engine.sock"
slots = 4
TOML

"$bin/pool-managerd" --config "$run/config.toml" --socket "$run/pool.sock" >"$run/pool-managerd.out" 2>"$run/pool-managerd.log" &
echo $! >"$run/pool-managerd.pid"
for _ in $(seq 100); do
    grep -q '^READY' "$run/pool-managerd.out" 2>/dev/null && break
    if ! kill -0 "$(cat "$run/pool-managerd.pid")" 2>/dev/null; then
        cat "$run/pool-managerd.log" >&2
        exit 1
    fi
    sleep 0.1
done
grep '^READY' "$run/pool-managerd.out"

echo
echo "== pool-managerd status (over the Unix socket)"
"$bin/pool-managerd" status --socket "$run/pool.sock"
echo
echo "== GET http://$shim/pools/demo/status (debug shim)"
curl -s "http://$shim/pools/demo/status"
echo
echo
echo "Running. Try:  $bin/pool-managerd status --socket $run/pool.sock --json"
echo "               curl -s http://$shim/metrics"
echo "Stop with:     scripts/demo.sh stop"
