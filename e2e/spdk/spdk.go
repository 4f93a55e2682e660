// Package spdk finds the SPDK v24.01 build that e2e/spdk/build.sh (make
// spdk SPDK_SRC=...) leaves in a cache outside the repository, and runs its
// nvmf_tgt and NVMe host tools for the interop tests. Without the build the
// tests skip with the reason: CI cannot fetch SPDK.
//
// The cache is $SPDK_CACHE, or ${XDG_CACHE_HOME:-~/.cache}/ublk-nvmeof/spdk/v24.01
// (build.sh's header lists its layout); its file BUILT is written last, so a
// build that did not finish is no build.
package spdk

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Version is the SPDK release build.sh builds and the tests expect.
const Version = "v24.01"

// Build is one complete SPDK build in the cache: absolute paths of its
// programs.
type Build struct {
	Dir          string // the cache directory
	NvmfTgt      string // bin/nvmf_tgt: the NVMe-oF target application
	NVMePerf     string // bin/spdk_nvme_perf
	NVMeIdentify string // bin/spdk_nvme_identify
	NVMeDiscover string // bin/spdk_nvme_discover
	RPCPy        string // scripts/rpc.py: the JSON-RPC client
}

// CacheDir is where build.sh puts the build: $SPDK_CACHE, or
// ${XDG_CACHE_HOME:-$HOME/.cache}/ublk-nvmeof/spdk/v24.01.
func CacheDir() string {
	if dir := os.Getenv("SPDK_CACHE"); dir != "" {
		return dir
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			home = "/nonexistent"
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "ublk-nvmeof", "spdk", Version)
}

// ErrNoBuild is wrapped by Find's error when the cache holds no complete
// build.
var ErrNoBuild = errors.New("no SPDK build")

// Find returns the build in CacheDir, or an error that says what is
// missing and how to build it: the skip reason of the interop tests.
func Find() (*Build, error) {
	dir, err := filepath.Abs(CacheDir())
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, "BUILT")); err != nil {
		return nil, fmt.Errorf("%w %s in %s (no BUILT file): build it with make spdk SPDK_SRC=<spdk %s source tree>, see e2e/spdk/build.sh", ErrNoBuild, Version, dir, Version)
	}
	b := &Build{
		Dir:          dir,
		NvmfTgt:      filepath.Join(dir, "bin", "nvmf_tgt"),
		NVMePerf:     filepath.Join(dir, "bin", "spdk_nvme_perf"),
		NVMeIdentify: filepath.Join(dir, "bin", "spdk_nvme_identify"),
		NVMeDiscover: filepath.Join(dir, "bin", "spdk_nvme_discover"),
		RPCPy:        filepath.Join(dir, "scripts", "rpc.py"),
	}
	for _, p := range []string{b.NvmfTgt, b.NVMePerf, b.NVMeIdentify, b.NVMeDiscover, b.RPCPy} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%w: the build in %s lacks %s: rebuild with make spdk SPDK_SRC=...", ErrNoBuild, dir, filepath.Base(p))
		}
	}
	return b, nil
}

// Require returns the build or skips the test with Find's reason. The
// interop tests start real SPDK processes that poll a core, so they also
// skip under -short (make unit).
func Require(t testing.TB) *Build {
	t.Helper()
	b, err := Find()
	if err != nil {
		t.Skipf("SPDK interop: %v", err)
	}
	if testing.Short() {
		t.Skip("SPDK interop: skipped under -short (run make spdk-test)")
	}
	return b
}
