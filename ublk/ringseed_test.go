package ublk

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// The seed rule on a real ring (issue #14, docs/design.md "Data path"):
// nvmeof's TestSeedRingReceiveVersusTeardown forces a driven NVMe/TCP
// queue's receive completion to land before, during or after each step of
// an association's teardown on a poll driver. Here the same interleavings
// run with the queue driven by this package's queue loop on a real
// io_uring: its receive, sends and cancel are SQEs the kernel runs, the
// loop's stopRing is the one that closes the ring, and the completion is
// held after the kernel posted it, before the NVMe queue sees it. What
// the test checks: the NVMe queue is released (its socket closed, its
// buffers unmapped) only once every operation it put on the ring was
// reaped and handed back, no completion reaches it afterwards, it does
// not report idle (so WaitIdle and the ring's stop cannot finish) while a
// completion is held, the ring never abandons it, and the read completes
// exactly once.

// seedRingBase is the user_data base of the NVMe queue under test.
const seedRingBase = 8

// seedRing is the RingLifecycle of a queue loop that drives one NVMe/TCP
// queue (nq), and that queue's nvmeof.Driver: it counts the operations
// put on the ring, and holds completions when told to.
type seedRing struct {
	nq *nvmeof.Queue
	qr *QueueRing

	mu            sync.Mutex
	holding       bool
	held          []RingCQE
	heldRecv      chan struct{} // closed once the receive's completion is held
	heldOnce      sync.Once
	mutate        func(int32) int32 // rewrites the held receive's result
	releaseOnPost bool              // the next Post is preceded by the release
	releaseOnStop bool              // StopRing releases after StopDriving
	driveErr      error
	breaches      []string
	abandoned     bool

	// The ring's goroutine only.
	outstanding int  // operations queued minus completions handed to nq
	released    bool // nq told the Driver it is released
}

func (s *seedRing) Serve(r *Request) { r.Complete(unix.EOPNOTSUPP) }
func (s *seedRing) RingEntries() int { return 4 }

func (s *seedRing) StartRing(qr *QueueRing) {
	s.qr = qr
	if err := s.nq.Drive(s, seedRingBase); err != nil {
		s.mu.Lock()
		s.driveErr = err
		s.mu.Unlock()
	}
}

func (s *seedRing) RingCompletion(_ *QueueRing, c RingCQE) {
	s.mu.Lock()
	if s.holding {
		s.held = append(s.held, c)
		if c.UserData == seedRingBase {
			s.heldOnce.Do(func() { close(s.heldRecv) })
		}
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.dispatch(c)
}

func (s *seedRing) dispatch(c RingCQE) {
	if s.released {
		s.breach("completion %#x (res %d) handed over after the queue was released", c.UserData, c.Res)
	}
	s.outstanding--
	s.nq.DriverCompletion(c.UserData, c.Res)
}

func (s *seedRing) StopRing(*QueueRing) {
	s.nq.StopDriving()
	s.mu.Lock()
	release := s.releaseOnStop
	s.mu.Unlock()
	if release {
		s.releaseHeld()
	}
}

func (s *seedRing) RingIdle(*QueueRing) bool {
	s.mu.Lock()
	held := len(s.held)
	s.mu.Unlock()
	return held == 0 && s.nq.DriverIdle()
}

func (s *seedRing) RingAbandoned(*QueueRing) {
	s.mu.Lock()
	s.abandoned = true
	s.mu.Unlock()
	s.nq.DriverAbandoned()
}

// The NVMe queue's nvmeof.Driver and DriverReleaser.

func (s *seedRing) counted(err error) error {
	if err == nil {
		s.outstanding++
	}
	return err
}

func (s *seedRing) Send(fd int, buf []byte, ud uint64) error {
	return s.counted(s.qr.Send(fd, buf, ud))
}

func (s *seedRing) Sendmsg(fd int, msg *unix.Msghdr, ud uint64) error {
	return s.counted(s.qr.Sendmsg(fd, msg, ud))
}

func (s *seedRing) Recv(fd int, buf []byte, ud uint64) error {
	return s.counted(s.qr.Recv(fd, buf, ud))
}

func (s *seedRing) RecvFull(fd int, buf []byte, ud uint64) error {
	return s.counted(s.qr.RecvFull(fd, buf, ud))
}

func (s *seedRing) CancelFd(fd int, ud uint64) error {
	return s.counted(s.qr.CancelFd(fd, ud))
}

// Post runs f on the ring's goroutine; armed by releaseOnPost, the held
// completions are handed over first: they land inside the step that
// kicked the Driver.
func (s *seedRing) Post(f func()) error {
	s.mu.Lock()
	first := s.releaseOnPost
	s.releaseOnPost = false
	s.mu.Unlock()
	if first {
		if err := s.qr.Post(s.releaseHeld); err != nil {
			return err
		}
	}
	return s.qr.Post(f)
}

func (s *seedRing) DriverReleased(*nvmeof.Queue) {
	s.released = true
	if s.outstanding != 0 {
		s.breach("queue released with %d operations on the ring unreaped", s.outstanding)
	}
}

func (s *seedRing) breach(format string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.breaches) < 8 {
		s.breaches = append(s.breaches, fmt.Sprintf(format, args...))
	}
}

