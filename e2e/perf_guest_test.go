package e2e

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/perf"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// TestGuestPerfVersusKernel measures fio on /dev/ublkbN (ublk-nvmeof) and on
// /dev/nvmeXnY (the kernel's nvme-tcp initiator), both connected to the same
// Linux nvmet-tcp target on a RAM disk in this boot, and prints a table with
// the ratio of each row. It asserts only that fio ran and verified nothing
// failed; the numbers are for reading (make bench writes them to docs/).
// E2E_PERF_RUNTIME sets each job's runtime (default 2s: CI's short mode).
func TestGuestPerfVersusKernel(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	runtime := 2 * time.Second
	if v := os.Getenv("E2E_PERF_RUNTIME"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("E2E_PERF_RUNTIME: %v", err)
		}
		runtime = d
	}

	const nqn = "nqn.2026-11.io.ublk-nvmeof:perf"
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: nqn, Device: "/dev/ram0", Port: 4450, PortID: 7})
	kc, err := guest.ConnectKernel(tg, "nr_io_queues=2")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := kc.Disconnect(); err != nil {
			t.Error(err)
		}
	}()
	kernelDev := kc.NamespaceDevice(1)

	// E2E_PERF_PROFILE names a row whose ublk run is repeated with the
	// daemon profiled (net/http/pprof on --pprof-addr): "slowest" (the
	// lowest ratio in this boot's table) or a row ID such as
	// 4k-randread-qd1-j1. Unset: none (CI's short mode).
	profile := os.Getenv("E2E_PERF_PROFILE")
	if profile != "" && profile != perf.ProfileSlowest {
		if _, _, err := perf.ParseRowID(profile); err != nil {
			t.Fatalf("E2E_PERF_PROFILE: %v", err)
		}
	}
	args := []string{"--log-level", "warn", "attach", "-a", "127.0.0.1", "-s", "4450", "-n", nqn, "-i", "2"}
	if profile != "" {
		args = append(args, "--pprof-addr", pprofAddr)
	}
	daemon := startAttached(t, args...)
	defer daemon.stop(t)
	ublkDev := daemon.Device
	floorDev := floorDevice(t)
	// Fill the RAM disk once, so reads of both devices read data.
	if out, err := exec.Command("fio", "--name=fill", "--filename="+kernelDev, "--direct=1", "--rw=write", "--bs=1M",
		"--size=48M", "--ioengine=psync").CombinedOutput(); err != nil {
		t.Fatalf("fill: %v\n%s", err, out)
	}

	var rows []perf.Row
	for _, jobs := range []int{1, 2} {
		for _, w := range perf.Workloads {
			row := perf.Row{Workload: w, Jobs: jobs}
			// Alternate which device goes first, so neither always runs on
			// a warmer (or more fragmented) machine.
			order := []string{"kernel", "ublk"}
			if len(rows)%2 == 1 {
				order = []string{"ublk", "kernel"}
			}
			for _, which := range append(order, "floor") {
				dev := map[string]string{"kernel": kernelDev, "ublk": ublkDev, "floor": floorDev}[which]
				res, err := runFio(dev, w, jobs, runtime)
				if err != nil {
					t.Fatalf("%s on %s: %v\ndaemon log:\n%s", w.Name, dev, err, daemon.Logs())
				}
				switch which {
				case "ublk":
					row.Ublk = res
				case "floor":
					row.Floor = &res
				default:
					row.Kernel = res
				}
			}
			rows = append(rows, row)
		}
	}
	rep := perf.Report{
		Runtime: runtime.String(), Kernel: kernelRelease(), CPUs: cpus(),
		KernelDevice: kernelDev, UblkDevice: ublkDev, FloorDevice: floorDev, Rows: rows,
	}
	if profile != "" {
		rep.Profiled = profileRow(t, profile, rows, kernelDev, daemon, runtime)
	}
	t.Logf("\n%s", rep.Table())
	js, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	// The host-side bench command finds the results by this prefix.
	t.Logf("%s%s", perf.JSONPrefix, js)
}

