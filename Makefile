# gracevm: boot real arm64 kernels on a Grace-like platform to test the nvgrace-gpu/EGM drivers.
#
#   make test            host tests, then boot the guest and run the in-guest suite (KTAP)
#   make check           formatting, lint, unit and host tests (no kernel, no guest)
#   make e2e             only the guests: SCENARIO=globs, TESTS=globs narrow it
#   make run [CMD=...]   boot the default platform to a shell (or run CMD and power off)
#   make bench           the loop measured: boot ratio, VMM start, series and edit to verdict
#   make fuzz            fuzz the device models and host parsers (FUZZ_SECONDS per target, default 600)
#   make kernel          build the guest kernel (Debian linux-source, or KSRC=/path/to/linux)
#
#   DEBUG=1              guest kernel with KASAN, KFENCE, UBSAN, lockdep, DEBUG_LIST, ... (own build)
#   EXPECT=egm           the kernel must carry the EGM driver: its tests fail instead of skipping
#   PATCHES=dir|mbox     a series on the default source; KSRC=tree, KERNEL=Image your own kernel
#
# Everything downloaded or built outside cargo goes to $(CACHE), never into the tree.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE   ?= $(HOME)/.cache/gracevm
OUT     ?= out
KVER    ?= 7.3
KSRC    ?=
KERNEL  ?=
CMD     ?=
CPUS    ?= 2
MEMORY  ?= 1G
DEBUG   ?=
EXPECT  ?=
# SCENARIO=egm-retired-*,acpi runs those scenarios (globs; default: all); TESTS=egm_* those tests.
SCENARIO ?=
TESTS    ?=
# A debug kernel (KASAN and lockdep under nested emulation) runs several times slower.
TIMEOUT ?= $(if $(DEBUG),1200,300)
ARGS    ?=
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_SECONDS ?= 600
BENCH_PLATFORM ?= tests/bench/minimal.toml
# Boots per VMM in `make bench-boot`: nested boots vary by a factor of two, a median of three moves
# with the slowest.
BENCH_BOOTS ?= 9

HOST_ARCH := $(shell uname -m)
TARGET    := aarch64-unknown-linux-gnu

# The default kernel (also the level-1 kernel of the nested route), and the guest kernel:
# a user's tree (KSRC=), a ready Image (KERNEL=), or the default source with a patch series
# applied (PATCHES=, an mbox or a directory of patches).
DEFAULT_KBUILD := $(CACHE)/build/debian-$(KVER)
DEFAULT_IMAGE  := $(DEFAULT_KBUILD)/arch/arm64/boot/Image
ifneq ($(KSRC),)
KSRC_ABS     := $(abspath $(KSRC))
GUEST_KBUILD := $(CACHE)/build/ksrc-$(shell printf '%s' '$(KSRC_ABS)' | md5sum | cut -c1-12)
else ifneq ($(PATCHES),)
# A series is a branch of the default source tree (apply-patches.sh), built in a directory
# seeded from the default build: only what the series changes is compiled.
PATCHES_ABS  := $(abspath $(PATCHES))
PATCH_KEY    := $(shell { test -d '$(PATCHES_ABS)' && find '$(PATCHES_ABS)' -maxdepth 1 -type f | sort | xargs cat; test -f '$(PATCHES_ABS)' && cat '$(PATCHES_ABS)'; } 2>/dev/null | md5sum | cut -c1-12)
GUEST_KBUILD := $(CACHE)/build/patched-$(PATCH_KEY)
else
GUEST_KBUILD := $(DEFAULT_KBUILD)
endif
# DEBUG=1: the same tree with fragments/debug.config, in a build directory of its own (the
# level-1 kernel of the nested route stays the plain default one).
SEED_KBUILD := $(DEFAULT_KBUILD)
KERNEL_DEPS := default-kernel
ifneq ($(DEBUG),)
GUEST_KBUILD := $(GUEST_KBUILD)-debug
BUILD_FLAGS  := --debug
SEED_KBUILD  := $(DEFAULT_KBUILD)-debug
ifeq ($(KSRC)$(KERNEL),)
KERNEL_DEPS  += default-debug-kernel
endif
endif
GUEST_IMAGE := $(if $(KERNEL),$(abspath $(KERNEL)),$(GUEST_KBUILD)/arch/arm64/boot/Image)
# Its modules (the nvgrace drivers are modules): MODULES= (an INSTALL_MOD_PATH, needed with a
# modular KERNEL=), or the tree `make kernel` installs beside the build when it has one.
ifneq ($(MODULES),)
GUEST_MODULES = $(abspath $(MODULES))
else ifeq ($(KERNEL),)
GUEST_MODULES = $$(test -d $(GUEST_KBUILD)/modules && echo $(GUEST_KBUILD)/modules)
endif
WITH_MODULES = env $$(m=$(GUEST_MODULES); test -z "$$m" || echo "GRACEVM_MODULES=$$m")
# What the kernel under test must have: EXPECT= from the user, else what the build saw in the
# tree (build.sh writes gracevm.expect when the tree carries the EGM driver's sources).
EXPECT_FILE := $(GUEST_KBUILD)/gracevm.expect
ifneq ($(EXPECT),)
SET_EXPECT = export GRACEVM_EXPECT='$(EXPECT)' GRACEVM_EXPECT_WHY='EXPECT=$(EXPECT)';
else ifeq ($(KERNEL),)
SET_EXPECT = if [ -f $(EXPECT_FILE) ]; then export GRACEVM_EXPECT="$$(sed -n 1p $(EXPECT_FILE))" GRACEVM_EXPECT_WHY="$$(sed -n 2p $(EXPECT_FILE))"; fi;
endif

