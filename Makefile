# ublk-nvmeof — see README.md.
#   make demo   the main job: boot a VM with a real kernel and run the demo
#   make test   every test: unit and integration (-race), then the VM tests
#   make e2e    only the VM tests
#   make bench  ublk-nvmeof against the kernel initiator in the VM -> docs/perf
#   make bench-native  the host library and `serve` against SPDK, no VM -> docs/perf/native.md
#   make spdk SPDK_SRC=DIR   build SPDK v24.01's nvmf_tgt and host tools into
#               ~/.cache/ublk-nvmeof/spdk/v24.01 (e2e/spdk/build.sh); make
#               spdk-test runs the interop tests against that build
GO ?= go
export CGO_ENABLED ?= 1

.PHONY: all build vet unit test e2e bench bench-baseline bench-native bench-go demo vm-prepare spdk spdk-test clean

all: build

build:
	$(GO) build ./...

vet:
	$(GO) vet ./...

# The kernels the VM tests boot, one boot set each (E2E_KERNEL, see
# e2e/vm/kernel.go): all = lts (Debian's 6.12, the floor) and newest (the
# newest of trixie-backports); or lts, newest, or versions such as 6.12 7.3.
E2E_KERNEL ?= all
export E2E_KERNEL

# VM_PREPARE_FLAGS=--update resolves the kernel packages again (a newer
# trixie-backports kernel); the kernels prepared are E2E_KERNEL's.
vm-prepare:
	e2e/vm/prepare-vm.sh $(VM_PREPARE_FLAGS) $(E2E_KERNEL)

# Unit and integration tests with the race detector; the VM tests skip
# themselves under -short and run in the e2e step.
unit:
	$(GO) test -race -short -count=1 ./...

# The VM tests. E2E_REQUIRE_VM=1 makes "cannot boot the VM" a failure, not a
# skip; E2E_RACE=1 builds the guest tests with the race detector; -p 1: one
# VM at a time; every guest test runs on each E2E_KERNEL kernel, reported
# as TestVM/<kernel>/<package>/<TestGuestName>.
e2e: vm-prepare
	E2E_REQUIRE_VM=1 E2E_RACE=1 $(GO) test -count=1 -p 1 -timeout 85m -v -run '^(TestVM|TestHarness)' ./e2e/...

test: vet unit e2e

# The comparison with the kernel's initiator in the VM, one boot per
# E2E_KERNEL kernel (all: 6.12 and the newest), written to docs/perf with
# the ratios of docs/perf/baseline beside them (BENCH_FLAGS: e.g.
# -runtime 2s, -profile 4k-randwrite-qd32-j1, -baseline DIR, -max-load 1.5,
# -render).
# bench-baseline makes the results now the baseline of the next change.
# bench-go: the Go benchmarks on this machine.
bench:
	e2e/vm/prepare-vm.sh $(E2E_KERNEL)
	$(GO) run ./e2e/cmd/bench $(BENCH_FLAGS)

bench-baseline:
	mkdir -p docs/perf/baseline
	cp docs/perf/results-*.json docs/perf/baseline/
	$(GO) run ./e2e/cmd/bench -render

# The nvmeof host library against spdk_nvme_perf and `ublk-nvmeof serve`
# against nvmf_tgt on this machine (CPUs 0 and 1), with SPDK v24.01 from
# e2e/spdk/build.sh's cache; never part of make test. BENCH_NATIVE_FLAGS:
# e.g. -t 5s -rows 4k-randread.
bench-native:
	$(GO) run ./e2e/cmd/bench-native $(BENCH_NATIVE_FLAGS)

bench-go:
	$(GO) test -run '^$$' -bench . -benchmem ./...

# SPDK v24.01 from a source tree the user lays out (build.sh's header says
# which); never part of make test: CI cannot fetch it. The interop tests
# skip without the build and under -short; -p 1: one polling nvmf_tgt at a
# time.
spdk:
	e2e/spdk/build.sh $(SPDK_SRC)

SPDK_TEST_PACKAGES ?= ./e2e/spdk/ ./nvmeof/ ./lifecycle/nvmeofconn/ ./cmd/ublk-nvmeof/
spdk-test:
	$(GO) test -race -count=1 -p 1 -timeout 20m -v -run 'SPDK' $(SPDK_TEST_PACKAGES)

demo:
	e2e/vm/prepare-vm.sh lts
	E2E_KERNEL=lts $(GO) run ./e2e/cmd/demo

clean:
	rm -rf bin
