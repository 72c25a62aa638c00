#!/usr/bin/env bash
# tools/deps.sh on machines we do not have: Debian 12, Ubuntu 24.04, an unknown distribution,
# an aarch64 host and a PATH without Rust, with stub rustup/cargo/rustc and stub
# apt-get/dpkg/sudo that only log what they are asked. Checks the plan or the message, and that
# a refusal happens before any package command.
set -euo pipefail

deps=$(cd "$(dirname "$0")/../.." && pwd)/tools/deps.sh
bash=$(command -v bash)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
n=0
# The aarch64 host's KVM device: present unless a check sets kvm=absent.
touch "$tmp/kvm"
kvm=$tmp/kvm

os() { # os NAME: an os-release file
    case $1 in
        debian12) printf '%s\n' 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"' 'ID=debian' \
                      'VERSION_ID="12"' 'VERSION_CODENAME=bookworm' ;;
        ubuntu2404) printf '%s\n' 'PRETTY_NAME="Ubuntu 24.04.2 LTS"' 'ID=ubuntu' 'ID_LIKE=debian' \
                        'VERSION_ID="24.04"' 'VERSION_CODENAME=noble' 'UBUNTU_CODENAME=noble' ;;
        mint) printf '%s\n' 'PRETTY_NAME="Linux Mint 22"' 'ID=linuxmint' 'ID_LIKE="ubuntu debian"' \
                  'UBUNTU_CODENAME=noble' ;;
        fedora) printf '%s\n' 'PRETTY_NAME="Fedora Linux 40 (Workstation Edition)"' 'ID=fedora' \
                    'VERSION_ID=40' ;;
    esac >"$tmp/os-release"
    echo "$tmp/os-release"
}

