package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// The test binary doubles as the ublk-nvmeof command when this is set, so
// tests run the real CLI as a separate process.
const envRunMain = "UBLK_NVMEOF_TEST_RUN_MAIN"

// Run by the tests, the command always checks for goroutines left at exit
// (exitLeak).
func TestMain(m *testing.M) {
	if os.Getenv(envRunMain) == "1" {
		os.Exit(checkGoroutines(run(append([]string{"ublk-nvmeof"}, os.Args[1:]...))))
	}
	os.Exit(m.Run())
}

// runCLI runs the command with args and returns its stdout, stderr and exit
// status.
func runCLI(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), envRunMain+"=1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

func TestUsageErrors(t *testing.T) {
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"attach"}, exitUsage, "--traddr is required"},
		{[]string{"attach", "-a", "127.0.0.1"}, exitUsage, "--nqn is required"},
		{[]string{"attach", "--bogus"}, exitUsage, "flag provided but not defined"},
		{[]string{"attach", "-a", "127.0.0.1", "-n", "nqn.2026-11.x:y", "-s", "99999"}, exitUsage, "not a TCP port"},
		{[]string{"attach", "-a", "127.0.0.1", "-n", "not-an-nqn"}, exitUsage, "does not start with \"nqn.\""},
		{[]string{"attach", "-a", "127.0.0.1", "-n", "nqn.2026-11.x:y", "-Q", "4"}, exitUsage, "--queue-size 4"},
		{[]string{"--log-format", "xml", "list"}, exitUsage, "--log-format"},
		{[]string{"detach"}, exitUsage, "needs one DEVICE"},
		{[]string{"detach", "/dev/sda"}, exitUsage, "not a ublk device"},
		{[]string{"status", "5"}, exitNoDevice, "no ublk-nvmeof daemon serves /dev/ublkb5"},
		{[]string{"discover"}, exitUsage, "--traddr is required"},
		{[]string{"attach", "-a", "127.0.0.1", "-n", "nqn.2026-11.x:y", "--pprof-addr", "0.0.0.0:6060"}, exitUsage, "--pprof-addr \"0.0.0.0:6060\": profiles are served on loopback only"},
	} {
		_, stderr, code := runCLI(t, c.args...)
		if code != c.code || !strings.Contains(stderr, c.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, c.code, c.msg)
		}
		if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
			t.Errorf("%v: error is %d lines, want one: %q", c.args, n+1, stderr)
		}
	}
}

// TestFlagRanges: every numeric flag is range-checked as it is parsed, so
// a value that would be cut (a 64-bit NSID into 32 bits), wrap (a KATO in
// milliseconds into 32 bits) or overflow (seconds into a time.Duration)
// exits 2 with one line naming the flag.
func TestFlagRanges(t *testing.T) {
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	target := []string{"attach", "-a", "127.0.0.1", "-n", "nqn.2026-11.x:y"}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--nsid", "4294967297"}, "--nsid 4294967297"},
		{[]string{"--nsid", "4294967295"}, "--nsid 4294967295"},
		{[]string{"--nsid", "0"}, "--nsid 0"},
		{[]string{"--nsid", "-1"}, "nsid"},
		{[]string{"-k", "4294968"}, "--keep-alive-tmo 4294968"},
		{[]string{"-k", "-1"}, "--keep-alive-tmo -1"},
		{[]string{"-k", "99999999999999999999"}, "for flag -k"},
		{[]string{"-c", "0"}, "--reconnect-delay 0"},
		{[]string{"-c", "31536001"}, "--reconnect-delay 31536001"},
		{[]string{"-l", "-2"}, "--ctrl-loss-tmo -2"},
		{[]string{"-l", "9223372037"}, "--ctrl-loss-tmo 9223372037"},
		{[]string{"-F", "-2"}, "--fast-io-fail-tmo -2"},
		{[]string{"-F", "31536001"}, "--fast-io-fail-tmo 31536001"},
		{[]string{"-Q", "1025"}, "--queue-size 1025"},
		{[]string{"-Q", "15"}, "--queue-size 15"},
		{[]string{"-i", "0"}, "--nr-io-queues 0"},
		{[]string{"-i", "100000"}, "--nr-io-queues 100000"},
		{[]string{"--dev-id", "-2"}, "--dev-id -2"},
		{[]string{"--dev-id", "1048576"}, "--dev-id 1048576"},
	} {
		args := append(append([]string{}, target...), c.args...)
		_, stderr, code := runCLI(t, args...)
		if code != exitUsage || !strings.Contains(stderr, c.msg) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", c.args, code, stderr, exitUsage, c.msg)
		}
		if n := strings.Count(strings.TrimSpace(stderr), "\n"); n != 0 {
			t.Errorf("%v: error is %d lines, want one: %q", c.args, n+1, stderr)
		}
	}
	for _, args := range [][]string{
		{"detach", "--timeout", "0s", "5"},
		{"detach", "--timeout", "-1s", "5"},
		{"discover", "-a", "127.0.0.1", "--timeout", "0s"},
	} {
		_, stderr, code := runCLI(t, args...)
		if code != exitUsage || !strings.Contains(stderr, "--timeout") {
			t.Errorf("%v: exit %d, stderr %q; want exit %d naming --timeout", args, code, stderr, exitUsage)
		}
	}
	// From the environment, the same check.
	t.Setenv("UBLK_NVMEOF_NSID", "4294967297")
	if _, stderr, code := runCLI(t, target...); code != exitUsage || !strings.Contains(stderr, "--nsid 4294967297") {
		t.Errorf("UBLK_NVMEOF_NSID=4294967297: exit %d, stderr %q", code, stderr)
	}
}

