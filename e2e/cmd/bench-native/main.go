// Command bench-native is `make bench-native`: the nvmeof host library
// against SPDK's spdk_nvme_perf, both against SPDK's nvmf_tgt, and
// spdk_nvme_perf against `ublk-nvmeof serve` against nvmf_tgt, on this
// machine (no VM): the target pinned to CPU 0, each initiator to CPU 1.
// It writes docs/perf/native.md (the table with ratios, the commands, the
// load) and, for the library's worst row, a CPU profile under
// docs/perf/native-profile/.
//
// SPDK comes from the cache e2e/spdk/build.sh fills (SPDK_CACHE, default
// ~/.cache/ublk-nvmeof/spdk/v24.01); without it the command says what is
// missing and exits 2.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/native"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/spdk"
)

// Ports and names of this bench (4540-4559; the SPDK interop tests use
// 4520-4539).
const (
	tgtPort   = 4540
	servePort = 4541
	nqn       = "nqn.2016-06.io.spdk:bench-native"
	// The namespace: 256 MiB of memory in 4 KiB blocks on both targets.
	nsMiB     = 256
	blockSize = 4096
	// CPUs: the target alone on targetCPU, the initiator alone on
	// hostCPU.
	targetCPU = 0
	hostCPU   = 1
)

func main() {
	out := flag.String("out", "docs/perf", "directory native.md and native-profile/ are written to")
	runtimeFlag := flag.Duration("t", 5*time.Second, "run time of each run (whole seconds)")
	reps := flag.Int("reps", 3, "runs of each row and tool; the best is kept (the machine is shared)")
	only := flag.String("rows", "", "only the rows whose name contains this (e.g. 4k-randread); default all")
	noProfile := flag.Bool("no-profile", false, "skip the CPU profile of the worst row")
	flag.Parse()
	err := run(*out, *runtimeFlag, *reps, *only, !*noProfile)
	switch {
	case errors.Is(err, spdk.ErrNoBuild):
		fmt.Fprintf(os.Stderr, "bench-native: %v\n", err)
		os.Exit(2)
	case err != nil:
		fmt.Fprintf(os.Stderr, "bench-native: %v\n", err)
		os.Exit(1)
	}
}

func run(out string, d time.Duration, reps int, only string, profile bool) error {
	if d < time.Second || d%time.Second != 0 {
		return fmt.Errorf("-t %v: whole seconds, at least 1 (spdk_nvme_perf's -t)", d)
	}
	if reps < 1 || reps > 20 {
		return fmt.Errorf("-reps %d: 1 to 20", reps)
	}
	spdk, err := findSPDK()
	if err != nil {
		return err
	}
	if runtime.NumCPU() < 2 {
		return fmt.Errorf("%d CPU: the bench pins the target and the initiator to CPUs %d and %d", runtime.NumCPU(), targetCPU, hostCPU)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	work, err := os.MkdirTemp("", "bench-native-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	b := &bench{spdk: spdk, work: work, d: d, reps: reps}
	if err := b.buildGo(ctx); err != nil {
		return err
	}
	var rows []native.Workload
	for _, w := range native.Rows(d) {
		if strings.Contains(w.Name(), only) {
			rows = append(rows, w)
		}
	}
	if len(rows) == 0 {
		return fmt.Errorf("-rows %q matches no row", only)
	}
	rep := &native.Report{Date: time.Now(), Commit: gitCommit(), Machine: machine(), SPDK: spdk.describe(), LoadBefore: loadavg()}
	results := make([]native.Row, len(rows))
	for i, w := range rows {
		results[i].Workload = w
	}
	if err := b.hostSide(ctx, results, rep); err != nil {
		return err
	}
	if err := b.targetSide(ctx, results, rep); err != nil {
		return err
	}
	rep.LoadAfter = loadavg()
	rep.Rows = results
	if profile {
		if err := b.profileWorst(ctx, results, rep, out); err != nil {
			return err
		}
	}
	rep.Notes = append(rep.Notes,
		fmt.Sprintf("Each tool ran each row %d times for %v, round by round over all rows (so one row's runs are minutes apart), spdk_nvme_perf and the library in turn; the table keeps each tool's best run. spdk_nvme_perf's start (DPDK init, connect) is outside its window, the library's connect outside its own.", reps, d),
		b.disturbedNote(),
		"-q is the depth in all: spdk_nvme_perf sends each submission to the next of its -P queue pairs (nvme_submit_io), the library keeps -q/-P slots on each queue (a depth below -P alternates), resubmitting from each completion.",
		"nvmf_tgt and spdk_nvme_perf run without hugepages (--no-huge), as this machine has none configured.")
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	md := filepath.Join(out, "native.md")
	if err := os.WriteFile(md, []byte(rep.Markdown()), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "bench-native: wrote %s\n", md)
	return nil
}

// bench holds what every step needs.
type bench struct {
	spdk spdkBuild
	work string // temporary: binaries, logs, the RPC socket
	d    time.Duration
	reps int
	// Runs started while another SPDK process (not this bench's) was
	// running on the machine, and their names.
	runs, disturbed int
	foreign         map[string]bool
	// Runs that failed and were tried again.
	retries int
	// The binaries built from this tree.
	perfBin, serveBin string
}

func (b *bench) buildGo(ctx context.Context) error {
	b.perfBin = filepath.Join(b.work, "nvmeof-perf")
	b.serveBin = filepath.Join(b.work, "ublk-nvmeof")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", b.work, "./e2e/cmd/nvmeof-perf", "./cmd/ublk-nvmeof")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build: %w", err)
	}
	return nil
}