# A bin directory with grep and id, package-tool stubs that log to $tmp/log, and the Rust tools
# asked for: "cargo" (cargo and rustc), "rustup" (with the aarch64 target), "none".
bin() {
    local dir=$tmp/bin-$1 tool
    rm -rf "$dir" && mkdir -p "$dir"
    ln -s "$(command -v grep)" "$dir/grep"
    printf '#!/bin/sh\necho 1000\n' >"$dir/id"
    for tool in apt-get apt-cache dpkg dpkg-query; do
        printf '#!/bin/sh\necho "%s $*" >>"%s"\n' "$tool" "$tmp/log" >"$dir/$tool"
    done
    # apt-cache policy: every package has a candidate.
    printf '#!/bin/sh\necho "apt-cache $*" >>"%s"\necho "  Candidate: 1.0"\n' "$tmp/log" >"$dir/apt-cache"
    printf '#!/bin/sh\n"$@"\n' >"$dir/sudo"
    case $1 in
        cargo | rustup)
            printf '#!/bin/sh\nexit 0\n' >"$dir/cargo"
            printf '#!/bin/sh\nexit 0\n' >"$dir/rustc" ;;&
        rustup) printf '#!/bin/sh\necho x86_64-unknown-linux-gnu\necho aarch64-unknown-linux-gnu\n' >"$dir/rustup" ;;
    esac
    chmod +x "$dir"/*
    echo "$dir"
}

# check NAME OS ARCH RUST STATUS ARGS -- WANT... : run deps.sh ARGS, expect STATUS and every
# WANT in its output ("!TEXT": TEXT absent; "log:TEXT" / "!log:TEXT": in the stubs' log).
check() {
    local name=$1 os_file arch=$3 path status=$5 args=$6 out rc want text where
    os_file=$(os "$2")
    path=$(bin "$4")
    shift 7
    : >"$tmp/log"
    rc=0
    # shellcheck disable=SC2086
    out=$(env -i PATH="$path" HOME="$tmp" OS_RELEASE="$os_file" HOST_ARCH="$arch" KVM_DEV="$kvm" \
          "$bash" "$deps" $args 2>&1) || rc=$?
    local ok=1
    [ "$rc" = "$status" ] || { echo "  exit status $rc, expected $status"; ok=; }
    for want in "$@"; do
        text=${want#!}
        where=out
        case $text in log:*) text=${text#log:}; where=log ;; esac
        local hay=$out
        [ "$where" = log ] && hay=$(cat "$tmp/log")
        if [ "${want:0:1}" = '!' ]; then
            [[ $hay != *"$text"* ]] || { echo "  unexpected in $where: $text"; ok=; }
        else
            [[ $hay == *"$text"* ]] || { echo "  missing in $where: $text"; ok=; }
        fi
    done
    n=$((n + 1))
    if [ -n "$ok" ]; then
        echo "ok $n $name"
    else
        echo "not ok $n $name"
        sed 's/^/  | /' <<<"$out"
        failures=$((failures + 1))
    fi
}

check "Debian 12, no rustup target: rustc-web and the arm64 architecture" \
    debian12 x86_64 cargo 0 --dry-run -- \
    "Debian GNU/Linux 12 (bookworm) (debian family)" "rust: Debian's rustc-web" \
    "dpkg --add-architecture arm64" "libstd-rust-web-dev:arm64" "qemu-system-arm" \
    "gcc-aarch64-linux-gnu" "debian-archive-keyring"
check "Debian 12, make check: the cross std, no kernel tools, no qemu, no cross gcc" \
    debian12 x86_64 cargo 0 "--for check --dry-run" -- \
    "rust: Debian's rustc-web" "libstd-rust-web-dev:arm64" "device-tree-compiler" \
    "!qemu-system-arm" "!gcc-aarch64-linux-gnu" "!flex" "!python3-pip"
check "Debian 12 with rustup's target: no rustc-web, no arm64 architecture" \
    debian12 x86_64 rustup 0 --dry-run -- \
    "rust: rustup's aarch64-unknown-linux-gnu target" "!add-architecture" \
    "gcc-aarch64-linux-gnu" "!rustc-web"
check "Debian 12 install: arm64 added, rustc-web installed through sudo" \
    debian12 x86_64 cargo 0 "" -- \
    "log:dpkg --add-architecture arm64" "log:apt-get -q install -y --no-install-recommends" \
    "log:libstd-rust-web-dev:arm64"
check "Ubuntu 24.04 with rustup's target: no arm64 architecture, no rustc-web" \
    ubuntu2404 x86_64 rustup 0 --dry-run -- \
    "Ubuntu 24.04.2 LTS (ubuntu family)" "rust: rustup's aarch64-unknown-linux-gnu target" \
    "gcc-aarch64-linux-gnu" "debian-archive-keyring" "!add-architecture" "!rustc-web"
check "Ubuntu 24.04 install: packages only, the architecture untouched" \
    ubuntu2404 x86_64 rustup 0 "" -- \
    "log:apt-get -q install" "log:debian-archive-keyring" "!log:add-architecture" "!log::arm64"
check "Ubuntu 24.04 without rustup's target: stops, names the command" \
    ubuntu2404 x86_64 cargo 2 "" -- \
    "deps: no Rust target for the aarch64 cross build: Ubuntu 24.04.2 LTS has no rustc-web" \
    "rustup target add aarch64-unknown-linux-gnu" "![deps] plan" "!log:apt" "!log:dpkg"
check "Linux Mint (ID_LIKE ubuntu) is Ubuntu" \
    mint x86_64 rustup 0 --dry-run -- "(ubuntu family)" "!add-architecture"
check "aarch64 Ubuntu host: native, no cross tools, no qemu" \
    ubuntu2404 aarch64 cargo 0 --dry-run -- \
    "rust: native cargo" "aarch64 host" "!qemu-system-arm" "!gcc-aarch64-linux-gnu" "!add-architecture" \
    "!rustc-web"
kvm=$tmp/absent
check "aarch64 host without /dev/kvm: qemu for the nested route" \
    debian12 aarch64 cargo 0 --dry-run -- \
    "guests nest in qemu" "qemu-system-arm" "!gcc-aarch64-linux-gnu" "!add-architecture"
kvm=$tmp/kvm
check "unknown distribution: stops before any package command" \
    fedora x86_64 rustup 2 "" -- \
    "deps: Fedora Linux 40 (Workstation Edition) is not Debian or Ubuntu" "Use Debian 12" \
    "![deps] plan" "!log:apt" "!log:dpkg"
check "no rustc or cargo on PATH: stops, says rustup" \
    debian12 x86_64 none 2 "" -- \
    "deps: Rust (cargo, rustc) not found: install Rust with rustup (https://rustup.rs)" \
    "rustup target add aarch64-unknown-linux-gnu" "!log:apt" "!log:dpkg"
check "no Rust on an aarch64 host: no cross target to add" \
    debian12 aarch64 none 2 "" -- \
    "Rust (cargo, rustc) not found" "!rustup target add"

echo "# $((n - failures)) passed, $failures failed"
[ "$failures" = 0 ]
