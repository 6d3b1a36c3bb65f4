#!/usr/bin/env bash
# The project's whole check: formatting, lints, then every test. End-to-end tests start the
# real binaries, so they are built first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
