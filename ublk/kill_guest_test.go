package ublk

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/e2e/guest"
)

// writer writes 64 KiB blocks with O_DIRECT round-robin over a region,
// each with a fresh seed, and remembers the seed of every acknowledged
// write.
type writer struct {
	f      *os.File
	first  int // first block it writes
	blocks int
	acked  atomic.Int64
	mu     sync.Mutex
	seeds  map[int]byte // block -> seed of the last acknowledged write
	err    error        // first write error
	stop   chan struct{}
	done   chan struct{}
}

const wblock = 64 << 10

func startWriter(t *testing.T, path string, blocks int) *writer {
	return startWriterAt(t, path, 0, blocks)
}

// startWriterAt writes blocks first .. first+blocks-1.
func startWriterAt(t *testing.T, path string, first, blocks int) *writer {
	w := &writer{first: first, blocks: blocks, seeds: map[int]byte{}, stop: make(chan struct{}), done: make(chan struct{})}
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.f = f
	buf := alignedBuf(t, wblock)
	go func() {
		defer close(w.done)
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			blk := w.first + i%blocks
			seed := byte(i/blocks + 1)
			off := int64(blk) * wblock
			pattern(buf, seed, off)
			if _, err := f.WriteAt(buf, off); err != nil {
				w.mu.Lock()
				w.err = fmt.Errorf("write block %d: %w", blk, err)
				// A failed write leaves the block's content undefined.
				delete(w.seeds, blk)
				w.mu.Unlock()
				return
			}
			w.mu.Lock()
			w.seeds[blk] = seed
			w.mu.Unlock()
			w.acked.Add(1)
		}
	}()
	return w
}

// waitAcked waits for n more acknowledged writes; false if the writer
// stopped or nothing progressed for a minute (a hang).
func (w *writer) waitAcked(n int64) bool {
	target := w.acked.Load() + n
	last, lastT := w.acked.Load(), time.Now()
	for w.acked.Load() < target {
		select {
		case <-w.done:
			return false
		case <-time.After(20 * time.Millisecond):
		}
		if a := w.acked.Load(); a != last {
			last, lastT = a, time.Now()
		} else if time.Since(lastT) > time.Minute {
			return false
		}
	}
	return true
}

func (w *writer) finish() error {
	close(w.stop)
	<-w.done
	w.f.Close()
	return w.err
}

// verify reads every acknowledged block back through path.
func (w *writer) verify(t *testing.T, path string) {
	t.Helper()
	f := openBlock(t, path, os.O_RDONLY|unix.O_DIRECT)
	defer f.Close()
	buf := alignedBuf(t, wblock)
	for blk, seed := range w.seeds {
		off := int64(blk) * wblock
		if _, err := f.ReadAt(buf, off); err != nil {
			t.Fatalf("read back block %d: %v", blk, err)
		}
		checkPattern(t, fmt.Sprintf("acknowledged block %d (seed %d)", blk, seed), buf, seed, off)
	}
}

// startFileDaemon creates a device on an 8 MiB backing file, served by a
// daemon in recovery mode mode (env: more of its settings), and waits for
// its block node; it returns the daemon, the file (for the daemon that
// recovers it) and the node.
func startFileDaemon(t *testing.T, mode RecoveryMode, env ...string) (*daemon, string, string) {
	t.Helper()
	file := backingFile(t, 8*mib)
	a := startDaemon(t, append([]string{envHelper + "=create", envFile + "=" + file, fmt.Sprintf("%s=%d", envRecovery, mode)}, env...)...)
	bdev := fmt.Sprintf("/dev/ublkb%d", a.id)
	openBlock(t, bdev, os.O_RDONLY).Close() // wait for the node
	return a, file, bdev
}

// startWriterAcked starts a writer on the first blocks of path and waits
// for 20 acknowledged writes; without them the test fails with what.
func startWriterAcked(t *testing.T, path string, blocks int, what string) *writer {
	t.Helper()
	w := startWriter(t, path, blocks)
	if !w.waitAcked(20) {
		t.Fatalf("%s: %v", what, w.finish())
	}
	return w
}

// waitWriterStopped waits for a writer to stop on its own once the daemon
// died; still blocked after 2 minutes, the test fails with what.
func waitWriterStopped(t *testing.T, w *writer, what string) {
	t.Helper()
	select {
	case <-w.done:
	case <-time.After(2 * time.Minute):
		t.Fatal(what)
	}
}

// TestGuestRecoveryAfterSIGKILL: a daemon serving a USER_RECOVERY_REISSUE
// device is SIGKILLed under write load; a new process recovers the device;
// the writer sees no error and every acknowledged write reads back.
func TestGuestRecoveryAfterSIGKILL(t *testing.T) {
	guest.Require(t)
	recoverAfterSIGKILL(t, openControl(t))
}

