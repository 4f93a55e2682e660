// Package vm boots one of Debian's kernels (6.12, the floor, or the newest of
// trixie-backports: see KernelRoles) under QEMU and runs this module's guest
// tests (TestGuest*, see package e2e/guest) inside it as root, with
// ublk_drv, nvme-tcp, nvmet-tcp, brd and friends loaded.
//
// One Run: build each selected package's test binary and the VM's /init
// (CGO_ENABLED=0), pack them with busybox and the kernel modules into an
// initramfs, boot QEMU under a deadline, and collect one result per guest
// test from the VM's second serial port. /init fails a test during which the
// kernel logged a WARNING, BUG, Oops, hung task or sanitizer report. A VM
// that crashes or hangs fails the test it was running, with the console log;
// RunRebooting (what RunT uses) boots again after the one death that is
// TCG's, not the code's (see tcgFlake).
//
// The kernel comes from prepare-vm.sh (apt-get download into a cache outside
// the repository); Available says why a Run cannot happen on this machine.
package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm/internal/guestproto"
)

// Config says what to run in the VM.
type Config struct {
	// Kernel is the kernel the VM boots. Default: FindKernel(KernelLTS).
	Kernel *Kernel
	// Packages are `go list` patterns, relative to the module root, of the
	// packages whose guest tests run. Default "./...". Packages without a
	// TestGuest function are not built.
	Packages []string
	// Run selects tests inside those packages (-test.run). Default "^TestGuest".
	Run string
	// TestTimeout bounds each guest test. Default 5 minutes.
	TestTimeout time.Duration
	// Timeout bounds the whole VM, boot to power-off. Default 20 minutes.
	Timeout time.Duration
	// BootTimeout bounds the boot, QEMU's start to /init's first report:
	// a guest silent that long is killed (Result.BootHung). Default 5
	// minutes; boots take 5 to 60 seconds under TCG.
	BootTimeout time.Duration
	// MemoryMiB and CPUs size the VM. Defaults 2048 and 2.
	MemoryMiB int
	CPUs      int
	// Env is extra environment for every guest test.
	Env []string
	// Files are extra host files to put into the initramfs: guest path ->
	// host path. Dynamically linked programs need their libraries too
	// (see HostProgram).
	Files map[string]string
	// GoPrograms are commands of this module built for the guest
	// (CGO_ENABLED=0): guest path -> package, e.g.
	// "/usr/bin/ublk-nvmeof": "./cmd/ublk-nvmeof".
	GoPrograms map[string]string
	// Race builds the guest test binaries with the race detector,
	// statically linked (needs cgo and gcc on the host).
	Race bool
	// Programs are host programs (names looked up in PATH, e.g. "fio",
	// "nvme") copied into the guest's /usr/bin with the shared libraries
	// ldd lists for them, so dynamically linked tools run in the guest.
	Programs []string
	// Sysctls are written in the guest before the first test (/proc/sys
	// path -> value), after the harness's own defaults.
	Sysctls map[string]string
	// Commands run in the guest before the first test (harness self-tests).
	Commands [][]string
	// Progress, when set, receives a line as each phase and guest test
	// starts and ends, and the tests' output as it comes.
	Progress io.Writer
	// WorkDir keeps the initramfs, console log and results. Default: a
	// temporary directory removed when Run returns.
	WorkDir string

	// skip holds, by package, the tests an earlier boot ran to their end
	// (RunRebooting): /init does not run them again.
	skip map[string][]string
}

// Result is what came back from the guest.
type Result struct {
	Boot     string       // /init's boot report (kernel release, setup errors)
	Tests    []TestResult // in the order they ran
	Done     bool         // /init ran every test and reported done
	TimedOut bool         // the VM was killed at Config.Timeout
	BootHung bool         // the VM was killed at Config.BootTimeout, before /init reported
	Console  string       // the kernel console (ttyS0), whole
	QEMU     string       // QEMU's own stderr
	Elapsed  time.Duration
	// Running is the test that was running when the VM stopped without
	// reporting done ("" if none).
	Running string
	// Reboots are the guest kernel deaths RunRebooting booted again after,
	// in order (empty for Run).
	Reboots []Reboot
}

