package ublk

import (
	"errors"
	"log/slog"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// echoBackend is a RingLifecycle over one socket: it keeps a receive armed
// on it, records what arrives and on which thread, and cancels the
// receive when the queue stops. It serves no block requests.
type echoBackend struct {
	fd  int
	buf []byte // mmap'd: the kernel writes into it

	mu        sync.Mutex
	tid       int    // thread RingCompletion runs on
	got       []byte // bytes received
	results   []int32
	inFlight  int
	stopped   bool
	late      bool // something armed after StopRing
	abandoned bool // RingAbandoned called
	armErr    error
}

const (
	echoRecv   = 1
	echoSend   = 2
	echoCancel = 3
)

func (b *echoBackend) Serve(r *Request) { r.Complete(unix.EOPNOTSUPP) }
func (b *echoBackend) RingEntries() int { return 4 }

func (b *echoBackend) StartRing(r *QueueRing) { b.arm(r) }

// arm posts the receive; b.mu held or the loop not started.
func (b *echoBackend) arm(r *QueueRing) {
	if b.stopped {
		b.late = true
		return
	}
	if err := r.Recv(b.fd, b.buf, echoRecv); err != nil {
		b.armErr = err
		return
	}
	b.inFlight++
}

func (b *echoBackend) RingCompletion(r *QueueRing, c RingCQE) {
	ud, res := c.UserData, c.Res
	b.mu.Lock()
	defer b.mu.Unlock()
	b.tid = unix.Gettid()
	b.inFlight--
	switch ud {
	case echoRecv:
		b.results = append(b.results, res)
		if res > 0 {
			b.got = append(b.got, b.buf[:res]...)
			if !b.stopped {
				b.arm(r)
			}
		}
	case echoSend, echoCancel:
		b.results = append(b.results, res)
	}
}

func (b *echoBackend) StopRing(r *QueueRing) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stopped = true
	if err := r.CancelFd(b.fd, echoCancel); err != nil {
		b.armErr = err
		return
	}
	b.inFlight++
}

func (b *echoBackend) RingAbandoned(*QueueRing) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.abandoned = true
}

func (b *echoBackend) RingIdle(r *QueueRing) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inFlight == 0
}

// ringQueue runs a queue loop with a ring, an eventfd and b, but no ublk
// device (no fetches: its one tag is never aborted, so only forceStop
// ends it), on its own locked thread. It returns the queue, the loop
// thread's id and a channel that gets the loop's result once the ring is
// closed.
func ringQueue(t *testing.T, b RingLifecycle) (*queue, int, <-chan error) {
	t.Helper()
	q := newQueue(0, 1, 4096, -1, true, b, slog.Default())
	q.ringBackend, q.qr.q = b, q
	ready := make(chan error, 1)
	tid := make(chan int, 1)
	exited := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var err error
		defer func() { exited <- err }()
		defer q.teardown()
		if q.ring, err = newQueueRing(q.ringEntries()); err != nil {
			ready <- err
			return
		}
		if q.wake, err = unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
			ready <- err
			return
		}
		if q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
			ready <- err
			return
		}
		defer q.stopRing(b)
		b.StartRing(&q.qr)
		if err = q.prepWake(); err == nil {
			_, err = q.ring.Submit(0)
		}
		tid <- unix.Gettid()
		ready <- err
		if err == nil {
			err = q.loop()
		}
	}()
	if err := <-ready; err != nil {
		if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
			t.Skipf("io_uring unavailable: %v", err)
		}
		t.Fatal(err)
	}
	return q, <-tid, exited
}

// socketPair returns a blocking end for the test and an O_NONBLOCK end
// for the ring, as the NVMe/TCP sockets are.
func socketPair(t *testing.T) (peer, ringEnd int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.SetNonblock(fds[1], true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	return fds[0], fds[1]
}

func newEchoBackend(t *testing.T, fd int) *echoBackend {
	t.Helper()
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(buf) })
	return &echoBackend{fd: fd, buf: buf}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// A RingLifecycle's receive completes on the queue's own thread, and a
