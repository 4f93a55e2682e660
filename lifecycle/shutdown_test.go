package lifecycle

import (
	"testing"
	"time"
)

// StepShutdownController: a delete sends the shutdown notification
// (CC.SHN) after the ublk side is drained and before the sockets are shut;
// recovery does not; a hung controller holds the delete only for the
// bound; a hurried delete skips it.

// stepOrder records the steps begun, and the notification's place among
// them.
type stepOrder struct {
	conn  *fakeConn
	steps []Step
	// notifiedAt is the step during which ShutdownController was
	// called, or numSteps.
	notifiedAt Step
}

func (o *stepOrder) hook(s Step, after bool) {
	if !after {
		o.steps = append(o.steps, s)
		return
	}
	o.conn.mu.Lock()
	n := o.conn.shutdownNotified
	o.conn.mu.Unlock()
	if n && o.notifiedAt == numSteps {
		o.notifiedAt = s
	}
}

func TestDeleteShutsControllerDown(t *testing.T) {
	h := newHarness(t, nil)
	conn := h.tgt.lastConn()
	o := &stepOrder{conn: conn, notifiedAt: numSteps}
	h.c.setStepHook(o.hook)
	h.finish()
	if o.notifiedAt != StepShutdownController {
		t.Fatalf("shutdown notification during %v, want %v", o.notifiedAt, StepShutdownController)
	}
	if !h.blk.stopped {
		t.Fatal("block not stopped")
	}
}

func TestRecoveryDoesNotShutControllerDown(t *testing.T) {
	h := newHarness(t, nil)
	first := h.tgt.lastConn()
	first.onError(errSocket)
	h.waitState(StateConnecting)
	h.waitTimers(1)
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	first.mu.Lock()
	notified := first.shutdownNotified
	first.mu.Unlock()
	if notified {
		t.Fatal("recovery sent the shutdown notification")
	}
	second := h.tgt.lastConn()
	h.finish()
	second.mu.Lock()
	defer second.mu.Unlock()
	if !second.shutdownNotified {
		t.Fatal("delete after recovery sent no shutdown notification")
	}
}

// A controller that never completes the shutdown holds the delete only
// until Options.ShutdownTimeout; the command left in flight is failed by
// the socket shutdown and waited for like any other.
func TestHungControllerShutdownBounded(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		o.ShutdownTimeout = 3 * time.Second
		tgt.shutdownHang = true
	})
	conn := h.tgt.lastConn()
	deleted := make(chan struct{})
	go func() {
		defer close(deleted)
		h.c.Delete()
	}()
	h.waitTimers(1) // the bound, armed while the notification hangs
	select {
	case <-deleted:
		t.Fatal("Delete returned while the shutdown notification was in flight")
	default:
	}
	h.clk.Advance(3 * time.Second)
	select {
	case <-deleted:
	case <-time.After(20 * time.Second):
		t.Fatal("Delete held past the shutdown bound")
	}
	conn.mu.Lock()
	notified := conn.shutdownNotified
	conn.mu.Unlock()
	if !notified {
		t.Fatal("no shutdown notification")
	}
	h.finish()
}

// Hurry ends a hanging shutdown notification at once, without the bound.
func TestHurryEndsShutdownNotification(t *testing.T) {
	started := make(chan struct{})
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		tgt.shutdownHang = true
		tgt.shutdownStarted = started
	})
	deleted := make(chan struct{})
	go func() {
		defer close(deleted)
		h.c.Delete()
	}()
	<-started
	h.c.Hurry()
	select {
	case <-deleted:
	case <-time.After(20 * time.Second):
		t.Fatal("Delete held by a hanging shutdown notification after Hurry")
	}
	h.finish()
}

// A delete hurried before it reaches the step sends no notification.
func TestHurrySkipsShutdownNotification(t *testing.T) {
	h := newHarness(t, noKeepAlive)
	conn := h.tgt.lastConn()
	h.c.Hurry()
	<-h.c.Done()
	conn.mu.Lock()
	notified := conn.shutdownNotified
	conn.mu.Unlock()
	if notified {
		t.Fatal("a hurried delete sent the shutdown notification")
	}
	h.finish()
}
