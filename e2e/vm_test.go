// Package e2e holds the end-to-end tests that run inside a VM with a real
// kernel (see package e2e/vm), and TestVM, the host-side test that boots that
// VM and runs every guest test of the module there.
package e2e

import (
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// TestVM builds every package's TestGuest* tests, boots one VM and reports
// each guest test as a subtest: TestVM/<package>/<TestGuestName>.
func TestVM(t *testing.T) {
	vm.RunT(t, vm.Config{
		Packages: []string{"./..."},
		Programs: []string{"fio", "nvme"},
	})
}
