package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/perf"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

// benchKernel boots kernel k once, runs the table there and writes its
// results-<k>.json and profile/<k>/.
func benchKernel(ctx context.Context, k *vm.Kernel, o options, command string) error {
	cfg := e2e.VMConfig()
	cfg.Kernel = k
	cfg.Packages = []string{"./e2e"}
	cfg.Run = "^TestGuestPerfVersusKernel$"
	cfg.Env = append(cfg.Env, "E2E_PERF_RUNTIME="+o.runtime.String(), "E2E_PERF_PROFILE="+o.profile)
	// 12 rows, 2 devices each, the profiled row again, fill and boot.
	cfg.TestTimeout = 26*o.runtime*2 + 10*time.Minute
	cfg.Timeout = cfg.TestTimeout + 5*time.Minute
	cfg.Progress = os.Stderr

	var loadWait string
	if o.maxLoad > 0 {
		loadWait = waitForLoad(ctx, o.maxLoad, o.loadWait, 10*time.Second, loadAverage1)
		fmt.Fprintf(os.Stderr, "bench: kernel %s: %s\n", k.Name(), loadWait)
	}
	host := &perf.Host{
		KernelName: k.Name(), KernelRole: k.Role,
		Date:   time.Now().UTC().Format(time.RFC3339),
		Commit: o.commit, Command: command, Accel: accel(), CPUs: runtime.NumCPU(),
		LoadBefore: loadAverage(), LoadWait: loadWait,
	}
	fmt.Fprintf(os.Stderr, "bench: kernel %s, host load average %s\n", k.Name(), host.LoadBefore)
	load := watchLoad(5 * time.Second)
	res, err := runVM(ctx, cfg, host)
	host.LoadPeak1 = load.stop()
	host.LoadAfter = loadAverage()
	fmt.Fprintf(os.Stderr, "bench: kernel %s done, host load average %s (1-min peak %.2f)\n", k.Name(), host.LoadAfter, host.LoadPeak1)
	if err != nil {
		return err
	}
	host.VMElapsed = res.Elapsed.Round(time.Second).String()
	if len(res.Tests) != 1 || res.Tests[0].Status != "PASS" {
		if len(res.Tests) == 1 {
			return fmt.Errorf("%s: %s", res.Tests[0].Name, res.Tests[0].Status)
		}
		return fmt.Errorf("the VM ran %d tests (done %v, timed out %v, after %v; boot: %s)\nQEMU: %s\nconsole (last 40 lines):\n%s",
			len(res.Tests), res.Done, res.TimedOut, res.Elapsed.Round(time.Second), strings.TrimSpace(res.Boot), strings.TrimSpace(res.QEMU), res.ConsoleTail(40))
	}
	rep, profiles, err := parseOutput(res.Tests[0].Output)
	if err != nil {
		return err
	}
	rep.Host = host
	if cpu := cpuAccounting(res.Tests[0].Output); cpu != "" {
		profiles["cpu-by-thread.txt"] = []byte(cpu)
	}
	if err := writeKernel(o.out, rep, profiles); err != nil {
		return err
	}
	fmt.Printf("%s%s\n", rep.Table(), perf.Provenance(rep))
	return nil
}

// bootAttempts bounds the boots of one kernel: a guest kernel that dies
// before the first test is booted again (the 6.12 guest under TCG on the
// loaded host stopped at boot twice in a row, once seen panicking after
// "Oops: int3" in sched_clock_cpu); a test that ran is never retried.
const bootAttempts = 3

// runVM runs cfg, booting again when the guest stopped before any test
// started, and counts such boots in host.BootsFailed.
func runVM(ctx context.Context, cfg vm.Config, host *perf.Host) (*vm.Result, error) {
	for attempt := 1; ; attempt++ {
		res, err := vm.Run(ctx, cfg)
		if err != nil || len(res.Tests) > 0 || res.TimedOut || ctx.Err() != nil || attempt == bootAttempts {
			return res, err
		}
		host.BootsFailed++
		fmt.Fprintf(os.Stderr, "bench: kernel %s stopped after %v before the first test (boot %d of at most %d); console:\n%s\n",
			host.KernelName, res.Elapsed.Round(time.Second), attempt, bootAttempts, res.ConsoleTail(15))
	}
}

// parseOutput finds the report and the profiles in the guest test's output.
func parseOutput(output string) (perf.Report, map[string][]byte, error) {
	var rep perf.Report
	found := false
	profiles := map[string][]byte{}
	for _, line := range strings.Split(output, "\n") {
		if i := strings.Index(line, perf.JSONPrefix); i >= 0 {
			if err := json.Unmarshal([]byte(line[i+len(perf.JSONPrefix):]), &rep); err != nil {
				return rep, nil, fmt.Errorf("report: %w", err)
			}
			found = true
		}
		if i := strings.Index(line, perf.ProfilePrefix); i >= 0 {
			// "<row ID> <kind>: <base64>"
			name, data, ok := strings.Cut(line[i+len(perf.ProfilePrefix):], ": ")
			if !ok || strings.ContainsAny(name, "/\\") {
				return rep, nil, fmt.Errorf("malformed profile line")
			}
			b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(data))
			if err != nil {
				return rep, nil, fmt.Errorf("profile %s: %w", name, err)
			}
			profiles[strings.ReplaceAll(name, " ", ".")] = b
		}
	}
	if !found {
		return rep, nil, fmt.Errorf("no %q line in the test output", strings.TrimSpace(perf.JSONPrefix))
	}
	return rep, profiles, nil
}

