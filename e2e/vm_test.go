package e2e

import (
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// TestVM builds every package's TestGuest* tests, boots one VM and reports
// each guest test as a subtest: TestVM/<package>/<TestGuestName>.
func TestVM(t *testing.T) {
	vm.RunT(t, VMConfig())
}
