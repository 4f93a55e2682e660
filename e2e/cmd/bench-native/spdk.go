package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// spdkBuild is the SPDK build e2e/spdk/build.sh leaves in its cache.
type spdkBuild struct {
	dir                string
	nvmfTgt, perf, rpc string
}

// missingError says what of SPDK is missing and how to get it.
type missingError struct{ what []string }

func (e *missingError) Error() string {
	return "SPDK is not built: missing " + strings.Join(e.what, ", ") +
		" (build it with `make spdk SPDK_SRC=/path/to/spdk` or e2e/spdk/build.sh, SPDK v24.01, or set SPDK_CACHE to a build elsewhere)"
}

// spdkCache is $SPDK_CACHE, or the build script's default.
func spdkCache() string {
	if d := os.Getenv("SPDK_CACHE"); d != "" {
		return d
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, _ := os.UserHomeDir()
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "ublk-nvmeof", "spdk", "v24.01")
}

// findSPDK checks the cache holds a complete build.
func findSPDK() (spdkBuild, error) {
	dir := spdkCache()
	b := spdkBuild{dir: dir, nvmfTgt: filepath.Join(dir, "bin", "nvmf_tgt"),
		perf: filepath.Join(dir, "bin", "spdk_nvme_perf"), rpc: filepath.Join(dir, "scripts", "rpc.py")}
	var missing []string
	for _, p := range []string{filepath.Join(dir, "BUILT"), b.nvmfTgt, b.perf, b.rpc} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if len(missing) > 0 {
		return b, &missingError{what: missing}
	}
	return b, nil
}

func (b spdkBuild) describe() string {
	return fmt.Sprintf("v24.01 from %s", b.dir)
}
