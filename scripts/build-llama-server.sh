#!/usr/bin/env bash
# Obtains a real llama.cpp `llama-server` on a fresh Debian machine from the package registries
# alone, and caches it outside the repository. Prints the binary's path as the LAST line of stdout
# (all progress goes to stderr), so callers can do:
#
#     LLAMA_SERVER=$(scripts/build-llama-server.sh | tail -n1)
#
# How: PyPI's source distribution of llama-cpp-python vendors llama.cpp's whole tree
# (vendor/llama.cpp, including tools/server). We download only that sdist (never
# `--no-binary :all:`, which would compile cmake itself from source), install cmake and ninja from
# PyPI into a private venv in the cache, and build only the `llama-server` target, statically
# linked against llama/ggml (the binary needs only libc, libstdc++ and libgomp).
# Needs: python3 (with venv + pip), a C/C++ compiler (gcc/g++), tar, sha256sum. No root, no git.
#
# Usage: scripts/build-llama-server.sh [--cuda] [--force]
#   --cuda   GPU build: adds -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90}
#            (90 = H100/H200; e.g. CUDA_ARCHS="80;86;89;90" for A100/A10/L4/H100). Needs the CUDA
#            toolkit (nvcc on PATH or CUDACXX set). Measured on an H200 host with CUDA 13.0:
#            configure 4 s, ~4-5 min with -j16, an 86 MB binary. Run the server with `-ngl 99` to
#            offload layers. The CUDA binary links libcuda.so.1 (the driver), so its --version check
#            (and thus the cache) works only on a host with the NVIDIA driver installed.
#   --force  ignore the cache and rebuild.
#
# Environment:
#   LLAMA_CACHE                  cache root (default $HOME/.cache/pool-orchestrator/llama-server).
#                                NB: llama-server itself also reads LLAMA_CACHE (where it keeps
#                                models fetched with -hf); don't export it into the server's env.
#   LLAMA_CPP_PYTHON_VERSION     sdist version to build (default 0.3.36)
#   LLAMA_SDIST                  a llama-cpp-python sdist (.tar.gz) already on disk, for hosts
#                                without PyPI access: nothing is downloaded. Its version must be
#                                LLAMA_CPP_PYTHON_VERSION (it keys the cache).
#   CUDA_ARCHS                   CUDA architectures for --cuda (default 90)
#   JOBS                         parallel build jobs (default $(nproc))
#
# Progress: ninja's [n/N] on one updating line (on a terminal; otherwise a line at every tenth of
# the build), and the full configure and build logs beside the binary (configure.log, build.log).
#
# Cache layout: $LLAMA_CACHE/<version>-<flags-hash>/llama-server, where the hash covers the
# version, the CMake flags (GGML_NATIVE=OFF: a portable build, not tied to this CPU; a -march=native
# build must never be cached without the CPU in the key) and the machine architecture. A cached
# binary is trusted only if `llama-server --version` exits 0 and prints a version; otherwise it is
# rebuilt. A warm run costs ~40 ms. Cost cold: ~20 s for the venv and the 77 MB download, ~1 s
# configure, 6.5 min build on 2 idle cores (12.4 min measured on 2 cores shared with other
# compiles); peak RSS ~630 MB; ~1 GB of disk during the build (the work dir is deleted after).
set -euo pipefail

log() { printf '[build-llama-server] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Copies the build's output (stdin) to the log file $1 and shows ninja's progress: its [n/N] on
# one updating line on a terminal, else one line at every tenth of the way (CI logs).
progress() {
    local line n total tenth shown=-1
    exec 8>"$1"
    while IFS= read -r line; do
        printf '%s\n' "$line" >&8
        [[ $line =~ ^\[([0-9]+)/([0-9]+)\] ]] || continue
        n=${BASH_REMATCH[1]}
        total=${BASH_REMATCH[2]}
        if [ -t 2 ]; then
            line="[build-llama-server] [$n/$total] ${line#*] }"
            printf '\r\033[K%s' "${line:0:100}" >&2
        else
            tenth=$(( n * 10 / total ))
            if [ "$tenth" -gt "$shown" ]; then
                shown=$tenth
                log "[$n/$total]"
            fi
        fi
    done
    [ -t 2 ] && printf '\n' >&2
    exec 8>&-
}

cuda=0
force=0
for arg in "$@"; do
    case "$arg" in
        --cuda) cuda=1 ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--cuda] [--force])" ;;
    esac
done

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache_root="${LLAMA_CACHE:-$HOME/.cache/pool-orchestrator/llama-server}"
jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

# Only what llama-server needs. (LLAMA_CURL no longer exists in this tree: it is deprecated and
# ignored, HTTPS is LLAMA_OPENSSL's job, so it is not passed.)
cmake_flags=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DGGML_BUILD_TESTS=OFF
    -DGGML_BUILD_EXAMPLES=OFF
)
if [ "$cuda" = 1 ]; then
    cmake_flags+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90}")
fi

flags_hash=$(printf '%s\n' "llama-cpp-python=$version" "arch=$(uname -m)" "${cmake_flags[@]}" \
    | sha256sum | cut -c1-12)
key="$version-$flags_hash"
out_dir="$cache_root/$key"
bin="$out_dir/llama-server"