func TestEnvironmentOptions(t *testing.T) {
	// Every option also comes from the environment: a bad value there is
	// reported like the flag.
	t.Setenv("UBLK_NVMEOF_TRADDR", "127.0.0.1")
	t.Setenv("UBLK_NVMEOF_NQN", "nqn.2026-11.x:y")
	t.Setenv("UBLK_NVMEOF_QUEUE_SIZE", "2")
	_, stderr, code := runCLI(t, "attach")
	if code != exitUsage || !strings.Contains(stderr, "--queue-size 2") {
		t.Errorf("exit %d, %q", code, stderr)
	}
}

func TestVersion(t *testing.T) {
	out, _, code := runCLI(t, "version")
	if code != 0 || !strings.HasPrefix(out, "ublk-nvmeof ") {
		t.Errorf("exit %d, %q", code, out)
	}
}

// --- in the VM: the real CLI against the Linux nvmet-tcp target ---

// daemon is a running `ublk-nvmeof attach`.
type daemon struct {
	cmd    *exec.Cmd
	device string
	stderr *lockedBuffer
	waited chan error
}

// lockedBuffer is the daemon's stderr, read by the test while exec's
// goroutine writes it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func startAttach(t *testing.T, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"attach"}, args...)...)
	cmd.Env = append(os.Environ(), envRunMain+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, stderr: &lockedBuffer{}, waited: make(chan error, 1)}
	cmd.Stderr = d.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		for sc.Scan() {
		}
		d.waited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-d.waited
		}
	})
	select {
	case l, ok := <-lines:
		if !ok {
			err := <-d.waited
			d.waited <- err
			t.Fatalf("attach exited before the device was ready: %v\n%s", err, d.stderr)
		}
		d.device = l
	case <-time.After(60 * time.Second):
		t.Fatalf("attach did not print a device within 60 s\n%s", d.stderr)
	}
	return d
}

func (d *daemon) wait(t *testing.T) int {
	t.Helper()
	select {
	case err := <-d.waited:
		d.waited <- err
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0
	case <-time.After(2 * time.Minute):
		t.Fatalf("attach did not exit\n%s", d.stderr)
	}
	return -1
}

