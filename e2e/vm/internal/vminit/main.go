// Command vminit is /init of the e2e virtual machine. It mounts the usual
// file systems, loads the kernel modules the manifest lists, brings loopback
// up, then runs every selected test of every test binary one at a time, as
// root, and reports each on the results serial port. It watches the kernel
// log while a test runs, so a WARNING, BUG, Oops, hung task or sanitizer
// report fails the test it happened in. Finally it powers the VM off.
//
// It is built by the host (package e2e/vm) with CGO_ENABLED=0 and never runs
// anywhere but as PID 1 of that VM.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/vm/internal/guestproto"
)

func main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "vminit: not PID 1; this is the e2e VM's /init, not a tool")
		os.Exit(2)
	}
	err := run()
	if err != nil {
		logf("vminit: %v", err)
	}
	unix.Sync()
	// Power off; QEMU exits. Should that fail, returning from PID 1 panics
	// the kernel and -no-reboot makes QEMU exit too.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// console is the kernel console (ttyS0): human-readable progress.
var console = os.Stdout

func logf(format string, args ...any) {
	fmt.Fprintf(console, "vminit: "+format+"\n", args...)
}

func run() error {
	if err := mountBase(); err != nil {
		return err
	}
	res, err := openResults()
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(guestproto.ManifestPath)
	if err != nil {
		return err
	}
	var m guestproto.Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}

	kl, err := startKmsg()
	if err != nil {
		return err
	}

	var report []string
	for _, mod := range m.Modules {
		if err := loadModule(mod); err != nil {
			report = append(report, fmt.Sprintf("%s: %v", mod.Name, err))
			logf("module %s: %v", mod.Name, err)
		}
	}
	if err := unix.Mount("configfs", "/sys/kernel/config", "configfs", 0, ""); err != nil {
		report = append(report, fmt.Sprintf("mount configfs: %v", err))
	}
	if err := linkUp("lo"); err != nil {
		report = append(report, fmt.Sprintf("lo up: %v", err))
	}
	if _, err := os.Stat("/bin/busybox"); err == nil {
		// sh, dd, mkfs.ext2, md5sum ... for tests that shell out.
		_ = exec.Command("/bin/busybox", "--install", "-s", "/bin").Run()
	}
	for _, s := range m.Sysctls {
		if err := os.WriteFile(s.Path, []byte(s.Value), 0); err != nil {
			report = append(report, fmt.Sprintf("%s: %v", s.Path, err))
		}
	}
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	text := "kernel " + unix.ByteSliceToString(uts.Release[:])
	if len(report) > 0 {
		text += "; setup errors: " + strings.Join(report, "; ")
	}
	res.send(guestproto.Event{Kind: guestproto.EventBoot, Text: text})
	logf("%s", text)

	for _, c := range m.Commands {
		out, err := exec.Command(c.Args[0], c.Args[1:]...).CombinedOutput()
		res.send(guestproto.Event{Kind: guestproto.EventLog, Text: fmt.Sprintf("%v: %v\n%s", c.Args, err, out)})
	}

	timeout := time.Duration(m.Timeout)
	for _, b := range m.Binaries {
		tests, err := listTests(b, m.Run, m.Env)
		if err != nil {
			res.send(guestproto.Event{Kind: guestproto.EventEnd, Package: b.Package, Test: "(list)",
				Status: guestproto.StatusFail, Output: err.Error()})
			continue
		}
		for _, name := range tests {
			if slices.Contains(b.Skip, name) {
				continue
			}
			ev := runTest(res, kl, b, name, timeout, m)
			res.send(ev)
			logf("%s %s.%s (%v)", ev.Status, b.Package, name, time.Duration(ev.Elapsed).Round(time.Millisecond))
		}
	}
	res.send(guestproto.Event{Kind: guestproto.EventDone})
	return nil
}

func mountBase() error {
	for _, d := range []string{"/proc", "/sys", "/dev", "/tmp", "/run"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	mounts := []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/tmp", "tmpfs"},
		{"tmpfs", "/run", "tmpfs"},
	}
	for _, mt := range mounts {
		if err := unix.Mount(mt.src, mt.dst, mt.fs, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s: %w", mt.dst, err)
		}
	}
	_ = os.MkdirAll("/dev/shm", 0o1777)
	_ = unix.Mount("tmpfs", "/dev/shm", "tmpfs", 0, "")
	_ = os.MkdirAll("/dev/pts", 0o755)
	_ = unix.Mount("devpts", "/dev/pts", "devpts", 0, "")
	_ = unix.Mount("debugfs", "/sys/kernel/debug", "debugfs", 0, "")
	return nil
}

// results writes events to the results port, one JSON line each.
type results struct {
	mu sync.Mutex
	f  *os.File
}

func openResults() (*results, error) {
	f, err := os.OpenFile(guestproto.ResultsTTY, os.O_WRONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("results port: %w", err)
	}
	// Raw mode: no \n -> \r\n or other output processing.
	if t, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
		t.Oflag &^= unix.OPOST
		t.Lflag &^= unix.ECHO | unix.ICANON | unix.ISIG | unix.IEXTEN
		_ = unix.IoctlSetTermios(int(f.Fd()), unix.TCSETS, t)
	}
	return &results{f: f}, nil
}

func (r *results) send(ev guestproto.Event) {
	b, err := json.Marshal(ev)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	_, _ = r.f.Write(append(b, '\n'))
}

func loadModule(mod guestproto.Module) error {
	f, err := os.Open(mod.Path)
	if err != nil {
		return err
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), mod.Params, 0)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}

func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// kmsgLog collects every kernel log record from boot on.
type kmsgLog struct {
	mu   sync.Mutex
	recs []guestproto.KmsgRecord
}