// hostSide runs spdk_nvme_perf and the library against one nvmf_tgt:
// reps rounds over all rows.
func (b *bench) hostSide(ctx context.Context, rows []native.Row, rep *native.Report) error {
	tgt, err := b.startNvmfTgt(ctx, rep)
	if err != nil {
		return err
	}
	defer tgt.stop()
	for round := range b.reps {
		for i := range rows {
			r := &rows[i]
			w := r.Workload
			b.checkForeign(tgt.cmd.Process.Pid)
			t, cpu, err := b.spdkPerf(ctx, w, tgtPort, rep, round == 0 && i == 0)
			if err != nil {
				return err
			}
			if native.Keep(&r.SPDKRuns, t.IOPS) {
				r.SPDK, r.SPDKCPU = t, cpu
			}
			b.checkForeign(tgt.cmd.Process.Pid)
			h, err := b.library(ctx, w, tgtPort, "", rep, round == 0 && i == 0)
			if err != nil {
				return err
			}
			if native.Keep(&r.HostRuns, h.IOPS()) {
				r.Host = h
			}
			fmt.Fprintf(os.Stderr, "bench-native: round %d %s: library %.0f IOPS (%.2f µs CPU/IO), spdk_nvme_perf %.0f IOPS (%.2f µs CPU/IO)\n",
				round+1, w.Name(), h.IOPS(), float64(h.CPUPerIO())/1e3, t.IOPS, float64(cpu)/1e3/(t.IOPS*w.Duration.Seconds()))
		}
		if err := tgt.err(); err != nil {
			return err
		}
	}
	return nil
}

// targetSide runs spdk_nvme_perf against serve: reps rounds over all rows.
func (b *bench) targetSide(ctx context.Context, rows []native.Row, rep *native.Report) error {
	srv, err := b.startServe(ctx, rep)
	if err != nil {
		return err
	}
	defer srv.stop()
	pid := srv.cmd.Process.Pid
	for round := range b.reps {
		for i := range rows {
			r := &rows[i]
			w := r.Workload
			before, err := processCPU(pid)
			if err != nil {
				return err
			}
			b.checkForeign(pid)
			t, _, err := b.spdkPerf(ctx, w, servePort, rep, false)
			if err != nil {
				return err
			}
			after, err := processCPU(pid)
			if err != nil {
				return err
			}
			if native.Keep(&r.ServeRuns, t.IOPS) {
				r.Serve, r.ServeCPU = t, after-before
			}
			fmt.Fprintf(os.Stderr, "bench-native: round %d %s: spdk_nvme_perf -> serve %.0f IOPS\n", round+1, w.Name(), t.IOPS)
		}
		if err := srv.err(); err != nil {
			return err
		}
	}
	return nil
}

