package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/attach"
	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
	"github.com/ublk-nvmeof/ublk-nvmeof/ublk"
)

// freezingProxy forwards TCP between the daemon and the target until
// frozen; then it forwards nothing more either way and keeps every
// connection open: a target that stopped answering without the network
// telling (a hung target, a blackhole). Only the command timeout or the
// daemon itself can end the I/O in flight then.
type freezingProxy struct {
	ln     net.Listener
	target string
	frozen chan struct{}
	quit   chan struct{}
	once   sync.Once
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns []net.Conn
}

func newFreezingProxy(t *testing.T, listen, target string) *freezingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	p := &freezingProxy{ln: ln, target: target, frozen: make(chan struct{}), quit: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *freezingProxy) freeze() { p.once.Do(func() { close(p.frozen) }) }

func (p *freezingProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // closed
		}
		t, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, t)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pump(t, c)
		go p.pump(c, t)
	}
}

// pump copies src to dst until either ends; once frozen, what it reads is
// swallowed and it waits for close.
func (p *freezingProxy) pump(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			select {
			case <-p.frozen:
				<-p.quit
				return
			default:
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok {
				_ = tc.CloseWrite()
			}
			return
		}
	}
}

func (p *freezingProxy) close() {
	close(p.quit)
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// writers keeps n O_DIRECT writers of 4 KiB busy on dev, each on its own
// blocks, until a write fails; each writer's first error is reported. The
// device is closed when every writer has stopped, as an application that
// gives up on EIO would: DEL_DEV waits for its openers.
type writers struct {
	acked atomic.Int64
	errs  chan error
}

func startWriters(t *testing.T, dev string, n, block int) *writers {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	w := &writers{errs: make(chan error, n)}
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		buf := guest.AlignedBuf(t, block)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; ; j++ {
				off := int64(i)<<20 + int64(j%(1<<20/block)*block) // 1 MiB per writer
				if _, err := f.WriteAt(buf, off); err != nil {
					w.errs <- err
					return
				}
				w.acked.Add(1)
			}
		}()
	}
	go func() {
		wg.Wait()
		f.Close()
	}()
	return w
}

// waitErrors waits for every writer's error.
func (w *writers) waitErrors(t *testing.T, n int) []error {
	t.Helper()
	var errs []error
	for len(errs) < n {
		select {
		case err := <-w.errs:
			errs = append(errs, err)
		case <-time.After(time.Minute):
			t.Fatalf("%d of %d writers still blocked", n-len(errs), n)
		}
	}
	return errs
}