// floorDevice creates the table's floor device, removed when the test
// ends: a ublk device served in this process by ublk.NullBackend (every
// request completes at once), with two queues as the daemon has. fio
// on it measures the ublk round trip alone.
func floorDevice(t *testing.T) string {
	c, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	d, err := c.Create(context.Background(), ublk.Options{ID: ublk.AutoID, Queues: 2, Depth: 128, Params: ublk.Params{Size: 64 << 20}}, ublk.NullBackend{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	return d.BlockDevice()
}

// profileRow runs the row a profile spec names once more on each device,
// outside the table (profiling slows the daemon down): it logs the guest's
// CPU time by thread for both, and the daemon's CPU profile and execution
// trace, and returns the row's ID.
func profileRow(t *testing.T, spec string, rows []perf.Row, kernelDev string, daemon *attached, runtime time.Duration) string {
	w, jobs, err := perf.ParseRowID(spec)
	if spec == perf.ProfileSlowest {
		slow, ok := perf.Slowest(rows)
		if !ok {
			t.Fatal("no row to profile")
		}
		w, jobs, err = slow.Workload, slow.Jobs, nil
	}
	if err != nil {
		t.Fatal(err)
	}
	id := perf.Row{Workload: w, Jobs: jobs}.ID()
	for _, which := range []string{"kernel", "ublk"} {
		dev := kernelDev
		var prof *profiler
		if which == "ublk" {
			dev = daemon.Device
			prof = startProfiles(runtime)
		}
		before, sysBefore := threadTimes(), sysTimes()
		res, err := runFio(dev, w, jobs, runtime)
		after, sysAfter := threadTimes(), sysTimes()
		if prof != nil {
			prof.report(t, id)
		}
		if err != nil {
			t.Fatalf("profiled %s on %s: %v\ndaemon log:\n%s", id, dev, err, daemon.Logs())
		}
		how := "not profiled"
		if prof != nil {
			how = "profiled"
		}
		t.Logf("CPU time in the guest during %s on %s (%s, %.0f IOPS, %s; threads that exited, such as fio's, are not listed):\n%s\n  %s",
			id, which, dev, res.IOPS, how, cpuReport(before, after, 12), sysDelta(sysBefore, sysAfter))
	}
	return id
}

// pprofAddr is where the daemon serves /debug/pprof when profiled.
const pprofAddr = "127.0.0.1:9464"

// profiler fetches a CPU profile and an execution trace from the daemon
// while fio runs.
type profiler struct {
	wg    sync.WaitGroup
	names []string
	data  [][]byte
	errs  []error
}

func startProfiles(runtime time.Duration) *profiler {
	secs := max(int(runtime.Seconds())-1, 1)
	p := &profiler{names: []string{"cpu", "trace"}}
	urls := []string{
		fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", pprofAddr, secs),
		fmt.Sprintf("http://%s/debug/pprof/trace?seconds=%d", pprofAddr, min(secs, 1)),
	}
	p.data, p.errs = make([][]byte, len(urls)), make([]error, len(urls))
	for i, u := range urls {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			time.Sleep(500 * time.Millisecond) // past fio's start-up
			resp, err := http.Get(u)
			if err != nil {
				p.errs[i] = err
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				p.errs[i] = fmt.Errorf("%s: %s", u, resp.Status)
				return
			}
			p.data[i], p.errs[i] = io.ReadAll(resp.Body)
		}()
	}
	return p
}

// report waits for the profiles and prints each, base64, on a line the
// host-side bench command extracts: PERF-PROFILE <workload> <kind>: ...
func (p *profiler) report(t *testing.T, workload string) {
	p.wg.Wait()
	for i, name := range p.names {
		if p.errs[i] != nil {
			t.Errorf("%s profile: %v", name, p.errs[i])
			continue
		}
		t.Logf("%s%s %s: %s", perf.ProfilePrefix, workload, name, base64.StdEncoding.EncodeToString(p.data[i]))
	}
}

// threadKey names a thread of the guest: /proc/PID/task/TID.
type threadKey struct{ pid, tid int }

type threadCPU struct {
	comm  string
	ticks uint64 // utime+stime, in clock ticks
}

// threadTimes reads the CPU time of every thread in the guest, kernel
// threads included (kworkers, softirq).
func threadTimes() map[threadKey]threadCPU {
	m := map[threadKey]threadCPU{}
	pids, _ := filepath.Glob("/proc/[0-9]*/task/[0-9]*/stat")
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ... field 14 utime, 15 stime
		s := string(b)
		open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || close < open {
			continue
		}
		f := strings.Fields(s[close+1:])
		if len(f) < 13 {
			continue
		}
		ut, _ := strconv.ParseUint(f[11], 10, 64)
		st, _ := strconv.ParseUint(f[12], 10, 64)
		var k threadKey
		fmt.Sscanf(p, "/proc/%d/task/%d/stat", &k.pid, &k.tid)
		m[k] = threadCPU{comm: s[open+1 : close], ticks: ut + st}
	}
	return m
}

