package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
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

	l := newLanding(t, conn, ka, at, when)
	h.c.setStepHook(l.hook)
	var wg sync.WaitGroup
	l.arm()
	m.trigger(h, conn, &wg)
	finishSeed(t, h, m, &wg)
	l.wait()
	conn.mu.Lock()
	defer conn.mu.Unlock()
	if conn.usage != 0 {
		t.Errorf("admin queue usage %d at the end", conn.usage)
	}
}

// landing lands the completion of the keep-alive ka, in flight on conn,
// before, during or after step `at` of the first teardown that begins once
// arm is called (a teardown, or the tear-down of an association whose I/O
// queues failed to connect). Its hook is the controller's step hook.
type landing struct {
	t        *testing.T
	conn     *fakeConn
	ka       *fakeCmd
	at       Step
	when     timing
	armed    atomic.Bool
	round    int  // teardowns begun since arm; only the first is under test
	last     Step // the step begun last, to tell a new teardown
	entered  chan struct{}
	release  chan struct{}
	handler  sync.WaitGroup
	released sync.Once
}

func newLanding(t *testing.T, conn *fakeConn, ka *fakeCmd, at Step, when timing) *landing {
	l := &landing{t: t, conn: conn, ka: ka, at: at, when: when, last: numSteps,
		entered: make(chan struct{}), release: make(chan struct{})}
	conn.onWaitIdle = func() {
		if at == StepWaitCompletions && when == tDuring {
			l.released.Do(func() { close(l.release) })
		}
	}
	return l
}

func (l *landing) arm() { l.armed.Store(true) }

// wait joins the completion handler the landing started.
func (l *landing) wait() { l.handler.Wait() }

// Whether the response still finds its command in flight: until the
// sockets are shut it does; after Shutdown it is a late response and must
// be dropped without touching anything.
func inFlight(s Step, after bool) bool {
	return s < StepShutdownSockets || (s == StepShutdownSockets && !after)
}

// Between Shutdown and the end of the wait, Shutdown's handler and the
// response race: either may win. After the wait the command is gone.
func gone(s Step, after bool) bool {
	return s > StepWaitCompletions || (s == StepWaitCompletions && after)
}

func (l *landing) deliver(s Step, after bool) {
	got := l.ka.complete(nil)
	if want := inFlight(s, after); (want || gone(s, after)) && got != want {
		l.t.Errorf("completion %v %v: delivered=%v, want %v", map[bool]string{false: "before", true: "after"}[after], s, got, want)
	}
}

// pauseInHandler makes the completion handler stop between its first and
// last touch of the admin queue until release is closed.
func (l *landing) pauseInHandler() {
	l.ka.inHandler = func() { close(l.entered); <-l.release }
}

