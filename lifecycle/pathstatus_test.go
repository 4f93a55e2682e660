package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// A Path Related Status (SCT 3) without DNR: the controller answered, so
// the command is retried at once on the same association, and no recovery
// starts.
func TestPathStatusRetriedOnSameAssociation(t *testing.T) {
	h := newHarness(t, nil)
	first := h.tgt.lastConn()
	var ranOn []Conn
	err := h.c.Do(context.Background(), func(c Conn) error {
		ranOn = append(ranOn, c)
		if len(ranOn) <= 2 {
			return nvme.NVME_SC_ANA_TRANSITION
		}
		return c.(*fakeConn).write(context.Background(), 3, 33, faultNone)
	})
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	if len(ranOn) != 3 || ranOn[0] != Conn(first) || ranOn[1] != Conn(first) || ranOn[2] != Conn(first) {
		t.Fatalf("ran %d times, not all on the first association", len(ranOn))
	}
	if got, want := h.states(), []State{StateConnecting, StateLive}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v: a path status must not start recovery", got, want)
	}
	if h.tgt.data[3] != 33 {
		t.Fatal("retried write not applied")
	}
	h.finish()
}

// With DNR set the status is returned at once, as it is.
func TestPathStatusWithDNRFails(t *testing.T) {
	h := newHarness(t, nil)
	tries := 0
	err := h.c.Do(context.Background(), func(Conn) error {
		tries++
		return nvme.NVME_SC_INTERNAL_PATH_ERROR | nvme.NVME_STATUS_DNR
	})
	var st nvme.Status
	if !errors.As(err, &st) || st.Code() != nvme.NVME_SC_INTERNAL_PATH_ERROR || !st.DNR() || tries != 1 {
		t.Fatalf("Do: %v after %d tries, want Internal Path Error with DNR after 1", err, tries)
	}
	if got, want := h.states(), []State{StateConnecting, StateLive}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	h.finish()
}

// A Path Related Status that outlasts its retries on the association (a
// namespace disabled on the target: nvmet's Internal Path Error, until the
// Namespace Attribute Changed event is handled) is a failure of the path:
// the I/O is not failed; recovery starts, and the I/O is held while the
// reconnects find no namespace, then completes on the next association.
func TestPathStatusOutlastingRetriesRecovers(t *testing.T) {
	for _, async := range []bool{false, true} {
		t.Run(map[bool]string{false: "Do", true: "Retry"}[async], func(t *testing.T) {
			h := newHarness(t, func(o *Options, tgt *fakeTarget) {
				noKeepAlive(o, tgt)
				o.MaxRetries = 3
			})
			first := h.tgt.lastConn()
			var onFirst, onOthers atomic.Int32
			fn := func(c Conn) error {
				if c == Conn(first) {
					onFirst.Add(1)
					return nvme.NVME_SC_INTERNAL_PATH_ERROR
				}
				onOthers.Add(1)
				return c.(*fakeConn).write(context.Background(), 5, 55, faultNone)
			}
			res := make(chan error, 1)
			if async {
				r, ok := h.c.TryEnter()
				if !ok {
					t.Fatal("TryEnter failed while LIVE")
				}
				onFirst.Add(1) // the first try, on the fast path
				r.Exit()
				go func() { res <- h.c.Retry(context.Background(), r, nvme.NVME_SC_INTERNAL_PATH_ERROR, fn) }()
			} else {
				go func() { res <- h.c.Do(context.Background(), fn) }()
			}
			h.waitState(StateConnecting)
			// The first reconnect finds no namespace (not an error
			// with DNR): the I/O stays held.
			h.tgt.mu.Lock()
			h.tgt.connectErrs = []error{errors.New("fake: namespace 1: not active")}
			h.tgt.mu.Unlock()
			h.waitTimers(1)
			h.clk.Advance(10 * time.Second)
			waitFor(t, "the failed reconnect", func() bool { return h.tgt.connectCount() == 2 })
			waitFor(t, "the I/O to be held", func() bool { return h.c.Held() == 1 })
			select {
			case err := <-res:
				t.Fatalf("the I/O ended while the controller reconnects: %v", err)
			default:
			}
			h.waitTimers(1)
			h.clk.Advance(10 * time.Second)
			if err := <-res; err != nil {
				t.Fatalf("I/O: %v, want it completed on the next association", err)
			}
			if n, m := onFirst.Load(), onOthers.Load(); n != 1+3 || m != 1 {
				t.Fatalf("%d tries on the first association (want 1+MaxRetries = 4), %d on the next (want 1)", n, m)
			}
			if h.tgt.data[5] != 55 {
				t.Fatal("the write was not applied on the next association")
			}
			want := []State{StateConnecting, StateLive, StateResetting, StateConnecting, StateLive}
			if got := h.states(); !equalStates(got, want) {
				t.Fatalf("states %v, want %v", got, want)
			}
			h.finish()
		})
	}
}

