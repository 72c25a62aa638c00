#!/bin/sh
# mkinitramfs.sh BUSYBOX SUITE OUT.cpio
#
# Builds the gracevm guest's base initramfs: an uncompressed newc cpio archive with
#   /init                 tests/guest/init
#   /bin/busybox          BUSYBOX (static aarch64; /init creates the applet links at boot)
#   /bin/gracevm-suite    SUITE (static aarch64)
#   /dev/console (c 5 1), /dev/null (c 1 3)
#   empty /proc /sys /tmp /root /sbin /usr/bin /usr/sbin
# The archive is written by this script itself (printf), not by cpio(1), so the device nodes
# need no mknod and no root. Owners are root, mtimes are SOURCE_DATE_EPOCH (default 0) and
# inode numbers are sequential: the same inputs give the same bytes.
#
# The VMM appends its own archive (/gracevm/env) after this one; the kernel unpacks both.
# Prints nothing but errors.

set -eu

die() {
	echo "mkinitramfs.sh: $*" >&2
	exit 1
}

[ $# -eq 3 ] || die "usage: mkinitramfs.sh BUSYBOX SUITE OUT.cpio"
busybox=$1
suite=$2
out=$3
init=$(dirname "$0")/init
for file in "$busybox" "$suite" "$init"; do
	[ -f "$file" ] || die "$file: no such file"
done

mtime=${SOURCE_DATE_EPOCH:-0}
ino=0
offset=0

# Zero bytes up to the next multiple of $1.
pad() {
	n=$(((${1} - offset % ${1}) % ${1}))
	if [ "$n" -gt 0 ]; then
		head -c "$n" /dev/zero
		offset=$((offset + n))
	fi
}

# header NAME MODE NLINK SIZE RDEVMAJOR RDEVMINOR: a newc header and the name, padded.
header() {
	ino=$((ino + 1))
	namesize=$((${#1} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
		"$ino" "$2" 0 0 "$3" "$mtime" "$4" 0 0 "$5" "$6" "$namesize" 0 "$1"
	offset=$((offset + 110 + namesize))
	pad 4
}

dir() {
	header "$1" $((040000 | $2)) 2 0 0 0
}

node() {
	header "$1" $((020000 | $2)) 1 0 "$3" "$4"
}

regular() {
	size=$(wc -c <"$2")
	size=$((size))
	header "$1" $((0100000 | 0755)) 1 "$size" 0 0
	cat "$2"
	offset=$((offset + size))
	pad 4
}

archive() {
	dir dev 0755
	node dev/console 0600 5 1
	node dev/null 0666 1 3
	dir bin 0755
	regular bin/busybox "$busybox"
	regular bin/gracevm-suite "$suite"
	dir sbin 0755
	dir usr 0755
	dir usr/bin 0755
	dir usr/sbin 0755
	dir proc 0555
	dir sys 0555
	dir tmp 01777
	dir root 0700
	regular init "$init"
	header TRAILER!!! 0 1 0 0 0
	pad 512
}

tmp=$out.tmp.$$
trap 'rm -f "$tmp"' EXIT
archive >"$tmp"
mv "$tmp" "$out"
trap - EXIT
