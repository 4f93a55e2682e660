package vm

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// tcgFlake matches the console's report of the one guest kernel death this
// harness boots again for: an int3 trap the kernel did not expect. The
// kernel patches its own text live (static keys, alternatives, ftrace) by
// writing an int3 first and the new instruction after; under TCG a vCPU can
// still run the int3 from its translation cache once the patch is done, and
// the kernel oopses with "Oops: int3". Seen on 6.12 and 7.3 guests (in
// kmem_cache_alloc_noprof, sched_clock_cpu, __schedule, a cgroup write),
// never under KVM. A BUG(), WARN() or fault is not an int3 oops.
var tcgFlake = regexp.MustCompile(`(?m)Oops: int3\b`)

// flakeReboots bounds the extra boots of one Run for that flake.
const flakeReboots = 2

// EnvBoot is set for every guest test: 1 on the first boot, 2 and up on the
// boots RunRebooting makes after a guest kernel died of the TCG flake.
const EnvBoot = "E2E_BOOT"

// Reboot is one guest kernel death that RunRebooting booted again after.
type Reboot struct {
	Why     string        // what happened, in words
	Running string        // the test that was running ("" before the first)
	Elapsed time.Duration // how long that boot ran
	Console string        // the console from the oops on (or its end), at most 40 lines
}

// RunRebooting is Run, but a guest kernel that died of the TCG text-patching
// flake (tcgFlake; only under TCG, never a timeout), or a guest that hung
// before /init's first report (Config.BootTimeout: seen once under TCG, a
// silent console at 196 % CPU for 10 minutes), is booted again, at most
// flakeReboots times, to run the tests that kernel did not finish: the test
// it died in runs again from its start, the tests that ended are not run
// again. Any other death is the Result as Run returns it. The Result joins
// the boots: Tests in the order they ended, Reboots says why each extra
// boot happened, the rest is the last boot's.
func RunRebooting(ctx context.Context, cfg Config) (*Result, error) {
	var reboots []Reboot
	var ended []TestResult
	var elapsed time.Duration
	for boot := 1; ; boot++ {
		c := cfg
		c.Env = append([]string{fmt.Sprintf("%s=%d", EnvBoot, boot)}, cfg.Env...)
		c.skip = endedTests(ended)
		res, err := Run(ctx, c)
		if err != nil {
			return nil, err
		}
		ended = append(ended, res.Tests...)
		elapsed += res.Elapsed
		if !(diedOfTCGFlake(res) || res.BootHung) || boot > flakeReboots || ctx.Err() != nil {
			res.Tests, res.Reboots, res.Elapsed = ended, reboots, elapsed
			return res, nil
		}
		r := Reboot{Running: res.Running, Elapsed: res.Elapsed, Console: oopsLines(res.Console, 40), Why: "the guest kernel died of the TCG int3 flake"}
		if res.BootHung {
			r.Why, r.Console = "the guest hung before /init reported", res.ConsoleTail(40)
		}
		reboots = append(reboots, r)
		cfg.progressf("%s while running %q; booting again (%d of at most %d) for the tests it did not finish",
			r.Why, res.Running, boot, flakeReboots)
	}
}

// diedOfTCGFlake reports whether res is a guest kernel that died, not timed
// out, with tcgFlake on its console, under TCG.
func diedOfTCGFlake(res *Result) bool {
	acc, _ := accel()
	return acc == "tcg" && !res.Done && !res.TimedOut && tcgFlake.MatchString(res.Console)
}

// endedTests returns the names of the tests in trs by package.
func endedTests(trs []TestResult) map[string][]string {
	m := map[string][]string{}
	for _, tr := range trs {
		m[tr.Package] = append(m[tr.Package], tr.Name)
	}
	return m
}

// oopsLines returns at most n lines of console from tcgFlake's first match.
func oopsLines(console string, n int) string {
	loc := tcgFlake.FindStringIndex(console)
	if loc == nil {
		return ""
	}
	start := strings.LastIndexByte(console[:loc[0]], '\n') + 1
	lines := strings.SplitN(console[start:], "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}
