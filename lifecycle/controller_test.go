package lifecycle

import (
	"context"
	"errors"
	"log/slog"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
)

var quiet = slog.New(slog.DiscardHandler)

type harness struct {
	mu      sync.Mutex
	entered map[State]int // transitions into each state, from an observer
	moved   chan struct{} // signalled by the observer

	t   *testing.T
	v   *violations
	tgt *fakeTarget
	clk *clock.Fake
	c   *Controller
	blk *fakeBlock
}

func newHarness(t *testing.T, tweak func(*Options, *fakeTarget)) *harness {
	t.Helper()
	h := newUnstartedHarness(t, tweak)
	if err := h.c.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	h.c.SetBlock(h.blk)
	return h
}

// newUnstartedHarness is newHarness without Start: for tests of the first
// connect.
func newUnstartedHarness(t *testing.T, tweak func(*Options, *fakeTarget)) *harness {
	t.Helper()
	v := &violations{}
	h := &harness{t: t, v: v, tgt: newFakeTarget(v), clk: clock.NewFake(epoch), blk: &fakeBlock{v: v}}
	opts := DefaultOptions()
	opts.Clock = h.clk
	opts.Logger = quiet
	if tweak != nil {
		tweak(&opts, h.tgt)
	}
	c, err := New(h.tgt, opts)
	if err != nil {
		t.Fatal(err)
	}
	h.c = c
	h.entered = map[State]int{}
	h.moved = make(chan struct{}, 1)
	c.States().Observe(func(tr Transition) {
		h.mu.Lock()
		h.entered[tr.To]++
		h.mu.Unlock()
		select {
		case h.moved <- struct{}{}:
		default:
		}
	})
	return h
}

// waitTimers is h.clk.WaitTimers(n), failing the test instead of hanging
// when the timers are never armed.
func (h *harness) waitTimers(n int) {
	h.t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.clk.WaitTimers(n)
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		h.t.Fatalf("%d timers never armed (%d pending)", n, h.clk.Pending())
	}
}

// finish deletes the controller if needed and checks that nothing was
// violated or leaked.
func (h *harness) finish() {
	h.t.Helper()
	h.c.Delete()
	if s := h.c.State(); s != StateDead {
		h.t.Errorf("state after Delete: %v", s)
	}
	h.tgt.checkReleased()
	h.v.check(h.t)
}

// waitFor waits until cond holds, yielding between checks. The deadline
// only turns a hang into a failure; nothing is asserted about time.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		runtime.Gosched()
	}
}

func (h *harness) waitState(s State) {
	h.t.Helper()
	for {
		cur, ch := h.c.States().Watch()
		if cur == s {
			return
		}
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			h.t.Fatalf("state %v, waiting for %v", cur, s)
		}
	}
}

// heldWrite drops the association with a socket error and, while the
// controller is CONNECTING, starts a write; it returns once the write is
// held, with its result channel.
func (h *harness) heldWrite() <-chan error {
	h.t.Helper()
	h.tgt.lastConn().onError(errSocket)
	h.waitState(StateConnecting)
	res := h.doWrite(1, 1)
	waitFor(h.t, "the write to be held", func() bool { return h.c.Held() == 1 })
	return res
}

// doWrite runs a write through the controller on its own goroutine and
// returns its result channel.
func (h *harness) doWrite(lba, val uint64) <-chan error {
	res := make(chan error, 1)
	go func() {
		res <- h.c.Do(context.Background(), func(conn Conn) error {
			return conn.(*fakeConn).write(context.Background(), lba, val, faultNone)
		})
	}()
	return res
}

// waitEntered waits until the controller has entered state s at least n
// times, also if it has left it since.
func (h *harness) waitEntered(s State, n int) {
	h.t.Helper()
	for {
		h.mu.Lock()
		k := h.entered[s]
		h.mu.Unlock()
		if k >= n {
			return
		}
		select {
		case <-h.moved:
		case <-time.After(20 * time.Second):
			h.t.Fatalf("state %v, waiting to enter %v", h.c.State(), s)
		}
	}
}

