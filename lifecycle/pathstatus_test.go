package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"

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

// The retries are bounded: MaxRetries after the first try, then EIO.
func TestPathStatusRetriesBounded(t *testing.T) {
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.MaxRetries = 3 })
	tries := 0
	err := h.c.Do(context.Background(), func(Conn) error {
		tries++
		return nvme.NVME_SC_HOST_PATH_ERROR
	})
	if !errors.Is(err, ErrRetriesExhausted) || !errors.Is(err, syscall.EIO) || tries != 1+3 {
		t.Fatalf("Do: %v after %d tries, want ErrRetriesExhausted (EIO) after 4", err, tries)
	}
	if s := h.c.State(); s != StateLive {
		t.Fatalf("state %v", s)
	}
	h.finish()
}

// Path errors and path statuses count against the same MaxRetries.
func TestPathStatusAndPathErrorShareRetries(t *testing.T) {
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.MaxRetries = 1 })
	res := make(chan error, 1)
	tries := 0
	go func() {
		res <- h.c.Do(context.Background(), func(c Conn) error {
			tries++
			if tries == 1 {
				return nvme.NVME_SC_ANA_INACCESSIBLE
			}
			return c.(*fakeConn).write(context.Background(), 1, 1, faultSocket)
		})
	}()
	err := <-res
	if !errors.Is(err, ErrRetriesExhausted) || tries != 2 {
		t.Fatalf("Do: %v after %d tries, want ErrRetriesExhausted after 2", err, tries)
	}
	h.waitState(StateConnecting) // the path error started recovery
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
