package lifecycle

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// The seed's race, forced. A keep-alive is in flight (or only allocated)
// exactly as teardown begins, and its completion is made to arrive before,
// during and after each teardown step, through the step hook: no sleeps.
// The fakes record any touch of a freed queue, a keep-alive submitted or
// still running after keep-alive was stopped, and freeing with references
// held; goleak (TestMain) catches leaked goroutines.

type timing int

const (
	tBefore timing = iota
	tDuring
	tAfter
)

func (w timing) String() string { return [...]string{"before", "during", "after"}[w] }

type mode struct {
	name    string
	trigger func(h *harness, conn *fakeConn, wg *sync.WaitGroup)
	delete  bool
}

var seedModes = []mode{
	{name: "recovery", trigger: func(h *harness, conn *fakeConn, _ *sync.WaitGroup) { conn.onError(errSocket) }},
	{name: "delete", delete: true, trigger: func(h *harness, _ *fakeConn, wg *sync.WaitGroup) {
		wg.Add(1)
		go func() { defer wg.Done(); h.c.Delete() }()
	}},
}

// finishSeed lets recovery reconnect (or waits for delete) and checks the
// end state.
func finishSeed(t *testing.T, h *harness, m mode, wg *sync.WaitGroup) {
	t.Helper()
	if m.delete {
		wg.Wait()
	} else {
		h.waitState(StateConnecting)
		h.clk.WaitTimers(1)
		h.clk.Advance(10 * time.Second)
		h.waitState(StateLive)
		if err := <-h.doWrite(5, 5); err != nil {
			t.Fatalf("write after recovery: %v", err)
		}
	}
	h.finish()
}

func TestSeedKeepAliveCompletionVersusTeardown(t *testing.T) {
	for _, m := range seedModes {
		for s := StepChangeState; s < numSteps; s++ {
			for _, when := range []timing{tBefore, tDuring, tAfter} {
				t.Run(fmt.Sprintf("%s/%v/%v", m.name, when, s), func(t *testing.T) {
					seedCompletionCase(t, m, s, when)
				})
			}
		}
	}
}

func seedCompletionCase(t *testing.T, m mode, at Step, when timing) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		tgt.keepAlives = make(chan *fakeCmd)
	})
	conn := h.tgt.lastConn()
	h.clk.WaitTimers(1)
	h.clk.Advance(2 * time.Second)
	ka := <-h.tgt.keepAlives // written, in flight

	// Whether the response still finds its command in flight: until the
	// sockets are shut it does; after Shutdown it is a late response and
	// must be dropped without touching anything.
	inFlight := func(s Step, after bool) bool {
		return s < StepShutdownSockets || (s == StepShutdownSockets && !after)
	}
	// Between Shutdown and the end of the wait, Shutdown's handler and the
	// response race: either may win. After the wait the command is gone.
	gone := func(s Step, after bool) bool {
		return s > StepWaitCompletions || (s == StepWaitCompletions && after)
	}
	deliver := func(s Step, after bool) {
		got := ka.complete(nil)
		if want := inFlight(s, after); (want || gone(s, after)) && got != want {
			t.Errorf("completion %v %v: delivered=%v, want %v", map[bool]string{false: "before", true: "after"}[after], s, got, want)
		}
	}

	var (
		entered = make(chan struct{})
		release = make(chan struct{})
		handler sync.WaitGroup
	)
	// pauseInHandler makes the completion handler stop between its first
	// and last touch of the admin queue until release is closed.
	pauseInHandler := func() {
		ka.inHandler = func() { close(entered); <-release }
	}
	var once sync.Once
	conn.onWaitIdle = func() {
		if at == StepWaitCompletions && when == tDuring {
			once.Do(func() { close(release) })
		}
	}

	round := 0 // only the first teardown is the one under test
	h.c.setStepHook(func(s Step, after bool) {
		if s == StepChangeState && !after {
			round++
		}
		if round != 1 {
			return
		}
		if s == StepStopKeepAlive && after {
			conn.stopKeepAliveReturned()
		}
		if at == StepWaitCompletions && when == tDuring && s == StepShutdownSockets && !after {
			// The handler that Shutdown runs to fail the keep-alive
			// is still inside the admin queue when the wait begins.
			pauseInHandler()
			return
		}
		if s != at {
			return
		}
		switch {
		case when == tBefore && !after, when == tAfter && after:
			deliver(s, after)
		case when == tDuring && !after:
			if !inFlight(s, false) || at == StepWaitCompletions {
				// Nothing left in flight: a late response.
				if at != StepWaitCompletions {
					deliver(s, false)
				}
				return
			}
			pauseInHandler()
			handler.Add(1)
			notDelivered := make(chan struct{})
			go func() {
				defer handler.Done()
				if !ka.complete(nil) {
					close(notDelivered)
				}
			}()
			select {
			case <-entered:
			case <-notDelivered:
				t.Errorf("keep-alive no longer in flight before %v", s)
				close(release)
			}
		case when == tDuring && after:
			if inFlight(s, false) && at != StepWaitCompletions {
				select {
				case <-release:
				default:
					close(release)
				}
				handler.Wait()
			}
		}
	})

	var wg sync.WaitGroup
	m.trigger(h, conn, &wg)
	finishSeed(t, h, m, &wg)
	handler.Wait()
	conn.mu.Lock()
	defer conn.mu.Unlock()
	if conn.usage != 0 {
		t.Errorf("admin queue usage %d at the end", conn.usage)
	}
}

// A keep-alive allocated but not yet written as teardown begins (the seed's
// window: allocated, then the queue marked dying). It is let go before
// teardown, between the state change and the keep-alive stop, or by the
// stop itself (cancellation). It can never be let go after the stop:
// Stop waits for it, which the fake checks.
func TestSeedKeepAliveAllocatedAsTeardownBegins(t *testing.T) {
	type releasePoint struct {
		name  string
		step  Step
		after bool
		byCtx bool
	}
	points := []releasePoint{
		{name: "before-change-state", step: StepChangeState},
		{name: "after-change-state", step: StepChangeState, after: true},
		{name: "during-stop-keep-alive", byCtx: true},
	}
	for _, m := range seedModes {
		for _, p := range points {
			t.Run(m.name+"/"+p.name, func(t *testing.T) {
				allocated := make(chan struct{})
				release := make(chan struct{})
				h := newHarness(t, func(o *Options, tgt *fakeTarget) {
					tgt.kaAllocated = func(ctx context.Context) {
						close(allocated)
						if p.byCtx {
							<-ctx.Done()
						} else {
							<-release
						}
					}
				})
				conn := h.tgt.lastConn()
				round := 0
				h.c.setStepHook(func(s Step, after bool) {
					if s == StepChangeState && !after {
						round++
					}
					if round != 1 {
						return
					}
					if s == StepStopKeepAlive && after {
						conn.stopKeepAliveReturned()
					}
					if !p.byCtx && s == p.step && after == p.after {
						close(release)
					}
				})
				h.clk.WaitTimers(1)
				h.clk.Advance(2 * time.Second)
				<-allocated
				var wg sync.WaitGroup
				m.trigger(h, conn, &wg)
				finishSeed(t, h, m, &wg)
				conn.mu.Lock()
				defer conn.mu.Unlock()
				if conn.usage != 0 {
					t.Errorf("admin queue usage %d at the end", conn.usage)
				}
			})
		}
	}
}
