#!/usr/bin/env bash
# Builds every cargo-fuzz target of gracevm's device models and runs each for SECONDS.
#
#   platform/fuzz/run.sh SECONDS
#
# Prints executions, executions/s and crashes per target; exits 1 if any target crashed (the
# input is kept in platform/fuzz/artifacts/<target>/; replay it with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <file>` from platform/), 2 on a usage or
# build error. The corpus grows in platform/fuzz/corpus/<target>/ across runs (not committed).
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, sanitizer-coverage); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1, so no nightly toolchain is needed. cargo-fuzz
# itself is installed from crates.io when missing.
set -euo pipefail

usage() {
    echo "usage: $0 SECONDS" >&2
    exit 2
}
[[ $# -eq 1 && $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
secs=$1

fuzz_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
crate_dir=$(dirname "$fuzz_dir")
cd "$crate_dir"

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet || {
        echo "fuzz: could not install cargo-fuzz" >&2
        exit 2
    }
fi

start=$SECONDS
if ! cargo fuzz build --fuzz-dir "$fuzz_dir" >"$fuzz_dir/build.log" 2>&1; then
    tail -n 40 "$fuzz_dir/build.log" >&2
    echo "fuzz: build failed (full log: $fuzz_dir/build.log)" >&2
    exit 2
fi
echo "fuzz: built in $((SECONDS - start)) s"

mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
crashed=0
printf '%-10s %12s %10s %8s\n' target executions exec/s crashes
for t in "${targets[@]}"; do
    mkdir -p "$fuzz_dir/corpus/$t" "$fuzz_dir/artifacts/$t"
    log="$fuzz_dir/artifacts/$t.log"
    before=$(find "$fuzz_dir/artifacts/$t" -type f | wc -l)
    status=0
    cargo fuzz run --fuzz-dir "$fuzz_dir" "$t" "$fuzz_dir/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs=$(awk '/stat::number_of_executed_units:/ {n = $2} END {print n + 0}' "$log")
    rate=$(awk '/stat::average_exec_per_sec:/ {n = $2} END {print n + 0}' "$log")
    crashes=$(($(find "$fuzz_dir/artifacts/$t" -type f | wc -l) - before))
    if [[ $status -ne 0 && $crashes -eq 0 ]]; then
        # A failure that left no artifact (e.g. the fuzzer could not start) still fails.
        crashes=1
    fi
    printf '%-10s %12s %10s %8s\n' "$t" "$execs" "$rate" "$crashes"
    if [[ $crashes -gt 0 ]]; then
        crashed=1
        grep -m1 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer)' "$log" >&2 || true
        echo "fuzz: $t failed (exit $status); log: $log" >&2
    fi
done
exit "$crashed"
