// Package vmrun runs only nvmeof's guest tests in the e2e VM, for a
// quicker loop than `make e2e` while working on nvmeof:
//
//	NVMEOF_VM=1 go test -count=1 -v ./nvmeof/internal/vmrun
//
// `go test ./e2e -run TestVM` runs them too, with every other package's.
package vmrun

import (
	"os"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

func TestVMNvmeof(t *testing.T) {
	if os.Getenv("NVMEOF_VM") != "1" {
		t.Skip("set NVMEOF_VM=1 to boot the e2e VM for nvmeof's guest tests")
	}
	vm.RunT(t, vm.Config{Packages: []string{"./nvmeof/..."}, Race: os.Getenv("E2E_RACE") == "1", Progress: os.Stderr})
}
