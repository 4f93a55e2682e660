package nvmeof_test

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// The seed rule on the ring (issue #14, docs/design.md): a driven I/O
// queue's receive completes (the controller's C2HData and response land,
// or the peer's EOF, or a socket error) but its completion is held, not
// reaped, until a chosen point of the association's teardown, as
// lifecycle/seed_test.go does for keep-alive. holdDriver sees, from the
// ring's side, every breach: a completion processed while its queue's
// socket is closed or buffers unmapped, a queue released with an operation
// still unreaped, Wait returning while a completion is held. The command
// completes exactly once; goleak (TestMain) catches leaked goroutines.

// seedBase is the user_data base the queue under test is driven with.
const seedBase = 8

// heldCQE is a completion the ring produced and the test holds back.
type heldCQE struct {
	ud  uint64
	res int32
}

// holdDriver is a PollDriver whose completions can be held and released at
// a chosen point; it records breaches of the seed rule.
type holdDriver struct {
	*nvmeof.PollDriver
	q *nvmeof.Queue

	mu            sync.Mutex
	holding       bool
	held          []heldCQE
	heldRecv      chan struct{} // closed once a receive completion is held
	heldOnce      sync.Once
	releaseOnPost bool // the next Post is preceded by the release
	breaches      []string
	mutate        func(int32) int32 // rewrites the first held receive's result

	outstanding int  // operations queued minus completions processed; the Driver's thread
	stopped     bool // the loop ended (Stop returned); the test's goroutine
}

func newHoldDriver(t *testing.T, q *nvmeof.Queue) *holdDriver {
	h := &holdDriver{PollDriver: nvmeof.NewPollDriver(t), q: q, heldRecv: make(chan struct{})}
	h.Start(h.deliver)
	return h
}

func (h *holdDriver) Send(fd int, buf []byte, ud uint64) error {
	h.outstanding++
	return h.PollDriver.Send(fd, buf, ud)
}

func (h *holdDriver) Recv(fd int, buf []byte, ud uint64) error {
	h.outstanding++
	return h.PollDriver.Recv(fd, buf, ud)
}

func (h *holdDriver) RecvFull(fd int, buf []byte, ud uint64) error {
	h.outstanding++
	return h.PollDriver.RecvFull(fd, buf, ud)
}

func (h *holdDriver) CancelFd(fd int, ud uint64) error {
	h.outstanding++
	return h.PollDriver.CancelFd(fd, ud)
}

// Post runs f on the loop and checks the queue afterwards; armed by
// releaseAtNextPost, the held completions are processed first: they land
// inside the step that kicked the Driver.
func (h *holdDriver) Post(f func()) error {
	h.mu.Lock()
	first := h.releaseOnPost
	h.releaseOnPost = false
	h.mu.Unlock()
	if first {
		if err := h.PollDriver.Post(h.releaseHeld); err != nil {
			return err
		}
	}
	return h.PollDriver.Post(func() { f(); h.check("after a posted function") })
}

// deliver is the loop's completion handler.
func (h *holdDriver) deliver(ud uint64, res int32) {
	h.mu.Lock()
	if h.holding {
		h.held = append(h.held, heldCQE{ud, res})
		if ud == seedBase {
			h.heldOnce.Do(func() { close(h.heldRecv) })
		}
		h.mu.Unlock()
		return
	}
	h.mu.Unlock()
	h.dispatch(ud, res)
}

func (h *holdDriver) dispatch(ud uint64, res int32) {
	if owned, released := nvmeof.DrivenOwnership(h.q); !owned || released {
		h.breach("completion %#x (res %d) processed after its queue's socket was closed or its buffers unmapped", ud, res)
	}
	h.outstanding--
	h.q.DriverCompletion(ud, res)
	h.check("after a completion")
}

// check records a queue released while operations are unreaped: its
// socket closed and buffers unmapped under the ring's feet.
func (h *holdDriver) check(where string) {
	if _, released := nvmeof.DrivenOwnership(h.q); released && h.outstanding != 0 {
		h.breach("queue released (%s) with %d operations unreaped", where, h.outstanding)
	}
}

func (h *holdDriver) breach(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.breaches) < 8 {
		h.breaches = append(h.breaches, fmt.Sprintf(format, args...))
	}
}

