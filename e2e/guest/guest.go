// Package guest is imported by tests that run inside the e2e virtual machine
// (a real kernel with ublk_drv, nvme-tcp and nvmet-tcp loaded).
//
// Convention: a test meant for the VM is named TestGuest* and begins with
// guest.Require(t). On a plain machine it skips with a reason; the host-side
// harness (package e2e/vm, driven by `go test ./e2e -run TestVM`) builds every
// package's test binary, boots the VM once and runs every TestGuest* test
// there as root, reporting each result on the host.
package guest

import (
	"os"
	"testing"
)

// EnvInGuest is set to "1" by the VM's init for every guest test process.
const EnvInGuest = "UBLK_NVMEOF_E2E_GUEST"

// InVM reports whether this process runs inside the e2e virtual machine.
func InVM() bool { return os.Getenv(EnvInGuest) == "1" }

// Require skips t unless it runs inside the e2e virtual machine.
func Require(t testing.TB) {
	t.Helper()
	if !InVM() {
		t.Skip("guest test: runs only inside the e2e VM (go test ./e2e -run TestVM, or make e2e)")
	}
}
