#!/usr/bin/env bash
# The main job on one machine, no root needed: builds what is missing (the workspace; llama.cpp's
# llama-server from PyPI's llama-cpp-python sdist and a Python venv with gguf + numpy, both cached
# in ~/.cache/pool-orchestrator), generates a tiny LLaMA GGUF model, then starts in ./.run
# pool-managerd (which starts and supervises llama-server on that model) and orchestratord in
# front of it, waits until they are ready, sends one streamed OpenAI chat request through
# orchestratord and prints the answer. Leaves both running; `scripts/demo.sh stop` stops them
# (pool-managerd stops its engine).
#
# Environment: DEMO_API_PORT (orchestratord, default 8080), DEMO_SHIM_PORT (pool-managerd's debug
# shim, default 9200), DEMO_MODEL (a GGUF file to serve instead of the generated tiny model; its
# model id is then the file name without .gguf), DEMO_CTX (llama-server's -c, default 2048: two
# slots of 1024 tokens).
set -euo pipefail
# A relative DEMO_MODEL means relative to where the demo was started.
if [ -n "${DEMO_MODEL:-}" ]; then
    DEMO_MODEL=$(realpath -e -- "$DEMO_MODEL") || { echo "demo: no model file at $DEMO_MODEL" >&2; exit 1; }
fi
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

# Waits up to $1 tenths of a second for command $2… to succeed while pid file $pidfile's process
# lives; on failure shows $log and exits.
wait_for() {
    local tenths="$1" what="$2" pidfile="$3" log="$4"
    shift 4
    for _ in $(seq "$tenths"); do
        "$@" >/dev/null 2>&1 && return 0
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "demo: the daemon exited before $what; its log ($log):" >&2
            tail -n 40 "$log" >&2
            stop
            exit 1
        fi
        sleep 0.1
    done
    echo "demo: timed out waiting for $what; see $log. Stopping what was started." >&2
    stop
    exit 1
}

if [ "${1:-}" = "stop" ]; then
    stop
    echo "stopped"
    exit 0
fi

command -v cargo >/dev/null || { echo "demo: needs a Rust toolchain (cargo); see https://rustup.rs" >&2; exit 1; }
scripts/debian-packages.sh
echo "== building the workspace (release)"
cargo build --release --workspace --bins
bin="$PWD/target/release"
echo "== llama.cpp's llama-server (cached after the first build, which takes ~7-13 min on 2 cores)"
llama_server=$(scripts/build-llama-server.sh | tail -n1)
stop
mkdir -p "$run/models"

model="${DEMO_MODEL:-$run/models/tiny.gguf}"
model_id=tiny
[ -n "${DEMO_MODEL:-}" ] && model_id=$(basename "$model" .gguf)
# The id goes into TOML and JSON as it is.
case "$model_id" in
    *[!A-Za-z0-9._-]*|"") echo "demo: use a model file name of letters, digits, '.', '_' and '-' (got $model_id)" >&2; exit 1 ;;
esac
if [ -z "${DEMO_MODEL:-}" ]; then
    echo "== generating a tiny LLaMA model (random weights, readable word salad)"
    python=$(scripts/python-env.sh model | tail -n1)/bin/python
    "$python" scripts/make-tiny-model.py "$model" --ctx 1024
fi
[ -f "$model" ] || { echo "demo: no model file at $model" >&2; exit 1; }

cat >"$run/config.toml" <<TOML
# Written by scripts/demo.sh. Every key: systemd/pool-managerd.example.toml.
[debug_http]
listen = "$shim"

[[pool]]
id = "demo"
model = "$model_id"
engine = "llamacpp"
command = ["$llama_server", "-m", "{model}", "--host", "{socket}", "--alias", "$model_id",
           "-np", "2", "-c", "${DEMO_CTX:-2048}"]
model_path = "$model"
listen = "unix"
startup_timeout_ms = 120000
TOML

"$bin/pool-managerd" --config "$run/config.toml" --socket "$run/pool.sock" --state-dir "$run/state" \
    >"$run/pool-managerd.out" 2>"$run/pool-managerd.log" &
echo $! >"$run/pool-managerd.pid"
wait_for 100 "pool-managerd's READY line" "$run/pool-managerd.pid" "$run/pool-managerd.log" \
    grep -q '^READY' "$run/pool-managerd.out"
grep '^READY' "$run/pool-managerd.out"
wait_for 1200 "llama-server to load the model" "$run/pool-managerd.pid" "$run/state/logs/demo.log" \
    sh -c '"$1" status demo --json --socket "$2" | grep -q "\"ready\": true"' _ "$bin/pool-managerd" "$run/pool.sock"

"$bin/orchestratord" --listen "$api" --socket "$run/pool.sock" \
    >"$run/orchestratord.out" 2>"$run/orchestratord.log" &
echo $! >"$run/orchestratord.pid"
wait_for 100 "orchestratord to be ready" "$run/orchestratord.pid" "$run/orchestratord.log" \
    curl -sf "http://$api/readyz"

echo
echo "== pool-managerd status (over its Unix socket)"
"$bin/pool-managerd" status --socket "$run/pool.sock"
echo
echo "== a streamed chat completion through orchestratord (http://$api), printed as it arrives"
request='{"model":"'"$model_id"'","messages":[{"role":"user","content":"Tell me a story."}],"max_tokens":24,"stream":true}'
echo "   request: $request"
curl -sN "http://$api/v1/chat/completions" -H 'Content-Type: application/json' -d "$request" \
    | tee "$run/last-answer.sse" | python3 -u -c '
import json, sys
text, finish = "", None
for line in sys.stdin:
    if not line.startswith("data: {"):
        continue
    chunk = json.loads(line[6:])
    if chunk.get("error"):
        sys.exit("\ndemo: the stream failed: %s" % chunk["error"])
    for choice in chunk.get("choices", []):
        piece = choice.get("delta", {}).get("content") or ""
        text += piece
        print(piece, end="", flush=True)
        finish = choice.get("finish_reason") or finish
if not text:
    sys.exit("demo: no answer came back")
print("\n   (finish_reason: %s; the raw SSE stream is in %s)" % (finish, sys.argv[1]))
' "$run/last-answer.sse"
echo
echo "Running (pool-managerd + llama-server + orchestratord). Try:"
echo "  curl -sN http://$api/v1/chat/completions -H 'Content-Type: application/json' \\"
echo "       -d '{\"model\":\"$model_id\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"stream\":true,\"max_tokens\":32}'"
echo "  $bin/pool-managerd status --socket $run/pool.sock"
echo "  curl -s http://$shim/metrics; curl -s http://$api/metrics"
echo "Logs: $run/pool-managerd.log, $run/orchestratord.log, engine: $run/state/logs/demo.log"
echo "Stop: $PWD/scripts/demo.sh stop"
