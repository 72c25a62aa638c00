#!/usr/bin/env bash
# Apply a patch series (an mbox, or a directory of *.patch / *.mbx / *.eml files in name order)
# onto a copy of a kernel source tree, as git commits.
#
#   apply-patches.sh SRC SERIES DEST
#
# SRC is never modified. Each patch goes in with `git am`; a patch that git am refuses (a
# series posted against an older kernel often needs fuzz) is retried with `patch -p1` and
# committed with its own subject, and the script says so. A patch neither can apply stops
# everything with a message naming it. DEST/.gracevm-series records the series' checksum, so
# an unchanged series is not applied again.
set -euo pipefail

src=${1:?usage: apply-patches.sh SRC SERIES DEST}
series=${2:?usage: apply-patches.sh SRC SERIES DEST}
dest=${3:?usage: apply-patches.sh SRC SERIES DEST}
say() { printf '[patches] %s\n' "$*" >&2; }
die() { printf 'patch series: %s\n' "$*" >&2; exit 1; }

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
# Drop a cover letter (a message without a diff).
for p in "${patches[@]}"; do
    grep -q '^diff --git ' "$work/split/$p" || rm -f "$work/split/$p"
done
mapfile -t patches < <(ls "$work/split" | sort)
[ ${#patches[@]} -gt 0 ] || die "no patch with a diff in $series"
sum=$(cat "$work/split/"* | sha256sum | cut -c1-16)

if [ -f "$dest/.gracevm-series" ] && [ "$(cat "$dest/.gracevm-series")" = "$sum" ]; then
    say "series already applied in $dest"
    exit 0
fi

say "copying $(basename "$src") to $dest"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
cp -a "$src" "$dest"
cd "$dest"
export GIT_AUTHOR_NAME=gracevm GIT_AUTHOR_EMAIL=gracevm@localhost
export GIT_COMMITTER_NAME=gracevm GIT_COMMITTER_EMAIL=gracevm@localhost
git init -q
git add -f -A  # Debian's linux-source .gitignore ignores everything at the top level
git commit -q -m "$(basename "$src")"

say "applying ${#patches[@]} patches"
for p in "${patches[@]}"; do
    f="$work/split/$p"
    subject=$(sed -n 's/^Subject: *//p' "$f" | head -n 1)
    if git am -q --keep-cr "$f" >"$work/am.log" 2>&1; then
        say "applied: $subject"
        continue
    fi
    git am --abort >/dev/null 2>&1 || true
    if patch -p1 --forward --fuzz=2 --no-backup-if-mismatch -s < "$f" >"$work/patch.log" 2>&1; then
        git add -f -A
        git commit -q -m "$subject" -m "(applied by gracevm with patch -p1 after git am refused it)"
        say "applied with fuzz (git am refused it): $subject"
        sed 's/^/[patches]   /' "$work/patch.log" >&2 || true
        continue
    fi
    sed 's/^/  /' "$work/am.log" "$work/patch.log" >&2
    die "'$subject' does not apply to $(basename "$src") (neither git am nor patch -p1); nothing was built"
done
echo "$sum" > .gracevm-series
say "series applied: $dest"