func (l *landing) hook(s Step, after bool) {
	if !l.armed.Load() {
		return
	}
	if !after {
		if s <= l.last {
			l.round++
		}
		l.last = s
	}
	if l.round != 1 {
		return
	}
	at, when := l.at, l.when
	if s == StepStopKeepAlive && after {
		l.conn.stopKeepAliveReturned()
	}
	if at == StepWaitCompletions && when == tDuring && s == StepShutdownSockets && !after {
		// The handler that Shutdown runs to fail the keep-alive is still
		// inside the admin queue when the wait begins.
		l.pauseInHandler()
		return
	}
	if s != at {
		return
	}
	switch {
	case when == tBefore && !after, when == tAfter && after:
		l.deliver(s, after)
	case when == tDuring && !after:
		if !inFlight(s, false) || at == StepWaitCompletions {
			// Nothing left in flight: a late response.
			if at != StepWaitCompletions {
				l.deliver(s, false)
			}
			return
		}
		l.pauseInHandler()
		l.handler.Add(1)
		notDelivered := make(chan struct{})
		go func() {
			defer l.handler.Done()
			if !l.ka.complete(nil) {
				close(notDelivered)
			}
		}()
		select {
		case <-l.entered:
		case <-notDelivered:
			l.t.Errorf("keep-alive no longer in flight before %v", s)
			l.released.Do(func() { close(l.release) })
		}
	case when == tDuring && after:
		if inFlight(s, false) && at != StepWaitCompletions {
			l.released.Do(func() { close(l.release) })
			l.handler.Wait()
		}
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

// The steps of tearing down an association whose I/O queues failed to
// connect (discardConn): the teardown order from the keep-alive stop on.
var discardSteps = []Step{StepStopKeepAlive, StepShutdownSockets, StepWaitCompletions, StepFreeIOQueues, StepFreeAdminQueue}

var errIOConnect = errors.New("fake: I/O queue connect failed")

// ioConnectGate holds ConnectIOQueues until the test lets it go.
type ioConnectGate struct {
	connecting chan *fakeConn // the association whose I/O queues connect
	result     chan error     // what ConnectIOQueues returns
}

func newIOConnectGate() *ioConnectGate {
	return &ioConnectGate{connecting: make(chan *fakeConn, 1), result: make(chan error, 1)}
}

func (g *ioConnectGate) connect(ctx context.Context, c *fakeConn) error {
	g.connecting <- c
	select {
	case err := <-g.result:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// The keep-alive starts as soon as the admin queue is connected (Linux
// 4733b65d82bd): while the I/O queues of a connect are still connecting a
// keep-alive is sent, and its completion is landed before, during and after
// every step of the tear-down that follows when the I/O connect fails (on
// the first connect, on a reconnect) or the controller is deleted
// meanwhile. The fakes check the order as in the seed tests above.
func TestSeedKeepAliveWhileIOQueuesConnect(t *testing.T) {
	for _, how := range []string{"first-connect-fails", "reconnect-fails", "delete-while-connecting"} {
		for _, s := range discardSteps {
			for _, when := range []timing{tBefore, tDuring, tAfter} {
				t.Run(fmt.Sprintf("%s/%v/%v", how, when, s), func(t *testing.T) {
					ioConnectCase(t, how, s, when)
				})
			}
		}
	}
}

func ioConnectCase(t *testing.T, how string, at Step, when timing) {
	gate := newIOConnectGate()
	h, started := startIOConnect(t, how, gate, func(tgt *fakeTarget) { tgt.keepAlives = make(chan *fakeCmd) })
	conn, ka := keepAliveWhileIOConnect(h, gate)

	l := newLanding(t, conn, ka, at, when)
	h.c.setStepHook(l.hook)
	l.arm()
	deleted := failIOConnect(t, how, h, gate, conn)
	l.wait()
	finishIOConnect(t, how, h, started, deleted)
	conn.mu.Lock()
	defer conn.mu.Unlock()
	if conn.usage != 0 {
		t.Errorf("admin queue usage %d at the end", conn.usage)
	}
}

// keepAliveWhileIOConnect waits for the I/O queues of the association to
// connect (held by gate) and, as they are connecting, for its keep-alive:
// it must be running. It returns the association and the keep-alive
// command, written and in flight.
func keepAliveWhileIOConnect(h *harness, gate *ioConnectGate) (*fakeConn, *fakeCmd) {
	conn := <-gate.connecting
	h.waitTimers(1)
	h.clk.Advance(2 * time.Second) // KATO/2
	return conn, <-h.tgt.keepAlives
}

// startIOConnect starts the connect under test (the first, or a reconnect
// after a socket error) with ConnectIOQueues held by gate. started gets
// Start's result for the first connect.
func startIOConnect(t *testing.T, how string, gate *ioConnectGate, tweak func(*fakeTarget)) (h *harness, started chan error) {
	started = make(chan error, 1)
	if how == "first-connect-fails" {
		h = newUnstartedHarness(t, func(o *Options, tgt *fakeTarget) {
			tweak(tgt)
			tgt.ioConnect = gate.connect
		})
		go func() { started <- h.c.Start(context.Background()) }()
		return h, started
	}
	h = newHarness(t, nil)
	first := h.tgt.lastConn()
	first.onError(errSocket)
	h.waitState(StateConnecting)
	h.tgt.mu.Lock()
	tweak(h.tgt)
	h.tgt.ioConnect = gate.connect
	h.tgt.mu.Unlock()
	h.waitTimers(1)
	h.clk.Advance(10 * time.Second) // reconnect_delay
	return h, started
}

// failIOConnect makes the I/O connect fail, or deletes the controller
// while it runs, and waits until the association was freed.
func failIOConnect(t *testing.T, how string, h *harness, gate *ioConnectGate, conn *fakeConn) (deleted *sync.WaitGroup) {
	deleted = &sync.WaitGroup{}
	if how == "delete-while-connecting" {
		deleted.Add(1)
		go func() { defer deleted.Done(); h.c.Delete() }()
	} else {
		gate.result <- errIOConnect
	}
	waitFor(t, "the association to be freed", func() bool {
		conn.mu.Lock()
		defer conn.mu.Unlock()
		return conn.adminFreed
	})
	return deleted
}

// finishIOConnect checks the outcome and ends the controller.
func finishIOConnect(t *testing.T, how string, h *harness, started chan error, deleted *sync.WaitGroup) {
	t.Helper()
	switch how {
	case "first-connect-fails":
		if err := <-started; !errors.Is(err, errIOConnect) {
			t.Fatalf("Start: %v, want the I/O connect's error", err)
		}
	case "reconnect-fails":
		// The next attempt connects.
		h.tgt.mu.Lock()
		h.tgt.ioConnect = nil
		h.tgt.keepAlives = nil
		h.tgt.mu.Unlock()
		h.waitTimers(1)
		h.clk.Advance(10 * time.Second)
		h.waitState(StateLive)
		if err := <-h.doWrite(5, 5); err != nil {
			t.Fatalf("write after the failed I/O connect: %v", err)
		}
	case "delete-while-connecting":
		deleted.Wait()
	}
	h.finish()
}

// A keep-alive allocated but not yet written (the seed's window) while
// the I/O queues connect, as the connect fails or the controller is
// deleted: only stopping the keep-alive lets it go, so a tear-down that
// shut the sockets and waited for the queues before stopping it would
// never end, and one that freed them would free them under it.
func TestSeedKeepAliveAllocatedWhileIOQueuesConnect(t *testing.T) {
	for _, how := range []string{"first-connect-fails", "reconnect-fails", "delete-while-connecting"} {
		t.Run(how, func(t *testing.T) {
			gate := newIOConnectGate()
			allocated := make(chan struct{})
			h, started := startIOConnect(t, how, gate, func(tgt *fakeTarget) {
				var once sync.Once
				tgt.kaAllocated = func(ctx context.Context) {
					once.Do(func() { close(allocated) })
					<-ctx.Done()
				}
			})
			conn := <-gate.connecting
			h.waitTimers(1)
			h.clk.Advance(2 * time.Second)
			<-allocated
			h.c.setStepHook(func(s Step, after bool) {
				if s == StepStopKeepAlive && after {
					conn.stopKeepAliveReturned()
				}
			})
			deleted := failIOConnect(t, how, h, gate, conn)
			h.tgt.mu.Lock()
			h.tgt.kaAllocated = nil
			h.tgt.mu.Unlock()
			finishIOConnect(t, how, h, started, deleted)
		})
	}
}

// A keep-alive that fails while the I/O queues connect ends the connect at
// once (the controller is gone: waiting for the I/O queues' connect
// timeouts would only delay the next attempt), and the association is torn
// down keep-alive first.
func TestKeepAliveFailureEndsIOQueueConnect(t *testing.T) {
	gate := newIOConnectGate()
	h, started := startIOConnect(t, "first-connect-fails", gate, func(tgt *fakeTarget) { tgt.keepAlives = make(chan *fakeCmd) })
	conn, ka := keepAliveWhileIOConnect(h, gate)
	ka.complete(errPath) // the keep-alive fails; the I/O connect is never answered
	err := <-started
	if err == nil || !errors.Is(err, errPath) {
		t.Fatalf("Start: %v, want the keep-alive's failure", err)
	}
	conn.mu.Lock()
	if !conn.adminFreed {
		t.Error("association not freed")
	}
	conn.mu.Unlock()
	h.finish()
}

// The I/O queues connect while a keep-alive is in flight; it completes
// after the controller is LIVE, and keep-alive goes on.
func TestKeepAliveInFlightAcrossIOQueueConnect(t *testing.T) {
	gate := newIOConnectGate()
	h, started := startIOConnect(t, "first-connect-fails", gate, func(tgt *fakeTarget) { tgt.keepAlives = make(chan *fakeCmd) })
	_, ka := keepAliveWhileIOConnect(h, gate)
	if s := h.c.State(); s != StateConnecting {
		t.Fatalf("state %v while the I/O queues connect", s)
	}
	gate.result <- nil
	if err := <-started; err != nil {
		t.Fatalf("Start: %v", err)
	}
	h.c.SetBlock(h.blk)
	if !ka.complete(nil) {
		t.Fatal("keep-alive response not delivered")
	}
	h.waitTimers(1)
	h.clk.Advance(2 * time.Second)
	if !(<-h.tgt.keepAlives).complete(nil) {
		t.Fatal("second keep-alive response not delivered")
	}
	if s := h.c.State(); s != StateLive {
		t.Fatalf("state %v", s)
	}
	h.finish()
}