func startKmsg() (*kmsgLog, error) {
	f, err := os.Open("/dev/kmsg")
	if err != nil {
		return nil, err
	}
	kl := &kmsgLog{}
	// The reader lives as long as the VM: PID 1 never joins it, powering
	// off ends it.
	go func() {
		buf := make([]byte, 8192)
		for {
			n, err := f.Read(buf)
			if errors.Is(err, unix.EPIPE) { // records overwritten before we read them
				continue
			}
			if err != nil {
				return
			}
			if r, ok := guestproto.ParseKmsg(string(buf[:n])); ok {
				kl.mu.Lock()
				kl.recs = append(kl.recs, r)
				kl.mu.Unlock()
			}
		}
	}()
	return kl, nil
}

func (kl *kmsgLog) mark() int {
	kl.mu.Lock()
	defer kl.mu.Unlock()
	return len(kl.recs)
}

// since returns the records logged after mark, and those of them that are
// kernel (facility 0) complaints.
func (kl *kmsgLog) since(mark int) (all, complaints []string) {
	kl.mu.Lock()
	defer kl.mu.Unlock()
	for _, r := range kl.recs[mark:] {
		all = append(all, r.String())
		if r.Facility == 0 && guestproto.IsComplaint(r.Message) {
			complaints = append(complaints, r.String())
		}
	}
	return all, complaints
}

func testEnv(extra []string) []string {
	env := []string{
		"PATH=/bin:/sbin:/usr/bin:/usr/sbin",
		"HOME=/tmp",
		"TMPDIR=/tmp",
		guest.EnvInGuest + "=1",
	}
	return append(env, extra...)
}

func listTests(b guestproto.Binary, run string, extra []string) ([]string, error) {
	cmd := exec.Command(b.Path, "-test.list", run)
	cmd.Env = testEnv(extra)
	cmd.Dir = workDir(b)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("%s -test.list: %v\n%s", b.Path, err, out)
	}
	var tests []string
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Test") {
			tests = append(tests, strings.TrimSpace(l))
		}
	}
	return tests, nil
}

func workDir(b guestproto.Binary) string {
	d := filepath.Join("/tmp/e2e", strings.ReplaceAll(b.Package, "/", "_"))
	_ = os.MkdirAll(d, 0o755)
	return d
}

// lineWriter collects a test's output and, when verbose, streams it line by
// line as EventOut.
type lineWriter struct {
	mu      sync.Mutex
	all     bytes.Buffer
	partial []byte
	emit    func(string)
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.all.Write(p)
	if w.emit == nil {
		return len(p), nil
	}
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		w.emit(string(w.partial[:i]))
		w.partial = w.partial[i+1:]
	}
	return len(p), nil
}

func runTest(res *results, kl *kmsgLog, b guestproto.Binary, name string, timeout time.Duration, m guestproto.Manifest) guestproto.Event {
	ev := guestproto.Event{Kind: guestproto.EventEnd, Package: b.Package, Test: name}
	res.send(guestproto.Event{Kind: guestproto.EventStart, Package: b.Package, Test: name})
	mark := kl.mark()
	start := time.Now()

	out := &lineWriter{}
	if m.Verbose {
		out.emit = func(l string) {
			res.send(guestproto.Event{Kind: guestproto.EventOut, Package: b.Package, Test: name, Text: l})
		}
	}
	// The test binary's own -test.timeout panics with every goroutine's
	// stack; the kill below is the backstop for a test stuck in the kernel.
	cmd := exec.Command(b.Path, "-test.v", "-test.run", "^"+name+"$", "-test.count=1",
		"-test.timeout", timeout.String())
	cmd.Env = testEnv(m.Env)
	cmd.Dir = workDir(b)
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err := cmd.Start()
	if err != nil {
		ev.Status = guestproto.StatusFail
		ev.Output = err.Error()
		return ev
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var timedOut bool
	select {
	case err = <-waited:
	case <-time.After(timeout + 30*time.Second):
		timedOut = true
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		select {
		case err = <-waited:
		case <-time.After(30 * time.Second):
			err = errors.New("test process did not exit after SIGKILL (stuck in the kernel)")
		}
	}
	// Kill what the test left in its process group (helpers it spawned).
	_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
	ev.Elapsed = int64(time.Since(start))

	// Give the kernel a moment to flush what the test's last actions logged.
	time.Sleep(100 * time.Millisecond)
	ev.Kernel, ev.Complaints = kl.since(mark)
	if len(ev.Kernel) > 400 {
		ev.Kernel = ev.Kernel[len(ev.Kernel)-400:]
	}
	out.mu.Lock()
	ev.Output = out.all.String()
	out.mu.Unlock()
	ev.Status = testStatus(ev.Output, name, err)
	switch {
	case timedOut:
		ev.Status = guestproto.StatusFail
		ev.Output += fmt.Sprintf("\nvminit: killed after %v: %v\n", timeout+30*time.Second, err)
	case len(ev.Complaints) > 0:
		ev.Status = guestproto.StatusFail
	}
	return ev
}

// testStatus reads the test's verdict from go test's -test.v output; the exit
// status must agree, and a crash without a verdict line is a failure.
func testStatus(output, name string, err error) string {
	var status string
	sc := bufio.NewScanner(strings.NewReader(output))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		for _, s := range []string{guestproto.StatusPass, guestproto.StatusFail, guestproto.StatusSkip} {
			if strings.HasPrefix(l, "--- "+s+": "+name+" ") {
				status = s
			}
		}
	}
	if err != nil || status == "" {
		return guestproto.StatusFail
	}
	return status
}