// quietWait is how long a run waits for another SPDK process to exit.
const quietWait = 20 * time.Second

// spdkComms are the process names of SPDK's applications.
var spdkComms = map[string]bool{"nvmf_tgt": true, "spdk_tgt": true, "spdk_nvme_perf": true, "spdk_nvme_ident": true, "spdk_nvme_disco": true, "reactor_0": true, "reactor_1": true}

// checkForeign counts a run, and a disturbed one if an SPDK process other
// than own runs now: its reactor polls a core, as ours do, on a machine
// with two.
func (b *bench) checkForeign(own int) {
	b.runs++
	// Give another SPDK process up to quietWait to finish first.
	seen := foreignSPDK(own)
	for deadline := time.Now().Add(quietWait); len(seen) > 0 && time.Now().Before(deadline); seen = foreignSPDK(own) {
		time.Sleep(time.Second)
	}
	if len(seen) == 0 {
		return
	}
	b.disturbed++
	if b.foreign == nil {
		b.foreign = map[string]bool{}
	}
	for _, s := range seen {
		b.foreign[s] = true
	}
}

func (b *bench) disturbedNote() string {
	if b.disturbed == 0 {
		return fmt.Sprintf("No other SPDK process was running when any of the %d runs started (each waited up to %v for one to exit); %d failed runs were tried again.", b.runs, quietWait, b.retries)
	}
	var names []string
	for n := range b.foreign {
		names = append(names, n)
	}
	slices.Sort(names)
	return fmt.Sprintf("%d of the %d runs started while another SPDK process, polling a core of this 2-CPU machine, was running (%s; each run waited up to %v for it to exit): those runs are disturbed beyond the load average. %d failed runs (a connect timing out) were tried again.",
		b.disturbed, b.runs, strings.Join(names, ", "), quietWait, b.retries)
}

// foreignSPDK lists "name[pid]" of the SPDK processes running now, but
// own.
func foreignSPDK(own int) []string {
	dirs, _ := os.ReadDir("/proc")
	var seen []string
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid == own {
			continue
		}
		comm, err := os.ReadFile(filepath.Join("/proc", d.Name(), "comm"))
		if err != nil {
			continue
		}
		if name := strings.TrimSpace(string(comm)); spdkComms[name] {
			seen = append(seen, fmt.Sprintf("%s[%d]", name, pid))
		}
	}
	return seen
}