func (h *harness) states() []State {
	var s []State
	for _, tr := range h.c.States().History() {
		s = append(s, tr.To)
	}
	return s
}

func equalStates(a, b []State) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestStartDelete(t *testing.T) {
	h := newHarness(t, nil)
	if s := h.c.State(); s != StateLive {
		t.Fatalf("state after Start: %v", s)
	}
	var steps []Step
	h.c.setStepHook(func(s Step, after bool) {
		if !after {
			steps = append(steps, s)
		}
	})
	// Keep-alive runs every KATO/2.
	h.clk.WaitTimers(1)
	h.clk.Advance(2 * time.Second)
	conn := h.tgt.lastConn()
	waitFor(t, "a keep-alive", func() bool { conn.mu.Lock(); defer conn.mu.Unlock(); return conn.kaWritten == 1 })

	if err := <-h.doWrite(7, 42); err != nil {
		t.Fatalf("write: %v", err)
	}
	h.finish()

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
	if got, want := h.states(), []State{StateConnecting, StateLive, StateDeleting, StateDead}; !equalStates(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	if !h.blk.stopped || !h.blk.removed {
		t.Fatalf("block stopped=%v removed=%v", h.blk.stopped, h.blk.removed)
	}
	if err := <-h.doWrite(1, 1); !errors.Is(err, syscall.EIO) || !errors.Is(err, ErrDeleted) {
		t.Fatalf("write after delete: %v, want EIO", err)
	}
}

func TestFirstConnectFailureIsNotRetried(t *testing.T) {
	v := &violations{}
	tgt := newFakeTarget(v)
	boom := errors.New("connection refused")
	tgt.connectErrs = []error{boom}
	opts := DefaultOptions()
	opts.Clock = clock.NewFake(epoch)
	opts.Logger = quiet
	c, _ := New(tgt, opts)
	if err := c.Start(context.Background()); !errors.Is(err, boom) {
		t.Fatalf("Start: %v", err)
	}
	<-c.Done()
	if c.State() != StateDead || tgt.connectCount() != 1 {
		t.Fatalf("state %v after %d connects", c.State(), tgt.connectCount())
	}
	c.Delete()
}

// Keep-alive timeout → RESETTING → CONNECTING → LIVE, and the I/O held
// meanwhile completes on the new association.
func TestKeepAliveTimeoutRecovers(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		tgt.keepAlives = make(chan *fakeCmd)
	})
	first := h.tgt.lastConn()
	h.clk.WaitTimers(1)
	h.clk.Advance(2 * time.Second)
	<-h.tgt.keepAlives // in flight, never answered
	h.clk.WaitTimers(1)
	h.clk.Advance(4 * time.Second) // KATO
	h.waitState(StateConnecting)

	res := h.doWrite(3, 33)
	waitFor(t, "the write to be held", func() bool { return h.c.Held() == 1 })
	select {
	case err := <-res:
		t.Fatalf("write completed while CONNECTING: %v", err)
	default:
	}

	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second) // reconnect_delay
	if err := <-res; err != nil {
		t.Fatalf("held write: %v", err)
	}
	if h.c.State() != StateLive || h.tgt.lastConn() == first {
		t.Fatalf("state %v, reconnected %v", h.c.State(), h.tgt.lastConn() != first)
	}
	if h.tgt.data[3] != 33 {
		t.Fatalf("block 3 = %d", h.tgt.data[3])
	}
	first.mu.Lock()
	freed := first.adminFreed && first.ioFreed
	first.mu.Unlock()
	if !freed {
		t.Fatal("the first association was not freed")
	}
	// Keep-alive is running again on the new association.
	h.clk.WaitTimers(1)
	h.clk.Advance(2 * time.Second)
	ka := <-h.tgt.keepAlives
	ka.complete(nil)
	want := []State{StateConnecting, StateLive, StateResetting, StateConnecting, StateLive}
	if got := h.states(); !equalStates(got, want) {
		t.Fatalf("states %v, want %v", got, want)
	}
	h.finish()
}

