#!/usr/bin/env bash
# Build a guest kernel from the default source, optionally with a patch series, holding the
# source tree while doing so.
#
#   kernel.sh CACHE KVER BUILD_DIR [--series SERIES] [build.sh options]
#
# The default source tree is shared: every series is a branch of it (apply-patches.sh), so
# checking one out and building it must not interleave with another make doing the same for
# another branch. The checkout and the build run under a lock on the tree; a second make
# waits, and says so.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:?usage: kernel.sh CACHE KVER BUILD_DIR [--series SERIES] [build.sh options]}
kver=${2:?usage: kernel.sh CACHE KVER BUILD_DIR [--series SERIES] [build.sh options]}
build=${3:?usage: kernel.sh CACHE KVER BUILD_DIR [--series SERIES] [build.sh options]}
shift 3
series=
if [ "${1:-}" = --series ]; then
    series=${2:?--series needs a series}
    shift 2
fi

src=$("$here/fetch-source.sh" "$cache" "$kver")
mkdir -p "$cache/src"
exec 9>"$cache/src/.tree.lock"
if ! flock -n 9; then
    printf '[kernel] another build holds %s; waiting\n' "$src" >&2
    flock 9
fi
# The lock is this script's; children do not inherit it (a straggler such as the build's
# progress ticker would hold the tree after the build ended).
"$here/apply-patches.sh" "$src" ${series:+"$series"} 9>&-
GRACEVM_SERIES=$series "$here/build.sh" "$@" "$src" "$build" 9>&-
