#!/usr/bin/env bash
# Host packages for gracevm, installed with apt on Debian 12+ and Ubuntu (and their
# derivatives); anywhere else, or when Rust cannot build the aarch64 parts, it stops at once
# saying what to install.
#
#   deps.sh             install what is missing (apt-get through sudo unless root)
#   deps.sh --dry-run   print the plan (distribution, Rust route, packages) and change nothing
#   deps.sh --for check [--dry-run]   only what `make check` needs: no kernel build tools, no
#                       qemu, no cross linker (dtc and iasl for the firmware tests, and the
#                       aarch64 std for the cross clippy)
#   deps.sh busybox OUT fetch Debian's static arm64 busybox to OUT
#
# The aarch64 parts (the level-1 gracevm, the guest suite) are cross-built on x86_64 hosts:
#   - with rustup's aarch64 target when it is installed: only the cross gcc is needed;
#   - on Debian without it: Debian 12's rustc-web with its arm64 std, for which the arm64
#     foreign architecture is added (Debian's own mirrors carry arm64);
#   - on Ubuntu without it: stop. Ubuntu has no rustc-web, and its arm64 packages live on
#     ports.ubuntu.com, not the main archive: the arm64 architecture is never added there.
# The static arm64 busybox comes from Debian through a private package list on every host, so
# it needs no arm64 architecture.
# An aarch64 host builds natively and runs guests under KVM: no cross tools, and no qemu
# unless it lacks /dev/kvm (then gracevm nests in qemu there too).
#
# For tests: OS_RELEASE (default /etc/os-release), HOST_ARCH (default `uname -m`) and KVM_DEV
# (default /dev/kvm).
set -euo pipefail

TARGET=aarch64-unknown-linux-gnu
OS_RELEASE=${OS_RELEASE:-/etc/os-release}
HOST_ARCH=${HOST_ARCH:-$(uname -m)}
KVM_DEV=${KVM_DEV:-/dev/kvm}
say() { printf '[deps] %s\n' "$*"; }
# One message: its first line prefixed with 'deps:', the others as they are.
die() { printf 'deps: %s\n' "$1" >&2; shift; [ $# = 0 ] || printf '%s\n' "$@" >&2; exit 2; }

# --- where we are ---------------------------------------------------------------------------
# The distribution family (debian, ubuntu or other) from os-release's ID and ID_LIKE.
distro() {
    local ID= ID_LIKE= PRETTY_NAME=
    # shellcheck disable=SC1090
    [ -r "$OS_RELEASE" ] && . "$OS_RELEASE"
    case " $ID $ID_LIKE " in
        *" ubuntu "*) echo ubuntu ;;
        *" debian "*) echo debian ;;
        *) echo other ;;
    esac
}
pretty_name() {
    local PRETTY_NAME= NAME=
    # shellcheck disable=SC1090
    [ -r "$OS_RELEASE" ] && . "$OS_RELEASE"
    echo "${PRETTY_NAME:-${NAME:-an unknown system (no $OS_RELEASE)}}"
}

rustup_has_target() {
    command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx "$TARGET"
}

# --- busybox ----------------------------------------------------------------------------------
# Debian 12's busybox-static:arm64 from deb.debian.org through a private package list (in
# the cache), whatever the host's distribution and architectures.
busybox() {
    local out=${1:?usage: deps.sh busybox OUT} tmp
    local lists=${CACHE:-$HOME/.cache/gracevm}/apt-arm64
    local apt_opts=(-o Dir::Etc::SourceList="$lists/sources.list" -o Dir::Etc::SourceParts=/dev/null
                    -o Dir::State::Lists="$lists/lists" -o Dir::Cache="$lists" -o Debug::NoLocking=1
                    -o APT::Architecture=arm64 -o APT::Architectures::=arm64
                    -o APT::Sandbox::User=root)
    mkdir -p "$lists/lists/partial" "$lists/archives/partial"
    echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
         "http://deb.debian.org/debian bookworm main" >"$lists/sources.list"
    say "fetching Debian's busybox-static:arm64 into $(dirname "$out")"
    apt-get "${apt_opts[@]}" -q update >/dev/null ||
        die "apt-get update of Debian's arm64 list failed (is debian-archive-keyring installed?)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    (cd "$tmp" && apt-get "${apt_opts[@]}" -q download busybox-static:arm64 >/dev/null) ||
        die "downloading busybox-static:arm64 failed"
    dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$tmp/x"
    mkdir -p "$(dirname "$out")"
    cp "$tmp/x/bin/busybox" "$out"
}