// ctrl_loss_tmo of 30 s with reconnect_delay 10 s is 3 attempts; then the
// controller deletes itself and the held I/O fails with EIO.
func TestCtrlLossTmoDeletes(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		o.CtrlLossTmo = 30 * time.Second
	})
	fail := errors.New("connection refused")
	h.tgt.mu.Lock()
	h.tgt.connectErrs = []error{fail, fail, fail, fail, fail}
	h.tgt.mu.Unlock()
	res := h.heldWrite()
	for i := 0; i < 3; i++ {
		h.clk.WaitTimers(1)
		h.clk.Advance(10 * time.Second)
	}
	<-h.c.Done()
	if err := <-res; !errors.Is(err, syscall.EIO) {
		t.Fatalf("held write: %v, want EIO", err)
	}
	if n := h.tgt.connectCount(); n != 1+3 {
		t.Fatalf("%d connects, want 1+3", n)
	}
	if err := h.c.Err(); err == nil || !errors.Is(err, fail) {
		t.Fatalf("Err() = %v", err)
	}
	if !h.blk.stopped || !h.blk.removed {
		t.Fatal("block device not removed")
	}
	h.finish()
}

func TestCtrlLossTmoForever(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		o.CtrlLossTmo = -1
	})
	fail := errors.New("connection refused")
	errs := make([]error, 100)
	for i := range errs {
		errs[i] = fail
	}
	h.tgt.mu.Lock()
	h.tgt.connectErrs = errs
	h.tgt.mu.Unlock()
	h.tgt.lastConn().onError(errSocket)
	h.waitState(StateConnecting)
	for i := 0; i < 101; i++ {
		h.clk.WaitTimers(1)
		h.clk.Advance(10 * time.Second)
	}
	h.waitState(StateLive)
	if n := h.tgt.connectCount(); n != 102 {
		t.Fatalf("%d connects", n)
	}
	h.finish()
}

func TestDNRStopsRetries(t *testing.T) {
	h := newHarness(t, nil)
	h.tgt.mu.Lock()
	h.tgt.connectErrs = []error{errors.Join(errors.New("connect"), dnrError{})}
	h.tgt.mu.Unlock()
	h.tgt.lastConn().onError(errSocket)
	h.waitState(StateConnecting)
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	<-h.c.Done()
	if n := h.tgt.connectCount(); n != 2 {
		t.Fatalf("%d connects, want 2 (no retry after DNR)", n)
	}
	if h.c.State() != StateDead {
		t.Fatalf("state %v", h.c.State())
	}
	h.finish()
}

func TestFastIOFail(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		o.FastIOFailTmo = 15 * time.Second
		o.CtrlLossTmo = -1
	})
	fail := errors.New("connection refused")
	h.tgt.mu.Lock()
	h.tgt.connectErrs = []error{fail, fail}
	h.tgt.mu.Unlock()
	res := h.heldWrite()
	h.clk.WaitTimers(2) // reconnect_delay and fast_io_fail_tmo
	h.clk.Advance(10 * time.Second)
	h.clk.WaitTimers(2)
	select {
	case err := <-res:
		t.Fatalf("held write failed before fast_io_fail_tmo: %v", err)
	default:
	}
	h.clk.Advance(5 * time.Second) // fast_io_fail_tmo expires
	if err := <-res; !errors.Is(err, ErrFastIOFail) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("held write: %v, want fast_io_fail EIO", err)
	}
	// New I/O fails at once while still reconnecting.
	if err := <-h.doWrite(2, 2); !errors.Is(err, ErrFastIOFail) {
		t.Fatalf("new write: %v", err)
	}
	h.clk.WaitTimers(1)
	h.clk.Advance(5 * time.Second) // second attempt fails
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second) // third succeeds
	h.waitState(StateLive)
	if err := <-h.doWrite(3, 3); err != nil {
		t.Fatalf("write once LIVE again: %v", err)
	}
	h.finish()
}

