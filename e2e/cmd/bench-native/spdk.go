package main

import (
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/spdk"
)

// spdkBuild is the SPDK build e2e/spdk/build.sh leaves in its cache.
type spdkBuild struct {
	dir                string
	nvmfTgt, perf, rpc string
}

// findSPDK finds the build (package spdk); its error, wrapping
// spdk.ErrNoBuild, says what is missing and how to build it.
func findSPDK() (spdkBuild, error) {
	b, err := spdk.Find()
	if err != nil {
		return spdkBuild{}, err
	}
	return spdkBuild{dir: b.Dir, nvmfTgt: b.NvmfTgt, perf: b.NVMePerf, rpc: b.RPCPy}, nil
}

func (b spdkBuild) describe() string { return spdk.Version + " from " + b.dir }
