// Package e2e holds the end-to-end tests that run inside a VM with a real
// kernel (package e2e/vm), TestVM, the host-side test that boots that VM
// and runs every guest test of the module there, and the demo's guest side.
package e2e

import (
	"os"
	"strings"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// DaemonPath is where the guest has the ublk-nvmeof command.
const DaemonPath = "/usr/bin/ublk-nvmeof"

// VMConfig is the VM every guest test of the module runs in: the real
// ublk-nvmeof command at DaemonPath, and fio, nvme-cli and mkfs.ext4 from
// the host. The host's E2E_PERF_* variables (TestGuestPerfVersusKernel's
// knobs) are passed on to the guest tests.
func VMConfig() vm.Config {
	return vm.Config{
		// Every daemon a guest test starts checks at exit that none of
		// its goroutines is left (exit status 97 if one is).
		Env: append(hostEnv("E2E_PERF_"), "UBLK_NVMEOF_CHECK_GOROUTINES=1"),
		// Every guest test in one boot per kernel: about 10 minutes on CI
		// (6.12), 16 to 20 on the 2-core development machine under load
		// (2026-11-30), where vm.Config's default of 20 killed the 7.3
		// boot. make e2e bounds the whole run (-timeout).
		Timeout:  45 * time.Minute,
		Packages: []string{"./..."},
		Programs: append([]string{"fio", "nvme", "mkfs.ext4"}, systemdPrograms()...),
		GoPrograms: map[string]string{
			DaemonPath: "./cmd/ublk-nvmeof",
		},
	}
}

// hostEnv returns the host's environment variables whose names start with
// prefix, as KEY=value.
func hostEnv(prefix string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, prefix) {
			env = append(env, kv)
		}
	}
	return env
}