// TestResult is one guest test.
type TestResult struct {
	Package    string // relative to the module root, e.g. "ublk"
	Name       string
	Status     string // PASS, FAIL or SKIP
	Elapsed    time.Duration
	Output     string   // the test's -test.v output
	Kernel     []string // kernel log records logged while it ran
	Complaints []string // those that failed it
}

// Failed reports whether the VM as a whole failed: it did not reach done, or a
// test failed.
func (r *Result) Failed() bool {
	if !r.Done {
		return true
	}
	for _, t := range r.Tests {
		if t.Status == guestproto.StatusFail {
			return true
		}
	}
	return false
}

// Available returns nil when this machine can boot the VM, else why not.
func Available() error {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		return fmt.Errorf("VM tests need linux/amd64, not %s/%s", runtime.GOOS, runtime.GOARCH)
	}
	if _, err := exec.LookPath(qemuBinary); err != nil {
		return fmt.Errorf("%s not found (apt-get install qemu-system-x86, or make e2e)", qemuBinary)
	}
	if _, err := exec.LookPath("go"); err != nil {
		return errors.New("the go command is needed to build the guest binaries")
	}
	_, err := SelectKernels(os.Getenv(EnvKernel))
	return err
}

const qemuBinary = "qemu-system-x86_64"

// EnvKernelRelease is set for every guest test: the release of the kernel
// the harness booted.
const EnvKernelRelease = "E2E_KERNEL_RELEASE"

func (c *Config) setDefaults() {
	if len(c.Packages) == 0 {
		c.Packages = []string{"./..."}
	}
	if c.Run == "" {
		c.Run = "^TestGuest"
	}
	if c.TestTimeout == 0 {
		c.TestTimeout = 5 * time.Minute
	}
	if c.Timeout == 0 {
		c.Timeout = 20 * time.Minute
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 5 * time.Minute
	}
	if c.MemoryMiB == 0 {
		c.MemoryMiB = 2048
	}
	if c.CPUs == 0 {
		c.CPUs = 2
	}
}

func (c *Config) progressf(format string, args ...any) {
	if c.Progress != nil {
		fmt.Fprintf(c.Progress, "[vm] "+format+"\n", args...)
	}
}

// Run builds, boots and runs the guest tests. An error means the harness
// itself could not run (no kernel, a build failure); what happened inside
// the VM, crash and timeout included, is in the Result.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	cfg.setDefaults()
	k := cfg.Kernel
	if k == nil {
		var err error
		if k, err = FindKernel(KernelLTS); err != nil {
			return nil, err
		}
	}
	// Guest tests can name the kernel they ran on (uname says it too).
	cfg.Env = append([]string{EnvKernelRelease + "=" + k.Release}, cfg.Env...)
	work := cfg.WorkDir
	var err error
	if work == "" {
		work, err = os.MkdirTemp("", "ublk-nvmeof-vm-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(work)
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}

	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	bins, err := buildGuestBinaries(ctx, root, filepath.Join(work, "bin"), cfg.Packages, cfg.Race)
	if err != nil {
		return nil, err
	}
	initBin := filepath.Join(work, "init")
	if err := goBuild(ctx, root, initBin, "./e2e/vm/internal/vminit"); err != nil {
		return nil, err
	}
	files := map[string]string{}
	for guestPath, pkg := range cfg.GoPrograms {
		bin := filepath.Join(work, "progs", filepath.Base(guestPath))
		if err := goBuild(ctx, root, bin, pkg); err != nil {
			return nil, err
		}
		files[guestPath] = bin
	}
	for g, h := range cfg.Files {
		files[g] = h
	}
	cfg.Files = files
	cfg.progressf("built /init and %d guest test binaries in %v", len(bins), time.Since(t0).Round(time.Millisecond))

	initrd := filepath.Join(work, "initrd.gz")
	if err := writeInitramfs(initrd, initBin, k, bins, &cfg); err != nil {
		return nil, fmt.Errorf("initramfs: %w", err)
	}
	return boot(ctx, &cfg, k, work, initrd)
}

func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the ublk-nvmeof module")
	}
	return filepath.Dir(gomod), nil
}

func goBuild(ctx context.Context, root, out string, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", append([]string{"build", "-o", out}, args...)...)
	return runGo(cmd, root)
}

