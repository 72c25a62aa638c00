#!/usr/bin/env bash
# `make bench`: the developer's loop, measured on this machine, each figure beside its
# before-state taken in the same run where that is affordable. Writes OUT/bench.json and
# prints a table.
#
#   loop.sh OUT [PHASE...]      phases: boot vmm series edit overlap (default: all)
#
# Environment (from make): PATCHES= the series to time (default: a one-patch series made
# here against the default source, touching the nvgrace-gpu driver); BENCH_SCENARIO= the one
# scenario of the edit loop (acpi); BENCH_MATRIX= the scenarios a series is judged on (every
# EGM one); BENCH_OVERLAP= the scenarios run one at a time and then together, to time what
# running them concurrently saves (a 30 s readiness wait among them); BENCH_FULL=1 also times
# a series built from nothing (about 15 minutes on 2 cores).
#
# Timings are wall seconds of whole make commands, as a developer waits for them. This
# machine is shared and noisy: compare figures of one run as ratios, not across runs.
set -euo pipefail

out=${1:?usage: loop.sh OUT [PHASE...]}
shift
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(boot vmm series edit overlap)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${CACHE:-$HOME/.cache/gracevm}
scenario=${BENCH_SCENARIO:-acpi}
matrix=${BENCH_MATRIX:-egm-*,acpi,dt}
overlap=${BENCH_OVERLAP:-gpu-not-ready,acpi,egm-multi-open,egm-retired-512-isolated}
mkdir -p "$out"
out=$(cd "$out" && pwd)
figures=$out/figures.tsv
: > "$figures"

say() { printf '[bench] %s\n' "$*" >&2; }
now() { date +%s.%N; }
# record KEY VALUE [NOTE]
record() { printf '%s\t%s\t%s\n' "$1" "$2" "${3:-}" >> "$figures"; }
# timed KEY LOG make-args...: a make command's wall time, recorded and left in $took; its
# output goes to LOG. A guest run (e2e) is timed to its verdict whatever the verdict; any
# other failing make stops the bench.
took=
timed() {
    local key=$1 log=$2 t0 t1 rc=0
    shift 2
    say "$key: make $* (log: $log)"
    t0=$(now)
    make -C "$repo" --no-print-directory "$@" > "$log" 2>&1 || rc=$?
    t1=$(now)
    if [ $rc != 0 ] && [ "$1" != e2e ]; then
        say "$key: make failed; the last lines of $log:"
        tail -n 20 "$log" >&2
        exit 1
    fi
    took=$(echo "$t1 - $t0" | bc)
    record "$key" "$took" "$([ $rc = 0 ] || echo "verdict: make exit $rc")"
}
# vmm_ready DIR: "scenario milliseconds" per scenario of a run: its VMM start.
vmm_ready() {
    python3 - "$1/results.json" <<'EOF'
import json, sys
for s in json.load(open(sys.argv[1]))["scenarios"]:
    print(s["name"], round(s["vmm_ready_ms"], 1))
EOF
}

# A series to time: PATCHES=, or one patch made here on the default source.
series=${PATCHES:-}
# make_series DIR FILE LINE REV: a one-patch series in DIR adding LINE to FILE as REV has it.
make_series() {
    local dir=$1 file=$2 line=$3 rev=$4 src a
    src=$cache/src/linux-source-$(make -s -C "$repo" --no-print-directory print-kver)
    mkdir -p "$dir"
    a=$(mktemp -d)
    mkdir -p "$a/a/$(dirname "$file")" "$a/b/$(dirname "$file")"
    git -C "$src" show "$rev:$file" > "$a/a/$file"
    { cat "$a/a/$file"; printf '%s\n' "$line"; } > "$a/b/$file"
    {
        printf 'From: gracevm bench <bench@localhost>\nSubject: [PATCH] bench: %s\n\n---\n' "$line"
        printf 'diff --git a/%s b/%s\n' "$file" "$file"
        (cd "$a" && diff -u "a/$file" "b/$file" || true)
    } > "$dir/0001-bench.patch"
    rm -rf "$a"
}

phase_boot() {
    # Boot to userspace: gracevm (nested here) against qemu TCG on the same Image; level 1.
    timed boot.make "$out/boot.log" bench-boot OUT="$out"
    python3 - "$out/boot/bench.json" "$figures" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
with open(sys.argv[2], "a") as f:
    f.write(f"boot.gracevm_ms\t{b['gracevm']['boot_to_userspace_ms']:.0f}\t\n")
    f.write(f"boot.qemu_tcg_ms\t{b['qemu_tcg']['boot_to_userspace_ms']:.0f}\t\n")
    f.write(f"boot.ratio\t{b['ratio_gracevm_over_qemu']:.2f}\ttarget <= 1.3\n")
EOF
    local l1
    l1=$(sed -n 's/.*level-1 booted in \([0-9.]*\) s.*/\1/p' "$out/boot.log" | head -n 1)
    [ -z "$l1" ] || record level1.boot_s "$l1"
}