// releaseHeld processes the held completions in order; on the loop.
func (h *holdDriver) releaseHeld() {
	h.mu.Lock()
	h.holding = false
	held, mutate := h.held, h.mutate
	h.held, h.mutate = nil, nil
	h.mu.Unlock()
	for _, c := range held {
		if c.ud == seedBase && mutate != nil {
			c.res, mutate = mutate(c.res), nil
		}
		h.dispatch(c.ud, c.res)
	}
}

func (h *holdDriver) isHolding() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.holding
}

// onLoop runs f on the loop and waits for it; once the loop ended, here.
func (h *holdDriver) onLoop(t *testing.T, f func()) {
	t.Helper()
	if h.stopped {
		f()
		return
	}
	ran := make(chan struct{})
	if err := h.PollDriver.Post(func() { f(); close(ran) }); err != nil {
		t.Fatalf("post: %v", err)
	}
	select {
	case <-ran:
	case <-time.After(hangDeadline):
		t.Fatal("the driver's loop is stuck")
	}
}

func (h *holdDriver) release(t *testing.T) { h.onLoop(t, h.releaseHeld) }

// assertBlocked checks, with the completion still held, that the queue is
// not idle: Wait cannot return while the ring holds a completion for it.
func (h *holdDriver) assertBlocked(t *testing.T, step string) {
	t.Helper()
	h.onLoop(t, func() {})
	select {
	case <-h.q.Idle():
		t.Errorf("%s: the queue is idle (Wait returns) with a receive completion unreaped", step)
	default:
	}
}

// assertQuiet checks that nothing of the queue is on the ring any more and
// its socket and buffers are gone; on the loop, or after it ended.
func (h *holdDriver) assertQuiet(t *testing.T, step string) {
	t.Helper()
	h.mu.Lock()
	held := len(h.held)
	h.mu.Unlock()
	owned, released := nvmeof.DrivenOwnership(h.q)
	if held != 0 || h.outstanding != 0 || owned || !released {
		t.Errorf("%s: %d completions held, %d operations outstanding, socket and buffers owned %v, released %v; want none, none, false, true",
			step, held, h.outstanding, owned, released)
	}
}

type landingKind struct {
	name   string
	mutate func(int32) int32
}

var landingKinds = []landingKind{
	{name: "response"},
	{name: "eof", mutate: func(int32) int32 { return 0 }},
	{name: "error", mutate: func(int32) int32 { return -int32(unix.ECONNRESET) }},
}

// seedStep is one step of an association's teardown as lifecycle runs it
// (docs/design.md): the ring's stop (the ublk queue going away) comes
// first on delete (STOP_DEV quiesces the ublk side) and last otherwise.
type seedStep int

const (
	stepStopRing seedStep = iota
	stepShutdownSockets
	stepWaitCompletions
	stepFreeIOQueues
	stepFreeAdminQueue
)

func (s seedStep) String() string {
	return [...]string{"StopRing", "ShutdownSockets", "WaitCompletions", "FreeIOQueues", "FreeAdminQueue"}[s]
}

type seedTiming int

const (
	landBefore seedTiming = iota
	landDuring
	landAfter
)

func (w seedTiming) String() string { return [...]string{"before", "during", "after"}[w] }

// seedOrders are the teardown orders, and the landing points each can
// reach: a completion cannot land after a step that waits for it
// (WaitCompletions, StopRing), nor in the steps after that, which every
// case checks by asserting the ring quiet as they begin.
var seedOrders = []struct {
	name   string
	steps  []seedStep
	points [][2]int // step index, seedTiming
}{
	{"recovery", []seedStep{stepShutdownSockets, stepWaitCompletions, stepFreeIOQueues, stepFreeAdminQueue, stepStopRing},
		[][2]int{{0, int(landBefore)}, {0, int(landDuring)}, {0, int(landAfter)}, {1, int(landDuring)}}},
	{"delete", []seedStep{stepStopRing, stepShutdownSockets, stepWaitCompletions, stepFreeIOQueues, stepFreeAdminQueue},
		[][2]int{{0, int(landBefore)}, {0, int(landDuring)}}},
}