// releaseHeld hands the held completions over in order; on the ring's
// goroutine.
func (s *seedRing) releaseHeld() {
	s.mu.Lock()
	s.holding = false
	held, mutate := s.held, s.mutate
	s.held, s.mutate = nil, nil
	s.mu.Unlock()
	for _, c := range held {
		if c.UserData == seedRingBase && mutate != nil {
			c.Res, mutate = mutate(c.Res), nil
		}
		s.dispatch(c)
	}
}

func (s *seedRing) isHolding() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.holding
}

// seedRingRun is one case: the queue loop, its ring and the association.
type seedRingRun struct {
	t      *testing.T
	s      *seedRing
	q      *queue
	exited <-chan error
	c      *nvmeof.Controller
	looped bool // the loop ended and stopRing returned
}

// onLoop runs f on the ring's goroutine and waits for it; once the loop
// ended, here.
func (r *seedRingRun) onLoop(f func()) {
	r.t.Helper()
	if r.looped {
		f()
		return
	}
	ran := make(chan struct{})
	if err := r.q.qr.Post(func() { f(); close(ran) }); err != nil {
		r.t.Fatalf("post: %v", err)
	}
	select {
	case <-ran:
	case <-time.After(seedRingDeadline):
		r.t.Fatal("the ring's loop is stuck")
	}
}

func (r *seedRingRun) release() { r.onLoop(r.s.releaseHeld) }

// assertBlocked checks, with the completion still held, that the NVMe
// queue does not report idle: neither Wait nor the ring's stop can finish
// while the ring holds a completion of it.
func (r *seedRingRun) assertBlocked(step string) {
	r.t.Helper()
	select {
	case <-r.s.nq.Idle():
		r.t.Errorf("%s: the queue is idle (Wait returns) with a receive completion unreaped", step)
	default:
	}
	if r.s.nq.DriverIdle() {
		r.t.Errorf("%s: the queue reports DriverIdle with a receive completion unreaped", step)
	}
}

// assertQuiet checks that the NVMe queue has nothing on the ring any more
// and was released; on the ring's goroutine, or after the loop ended.
func (r *seedRingRun) assertQuiet(step string) {
	r.t.Helper()
	r.s.mu.Lock()
	held := len(r.s.held)
	r.s.mu.Unlock()
	if held != 0 || r.s.outstanding != 0 || !r.s.released || !r.s.nq.DriverIdle() {
		r.t.Errorf("%s: %d completions held, %d operations outstanding, released %v, idle %v; want none, none, true, true",
			step, held, r.s.outstanding, r.s.released, r.s.nq.DriverIdle())
	}
}

// stopRing ends the queue loop (a forced stop, as STOP_DEV ends it) and
// waits for its stopRing and the ring's close.
func (r *seedRingRun) stopRing() {
	r.t.Helper()
	r.q.forceStop()
	select {
	case err := <-r.exited:
		if err != errForced {
			r.t.Errorf("loop ended with %v, want errForced", err)
		}
	case <-time.After(seedRingDeadline):
		r.t.Fatal("the ring's loop does not end")
	}
	r.looped = true
}