phase_vmm() {
    # VMM start: the carve-out pattern filled before the first vCPU (before) or beside the
    # boot (after), on the four-socket platform and the default one, boot tests only.
    local mode args
    for mode in before after; do
        args=
        [ $mode = after ] || args=--eager-fill
        timed "vmm.$mode.make" "$out/vmm-$mode.log" e2e SCENARIO=egm-four-sockets,acpi \
            TESTS='kernel_log_boot,carveout_*' ARGS="$args" OUT="$out/vmm-$mode"
        while read -r name ms; do
            record "vmm.$mode.$name.ready_ms" "$ms" "$([ $mode = before ] || echo 'target <= 500')"
        done < <(vmm_ready "$out/vmm-$mode")
    done
}

phase_series() {
    if [ -z "$series" ]; then
        series=$out/series
        make_series "$series" drivers/vfio/pci/nvgrace-gpu/main.c "/* gracevm bench series */" base
    fi
    local key
    key=$(make -s -C "$repo" --no-print-directory PATCHES="$series" print-guest-kbuild)
    # Built from nothing (the before-state of the reuse), only on request: ~15 min on 2 cores.
    if [ -n "${BENCH_FULL:-}" ]; then
        rm -rf "$key"
        timed series.scratch_build_s "$out/series-scratch.log" kernel PATCHES="$series" NO_SEED=1
    fi
    # A series never built: its branch is made and its build seeded from the nearest build.
    rm -rf "$key"
    timed series.build_s "$out/series-build.log" kernel PATCHES="$series"
    local build=$took
    # Back to the default source and to the series again: switching between built series.
    timed series.switch_default_s "$out/series-switch1.log" kernel
    timed series.switch_back_s "$out/series-switch2.log" kernel PATCHES="$series"
    timed series.verdict_s "$out/series-e2e.log" e2e PATCHES="$series" SCENARIO="$matrix" \
        OUT="$out/series-e2e"
    record series.to_verdict_s "$(echo "$build + $took" | bc)" "target <= 300 (EGM matrix <= 180 after an edit)"
}

phase_edit() {
    # One driver file edited: the series plus one patch (a new line in the driver), as a
    # developer regenerates it. Before: the build seeded from the default build, as it was;
    # after: from the nearest build (the series without the edit).
    [ -n "$series" ] || phase_series
    local mode edited key seed build
    for mode in before after; do
        edited=$out/edit-$mode
        rm -rf "$edited"
        mkdir -p "$edited"
        cp "$series"/* "$edited/" 2>/dev/null || cp "$series" "$edited/0000-series.mbox"
        # The edit goes on top of the series: its branch (made, and built, here if need be).
        make -s -C "$repo" --no-print-directory kernel PATCHES="$series" > /dev/null 2>&1
        make_series "$edited/x" drivers/vfio/pci/nvgrace-gpu/main.c \
            "/* gracevm bench edit $mode $(date +%s%N) */" \
            "$("$repo/guest-kernel/apply-patches.sh" --branch-of "$series")"
        mv "$edited/x/0001-bench.patch" "$edited/9999-edit.patch"
        rmdir "$edited/x"
        key=$(make -s -C "$repo" --no-print-directory PATCHES="$edited" print-guest-kbuild)
        seed=()
        [ $mode = after ] || seed=(NO_NEAREST_SEED=1)
        timed "edit.$mode.build_s" "$out/edit-$mode-build.log" kernel PATCHES="$edited" "${seed[@]}"
        build=$took
        timed "edit.$mode.verdict_s" "$out/edit-$mode-e2e.log" e2e PATCHES="$edited" \
            SCENARIO="$scenario" OUT="$out/edit-$mode-e2e"
        record "edit.$mode.one_scenario_s" "$(echo "$build + $took" | bc)" \
            "$([ $mode = before ] || echo 'target <= 60')"
        rm -rf "$key"
    done
}

phase_overlap() {
    # Scenarios one at a time (before) against as many at once as level 1 has cores (after),
    # on the kernel already built.
    local p=${series:+PATCHES=$series}
    timed overlap.serial_s "$out/overlap-serial.log" e2e $p SCENARIO="$overlap" \
        ARGS=--parallel=1 OUT="$out/overlap-serial"
    local serial=$took
    timed overlap.parallel_s "$out/overlap-parallel.log" e2e $p SCENARIO="$overlap" \
        OUT="$out/overlap-parallel"
    record overlap.parallel_over_serial "$(echo "scale=2; $took / $serial" | bc)"
}

for p in "${phases[@]}"; do
    case "$p" in
        boot | vmm | series | edit | overlap) "phase_$p" ;;
        *) echo "loop.sh: unknown phase $p (boot vmm series edit overlap)" >&2; exit 2 ;;
    esac
done

python3 - "$figures" "$out/bench.json" "$(nproc)" <<'EOF'
import json, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
out = {"machine": {"cores": int(sys.argv[3])}, "figures": {}}
for key, value, note in rows:
    out["figures"][key] = {"value": float(value), **({"note": note} if note else {})}
json.dump(out, open(sys.argv[2], "w"), indent=2)
width = max(len(k) for k, _, _ in rows) if rows else 0
for key, value, note in rows:
    print(f"{key:<{width}}  {float(value):>10.2f}  {note}")
EOF
say "figures in $out/bench.json"
