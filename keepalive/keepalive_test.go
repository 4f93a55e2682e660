package keepalive

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// call is one KeepAlive in progress on the fake sender. The test answers it
// with reply; if the Keeper cancels it first, the fake returns ctx.Err().
type call struct {
	ctx   context.Context
	reply chan error
}

// fakeSender hands every KeepAlive to the test and records whether any was
// submitted after Stop began.
type fakeSender struct {
	calls   chan call
	stopped atomic.Bool
	late    atomic.Int32 // submissions after stopped was set
}

func newFakeSender() *fakeSender { return &fakeSender{calls: make(chan call)} }

func (s *fakeSender) KeepAlive(ctx context.Context) error {
	if s.stopped.Load() {
		s.late.Add(1)
	}
	c := call{ctx: ctx, reply: make(chan error, 1)}
	select {
	case s.calls <- c:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-c.reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *fakeSender) next(t *testing.T) call {
	t.Helper()
	select {
	case c := <-s.calls:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no keep-alive was sent")
		return call{}
	}
}

func (s *fakeSender) none(t *testing.T) {
	t.Helper()
	select {
	case <-s.calls:
		t.Fatal("unexpected keep-alive")
	default:
	}
}

func TestPeriodIsHalfKATO(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	defer k.Stop()

	for i := 0; i < 3; i++ {
		clk.WaitArmed(2*i + 1) // each keep-alive arms a tick and a KATO timer
		clk.WaitTimers(1)
		d, _ := clk.NextDeadline()
		if want := clk.Now().Add(2 * time.Second); !d.Equal(want) {
			t.Fatalf("tick %d: next keep-alive due at %v, want %v", i, d, want)
		}
		clk.Advance(2 * time.Second)
		c := s.next(t)
		c.reply <- nil
	}
	if sent, skipped := k.Stats(); sent < 3 || skipped != 0 {
		t.Fatalf("stats sent=%d skipped=%d", sent, skipped)
	}
}

func TestNextDueOnePeriodAfterSend(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	defer k.Stop()

	clk.WaitTimers(1)
	clk.Advance(2 * time.Second)
	sentAt := clk.Now()
	c := s.next(t)
	clk.WaitTimers(1) // the KATO timer for this keep-alive
	clk.Advance(500 * time.Millisecond)
	c.reply <- nil
	// The KATO timer is stopped, the next tick armed.
	clk.WaitArmed(3)
	clk.WaitTimers(1)
	d, _ := clk.NextDeadline()
	if want := sentAt.Add(2 * time.Second); !d.Equal(want) {
		t.Fatalf("next keep-alive due at %v, want %v (one period after the previous was sent)", d, want)
	}
}

type fakeTraffic struct {
	mu        sync.Mutex
	submitted uint64
	completed []uint64
}

func (f *fakeTraffic) Submitted() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.submitted
}

func (f *fakeTraffic) CompletedSince(mark uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.completed {
		if c >= mark {
			return true
		}
	}
	return false
}

// command submits a command now and returns a function that completes it.
func (f *fakeTraffic) command() (complete func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	seq := f.submitted
	f.submitted++
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.completed = append(f.completed, seq)
	}
}

func TestTrafficBased(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	tr := &fakeTraffic{}
	k := Start(s, Config{KATO: 4 * time.Second, Traffic: tr, Clock: clk})
	defer k.Stop()

	// Period is KATO/4.
	clk.WaitTimers(1)
	d, _ := clk.NextDeadline()
	if want := clk.Now().Add(time.Second); !d.Equal(want) {
		t.Fatalf("next keep-alive due at %v, want %v", d, want)
	}

	// A command submitted and completed within the period: skipped.
	tr.command()()
	clk.Advance(time.Second)
	clk.WaitArmed(2)
	s.none(t)
	if _, skipped := k.Stats(); skipped != 1 {
		t.Fatalf("skipped = %d, want 1", skipped)
	}

	// No traffic in the next period: sent.
	clk.Advance(time.Second)
	s.next(t).reply <- nil

	// A long-running command submitted before the last check and
	// completed now does not defer the keep-alive.
	clk.WaitArmed(4)
	complete := tr.command()
	clk.Advance(time.Second)
	c := s.next(t) // its own submission counted as nothing completed
	complete()
	c.reply <- nil
	// The command was submitted before this tick's mark: the next tick sends.
	clk.WaitArmed(6)
	clk.Advance(time.Second)
	s.next(t).reply <- nil
	if sent, skipped := k.Stats(); sent != 3 || skipped != 1 {
		t.Fatalf("stats sent=%d skipped=%d, want 3 and 1", sent, skipped)
	}
}

