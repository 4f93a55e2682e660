// Command demo is the main job of `make demo` on a machine whose kernel
// cannot run ublk itself: it boots the e2e VM (Debian's 6.12 kernel under
// QEMU) and runs the demonstration there, printing progress and a summary.
//
// In the VM: a Linux nvmet-tcp target exports a RAM disk, `ublk-nvmeof
// attach` exposes it as /dev/ublkbN, an ext4 file system is made and files
// written and verified, list and status are shown, the device is detached,
// and the kernel's own nvme-tcp initiator finds the same files (see
// e2e.TestGuestDemo).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

func main() {
	if err := vm.Available(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := e2e.VMConfig()
	cfg.Packages = []string{"./e2e"}
	cfg.Run = "^TestGuestDemo$"
	cfg.Timeout = 10 * time.Minute
	cfg.Progress = os.Stdout
	res, err := vm.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("\nsummary: %s, VM ran %v\n", res.Boot, res.Elapsed.Round(time.Millisecond))
	for _, t := range res.Tests {
		fmt.Printf("  %-4s %s.%s (%v)\n", t.Status, t.Package, t.Name, t.Elapsed.Round(time.Millisecond))
	}
	if res.Failed() {
		if !res.Done {
			fmt.Printf("the VM stopped early (timed out: %v); console:\n%s\n", res.TimedOut, res.ConsoleTail(40))
		}
		os.Exit(1)
	}
}
