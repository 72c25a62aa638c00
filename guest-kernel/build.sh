#!/usr/bin/env bash
# Build an arm64 Image out of tree: allnoconfig + the fragments beside this script.
#
#   build.sh [--debug] [--config-only] [--seed DIR] SRC BUILD_DIR   # writes BUILD_DIR/arch/arm64/boot/Image
#
# --debug adds fragments/debug.config (KASAN, KFENCE, UBSAN, lockdep, ...); --config-only stops
# after checking that every fragment option survives Kconfig (nothing is built or written);
# --seed DIR starts a BUILD_DIR that has never been built as a copy of DIR, a build of the same
# SRC path (another branch of it): Kbuild then recompiles only what differs.
#
# and, when the config has modules (the nvgrace drivers are modules, see fragments/vfio.config),
# BUILD_DIR/modules/lib/modules/<release>/: the installed module tree gracevm hands the guest.
#
# SRC is never modified (O= build). The config is regenerated when the tree's Kconfig files,
# the fragments, this script or the compiler changed since the last build (about 7 s on 2
# cores; BUILD_DIR/.gracevm-config-key remembers them), and only replaces BUILD_DIR/.config
# when it changed, so unchanged trees rebuild incrementally.
#
# BUILD_DIR/gracevm-build.json records what was built (source, commit, series and its mails'
# Message-IDs when GRACEVM_SERIES names it, fragments, debug flavour, duration) for the run's
# KCIDB report.
#
# A tree that carries the EGM driver's sources gets BUILD_DIR/gracevm.expect: "egm" and why,
# which make turns into `gracevm test --expect egm` so the EGM tests fail, not skip, when the
# driver is missing from the kernel (a renamed Kconfig symbol, a module that did not build).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
debug= config_only= seed=
while [ $# -gt 0 ]; do
    case "$1" in
        --debug) debug=1 ;;
        --config-only) config_only=1 ;;
        --seed) seed=${2:?--seed needs a build directory}; shift ;;
        -*) echo "build.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
usage="usage: build.sh [--debug] [--config-only] [--seed DIR] SRC BUILD_DIR"
src=${1:?$usage}
build=${2:?$usage}
jobs=${JOBS:-$(($(nproc) + 1))}
kmake=(make -s -C "$src" O="$build" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- -j"$jobs")

step() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf 'kernel build failed: %s\n' "$*" >&2; exit 1; }

[ -f "$src/Makefile" ] && [ -d "$src/arch/arm64" ] ||
    die "$src is not a Linux source tree (no Makefile or arch/arm64)"
if [ -z "$config_only" ] && [ -n "$seed" ] && [ ! -f "$build/.config" ] && [ -f "$seed/.config" ]; then
    step "seeding $build from $seed (same source path: only what differs is rebuilt)"
    mkdir -p "$build"
    cp -a --reflink=auto "$seed/." "$build/"
    # The seed's configuration (.config, gracevm.expect and the key they were made from) is
    # kept: the key below decides whether this tree needs its own.
    rm -rf "$build/modules"
fi
[ -n "$config_only" ] || mkdir -p "$build"

# Fragments: every tree gets base + vfio + level1 (+ debug); egm.config only when the tree has
# the driver. Its sources are what count, not its Kconfig symbol: a series revision that
# renames the symbol must fail the EGM tests, not skip them.
fragments=("$here/fragments/base.config" "$here/fragments/vfio.config" "$here/fragments/level1.config")
[ -z "$debug" ] || fragments+=("$here/fragments/debug.config")
gpu_dir=$src/drivers/vfio/pci/nvgrace-gpu
egm_evidence=$( { find "$gpu_dir" -maxdepth 1 -iname '*egm*' 2>/dev/null | sort | head -n 1;
                  grep -ls 'config NVGRACE_EGM' "$gpu_dir/Kconfig" 2>/dev/null; } | head -n 1 | sed "s|^$src/||" || true)
if [ -n "$egm_evidence" ]; then
    step "tree carries the EGM driver ($egm_evidence): enabling CONFIG_NVGRACE_EGM"
    fragments+=("$here/fragments/egm.config")
