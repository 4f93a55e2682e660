package ublk

import (
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newBareQueue is a queue without a ring or kernel device: enough to test
// the completion hand-off between Backend goroutines and the queue thread.
func newBareQueue(t *testing.T, depth int) *queue {
	t.Helper()
	q := newQueue(0, depth, 4096, -1, true, NullBackend{}, slog.Default())
	var err error
	if q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	if q.bufs, err = unix.Mmap(-1, 0, depth*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if q.efd >= 0 {
			unix.Close(q.efd)
		}
		if q.bufs != nil {
			unix.Munmap(q.bufs)
		}
	})
	return q
}

// doorbells reads (and resets) the eventfd counter: how many wake-ups were
// rung since the last call.
func doorbells(t *testing.T, q *queue) uint64 {
	t.Helper()
	var b [8]byte
	_, err := unix.Read(q.efd, b[:])
	if err == unix.EAGAIN {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return uint64(b[0]) | uint64(b[1])<<8
}

// hand gives tag to the "backend" as dispatch does.
func hand(q *queue, tag int, op Op, length int) *Request {
	q.mu.Lock()
	q.owned++
	q.mu.Unlock()
	r := &q.reqs[tag]
	r.Op, r.Length = op, length
	r.owned.Store(true)
	return r
}

func takeDone(q *queue) []completion {
	q.mu.Lock()
	defer q.mu.Unlock()
	d := q.done
	q.done = nil
	return d
}

func TestCompleteRingsOncePerBatch(t *testing.T) {
	q := newBareQueue(t, 4)
	r0, r1, r2 := hand(q, 0, OpRead, 4096), hand(q, 1, OpWrite, 512), hand(q, 2, OpFlush, 0)
	r0.Complete(nil)
	r1.Complete(unix.ENOSPC)
	if n := doorbells(t, q); n != 1 {
		t.Errorf("two completions while the loop slept rang %d times, want 1", n)
	}
	got := takeDone(q)
	want := []completion{{0, 4096}, {1, -int32(unix.ENOSPC)}}
	if len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("done = %v, want %v", got, want)
	}
	r2.Complete(nil)
	if n := doorbells(t, q); n != 1 {
		t.Errorf("a completion after the loop drained rang %d times, want 1", n)
	}
}

func TestCompleteDuringDispatchDoesNotRing(t *testing.T) {
	q := newBareQueue(t, 2)
	r := hand(q, 0, OpRead, 4096)
	q.mu.Lock()
	q.dispatching = true
	q.mu.Unlock()
	r.Complete(nil) // a synchronous backend, inside Serve
	if n := doorbells(t, q); n != 0 {
		t.Errorf("completion inside dispatch rang %d times; the loop drains without a syscall", n)
	}
	if got := takeDone(q); len(got) != 1 || got[0].tag != 0 {
		t.Errorf("done = %v", got)
	}
}

func TestCompleteTwicePanics(t *testing.T) {
	q := newBareQueue(t, 1)
	r := hand(q, 0, OpFlush, 0)
	r.Complete(nil)
	defer func() {
		if p := recover(); p == nil || !strings.Contains(p.(string), "completed twice") {
			t.Errorf("second Complete: recover() = %v", p)
		}
	}()
	r.Complete(nil)
}

// After the queue is gone, completions are dropped and the last one frees
// the tag buffers the backend was still allowed to use.
func TestCompleteAfterTeardown(t *testing.T) {
	q := newBareQueue(t, 2)
	r0, r1 := hand(q, 0, OpRead, 4096), hand(q, 1, OpRead, 4096)
	q.teardown()
	if q.efd != -1 {
		t.Error("teardown left the eventfd open")
	}
	if q.bufs == nil {
		t.Fatal("teardown unmapped buffers the backend still holds")
	}
	r0.Buf = q.bufs[:4096]
	r0.Buf[0] = 1 // still mapped: must not fault
	r0.Complete(nil)
	if q.bufs == nil {
		t.Fatal("buffers unmapped while a request is still held")
	}
	r1.Complete(nil)
	if q.bufs != nil {
		t.Error("last completion did not free the buffers")
	}
	if len(q.done) != 0 {
		t.Errorf("completions after teardown were queued: %v", q.done)
	}
}

func TestCompleteConcurrent(t *testing.T) {
	const depth = 64
	q := newBareQueue(t, depth)
	reqs := make([]*Request, depth)
	for i := range reqs {
		reqs[i] = hand(q, i, OpWrite, 512)
	}
	var wg sync.WaitGroup
	for _, r := range reqs {
		wg.Add(1)
		go func() { defer wg.Done(); r.Complete(nil) }()
	}
	var got []completion
	for len(got) < depth {
		got = append(got, takeDone(q)...)
	}
	wg.Wait()
	seen := map[int]bool{}
	for _, c := range got {
		if seen[c.tag] || c.res != 512 {
			t.Fatalf("bad completion %+v (dup=%v)", c, seen[c.tag])
		}
		seen[c.tag] = true
	}
	if q.owned != 0 {
		t.Errorf("owned = %d after every request completed", q.owned)
	}
}

func TestDescLayout(t *testing.T) {
	// ublk_ch_mmap: queue q's descriptors are at q * (4096 * 24 rounded
	// to pages), one page-rounded array of depth descriptors each.
	if got := descStride(); got != 98304 {
		t.Errorf("descStride = %d, want 98304", got)
	}
	if got := descArraySize(128); got != 4096 {
		t.Errorf("descArraySize(128) = %d, want 4096", got)
	}
	if got := descArraySize(200); got != 8192 {
		t.Errorf("descArraySize(200) = %d, want 8192", got)
	}
}

// A function posted while the loop ends its batch either runs in that
// batch or rings the doorbell: never queued with the loop about to sleep.
// The window (drain between running the posted functions and clearing
// dispatching) is hit by chance; 2 s of tries hit it within a few
// thousand iterations before drain closed it under one lock.
func TestDrainPostNeverLostWakeup(t *testing.T) {
	q := newBareQueue(t, 1)
	for i, deadline := 0, time.Now().Add(2*time.Second); time.Now().Before(deadline); i++ {
		q.mu.Lock()
		q.dispatching = true // the loop is serving a batch
		q.mu.Unlock()
		start, posted := make(chan struct{}), make(chan error)
		go func() {
			<-start
			posted <- q.post(func() {})
		}()
		close(start)
		q.drain()
		if err := <-posted; err != nil {
			t.Fatal(err)
		}
		q.mu.Lock()
		queued := len(q.calls)
		q.mu.Unlock()
		if queued > 0 && doorbells(t, q) == 0 {
			t.Fatalf("iteration %d: a posted function is queued after the batch ended and no doorbell was rung: the loop would sleep with it", i)
		}
		q.runPosted()
	}
}