func TestNamespaceChangedOnReconnect(t *testing.T) {
	h := newHarness(t, nil)
	h.tgt.mu.Lock()
	h.tgt.ns.NGUID[0] ^= 0xff
	h.tgt.mu.Unlock()
	res := h.heldWrite()
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	<-h.c.Done()
	if err := h.c.Err(); !errors.Is(err, ErrNamespaceChanged) {
		t.Fatalf("Err() = %v", err)
	}
	if err := <-res; !errors.Is(err, syscall.EIO) {
		t.Fatalf("held write: %v", err)
	}
	if _, ok := h.tgt.data[1]; ok {
		t.Fatal("write resumed onto a different namespace")
	}
	h.finish() // the second association was released in order too
}

func TestDeleteWhileReconnectWaiting(t *testing.T) {
	h := newHarness(t, nil)
	res := h.heldWrite()
	h.c.Delete()
	if err := <-res; !errors.Is(err, ErrDeleted) {
		t.Fatalf("held write: %v", err)
	}
	h.finish()
}

func TestDeleteDuringConnectAttempt(t *testing.T) {
	h := newHarness(t, nil)
	h.tgt.mu.Lock()
	h.tgt.blockConnect = true
	h.tgt.mu.Unlock()
	h.tgt.lastConn().onError(errSocket)
	h.waitState(StateConnecting)
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	waitFor(t, "the connect attempt", func() bool { return h.tgt.connectCount() == 2 })
	h.c.Delete()
	h.finish()
}

// A path error on I/O starts recovery and the I/O is retried on the next
// association.
func TestPathErrorRetriedOnNextAssociation(t *testing.T) {
	h := newHarness(t, nil)
	res := make(chan error, 1)
	tries := 0
	go func() {
		res <- h.c.Do(context.Background(), func(conn Conn) error {
			tries++
			f := faultNone
			if tries == 1 {
				f = faultSocket
			}
			return conn.(*fakeConn).write(context.Background(), 9, 99, f)
		})
	}()
	h.waitState(StateConnecting)
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	if err := <-res; err != nil || tries != 2 {
		t.Fatalf("write: %v after %d tries", err, tries)
	}
	if h.tgt.data[9] != 99 {
		t.Fatal("retried write not applied")
	}
	h.finish()
}

func TestRetriesExhausted(t *testing.T) {
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.MaxRetries = 2 })
	res := make(chan error, 1)
	go func() {
		res <- h.c.Do(context.Background(), func(conn Conn) error {
			return conn.(*fakeConn).write(context.Background(), 9, 99, faultSocket)
		})
	}()
	for i := 1; i <= 3; i++ {
		h.waitEntered(StateConnecting, i+1)
		h.clk.WaitTimers(1)
		h.clk.Advance(10 * time.Second)
		h.waitEntered(StateLive, i+1)
	}
	if err := <-res; !errors.Is(err, ErrRetriesExhausted) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("write: %v", err)
	}
	h.finish()
}

// A held I/O gives up when its context is done.
func TestHeldIOContext(t *testing.T) {
	h := newHarness(t, nil)
	h.tgt.lastConn().onError(errSocket)
	h.waitState(StateConnecting)
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() { res <- h.c.Do(ctx, func(Conn) error { return nil }) }()
	waitFor(t, "the I/O to be held", func() bool { return h.c.Held() == 1 })
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Fatalf("Do: %v", err)
	}
	h.finish()
}

// fakeLinkWatch hands the controller's callbacks to the test.
type fakeLinkWatch struct{ cb chan linkCallbacks }

type linkCallbacks struct {
	down func(error)
	up   func()
}

