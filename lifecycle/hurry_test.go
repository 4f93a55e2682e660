package lifecycle

import (
	"context"
	"errors"
	"sync"
	"syscall"
	"testing"
	"time"
)

// drainingBlock is a block device whose Stop, like ublk STOP_DEV, returns
// only once the I/O in flight has completed (the test says when).
type drainingBlock struct {
	stopping chan struct{} // closed when Stop begins
	drained  chan struct{} // closed by the test when the I/O has completed

	mu        sync.Mutex
	removed   bool
	removeErr error // ctx.Err() of Remove's context
}

func (b *drainingBlock) Stop(ctx context.Context) error {
	close(b.stopping)
	<-b.drained
	return nil
}

func (b *drainingBlock) Remove(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.removed, b.removeErr = true, ctx.Err()
	return nil
}

// stalledWrite starts a write the target never answers (a slow or
// blackholed target): it ends only when the socket is shut. inFlight is
// closed once the command is written.
func (h *harness) stalledWrite() (inFlight <-chan struct{}, res <-chan error) {
	written := make(chan struct{})
	out := make(chan error, 1)
	go func() {
		out <- h.c.Do(context.Background(), func(conn Conn) error {
			cmd, err := conn.(*fakeConn).submit(context.Background(), false, "write", nil)
			if err != nil {
				return err
			}
			close(written)
			return <-cmd.done
		})
	}()
	return written, out
}

// TestHurryDuringDelete: a graceful delete waits in STOP_DEV for a write
// the target never answers; Hurry shuts the sockets, the write fails with
// EIO, and the delete finishes in the usual step order, with each
// association shut once and freed only after its last touch.
func TestHurryDuringDelete(t *testing.T) {
	h := newHarness(t, nil)
	blk := &drainingBlock{stopping: make(chan struct{}), drained: make(chan struct{})}
	h.c.SetBlock(blk)
	var mu sync.Mutex
	var steps []Step
	h.c.setStepHook(func(s Step, after bool) {
		if !after {
			mu.Lock()
			steps = append(steps, s)
			mu.Unlock()
		}
	})

	inFlight, res := h.stalledWrite()
	<-inFlight
	deleted := make(chan struct{})
	go func() {
		defer close(deleted)
		h.c.Delete()
	}()
	<-blk.stopping
	// The drain cannot end on its own: nothing answers the write.
	select {
	case err := <-res:
		t.Fatalf("the stalled write ended before Hurry: %v", err)
	case <-deleted:
		t.Fatal("Delete returned with a write in flight")
	default:
	}

	h.c.Hurry()
	var err error
	select {
	case err = <-res:
	case <-time.After(20 * time.Second):
		t.Fatal("the stalled write did not end after Hurry")
	}
	if !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrDeleted) {
		t.Fatalf("stalled write after Hurry: %v, want ErrDeleted (EIO)", err)
	}
	close(blk.drained) // STOP_DEV returns once the I/O completed
	<-deleted

	h.c.Hurry() // after DEAD: nothing to do, nothing twice
	h.finish()
	mu.Lock()
	defer mu.Unlock()
	want := []Step{StepChangeState, StepStopKeepAlive, StepQuiesceBlock, StepShutdownController,
		StepShutdownSockets, StepWaitCompletions, StepFreeIOQueues, StepFreeAdminQueue, StepRemoveBlock}
	if len(steps) != len(want) {
		t.Fatalf("teardown steps %v, want %v", steps, want)
	}
	for i := range want {
		if steps[i] != want[i] {
			t.Fatalf("teardown steps %v, want %v", steps, want)
		}
	}
	if !blk.removed || !errors.Is(blk.removeErr, context.Canceled) {
		t.Fatalf("block removed %v with ctx error %v; want removed with the hurry context ended", blk.removed, blk.removeErr)
	}
}

// TestHurryWhileLive: Hurry without a delete first deletes the controller;
// the write its socket shutdown fails does not start a recovery (no
// RESETTING), it fails with EIO.
func TestHurryWhileLive(t *testing.T) {
	h := newHarness(t, nil)
	inFlight, res := h.stalledWrite()
	<-inFlight
	h.c.Hurry()
	select {
	case <-h.c.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the controller is not DEAD after Hurry")
	}
	if err := <-res; !errors.Is(err, ErrDeleted) {
		t.Fatalf("stalled write after Hurry: %v, want ErrDeleted (EIO)", err)
	}
	h.finish()
	if got, want := h.states(), []State{StateConnecting, StateLive, StateDeleting, StateDead}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	if !h.blk.stopped || !h.blk.removed {
		t.Fatalf("block stopped=%v removed=%v", h.blk.stopped, h.blk.removed)
	}
}
