package lifecycle

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// Status dispositions (retry.go), as nvme_decide_disposition and
// nvme_retry_req: any status without DNR is retried on the same
// association, after the Command Retry Delay its CRD field names.

// crd sets a status's Command Retry Delay field.
func crd(s nvme.Status, n uint8) nvme.Status { return s | nvme.Status(n)<<11 }

// noKeepAlive makes the fake clock's only timers the ones under test.
func noKeepAlive(o *Options, tgt *fakeTarget) { tgt.kato = 0 }

// tryCounter is an fn for Do that fails with the statuses in order, then
// writes; it counts the tries and the associations they ran on.
type tryCounter struct {
	fail  []error
	tries chan Conn // every try's association, buffered
}

func newTryCounter(fail ...error) *tryCounter {
	return &tryCounter{fail: fail, tries: make(chan Conn, 64)}
}

func (tc *tryCounter) fn(c Conn) error {
	n := len(tc.tries)
	tc.tries <- c
	if n < len(tc.fail) {
		return tc.fail[n]
	}
	return c.(*fakeConn).write(context.Background(), 4, 44, faultNone)
}

// Any status without DNR is retried at once (CRD 0) on the same
// association, without recovery: Namespace Not Ready, an Internal Error.
func TestStatusWithoutDNRRetried(t *testing.T) {
	h := newHarness(t, noKeepAlive)
	first := h.tgt.lastConn()
	tc := newTryCounter(nvme.NVME_SC_NS_NOT_READY, nvme.NVME_SC_INTERNAL)
	if err := h.c.Do(context.Background(), tc.fn); err != nil {
		t.Fatalf("Do: %v", err)
	}
	if n := len(tc.tries); n != 3 {
		t.Fatalf("%d tries, want 3", n)
	}
	for range 3 {
		if c := <-tc.tries; c != Conn(first) {
			t.Fatal("a retry ran on another association")
		}
	}
	if got, want := h.states(), []State{StateConnecting, StateLive}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v: a status must not start recovery", got, want)
	}
	h.finish()
}

// A status with CRD n is retried after CRDTn, not before.
func TestStatusRetriedAfterCRD(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		tgt.crdt = [3]time.Duration{100 * time.Millisecond, 2 * time.Second, 5 * time.Second}
	})
	tc := newTryCounter(crd(nvme.NVME_SC_NS_NOT_READY, 2))
	res := make(chan error, 1)
	go func() { res <- h.c.Do(context.Background(), tc.fn) }()
	h.waitTimers(1)
	if d, _ := h.clk.NextDeadline(); d.Sub(h.clk.Now()) != 2*time.Second {
		t.Fatalf("retry armed for %v, want CRDT2 (2 s)", d.Sub(h.clk.Now()))
	}
	h.clk.Advance(2*time.Second - time.Millisecond)
	select {
	case err := <-res:
		t.Fatalf("Do returned %v before the Command Retry Delay", err)
	default:
	}
	if n := len(tc.tries); n != 1 {
		t.Fatalf("%d tries before the Command Retry Delay, want 1", n)
	}
	h.clk.Advance(time.Millisecond)
	if err := <-res; err != nil {
		t.Fatalf("Do: %v", err)
	}
	if n := len(tc.tries); n != 2 {
		t.Fatalf("%d tries, want 2", n)
	}
	h.finish()
}

// A CRDT of hours (16 bits of 100 ms) only holds the I/O: the wait is
// capped.
func TestRetryDelayCapped(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		tgt.crdt = [3]time.Duration{65535 * 100 * time.Millisecond}
	})
	tc := newTryCounter(crd(nvme.NVME_SC_NS_NOT_READY, 1))
	res := make(chan error, 1)
	go func() { res <- h.c.Do(context.Background(), tc.fn) }()
	h.waitTimers(1)
	if d, _ := h.clk.NextDeadline(); d.Sub(h.clk.Now()) != maxRetryDelay {
		t.Fatalf("retry armed for %v, want %v", d.Sub(h.clk.Now()), maxRetryDelay)
	}
	h.clk.Advance(maxRetryDelay)
	if err := <-res; err != nil {
		t.Fatalf("Do: %v", err)
	}
	h.finish()
}

// A status with DNR is returned at once, as it is.
func TestStatusWithDNRNotRetried(t *testing.T) {
	h := newHarness(t, noKeepAlive)
	tc := newTryCounter(crd(nvme.NVME_SC_NS_NOT_READY|nvme.NVME_STATUS_DNR, 1), nil)
	err := h.c.Do(context.Background(), tc.fn)
	var st nvme.Status
	if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_NS_NOT_READY || !st.DNR() || len(tc.tries) != 1 {
		t.Fatalf("Do: %v after %d tries, want Namespace Not Ready with DNR after 1", err, len(tc.tries))
	}
	if h.clk.Pending() != 0 {
		t.Fatal("a retry was armed for a status with DNR")
	}
	h.finish()
}

