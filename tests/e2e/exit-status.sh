#!/usr/bin/env bash
# End-to-end checks of the harness itself, against real guests: a kernel panic, a hung guest,
# bad input and Ctrl-C each end with their own exit status, in bounded time, and leave no
# qemu or gracevm process behind; and a test chosen alone still waits for the carve-out fill
# the VMM runs beside the boot. Prints KTAP; exits 1 when a check fails.
#
#   exit-status.sh GRACEVM OUTDIR      (kernel, initrd and level-1 come from GRACEVM_* env vars)
set -u
gracevm=${1:?usage: exit-status.sh GRACEVM OUTDIR}
out=${2:?usage: exit-status.sh GRACEVM OUTDIR}
mkdir -p "$out"
# A private TMPDIR: the stage directories (and so the qemu command lines) of the runs under
# test carry it, which tells their processes apart from any other gracevm on the machine.
export TMPDIR="$(cd "$out" && pwd)/tmp"
mkdir -p "$TMPDIR"
n=0
failed=0
total=7

leftovers() {
    pgrep -af "$TMPDIR/gracevm-stage" | grep -v pgrep || true
}

# check NAME WANT_STATUS MAX_SECONDS -- command...
check() {
    local name=$1 want=$2 max=$3
    shift 4
    n=$((n + 1))
    local start end got
    start=$(date +%s.%N)
    "$@" > "$out/$name.stdout" 2> "$out/$name.stderr" < /dev/null
    got=$?
    end=$(date +%s.%N)
    local secs
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    report "$name" "$want" "$got" "$secs" "$max"
}

report() {
    local name=$1 want=$2 got=$3 secs=$4 max=$5
    local left
    left=$(leftovers)
    if [ "$got" = "$want" ] && awk -v s="$secs" -v m="$max" 'BEGIN { exit !(s <= m) }' && [ -z "$left" ]; then
        echo "ok $n $name # exit $got after $secs s"
    else
        echo "# $name: expected exit $want within $max s, got exit $got after $secs s"
        [ -n "$left" ] && echo "# left behind: $left"
        sed 's/^/# stderr: /' "$out/$name.stderr" | tail -n 5
        echo "not ok $n $name"
        failed=$((failed + 1))
    fi
}

echo "KTAP version 1"
echo "1..$total"

# A kernel that cannot find init panics at once; the panic must be reported within seconds,
# not at the timeout.
check kernel_panic 3 90 -- "$gracevm" test --append "rdinit=/nonexistent" --timeout 240 --out "$out/panic"

# A guest that never powers off is killed at its timeout.
check guest_timeout 4 150 -- "$gracevm" run --cmd "sleep 100000" --timeout 15 --out "$out/timeout"

# A guest fault (an MMIO read the VMM cannot decode: a load pair, no syndrome) ends the run
# at once with the panic status, as on the direct route; never a VMM failure or a timeout.
check guest_fault 3 90 -- "$gracevm" run --cmd "/bin/gracevm-suite --mmio-without-syndrome" \
    --timeout 240 --out "$out/fault"

# The VMM fills the carve-outs beside the boot (five GiB on four sockets take longer than
# the boot): a test that reads them, run first, must wait for the fill, not read zeroes.
check fill_awaited_when_first 0 240 -- "$gracevm" test --scenarios-dir tests/scenarios \
    --scenario egm-four-sockets --tests carveout_pattern --timeout 200 --out "$out/fill"

# Bad input: one clear message, nothing runs.
check missing_kernel 2 5 -- "$gracevm" test --kernel /nonexistent/Image --out "$out/missing"
if ! grep -q "does not exist" "$out/missing_kernel.stderr"; then
    echo "# missing_kernel: no clear message: $(head -c 300 "$out/missing_kernel.stderr")"
fi
check bad_memory 2 5 -- "$gracevm" test --memory 3M --out "$out/badmem"

# Ctrl-C (SIGINT) ends a run with 130 and kills qemu and the guest.
n=$((n + 1))
start=$(date +%s.%N)
"$gracevm" run --cmd "sleep 100000" --out "$out/interrupt" \
    > "$out/interrupt.stdout" 2> "$out/interrupt.stderr" < /dev/null &
pid=$!
sleep 8
kill -INT "$pid"
wait "$pid"
got=$?
end=$(date +%s.%N)
report interrupt 130 "$got" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')" 20

echo "# $((total - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
