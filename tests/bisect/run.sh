#!/usr/bin/env bash
# `git bisect run` with gracevm: judge the kernel tree's current commit by the suite.
#
#   cd ~/src/linux
#   git bisect start BAD GOOD
#   git bisect run /path/to/gracevm/tests/bisect/run.sh [make variables...]
#
# e.g. `... run.sh SCENARIO=acpi,gpu-pair TESTS='kernel_*,gpu_*,egm_*' DEBUG=1`. Each step
# builds the tree (KSRC=., out of tree, incrementally in the same build directory, so a step
# that changes one driver rebuilds in seconds) and runs the chosen scenarios. Exit status, as
# git bisect wants it:
#   0     good: every test passed (skips and expected failures allowed)
#   1     bad: a test failed, the kernel panicked, or the guest hung
#   125   this commit cannot be judged: it does not build, or gracevm could not run the guest
# Anything else would abort the bisect; nothing else is returned. The step's output goes to
# $GRACEVM_BISECT_OUT/<commit> (default: /tmp/gracevm-bisect).
set -uo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
tree=$(pwd)
commit=$(git -C "$tree" rev-parse --short=12 HEAD 2>/dev/null) || {
    echo "bisect: $tree is not a git tree (run this from the kernel tree being bisected)" >&2
    exit 128
}
out=${GRACEVM_BISECT_OUT:-/tmp/gracevm-bisect}/$commit
mkdir -p "$out"
say() { printf '[bisect] %s: %s\n' "$commit" "$*" >&2; }

if ! make -s -C "$here" kernel KSRC="$tree" "$@" > "$out/build.log" 2>&1; then
    tail -n 5 "$out/build.log" >&2
    say "does not build: skipped (125); log in $out/build.log"
    exit 125
fi
make -s -C "$here" e2e KSRC="$tree" OUT="$out" "$@" > "$out/test.log" 2>&1
status=$?
# make's own status is 2 for any failed recipe: gracevm's is in results.json.
verdict=$(sed -n 's/^ *"exit_code": *\([0-9]*\).*/\1/p' "$out/results.json" 2>/dev/null | head -n 1)
[ -n "$verdict" ] || verdict=$status
case "$verdict" in
    0) say "good"; exit 0 ;;
    1) say "bad: a test failed (see $out/results.ktap)"; exit 1 ;;
    3) say "bad: the kernel panicked"; exit 1 ;;
    4) say "bad: the guest hung"; exit 1 ;;
    *) say "gracevm could not judge it (status $verdict): skipped (125); see $out/test.log"; exit 125 ;;
esac
