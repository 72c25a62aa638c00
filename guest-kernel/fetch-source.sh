#!/usr/bin/env bash
# Fetch and unpack Debian's linux-source package into a cache, without touching the machine's
# apt configuration (a private sources list and state directory).
#
#   fetch-source.sh CACHE [VERSION]     prints the unpacked source directory on stdout
#
# VERSION (default 7.3) is tried first; when Debian no longer carries it, the newest
# linux-source-7.* available is used instead, and the script says so.
set -euo pipefail

cache=${1:?usage: fetch-source.sh CACHE [VERSION]}
want=${2:-7.3}
apt_dir="$cache/apt"
say() { printf '[kernel] %s\n' "$*" >&2; }
die() { printf 'kernel source: %s\n' "$*" >&2; exit 1; }

mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache/src"
cat > "$apt_dir/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
EOF
apt_opts=(-o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir"
          -o Debug::NoLocking=1 -o APT::Sandbox::User=root)

pick() {
    if apt-cache "${apt_opts[@]}" show "linux-source-$want" >/dev/null 2>&1; then
        echo "linux-source-$want"
    else
        apt-cache "${apt_opts[@]}" pkgnames linux-source-7. 2>/dev/null | sort -V | tail -n 1
    fi
}

# An unpacked tree from an earlier run is reused as is (no network needed).
if [ -f "$cache/src/linux-source-$want/Makefile" ]; then
    echo "$cache/src/linux-source-$want"
    exit 0
fi

say "updating the package lists for Debian kernel sources"
apt-get "${apt_opts[@]}" -q update >/dev/null || die "apt-get update of the Debian source lists failed"
pkg=$(pick)
[ -n "$pkg" ] || die "no linux-source-7.* package found in trixie-backports or sid"
if [ "$pkg" != "linux-source-$want" ]; then
    say "linux-source-$want is not available; using $pkg instead"
fi
dir="$cache/src/$pkg"
if [ ! -f "$dir/Makefile" ]; then
    say "downloading $pkg"
    (cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" -q download "$pkg" >/dev/null) ||
        die "downloading $pkg failed"
    deb=$(ls -t "$apt_dir/archives/${pkg}_"*.deb | head -n 1)
    say "unpacking $(basename "$deb")"
    tmp=$(mktemp -d "$cache/src/.unpack.XXXXXX")
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards '*.tar.xz'
    tar -xJf "$(find "$tmp" -name '*.tar.xz' | head -n 1)" -C "$tmp"
    rm -rf "$dir"
    mv "$tmp/$pkg" "$dir"
    rm -rf "$tmp"
    rm -f "$deb"
fi
say "kernel source: $pkg ($dir)"
echo "$dir"
