#!/usr/bin/env bash
# The project's whole check: formatting, lints, then every test. End-to-end tests start the
# real binaries, so they are built first; the real-engine tests (tests/tests/real_engine.rs) also
# need llama.cpp's llama-server and a Python with the openai SDK and llama-cpp-python's server,
# which the two scripts below find in their caches (outside the repository) or build there once
# (cold: ~7-13 min for llama-server, ~6-10 min for the Python packages on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/debian-packages.sh --tests
cargo fmt --all -- --check
python3 scripts/check-links.py
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
POOL_TEST_LLAMA_SERVER=$(scripts/build-llama-server.sh | tail -n1)
POOL_TEST_PYTHON=$(scripts/python-env.sh test | tail -n1)/bin/python
POOL_TEST_PROMTOOL=$(scripts/promtool.sh | tail -n1)
export POOL_TEST_LLAMA_SERVER POOL_TEST_PYTHON POOL_TEST_PROMTOOL
cargo test --workspace
