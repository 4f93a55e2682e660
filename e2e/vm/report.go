package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm/internal/guestproto"
)

// EnvRequire, set to 1 (as make test and CI do), turns "this machine cannot
// boot the VM" from a skip into a failure, so CI never passes by skipping.
const EnvRequire = "E2E_REQUIRE_VM"

// Require skips t, or fails it when E2E_REQUIRE_VM=1, unless this machine
// can run the VM tests. -short skips them too.
func Require(t testing.TB) {
	t.Helper()
	err := Available()
	if err == nil && testing.Short() {
		err = errors.New("VM tests do not run with -short")
	}
	if err == nil {
		return
	}
	if os.Getenv(EnvRequire) == "1" {
		t.Fatalf("VM tests required (%s=1) but cannot run: %v", EnvRequire, err)
	}
	t.Skipf("VM tests skipped: %v", err)
}

// RunT runs cfg in the VM once per kernel that E2E_KERNEL selects (see
// EnvKernel; default: the 6.12 LTS kernel) and reports every guest test as a
// subtest of t, named <kernel>/<package>/<TestName> (e.g.
// 6.12/ublk/TestGuestX), so `go test -v` shows each one by kernel and name.
// E2E_PACKAGES (space-separated patterns) and E2E_RUN (a -test.run pattern)
// narrow it down while working on one test; E2E_RACE=1 builds the guest
// tests with the race detector.
func RunT(t *testing.T, cfg Config) {
	t.Helper()
	Require(t)
	if p := os.Getenv("E2E_PACKAGES"); p != "" {
		cfg.Packages = strings.Fields(p)
	}
	if r := os.Getenv("E2E_RUN"); r != "" {
		cfg.Run = r
	}
	if os.Getenv("E2E_RACE") == "1" {
		cfg.Race = true
	}
	if cfg.Progress == nil && testing.Verbose() {
		cfg.Progress = os.Stdout
	}
	kernels, err := SelectKernels(os.Getenv(EnvKernel))
	if err != nil {
		t.Fatalf("VM harness: %v", err)
	}
	runKernels(t, cfg, kernels, func(t *testing.T, cfg Config) {
		res, err := RunRebooting(context.Background(), cfg)
		if err != nil {
			t.Fatalf("VM harness: %v", err)
		}
		Report(t, res)
	})
}

// runKernels calls run once per kernel, in a subtest of t named after the
// kernel, with cfg.Kernel set to it: one boot set per kernel.
func runKernels(t *testing.T, cfg Config, kernels []*Kernel, run func(*testing.T, Config)) {
	for _, k := range kernels {
		c := cfg
		c.Kernel = k
		t.Run(k.Name(), func(t *testing.T) {
			if c.Progress != nil {
				fmt.Fprintf(c.Progress, "[vm] kernel %s (%s, %s)\n", k.Name(), k.Release, k.Role)
			}
			run(t, c)
		})
	}
}

// Report turns a Result into subtests of t; a VM that crashed, hung or
// never reported done fails t with the console log. The guest kernel deaths
// RunRebooting booted again after are logged with their console, not failed.
func Report(t *testing.T, res *Result) {
	t.Helper()
	for i, r := range res.Reboots {
		t.Logf("boot %d: %s after %v while running %q; boot %d ran the tests it did not finish.\nconsole:\n%s",
			i+1, r.Why, r.Elapsed.Round(time.Second), r.Running, i+2, r.Console)
	}
	if strings.Contains(res.Boot, "setup errors") {
		t.Errorf("guest setup: %s", res.Boot)
	}
	byPkg := map[string][]TestResult{}
	var order []string
	for _, tr := range res.Tests {
		if _, ok := byPkg[tr.Package]; !ok {
			order = append(order, tr.Package)
		}
		byPkg[tr.Package] = append(byPkg[tr.Package], tr)
	}
	for _, pkg := range order {
		t.Run(pkg, func(t *testing.T) {
			for _, tr := range byPkg[pkg] {
				t.Run(tr.Name, func(t *testing.T) { reportOne(t, tr) })
			}
		})
	}
	if !res.Done {
		what := "the VM stopped before /init reported done"
		if res.TimedOut {
			what = "the VM was killed at its timeout"
		}
		if res.BootHung {
			what = "the VM was killed at its boot timeout, /init silent"
		}
		if res.Running != "" {
			what += " while running " + res.Running
		}
		t.Errorf("%s (after %v).\nQEMU: %s\nconsole (last 80 lines):\n%s", what, res.Elapsed, strings.TrimSpace(res.QEMU), res.ConsoleTail(80))
	}
}

func reportOne(t *testing.T, tr TestResult) {
	switch tr.Status {
	case guestproto.StatusPass:
		// Its output was streamed as it ran (Config.Progress, under -v).
	case guestproto.StatusSkip:
		t.Skipf("skipped in the guest:\n%s", tr.Output)
	default:
		msg := "failed in the guest:\n" + tr.Output
		if len(tr.Complaints) > 0 {
			msg += "\nthe kernel complained during the test:\n  " + strings.Join(tr.Complaints, "\n  ")
		}
		if len(tr.Kernel) > 0 {
			msg += "\nkernel log during the test:\n  " + strings.Join(tr.Kernel, "\n  ")
		}
		t.Error(msg)
	}
}
