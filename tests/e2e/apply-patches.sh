#!/usr/bin/env bash
# Host test of guest-kernel/apply-patches.sh on a tiny synthetic tree: a clean patch, a patch
# that needs fuzz (git am refuses it, patch -p1 takes it), a cover letter to skip, a plain
# mail without an mbox separator, a plain `diff -u` patch, a series that cannot apply (must fail naming the patch and
# leave the tree on base), switching back to base, a second series as its own branch, and the
# first series with one more patch (only that one applied, on the commit of the first two).
# Prints KTAP; exits 1 on a failed check.
set -u
here=$(cd "$(dirname "$0")" && pwd)
apply="$here/../../guest-kernel/apply-patches.sh"
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
n=0
failed=0
ok() { n=$((n + 1)); echo "ok $n $1"; }
bad() { n=$((n + 1)); failed=$((failed + 1)); echo "# $2"; echo "not ok $n $1"; }

mkpatch() { # mkpatch FILE SUBJECT DIFF
    printf 'From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\nFrom: Dev <dev@example.org>\nDate: Mon, 23 Feb 2026 15:55:14 +0000\nSubject: %s\n\n---\n%s\n' "$2" "$3" > "$1"
}

mkdir -p "$t/src/drivers"
printf 'one\ntwo\nthree\nfour\nfive\nsix\nseven\n' > "$t/src/drivers/a.c"
# Debian's linux-source ships a .gitignore that ignores everything at the top level.
printf '/*\n!/debian/\n' > "$t/src/.gitignore"
cp -a "$t/src" "$t/pristine"
mkdir -p "$t/series" "$t/broken"
printf 'From 0 Mon Sep 17 00:00:00 2001\nFrom: Dev <dev@example.org>\nSubject: [PATCH 0/2] cover\n\nno diff here\n' > "$t/series/0000-cover.patch"
mkpatch "$t/series/0001-clean.patch" "[PATCH 1/2] clean" "diff --git a/drivers/a.c b/drivers/a.c
--- a/drivers/a.c
+++ b/drivers/a.c
@@ -1,3 +1,4 @@
 one
+one-and-a-half
 two
 three"
# Context line 'FIVE' does not match 'five': git am refuses, patch applies with fuzz 1.
mkpatch "$t/series/0002-fuzzy.patch" "[PATCH 2/2] fuzzy" "diff --git a/drivers/a.c b/drivers/a.c
--- a/drivers/a.c
+++ b/drivers/a.c
@@ -5,4 +5,5 @@
 four
 FIVE
 six
+six-and-a-half
 seven"
mkpatch "$t/broken/0001-impossible.patch" "[PATCH] impossible" "diff --git a/drivers/b.c b/drivers/b.c
--- a/drivers/b.c
+++ b/drivers/b.c
@@ -1,2 +1,3 @@
 nothing
+like
 this"

# A mail saved from a client: headers first, no "From " mbox line.
mkdir -p "$t/mail"
printf 'From: Dev <dev@example.org>\nSubject: [PATCH] mail\nDate: Mon, 23 Feb 2026 15:55:14 +0000\n\n---\ndiff --git a/drivers/a.c b/drivers/a.c\n--- a/drivers/a.c\n+++ b/drivers/a.c\n@@ -7,1 +7,2 @@\n seven\n+eight\n' > "$t/mail/0001.patch"

# A patch made with plain `diff -u` (no `diff --git` line): a patch, not a cover letter.
mkdir -p "$t/plain"
printf 'From: Dev <dev@example.org>\nSubject: [PATCH] plain diff\n\n---\n--- a/drivers/a.c\n+++ b/drivers/a.c\n@@ -1,1 +1,2 @@\n one\n+one-plain\n' > "$t/plain/0001.patch"

echo "KTAP version 1"
echo "1..10"
if "$apply" "$t/src" "$t/series" > "$t/log" 2>&1; then ok applies_series; else bad applies_series "$(cat "$t/log")"; fi
if grep -qx 'one-and-a-half' "$t/src/drivers/a.c" && grep -qx 'six-and-a-half' "$t/src/drivers/a.c"; then
    ok both_hunks_present
else
    bad both_hunks_present "result: $(tr '\n' ' ' < "$t/src/drivers/a.c")"
fi
if grep -q 'applied with fuzz.*fuzzy' "$t/log" && [ "$(git -C "$t/src" rev-list --count HEAD 2>/dev/null)" = 3 ]; then
    ok fuzz_reported_and_committed
else
    bad fuzz_reported_and_committed "$(cat "$t/log")"
fi
if "$apply" "$t/src" "$t/broken" > "$t/log2" 2>&1; then
    bad broken_series_fails "a series that cannot apply was accepted"
elif grep -q "impossible' does not apply" "$t/log2" && [ "$(git -C "$t/src" symbolic-ref --short HEAD)" = base ] &&
     [ "$(git -C "$t/src" branch --list 'series/*' | wc -l)" = 1 ]; then
    ok broken_series_fails
else
    bad broken_series_fails "no message naming the patch, or not back on base: $(cat "$t/log2")"
fi
"$apply" "$t/src" > "$t/log3" 2>&1
if diff -r -x .git "$t/src" "$t/pristine" > /dev/null; then ok base_is_pristine; else bad base_is_pristine "branch base differs from the unpacked tree"; fi
if "$apply" "$t/src" "$t/series" > "$t/log4" 2>&1 && grep -q 'already applied' "$t/log4" && grep -qx 'six-and-a-half' "$t/src/drivers/a.c"; then
    ok same_series_reused
else
    bad same_series_reused "$(cat "$t/log4")"
fi
if "$apply" "$t/src" "$t/mail" > "$t/log5" 2>&1 && grep -qx 'eight' "$t/src/drivers/a.c" && ! grep -qx 'six-and-a-half' "$t/src/drivers/a.c"; then
    ok plain_mail_is_own_branch
else
    bad plain_mail_is_own_branch "$(cat "$t/log5")"
fi
if "$apply" "$t/src" "$t/plain" > "$t/log7" 2>&1 && grep -qx 'one-plain' "$t/src/drivers/a.c"; then
    ok plain_diff_is_a_patch
else
    bad plain_diff_is_a_patch "$(cat "$t/log7")"
fi
# The first series plus an edit on top: its first two patches are taken as applied before.
mkdir -p "$t/edited"
cp "$t/series/"* "$t/edited/"
mkpatch "$t/edited/0003-edit.patch" "[PATCH] edit" "diff --git a/drivers/a.c b/drivers/a.c
--- a/drivers/a.c
+++ b/drivers/a.c
@@ -9,1 +9,2 @@
 seven
+seven-edited"
if "$apply" "$t/src" "$t/edited" > "$t/log8" 2>&1 && grep -q 'first 2 of 3 patches were applied before' "$t/log8" &&
    ! grep -q 'applied with fuzz' "$t/log8" && grep -qx 'six-and-a-half' "$t/src/drivers/a.c" &&
    grep -qx 'seven-edited' "$t/src/drivers/a.c" && [ "$(git -C "$t/src" rev-list --count HEAD)" = 4 ]; then
    ok common_beginning_reused
else
    bad common_beginning_reused "$(cat "$t/log8"; tr '\n' ' ' < "$t/src/drivers/a.c")"
fi
echo local > "$t/src/drivers/a.c"
if "$apply" "$t/src" > "$t/log6" 2>&1; then
    bad local_changes_refused "switched a tree with local changes"
elif grep -q 'local changes' "$t/log6"; then
    ok local_changes_refused
else
    bad local_changes_refused "$(cat "$t/log6")"
fi
echo "# $((n - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