# Succeeds iff $1 runs and reports a version (llama-server prints "version: N (commit)" to stderr).
verify() {
    local b="$1" v
    [ -x "$b" ] || return 1
    v=$(timeout 30 "$b" --version 2>&1) || return 1
    printf '%s\n' "$v" | grep -q '^version: ' || return 1
    log "verified: $(printf '%s\n' "$v" | grep '^version: ' | head -n1)"
}

if [ "$force" = 0 ] && verify "$bin"; then
    log "cache hit: $bin"
    echo "$bin"
    exit 0
fi

[ -n "${LLAMA_SDIST:-}" ] || command -v python3 >/dev/null || die "python3 is required"
command -v c++ >/dev/null || command -v g++ >/dev/null || die "a C++ compiler is required (apt-get install g++)"
if [ "$cuda" = 1 ] && ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ]; then
    die "--cuda needs the CUDA toolkit: nvcc on PATH or CUDACXX set"
fi

mkdir -p "$cache_root"
# Two concurrent runs (e.g. parallel CI jobs) must not build into the same place.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache_root/.lock"
    if ! flock -n 9; then
        log "another build holds $cache_root/.lock; waiting for it ..."
        flock 9
    fi
    if [ "$force" = 0 ] && verify "$bin"; then   # someone else built it meanwhile
        log "cache hit: $bin"
        echo "$bin"
        exit 0
    fi
fi

if [ -e "$bin" ]; then
    log "cached binary at $bin failed verification; rebuilding"
fi
log "building llama-server from llama-cpp-python==$version (key $key; flags: ${cmake_flags[*]})"

# Build tools: cmake and ninja from PyPI, in a venv of our own (never system-wide); a host that
# has both on PATH and no PyPI (LLAMA_SDIST set) uses its own.
tools="$cache_root/tools-venv"
if [ -n "${LLAMA_SDIST:-}" ] && command -v cmake >/dev/null && command -v ninja >/dev/null; then
    log "using cmake and ninja from PATH"
elif ! [ -x "$tools/bin/cmake" ] || ! [ -x "$tools/bin/ninja" ]; then
    log "installing cmake and ninja from PyPI into $tools"
    rm -rf "$tools"
    python3 -m venv "$tools" \
        || die "python3 -m venv failed: needs python3-venv (or, with LLAMA_SDIST, cmake and ninja on PATH)"
    "$tools/bin/pip" install --quiet --disable-pip-version-check cmake ninja >&2 \
        || die "pip install cmake ninja failed"
fi
export PATH="$tools/bin:$PATH"

work="$cache_root/work-$key"
rm -rf "$work"
mkdir -p "$work"
t0=$(date +%s)

if [ -n "${LLAMA_SDIST:-}" ]; then
    sdist="$LLAMA_SDIST"
    [ -f "$sdist" ] || die "LLAMA_SDIST=$sdist is not a file"
else
    log "downloading the llama-cpp-python==$version sdist from PyPI"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work/dl" >&2 \
        || die "pip download of llama-cpp-python==$version failed"
    sdist=$(ls "$work"/dl/llama_cpp_python-*.tar.gz 2>/dev/null | head -n1)
    [ -n "$sdist" ] || die "no sdist in $work/dl (did pip fetch a wheel instead?)"
    # pip checked PyPI's hash; the pinned version's file is also checked against a hash of our own.
    if [ "$version" = 0.3.36 ]; then
        echo "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e  $sdist" \
            | sha256sum --check --quiet >&2 || die "$sdist does not have the expected sha256"
    fi
fi

log "unpacking $(basename "$sdist")"
mkdir -p "$work/src"
tar -xzf "$sdist" -C "$work/src" --strip-components=1
src="$work/src/vendor/llama.cpp"
[ -f "$src/tools/server/CMakeLists.txt" ] || die "$src has no tools/server: unexpected sdist layout"
# The version keys the cache: the tree must be the version it will be filed under.
sdist_version=$(sed -n 's/^Version: *//p' "$work/src/PKG-INFO" 2>/dev/null | head -n1)
[ "$sdist_version" = "$version" ] \
    || die "$(basename "$sdist") is version '${sdist_version:-unknown}', not $version (set LLAMA_CPP_PYTHON_VERSION)"

# llama.cpp stamps its version from `git describe`; stop git from finding an enclosing repository.
export GIT_CEILING_DIRECTORIES="$work"

# The configure and build logs stay in the cache, next to the binary they made (or the failure).
mkdir -p "$out_dir"
configure_log="$out_dir/configure.log"
build_log="$out_dir/build.log"
log "configuring ($(cmake --version | head -n1), ninja $(ninja --version))"
cmake -S "$src" -B "$work/build" -G Ninja "${cmake_flags[@]}" >"$configure_log" 2>&1 || {
    tail -n 40 "$configure_log" >&2
    die "cmake configure failed; full log: $configure_log"
}

log "building target llama-server with -j$jobs (6.5-12 min on 2 cores; full log: $build_log)"
if ! cmake --build "$work/build" --target llama-server -j "$jobs" 2>&1 | progress "$build_log"; then
    tail -n 60 "$build_log" >&2
    die "build failed; full log: $build_log"
fi

built="$work/build/bin/llama-server"
verify "$built" || die "the freshly built $built does not run --version"

# Publish atomically: a half-copied binary is never at $bin.
mkdir -p "$out_dir"
cp "$built" "$bin.tmp.$$"
mv -f "$bin.tmp.$$" "$bin"
rm -rf "$work"
log "built in $(( $(date +%s) - t0 )) s: $bin ($(du -h "$bin" | cut -f1))"
echo "$bin"
