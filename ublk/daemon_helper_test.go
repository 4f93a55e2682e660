package ublk

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The SIGKILL tests need a daemon in another process: the test binary
// re-executes itself to run TestHelperDaemon, configured by these
// variables.
const (
	envHelper   = "UBLK_TEST_HELPER"   // "create" or "recover"
	envFile     = "UBLK_TEST_FILE"     // backing file
	envID       = "UBLK_TEST_ID"       // device to recover
	envRecovery = "UBLK_TEST_RECOVERY" // RecoveryMode for create
	// envHandoff=1: at the end hand the device over (Device.Handoff,
	// printing "HANDOFF <abandoned> <error>") instead of closing it.
	envHandoff = "UBLK_TEST_HANDOFF"
	// envDelay: serve every request that long later, from another
	// goroutine, so that requests are in flight in the backend.
	envDelay = "UBLK_TEST_DELAY"
	// envZeroCopy=1: create with ZeroCopy, and serve (also at recover)
	// with the ring file backend on the backing file.
	envZeroCopy = "UBLK_TEST_ZEROCOPY"
	// envBatch=1: create with BatchIO (a recovered device keeps it).
	envBatch = "UBLK_TEST_BATCH"
)

// delayedBackend completes each request after a delay, on its own
// goroutine (joined by wait).
type delayedBackend struct {
	b     fileBackend
	delay time.Duration
	wg    sync.WaitGroup
}

func (b *delayedBackend) Serve(r *Request) {
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		time.Sleep(b.delay)
		b.b.Serve(r)
	}()
}

// fileBackend serves from a file with pread/pwrite, so the data outlives
// the daemon process. Writes are idempotent, as RecoveryReissue needs.
type fileBackend struct{ f *os.File }

func (b fileBackend) Serve(r *Request) {
	var err error
	switch r.Op {
	case OpRead:
		_, err = b.f.ReadAt(r.Buf, r.Offset)
	case OpWrite:
		_, err = b.f.WriteAt(r.Buf, r.Offset)
	case OpFlush:
		err = unix.Fdatasync(int(b.f.Fd()))
	case OpDiscard, OpWriteZeroes:
		err = unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, r.Offset, int64(r.Length))
	default:
		err = syscall.EOPNOTSUPP
	}
	r.Complete(err)
}

// TestHelperDaemon is not a test: it is the daemon process of the SIGKILL
// tests. It creates or recovers a device backed by a file, prints
// "READY <id>", serves until its stdin closes, then closes the device and
// prints "CLOSED".
func TestHelperDaemon(t *testing.T) {
	mode := os.Getenv(envHelper)
	if mode == "" {
		t.Skip("helper process of the SIGKILL tests; runs only when re-executed by them")
	}
	f, err := os.OpenFile(os.Getenv(envFile), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	c, err := OpenControl()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var d *Device
	var backend Backend = fileBackend{f}
	var delayed *delayedBackend
	if v := os.Getenv(envDelay); v != "" {
		delay, err := time.ParseDuration(v)
		if err != nil {
			t.Fatal(err)
		}
		delayed = &delayedBackend{b: fileBackend{f}, delay: delay}
		backend = delayed
	}
	zeroCopy := os.Getenv(envZeroCopy) == "1"
	if zeroCopy {
		backend = ringFileBackendFor(int(f.Fd()), 2, 64)
	}
	switch mode {
	case "create":
		rec, _ := strconv.Atoi(os.Getenv(envRecovery))
		d, err = c.Create(ctx, Options{ID: AutoID, Queues: 2, Depth: 64, Recovery: RecoveryMode(rec), ZeroCopy: zeroCopy,
			BatchIO: os.Getenv(envBatch) == "1",
			Params:  Params{Size: uint64(fi.Size()), VolatileCache: true}}, backend)
	case "recover":
		id, _ := strconv.Atoi(os.Getenv(envID))
		d, err = c.Recover(ctx, id, backend)
	default:
		t.Fatalf("unknown helper mode %q", mode)
	}
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("\nREADY %d\n", d.ID())
	io.Copy(io.Discard, os.Stdin)
	if os.Getenv(envHandoff) == "1" {
		hctx, hcancel := context.WithTimeout(context.Background(), time.Minute)
		defer hcancel()
		n, err := d.Handoff(hctx)
		fmt.Printf("\nHANDOFF %d %v\n", n, err)
		if delayed != nil {
			delayed.wg.Wait()
		}
		return
	}
	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("\nCLOSED\n")
}

// daemon is a running helper process.
type daemon struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	id     int
	lines  chan string   // stdout lines after READY
	exited chan struct{} // closed after Wait returned
	err    error         // Wait's result, valid after exited
}

func startDaemon(t *testing.T, env ...string) *daemon {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperDaemon$", "-test.v")
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cmd: cmd, stdin: stdin, lines: make(chan string, 100), exited: make(chan struct{})}
	ready := make(chan int, 1)
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		// Owned by the daemon: it ends at EOF, which Wait below waits for.
		defer readers.Done()
		defer close(d.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			t.Logf("daemon %d: %s", cmd.Process.Pid, line)
			if id, ok := strings.CutPrefix(line, "READY "); ok {
				n, _ := strconv.Atoi(id)
				ready <- n
				continue
			}
			select {
			case d.lines <- line:
			default:
			}
		}
	}()
	go func() {
		readers.Wait()
		d.err = cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-d.exited
	})
	select {
	case d.id = <-ready:
	case <-d.exited:
		t.Fatalf("daemon exited before READY: %v", d.err)
	case <-time.After(2 * time.Minute):
		t.Fatal("daemon not READY after 2 minutes")
	}
	return d
}

func (d *daemon) kill(t *testing.T) {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-d.exited
}

// stop closes the daemon's stdin, so it closes its device and exits.
func (d *daemon) stop(t *testing.T) {
	t.Helper()
	d.stdin.Close()
	select {
	case <-d.exited:
		if d.err != nil {
			t.Errorf("daemon: %v", d.err)
		}
	case <-time.After(2 * time.Minute):
		t.Error("daemon did not exit 2 minutes after its stdin closed")
	}
}

func backingFile(t *testing.T, size int64) string {
	t.Helper()
	// /tmp is tmpfs in the VM: supports punch hole, and fast.
	f, err := os.CreateTemp("", "ublk-backing-*.img")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(f.Name()) })
	return f.Name()
}