// profileWorst runs the library's worst row again with a CPU profile and
// writes it, and `go tool pprof -top` of it, under out/native-profile.
func (b *bench) profileWorst(ctx context.Context, rows []native.Row, rep *native.Report, out string) error {
	worst := native.Worst(rows)
	if worst < 0 {
		return nil
	}
	w := rows[worst].Workload
	dir := filepath.Join(out, "native-profile")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	prof := filepath.Join(dir, w.Name()+".pprof")
	tgt, err := b.startNvmfTgt(ctx, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "bench-native: %s: profiling the library\n", w.Name())
	_, err = b.library(ctx, w, tgtPort, prof, rep, false)
	tgt.stop()
	if err != nil {
		return err
	}
	top, err := exec.CommandContext(ctx, "go", "tool", "pprof", "-top", "-nodecount=40", b.perfBin, prof).Output()
	if err != nil {
		return fmt.Errorf("go tool pprof: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, w.Name()+".top.txt"), top, 0o644); err != nil {
		return err
	}
	rep.Profile, rep.ProfileTop = w.Name(), string(top)
	rep.Commands = append(rep.Commands, fmt.Sprintf("go tool pprof -top -nodecount=40 nvmeof-perf %s", prof))
	return nil
}

// spdkPerf runs spdk_nvme_perf, up to three times when it fails: on this
// loaded machine its Fabrics Connect can time out.
func (b *bench) spdkPerf(ctx context.Context, w native.Workload, port int, rep *native.Report, record bool) (native.PerfTotal, time.Duration, error) {
	var err error
	for try := 1; try <= attempts; try++ {
		var t native.PerfTotal
		var cpu time.Duration
		if t, cpu, err = b.spdkPerfOnce(ctx, w, port, rep, record && try == 1); err == nil || ctx.Err() != nil {
			return t, cpu, err
		}
		b.retries++
		fmt.Fprintf(os.Stderr, "bench-native: %s: spdk_nvme_perf failed (try %d of %d): %v\n", w.Name(), try, attempts, firstLine(err))
	}
	return native.PerfTotal{}, 0, err
}

// attempts is how often a run is tried before the bench gives up.
const attempts = 3

func firstLine(err error) string {
	line, _, _ := strings.Cut(err.Error(), "\n")
	return line
}

// spdkPerfOnce runs spdk_nvme_perf on hostCPU against port. cpu is its CPU
// time from the line that says its workers launch to its exit.
func (b *bench) spdkPerfOnce(ctx context.Context, w native.Workload, port int, rep *native.Report, record bool) (_ native.PerfTotal, cpu time.Duration, _ error) {
	args := append(native.PerfArgs(w, native.PerfTarget{Addr: "127.0.0.1", Port: port, NQN: nqn}, fmt.Sprintf("%#x", 1<<hostCPU)),
		"--no-huge", "-s", "512")
	if record {
		rep.Commands = append(rep.Commands, "stdbuf -oL "+shellLine(b.spdk.perf, args))
	}
	// Line-buffered, so the launch line arrives when it is printed (into a
	// pipe, stdio would hold it until exit).
	cmd := exec.CommandContext(ctx, "stdbuf", append([]string{"-oL", b.spdk.perf}, args...)...)
	var out strings.Builder
	cmd.Stderr = &out
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return native.PerfTotal{}, 0, err
	}
	if err := cmd.Start(); err != nil {
		return native.PerfTotal{}, 0, fmt.Errorf("spdk_nvme_perf: %w", err)
	}
	var launched time.Duration
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		line := sc.Text()
		out.WriteString(line + "\n")
		if strings.Contains(line, "Launching workers") {
			launched, _ = processCPU(cmd.Process.Pid)
		}
	}
	if err := cmd.Wait(); err != nil {
		return native.PerfTotal{}, 0, fmt.Errorf("spdk_nvme_perf %s: %w\n%s", w.Name(), err, tail([]byte(out.String())))
	}
	t, err := native.ParsePerfTotal(out.String())
	if err != nil {
		return t, 0, fmt.Errorf("%s: %w\n%s", w.Name(), err, tail([]byte(out.String())))
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok && launched > 0 {
		cpu = time.Duration(ru.Utime.Nano()+ru.Stime.Nano()) - launched
	}
	return t, max(cpu, 0), nil
}

// libraryOutput is nvmeof-perf's JSON line.
type libraryOutput struct {
	IOs       uint64 `json:"ios"`
	ElapsedNs int64  `json:"elapsed_ns"`
	CPUNs     int64  `json:"cpu_ns"`
}

// library runs nvmeof-perf, up to three times when it fails (a connect
// timing out on this loaded machine).
func (b *bench) library(ctx context.Context, w native.Workload, port int, profile string, rep *native.Report, record bool) (native.Result, error) {
	var err error
	for try := 1; try <= attempts; try++ {
		var r native.Result
		if r, err = b.libraryOnce(ctx, w, port, profile, rep, record && try == 1); err == nil || ctx.Err() != nil {
			return r, err
		}
		b.retries++
		fmt.Fprintf(os.Stderr, "bench-native: %s: nvmeof-perf failed (try %d of %d): %v\n", w.Name(), try, attempts, firstLine(err))
	}
	return native.Result{}, err
}