# --- the plan -------------------------------------------------------------------------------
# The kernel build tools, pip (kcidb-io, for the KCIDB check), and the keyring of Debian's
# archive (the kernel source and the busybox come from there, also on Ubuntu).
BUILD_PKGS=(gcc make flex bison bc libelf-dev libssl-dev cpio xz-utils device-tree-compiler
            acpica-tools kmod debian-archive-keyring python3-pip)
# `make check` runs no kernel build and no guest: the firmware tests' dtc and iasl only.
CHECK_PKGS=(device-tree-compiler acpica-tools)
RUSTUP_HINT="install Rust with rustup (https://rustup.rs)"
[ "$HOST_ARCH" = aarch64 ] || RUSTUP_HINT+=", then: rustup target add $TARGET"

plan() {
    family=$(distro)
    foreign=
    pkgs=("${BUILD_PKGS[@]}")
    [ "$FOR" = all ] || pkgs=("${CHECK_PKGS[@]}")
    if [ "$family" = other ]; then
        die "$(pretty_name) is not Debian or Ubuntu: 'make' installs its host packages with apt." \
            "  Use Debian 12 (or newer) or Ubuntu, e.g. in a container, with Rust from rustup."
    fi
    if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
        die "Rust (cargo, rustc) not found: $RUSTUP_HINT"
    fi
    if [ "$HOST_ARCH" = aarch64 ]; then
        if [ -e "$KVM_DEV" ]; then
            rust="native cargo (aarch64 host: no cross build, guests under KVM, no qemu)"
        else
            rust="native cargo (aarch64 host without $KVM_DEV: guests nest in qemu)"
            pkgs+=(qemu-system-arm)
        fi
        return
    fi
    [ "$FOR" = check ] || pkgs+=(qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    if rustup_has_target; then
        rust="rustup's $TARGET target"
    elif [ "$family" = debian ]; then
        rust="Debian's rustc-web with its arm64 std (no rustup $TARGET target)"
        pkgs+=(rustc-web rust-web-clippy libstd-rust-web-dev:arm64)
        foreign=arm64
    else
        die "no Rust target for the aarch64 cross build: $(pretty_name) has no rustc-web;" \
            "  with rustup (https://rustup.rs), run: rustup target add $TARGET"
    fi
}

print_plan() {
    say "plan: $(pretty_name) ($family family), $HOST_ARCH host"
    say "plan: rust: $rust"
    if [ -n "$foreign" ]; then say "plan: dpkg --add-architecture $foreign"; fi
    say "plan: apt-get install ${pkgs[*]}"
}

install() {
    local have sudo=
    have=$(dpkg-query -W -f='${db:Status-Status}\n' "${pkgs[@]}" 2>/dev/null | grep -c '^installed$' || true)
    [ "$have" -lt "${#pkgs[@]}" ] || return 0
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || die "not root and no sudo: install sudo, or run make as root"
        sudo=sudo
    fi
    print_plan
    if [ -n "$foreign" ] && ! dpkg --print-foreign-architectures | grep -qx "$foreign"; then
        $sudo dpkg --add-architecture "$foreign"
    fi
    $sudo apt-get -q update >/dev/null 2>&1 || say "apt-get update reported errors (a missing mirror?)"
    local missing= p
    for p in "${pkgs[@]}"; do
        apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]' || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        case "$missing" in
            *rustc-web*) die "apt has no candidate for:$missing." \
                             "  Without Debian 12's rustc-web: rustup target add $TARGET" ;;
            *) die "apt has no candidate for:$missing." ;;
        esac
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -q install -y --no-install-recommends "${pkgs[@]}" >/dev/null
}

FOR=all
if [ "${1:-}" = --for ]; then
    FOR=${2:-}
    [ "$FOR" = all ] || [ "$FOR" = check ] || die "--for takes all or check, not '$FOR'"
    shift 2
fi
case "${1:-}" in
    busybox) shift; busybox "$@" ;;
    --dry-run) plan; print_plan ;;
    "") plan; install ;;
    *) die "usage: deps.sh [--for all|check] [--dry-run] | deps.sh busybox OUT" ;;
esac