func ublkDevices(t *testing.T) []string {
	t.Helper()
	m, err := filepath.Glob("/dev/ublk[bc]*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestGuestAttachLinuxTarget: `ublk-nvmeof attach` against the Linux
// nvmet-tcp target on a RAM disk: data written through /dev/ublkbN is on
// the RAM disk and reads back; list and status show it; SIGTERM detaches
// and removes the device.
func TestGuestAttachLinuxTarget(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:attach", Device: "/dev/ram0", Port: 4430})
	d := startAttach(t, "-a", "127.0.0.1", "-s", "4430", "-n", tg.Opts.NQN, "-i", "2", "-Q", "64", "--metrics-addr", "127.0.0.1:9782")
	if !strings.HasPrefix(d.device, "/dev/ublkb") {
		t.Fatalf("attach printed %q", d.device)
	}
	if err := guest.WaitFor(d.device, 10*time.Second); err != nil {
		t.Fatal(err)
	}

	const size = 4 << 20
	const off = 3 << 20
	pattern := guest.AlignedBuf(t, size)
	if _, err := rand.Read(pattern); err != nil {
		t.Fatal(err)
	}
	guest.DirectIO(t, d.device, pattern, off, true)
	onDisk := guest.AlignedBuf(t, size)
	guest.DirectIO(t, "/dev/ram0", onDisk, off, false)
	if !bytes.Equal(onDisk, pattern) {
		t.Fatal("the RAM disk behind the target differs from what was written through ublk")
	}
	back := guest.AlignedBuf(t, size)
	guest.DirectIO(t, d.device, back, off, false)
	if !bytes.Equal(back, pattern) {
		t.Fatal("read back through ublk differs from what was written")
	}

	resp, err := http.Get("http://127.0.0.1:9782/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, re := range []string{
		`ublk_nvmeof_io_total\{nqn="[^"]+",op="WRITE",queue="\d",target="127.0.0.1:4430"\} [1-9]`,
		`ublk_nvmeof_io_bytes_total\{nqn="[^"]+",op="READ",queue="\d",target="[^"]+"\} [1-9]`,
		`ublk_nvmeof_controller_state\{nqn="[^"]+",state="LIVE",target="[^"]+"\} 1`,
		`ublk_nvmeof_io_held\{[^}]+\} 0`,
	} {
		if !regexp.MustCompile(re).Match(metrics) {
			t.Errorf("/metrics lacks %s", re)
		}
	}
	// Without --pprof-addr no profile is served, on the metrics listener
	// or anywhere.
	if resp, err := http.Get("http://127.0.0.1:9782/debug/pprof/cmdline"); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode != http.StatusNotFound {
		t.Errorf("/debug/pprof/cmdline on the metrics listener: %s", resp.Status)
	}

	out, stderr, code := runCLI(t, "list", "--json")
	var list []attach.Status
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 1 ||
		list[0].Device != d.device || list[0].State != "LIVE" || list[0].Queues != 2 {
		t.Fatalf("list: exit %d %q %s", code, out, stderr)
	}
	out, _, code = runCLI(t, "status", d.device)
	if code != 0 || !strings.Contains(out, "LIVE") || !strings.Contains(out, tg.Opts.NQN) {
		t.Fatalf("status: exit %d %q", code, out)
	}
	checkUblkFeatures(t, list[0], out)

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := d.wait(t); code != 0 {
		t.Fatalf("attach exited %d after SIGTERM\n%s", code, d.stderr)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("devices left after detach: %v", devs)
	}
	t.Logf("daemon log:\n%s", d.stderr)
}

// checkUblkFeatures: status shows the ublk features this kernel offers (as
// GET_FEATURES reports them to the test itself) and those the device uses:
// offered ones, among them user recovery (attach's default) with REISSUE
// where the kernel has it.
func checkUblkFeatures(t *testing.T, st attach.Status, text string) {
	t.Helper()
	ctl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	feats, err := ctl.Features()
	ctl.Close()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.Join(st.UblkFeatures, " "), strings.Join(feats.Names(), " "); got != want {
		t.Errorf("status: ublk features %q, the kernel offers %q", got, want)
	}
	// The device's flags are what attach asked for plus what ADD_DEV
	// forces (CMD_IOCTL_ENCODE and URING_CMD_COMP_IN_TASK on 6.12; also
	// PER_IO_DAEMON, BUF_REG_OFF_DAEMON and SAFE_STOP_DEV on 7.3), all of
	// them offered.
	var flags ublk.Features
	for _, name := range st.UblkFlags {
		f, ok := featureByName(feats, name)
		if !ok {
			t.Errorf("status: ublk flag in use %q is not among the kernel's features %v", name, feats)
		}
		flags |= f
	}
	asked := ublk.FeatureUserRecovery
	if feats.Has(ublk.FeatureUserRecoveryReissue) {
		asked |= ublk.FeatureUserRecoveryReissue
	}
	if !flags.Has(asked) {
		t.Errorf("status: ublk flags in use %v lack %v (attach's default recovery)", flags, asked)
	}
	for label, names := range map[string][]string{"ublk features": feats.Names(), "ublk flags in use": st.UblkFlags} {
		line := regexp.MustCompile(`(?m)^` + label + `:\s+` + regexp.QuoteMeta(strings.Join(names, " ")) + `$`)
		if !line.MatchString(text) {
			t.Errorf("status output lacks the line %q: %v:\n%s", label, names, text)
		}
	}
	// attach uses zero copy by default where the kernel has it, and says
	// so; elsewhere status says the data is copied, and why.
	wantPath := "copy ("
	if feats.Has(ublk.FeatureAutoBufReg) {
		wantPath = "zero copy ("
	}
	if want := ublk.DataPath(feats, flags); st.UblkDataPath != want || !strings.HasPrefix(want, wantPath) ||
		!regexp.MustCompile(`(?m)^ublk data path:\s+`+regexp.QuoteMeta(want)+`$`).MatchString(text) {
		t.Errorf("status: ublk data path %q (JSON), want %q on a line of:\n%s", st.UblkDataPath, want, text)
	}
	t.Logf("kernel ublk features: %v; in use: %v; data path: %s", feats, flags, st.UblkDataPath)
}

// featureByName finds the flag of feats named name (Features.Names).
func featureByName(feats ublk.Features, name string) (ublk.Features, bool) {
	for bit := range 64 {
		f := ublk.Features(1) << bit
		if feats.Has(f) && f.String() == name {
			return f, true
		}
	}
	return 0, false
}

// TestGuestAttachDetachCommand: `detach` drains and removes the device and
// the daemon exits 0.
func TestGuestAttachDetachCommand(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:detach", Device: "/dev/ram1", Port: 4431, PortID: 2})
	d := startAttach(t, "-a", "127.0.0.1", "-s", "4431", "-n", tg.Opts.NQN, "-i", "1")
	if _, stderr, code := runCLI(t, "detach", d.device); code != 0 {
		t.Fatalf("detach: exit %d %s", code, stderr)
	}
	if code := d.wait(t); code != 0 {
		t.Fatalf("attach exited %d after detach\n%s", code, d.stderr)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("devices left after detach: %v", devs)
	}
}

// TestGuestAttachErrors: each failure has its exit status and one-line
// message, and leaves no ublk device behind.
func TestGuestAttachErrors(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:errors", Device: "/dev/ram1", Port: 4432, PortID: 3})
	for _, c := range []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"unreachable", []string{"-a", "127.0.0.1", "-s", "4499", "-n", tg.Opts.NQN}, exitUnreachable, "target unreachable"},
		{"unknown NQN", []string{"-a", "127.0.0.1", "-s", "4432", "-n", "nqn.2026-11.io.ublk-nvmeof:nosuch"}, exitRejected, "rejected"},
		{"no namespace", []string{"-a", "127.0.0.1", "-s", "4432", "-n", tg.Opts.NQN, "--nsid", "9"}, exitNoNamespace, "namespace not found"},
	} {
		_, stderr, code := runCLI(t, append([]string{"attach", "--ctrl-loss-tmo", "10", "--reconnect-delay", "1"}, c.args...)...)
		// Logs come first; the error is the last line, and one line.
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		last := lines[len(lines)-1]
		if code != c.code || !strings.HasPrefix(last, "ublk-nvmeof: ") || !strings.Contains(last, c.msg) {
			t.Errorf("%s: exit %d, stderr %q; want exit %d and a last line with %q", c.name, code, stderr, c.code, c.msg)
		}
		if devs := ublkDevices(t); len(devs) != 0 {
			t.Fatalf("%s: devices left: %v", c.name, devs)
		}
	}
	// recover with no device left by a dead daemon.
	_, stderr, code := runCLI(t, "recover", "-a", "127.0.0.1", "-s", "4432", "-n", tg.Opts.NQN)
	if code != exitNoDevice || !strings.Contains(stderr, "no device left by a dead daemon") {
		t.Errorf("recover without a dead daemon: exit %d %q", code, stderr)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("recover: devices left: %v", devs)
	}
}

