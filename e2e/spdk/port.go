package spdk

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// The interop tests' TCP ports: a range of their own on this machine, so
// that test processes of several packages (go test runs them in parallel)
// and other programs' targets do not meet.
const (
	FirstPort = 4520
	LastPort  = 4539
)

// Port reserves a free port in FirstPort..LastPort for the rest of the
// test: an exclusive flock on a file per port keeps the other test
// processes off it (nvmf_tgt binds the port later, so a probe alone would
// race), and a probe listen keeps off ports something else has bound.
func Port(t testing.TB) int {
	t.Helper()
	for port := FirstPort; port <= LastPort; port++ {
		f, ok := lockPort(port)
		if !ok {
			continue
		}
		if !portFree(port) {
			_ = f.Close()
			continue
		}
		t.Cleanup(func() { _ = f.Close() })
		return port
	}
	t.Fatalf("no free port in %d..%d for an SPDK target", FirstPort, LastPort)
	return 0
}

// lockPort takes the port's lock file without waiting; closing the file
// releases it (also when the process dies).
func lockPort(port int) (*os.File, bool) {
	name := filepath.Join(os.TempDir(), "ublk-nvmeof-spdk-port-"+strconv.Itoa(port)+".lock")
	f, err := os.OpenFile(name, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, false
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		return nil, false
	}
	return f, true
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}
