#!/usr/bin/env bash
# Check out a patch series (an mbox, a directory of *.patch / *.mbx / *.eml files in name
# order, or single mails saved from a client) in the shared kernel source tree, as a branch.
#
#   apply-patches.sh REPO SERIES     # branch series/<checksum>: base + the series, checked out
#   apply-patches.sh REPO            # back to the unpatched source (branch base)
#   apply-patches.sh --branch-of SERIES  # print the series' branch name; touches nothing
#
# REPO is the default source tree; the first call makes it a git repository whose branch
# `base` is the tree as unpacked. Every series is a branch off base in the same directory, so
# a kernel build of a series (its build directory seeded from the default build) recompiles
# only the files the series changes: Kbuild keys its decisions on file times and on command
# lines, which hold the source path. Switching back and forth touches only those files.
#
# Each patch goes in with `git am`; a patch that git am refuses (a series posted against an
# older kernel often needs fuzz) is retried with `patch -p1` and committed with its own
# subject, and the script says so. A patch neither can apply stops everything with a message
# naming it; the tree is left on base and the half-made branch is deleted. An unchanged series
# is not applied again: its branch is checked out. A series that begins like one applied before
# (the same series with an edit patch on top, a revision that changes only its last patches)
# starts from the commit of that common beginning (refs/gracevm/prefix/*): only the rest is
# applied.
set -euo pipefail

branch_only=
if [ "${1:-}" = --branch-of ]; then
    branch_only=1
    repo= series=${2:?usage: apply-patches.sh --branch-of SERIES}
else
    repo=${1:?usage: apply-patches.sh REPO [SERIES]}
    series=${2:-}
fi
say() { printf '[patches] %s\n' "$*" >&2; }
die() { printf 'patch series: %s\n' "$*" >&2; exit 1; }

[ -n "$branch_only" ] || [ -d "$repo" ] || die "$repo is not a directory"
export GIT_AUTHOR_NAME=gracevm GIT_AUTHOR_EMAIL=gracevm@localhost
export GIT_COMMITTER_NAME=gracevm GIT_COMMITTER_EMAIL=gracevm@localhost
g() { git -C "$repo" "$@"; }

if [ -z "$branch_only" ]; then
    if ! g rev-parse -q --verify refs/heads/base >/dev/null 2>&1; then
        [ ! -e "$repo/.git" ] || die "$repo is a git repository without a 'base' branch: not one gracevm made"
        say "recording $(basename "$repo") as branch base (once)"
        g init -q -b base
        g config core.autocrlf false
        g add -f -A  # Debian's linux-source .gitignore ignores everything at the top level
        g commit -q -m "$(basename "$repo")"
    fi

    # Never lose work: the tree must be as its branch has it before switching.
    if [ -n "$(g status --porcelain --untracked-files=no)" ]; then
        die "$repo has local changes (git -C $repo status): gracevm only switches a clean tree"
    fi

    if [ -z "$series" ]; then
        [ "$(g symbolic-ref --short HEAD)" = base ] || g checkout -q base
        exit 0
    fi
fi