// recoverAfterSIGKILL is TestGuestRecoveryAfterSIGKILL with the daemons
// configured by env as well.
func recoverAfterSIGKILL(t *testing.T, c *Control, env ...string) {
	a, file, bdev := startFileDaemon(t, RecoveryReissue, env...)
	// Four writers on disjoint blocks keep several requests in flight
	// when the daemon dies: all of them must be reissued.
	const nw, per = 4, 8 * mib / wblock / 4
	var ws []*writer
	for i := range nw {
		ws = append(ws, startWriterAt(t, bdev, i*per, per))
	}
	w := ws[0]
	if !w.waitAcked(30) {
		t.Fatalf("writer made no progress before the kill: %v", w.finish())
	}
	a.kill(t)
	t.Logf("daemon %d killed after %d writes of writer 0", a.cmd.Process.Pid, w.acked.Load())
	info, err := c.DeviceInfo(t.Context(), a.id)
	if err != nil {
		t.Fatalf("device gone after its daemon died, despite recovery: %v", err)
	}
	t.Logf("device after the kill: %v", info.State)

	b := startDaemon(t, append([]string{envHelper + "=recover", envFile + "=" + file, fmt.Sprintf("%s=%d", envID, a.id)}, env...)...)
	if b.id != a.id {
		t.Fatalf("recovered device %d, want %d", b.id, a.id)
	}
	if !w.waitAcked(30) {
		t.Fatalf("writer made no progress after recovery: %v", w.finish())
	}
	for i, w := range ws {
		if err := w.finish(); err != nil {
			t.Fatalf("writer %d saw an I/O error across the daemon's death: %v", i, err)
		}
		t.Logf("writer %d: %d writes acknowledged", i, w.acked.Load())
	}
	info, err = c.DeviceInfo(t.Context(), a.id)
	if err != nil || info.State != StateLive || info.DaemonPID != b.cmd.Process.Pid {
		t.Errorf("device after recovery: %+v, %v; want LIVE served by pid %d", info, err, b.cmd.Process.Pid)
	}
	if slices.Contains(env, envZeroCopy+"=1") && !info.Flags.Has(FeatureAutoBufReg) {
		t.Errorf("zero-copy device after recovery: flags %v lack AUTO_BUF_REG", info.Flags)
	}
	if slices.Contains(env, envBatch+"=1") && !info.Flags.Has(FeatureBatchIO) {
		t.Errorf("batch device after recovery: flags %v lack BATCH_IO", info.Flags)
	}
	for _, w := range ws {
		w.verify(t, bdev)
	}
	b.stop(t)
	assertGone(t, c, a.id)
}