func runGo(cmd *exec.Cmd, root string) error {
	cgo := "CGO_ENABLED=0"
	if slices.Contains(cmd.Args, "-race") {
		cgo = "CGO_ENABLED=1" // the race runtime is linked through cgo
	}
	cmd.Dir = root
	cmd.Env = append(os.Environ(), cgo, "GOOS=linux", "GOARCH=amd64")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, stderr.String())
	}
	return nil
}

type guestBinary struct {
	pkg  string // relative to the module root
	path string // on the host
}

var guestTestFunc = regexp.MustCompile(`(?m)^func TestGuest\w*\(`)

// buildGuestBinaries builds `go test -c` for every package among patterns
// that has a TestGuest function.
func buildGuestBinaries(ctx context.Context, root, dir string, patterns []string, race bool) ([]guestBinary, error) {
	args := append([]string{"list", "-f", `{{.ImportPath}}|{{.Dir}}|{{join .TestGoFiles ","}},{{join .XTestGoFiles ","}}`}, patterns...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%v: %s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("go list: %w", err)
	}
	modPath, err := exec.Command("go", "list", "-m").Output()
	if err != nil {
		return nil, err
	}
	mod := strings.TrimSpace(string(modPath))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var bins []guestBinary
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.SplitN(line, "|", 3)
		if len(f) != 3 || !hasGuestTests(f[1], strings.Split(f[2], ",")) {
			continue
		}
		rel := strings.TrimPrefix(strings.TrimPrefix(f[0], mod), "/")
		if rel == "" {
			rel = "."
		}
		bin := filepath.Join(dir, strings.ReplaceAll(rel, "/", "_")+".test")
		args := []string{"test", "-c", "-o", bin}
		if race {
			// The guest has no C library: link it in.
			args = append(args, "-race", "-ldflags", "-linkmode external -extldflags -static")
		}
		build := exec.CommandContext(ctx, "go", append(args, f[0])...)
		if err := runGo(build, root); err != nil {
			return nil, err
		}
		bins = append(bins, guestBinary{pkg: rel, path: bin})
	}
	if len(bins) == 0 {
		return nil, fmt.Errorf("no package among %v has a TestGuest function", patterns)
	}
	return bins, nil
}

func hasGuestTests(dir string, files []string) bool {
	for _, f := range files {
		if f == "" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err == nil && guestTestFunc.Match(b) {
			return true
		}
	}
	return false
}

// defaultSysctls make trouble visible while a test still runs: the hung-task
// detector reports a task stuck in D state for 30 s instead of 120 s.
var defaultSysctls = map[string]string{
	"/proc/sys/kernel/hung_task_timeout_secs": "30",
	"/proc/sys/kernel/hung_task_warnings":     "-1",
}

func writeInitramfs(dst, initBin string, k *Kernel, bins []guestBinary, cfg *Config) error {
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	zw, err := gzip.NewWriterLevel(f, gzip.BestSpeed)
	if err != nil {
		return err
	}
	c := newCPIOWriter(zw)
	for _, d := range []string{"dev", "proc", "sys", "tmp", "run", "bin", "sbin", "usr/bin", "lib/modules", "etc"} {
		c.Dir(d)
	}
	c.File("init", 0o755, initBin)
	if _, err := os.Stat("/bin/busybox"); err == nil && isStatic("/bin/busybox") {
		c.File("bin/busybox", 0o755, "/bin/busybox")
		c.Symlink("bin/sh", "busybox")
	}
	c.Bytes("etc/passwd", 0o644, []byte("root:x:0:0:root:/tmp:/bin/sh\n"))
	c.Bytes("etc/group", 0o644, []byte("root:x:0:\n"))

	m := guestproto.Manifest{
		Run:     cfg.Run,
		Timeout: int64(cfg.TestTimeout),
		Env:     cfg.Env,
		Verbose: cfg.Progress != nil,
	}
	for _, mod := range k.Modules {
		p := "lib/modules/" + filepath.Base(mod.Path)
		c.File(p, 0o644, mod.Path)
		m.Modules = append(m.Modules, guestproto.Module{Name: mod.Name, Path: "/" + p, Params: mod.Params})
	}
	for _, b := range bins {
		p := guestproto.BinDir + "/" + filepath.Base(b.path)
		c.File(p, 0o755, b.path)
		m.Binaries = append(m.Binaries, guestproto.Binary{Package: b.pkg, Path: p, Skip: cfg.skip[b.pkg]})
	}
	extra := make([]string, 0, len(cfg.Files))
	for g := range cfg.Files {
		extra = append(extra, g)
	}
	sort.Strings(extra)
	for _, g := range extra {
		c.File(g, 0o755, cfg.Files[g])
	}
	for _, prog := range cfg.Programs {
		if err := addProgram(c, prog); err != nil {
			return err
		}
	}
	for _, s := range sortedSysctls(defaultSysctls, cfg.Sysctls) {
		m.Sysctls = append(m.Sysctls, s)
	}
	for _, args := range cfg.Commands {
		m.Commands = append(m.Commands, guestproto.Command{Args: args})
	}
	mj, err := json.Marshal(m)
	if err != nil {
		return err
	}
	c.Bytes(guestproto.ManifestPath, 0o644, mj)
	if err := c.Close(); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func sortedSysctls(maps ...map[string]string) []guestproto.Sysctl {
	var out []guestproto.Sysctl
	for _, m := range maps {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			out = append(out, guestproto.Sysctl{Path: k, Value: m[k]})
		}
	}
	return out
}