[ -e "$series" ] || die "$series does not exist (PATCHES= takes an mbox file or a directory of patches)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One file per patch, in order.
mkdir -p "$work/split"
if [ -d "$series" ]; then
    mapfile -t files < <(find "$series" -maxdepth 1 -type f \( -name '*.patch' -o -name '*.mbx' -o -name '*.eml' -o -name '*.mbox' \) | sort)
    [ ${#files[@]} -gt 0 ] || die "no *.patch, *.mbx, *.eml or *.mbox files in $series"
    i=0
    for f in "${files[@]}"; do
        # A file may itself hold several messages (an mbox, starting "From "), or be one mail
        # saved from a mail client or an archive (headers first, no mbox separator).
        mkdir -p "$work/one"
        if head -n 1 "$f" | grep -q '^From '; then
            git mailsplit -o"$work/one" "$f" >/dev/null 2>&1 || die "$(basename "$f") is not a patch email"
        elif head -n 20 "$f" | grep -qi '^Subject:'; then
            cp "$f" "$work/one/0001"
        else
            die "$(basename "$f") is neither an mbox nor a mail (no 'From ' line, no Subject: header)"
        fi
        for m in $(ls "$work/one" | sort); do
            i=$((i + 1))
            mv "$work/one/$m" "$work/split/$(printf '%04d' $i)"
        done
    done
else
    git mailsplit -o"$work/split" "$series" >/dev/null || die "$series is not an mbox"
fi
mapfile -t patches < <(ls "$work/split" | sort)
# Drop a cover letter (a message without a diff: no hunk; its diffstat does not count). A
# patch made with plain `diff -u` has hunks but no `diff --git` line, and is kept.
for p in "${patches[@]}"; do
    grep -q '^@@ -[0-9]' "$work/split/$p" || rm -f "$work/split/$p"
done
mapfile -t patches < <(ls "$work/split" | sort)
[ ${#patches[@]} -gt 0 ] || die "no patch with a diff in $series"
sum=$(cat "$work/split/"* | sha256sum | cut -c1-16)
branch=series/$sum
if [ -n "$branch_only" ]; then
    echo "$branch"
    exit 0
fi

# prefix[k] names base + the first k+1 patches: a series that begins like this one reuses it.
prefix=()
h=$(g rev-parse base)
for p in "${patches[@]}"; do
    h=$( { echo "$h"; sha256sum < "$work/split/$p"; } | sha256sum | cut -c1-16)
    prefix+=("$h")
done
if g rev-parse -q --verify "refs/heads/$branch" >/dev/null; then
    [ "$(g symbolic-ref --short HEAD)" = "$branch" ] || g checkout -q "$branch"
    say "series already applied: branch $branch"
    # A branch made before prefixes were recorded: one commit per patch, in order.
    mapfile -t commits < <(g rev-list --reverse "base..$branch")
    if [ ${#commits[@]} = ${#patches[@]} ] && ! g rev-parse -q --verify "refs/gracevm/prefix/${prefix[-1]}" >/dev/null; then
        for i in "${!commits[@]}"; do g update-ref "refs/gracevm/prefix/${prefix[i]}" "${commits[i]}"; done
    fi
    exit 0
fi

# The longest beginning of this series applied before.
start=0 from=base
for ((k = ${#patches[@]}; k >= 1; k--)); do
    if c=$(g rev-parse -q --verify "refs/gracevm/prefix/${prefix[k - 1]}"); then
        start=$k from=$c
        break
    fi
done
g checkout -q -b "$branch" "$from"
fail() {
    g am --abort >/dev/null 2>&1 || true
    g reset -q --hard
    g clean -q -fdx
    g checkout -q base
    g branch -q -D "$branch"
    die "$*"
}
if [ "$start" -gt 0 ]; then
    say "the first $start of ${#patches[@]} patches were applied before (another series begins with them): applying the rest on branch $branch"
else
    say "applying ${#patches[@]} patches on branch $branch"
fi
for ((i = start; i < ${#patches[@]}; i++)); do
    f="$work/split/${patches[i]}"
    subject=$(sed -n 's/^Subject: *//p' "$f" | head -n 1)
    if g am -q --keep-cr "$f" >"$work/am.log" 2>&1; then
        g update-ref "refs/gracevm/prefix/${prefix[i]}" HEAD
        say "applied: $subject"
        continue
    fi
    g am --abort >/dev/null 2>&1 || true
    popts=(-p1 --forward --fuzz=2 --no-backup-if-mismatch -s)
    if (cd "$repo" && patch --dry-run "${popts[@]}" < "$f" && patch "${popts[@]}" < "$f") >"$work/patch.log" 2>&1; then
        g add -f -A
        g commit -q -m "$subject" -m "(applied by gracevm with patch -p1 after git am refused it)"
        g update-ref "refs/gracevm/prefix/${prefix[i]}" HEAD
        say "applied with fuzz (git am refused it): $subject"
        sed 's/^/[patches]   /' "$work/patch.log" >&2 || true
        continue
    fi
    sed 's/^/  /' "$work/am.log" "$work/patch.log" >&2
    fail "'$subject' does not apply to $(basename "$repo") (neither git am nor patch -p1); nothing was built"
done
say "series applied: branch $branch of $repo"
