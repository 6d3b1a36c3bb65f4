#!/usr/bin/env bash
# Fuzz smoke run: builds the cargo-fuzz targets in fuzz/ (frame_decoder, hello_handshake,
# sse_decoder, openai_validator) and runs each for a bounded time, FUZZ_SECONDS (default 60), on a
# temporary copy of its committed seed corpus (fuzz/corpus/<target>/, which therefore never grows).
# Fails if any target crashes, printing the crash input's path (kept under fuzz/artifacts/<target>/)
# and how to replay it; each crash found must become a regression test in the crate that owns the
# code. libFuzzer needs a nightly toolchain: without one this says so and skips (exit 0). Installs
# cargo-fuzz from crates.io if it is missing. FUZZ_TARGETS="a b" runs only those targets.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rustup >/dev/null || ! rustup toolchain list | grep -q '^nightly' \
    || ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain, skipping"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

seconds=${FUZZ_SECONDS:-60}
read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo +nightly fuzz list | tr '\n' ' ')}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fuzz: building ${targets[*]} ($(cargo +nightly --version))"
time cargo +nightly fuzz build

failed=()
summary=()
for target in "${targets[@]}"; do
    mkdir -p "$work/$target" "fuzz/artifacts/$target"
    cp -R "fuzz/corpus/$target/." "$work/$target/"
    touch "$work/$target.start"
    echo "fuzz: running $target for ${seconds}s"
    log="$work/$target.log"
    if cargo +nightly fuzz run "$target" "$work/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASHED
        failed+=("$target")
        tail -n 60 "$log"
        find "fuzz/artifacts/$target" -type f -newer "$work/$target.start" | while read -r artifact; do
            echo "fuzz: $target crash input: $artifact"
            echo "fuzz:   replay: cargo +nightly fuzz run $target $artifact"
        done
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    summary+=("$(printf '%-18s %-8s %12s runs %10s execs/s' "$target" "$status" "${runs:-?}" "${rate:-?}")")
done

echo "fuzz: ${seconds}s per target"
printf 'fuzz: %s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "fuzz: FAILED: ${failed[*]} crashed; turn each crash into a regression test" >&2
    exit 1
fi
echo "fuzz: no crashes"