fi

# What the configuration is made from: the same inputs give the same .config.
config_key() {
    {
        printf '%s\n' "$debug" "$egm_evidence" "$(aarch64-linux-gnu-gcc --version | head -n 1)"
        cat "${fragments[@]}" "$0" "$src/Makefile"
        (cd "$src" && find . -name .git -prune -o -name 'Kconfig*' -type f -print | LC_ALL=C sort | xargs cat)
    } | md5sum | cut -d' ' -f1
}
key=$(config_key)
cfg=$(mktemp -d)
trap 'rm -rf "$cfg"' EXIT
if [ -z "$config_only" ] && [ -f "$build/.config" ] && [ -f "$build/gracevm-build.json" ] &&
    [ "$(cat "$build/.gracevm-config-key" 2>/dev/null)" = "$key" ]; then
    step "config unchanged (same Kconfig files, fragments and compiler): incremental build"
else
    rm -f "$build/.gracevm-config-key"
    step "configuring $(basename "$src") (allnoconfig + ${#fragments[@]} fragments${debug:+, debug})"
    "${kmake[@]}" O="$cfg" allnoconfig >/dev/null
    "$src/scripts/kconfig/merge_config.sh" -m -O "$cfg" "$cfg/.config" "${fragments[@]}" >/dev/null
    "${kmake[@]}" O="$cfg" olddefconfig >/dev/null

    # Every option a fragment asks for must have survived olddefconfig; a silent drop (a renamed
    # symbol, an unmet dependency) would otherwise surface as a confusing guest failure much later.
    # The EGM options are the exception: the driver under test may be broken, and the suite says
    # so (the kernel is built without them and the EGM tests fail, naming what is missing).
    dropped() {
        local line
        while IFS= read -r line; do
            case "$line" in
                CONFIG_*=*) grep -qxF "$line" "$cfg/.config" || echo "$line" ;;
                "# CONFIG_"*" is not set") grep -qxF "$line" "$cfg/.config" || echo "$line" ;;
            esac
        done < <(cat "$@")
    }
    required=()
    for f in "${fragments[@]}"; do [ "$(basename "$f")" = egm.config ] || required+=("$f"); done
    mapfile -t missing < <(dropped "${required[@]}")
    [ ${#missing[@]} -eq 0 ] || die "options not taken by this tree's Kconfig: ${missing[*]}"
    egm_missing=
    if [ -n "$egm_evidence" ]; then
        mapfile -t egm_dropped < <(dropped "$here/fragments/egm.config")
        if [ ${#egm_dropped[@]} -gt 0 ]; then
            egm_missing="${egm_dropped[*]} not taken by this tree's Kconfig (option missing or renamed?)"
            step "WARNING: the tree carries the EGM driver but $egm_missing; building without it, the EGM tests will fail"
        fi
    fi
    if [ -n "$config_only" ]; then
        step "configuration checked: every option of ${#fragments[@]} fragments survives Kconfig"
        exit 0
    fi
    if [ -n "$egm_evidence" ]; then
        printf 'egm\nthe tree carries the EGM driver (%s)%s\n' "$egm_evidence" "${egm_missing:+; $egm_missing}" > "$build/gracevm.expect"
    else
        rm -f "$build/gracevm.expect"
    fi

    if ! cmp -s "$cfg/.config" "$build/.config"; then
        cp "$cfg/.config" "$build/.config"
        "${kmake[@]}" olddefconfig >/dev/null
        step "config changed: Kbuild rebuilds what the change touches"
    else
        step "config unchanged: incremental build"
    fi
    echo "$key" > "$build/.gracevm-config-key"
fi

start=$(date +%s)
start_iso=$(date -u +%Y-%m-%dT%H:%M:%SZ)
stamp=$build/.gracevm-build-start
touch "$stamp"
# Progress for long builds: a line every 30 s with the number of objects built so far. Its
# sleep is killed with it: a sleep left behind would hold the caller's pipe for up to 30 s.
( trap 'kill $nap 2>/dev/null; exit 0' TERM
  while :; do
      sleep 30 & nap=$!
      wait $nap
      n=$(find "$build" -name '*.o' -newer "$stamp" 2>/dev/null | wc -l)
      step "building... $n objects, $(( $(date +%s) - start )) s"
  done ) &
ticker=$!
trap 'kill $ticker 2>/dev/null || true; rm -rf "$cfg"' EXIT
modular=
grep -qx 'CONFIG_MODULES=y' "$build/.config" && modular=1
"${kmake[@]}" Image ${modular:+modules} ||
    die "'make Image${modular:+ modules}' in $src failed (see the compiler output above)"
kill $ticker 2>/dev/null || true
step "Image ready in $(( $(date +%s) - start )) s: $build/arch/arm64/boot/Image"

# The module tree is installed afresh each time so no module of an older build lingers.
# depmod (kmod) writes modules.dep; without it the guest's /init runs busybox depmod.
rm -rf "$build/modules"
if [ -n "$modular" ]; then
    "${kmake[@]}" INSTALL_MOD_PATH="$build/modules" INSTALL_MOD_STRIP=1 modules_install >/dev/null ||
        die "'make modules_install' failed (see the output above)"
    n=$(find "$build/modules" -name '*.ko' | wc -l)
    step "$n modules installed: $(echo "$build"/modules/lib/modules/*)"
fi

# What was built, for the run's report (KCIDB): JSON by hand, every value escaped.
json_str() { local v=${1//\\/\\\\}; v=${v//\"/\\\"}; printf '"%s"' "$v"; }
json_list() { local first=1 x; printf '['; for x in "$@"; do [ -n "$first" ] || printf ', '; first=; json_str "$x"; done; printf ']'; }
commit= branch=
if git -C "$src" rev-parse -q --verify HEAD >/dev/null 2>&1; then
    commit=$(git -C "$src" rev-parse HEAD)
    branch=$(git -C "$src" symbolic-ref -q --short HEAD || true)
fi
series_files=() message_ids=() patchset_hash=
if [ -n "${GRACEVM_SERIES:-}" ] && [ -e "$GRACEVM_SERIES" ]; then
    if [ -d "$GRACEVM_SERIES" ]; then
        mapfile -t series_files < <(find "$GRACEVM_SERIES" -maxdepth 1 -type f \( -name '*.patch' -o -name '*.mbx' -o -name '*.eml' -o -name '*.mbox' \) | sort)
    else
        series_files=("$GRACEVM_SERIES")
    fi
    patchset_hash=$(cat "${series_files[@]}" | sha256sum | cut -d' ' -f1)
    mapfile -t message_ids < <(cat "${series_files[@]}" | sed -n 's/^[Mm]essage-[Ii][Dd]: *//p' | tr -d '\r')
fi
names=()
for f in "${fragments[@]}"; do names+=("$(basename "$f")"); done
files=()
for f in "${series_files[@]}"; do files+=("$(basename "$f")"); done
{
    printf '{\n  "source": %s,\n  "tree_name": %s,\n' "$(json_str "$src")" "$(json_str "$(basename "$src")")"
    printf '  "git_commit_hash": %s,\n  "git_repository_branch": %s,\n' "$(json_str "$commit")" "$(json_str "$branch")"
    printf '  "patchset_hash": %s,\n  "patchset_files": %s,\n  "message_ids": %s,\n' \
        "$(json_str "$patchset_hash")" "$(json_list "${files[@]}")" "$(json_list "${message_ids[@]}")"
    printf '  "architecture": "arm64",\n  "compiler": %s,\n' "$(json_str "$(aarch64-linux-gnu-gcc --version | head -n 1)")"
    printf '  "config_fragments": %s,\n  "debug": %s,\n' "$(json_list "${names[@]}")" "$([ -n "$debug" ] && echo true || echo false)"
    printf '  "release": %s,\n' "$(json_str "$(cat "$build/include/config/kernel.release" 2>/dev/null)")"
    printf '  "start_time": %s,\n  "duration": %s,\n  "status": "PASS"\n}\n' "$(json_str "$start_iso")" "$(( $(date +%s) - start ))"
} > "$build/gracevm-build.json"
