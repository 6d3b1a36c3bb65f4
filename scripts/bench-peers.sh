#!/usr/bin/env bash
# orchestratord against vllm-router in the same run: installs vllm-router 0.1.17 from PyPI into a
# virtual environment cached outside the repository, builds the release binaries and runs
# relay-bench with --vllm-router, so that the same streaming load goes straight to the engine,
# through orchestratord and through two vllm-routers (--policy round_robin, and its default
# policy) in rotating rounds; relay-bench prints one table and writes the plot (TTFT CDF and CPU per
# chunk per path) to $BENCH_PEERS_PLOT (default <target dir>/bench-peers.svg). Arguments go to
# relay-bench as they are, e.g.
#
#     scripts/bench-peers.sh --streams 64 --tokens 128 --rounds 5
#     scripts/bench-peers.sh --token-delay-ms 20 --streams 64 --rounds 3
#
# The venv lives in $POOL_PEERS_CACHE (default $HOME/.cache/pool-orchestrator) under
# vllm-router-0.1.17-<python version>-<machine>. It is trusted only if it finished installing (a
# stamp written last), reports that version and its launcher answers --help; otherwise it is
# rebuilt from scratch. Warm: ~1 s; cold: a wheel download (~20 MB with its dependencies).
# Needs: python3 with venv + pip, PyPI reachable on a cache miss; cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bench-peers] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

version=0.1.17
command -v python3 >/dev/null || die "python3 is required"
py=$(python3 -c 'import sys; print("py%d.%d" % sys.version_info[:2])')
cache_root="${POOL_PEERS_CACHE:-$HOME/.cache/pool-orchestrator}"
venv="$cache_root/vllm-router-$version-$py-$(uname -m)"
stamp="$venv/.complete"
router="$venv/bin/vllm-router"

verify() {
    [ -f "$stamp" ] && [ -x "$router" ] \
        && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-router"))' 2>/dev/null)" = "$version" ] \
        && "$router" --help >/dev/null 2>&1
}

if verify; then
    log "cache hit: $venv"
else
    mkdir -p "$cache_root"
    exec 9>"$cache_root/.lock-vllm-router-$version"
    flock 9
    if verify; then
        log "cache hit: $venv"
    else
        [ -e "$venv" ] && log "$venv is incomplete or broken; reinstalling"
        rm -rf "$venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
        log "pip install vllm-router==$version into $venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "vllm-router==$version" >&2 \
            || { rm -rf "$venv"; die "pip install vllm-router==$version failed"; }
        touch "$stamp"
        verify || { rm -rf "$venv"; die "the new venv's $router does not answer --help"; }
        log "installed: $venv"
    fi
    exec 9>&-
fi

log "cargo build --release --workspace --bins"
cargo build --release --workspace --bins >&2
target="${CARGO_TARGET_DIR:-target}"
plot="${BENCH_PEERS_PLOT:-$target/bench-peers.svg}"
mkdir -p "$(dirname "$plot")"

echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(uname -sr)"
echo "peer: vllm-router $version (PyPI), $router"
status=0
"$target/release/relay-bench" --vllm-router "$router" --plot "$plot" "$@" || status=$?
[ -f "$plot" ] && echo "plot written to $plot"
exit "$status"