// addProgram copies a host program and the shared libraries it loads (as ldd
// resolves them) into the initramfs at the same absolute paths, the program
// itself in /usr/bin.
func addProgram(c *cpioWriter, name string) error {
	path, err := exec.LookPath(name)
	if err != nil {
		return fmt.Errorf("guest program %s: %w", name, err)
	}
	c.File("usr/bin/"+filepath.Base(path), 0o755, path)
	if isStatic(path) {
		return nil
	}
	out, err := exec.Command("ldd", path).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %w", path, err)
	}
	libs, err := parseLdd(string(out))
	if err != nil {
		return fmt.Errorf("ldd %s: %w", path, err)
	}
	for _, lib := range libs {
		if !c.hasFile(lib) {
			c.File(lib, 0o755, lib)
		}
	}
	return nil
}

// parseLdd returns the absolute library paths in ldd's output: "name => path
// (addr)" lines and the interpreter's "path (addr)" line.
func parseLdd(out string) ([]string, error) {
	var libs []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 3 && f[1] == "=>" && f[2] == "not":
			return nil, fmt.Errorf("library %s not found", f[0])
		case len(f) == 2 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		}
	}
	return libs, nil
}

// isStatic reports whether an ELF file has no program interpreter.
func isStatic(p string) bool {
	b, err := os.ReadFile(p)
	return err == nil && !bytes.Contains(b[:min(len(b), 4096)], []byte("ld-linux"))
}

func accel() (acc, cpu string) {
	switch os.Getenv("E2E_ACCEL") {
	case "kvm":
		// Only when asked: on the project's own machines /dev/kvm exists but
		// cannot run a stock kernel (see shared/VM.md).
		return "kvm", "host"
	default:
		return "tcg", "max"
	}
}