// function posted from another goroutine runs there too and may put a
// send on the ring: the socket is driven by the thread that owns the
// queue, with no other thread on the way.
func TestRingLifecycleCompletesOnQueueThread(t *testing.T) {
	peer, fd := socketPair(t)
	b := newEchoBackend(t, fd)
	q, loopTid, exited := ringQueue(t, b)

	if _, err := unix.Write(peer, []byte("c2h")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the receive", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return string(b.got) == "c2h"
	})
	b.mu.Lock()
	if b.tid != loopTid {
		t.Errorf("RingCompletion ran on thread %d, want the queue's %d", b.tid, loopTid)
	}
	b.mu.Unlock()

	out := b.buf[2048:2051]
	copy(out, "h2c")
	postTid := make(chan int, 1)
	if err := q.qr.Post(func() {
		postTid <- unix.Gettid()
		b.mu.Lock()
		defer b.mu.Unlock()
		if err := q.qr.Send(fd, out, echoSend); err != nil {
			b.armErr = err
			return
		}
		b.inFlight++
	}); err != nil {
		t.Fatal(err)
	}
	if got := <-postTid; got != loopTid {
		t.Errorf("posted function ran on thread %d, want the queue's %d", got, loopTid)
	}
	in := make([]byte, 3)
	if _, err := unix.Read(peer, in); err != nil || string(in) != "h2c" {
		t.Fatalf("peer read %q, %v; want h2c", in, err)
	}

	q.forceStop()
	if err := <-exited; err != errForced {
		t.Fatalf("loop ended with %v, want errForced", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.armErr != nil || b.late || b.inFlight != 0 {
		t.Fatalf("after the loop: armErr %v, armed after StopRing %v, in flight %d", b.armErr, b.late, b.inFlight)
	}
	if err := q.qr.Post(func() {}); !errors.Is(err, ErrQueueStopped) {
		t.Errorf("Post after the loop ended = %v, want ErrQueueStopped", err)
	}
}

// The seed rule on the ring: when the queue stops, the backend's pending
// receive is cancelled and its completion handed to the backend before
// the ring closes, also when data arrives during the stop (the receive
// then completes with it, or is cancelled: either way it is reaped, and
// nothing is armed after StopRing).
func TestRingLifecycleStopReapsReceive(t *testing.T) {
	for i := range 20 {
		peer, fd := socketPair(t)
		b := newEchoBackend(t, fd)
		q, _, exited := ringQueue(t, b)
		if i%2 == 1 {
			// A receive completing during the stop.
			go unix.Write(peer, []byte("late"))
		}
		q.forceStop()
		if err := <-exited; err != errForced {
			t.Fatalf("loop ended with %v, want errForced", err)
		}
		b.mu.Lock()
		if b.armErr != nil || b.late || b.inFlight != 0 {
			t.Fatalf("run %d: armErr %v, armed after StopRing %v, in flight %d", i, b.armErr, b.late, b.inFlight)
		}
		recv := b.results[0]
		if len(b.results) < 2 || (recv != -int32(unix.ECANCELED) && recv <= 0) {
			t.Fatalf("run %d: results %v, want the receive cancelled (or with data) and the cancel's count", i, b.results)
		}
		b.mu.Unlock()
	}
}

// Functions posted from several goroutines at once, each waiting for its
// own to run, all run: once one was left queued without a doorbell, every
// later post saw the list non-empty and rang none either, and the loop
// slept in Submit(1) with all of them.
func TestRingPostUnderContentionRuns(t *testing.T) {
	_, fd := socketPair(t)
	q, _, exited := ringQueue(t, newEchoBackend(t, fd))
	defer func() { q.forceStop(); <-exited }()
	deadline := time.Now().Add(3 * time.Second)
	errs := make(chan error, 3)
	for range 3 {
		go func() {
			for time.Now().Before(deadline) {
				ran := make(chan struct{})
				if err := q.qr.Post(func() { close(ran) }); err != nil {
					errs <- err
					return
				}
				select {
				case <-ran:
				case <-time.After(2 * time.Second):
					errs <- errors.New("a posted function did not run within 2s: the loop sleeps with it queued and no doorbell rung")
					return
				}
			}
			errs <- nil
		}()
	}
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// stopProbe is a RingLifecycle that, once told to stop, tries to start a
// receive (as a network queue being handed to the ring at that moment
// does: its first receive is armed by a function posted before the stop)
// and records what the ring answered.
type stopProbe struct {
	fd  int
	buf []byte

	mu                   sync.Mutex
	inFlight             int
	stopRecv, postedRecv error
	cancel               error
	posted               bool
}

func (b *stopProbe) Serve(r *Request)     { r.Complete(unix.EOPNOTSUPP) }
func (b *stopProbe) RingEntries() int     { return 4 }
func (b *stopProbe) StartRing(*QueueRing) {}
func (b *stopProbe) RingIdle(*QueueRing) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inFlight == 0
}
func (b *stopProbe) RingAbandoned(*QueueRing) {}
func (b *stopProbe) RingCompletion(*QueueRing, RingCQE) {
	b.mu.Lock()
	b.inFlight--
	b.mu.Unlock()
}

// tryRecv arms a receive; b.mu held.
func (b *stopProbe) tryRecv(qr *QueueRing) error {
	err := qr.Recv(b.fd, b.buf, 1)
	if err == nil {
		b.inFlight++
	}
	return err
}

func (b *stopProbe) StopRing(qr *QueueRing) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.stopRecv = b.tryRecv(qr)
	if b.cancel = qr.CancelFd(b.fd, 2); b.cancel == nil {
		b.inFlight++
	}
	if err := qr.Post(func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.posted = true
		b.postedRecv = b.tryRecv(qr)
	}); err != nil {
		b.postedRecv = err
	}
}