// libraryOnce runs nvmeof-perf on hostCPU (taskset, GOMAXPROCS=1) against
// port.
func (b *bench) libraryOnce(ctx context.Context, w native.Workload, port int, profile string, rep *native.Report, record bool) (native.Result, error) {
	args := []string{"-c", strconv.Itoa(hostCPU), b.perfBin, "-addr", fmt.Sprintf("127.0.0.1:%d", port), "-nqn", nqn,
		"-q", strconv.Itoa(w.QueueDepth), "-o", strconv.Itoa(w.IOSize), "-w", w.Pattern, "-t", w.Duration.String(), "-P", strconv.Itoa(w.Queues)}
	if profile != "" {
		args = append(args, "-cpuprofile", profile)
	}
	if record {
		rep.Commands = append(rep.Commands, "GOMAXPROCS=1 "+shellLine("taskset", args))
	}
	cmd := exec.CommandContext(ctx, "taskset", args...)
	cmd.Env = append(os.Environ(), "GOMAXPROCS=1")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return native.Result{}, fmt.Errorf("nvmeof-perf %s: %w\n%s", w.Name(), err, stderr.String())
	}
	var o libraryOutput
	if err := json.Unmarshal(out, &o); err != nil || o.ElapsedNs <= 0 {
		return native.Result{}, fmt.Errorf("nvmeof-perf %s printed %q: %v", w.Name(), out, err)
	}
	return native.Result{IOs: o.IOs, Elapsed: time.Duration(o.ElapsedNs), CPU: time.Duration(o.CPUNs), IOSize: w.IOSize}, nil
}

// daemon is a target process this bench started.
type daemon struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
	werr   error
	log    string
}

func (d *daemon) start() error {
	if err := d.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", d.name, err)
	}
	d.exited = make(chan struct{})
	go func() {
		d.werr = d.cmd.Wait()
		close(d.exited)
	}()
	return nil
}

// err reports a daemon that exited before it was stopped.
func (d *daemon) err() error {
	select {
	case <-d.exited:
		return fmt.Errorf("%s exited during the bench: %v; its log %s:\n%s", d.name, d.werr, d.log, readTail(d.log))
	default:
		return nil
	}
}

// stop asks the daemon to exit (SIGINT) and waits; SIGKILL after 10 s.
func (d *daemon) stop() {
	d.cmd.Process.Signal(os.Interrupt)
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.exited
	}
}

// startNvmfTgt starts nvmf_tgt on targetCPU and configures it through
// rpc.py: TCP transport, a malloc bdev, the subsystem, its namespace and
// listener.
func (b *bench) startNvmfTgt(ctx context.Context, rep *native.Report) (*daemon, error) {
	sock := filepath.Join(b.work, "nvmf_tgt.sock")
	args := []string{"--no-huge", "-s", "1024", "-u", "-m", fmt.Sprintf("%#x", 1<<targetCPU), "-r", sock}
	d, err := b.daemon(ctx, "nvmf_tgt", b.spdk.nvmfTgt, args, nil)
	if err != nil {
		return nil, err
	}
	rpcs := [][]string{
		{"nvmf_create_transport", "-t", "TCP"},
		{"bdev_malloc_create", "-b", "Malloc0", strconv.Itoa(nsMiB), strconv.Itoa(blockSize)},
		{"nvmf_create_subsystem", nqn, "-a", "-s", "BENCHNATIVE0001"},
		{"nvmf_subsystem_add_ns", nqn, "Malloc0"},
		{"nvmf_subsystem_add_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", strconv.Itoa(tgtPort)},
	}
	if rep != nil {
		rep.Commands = append(rep.Commands, shellLine(b.spdk.nvmfTgt, args))
	}
	if err := b.waitRPC(ctx, d, sock); err != nil {
		d.stop()
		return nil, err
	}
	for _, r := range rpcs {
		full := append([]string{b.spdk.rpc, "-s", sock}, r...)
		if rep != nil {
			rep.Commands = append(rep.Commands, shellLine("python3", full))
		}
		if out, err := exec.CommandContext(ctx, "python3", full...).CombinedOutput(); err != nil {
			d.stop()
			return nil, fmt.Errorf("rpc.py %s: %w\n%s", r[0], err, out)
		}
	}
	return d, nil
}