// cpuReport lists the n threads that used the most CPU between two
// snapshots, and the total.
func cpuReport(before, after map[threadKey]threadCPU, n int) string {
	type row struct {
		k     threadKey
		comm  string
		ticks uint64
	}
	var rows []row
	var total uint64
	for k, a := range after {
		d := a.ticks - before[k].ticks
		if d > 0 {
			rows = append(rows, row{k, a.comm, d})
			total += d
		}
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].ticks > rows[j].ticks })
	var b strings.Builder
	const hz = 100 // USER_HZ
	for i, r := range rows {
		if i == n {
			break
		}
		fmt.Fprintf(&b, "  %6.2fs %5.1f%%  %s (pid %d tid %d)\n", float64(r.ticks)/hz, 100*float64(r.ticks)/float64(total), r.comm, r.k.pid, r.k.tid)
	}
	fmt.Fprintf(&b, "  %6.2fs total", float64(total)/hz)
	return b.String()
}

// sysTimes is the first line of /proc/stat: user nice system idle iowait
// irq softirq steal, in clock ticks.
func sysTimes() []uint64 {
	b, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(b), "\n")
	var v []uint64
	for _, f := range strings.Fields(line)[1:] {
		n, _ := strconv.ParseUint(f, 10, 64)
		v = append(v, n)
	}
	return v
}

func sysDelta(a, b []uint64) string {
	names := []string{"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}
	var parts []string
	for i, n := range names {
		if i < len(a) && i < len(b) {
			parts = append(parts, fmt.Sprintf("%s %.2fs", n, float64(b[i]-a[i])/100))
		}
	}
	return "all CPUs: " + strings.Join(parts, ", ")
}

// runFio runs one fio job and returns what it measured.
func runFio(dev string, w perf.Workload, jobs int, runtime time.Duration) (perf.Result, error) {
	args := []string{
		"--name=" + w.Name, "--filename=" + dev, "--direct=1", "--ioengine=libaio",
		"--rw=" + w.RW, "--bs=" + strconv.Itoa(w.BlockSize), "--iodepth=" + strconv.Itoa(w.QueueDepth),
		"--numjobs=" + strconv.Itoa(jobs), "--size=32M", "--time_based", "--runtime=" + fmt.Sprint(int(runtime.Seconds())),
		"--ramp_time=0", "--group_reporting", "--output-format=json",
		// The TSC fio would calibrate against is not to be trusted
		// under TCG: measure with the kernel's clock.
		"--clocksource=clock_gettime",
	}
	if strings.HasPrefix(w.RW, "rand") {
		args = append(args, "--randrepeat=0", "--norandommap")
	}
	out, err := exec.Command("fio", args...).Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		return perf.Result{}, fmt.Errorf("fio: %v\n%s%s", err, out, stderr)
	}
	return perf.ParseFio(out)
}

func kernelRelease() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

func cpus() int {
	b, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(b), "processor\t:")
}
