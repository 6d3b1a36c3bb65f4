#!/usr/bin/env bash
# Creates (once) and verifies a Python virtual environment with the pinned packages of
# scripts/requirements-NAME.txt, cached outside the repository. Prints the venv's directory as the
# LAST line of stdout (progress goes to stderr):
#
#     PY=$(scripts/python-env.sh model | tail -n1)/bin/python     # gguf + numpy (the model generator)
#     PY=$(scripts/python-env.sh test | tail -n1)/bin/python      # + openai/anthropic SDKs + llama-cpp-python[server]
#
# The venv lives in $POOL_PYTHON_CACHE (default $HOME/.cache/pool-orchestrator/python) under
# NAME-<hash>, the hash covering the requirements file, the Python version, the machine and the
# CMake flags used to build llama-cpp-python. It is trusted only if it finished installing (a
# stamp written last) and its packages import; otherwise it is rebuilt from scratch. Warm: ~0.3 s.
# Cold: `model` ~15 s; `test` ~6-10 min on 2 cores (llama-cpp-python compiles llama.cpp from its
# sdist, portable CPU build, without the multimodal library, which its server does not need here).
# Needs: python3 with venv + pip; for `test` also a C/C++ compiler.
set -euo pipefail

log() { printf '[python-env] %s\n' "$*" >&2; }

# Copies pip's output (stdin) to the log file $1 and shows its steps (Collecting, Building wheel,
# Successfully installed) — on one updating line on a terminal, else a line each — and, while a
# step is silent (llama-cpp-python's wheel compiles llama.cpp for minutes), how long it has run.
progress() {
    local line="" partial="" started status
    started=$(date +%s)
    exec 8>"$1"
    while :; do
        if IFS= read -r -t 30 line; then
            line="$partial$line"
            partial=""
            printf '%s\n' "$line" >&8
            case $line in
                Collecting*|Building\ wheel*|Successfully*) ;;
                *) continue ;;
            esac
        else
            status=$?
            [ "$status" -gt 128 ] || break
            partial+="$line"
            line="still working: $(( $(date +%s) - started )) s (log: $1)"
        fi
        if [ -t 2 ]; then
            printf '\r\033[K[python-env] %s' "${line:0:100}" >&2
        else
            log "$line"
        fi
    done
    [ -n "$partial" ] && printf '%s\n' "$partial" >&8
    [ -t 2 ] && printf '\n' >&2
    exec 8>&-
}
die() { log "ERROR: $*"; exit 1; }

name="${1:-}"
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements-$name.txt"
case "$name" in
    model) imports="import gguf, numpy" ;;
    test) imports="import gguf, numpy, openai, anthropic, httpx, httpx2, llama_cpp, llama_cpp.server.app" ;;
    *) die "usage: $0 model|test" ;;
esac
[ -f "$requirements" ] || die "missing $requirements"
command -v python3 >/dev/null || die "python3 is required"

# llama-cpp-python builds llama.cpp during `pip install`: portable (no -march=native, so a cached
# venv never SIGILLs on another CPU), no multimodal library, nothing but the shared libraries.
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"

cache_root="${POOL_PYTHON_CACHE:-$HOME/.cache/pool-orchestrator/python}"
hash=$( { cat "$requirements"; python3 --version 2>&1; uname -m; echo "$CMAKE_ARGS"; } \
    | sha256sum | cut -c1-12)
venv="$cache_root/$name-$hash"
stamp="$venv/.complete"

verify() {
    [ -f "$stamp" ] && [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$imports" 2>/dev/null
}

if verify; then
    log "cache hit: $venv"
    echo "$venv"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock-$name"
if ! flock -n 9; then
    log "another run holds $cache_root/.lock-$name; waiting for it ..."
    flock 9
fi
if verify; then
    log "cache hit: $venv"
    echo "$venv"
    exit 0
fi

[ -e "$venv" ] && log "$venv is incomplete or broken; rebuilding it"
rm -rf "$venv"
t0=$(date +%s)
python3 -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
log "installing $(grep -cv '^\s*\(#\|$\)' "$requirements") pinned packages from $requirements into $venv"
[ "$name" = test ] && log "(llama-cpp-python compiles llama.cpp: 6-10 min on 2 cores)"
install_log="$cache_root/$name-$hash.install.log"
if ! "$venv/bin/pip" install --disable-pip-version-check --progress-bar off -r "$requirements" 2>&1 \
        | progress "$install_log"; then
    tail -n 40 "$install_log" >&2
    rm -rf "$venv"
    die "pip install -r $requirements failed; full log: $install_log"
fi
"$venv/bin/python" -c "$imports" || { rm -rf "$venv"; die "the new venv cannot: $imports"; }
touch "$stamp"
log "ready in $(( $(date +%s) - t0 )) s: $venv"
echo "$venv"
