#!/usr/bin/env bash
# Builds the workspace and starts, in ./.run, pool-managerd (which starts and supervises its engine,
# for now the test engine double: a fake llama-server, no model or GPU needed) and orchestratord in
# front of it; shows the registry, then sends one streamed OpenAI chat request through
# orchestratord and prints the answer. Leaves both running; `scripts/demo.sh stop` stops them
# (pool-managerd stops its engine).
set -euo pipefail
cd "$(dirname "$0")/.."
run="$PWD/.run"
shim="127.0.0.1:${DEMO_SHIM_PORT:-9200}"
api="127.0.0.1:${DEMO_API_PORT:-8080}"

stop() {
    for name in orchestratord pool-managerd; do
        if [ -f "$run/$name.pid" ]; then
            pid=$(cat "$run/$name.pid")
            kill "$pid" 2>/dev/null || true
            # A clean stop finishes streams and stops the engines; wait for it.
            for _ in $(seq 350); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
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

"$bin/orchestratord" --listen "$api" --socket "$run/pool.sock" \
    >"$run/orchestratord.out" 2>"$run/orchestratord.log" &
echo $! >"$run/orchestratord.pid"
for _ in $(seq 100); do
    curl -sf "http://$api/readyz" >/dev/null 2>&1 && break
    if ! kill -0 "$(cat "$run/orchestratord.pid")" 2>/dev/null; then
        cat "$run/orchestratord.log" >&2
        exit 1
    fi
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
echo "== a streamed chat completion through orchestratord (http://$api)"
curl -sN "http://$api/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model":"demo-model","messages":[{"role":"user","content":"Say hello"}],"max_tokens":12,"stream":true}'
echo
echo "Running. Try:  curl -sN http://$api/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "                 -d '{\"model\":\"demo-model\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"stream\":true}'"
echo "               $bin/pool-managerd status --socket $run/pool.sock --json"
echo "               curl -s http://$shim/metrics"
echo "Engine log:    $run/state/logs/demo.log"
echo "Stop with:     scripts/demo.sh stop"