// The retries are bounded: MaxRetries after the first try, then EIO.
func TestStatusRetriesBounded(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		o.MaxRetries = 3
	})
	notReady := make([]error, 10)
	for i := range notReady {
		notReady[i] = nvme.NVME_SC_NS_NOT_READY
	}
	tc := newTryCounter(notReady...)
	err := h.c.Do(context.Background(), tc.fn)
	if !errors.Is(err, ErrRetriesExhausted) || !errors.Is(err, syscall.EIO) || len(tc.tries) != 1+3 {
		t.Fatalf("Do: %v after %d tries, want ErrRetriesExhausted (EIO) after 4", err, len(tc.tries))
	}
	// The last status stays in the chain, for the errno the block layer
	// gets (nvme_error_status after the retries).
	if !errors.Is(err, nvme.NVME_SC_NS_NOT_READY) {
		t.Fatalf("Do: %v does not carry the last status", err)
	}
	h.finish()
}

// A delete during the Command Retry Delay fails the I/O with EIO at once:
// the wait holds no reference, so the delete does not wait for it either.
func TestDeleteDuringRetryDelay(t *testing.T) {
	for _, async := range []bool{false, true} {
		name := map[bool]string{false: "Do", true: "Retry"}[async]
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, func(o *Options, tgt *fakeTarget) {
				noKeepAlive(o, tgt)
				tgt.crdt = [3]time.Duration{time.Second, time.Second, time.Minute}
			})
			status := crd(nvme.NVME_SC_NS_NOT_READY, 3)
			tc := newTryCounter(status)
			res := make(chan error, 1)
			if async {
				r, ok := h.c.TryEnter()
				if !ok {
					t.Fatal("TryEnter failed while LIVE")
				}
				tc.tries <- r.Conn() // the first try, on the fast path
				r.Exit()
				go func() { res <- h.c.Retry(context.Background(), r, status, tc.fn) }()
			} else {
				go func() { res <- h.c.Do(context.Background(), tc.fn) }()
			}
			h.waitTimers(1)
			h.c.Delete() // returns: the wait holds nothing
			if err := <-res; !errors.Is(err, ErrDeleted) || !errors.Is(err, syscall.EIO) {
				t.Fatalf("I/O deleted during its retry delay: %v, want ErrDeleted (EIO)", err)
			}
			if n := len(tc.tries); n != 1 {
				t.Fatalf("%d tries, want 1", n)
			}
			h.finish()
		})
	}
}

// The asynchronous path: a command started with TryEnter that failed with
// a status without DNR is retried by Retry on the same association after
// the delay, with no recovery.
func TestRetryStatusAsyncAfterCRD(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		tgt.crdt = [3]time.Duration{300 * time.Millisecond}
	})
	first := h.tgt.lastConn()
	r, ok := h.c.TryEnter()
	if !ok {
		t.Fatal("TryEnter failed while LIVE")
	}
	r.Exit()
	tc := newTryCounter()
	res := make(chan error, 1)
	go func() {
		res <- h.c.Retry(context.Background(), r, crd(nvme.NVME_SC_NS_NOT_READY, 1), tc.fn)
	}()
	h.waitTimers(1)
	if len(tc.tries) != 0 {
		t.Fatal("retried before the Command Retry Delay")
	}
	h.clk.Advance(300 * time.Millisecond)
	if err := <-res; err != nil {
		t.Fatalf("Retry: %v", err)
	}
	if c := <-tc.tries; c != Conn(first) {
		t.Fatal("retried on another association")
	}
	if got, want := h.states(), []State{StateConnecting, StateLive}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	h.finish()
}

func TestRetryableStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{nvme.NVME_SC_NS_NOT_READY, true},
		{crd(nvme.NVME_SC_NS_NOT_READY, 3), true},
		{nvme.NVME_SC_ANA_TRANSITION, true},
		{nvme.NVME_SC_INTERNAL, true},
		{nvme.NVME_SC_NS_NOT_READY | nvme.NVME_STATUS_DNR, false},
		{errPath, false},
		{syscall.EINVAL, false},
		{nil, false},
	} {
		if got := RetryableStatus(c.err); got != c.want {
			t.Errorf("RetryableStatus(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
