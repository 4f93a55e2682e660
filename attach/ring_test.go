package attach

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
	"golang.org/x/sys/unix"
)

// fakeRing is a ublk queue ring as ringDrivers sees it, without the
// kernel: posted functions run in order on its goroutine; a send or a
// receive stays in flight until CancelFd, which completes each with
// -ECANCELED (then itself) through ringDrivers.completion, as io_uring
// does.
type fakeRing struct {
	i    int
	d    *ringDrivers
	wake chan struct{}
	quit chan struct{}
	done chan struct{}

	mu    sync.Mutex
	posts []func()

	// Loop goroutine only.
	ops  []uint64 // user_data of the operations in flight
	cqes [][2]int64
}

func startFakeRing(t *testing.T, d *ringDrivers, i int) *fakeRing {
	r := &fakeRing{i: i, d: d, wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	go r.loop()
	t.Cleanup(func() { close(r.quit); <-r.done })
	return r
}

func (r *fakeRing) Queue() int { return r.i }

func (r *fakeRing) Send(fd int, buf []byte, ud uint64) error { r.ops = append(r.ops, ud); return nil }
func (r *fakeRing) Sendmsg(fd int, msg *unix.Msghdr, ud uint64) error {
	r.ops = append(r.ops, ud)
	return nil
}
func (r *fakeRing) Recv(fd int, buf []byte, ud uint64) error { r.ops = append(r.ops, ud); return nil }
func (r *fakeRing) RecvFull(fd int, buf []byte, ud uint64) error {
	r.ops = append(r.ops, ud)
	return nil
}

func (r *fakeRing) CancelFd(fd int, ud uint64) error {
	for _, op := range r.ops {
		r.cqes = append(r.cqes, [2]int64{int64(op), -int64(unix.ECANCELED)})
	}
	r.cqes = append(r.cqes, [2]int64{int64(ud), int64(len(r.ops))})
	r.ops = r.ops[:0]
	return nil
}

func (r *fakeRing) Post(f func()) error {
	r.mu.Lock()
	r.posts = append(r.posts, f)
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
	return nil
}

func (r *fakeRing) loop() {
	defer close(r.done)
	for {
		select {
		case <-r.wake:
		case <-r.quit:
			return
		}
		r.mu.Lock()
		posts := r.posts
		r.posts = nil
		r.mu.Unlock()
		for _, f := range posts {
			f()
			for len(r.cqes) > 0 {
				c := r.cqes[0]
				r.cqes = r.cqes[1:]
				r.d.completion(r.i, uint64(c[0]), int32(c[1]))
			}
		}
	}
}

// connectRingTarget connects an association of ioQueues I/O queues to a
// fresh in-process target.
func connectRingTarget(t *testing.T, ioQueues int) *nvmeof.Controller {
	t.Helper()
	_, _, addr := startTarget(t, target.Config{}, "nqn.2026-11.io.ublk-nvmeof:ring", 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nvmeof.Connect(ctx, nvmeof.ControllerConfig{Addr: addr, SubsysNQN: "nqn.2026-11.io.ublk-nvmeof:ring", IOQueues: ioQueues,
		Host: nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000005"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// With fewer NVMe I/O queues than ublk queues (ublk queues 0 and 2 share
// NVMe queue 0), no ring drives them: ring 0 stopping would fail NVMe
// queue 0 with ErrDriverStopped under ring 2's commands, a path error that
// resets the association (and, during a hand-over, races the next
// daemon's reissue). They stay on their goroutines and serve I/O. With as
// many queues as rings, each ring drives its own.
func TestSharedQueuesNotDriven(t *testing.T) {
	d := newRingDrivers(nil)
	d.setQueues(3)
	rings := []*fakeRing{startFakeRing(t, d, 0), startFakeRing(t, d, 1), startFakeRing(t, d, 2)}
	for _, r := range rings {
		d.started(r, nil)
	}
	c := connectRingTarget(t, 2)
	if err := d.driveAssociation(c); err != nil {
		t.Fatal(err)
	}
	for i := range rings {
		if !d.idle(i) {
			t.Errorf("ring %d drives an NVMe queue that ublk queues share", i)
		}
	}
	ns, err := c.Namespace(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	var r nvmeof.Request
	if err := ns.PrepareRead(&r, 0, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := c.IOQueues()[0].Do(context.Background(), &r); err != nil {
		t.Fatalf("read on the undriven queue: %v", err)
	}

	c3 := connectRingTarget(t, 3)
	if err := d.driveAssociation(c3); err != nil {
		t.Fatal(err)
	}
	for i := range rings {
		if d.idle(i) {
			t.Errorf("ring %d drives nothing with one NVMe queue per ublk queue", i)
		}
	}
}

// A driven queue released outside DriverCompletion (shut down before the
// ring ran its start: released inside the posted start, with nothing in
// flight on the ring) is unbound from its ring at once. Before, it stayed
// bound until the ring stopped: RingIdle false, and scanned by every
// completion on the ring.
func TestReleasedQueueUnbound(t *testing.T) {
	q := connectRingTarget(t, 1).IOQueues()[0].Queue
	d := newRingDrivers(nil)
	d.setQueues(1)
	r := startFakeRing(t, d, 0)
	d.started(r, nil)
	gate := make(chan struct{})
	r.Post(func() { <-gate }) // the ring's thread busy for a moment
	if err := d.drive(0, q); err != nil {
		t.Fatal(err)
	}
	q.Shutdown() // e.g. the association reset right after its queues connected
	close(gate)
	select {
	case <-q.Idle():
	case <-time.After(10 * time.Second):
		t.Fatal("the queue was not released")
	}
	ran := make(chan struct{})
	r.Post(func() { close(ran) }) // after the start and the kick
	<-ran
	if !d.idle(0) {
		t.Fatal("queue released (Wait returned) but still bound to its ring: RingIdle false until the ring stops")
	}
}
