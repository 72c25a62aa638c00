#!/usr/bin/env bash
# Build an arm64 Image out of tree: allnoconfig + the fragments beside this script.
#
#   build.sh SRC BUILD_DIR            # writes BUILD_DIR/arch/arm64/boot/Image
#
# and, when the config has modules (the nvgrace drivers are modules, see fragments/vfio.config),
# BUILD_DIR/modules/lib/modules/<release>/: the installed module tree gracevm hands the guest.
#
# SRC is never modified (O= build). The config is regenerated each time but only replaces
# BUILD_DIR/.config when it changed, so unchanged trees rebuild incrementally.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
src=${1:?usage: build.sh SRC BUILD_DIR}
build=${2:?usage: build.sh SRC BUILD_DIR}
jobs=${JOBS:-$(($(nproc) + 1))}
kmake=(make -s -C "$src" O="$build" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- -j"$jobs")

step() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf 'kernel build failed: %s\n' "$*" >&2; exit 1; }

[ -f "$src/Makefile" ] && [ -d "$src/arch/arm64" ] ||
    die "$src is not a Linux source tree (no Makefile or arch/arm64)"
mkdir -p "$build"

# Fragments: every tree gets base + vfio + level1; egm.config only when the tree has the driver.
fragments=("$here/fragments/base.config" "$here/fragments/vfio.config" "$here/fragments/level1.config")
if grep -rqs 'config NVGRACE_EGM' "$src/drivers/vfio/pci/nvgrace-gpu/"; then
    step "tree carries the EGM driver: enabling CONFIG_NVGRACE_EGM"
    fragments+=("$here/fragments/egm.config")
fi

step "configuring $(basename "$src") (allnoconfig + ${#fragments[@]} fragments)"
cfg=$(mktemp -d)
trap 'rm -rf "$cfg"' EXIT
"${kmake[@]}" O="$cfg" allnoconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$cfg" "$cfg/.config" "${fragments[@]}" >/dev/null
"${kmake[@]}" O="$cfg" olddefconfig >/dev/null

# Every option a fragment asks for must have survived olddefconfig; a silent drop (a renamed
# symbol, an unmet dependency) would otherwise surface as a confusing guest failure much later.
missing=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$cfg/.config" || missing+=("$line") ;;
        "# CONFIG_"*" is not set") grep -qxF "$line" "$cfg/.config" || missing+=("$line") ;;
    esac
done < <(cat "${fragments[@]}")
[ ${#missing[@]} -eq 0 ] || die "options not taken by this tree's Kconfig: ${missing[*]}"

if ! cmp -s "$cfg/.config" "$build/.config"; then
    cp "$cfg/.config" "$build/.config"
    "${kmake[@]}" olddefconfig >/dev/null
    step "config changed: full build"
else
    step "config unchanged: incremental build"
fi

start=$(date +%s)
stamp=$build/.gracevm-build-start
touch "$stamp"
# Progress for long builds: a line every 30 s with the number of objects built so far.
( while sleep 30; do
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