// waitRPC waits until nvmf_tgt answers on its RPC socket (its
// subsystems initialized), at most 60 s.
func (b *bench) waitRPC(ctx context.Context, d *daemon, sock string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := exec.CommandContext(ctx, "python3", b.spdk.rpc, "-s", sock, "-t", "5", "framework_wait_init").Run()
		if err == nil {
			return nil
		}
		if err := d.err(); err != nil {
			return err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("nvmf_tgt did not answer on %s within 60 s; its log %s:\n%s", sock, d.log, readTail(d.log))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// startServe starts `ublk-nvmeof serve` on targetCPU with GOMAXPROCS=1 and
// waits for its "serving" line.
func (b *bench) startServe(ctx context.Context, rep *native.Report) (*daemon, error) {
	args := []string{"-c", strconv.Itoa(targetCPU), b.serveBin, "serve", "--listen", fmt.Sprintf("127.0.0.1:%d", servePort),
		"--nqn", nqn, "--size", fmt.Sprintf("%dM", nsMiB), "--block-size", strconv.Itoa(blockSize)}
	rep.Commands = append(rep.Commands, "GOMAXPROCS=1 "+shellLine("taskset", args))
	d, err := b.daemon(ctx, "serve", "taskset", args, []string{"GOMAXPROCS=1"})
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if data, _ := os.ReadFile(d.log); strings.Contains(string(data), "serving "+nqn) {
			return d, nil
		}
		if err := d.err(); err != nil {
			return nil, err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			d.stop()
			return nil, fmt.Errorf("serve did not start within 30 s; its log %s:\n%s", d.log, readTail(d.log))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// daemon starts a target with its output in a log file under work.
func (b *bench) daemon(ctx context.Context, name, path string, args, env []string) (*daemon, error) {
	log := filepath.Join(b.work, name+".log")
	f, err := os.Create(log)
	if err != nil {
		return nil, err
	}
	defer f.Close() // the child holds its own descriptor
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	d := &daemon{name: name, cmd: cmd, log: log}
	if err := d.start(); err != nil {
		return nil, err
	}
	return d, nil
}

// processCPU is a process's utime+stime from /proc/PID/stat (fields 14
// and 15, in clock ticks; 100 per second on Linux).
func processCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(data))
}

// parseStatCPU reads utime and stime from a /proc/PID/stat line. The
// command name (field 2) may hold spaces and parentheses: the fields
// after it start after its last ')'.
func parseStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc stat %q: no command name", stat)
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state): utime is field 14, f[11]; stime f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat has %d fields after the name, want at least 13", len(f))
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 {
			return 0, fmt.Errorf("/proc stat: %q is not a tick count", s)
		}
		ticks += n
	}
	const clockTicks = 100 // USER_HZ
	return time.Duration(ticks) * (time.Second / clockTicks), nil
}

func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown: " + err.Error()
	}
	return strings.TrimSpace(string(data))
}

func gitCommit() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

// machine is the CPU model, its count and the kernel.
func machine() string {
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var uts syscall.Utsname
	kernel := "unknown kernel"
	if syscall.Uname(&uts) == nil {
		var b []byte
		for _, c := range uts.Release {
			if c == 0 {
				break
			}
			b = append(b, byte(c))
		}
		kernel = "Linux " + string(b)
	}
	return fmt.Sprintf("%s, %d CPUs, %s, %s", model, runtime.NumCPU(), kernel, runtime.Version())
}

// shellLine quotes args for the report.
func shellLine(name string, args []string) string {
	parts := []string{name}
	for _, a := range args {
		if strings.ContainsAny(a, " \t'\"$") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

func tail(b []byte) string {
	const n = 2000
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

func readTail(path string) string {
	data, _ := os.ReadFile(path)
	return tail(data)
}