// cpuAccounting returns the test's "CPU time in the guest" blocks: each
// log line with that text and its indented continuation lines.
func cpuAccounting(output string) string {
	var b strings.Builder
	in := false
	for _, line := range strings.Split(output, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.Contains(line, "CPU time in the guest"):
			in = true
			_, msg, _ := strings.Cut(trimmed, ": ")
			b.WriteString(msg + "\n")
		case in && strings.HasPrefix(line, "        ") && !strings.Contains(trimmed, ".go:"):
			b.WriteString(trimmed + "\n")
		default:
			in = false
		}
	}
	return b.String()
}

// writeKernel writes one kernel's report and replaces its profile
// directory (a profile of another row must not stay next to it).
func writeKernel(out string, rep perf.Report, profiles map[string][]byte) error {
	name := rep.Name()
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(out, resultsFile(name)), append(js, '\n'), 0o644); err != nil {
		return err
	}
	dir := filepath.Join(out, "profile", name)
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for pname, b := range profiles {
		ext := ".pprof" // go tool pprof
		switch {
		case strings.HasSuffix(pname, ".trace"):
			ext = ".out" // go tool trace
		case strings.HasSuffix(pname, ".txt"):
			ext = ""
		}
		if err := os.WriteFile(filepath.Join(dir, pname+ext), b, 0o644); err != nil {
			return err
		}
	}
	for pname := range profiles {
		if !strings.HasSuffix(pname, ".cpu") {
			continue
		}
		path := filepath.Join(dir, pname+".pprof")
		top, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=40", path).Output()
		if err != nil {
			return fmt.Errorf("go tool pprof %s: %w", path, err)
		}
		if err := os.WriteFile(filepath.Join(dir, pname+".top.txt"), top, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func accel() string {
	if os.Getenv("E2E_ACCEL") == "kvm" {
		return "KVM"
	}
	return "TCG (no KVM)"
}

// gitCommit names the tree the bench ran: git describe, "-dirty" when it
// has changes not committed.
func gitCommit() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12").Output()
	if err != nil {
		return "unknown (git describe: " + err.Error() + ")"
	}
	return strings.TrimSpace(string(out))
}

// loadAverage is the host's 1, 5 and 15 minute load averages, as
// /proc/loadavg has them ("0.52 0.80 0.91").
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// loadAverage1 is the host's 1-minute load average (false if unknown).
func loadAverage1() (float64, bool) {
	one, _, _ := strings.Cut(loadAverage(), " ")
	v, err := strconv.ParseFloat(one, 64)
	return v, err == nil
}

// waitForLoad polls load every interval until it is at most max, for at
// most limit, and says what it waited (the report keeps it): other
// processes on the host take CPU from the guest under TCG.
func waitForLoad(ctx context.Context, max float64, limit, interval time.Duration, load func() (float64, bool)) string {
	start := time.Now()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		v, ok := load()
		waited := time.Since(start).Round(time.Second)
		if !ok {
			return "host load unknown: not waited for"
		}
		if v <= max {
			return fmt.Sprintf("waited %v for the 1-min load average to fall to %.2f (it was %.2f)", waited, max, v)
		}
		select {
		case <-ctx.Done():
			return fmt.Sprintf("stopped waiting after %v: %v", waited, ctx.Err())
		case <-deadline.C:
			return fmt.Sprintf("waited %v, the longest allowed, and booted with the 1-min load average at %.2f (above %.2f)", limit, v, max)
		case <-tick.C:
		}
	}
}

// loadWatch samples the host's 1-minute load average while the VM runs
// and keeps the highest.
type loadWatch struct {
	done chan struct{}
	wg   sync.WaitGroup
	mu   sync.Mutex
	peak float64
}

func watchLoad(every time.Duration) *loadWatch {
	w := &loadWatch{done: make(chan struct{})}
	w.sample()
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-w.done:
				return
			case <-tick.C:
				w.sample()
			}
		}
	}()
	return w
}

func (w *loadWatch) sample() {
	v, ok := loadAverage1()
	if !ok {
		return
	}
	w.mu.Lock()
	w.peak = max(w.peak, v)
	w.mu.Unlock()
}

// stop ends the sampling, joins the sampler and returns the peak.
func (w *loadWatch) stop() float64 {
	close(w.done)
	w.wg.Wait()
	w.sample()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.peak
}