func newFakeLinkWatch() *fakeLinkWatch { return &fakeLinkWatch{cb: make(chan linkCallbacks)} }

func (w *fakeLinkWatch) Watch(ctx context.Context, down func(error), up func()) error {
	select {
	case w.cb <- linkCallbacks{down, up}:
	case <-ctx.Done():
	}
	<-ctx.Done()
	return ctx.Err()
}

// A link going down starts recovery at once, without waiting for KATO.
func TestLinkDownStartsRecovery(t *testing.T) {
	lw := newFakeLinkWatch()
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.LinkWatch = lw })
	down := (<-lw.cb).down
	down(errors.New("eth0 down"))
	h.waitState(StateConnecting)
	tr := h.c.States().History()
	if last := tr[len(tr)-1]; last.Time != epoch {
		t.Fatalf("recovery started at %v, want at once (%v)", last.Time, epoch)
	}
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	h.finish()
}

func TestStaleErrorIgnored(t *testing.T) {
	h := newHarness(t, nil)
	first := h.tgt.lastConn()
	first.onError(errSocket)
	h.waitState(StateConnecting)
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	first.onError(errSocket) // from the old association: ignored
	if err := <-h.doWrite(1, 1); err != nil {
		t.Fatal(err)
	}
	if s := h.c.State(); s != StateLive {
		t.Fatalf("stale error changed state to %v", s)
	}
	h.finish()
}

// BenchmarkDoParallel measures the I/O gate alone: Do on a LIVE controller
// with a function that does nothing.
func BenchmarkDoParallel(b *testing.B) {
	v := &violations{}
	tgt := newFakeTarget(v)
	opts := DefaultOptions()
	opts.Logger = quiet
	c, err := New(tgt, opts)
	if err != nil {
		b.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		b.Fatal(err)
	}
	defer c.Delete()
	ctx := context.Background()
	nop := func(Conn) error { return nil }
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := c.Do(ctx, nop); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// Keep-alive runs only while LIVE: none is sent while the controller waits
// to reconnect, however many keep-alive periods pass.
func TestNoKeepAliveWhileReconnecting(t *testing.T) {
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.ReconnectDelay = time.Minute })
	first := h.tgt.lastConn()
	first.onError(errSocket)
	h.waitState(StateConnecting)
	for i := 0; i < 20; i++ {
		h.clk.WaitTimers(1)
		h.clk.Advance(2 * time.Second) // KATO/2 each time, short of reconnect_delay
	}
	first.mu.Lock()
	n := first.kaWritten
	first.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d keep-alives sent on the failed association", n)
	}
	if h.tgt.connectCount() != 1 {
		t.Fatalf("reconnected before reconnect_delay")
	}
	h.clk.Advance(time.Minute)
	h.waitState(StateLive)
	h.finish()
}

// Delete from many goroutines at once, while recovering with I/O held.
func TestConcurrentDelete(t *testing.T) {
	h := newHarness(t, nil)
	res := h.heldWrite()
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); h.c.Delete() }()
	}
	wg.Wait()
	if err := <-res; !errors.Is(err, ErrDeleted) {
		t.Fatalf("held write: %v", err)
	}
	deleting := 0
	for _, tr := range h.c.States().History() {
		if tr.To == StateDeleting {
			deleting++
		}
	}
	if deleting != 1 {
		t.Fatalf("entered DELETING %d times", deleting)
	}
	h.finish()
}

