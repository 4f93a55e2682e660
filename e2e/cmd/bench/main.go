// Command bench is `make bench`: for each kernel E2E_KERNEL selects
// (default: all, the 6.12 LTS and the newest), it boots the e2e VM once and
// runs e2e.TestGuestPerfVersusKernel there — fio on /dev/ublkbN
// (ublk-nvmeof) and on /dev/nvmeXnY (the kernel's nvme-tcp initiator), both
// on one Linux nvmet-tcp target on a RAM disk, in the same boot — and
// writes what it measured under -out (docs/perf), for each kernel <k>
// (major.minor, e.g. 6.12):
//
//	results-<k>.json  the report (perf.Report), with the host's record:
//	                  date, commit, load average before, during and after
//	ratio-<k>.svg     the ratios as bars against the 1.0 line, the
//	                  baseline's under them
//	profile/<k>/      the profiled row (-profile, default the slowest) run
//	                  once more: the daemon's CPU profile, its execution
//	                  trace, `go tool pprof -top`, the guest's CPU by thread
//
// and then results.md, every kernel's results-<k>.json side by side with
// the baseline's (-baseline: a directory of results-<k>.json files,
// docs/perf/baseline; make bench-baseline copies the current results there).
// -render only rewrites results.md and the plots from the files.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/perf"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// options are the command's flags.
type options struct {
	out      string
	runtime  time.Duration
	profile  string
	baseline string
	render   bool
	maxLoad  float64       // wait for the host's 1-min load to fall to it (0: no wait)
	loadWait time.Duration // for at most this long
	// commit names the tree, taken before the first kernel ran: the
	// results a kernel writes make the tree dirty for the next one.
	commit string
}

func main() {
	var o options
	flag.StringVar(&o.out, "out", "docs/perf", "directory the results are written to")
	flag.DurationVar(&o.runtime, "runtime", 10*time.Second, "fio runtime of each job (whole seconds)")
	flag.StringVar(&o.profile, "profile", perf.ProfileSlowest, `row whose ublk-nvmeof run is repeated with the daemon profiled: "slowest" (lowest ratio of each kernel's table), a row ID such as 4k-randread-qd1-j1, or "" for none`)
	flag.StringVar(&o.baseline, "baseline", "docs/perf/baseline", `directory of the baseline's results-<kernel>.json ("" for none)`)
	flag.Float64Var(&o.maxLoad, "max-load", 0, "before each boot, wait until the host's 1-minute load average is at most this (0: do not wait); other processes distort the numbers under TCG")
	flag.DurationVar(&o.loadWait, "max-load-wait", 15*time.Minute, "the longest -max-load waits before booting anyway (the report says so)")
	flag.BoolVar(&o.render, "render", false, "boot nothing: rewrite results.md and the plots from -out's results-*.json and the baseline")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if err := check(o); err != nil {
		return err
	}
	command := commandLine(os.Args[1:])
	if o.render {
		// Rendering boots nothing: the kernel selection plays no part.
		_, command, _ = strings.Cut(command, " ")
		return render(o.out, o.baseline, command)
	}
	kernels, err := vm.SelectKernels(kernelSelection())
	if err != nil {
		return err
	}
	if err := vm.Available(); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	o.commit = gitCommit()
	var errs []error
	for _, k := range kernels {
		// One kernel failing still leaves the other's results.
		if err := benchKernel(ctx, k, o, command); err != nil {
			errs = append(errs, fmt.Errorf("kernel %s: %w", k.Name(), err))
		}
		if ctx.Err() != nil {
			break
		}
	}
	if err := render(o.out, o.baseline, command); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// check rejects flags that would only fail in the guest, minutes later.
func check(o options) error {
	if o.profile != "" && o.profile != perf.ProfileSlowest {
		if _, _, err := perf.ParseRowID(o.profile); err != nil {
			return fmt.Errorf("-profile: %v", err)
		}
	}
	if o.maxLoad < 0 {
		return fmt.Errorf("-max-load %v: want 0 (no wait) or more", o.maxLoad)
	}
	if o.runtime < time.Second || o.runtime%time.Second != 0 {
		return fmt.Errorf("-runtime %v: want whole seconds, at least 1s", o.runtime)
	}
	return nil
}

// kernelSelection is E2E_KERNEL, default all: the bench compares kernels.
func kernelSelection() string {
	if sel := os.Getenv(vm.EnvKernel); sel != "" {
		return sel
	}
	return "all"
}

// commandLine is the command that reproduces this run, for the results.
func commandLine(args []string) string {
	words := []string{vm.EnvKernel + "=" + shellWord(kernelSelection()), "go", "run", "./e2e/cmd/bench"}
	for _, a := range args {
		words = append(words, shellWord(a))
	}
	return strings.Join(words, " ")
}

// shellWord quotes s for a POSIX shell when it is empty or holds anything
// but letters, digits and -_./=,:+.
func shellWord(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=,:+") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