// seedRingDeadline bounds each wait of these tests.
const seedRingDeadline = 30 * time.Second

// The teardown steps, in nvmeof's seed test's names (docs/design.md):
// the ring's stop comes first on delete (STOP_DEV) and last otherwise.
const (
	seedStopRing = iota
	seedShutdownSockets
	seedWaitCompletions
	seedFreeIOQueues
	seedFreeAdminQueue
)

var seedStepNames = [...]string{"StopRing", "ShutdownSockets", "WaitCompletions", "FreeIOQueues", "FreeAdminQueue"}

// Where the held completion lands, against the step at which it does:
// before the step begins, inside it (for StopRing: in StopRing, right
// after StopDriving cancelled), after it returned, or (a step that waits
// for it) released by the test once the step is seen waiting.
const (
	seedLandBefore = iota
	seedLandDuring
	seedLandAfter
	seedLandWaited
)

var seedLandNames = [...]string{"before", "during", "after", "waited"}

// seedRingOrders are the teardown orders and the landing points each can
// reach: a completion cannot land after a step that waits for it
// (WaitCompletions, StopRing), nor in the steps after that.
var seedRingOrders = []struct {
	name   string
	steps  []int
	points [][2]int // step index, landing
}{
	{"recovery", []int{seedShutdownSockets, seedWaitCompletions, seedFreeIOQueues, seedFreeAdminQueue, seedStopRing},
		[][2]int{{0, seedLandBefore}, {0, seedLandDuring}, {0, seedLandAfter}, {1, seedLandWaited}}},
	{"delete", []int{seedStopRing, seedShutdownSockets, seedWaitCompletions, seedFreeIOQueues, seedFreeAdminQueue},
		[][2]int{{0, seedLandBefore}, {0, seedLandDuring}, {0, seedLandWaited}}},
}

var seedRingLandings = []struct {
	name   string
	mutate func(int32) int32
}{
	{name: "response"},
	{name: "eof", mutate: func(int32) int32 { return 0 }},
	{name: "error", mutate: func(int32) int32 { return -int32(unix.ECONNRESET) }},
}

func TestSeedRealRingReceiveVersusTeardown(t *testing.T) {
	addr := seedRingTarget(t)
	for _, kind := range seedRingLandings {
		for _, order := range seedRingOrders {
			for _, p := range order.points {
				at, when := p[0], p[1]
				t.Run(fmt.Sprintf("%s/%s/%s/%s", kind.name, order.name, seedLandNames[when], seedStepNames[order.steps[at]]), func(t *testing.T) {
					seedRingCase(t, addr, kind.mutate, order.steps, at, when)
				})
			}
		}
	}
}

const seedRingNQN = "nqn.2026-11.io.ublk-nvmeof:ringseed"

// seedRingTarget is an in-process NVMe/TCP target with one 8 MiB
// namespace of 512-byte blocks; its address.
func seedRingTarget(t *testing.T) string {
	t.Helper()
	tg := target.New(target.Config{})
	sub, err := tg.AddSubsystem(seedRingNQN)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: target.NewMemoryBackend(8 << 20), BlockShift: 9}); err != nil {
		t.Fatal(err)
	}
	a, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Close() })
	return a.String()
}

