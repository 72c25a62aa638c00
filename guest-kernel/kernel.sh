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
# A build already made from exactly this commit, these fragments and this build script is
# complete: nothing is checked out or made (switching between built series costs seconds,
# and the tree keeps whatever is checked out, so the next build touches nothing needlessly).
fingerprint() {
    local commit=$1
    { echo "$commit $*"; cat "$here"/fragments/*.config "$here/build.sh"; } | md5sum | cut -d' ' -f1
}
# The fragments a build was configured from: a seed configured from others differs in its
# .config, and Kbuild then rebuilds whatever the difference touches (often everything).
fragments=$(cat "$here"/fragments/*.config | md5sum | cut -d' ' -f1)
branch=base
[ -z "$series" ] || branch=$("$here/apply-patches.sh" --branch-of "$series" 9>&-)
if commit=$(git -C "$src" rev-parse -q --verify "refs/heads/$branch" 2>/dev/null) &&
    [ -f "$build/arch/arm64/boot/Image" ] &&
    [ "$(cat "$build/.gracevm-done" 2>/dev/null)" = "$(fingerprint "$commit" "$@")" ]; then
    printf '[kernel] %s is up to date (%s at %s)\n' "$build" "$branch" "${commit:0:12}" >&2
    echo "$fragments" > "$build/.gracevm-fragments"
    exit 0
fi
# The lock is this script's; children do not inherit it (a straggler such as the build's
# progress ticker would hold the tree after the build ended).
"$here/apply-patches.sh" "$src" ${series:+"$series"} 9>&-

# A build directory that has never been built starts as a copy of the nearest build of this
# tree (same flavour; configured from the same fragments first, then fewest files differing
# from what is checked out now, then the newest): the previous revision of a series, or the
# same series with one more patch, rather than the default build, so only what differs is
# compiled. Of two seeds as near, the newer was built after more checkouts, so fewer of its
# objects are older than their (rewritten, unchanged) sources. Kbuild stays right whatever the
# seed: checkouts rewrite every file that differs, so each is newer than any object built
# from older content.
# GRACEVM_NEAREST_SEED=0 keeps the seed given (`make bench` times the difference).
args=() debug= seed_at= config_only=
for a in "$@"; do
    [ "$a" != --debug ] || debug=1
    [ "$a" != --config-only ] || config_only=1
    [ "$a" != --seed ] || seed_at=${#args[@]}
    args+=("$a")
done
# A build directory configured from other fragments (gracevm changed them since) would rebuild
# in place whatever the new configuration touches, often everything; it starts again from a
# seed configured from the current ones when there is such a seed.
stale=
[ ! -f "$build/.config" ] || [ "$(cat "$build/.gracevm-fragments" 2>/dev/null)" = "$fragments" ] || stale=1
if [ -n "$seed_at" ] && { [ ! -f "$build/.config" ] || [ -n "$stale" ]; } &&
    [ "${GRACEVM_NEAREST_SEED:-1}" != 0 ]; then
    best= best_rank=
    for f in "$cache"/build/*/gracevm-build.json; do
        dir=$(dirname "$f")
        [ "$dir" != "$build" ] && [ -f "$dir/.config" ] || continue
        case "$dir" in *-debug) [ -n "$debug" ] || continue ;; *) [ -z "$debug" ] || continue ;; esac
        grep -qF "\"source\": \"$src\"" "$f" || continue
        commit=$(sed -n 's/^ *"git_commit_hash": "\([0-9a-f]\{40\}\)".*/\1/p' "$f")
        [ -n "$commit" ] || continue
        n=$(git -C "$src" diff --name-only "$commit" HEAD -- 2>/dev/null | wc -l) || continue
        other=1
        [ "$(cat "$dir/.gracevm-fragments" 2>/dev/null)" != "$fragments" ] || other=0
        rank=$(printf '%d %09d' "$other" "$n")
        if [ -z "$best_rank" ] || [[ "$rank" < "$best_rank" ]] ||
            { [ "$rank" = "$best_rank" ] && [ "$f" -nt "$best/gracevm-build.json" ]; }; then
            best=$dir best_rank=$rank best_n=$n
        fi
    done
    if [ -n "$stale" ]; then
        if [ -n "$best" ] && [ "${best_rank%% *}" = 0 ]; then
            printf '[kernel] %s was configured from other fragments: starting it again from a seed\n' "$build" >&2
            rm -rf "$build"
        else
            best=
        fi
    fi
    if [ -n "$best" ] && [ "$best" != "${args[$((seed_at + 1))]}" ]; then
        printf '[kernel] seeding from %s: %s file(s) differ from it\n' "$(basename "$best")" "$best_n" >&2
        args[$((seed_at + 1))]=$best
    fi
fi
rm -f "$build/.gracevm-done"
GRACEVM_SERIES=$series "$here/build.sh" "${args[@]}" "$src" "$build" 9>&-
# A configuration check builds nothing, so it leaves no stamp (nor a build directory).
if [ -z "$config_only" ]; then
    fingerprint "$(git -C "$src" rev-parse HEAD)" "$@" > "$build/.gracevm-done"
    echo "$fragments" > "$build/.gracevm-fragments"
fi