// Those failures of the path are bounded as the others: a path status on
// every association fails the I/O after MaxRetries associations, each
// after MaxRetries retries on it, with EIO and the status.
func TestPathStatusOnEveryAssociationBounded(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		o.MaxRetries = 1
	})
	var tries atomic.Int32
	res := make(chan error, 1)
	go func() {
		res <- h.c.Do(context.Background(), func(Conn) error {
			tries.Add(1)
			return nvme.NVME_SC_ANA_INACCESSIBLE
		})
	}()
	h.waitState(StateConnecting)
	h.waitTimers(1)
	h.clk.Advance(10 * time.Second)
	err := <-res
	if !errors.Is(err, ErrRetriesExhausted) || !errors.Is(err, syscall.EIO) || !errors.Is(err, nvme.NVME_SC_ANA_INACCESSIBLE) {
		t.Fatalf("Do: %v, want ErrRetriesExhausted (EIO) with the status", err)
	}
	if n := tries.Load(); n != 2*(1+1) {
		t.Fatalf("%d tries, want 4: 1+MaxRetries on each of 1+MaxRetries associations", n)
	}
	if n := h.tgt.connectCount(); n != 2 {
		t.Fatalf("%d connects, want 2", n)
	}
	h.finish()
}

// An I/O whose status retries are used up, whose next try fails because
// the association fails (recovery started by another I/O's path status
// shuts the sockets under it), is retried on the next association: the
// status retries and the failures of the path are bounded apart.
func TestPathErrorAfterStatusRetriesRetried(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		o.MaxRetries = 2
	})
	tries := 0
	res := make(chan error, 1)
	go func() {
		res <- h.c.Do(context.Background(), func(c Conn) error {
			tries++
			switch tries {
			case 1, 2:
				return nvme.NVME_SC_ANA_TRANSITION
			case 3:
				return c.(*fakeConn).write(context.Background(), 6, 66, faultSocket)
			}
			return c.(*fakeConn).write(context.Background(), 6, 66, faultNone)
		})
	}()
	h.waitState(StateConnecting)
	h.waitTimers(1)
	h.clk.Advance(10 * time.Second)
	if err := <-res; err != nil || tries != 4 {
		t.Fatalf("Do: %v after %d tries, want success after 4", err, tries)
	}
	if h.tgt.data[6] != 66 {
		t.Fatal("retried write not applied")
	}
	h.finish()
}

// The status retries are counted on each association, the failures of
// the path in all: with MaxRetries 1, a status and a path error on one
// association, then the same on the next, fail the I/O.
func TestPathStatusAndPathErrorBoundedApart(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		o.MaxRetries = 1
	})
	res := make(chan error, 1)
	tries := 0
	go func() {
		res <- h.c.Do(context.Background(), func(c Conn) error {
			tries++
			if tries%2 == 1 {
				return nvme.NVME_SC_ANA_INACCESSIBLE
			}
			return c.(*fakeConn).write(context.Background(), 1, 1, faultSocket)
		})
	}()
	h.waitState(StateConnecting)
	h.waitTimers(1)
	h.clk.Advance(10 * time.Second)
	err := <-res
	if !errors.Is(err, ErrRetriesExhausted) || tries != 4 {
		t.Fatalf("Do: %v after %d tries, want ErrRetriesExhausted after 4", err, tries)
	}
	h.waitEntered(StateConnecting, 2) // the last path error started recovery too
	h.finish()
}

// The asynchronous form: Retry runs an I/O that failed with a path status
// again at once on the same association, without recovery.
func TestRetryPathStatusAsync(t *testing.T) {
	h := newHarness(t, nil)
	ref, ok := h.c.TryEnter()
	if !ok {
		t.Fatal("TryEnter on a LIVE controller failed")
	}
	first := ref.Conn()
	ref.Exit()
	var ranOn []Conn
	err := h.c.Retry(context.Background(), ref, nvme.NVME_SC_CTRL_PATH_ERROR, func(c Conn) error {
		ranOn = append(ranOn, c)
		return c.(*fakeConn).write(context.Background(), 2, 22, faultNone)
	})
	if err != nil || len(ranOn) != 1 || ranOn[0] != first {
		t.Fatalf("Retry: %v, ran %d times, on the same association: %v", err, len(ranOn), len(ranOn) > 0 && ranOn[0] == first)
	}
	if got, want := h.states(), []State{StateConnecting, StateLive}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	if h.tgt.data[2] != 22 {
		t.Fatal("retried write not applied")
	}
	h.finish()
}

// A Conn whose IsPathError counts path statuses too (as nvmeof's does)
// gets the same treatment: the status is recognised first.
func TestPathStatusBeforeConnPathError(t *testing.T) {
	h := newHarness(t, nil)
	tries := 0
	err := h.c.Do(context.Background(), func(c Conn) error {
		tries++
		if tries == 1 {
			// Both: what the Conn calls a path error, and a status.
			return fmt.Errorf("%w: %w", errPath, nvme.NVME_SC_ANA_TRANSITION)
		}
		return nil
	})
	if err != nil || tries != 2 {
		t.Fatalf("Do: %v after %d tries", err, tries)
	}
	if got, want := h.states(), []State{StateConnecting, StateLive}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v: the status must not start recovery", got, want)
	}
	h.finish()
}