func TestFailureIsReportedAndNotRearmed(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	clk.WaitTimers(1)
	clk.Advance(2 * time.Second)
	boom := errors.New("connection reset")
	s.next(t).reply <- boom
	err := <-k.Failed()
	if !errors.Is(err, boom) {
		t.Fatalf("Failed() = %v, want %v", err, boom)
	}
	k.Stop() // the goroutine has returned by itself; Stop must not hang
	if n := clk.Pending(); n != 0 {
		t.Fatalf("%d timers still armed after a failed keep-alive", n)
	}
}

func TestTimeoutAfterKATO(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	defer k.Stop()
	clk.WaitTimers(1)
	clk.Advance(2 * time.Second)
	c := s.next(t)
	clk.WaitTimers(1)
	clk.Advance(4*time.Second - time.Nanosecond)
	select {
	case err := <-k.Failed():
		t.Fatalf("failed before KATO: %v", err)
	default:
	}
	clk.Advance(time.Nanosecond)
	if err := <-k.Failed(); !errors.Is(err, ErrTimeout) {
		t.Fatalf("Failed() = %v, want ErrTimeout", err)
	}
	if c.ctx.Err() == nil {
		t.Fatal("the timed-out keep-alive's context was not cancelled")
	}
}

// A Sender that ignores a completion racing the KATO timer: the keep-alive
// completed, so it is not a timeout.
func TestCompletionAtDeadlineIsNotTimeout(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	defer k.Stop()
	clk.WaitTimers(1)
	clk.Advance(2 * time.Second)
	c := s.next(t)
	clk.WaitTimers(1)
	c.reply <- nil
	clk.Advance(4 * time.Second)
	select {
	case err := <-k.Failed():
		t.Fatalf("completed keep-alive reported as %v", err)
	default:
	}
}

func TestStopWithKeepAliveInFlight(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	clk.WaitTimers(1)
	clk.Advance(2 * time.Second)
	c := s.next(t)
	k.Stop()
	s.stopped.Store(true)
	if c.ctx.Err() == nil {
		t.Fatal("Stop returned while the in-flight keep-alive's context is live")
	}
	select {
	case err := <-k.Failed():
		t.Fatalf("Stop reported as a failure: %v", err)
	default:
	}
	clk.Advance(time.Hour)
	s.none(t)
	if n := s.late.Load(); n != 0 {
		t.Fatalf("%d keep-alives submitted after Stop", n)
	}
}

// Stop racing the timer that sends the next keep-alive, many times: either
// the keep-alive was submitted before Stop returned, or never.
func TestStopRacingTick(t *testing.T) {
	for i := 0; i < 500; i++ {
		clk := clock.NewFake(epoch)
		s := newFakeSender()
		k := Start(s, Config{KATO: 2 * time.Millisecond, Clock: clk})
		clk.WaitTimers(1)
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); clk.Advance(time.Millisecond) }()
		go func() { defer wg.Done(); k.Stop(); s.stopped.Store(true) }()
		// Answer nothing: a submitted keep-alive is abandoned by Stop.
		wg.Wait()
		clk.Advance(time.Hour)
		if n := s.late.Load(); n != 0 {
			t.Fatalf("iteration %d: %d keep-alives submitted after Stop", i, n)
		}
	}
}

func TestNotRearmedOutsideLiveOrConnecting(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	var live atomic.Bool
	live.Store(true)
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk, MayRearm: live.Load})
	clk.WaitTimers(1)
	clk.Advance(2 * time.Second)
	c := s.next(t)
	live.Store(false) // e.g. RESETTING while the keep-alive was in flight
	c.reply <- nil
	<-k.done // the goroutine returns by itself
	if n := clk.Pending(); n != 0 {
		t.Fatalf("re-armed outside LIVE/CONNECTING: %d timers pending", n)
	}
	k.Stop()
}

func TestZeroKATODisables(t *testing.T) {
	s := newFakeSender()
	k := Start(s, Config{KATO: 0})
	k.Stop()
	s.none(t)
}

func TestConcurrentStop(t *testing.T) {
	clk := clock.NewFake(epoch)
	s := newFakeSender()
	k := Start(s, Config{KATO: 4 * time.Second, Clock: clk})
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); k.Stop() }()
	}
	wg.Wait()
	select {
	case <-k.done:
	default:
		t.Fatal("Stop returned before the keep-alive goroutine")
	}
}

func TestPeriod(t *testing.T) {
	if p := Period(5*time.Second, false); p != 2500*time.Millisecond {
		t.Fatalf("Period(5s) = %v", p)
	}
	if p := Period(5*time.Second, true); p != 1250*time.Millisecond {
		t.Fatalf("Period(5s, TBKAS) = %v", p)
	}
}