func (d *daemon) waitLog(t *testing.T, substr string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(d.stderr.String(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("daemon never logged %q\n%s", substr, d.stderr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func deviceStatus(t *testing.T, dev string) attach.Status {
	t.Helper()
	out, stderr, code := runCLI(t, "status", "--json", dev)
	var st attach.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
		t.Fatalf("status: exit %d %q %s", code, out, stderr)
	}
	return st
}

// TestGuestImmediateDetach (the copy path: --zero-copy off): the second
// SIGTERM makes the detach immediate.
// The daemon exits with exitImmediate, the I/O it did not wait for fails
// with EIO, and nothing is left: no /dev/ublk*, and no goroutine (the
// command checks with goleak before it exits, else status exitLeak).
func TestGuestImmediateDetach(t *testing.T) {
	guest.Require(t)
	immediateDetach(t, 4096, "--zero-copy", "off")
}

// TestGuestImmediateDetachZeroCopy is TestGuestImmediateDetach with
// --zero-copy and 64 KiB writes: the immediate teardown finds data sends
// from the requests' registered pages in flight on the rings. Skips on a
// kernel without UBLK_F_AUTO_BUF_REG.
func TestGuestImmediateDetachZeroCopy(t *testing.T) {
	guest.Require(t)
	if !kernelHasAutoBufReg(t) {
		t.Skip("zero copy needs UBLK_F_AUTO_BUF_REG (Linux 6.16)")
	}
	immediateDetach(t, 64<<10, "--zero-copy", "on")
}

// immediateDetach runs TestGuestImmediateDetach's cases with writers of
// block-byte writes and extra attach flags.
func immediateDetach(t *testing.T, block int, extra ...string) {
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	const writersN = 4

	// A target that stops answering: the graceful detach waits in STOP_DEV
	// for the stalled writes, which only the I/O command timeout (30 s,
	// nvmeof.DefaultIOTimeout) would end; keep-alive is set long enough
	// not to notice within the test.
	t.Run("target hung", func(t *testing.T) {
		tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:hurry-hung", Device: "/dev/ram1", Port: 4434, PortID: 5})
		proxy := newFreezingProxy(t, "127.0.0.1:4435", "127.0.0.1:4434")
		d := startAttach(t, append([]string{"-a", "127.0.0.1", "-s", "4435", "-n", tg.Opts.NQN, "-i", "2", "-k", "120"}, extra...)...)
		w := startWriters(t, d.device, writersN, block)
		for w.acked.Load() < 100 {
			time.Sleep(10 * time.Millisecond)
		}
		proxy.freeze()
		// Wait until the writes are stalled in the daemon.
		deadline := time.Now().Add(time.Minute)
		for {
			st := deviceStatus(t, d.device)
			if st.State != "LIVE" {
				t.Fatalf("controller %s before the signals: the hung target was noticed\n%s", st.State, d.stderr)
			}
			if st.InFlight >= writersN {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("writes never stalled: %+v", st)
			}
			time.Sleep(50 * time.Millisecond)
		}
		acked := w.acked.Load()

		if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		d.waitLog(t, "stopping; a second signal")
		if n := w.acked.Load(); n != acked {
			t.Fatalf("%d writes completed after the freeze", n-acked)
		}
		select {
		case err := <-d.waited:
			d.waited <- err
			t.Fatalf("the graceful detach ended (%v) with writes stalled on a hung target\n%s", err, d.stderr)
		default:
		}
		if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		// The bound is the command timeout: exiting before it shows the
		// daemon did not wait for the stalled writes to time out.
		select {
		case <-d.waited:
		case <-time.After(25 * time.Second):
			t.Fatalf("no exit within 25 s of the second SIGTERM\n%s", d.stderr)
		}
		d.waited <- nil
		if code := d.cmd.ProcessState.ExitCode(); code != exitImmediate {
			t.Fatalf("exit %d after two SIGTERMs, want %d\n%s", code, exitImmediate, d.stderr)
		}
		for _, err := range w.waitErrors(t, writersN) {
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("stalled write ended with %v, want EIO", err)
			}
		}
		if devs := ublkDevices(t); len(devs) != 0 {
			t.Fatalf("devices left: %v\n%s", devs, d.stderr)
		}
		// The teardown itself went right: STOP_DEV, the queues, DEL_DEV.
		if strings.Contains(d.stderr.String(), "level=ERROR") {
			t.Fatalf("errors in the daemon's log:\n%s", d.stderr)
		}
		t.Logf("daemon log:\n%s", d.stderr)
	})

	// The target's port removed: the controller reconnects in vain and the
	// writes are held. Held I/O fails at the first signal already (DELETING
	// fails it); whichever signal ends the daemon, the held writes get EIO
	// and nothing is left.
	t.Run("port removed", func(t *testing.T) {
		tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:hurry-held", Device: "/dev/ram1", Port: 4436, PortID: 6})
		d := startAttach(t, append([]string{"-a", "127.0.0.1", "-s", "4436", "-n", tg.Opts.NQN, "-i", "2", "-c", "1"}, extra...)...)
		w := startWriters(t, d.device, writersN, block)
		for w.acked.Load() < 100 {
			time.Sleep(10 * time.Millisecond)
		}
		if err := tg.UnlinkPort(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(time.Minute)
		for st := deviceStatus(t, d.device); st.Held < writersN; st = deviceStatus(t, d.device) {
			if time.Now().After(deadline) {
				t.Fatalf("writes never held: %+v\n%s", st, d.stderr)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		d.waitLog(t, "stopping; a second signal")
		// Ignored if the process has exited already.
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.waited:
		case <-time.After(time.Minute):
			t.Fatalf("no exit after two SIGTERMs\n%s", d.stderr)
		}
		d.waited <- nil
		code := d.cmd.ProcessState.ExitCode()
		if code != exitOK && code != exitImmediate {
			t.Fatalf("exit %d, want %d or %d\n%s", code, exitOK, exitImmediate, d.stderr)
		}
		t.Logf("exit %d; daemon log:\n%s", code, d.stderr)
		for _, err := range w.waitErrors(t, writersN) {
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("held write ended with %v, want EIO", err)
			}
		}
		if devs := ublkDevices(t); len(devs) != 0 {
			t.Fatalf("devices left: %v\n%s", devs, d.stderr)
		}
	})
}

// TestGuestFioVerify (the copy path: --zero-copy off, which 7.3 would
// otherwise use by default): attach, fio writes with crc32c verification (4 KiB
// random writes and 128 KiB random writes, several jobs each on its own
// region, libaio at depth 8), then `detach`. fio must report no error and
// no verify failure; the daemon exits 0 and leaves nothing.
func TestGuestFioVerify(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:fio", Device: "/dev/ram1", Port: 4437, PortID: 7})
	d := startAttach(t, "-a", "127.0.0.1", "-s", "4437", "-n", tg.Opts.NQN, "-i", "2", "-Q", "64", "--zero-copy", "off")
	fioVerify(t, d.device)
	detachAndCheck(t, d)
}

// fioVerify writes with fio's verification, 4 KiB and 128 KiB random
// writes from several jobs each on its own region, and fails t unless
// every block written reads back verified.
func fioVerify(t *testing.T, device string) {
	t.Helper()
	for _, c := range []struct {
		name        string
		bs          string
		jobs        int
		sizePerJob  string
		regionBytes int
	}{
		{"randwrite-4k", "4k", 4, "4m", 4 << 20},
		{"randwrite-128k", "128k", 3, "8m", 8 << 20},
	} {
		args := []string{
			"--name=" + c.name, "--filename=" + device, "--direct=1", "--ioengine=libaio", "--iodepth=8",
			"--rw=randwrite", "--bs=" + c.bs, "--numjobs=" + fmt.Sprint(c.jobs), "--size=" + c.sizePerJob,
			// Each job on its own region: verification of one job's
			// blocks is not disturbed by another's writes.
			"--offset_increment=" + fmt.Sprint(c.regionBytes),
			"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_dump=0",
			"--group_reporting=0", "--output-format=json",
		}
		cmd := exec.Command("fio", args...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: fio: %v\n%s\n%s", c.name, err, out, stderr.String())
		}
		var res struct {
			Jobs []struct {
				Name  string `json:"jobname"`
				Error int    `json:"error"`
				Write struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"write"`
				Read struct {
					IOBytes int64 `json:"io_bytes"`
				} `json:"read"`
			} `json:"jobs"`
		}
		// fio may print notes before the JSON document.
		if i := bytes.IndexByte(out, '{'); i > 0 {
			out = out[i:]
		}
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("%s: fio output: %v\n%s", c.name, err, out)
		}
		if len(res.Jobs) != c.jobs {
			t.Fatalf("%s: fio reported %d jobs, want %d", c.name, len(res.Jobs), c.jobs)
		}
		for _, j := range res.Jobs {
			// The verify phase reads back every block written.
			if j.Error != 0 || j.Write.IOBytes == 0 || j.Read.IOBytes < j.Write.IOBytes {
				t.Errorf("%s: job error %d, wrote %d bytes, verified %d", c.name, j.Error, j.Write.IOBytes, j.Read.IOBytes)
			}
		}
		if s := stderr.String(); strings.Contains(s, "verify") {
			t.Errorf("%s: fio stderr: %s", c.name, s)
		}
		t.Logf("%s: %d jobs verified", c.name, len(res.Jobs))
	}
}

// detachAndCheck detaches d and checks that the daemon exits 0 and leaves
// no ublk device.
func detachAndCheck(t *testing.T, d *daemon) {
	t.Helper()
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

// TestGuestFioVerifyZeroCopy is TestGuestFioVerify with --zero-copy: each
// request's data moves between its own pages and the socket (READ_FIXED,
// WRITE_FIXED on the queue's ring; small pieces by user copy), and what
// fio verified through the device is also what the target's RAM disk
// holds, read there directly. On a kernel without UBLK_F_AUTO_BUF_REG
// attach refuses with a one-line error naming it and its release, exits
// non-zero and leaves no device; then the test skips with that reason.
func TestGuestFioVerifyZeroCopy(t *testing.T) {
	guest.Require(t)
	t.Setenv("UBLK_NVMEOF_RUN_DIR", t.TempDir())
	tg := guest.NewTarget(t, guest.TargetOptions{NQN: "nqn.2026-11.io.ublk-nvmeof:zc", Device: "/dev/ram1", Port: 4438, PortID: 8})
	args := []string{"-a", "127.0.0.1", "-s", "4438", "-n", tg.Opts.NQN, "-i", "2", "-Q", "64", "--zero-copy", "on"}
	if !kernelHasAutoBufReg(t) {
		_, stderr, code := runCLI(t, append([]string{"attach"}, args...)...)
		lines := strings.Split(strings.TrimSpace(stderr), "\n")
		last := lines[len(lines)-1]
		if code != exitNoKernel || !strings.HasPrefix(last, "ublk-nvmeof: ") || !strings.Contains(last, "UBLK_F_AUTO_BUF_REG") || !strings.Contains(last, "6.16") {
			t.Fatalf("attach --zero-copy on a kernel without AUTO_BUF_REG: exit %d, stderr %q; want exit %d and a last line naming UBLK_F_AUTO_BUF_REG and 6.16", code, stderr, exitNoKernel)
		}
		if devs := ublkDevices(t); len(devs) != 0 {
			t.Fatalf("devices left after the refusal: %v", devs)
		}
		t.Skipf("zero copy: refused as it should be: %s", last)
	}
	d := startAttach(t, args...)
	st := deviceStatus(t, d.device)
	if !slices.Contains(st.UblkFlags, "AUTO_BUF_REG") || !slices.Contains(st.UblkFlags, "USER_COPY") {
		t.Fatalf("device flags %v: want AUTO_BUF_REG and USER_COPY", st.UblkFlags)
	}
	fioVerify(t, d.device)
	if st := deviceStatus(t, d.device); st.ZeroCopyIOs == 0 || st.ZeroCopyBounced > st.ZeroCopyIOs/10 {
		t.Errorf("status: %d zero-copy I/Os, %d through a buffer; want nearly all zero copy", st.ZeroCopyIOs, st.ZeroCopyBounced)
	} else {
		t.Logf("status: %d zero-copy I/Os, %d through a buffer (%s)", st.ZeroCopyIOs, st.ZeroCopyBounced, st.UblkDataPath)
	}
	// The oracle: the RAM disk behind the target holds what was written
	// through the device.
	const n = 16 << 20
	viaDev, viaDisk := readDirect(t, d.device, n), readDirect(t, "/dev/ram1", n)
	if !bytes.Equal(viaDev, viaDisk) {
		t.Fatalf("the first %d bytes read through %s differ from the target's /dev/ram1", n, d.device)
	}
	detachAndCheck(t, d)
}

func kernelHasAutoBufReg(t *testing.T) bool {
	ctl, err := ublk.OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	feats, err := ctl.Features()
	if err != nil {
		t.Fatal(err)
	}
	return feats.Has(ublk.FeatureAutoBufReg)
}

// readDirect reads the first n bytes of a block device with O_DIRECT.
func readDirect(t *testing.T, path string, n int) []byte {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(b)
	if _, err := io.ReadFull(f, b); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return bytes.Clone(b)
}