BUSYBOX := $(CACHE)/busybox/bin/busybox
INITRD  := target/gracevm/guest.cpio

# aarch64 binaries: native on an aarch64 host; elsewhere cross-built, with rustup's aarch64
# target when it is installed, else with Debian's rustc-web and its arm64 std.
ifeq ($(HOST_ARCH),aarch64)
AARCH64_CARGO := cargo
AARCH64_DIR   := target/release
else
RUSTUP_TARGET := $(shell rustup target list --installed 2>/dev/null | grep -qx $(TARGET) && echo yes)
ifeq ($(RUSTUP_TARGET),yes)
AARCH64_CARGO  := cargo
AARCH64_CLIPPY := cargo clippy
else
AARCH64_CARGO  := RUSTC=/usr/bin/rustc cargo
AARCH64_CLIPPY := RUSTC=/usr/bin/rustc /usr/bin/cargo-clippy clippy
endif
AARCH64_FLAGS := --target $(TARGET) --target-dir target/cross
AARCH64_DIR   := target/cross/$(TARGET)/release
endif
L1_VMM := $(AARCH64_DIR)/gracevm
SUITE  := $(AARCH64_DIR)/gracevm-suite
HOST_VMM := target/debug/gracevm

export GRACEVM_KERNEL    := $(GUEST_IMAGE)
export GRACEVM_INITRD    := $(abspath $(INITRD))
export GRACEVM_L1_KERNEL := $(DEFAULT_IMAGE)
export GRACEVM_BUSYBOX   := $(BUSYBOX)
export GRACEVM_L1_VMM    := $(abspath $(L1_VMM))
# What the kernel build recorded (for kcidb.json); a ready KERNEL= has none (and an empty
# variable would be a missing value to gracevm, not an absent one).
ifeq ($(KERNEL),)
export GRACEVM_BUILD_INFO := $(GUEST_KBUILD)/gracevm-build.json
else
unexport GRACEVM_BUILD_INFO
endif