func boot(ctx context.Context, cfg *Config, k *Kernel, work, initrd string) (*Result, error) {
	consoleLog := filepath.Join(work, "console.log")
	resultsLog := filepath.Join(work, "results.log")
	for _, p := range []string{consoleLog, resultsLog} {
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			return nil, err
		}
	}
	acc, cpu := accel()
	args := []string{
		"-accel", acc, "-cpu", cpu,
		"-m", fmt.Sprint(cfg.MemoryMiB), "-smp", fmt.Sprint(cfg.CPUs),
		"-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
		"-serial", "file:" + consoleLog, // ttyS0: kernel console
		"-serial", "file:" + resultsLog, // ttyS1: events from /init
		"-kernel", k.Vmlinuz, "-initrd", initrd,
		"-append", "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init",
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemuBinary, args...)
	var qemuErr bytes.Buffer
	cmd.Stderr = &qemuErr
	cmd.WaitDelay = 5 * time.Second
	cfg.progressf("booting %s (%s, %d MiB, %d CPUs, timeout %v)", k.Release, acc, cfg.MemoryMiB, cfg.CPUs, cfg.Timeout)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", qemuBinary, err)
	}

	res := &Result{}
	col := &collector{res: res, cfg: cfg, booted: make(chan struct{})}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		col.follow(resultsLog, stop)
	}()
	bootHung := make(chan bool, 1)
	go func() {
		defer wg.Done()
		bootHung <- watchBoot(cmd, col.booted, stop, cfg.BootTimeout)
	}()
	waitErr := cmd.Wait()
	close(stop)
	wg.Wait()
	res.BootHung = <-bootHung

	res.Elapsed = time.Since(start)
	res.TimedOut = errors.Is(ctx.Err(), context.DeadlineExceeded) && !res.BootHung
	res.QEMU = qemuErr.String()
	if b, err := os.ReadFile(consoleLog); err == nil {
		res.Console = strings.ReplaceAll(string(b), "\r", "")
	}
	if waitErr != nil && !res.TimedOut && !res.Done {
		res.QEMU += fmt.Sprintf("\nqemu: %v", waitErr)
	}
	if res.BootHung {
		res.QEMU += fmt.Sprintf("\nkilled: no report from /init %v after QEMU started", cfg.BootTimeout)
	}
	cfg.progressf("VM stopped after %v (done=%v timed out=%v boot hung=%v, %d tests)", res.Elapsed.Round(time.Millisecond), res.Done, res.TimedOut, res.BootHung, len(res.Tests))
	return res, nil
}

// watchBoot kills QEMU if /init has not reported (booted closed) within
// timeout of its start, and says whether it did; it returns when QEMU
// stopped (stop closed) or /init reported.
func watchBoot(cmd *exec.Cmd, booted, stop <-chan struct{}, timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-booted:
		return false
	case <-stop:
		return false
	case <-t.C:
		cmd.Process.Kill()
		return true
	}
}

// collector turns the results port's lines into a Result.
type collector struct {
	res      *Result
	cfg      *Config
	partial  []byte
	booted   chan struct{} // closed at /init's first boot report
	bootSeen bool
}

// follow tails the results file until stop is closed, then reads the rest.
func (c *collector) follow(path string, stop <-chan struct{}) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	r := bufio.NewReader(f)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		c.drain(r)
		select {
		case <-stop:
			c.drain(r)
			return
		case <-tick.C:
		}
	}
}

func (c *collector) drain(r *bufio.Reader) {
	for {
		b, err := r.ReadBytes('\n')
		c.partial = append(c.partial, b...)
		if err != nil { // io.EOF: keep the partial line for the next round
			return
		}
		c.line(bytes.TrimRight(c.partial, "\r\n"))
		c.partial = c.partial[:0]
	}
}

func (c *collector) line(b []byte) {
	var ev guestproto.Event
	if len(b) == 0 || json.Unmarshal(b, &ev) != nil {
		return
	}
	switch ev.Kind {
	case guestproto.EventBoot:
		c.res.Boot = ev.Text
		if !c.bootSeen {
			c.bootSeen = true
			close(c.booted)
		}
		c.cfg.progressf("guest up: %s", ev.Text)
	case guestproto.EventStart:
		c.res.Running = ev.Package + "." + ev.Test
		c.cfg.progressf("=== RUN   %s %s", ev.Package, ev.Test)
	case guestproto.EventOut:
		if c.cfg.Progress != nil {
			fmt.Fprintf(c.cfg.Progress, "    %s\n", ev.Text)
		}
	case guestproto.EventLog:
		c.cfg.progressf("%s", ev.Text)
	case guestproto.EventEnd:
		c.res.Running = ""
		c.res.Tests = append(c.res.Tests, TestResult{
			Package: ev.Package, Name: ev.Test, Status: ev.Status,
			Elapsed: time.Duration(ev.Elapsed), Output: ev.Output,
			Kernel: ev.Kernel, Complaints: ev.Complaints,
		})
		c.cfg.progressf("--- %s: %s %s (%v)", ev.Status, ev.Package, ev.Test, time.Duration(ev.Elapsed).Round(time.Millisecond))
		for _, k := range ev.Complaints {
			c.cfg.progressf("    kernel: %s", k)
		}
	case guestproto.EventDone:
		c.res.Done = true
	}
}

// ConsoleTail returns the last n lines of the kernel console.
func (r *Result) ConsoleTail(n int) string {
	lines := strings.Split(strings.TrimRight(r.Console, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
