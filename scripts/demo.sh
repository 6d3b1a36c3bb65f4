#!/usr/bin/env bash
# Builds the workspace and starts pool-managerd in ./.run; pool-managerd starts and supervises its
# engine itself, the test engine double (a fake llama-server: no model or GPU needed). Shows the
# registry over the socket and the debug shim, and leaves it running; `scripts/demo.sh stop`
# stops pool-managerd, which stops its engine.
set -euo pipefail
cd "$(dirname "$0")/.."
run="$PWD/.run"
shim="127.0.0.1:${DEMO_SHIM_PORT:-9200}"

stop() {
    if [ -f "$run/pool-managerd.pid" ]; then
        pid=$(cat "$run/pool-managerd.pid")
        kill "$pid" 2>/dev/null || true
        # A clean stop stops the engines too; wait for it.
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$run/pool-managerd.pid"
    fi
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

echo '{}' >"$run/demo-model.json"
cat >"$run/config.toml" <<TOML
[debug_http]
listen = "$shim"

[[pool]]
id = "demo"
model = "demo-model"
engine = "llamacpp"
command = ["$bin/test-engine-double", "--listen", "{socket}", "--slots", "4", "--model", "{model}"]
model_path = "$run/demo-model.json"
listen = "unix"
TOML

"$bin/pool-managerd" --config "$run/config.toml" --socket "$run/pool.sock" --state-dir "$run/state" \
    >"$run/pool-managerd.out" 2>"$run/pool-managerd.log" &
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
for _ in $(seq 100); do
    "$bin/pool-managerd" status demo --json --socket "$run/pool.sock" 2>/dev/null | grep -q '"ready": true' && break
    sleep 0.1
done

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
echo "Engine log:    $run/state/logs/demo.log"
echo "Stop with:     scripts/demo.sh stop"