// Once the queue is stopping, the ring refuses operations that start I/O
// (ErrQueueStopped), in StopRing and in functions posted before the loop
// ended alike, while CancelFd is still accepted: a receive armed then
// would be in flight when the ring closes, and its socket and buffer
// never released.
func TestRingRefusesNewOperationsOnceStopping(t *testing.T) {
	_, fd := socketPair(t)
	b := &stopProbe{fd: fd, buf: newEchoBackend(t, fd).buf}
	q, _, exited := ringQueue(t, b)
	q.forceStop()
	if err := <-exited; !errors.Is(err, errForced) {
		t.Fatalf("loop ended with %v, want the forced stop", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if !errors.Is(b.stopRecv, ErrQueueStopped) {
		t.Errorf("Recv in StopRing = %v, want ErrQueueStopped", b.stopRecv)
	}
	if !b.posted || !errors.Is(b.postedRecv, ErrQueueStopped) {
		t.Errorf("Recv in a function posted by StopRing (ran %v) = %v, want ErrQueueStopped", b.posted, b.postedRecv)
	}
	if b.cancel != nil {
		t.Errorf("CancelFd in StopRing = %v, want it accepted", b.cancel)
	}
	if b.inFlight != 0 {
		t.Errorf("%d operations in flight when the ring closed", b.inFlight)
	}
}

// stuckBackend's operations never complete after StopRing (a kernel that
// does not end them): RingIdle stays false until RingAbandoned.
type stuckBackend struct {
	mu        sync.Mutex
	abandoned int
}

func (b *stuckBackend) Serve(r *Request)                   { r.Complete(unix.EOPNOTSUPP) }
func (b *stuckBackend) RingEntries() int                   { return 1 }
func (b *stuckBackend) StartRing(*QueueRing)               {}
func (b *stuckBackend) StopRing(*QueueRing)                {}
func (b *stuckBackend) RingCompletion(*QueueRing, RingCQE) {}
func (b *stuckBackend) RingIdle(*QueueRing) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.abandoned > 0
}
func (b *stuckBackend) RingAbandoned(*QueueRing) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.abandoned++
}

// A backend still busy when ringStopTimeout runs out is told to abandon
// what it has in flight (RingAbandoned, once) before the ring closes:
// it lets go of its references so the daemon can exit. Before, the ring
// closed with them held and the driven queue's Wait never returned.
func TestRingStopTimeoutAbandons(t *testing.T) {
	defer func(d time.Duration) { ringStopTimeout = d }(ringStopTimeout)
	ringStopTimeout = 100 * time.Millisecond
	b := &stuckBackend{}
	q, _, exited := ringQueue(t, b)
	q.forceStop()
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		t.Fatal("the queue did not stop")
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.abandoned != 1 {
		t.Fatalf("RingAbandoned called %d times, want once", b.abandoned)
	}
}

// An idle backend is not abandoned.
func TestRingStopIdleNotAbandoned(t *testing.T) {
	_, fd := socketPair(t)
	b := newEchoBackend(t, fd)
	q, _, exited := ringQueue(t, b)
	q.forceStop()
	<-exited
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.abandoned {
		t.Fatal("RingAbandoned called for a backend that went idle")
	}
}
