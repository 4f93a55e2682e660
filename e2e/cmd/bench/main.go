// Command bench is `make bench`: it boots the e2e VM (Debian's 6.12 kernel
// under QEMU), runs e2e.TestGuestPerfVersusKernel there — fio on
// /dev/ublkbN (ublk-nvmeof) and on /dev/nvmeXnY (the kernel's nvme-tcp
// initiator), both on one Linux nvmet-tcp target on a RAM disk, in the same
// boot — and writes what it measured under docs/perf:
//
//	results.json    the report (perf.Report)
//	results.md      the table with the ratio of every row, how it was made
//	ratio.svg       the ratios as bars against the 1.0 line
//	profile/        the daemon's CPU profile and execution trace during one
//	                workload (-profile), and `go tool pprof -top` of the former
package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/perf"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm"
)

func main() {
	out := flag.String("out", "docs/perf", "directory the results are written to")
	fioRuntime := flag.Duration("runtime", 10*time.Second, "fio runtime of each job")
	profile := flag.String("profile", "4k-randread-qd1", "workload whose 1-job ublk-nvmeof run is profiled (empty: none)")
	flag.Parse()
	if err := run(*out, *fioRuntime, *profile); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

func run(out string, fioRuntime time.Duration, profile string) error {
	if err := vm.Available(); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := e2e.VMConfig()
	cfg.Packages = []string{"./e2e"}
	cfg.Run = "^TestGuestPerfVersusKernel$"
	cfg.Env = append(cfg.Env, "E2E_PERF_RUNTIME="+fioRuntime.String(), "E2E_PERF_PROFILE="+profile)
	// 12 rows, 2 devices each, plus fill and boot.
	cfg.TestTimeout = 24*fioRuntime*2 + 10*time.Minute
	cfg.Timeout = cfg.TestTimeout + 5*time.Minute
	cfg.Progress = os.Stderr
	res, err := vm.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if len(res.Tests) != 1 || res.Tests[0].Status != "PASS" {
		if len(res.Tests) == 1 {
			return fmt.Errorf("%s: %s", res.Tests[0].Name, res.Tests[0].Status)
		}
		return fmt.Errorf("the VM ran %d tests (done %v, timed out %v)", len(res.Tests), res.Done, res.TimedOut)
	}
	rep, profiles, err := parseOutput(res.Tests[0].Output)
	if err != nil {
		return err
	}
	if cpu := cpuAccounting(res.Tests[0].Output); cpu != "" {
		profiles["cpu-by-thread.txt"] = []byte(cpu)
	}
	command := "make bench"
	if len(os.Args) > 1 {
		command = "go run ./e2e/cmd/bench " + strings.Join(os.Args[1:], " ")
	}
	return write(out, rep, profiles, command, res)
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
			// "<workload> <kind>: <base64>"
			name, data, ok := strings.Cut(line[i+len(perf.ProfilePrefix):], ": ")
			if !ok {
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

func write(out string, rep perf.Report, profiles map[string][]byte, command string, res *vm.Result) error {
	if err := os.MkdirAll(filepath.Join(out, "profile"), 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"results.json": append(js, '\n'),
		"ratio.svg":    []byte(rep.SVG()),
	}
	var md strings.Builder
	fmt.Fprintf(&md, "# ublk-nvmeof against the Linux nvme-tcp initiator\n\n")
	fmt.Fprintf(&md, "Made by `%s` on %s (generated: edit the command, not this file).\n\n", command, time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&md, "One VM boot: %s, QEMU %s, %d vCPUs on a host with %d CPUs; fio %s per job (libaio, O_DIRECT, clock_gettime).\n",
		rep.Kernel, accel(), rep.CPUs, runtime.NumCPU(), rep.Runtime)
	fmt.Fprintf(&md, "Both devices are connected to the same Linux nvmet-tcp target on /dev/ram0 over loopback in the guest: %s is ublk-nvmeof, %s the kernel's initiator. Ratio is ublk-nvmeof IOPS over the kernel's.\n\n",
		rep.UblkDevice, rep.KernelDevice)
	md.WriteString(rep.Table())
	md.WriteString("\n![ratios](ratio.svg)\n")
	if len(profiles) > 0 {
		md.WriteString("\nProfiles of the daemon during one workload are in [profile/](profile/) (`go tool pprof`, `go tool trace`).\n")
	}
	files["results.md"] = []byte(md.String())
	for name, b := range profiles {
		ext := ".pprof" // go tool pprof
		switch {
		case strings.HasSuffix(name, ".trace"):
			ext = ".out" // go tool trace
		case strings.HasSuffix(name, ".txt"):
			ext = ""
		}
		files[filepath.Join("profile", name+ext)] = b
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(out, name), b, 0o644); err != nil {
			return err
		}
	}
	for name := range profiles {
		if !strings.HasSuffix(name, ".cpu") {
			continue
		}
		path := filepath.Join(out, "profile", name+".pprof")
		top, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=40", path).Output()
		if err != nil {
			return fmt.Errorf("go tool pprof %s: %w", path, err)
		}
		if err := os.WriteFile(filepath.Join(out, "profile", name+".top.txt"), top, 0o644); err != nil {
			return err
		}
	}
	fmt.Printf("%s\nwritten to %s (VM ran %v)\n", rep.Table(), out, res.Elapsed.Round(time.Second))
	return nil
}

func accel() string {
	if os.Getenv("E2E_ACCEL") == "kvm" {
		return "KVM"
	}
	return "TCG (no KVM)"
}