// TestGuestSIGKILLWithoutRecovery: without USER_RECOVERY the block device
// goes away when its daemon dies, I/O fails instead of hanging, and the
// leftover device can be removed.
func TestGuestSIGKILLWithoutRecovery(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	a, _, bdev := startFileDaemon(t, RecoveryNone)
	w := startWriterAcked(t, bdev, 8*mib/wblock, "writer made no progress")
	a.kill(t)
	waitWriterStopped(t, w, "writer still blocked 2 minutes after the daemon died")
	if err := w.finish(); err == nil {
		t.Error("writer saw no error although the device lost its daemon")
	} else {
		t.Logf("writer: %v", err)
	}
	sys := fmt.Sprintf("/sys/block/ublkb%d", a.id)
	for i := 0; ; i++ {
		if _, err := os.Stat(sys); errors.Is(err, os.ErrNotExist) {
			break
		}
		if i > 600 {
			t.Fatalf("%s still exists a minute after the daemon died", sys)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := c.Remove(t.Context(), a.id); err != nil {
		t.Fatalf("Remove leftover device: %v", err)
	}
	assertGone(t, c, a.id)
}

// TestGuestDeleteUnderIO: Close while several goroutines do I/O completes;
// the I/O fails or completes, nothing hangs, nothing is left.
func TestGuestDeleteUnderIO(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	const size = 8 * mib
	b := newCountingBackend(t, size, 2)
	d, err := c.Create(t.Context(), Options{ID: AutoID, Queues: 2, Depth: 128, Params: Params{Size: size}}, b)
	if err != nil {
		t.Fatal(err)
	}
	var ws []*writer
	for range 4 {
		w := startWriter(t, d.BlockDevice(), size/wblock)
		// Each writer closes its fd when its I/O fails, which DEL_DEV
		// waits for.
		go func() { <-w.done; w.f.Close() }()
		ws = append(ws, w)
	}
	if !ws[0].waitAcked(50) {
		t.Fatalf("no I/O progress: %v", ws[0].finish())
	}
	if err := d.Close(t.Context()); err != nil {
		t.Fatalf("Close under I/O: %v", err)
	}
	for i, w := range ws {
		select {
		case <-w.done:
		case <-time.After(time.Minute):
			t.Fatalf("writer %d still blocked after the device was deleted", i)
		}
		t.Logf("writer %d: %d writes, then %v", i, w.acked.Load(), w.err)
	}
	assertGone(t, c, d.ID())
}

// TestGuestRecoveryWithoutReissue: with plain USER_RECOVERY the writes in
// flight when the daemon dies may fail, but the device survives, a new
// process recovers it, new writes succeed, and every acknowledged write,
// before and after, reads back.
func TestGuestRecoveryWithoutReissue(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	a, file, bdev := startFileDaemon(t, Recovery)
	w1 := startWriterAcked(t, bdev, 4*mib/wblock, "writer made no progress")
	a.kill(t)
	b := startDaemon(t, envHelper+"=recover", envFile+"="+file, fmt.Sprintf("%s=%d", envID, a.id))
	// The first writer either failed its in-flight write or carried on.
	err1 := w1.finish()
	t.Logf("writer across the kill: %d writes, then %v", w1.acked.Load(), err1)
	w2 := startWriterAcked(t, bdev, 4*mib/wblock, "no progress after recovery")
	if err := w2.finish(); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	// w2 rewrote w1's blocks with the same seeds only where it got to;
	// check w1's blocks that w2 did not touch, then all of w2's.
	for blk := range w2.seeds {
		delete(w1.seeds, blk)
	}
	w1.verify(t, bdev)
	w2.verify(t, bdev)
	b.stop(t)
	assertGone(t, c, a.id)
}

// TestGuestRecoveryFailIO: with USER_RECOVERY_FAIL_IO (6.13) the device of
// a SIGKILLed daemon stays, in state FAIL_IO, and I/O fails at once instead
// of waiting; a new process recovers it and I/O works again. A request in
// flight when the daemon died fails with EIO (or EREMOTEIO if it was
// requeued after the queue was marked); a new one with EREMOTEIO: the
// driver ends it with BLK_STS_TARGET while ubq->fail_io is set
// (drivers/block/ublk_drv.c, ublk_prep_req; "ublk: support device recovery
// without I/O queueing", Linux 6.13), not with EIO.
func TestGuestRecoveryFailIO(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	if f, _ := c.Features(); !f.Has(FeatureUserRecoveryFailIO) {
		t.Skipf("this kernel lacks UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13): features %v", f)
	}
	a, file, bdev := startFileDaemon(t, RecoveryFailIO)
	w := startWriterAcked(t, bdev, 8*mib/wblock, "writer made no progress")
	a.kill(t)
	waitWriterStopped(t, w, "writer still blocked 2 minutes after the daemon died: I/O waits instead of failing")
	if err := w.finish(); !errors.Is(err, unix.EIO) && !errors.Is(err, unix.EREMOTEIO) {
		t.Fatalf("writer across the daemon's death: %v, want EIO or EREMOTEIO", err)
	} else {
		t.Logf("writer across the daemon's death: %v", err)
	}
	waitState(t, c, a.id, StateFailIO)

	// New I/O fails too, and at once, while there is no daemon.
	f := openBlock(t, bdev, os.O_RDONLY|unix.O_DIRECT)
	buf := alignedBuf(t, wblock)
	read := make(chan error, 1)
	go func() { _, err := f.ReadAt(buf, 0); read <- err }()
	select {
	case err := <-read:
		if !errors.Is(err, unix.EREMOTEIO) {
			t.Errorf("read without a daemon: %v, want EREMOTEIO (BLK_STS_TARGET)", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("read without a daemon blocked for 2 minutes")
	}
	f.Close()

	b := startDaemon(t, envHelper+"=recover", envFile+"="+file, fmt.Sprintf("%s=%d", envID, a.id))
	waitState(t, c, a.id, StateLive)
	w2 := startWriterAcked(t, bdev, 8*mib/wblock, "writer made no progress after recovery")
	if err := w2.finish(); err != nil {
		t.Fatalf("writer after recovery: %v", err)
	}
	w2.verify(t, bdev)
	b.stop(t)
	assertGone(t, c, a.id)
}

// waitState waits up to a minute for device id to reach state want (the
// driver moves it asynchronously after its daemon died).
func waitState(t *testing.T, c *Control, id int, want DeviceState) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		info, err := c.DeviceInfo(t.Context(), id)
		if err == nil && info.State == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("device %d: %+v, %v; want state %v", id, info, err, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestGuestHandoff: with UBLK_F_QUIESCE (6.16; 7.3 here) a daemon hands its
// device over (Device.Handoff) under write load, with requests in flight in
// its backend: it finishes what it holds and abandons nothing; a new
// process recovers the device; the writers see no error and every
// acknowledged write reads back. Without QUIESCE (6.12) Handoff refuses,
// naming the feature, and the device goes on serving.
func TestGuestHandoff(t *testing.T) {
	guest.Require(t)
	c := openControl(t)
	if feats, _ := c.Features(); !feats.Has(FeatureQuiesce) {
		err := handoffRefused(t, c, false)
		t.Skipf("this kernel lacks UBLK_F_QUIESCE (Linux 6.16): Handoff refuses (%v); a daemon hands over by exiting, see TestGuestRecoveryAfterSIGKILL", err)
	}
	a, file, bdev := startFileDaemon(t, RecoveryReissue, envHandoff+"=1", envDelay+"=2ms")
	if info, err := c.DeviceInfo(t.Context(), a.id); err != nil || !info.Flags.Has(FeatureQuiesce) {
		t.Fatalf("device %+v, %v: want UBLK_F_QUIESCE among its flags (Create sets it with recovery)", info, err)
	}
	const nw, per = 4, 8 * mib / wblock / 4
	var ws []*writer
	for i := range nw {
		ws = append(ws, startWriterAt(t, bdev, i*per, per))
	}
	if !ws[0].waitAcked(30) {
		t.Fatalf("writer made no progress before the hand-over: %v", ws[0].finish())
	}
	a.stdin.Close() // the helper hands the device over and exits
	var handoff string
	for line := range a.lines {
		if rest, ok := strings.CutPrefix(line, "HANDOFF "); ok {
			handoff = rest
		}
	}
	<-a.exited
	if a.err != nil {
		t.Fatalf("old daemon: %v", a.err)
	}
	if handoff == "" {
		t.Fatal("the old daemon never reported its hand-over")
	}
	abandoned, herr, _ := strings.Cut(handoff, " ")
	t.Logf("hand-over: %s request(s) abandoned, error %s", abandoned, herr)
	if abandoned != "0" || herr != "<nil>" {
		t.Errorf("the hand-over abandoned %s request(s), error %s; want 0, <nil>", abandoned, herr)
	}
	waitState(t, c, a.id, StateQuiesced)
	for i, w := range ws {
		select {
		case <-w.done:
			t.Fatalf("writer %d stopped while no daemon served the device: %v", i, w.finish())
		default:
		}
	}

	b := startDaemon(t, envHelper+"=recover", envFile+"="+file, fmt.Sprintf("%s=%d", envID, a.id))
	if !ws[0].waitAcked(30) {
		t.Fatalf("writer made no progress after recovery: %v", ws[0].finish())
	}
	for i, w := range ws {
		if err := w.finish(); err != nil {
			t.Fatalf("writer %d saw an I/O error across the hand-over: %v", i, err)
		}
	}
	for _, w := range ws {
		w.verify(t, bdev)
	}
	b.stop(t)
	assertGone(t, c, a.id)
}

// handoffRefused: on a kernel without QUIESCE, Handoff fails naming the
// feature and leaves the device serving.
// With batch, on a BATCH_IO device, it fails naming that.
func handoffRefused(t *testing.T, c *Control, batch bool) error {
	t.Helper()
	d, err := c.Create(t.Context(), Options{ID: AutoID, Depth: 4, Recovery: RecoveryReissue, BatchIO: batch, Params: Params{Size: mib}}, NullBackend{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := d.Close(t.Context()); err != nil {
			t.Error(err)
		}
	}()
	n, err := d.Handoff(t.Context())
	var fe *FeatureError
	switch {
	case batch:
		if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "UBLK_F_BATCH_IO") || n != 0 {
			t.Errorf("Handoff of a BATCH_IO device: %d, %v; want ErrNotSupported naming UBLK_F_BATCH_IO", n, err)
		}
	case !errors.Is(err, ErrNotSupported) || !errors.As(err, &fe) || fe.Feature != "UBLK_F_QUIESCE" || n != 0:
		t.Errorf("Handoff without QUIESCE: %d, %v; want ErrNotSupported naming UBLK_F_QUIESCE", n, err)
	}
	f := openBlock(t, d.BlockDevice(), os.O_RDONLY|unix.O_DIRECT)
	defer f.Close()
	if _, err := f.ReadAt(alignedBuf(t, 4096), 0); err != nil {
		t.Errorf("the device stopped serving after a refused hand-over: %v", err)
	}
	return err
}