# kcidb-io goes into the cache (a distribution's Python refuses system-wide pip installs).
PY_CACHE = PYTHONPATH=$(CACHE)/python$${PYTHONPATH:+:$$PYTHONPATH}
# What `deps` installs: everything, or (make check) only what the host tests need.
DEPS_FOR ?= all
GUEST_ARGS = --cpus $(CPUS) --memory $(MEMORY) $(ARGS)
comma := ,
SCENARIO_ARGS = $(if $(SCENARIO),$(foreach s,$(subst $(comma), ,$(SCENARIO)),--scenario '$(s)'),--all-scenarios)

.PHONY: help check deps kernel default-kernel default-debug-kernel debug-config initramfs vmm lint host-test fuzz-smoke fuzz e2e test run bench bench-boot print-kver print-guest-kbuild clean

help:
	@sed -n '2,/^# Everything/p' Makefile | sed '$$d; s/^# \{0,1\}//'

# --- host packages ------------------------------------------------------------------------
# apt on Debian 12+ and Ubuntu; elsewhere (or without a Rust route to aarch64) it stops saying
# what to install. `tools/deps.sh --dry-run` prints the plan.
deps:
	@tools/deps.sh --for $(DEPS_FOR)

$(BUSYBOX):
	@CACHE=$(CACHE) tools/deps.sh busybox $(BUSYBOX)

# --- kernels ------------------------------------------------------------------------------
default-kernel: deps
	@guest-kernel/kernel.sh $(CACHE) $(KVER) $(DEFAULT_KBUILD)

# DEBUG=1: the default source with the debug fragment; a series' debug build is seeded from it.
default-debug-kernel: default-kernel
	@guest-kernel/kernel.sh $(CACHE) $(KVER) $(DEFAULT_KBUILD)-debug --debug

# The DEBUG=1 configuration must keep surviving Kconfig on the default source, though the
# default `make test` does not build it (CI's time): configure only, in a scratch directory.
debug-config: deps
	@guest-kernel/kernel.sh $(CACHE) $(KVER) $(CACHE)/build/debug-config-check --debug --config-only

kernel: $(KERNEL_DEPS)
ifneq ($(KERNEL),)
	@test -f $(GUEST_IMAGE) || { echo "KERNEL=$(KERNEL): no such file (pass an arm64 Image)" >&2; exit 2; }
else ifneq ($(KSRC),)
	@test -f $(KSRC_ABS)/Makefile || { echo "KSRC=$(KSRC): not a kernel source tree" >&2; exit 2; }
	@test "$(KSRC_ABS)" != "$(abspath $(CACHE)/src/linux-source-$(KVER))" || { echo "KSRC=$(KSRC) is gracevm's \
	own source cache, whose checkout make switches: use PATCHES=, or a clone of it" >&2; exit 2; }
	@echo "[kernel] building your tree $(KSRC_ABS)"
	@guest-kernel/build.sh $(BUILD_FLAGS) $(KSRC_ABS) $(GUEST_KBUILD)
else ifneq ($(PATCHES),)
	@$(if $(NO_NEAREST_SEED),GRACEVM_NEAREST_SEED=0) guest-kernel/kernel.sh $(CACHE) $(KVER) $(GUEST_KBUILD) \
	    --series $(PATCHES_ABS) $(BUILD_FLAGS) $(if $(NO_SEED),,--seed $(SEED_KBUILD))
endif

# --- gracevm and the guest's userspace ----------------------------------------------------
vmm: deps
	@echo "[build] gracevm (host) and gracevm + suite (aarch64)"
	@cargo build -q -p gracevm
	@$(AARCH64_CARGO) build -q --release $(AARCH64_FLAGS) -p gracevm -p guest-suite

initramfs: vmm $(BUSYBOX)
	@mkdir -p $(dir $(INITRD))
	@$(HOST_VMM) initramfs --init tests/guest/init --busybox $(BUSYBOX) --suite $(SUITE) --out $(INITRD)

