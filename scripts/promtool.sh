#!/usr/bin/env bash
# Prints the path of Prometheus's `promtool`, which the tests run as `promtool check metrics` on
# /metrics. It is taken from Debian's `prometheus` package without installing it (so no
# Prometheus service is set up or started): the .deb is downloaded and only promtool is extracted,
# into a cache outside the repository ($POOL_TOOLS_CACHE, default ~/.cache/pool-orchestrator),
# keyed by the package version. A cached promtool is trusted only if it runs and reports that
# version; otherwise it is fetched again. Warm: instant; cold: a 19 MB download.
set -euo pipefail

log() { printf '[promtool] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cache_root="${POOL_TOOLS_CACHE:-$HOME/.cache/pool-orchestrator}"
candidate() { apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ { print $2 }'; }

version=$(candidate)
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    log "no package list names prometheus; apt-get update"
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q >&2
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo apt-get update -q >&2
    else
        die "run: sudo apt-get update"
    fi
    version=$(candidate)
    [ -n "$version" ] && [ "$version" != "(none)" ] || die "Debian has no prometheus package here"
fi
upstream=${version#*:}
upstream=${upstream%%+*}
dir="$cache_root/promtool-${version//[^A-Za-z0-9.+_-]/_}"
promtool="$dir/promtool"

verify() { [ -x "$promtool" ] && "$promtool" --version 2>&1 | head -n1 | grep -qE "version ${upstream//./\\.}([^0-9.]|$)"; }

if ! verify; then
    mkdir -p "$cache_root"
    work=$(mktemp -d "$cache_root/.promtool-XXXXXX")
    trap 'rm -rf "$work"' EXIT
    log "downloading prometheus $version (for promtool only)"
    (cd "$work" && apt-get download -q "prometheus=$version" >&2) || die "apt-get download prometheus=$version failed"
    dpkg-deb -x "$work"/prometheus_*.deb "$work/extracted"
    rm -rf "$dir"
    mkdir -p "$dir"
    mv "$work/extracted/usr/bin/promtool" "$promtool"
    verify || die "the extracted $promtool does not report version $upstream"
    log "cached: $promtool"
fi
echo "$promtool"