func seedRingCase(t *testing.T, addr string, mutate func(int32) int32, steps []int, at, when int) {
	ctx, cancel := context.WithTimeout(context.Background(), seedRingDeadline)
	defer cancel()
	c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: addr, SubsysNQN: seedRingNQN, IOQueues: 1,
		Host: nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:0c4a1e52-7b9d-4f3e-8a61-2d5c9e0f7b13", ID: [16]byte{0x0c, 0x4a}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	s := &seedRing{nq: c.IOQueues()[0].Queue, heldRecv: make(chan struct{})}
	q, _, exited := ringQueue(t, s)
	r := &seedRingRun{t: t, s: s, q: q, exited: exited, c: c}
	t.Cleanup(func() {
		if !r.looped {
			r.release()
			r.stopRing()
		}
	})
	s.mu.Lock()
	driveErr := s.driveErr
	s.mu.Unlock()
	if driveErr != nil {
		t.Fatalf("Drive: %v", driveErr)
	}

	// A 4 KiB read in flight on the ring, its receive's completion held.
	s.mu.Lock()
	s.holding, s.mutate = true, mutate
	s.mu.Unlock()
	done := make(chan error, 2)
	var req nvmeof.Request
	if err := ns.PrepareRead(&req, 0, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := s.nq.Submit(&req, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.heldRecv:
	case <-time.After(seedRingDeadline):
		t.Fatal("the read's receive never completed")
	}
	r.onLoop(func() {})

	for i, step := range steps {
		if i == at && when == seedLandBefore {
			r.release()
		}
		land := -1
		if i == at {
			land = when
		}
		r.runStep(step, land)
		if i == at && when == seedLandAfter {
			r.release()
		}
	}
	r.checkEnd(mutate != nil, done)
}

// runStep runs one teardown step; land says where the held completions
// are handed over, if in it (seedLandDuring, seedLandWaited).
func (r *seedRingRun) runStep(step, land int) {
	r.t.Helper()
	s, c := r.s, r.c
	name := seedStepNames[step]
	switch step {
	case seedShutdownSockets:
		if land == seedLandDuring {
			// Shutdown's kick of the Driver is preceded by the
			// release: the completion is handed over after the
			// queue failed, before the pump that cancels.
			s.mu.Lock()
			s.releaseOnPost = true
			s.mu.Unlock()
		}
		c.Shutdown()
		s.mu.Lock()
		missed := land == seedLandDuring && s.releaseOnPost
		s.releaseOnPost = false
		s.mu.Unlock()
		if missed {
			r.t.Fatal("Shutdown did not kick the driver")
		}
		if land == seedLandDuring {
			r.onLoop(func() {}) // the release posted in the step has run
		}
	case seedWaitCompletions:
		waited := make(chan struct{})
		go func() { defer close(waited); c.WaitIdle() }()
		if s.isHolding() {
			r.onLoop(func() { r.assertBlocked(name) })
			select {
			case <-waited:
				r.t.Errorf("%s: WaitIdle returned with a receive completion unreaped", name)
			case <-time.After(50 * time.Millisecond):
			}
			r.release()
		}
		select {
		case <-waited:
		case <-time.After(seedRingDeadline):
			r.t.Fatal("WaitIdle does not return")
		}
	case seedFreeIOQueues, seedFreeAdminQueue:
		r.onLoop(func() { r.assertQuiet(name) })
		if step == seedFreeIOQueues {
			c.FreeIOQueues()
		} else {
			c.FreeAdminQueue()
		}
	case seedStopRing:
		if s.isHolding() {
			if land == seedLandDuring {
				// Inside the stop, after StopDriving cancelled
				// what was in flight.
				s.mu.Lock()
				s.releaseOnStop = true
				s.mu.Unlock()
			} else {
				// The ring cannot close with a completion
				// unreaped: its stop loops until the release.
				r.onLoop(func() { r.assertBlocked(name) })
				r.q.forceStop()
				select {
				case <-r.exited:
					r.t.Fatalf("%s: the ring closed with a receive completion unreaped", name)
				case <-time.After(200 * time.Millisecond):
				}
				if err := r.q.qr.Post(s.releaseHeld); err != nil {
					r.t.Fatalf("post to the stopping ring: %v", err)
				}
			}
		}
		r.stopRing()
		r.assertQuiet(name)
	}
}

// checkEnd checks the outcome once every step ran.
func (r *seedRingRun) checkEnd(replaced bool, done <-chan error) {
	r.t.Helper()
	r.assertQuiet("after teardown")
	select {
	case err := <-done:
		if err != nil && !nvmeof.IsPathError(err) {
			r.t.Errorf("read ended with %v, want success or a path error", err)
		}
		if err == nil && replaced {
			r.t.Error("read succeeded although its receive's result was replaced")
		}
	default:
		r.t.Error("the read never completed")
	}
	select {
	case err := <-done:
		r.t.Errorf("the read completed twice (%v)", err)
	default:
	}
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if r.s.abandoned {
		r.t.Error("the ring abandoned the queue (RingAbandoned): its operations were not reaped in time")
	}
	for _, b := range r.s.breaches {
		r.t.Error(b)
	}
}