# --- the two commands -----------------------------------------------------------------------
# Functions of the VMM and the firmware stay short enough to read whole.
FN_MAX_LINES    := 80
# Formatting and clippy, including the aarch64-only KVM glue (linted with Debian's clippy for
# the cross compiler on x86_64 hosts).
lint: deps
	@echo "[lint] cargo fmt --check, clippy (host$(if $(AARCH64_FLAGS), and aarch64,))"
	@cargo fmt --all -- --check
	@cargo clippy -q --workspace --all-targets -- -D warnings
	@echo "[lint] functions over $(FN_MAX_LINES) lines (tests/lint/fn-length.py)"
	@tests/lint/fn-length.py --max $(FN_MAX_LINES) platform firmware
ifneq ($(HOST_ARCH),aarch64)
	@$(AARCH64_CLIPPY) -q --target $(TARGET) --target-dir target/cross-clippy \
	    -p gracevm -p guest-suite -- -D warnings
endif

host-test: deps lint
	@echo "[test] host tests (cargo test)"
	@cargo test -q --workspace
	@echo "[test] patch-series application (PATCHES=)"
	@tests/e2e/apply-patches.sh
	@echo "[test] host package plans (tools/deps.sh: Debian, Ubuntu, aarch64, others)"
	@tests/host/deps-plan.sh

e2e: kernel initramfs
	@echo "[test] end to end: booting $(GUEST_IMAGE)"
	@$(SET_EXPECT) $(WITH_MODULES) $(HOST_VMM) test $(SCENARIO_ARGS) $(if $(TESTS),--tests '$(TESTS)',) \
	    --scenarios-dir tests/scenarios --timeout $(TIMEOUT) $(ARGS) --out $(OUT)
	@echo "[test] KCIDB report: $(OUT)/kcidb.json against the schema (kcidb-io)"
	@$(PY_CACHE) python3 -c 'import kcidb_io' 2>/dev/null || { echo "[deps] installing kcidb-io (PyPI) into $(CACHE)/python"; \
	    python3 -m pip install -q --root-user-action=ignore --target $(CACHE)/python kcidb-io >/dev/null; }
	@$(PY_CACHE) tests/host/kcidb-validate.py $(OUT)/kcidb.json
ifeq ($(SCENARIO)$(TESTS),)
	@echo "[test] harness exit statuses: panic, timeout, bad input, Ctrl-C"
	@tests/e2e/exit-status.sh $(HOST_VMM) $(OUT)/exit-status
endif

# Device models and host-side parsers driven by byte streams: a short run in every test,
# a long one on demand.
fuzz-smoke: deps
	@echo "[test] fuzzing the device models, $(FUZZ_SMOKE_SECONDS) s per target"
	@platform/fuzz/run.sh $(FUZZ_SMOKE_SECONDS)

fuzz: deps
	@platform/fuzz/run.sh $(FUZZ_SECONDS)

test: host-test fuzz-smoke debug-config e2e

# The quick loop without a kernel: formatting, lint, unit and host tests; a cold machine gets
# only the packages these need.
check: DEPS_FOR := check
check: host-test

run: kernel initramfs
	@$(WITH_MODULES) $(HOST_VMM) run $(GUEST_ARGS) $(if $(TIMEOUT_RUN),--timeout $(TIMEOUT_RUN),) $(if $(CMD),--cmd "$(CMD)",)

# The loop, phase by phase (tests/bench/loop.sh: BENCH_PHASES, PATCHES=, BENCH_FULL=1).
bench: kernel initramfs
	@CACHE=$(CACHE) tests/bench/loop.sh $(OUT)/bench $(BENCH_PHASES)

# Boot to userspace only: gracevm against qemu-system-aarch64 TCG on the same Image.
bench-boot: kernel initramfs
	@$(HOST_VMM) bench --platform $(BENCH_PLATFORM) --runs $(BENCH_BOOTS) $(GUEST_ARGS) --out $(OUT)/boot

print-kver:
	@echo $(KVER)

print-guest-kbuild:
	@echo $(GUEST_KBUILD)

clean:
	cargo clean
	rm -rf $(OUT)
