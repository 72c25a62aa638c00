#!/usr/bin/env bash
# `git bisect run` end to end on a history made here: five commits on top of a kernel tree
# that carries the EGM driver, each touching only the nvgrace-gpu driver (so each bisect step
# rebuilds one module), the third of which breaks it: open() clears only half of the region,
# which the suite's egm_open_zeroes sees. The bisect must name that commit.
#
#   tests/bisect/demo.sh TREE [make variables...]
#
# TREE is a git kernel tree (not gracevm's own source cache) whose HEAD carries the EGM
# driver, e.g. a clone of it with the RFC series applied. The demo works on a branch
# gracevm-bisect-demo made from HEAD and leaves the tree back on HEAD. The first step builds
# TREE in full once (about 15 minutes on 2 cores); later steps rebuild the driver only.
# Exit 0 when the bisect lands on the breaking commit, 1 when it does not, 2 on bad input.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tree=${1:?usage: demo.sh TREE [make variables...]}
shift
say() { printf '[bisect-demo] %s\n' "$*" >&2; }
g() { git -C "$tree" "$@"; }

egm=drivers/vfio/pci/nvgrace-gpu/egm.c
main=drivers/vfio/pci/nvgrace-gpu/main.c
g rev-parse -q --verify HEAD >/dev/null || { echo "demo.sh: $tree is not a git tree" >&2; exit 2; }
[ -f "$tree/$egm" ] || { echo "demo.sh: $tree has no $egm (apply the EGM series first)" >&2; exit 2; }
[ -z "$(g status --porcelain --untracked-files=no)" ] || { echo "demo.sh: $tree has local changes" >&2; exit 2; }
grep -q 'memset(chunk_addr, 0, chunk_size);' "$tree/$egm" ||
    { echo "demo.sh: $egm does not clear the region the way RFC v2 does; this demo mutates that line" >&2; exit 2; }

good=$(g rev-parse HEAD)
export GIT_AUTHOR_NAME=gracevm GIT_AUTHOR_EMAIL=gracevm@localhost
export GIT_COMMITTER_NAME=gracevm GIT_COMMITTER_EMAIL=gracevm@localhost
g checkout -q -B gracevm-bisect-demo "$good"
# commit MESSAGE FILE SED: one sed edit that must change FILE.
commit() {
    local msg=$1 file=$2 expr=$3 before
    before=$(md5sum < "$tree/$file")
    sed -i "$expr" "$tree/$file"
    [ "$(md5sum < "$tree/$file")" != "$before" ] || { echo "demo.sh: '$expr' changed nothing in $file" >&2; exit 2; }
    g commit -q -am "$msg"
    g rev-parse HEAD
}
c1=$(commit "demo 1: comment" "$egm" '0,/Clear in chunks/s//Clear the region in chunks/')
c2=$(commit "demo 2: comment" "$main" '1s|$| /* gracevm bisect demo */|')
bad=$(commit "demo 3: clear half the region (the bug)" "$egm" 's/memset(chunk_addr, 0, chunk_size);/memset(chunk_addr, 0, chunk_size \/ 2);/')
c4=$(commit "demo 4: comment" "$main" '1s|$| /* step 4 */|')
c5=$(commit "demo 5: comment" "$egm" '1s|$| /* step 5 */|')
say "history: good ${good:0:12}, then ${c1:0:12} ${c2:0:12} ${bad:0:12} (the bug) ${c4:0:12} ${c5:0:12}"

cleanup() { g bisect reset "$good" >/dev/null 2>&1 || g checkout -q "$good"; }
trap cleanup EXIT
g bisect start "$c5" "$good" >/dev/null
# run.sh judges the checked-out commit; it runs in the tree, as git bisect run does.
mkdir -p "${GRACEVM_BISECT_OUT:-/tmp/gracevm-bisect}"
(cd "$tree" && git bisect run "$here/run.sh" SCENARIO=acpi TESTS='kernel_*,egm_device_created,egm_open_zeroes' "$@") |
    tee "${GRACEVM_BISECT_OUT:-/tmp/gracevm-bisect}/demo.log"
found=$(g rev-parse -q --verify refs/bisect/bad)
if [ "$found" = "$bad" ]; then
    say "the bisect named ${bad:0:12} ('demo 3: clear half the region'): right"
    exit 0
fi
say "the bisect named ${found:0:12}, not the breaking ${bad:0:12}"
exit 1
