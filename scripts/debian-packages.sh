#!/usr/bin/env bash
# Installs the Debian packages the demo (and, with --tests, the tests) need: only those missing,
# so a prepared machine installs nothing and needs no root. Uses apt-get as root, or through
# `sudo -n` when that works without a password; otherwise prints the command to run and fails.
#
#   curl            the demo's request, and tests that drive the daemons as an operator would
#   g++             building llama.cpp's llama-server (and llama-cpp-python) from PyPI sources
#   python3-venv    the Python venvs of scripts/python-env.sh (model generator, openai SDK)
#   systemd         (--tests) systemd-analyze, -sysusers, -tmpfiles and -socket-activate for the
#                   tests of the units and of socket activation; nothing is started
#   haproxy         (--tests) the balancer of the fleet test (tests/tests/fleet.rs runs
#                   deploy/haproxy/haproxy.cfg); Debian enables its service with an empty config
#   chromium        (--tests) the headless browser the status page test drives (through
#                   Playwright's driver from the test venv; no browser is downloaded)
set -euo pipefail

missing=()
command -v curl >/dev/null || missing+=(curl)
command -v g++ >/dev/null || missing+=(g++)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${1:-}" = "--tests" ]; then
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    command -v chromium >/dev/null || missing+=(chromium)
fi
[ "${#missing[@]}" -eq 0 ] && exit 0

echo "[debian-packages] installing: ${missing[*]}" >&2
if [ "$(id -u)" = 0 ]; then
    apt=(apt-get)
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    apt=(sudo apt-get)
else
    echo "[debian-packages] missing packages; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
"${apt[@]}" update -q >&2
DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >&2