// TestGuestRecoverAfterKill (the copy path: --zero-copy off, since 7.3
// would use zero copy by default): the daemon is SIGKILLed while a writer is
// writing; `attach --recover` takes the same device over. The writer sees
// no error and every acknowledged write reads back.
func TestGuestRecoverAfterKill(t *testing.T) {
	guest.Require(t)
	recoverAfterKill(t, 4096, "--zero-copy", "off")
}

// TestGuestRecoverAfterKillZeroCopy is TestGuestRecoverAfterKill with
// --zero-copy and 64 KiB writes, whose data the ring sends from the
// requests' registered pages: the SIGKILL leaves those in flight on the
// dead daemon's rings; the recovered device keeps zero copy and the
// writer neither errs nor loses a write. Skips on a kernel without
// UBLK_F_AUTO_BUF_REG (TestGuestFioVerifyZeroCopy checks the refusal).
func TestGuestRecoverAfterKillZeroCopy(t *testing.T) {
	guest.Require(t)
	if !kernelHasAutoBufReg(t) {
		t.Skip("zero copy needs UBLK_F_AUTO_BUF_REG (Linux 6.16)")
	}
	recoverAfterKill(t, 64<<10, "--zero-copy", "on")
}

// recoverAfterKill kills the daemon under a writer of block-byte blocks
// and recovers the device with attach --recover; extra are more attach
// flags for both daemons.
func recoverAfterKill(t *testing.T, block int, extra ...string) {
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:recover", Device: "/dev/ram1", Port: 4433, PortID: 4})
	args := append([]string{"-a", "127.0.0.1", "-s", "4433", "-n", tg.Opts.NQN, "-i", "2"}, extra...)
	first := startAttach(t, args...)

	// The writer: blocks each stamped with its number, O_DIRECT, 8 MiB.
	blocks := 8 << 20 / block
	f, err := os.OpenFile(first.device, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	stamp := func(buf []byte, i int) {
		for j := 0; j < len(buf); j += 8 {
			buf[j] = byte(i)
			buf[j+1] = byte(i >> 8)
			buf[j+2] = 0xA5
		}
	}
	acked := make(chan int, blocks)
	writerErr := make(chan error, 1)
	go func() {
		buf := guest.AlignedBuf(t, block)
		for i := 0; i < blocks; i++ {
			stamp(buf, i)
			if _, err := f.WriteAt(buf, int64(i)*int64(block)); err != nil {
				writerErr <- fmt.Errorf("block %d: %w", i, err)
				return
			}
			acked <- i
		}
		writerErr <- nil
	}()
	// Kill the daemon once the writer is well under way.
	for n := 0; n < blocks/4; n++ {
		select {
		case <-acked:
		case err := <-writerErr:
			t.Fatalf("writer stopped before the kill: %v", err)
		case <-time.After(time.Minute):
			t.Fatal("writer made no progress")
		}
	}
	if err := first.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	first.wait(t)
	t.Log("daemon SIGKILLed under I/O")

	second := startAttach(t, append(args, "--recover")...)
	if second.device != first.device {
		t.Fatalf("recovered %s, want %s\n%s", second.device, first.device, second.stderr)
	}
	select {
	case err := <-writerErr:
		if err != nil {
			t.Fatalf("the writer saw an error across the crash: %v\n%s", err, second.stderr)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the writer did not finish after recovery")
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(extra, string(attach.UseOn)) {
		st := deviceStatus(t, second.device)
		if !slices.Contains(st.UblkFlags, "AUTO_BUF_REG") || st.ZeroCopyIOs == 0 {
			t.Errorf("recovered daemon: flags %v, %d zero-copy I/Os (%d through a buffer); want zero copy kept", st.UblkFlags, st.ZeroCopyIOs, st.ZeroCopyBounced)
		}
		t.Logf("recovered daemon: %d zero-copy I/Os, %d through a buffer", st.ZeroCopyIOs, st.ZeroCopyBounced)
	}
	buf := guest.AlignedBuf(t, block)
	want := guest.AlignedBuf(t, block)
	for i := 0; i < blocks; i++ {
		if _, err := f.ReadAt(buf, int64(i)*int64(block)); err != nil {
			t.Fatalf("read block %d: %v", i, err)
		}
		stamp(want, i)
		if !bytes.Equal(buf, want) {
			t.Fatalf("block %d does not read back as written", i)
		}
	}
	f.Close()
	if _, stderr, code := runCLI(t, "detach", second.device); code != 0 {
		t.Fatalf("detach: exit %d %s", code, stderr)
	}
	if code := second.wait(t); code != 0 {
		t.Fatalf("recovered daemon exited %d\n%s", code, second.stderr)
	}
	if devs := ublkDevices(t); len(devs) != 0 {
		t.Fatalf("devices left: %v", devs)
	}
}

// TestServeAndDiscover: `serve` exports memory on a free port; `discover`
// against it lists the subsystem; SIGTERM stops it with status 0. No root
// needed: both ends are this module's.
func TestServeAndDiscover(t *testing.T) {
	const nqn = "nqn.2026-11.io.ublk-nvmeof:serve-test"
	cmd, line, stderr := startServeLoopback(t, nqn, "--block-size", "4096")
	// "serving NQN namespace 1 (N bytes) on ADDR"
	f := strings.Fields(line)
	if len(f) < 2 || f[1] != nqn || !strings.Contains(line, "(8388608 bytes)") {
		t.Fatalf("serve printed %q", line)
	}
	host, port, ok := strings.Cut(f[len(f)-1], ":")
	if !ok {
		t.Fatalf("no address in %q", line)
	}

	out, errOut, code := runCLI(t, "discover", "-a", host, "-s", port, "--json")
	var entries []struct{ SubNQN, TrAddr, TrSvcID string }
	if code != 0 || json.Unmarshal([]byte(out), &entries) != nil {
		t.Fatalf("discover: exit %d %q %s", code, out, errOut)
	}
	found := false
	for _, e := range entries {
		if e.SubNQN == nqn && e.TrSvcID == port {
			found = true
		}
	}
	if !found {
		t.Fatalf("discovery log %+v lacks %s", entries, nqn)
	}
	out, _, code = runCLI(t, "discover", "-a", host, "-s", port)
	if code != 0 || !strings.Contains(out, "subnqn:") || !strings.Contains(out, nqn) {
		t.Fatalf("discover (human): exit %d %q", code, out)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("serve after SIGTERM: %v\n%s", err, stderr.String())
	}

	// Bad input: one line, usage status.
	for _, args := range [][]string{
		{"serve", "--nqn", "bad"},
		{"serve", "--nqn", nqn},
		{"serve", "--nqn", nqn, "--size", "lots"},
		{"serve", "--nqn", nqn, "--size", "1M", "--block-size", "1000"},
		{"serve", "--nqn", nqn, "--size", "1M", "--max-connections", "0"},
		{"serve", "--nqn", nqn, "--size", "1M", "--max-connections", "65536"},
	} {
		if _, stderr, code := runCLI(t, args...); code != exitUsage || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%v: exit %d %q", args, code, stderr)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "4k": 4096, "64M": 64 << 20, "1G": 1 << 30, "2GB": 2 << 30} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("%q: %d, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "M", "-1", "0", "1.5G", "9999999999T"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestGuestAttachToServe: both ends of this module in a real kernel:
// `attach` to the in-process target of `serve`, data verified.
func TestGuestAttachToServe(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	const nqn = "nqn.2026-11.io.ublk-nvmeof:serve"
	srv := exec.Command(os.Args[0], "serve", "--listen", "127.0.0.1:4440", "--nqn", nqn, "--size", "16M", "--block-size", "4096")
	srv.Env = append(os.Environ(), envRunMain+"=1")
	stdout, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = srv.Process.Signal(syscall.SIGTERM)
		_ = srv.Wait()
	}()
	if _, err := bufio.NewReader(stdout).ReadString('\n'); err != nil {
		t.Fatalf("serve did not start: %v", err)
	}
	d := startAttach(t, "-a", "127.0.0.1", "-s", "4440", "-n", nqn, "-i", "2", "-G", "-g")
	if err := guest.WaitFor(d.device, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(d.device) + "/queue/logical_block_size"); err != nil || strings.TrimSpace(string(b)) != "4096" {
		t.Errorf("logical block size %q, %v; want 4096 from the namespace", b, err)
	}
	pattern := guest.AlignedBuf(t, 2<<20)
	if _, err := rand.Read(pattern); err != nil {
		t.Fatal(err)
	}
	guest.DirectIO(t, d.device, pattern, 1<<20, true)
	back := guest.AlignedBuf(t, 2<<20)
	guest.DirectIO(t, d.device, back, 1<<20, false)
	if !bytes.Equal(back, pattern) {
		t.Fatal("read back through ublk from the in-process target differs")
	}
	if _, stderr, code := runCLI(t, "detach", d.device); code != 0 {
		t.Fatalf("detach: exit %d %s", code, stderr)
	}
	if code := d.wait(t); code != 0 {
		t.Fatalf("attach exited %d\n%s", code, d.stderr)
	}
}