func TestSeedRingReceiveVersusTeardown(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	for _, kind := range landingKinds {
		for _, order := range seedOrders {
			for _, p := range order.points {
				at, when := p[0], seedTiming(p[1])
				t.Run(fmt.Sprintf("%s/%s/%v/%v", kind.name, order.name, when, order.steps[at]), func(t *testing.T) {
					ringSeedCase(t, tt, kind, order.steps, at, when)
				})
			}
		}
	}
}

func ringSeedCase(t *testing.T, tt *testTarget, kind landingKind, steps []seedStep, at int, when seedTiming) {
	c := connect(t, tt, nvmeof.ControllerConfig{})
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0].Queue
	h := newHoldDriver(t, q)
	stopRing := func(stopFn func()) {
		h.Stop(stopFn, q.DriverIdle)
		h.stopped = true
	}
	t.Cleanup(func() {
		if !h.stopped {
			h.release(t)
			stopRing(q.StopDriving)
		}
	})
	if err := q.Drive(h, seedBase); err != nil {
		t.Fatal(err)
	}

	// A 4 KiB read in flight, its receive completed and held.
	h.mu.Lock()
	h.holding, h.mutate = true, kind.mutate
	h.mu.Unlock()
	done := make(chan error, 2)
	var r nvmeof.Request
	if err := ns.PrepareRead(&r, 0, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := q.Submit(&r, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.heldRecv:
	case <-time.After(hangDeadline):
		t.Fatal("the read's receive never completed")
	}
	h.onLoop(t, func() {})

	for i, s := range steps {
		if i == at && when == landBefore {
			h.release(t)
		}
		runSeedStep(t, h, c, s, i == at && when == landDuring, stopRing)
		if i == at && when == landAfter {
			h.release(t)
		}
	}

	if ok, _ := nvmeof.DrivenOwnership(q); ok {
		t.Error("the socket or buffers are still owned after teardown")
	}
	h.assertQuiet(t, "after teardown")
	select {
	case err := <-done:
		if err != nil && !nvmeof.IsPathError(err) {
			t.Errorf("read ended with %v, want success or a path error", err)
		}
		if err == nil && kind.mutate != nil {
			t.Errorf("read succeeded although its response was replaced by %s", kind.name)
		}
	default:
		t.Error("the read never completed")
	}
	select {
	case err := <-done:
		t.Errorf("the read completed twice (%v)", err)
	default:
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, b := range h.breaches {
		t.Error(b)
	}
}

// runSeedStep runs one teardown step; with land, the held completions are
// processed inside it.
func runSeedStep(t *testing.T, h *holdDriver, c *nvmeof.Controller, s seedStep, land bool, stopRing func(func())) {
	t.Helper()
	switch s {
	case stepShutdownSockets:
		if land {
			// The step's kick of the Driver (shutdownDriven) is
			// preceded by the release: the completion is
			// processed after the queue failed, before the pump
			// that cancels.
			h.mu.Lock()
			h.releaseOnPost = true
			h.mu.Unlock()
		}
		c.Shutdown()
		h.mu.Lock()
		missed := land && h.releaseOnPost
		h.releaseOnPost = false
		h.mu.Unlock()
		if missed {
			t.Fatal("Shutdown did not kick the driver")
		}
		if land {
			h.onLoop(t, func() {}) // the release posted in the step has run
		}
	case stepWaitCompletions:
		waited := make(chan struct{})
		go func() { defer close(waited); c.WaitIdle() }()
		if h.isHolding() {
			h.assertBlocked(t, s.String())
			h.release(t)
		}
		select {
		case <-waited:
		case <-time.After(hangDeadline):
			t.Fatal("WaitIdle does not return")
		}
	case stepFreeIOQueues, stepFreeAdminQueue:
		h.onLoop(t, func() { h.assertQuiet(t, s.String()) })
		if s == stepFreeIOQueues {
			c.FreeIOQueues()
		} else {
			c.FreeAdminQueue()
		}
	case stepStopRing:
		stopFn := h.q.StopDriving
		if h.isHolding() {
			// The ring cannot stop with a completion unreaped:
			// it lands inside the stop, after StopDriving
			// cancelled what was in flight.
			if !land {
				h.assertBlocked(t, s.String())
			}
			stopFn = func() { h.q.StopDriving(); h.releaseHeld() }
		}
		stopRing(stopFn)
		h.assertQuiet(t, s.String())
	}
}
