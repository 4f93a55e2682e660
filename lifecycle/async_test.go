package lifecycle

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// TryEnter succeeds only while LIVE, and then on the live association.
func TestTryEnterOnlyWhenLive(t *testing.T) {
	h := newHarness(t, nil)
	first := h.tgt.lastConn()
	ref, ok := h.c.TryEnter()
	if !ok || ref.Conn() != first {
		t.Fatalf("TryEnter while LIVE: ok=%v conn=%p, want the live association %p", ok, ref.Conn(), first)
	}
	ref.Exit()

	first.onError(errSocket)
	h.waitState(StateConnecting)
	if _, ok := h.c.TryEnter(); ok {
		t.Fatal("TryEnter succeeded while CONNECTING")
	}
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	// The fast path opens just after the state turns LIVE (goLive).
	waitFor(t, "the fast path to open", func() bool {
		ref, ok = h.c.TryEnter()
		return ok
	})
	if ref.Conn() == first || ref.Conn() != h.tgt.lastConn() {
		t.Fatalf("TryEnter after reconnect: ok=%v, on the old association %v", ok, ref.Conn() == first)
	}
	ref.Exit()
	h.finish()
	if _, ok := h.c.TryEnter(); ok {
		t.Fatal("TryEnter succeeded on a DEAD controller")
	}
}

// A command started asynchronously under a Ref holds teardown until its
// completion handler has called Exit, even when that comes after the
// association's own handlers have returned: the queues are freed only
// after it.
func TestTeardownWaitsForAsyncExit(t *testing.T) {
	waiting := make(chan struct{}) // teardown reached StepWaitCompletions
	var exited atomic.Bool
	var h *harness
	h = newHarness(t, func(o *Options, _ *fakeTarget) {
		o.TeardownHook = func(s Step, done bool) {
			switch {
			case s == StepWaitCompletions && !done:
				close(waiting)
			case s == StepFreeIOQueues && !done && !exited.Load():
				h.v.add("I/O queues freed before the asynchronous command's handler called Exit")
			}
		}
	})
	ref, ok := h.c.TryEnter()
	if !ok {
		t.Fatal("TryEnter on a LIVE controller failed")
	}
	conn := ref.Conn().(*fakeConn)
	cmd, err := conn.submit(context.Background(), false, "write", nil) // never answered
	if err != nil {
		t.Fatal(err)
	}
	handlerErr := make(chan error, 1)
	go func() { // the command's completion handler
		err := <-cmd.done
		<-waiting
		conn.mu.Lock()
		conn.touchLocked(false, "asynchronous handler")
		conn.mu.Unlock()
		exited.Store(true)
		ref.Exit()
		handlerErr <- err
	}()
	h.finish()
	if err := <-handlerErr; !errors.Is(err, errPath) {
		t.Fatalf("command failed with %v, want the path error of Shutdown", err)
	}
	h.v.check(t)
}

// Retry reports the path error and runs the I/O on the next association,
// never on the one that failed it.
func TestRetryOnNextAssociation(t *testing.T) {
	h := newHarness(t, nil)
	ref, ok := h.c.TryEnter()
	if !ok {
		t.Fatal("TryEnter on a LIVE controller failed")
	}
	first := ref.Conn().(*fakeConn)
	err := first.write(context.Background(), 9, 99, faultSocket)
	ref.Exit()
	if !first.IsPathError(err) {
		t.Fatalf("faulted write: %v, want a path error", err)
	}
	var ranOn []Conn
	res := make(chan error, 1)
	go func() {
		res <- h.c.Retry(context.Background(), ref, err, func(c Conn) error {
			ranOn = append(ranOn, c)
			return c.(*fakeConn).write(context.Background(), 9, 99, faultNone)
		})
	}()
	h.waitState(StateConnecting)
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	if err := <-res; err != nil {
		t.Fatalf("Retry: %v", err)
	}
	if len(ranOn) != 1 || ranOn[0] == Conn(first) {
		t.Fatalf("retried %d times, on the failed association: %v", len(ranOn), len(ranOn) > 0 && ranOn[0] == Conn(first))
	}
	if h.tgt.data[9] != 99 {
		t.Fatal("retried write not applied")
	}
	h.finish()
}

// With MaxRetries 0 Retry fails at once, and recovery still starts.
func TestRetryWithoutRetries(t *testing.T) {
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.MaxRetries = 0 })
	ref, _ := h.c.TryEnter()
	err := ref.Conn().(*fakeConn).write(context.Background(), 1, 1, faultSocket)
	ref.Exit()
	ran := false
	err = h.c.Retry(context.Background(), ref, err, func(Conn) error { ran = true; return nil })
	if !errors.Is(err, ErrRetriesExhausted) || ran {
		t.Fatalf("Retry: %v (ran %v), want ErrRetriesExhausted without running", err, ran)
	}
	h.waitState(StateConnecting)
	h.finish()
}