// The path coming back while the controller waits out reconnect_delay makes
// it reconnect at once: LIVE again with the fake clock never advanced.
func TestLinkUpReconnectsAtOnce(t *testing.T) {
	lw := newFakeLinkWatch()
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.LinkWatch = lw })
	cb := <-lw.cb
	cb.down(errors.New("eth0 down"))
	h.waitState(StateConnecting)
	res := h.doWrite(4, 44)
	waitFor(t, "the write to be held", func() bool { return h.c.Held() == 1 })
	h.clk.WaitTimers(1) // waiting out reconnect_delay
	if n := h.tgt.connectCount(); n != 1 {
		t.Fatalf("%d connects before the path came back", n)
	}
	cb.up()
	h.waitState(StateLive)
	if err := <-res; err != nil {
		t.Fatalf("held write: %v", err)
	}
	hist := h.c.States().History()
	if last := hist[len(hist)-1]; last.To != StateLive || !last.Time.Equal(epoch) {
		t.Fatalf("last transition %v at %v, want LIVE at once (%v)", last.To, last.Time, epoch)
	}
	if n := h.tgt.connectCount(); n != 2 {
		t.Fatalf("%d connects, want 2", n)
	}
	h.finish()
}

// An early attempt that fails does not count towards ctrl_loss_tmo, and the
// next regular attempt is still reconnect_delay after it: with
// ctrl_loss_tmo 20 s and reconnect_delay 10 s there are two regular attempts
// besides the early one.
func TestLinkUpEarlyAttemptDoesNotCount(t *testing.T) {
	lw := newFakeLinkWatch()
	h := newHarness(t, func(o *Options, _ *fakeTarget) {
		o.LinkWatch = lw
		o.CtrlLossTmo = 20 * time.Second
	})
	fail := errors.New("connection refused")
	h.tgt.mu.Lock()
	h.tgt.connectErrs = []error{fail, fail, fail, fail}
	h.tgt.mu.Unlock()
	cb := <-lw.cb
	cb.down(errors.New("eth0 down"))
	h.waitState(StateConnecting)
	h.clk.WaitTimers(1) // reconnect_delay
	armed := h.clk.Armed()
	cb.up()
	waitFor(t, "the early attempt", func() bool { return h.tgt.connectCount() == 2 })
	// The early attempt failed: a new reconnect_delay is armed, and
	// nothing happens until it has passed.
	h.clk.WaitArmed(armed + 1)
	h.clk.WaitTimers(1)
	if n := h.tgt.connectCount(); n != 2 {
		t.Fatalf("%d connects before reconnect_delay passed again", n)
	}
	h.clk.Advance(10 * time.Second)
	waitFor(t, "the first regular attempt", func() bool { return h.tgt.connectCount() == 3 })
	deleted := func() bool {
		select {
		case <-h.c.Done():
			return true
		default:
			return false
		}
	}
	waitFor(t, "the second regular attempt to be armed", func() bool { return deleted() || h.clk.Pending() > 0 })
	if deleted() {
		t.Fatalf("deleted after %d connects (%v): the early attempt counted towards ctrl_loss_tmo", h.tgt.connectCount(), h.c.Err())
	}
	h.clk.Advance(10 * time.Second)
	<-h.c.Done()
	if n := h.tgt.connectCount(); n != 1+1+2 {
		t.Fatalf("%d connects, want the first, the early one and 2 regular ones", n)
	}
	if err := h.c.Err(); err == nil || !strings.Contains(err.Error(), "ctrl_loss_tmo expired after 2 attempts") {
		t.Fatalf("Err() = %v", err)
	}
	h.finish()
}

// The path coming back while LIVE says nothing about a later failure: that
// recovery still waits reconnect_delay.
func TestLinkUpWhileLiveIsForgotten(t *testing.T) {
	lw := newFakeLinkWatch()
	h := newHarness(t, func(o *Options, _ *fakeTarget) { o.LinkWatch = lw })
	cb := <-lw.cb
	cb.up() // e.g. a flap the controller rode out
	h.tgt.lastConn().onError(errSocket)
	h.waitEntered(StateConnecting, 2)
	h.clk.WaitTimers(1)
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	hist := h.c.States().History()
	if last := hist[len(hist)-1]; !last.Time.Equal(epoch.Add(10 * time.Second)) {
		t.Fatalf("reconnected at %v, want after reconnect_delay (%v)", last.Time, epoch.Add(10*time.Second))
	}
	h.finish()
}
