package nvmeof_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// drivenQueue connects a controller and puts its first I/O queue on a
// poll driver; the cleanup stops the driver after the controller closed.
func drivenQueue(t *testing.T, tt *testTarget, cfg nvmeof.ControllerConfig) (*nvmeof.Controller, *nvmeof.Namespace, *nvmeof.Queue, *nvmeof.PollDriver) {
	t.Helper()
	return drivenQueueRecvMax(t, tt, cfg, 0)
}

// drivenQueueRecvMax is drivenQueue with a driver whose receives read at
// most recvMax bytes (0: no bound).
func drivenQueueRecvMax(t *testing.T, tt *testTarget, cfg nvmeof.ControllerConfig, recvMax int) (*nvmeof.Controller, *nvmeof.Namespace, *nvmeof.Queue, *nvmeof.PollDriver) {
	t.Helper()
	return drivenQueueMax(t, tt, cfg, recvMax, 0)
}

// drivenQueueMax is drivenQueue with a driver whose receives read at most
// recvMax bytes and whose sends write at most sendMax (0: no bound).
func drivenQueueMax(t *testing.T, tt *testTarget, cfg nvmeof.ControllerConfig, recvMax, sendMax int) (*nvmeof.Controller, *nvmeof.Namespace, *nvmeof.Queue, *nvmeof.PollDriver) {
	t.Helper()
	c := connect(t, tt, cfg)
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0].Queue
	d := nvmeof.NewPollDriver(t)
	d.RecvMax, d.SendMax = recvMax, sendMax
	d.Start(q.DriverCompletion)
	t.Cleanup(func() { d.Stop(q.StopDriving, q.DriverIdle) })
	if err := q.Drive(d, 8); err != nil {
		t.Fatal(err)
	}
	return c, ns, q, d
}

// Reads and writes through a driven queue, from the driver's thread
// (deferred, then pushed: the ublk fast path) and from other goroutines
// (Do: the slow path), with in-capsule writes, writes answered by R2Ts,
// reads of several C2HData PDUs, and digests.
func TestDrivenReadWrite(t *testing.T) {
	for _, dg := range []bool{false, true} {
		tt := startTarget(t, target.Config{}, 9, 8<<20)
		_, ns, q, d := drivenQueue(t, tt, nvmeof.ControllerConfig{HeaderDigest: dg, DataDigest: dg})
		rng := rand.New(rand.NewPCG(3, 4))
		for i, size := range []int{512, 4096, 16384, 128 << 10, 512 << 10} {
			data := make([]byte, size)
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			lba := uint64(i * 2048)
			var w nvmeof.Request
			if err := ns.PrepareWrite(&w, lba, data, false); err != nil {
				t.Fatal(err)
			}
			if i%2 == 0 {
				if err := q.Do(testCtx(t), &w); err != nil {
					t.Fatalf("digests %v: write of %d: %v", dg, size, err)
				}
			} else {
				// On the driver's thread, as ublk's Serve and Commit.
				done := make(chan error, 1)
				w.Defer = true
				if err := d.Post(func() {
					if err := q.Submit(&w, func(err error) { done <- err }); err != nil {
						done <- err
						return
					}
					q.Push()
				}); err != nil {
					t.Fatal(err)
				}
				if err := <-done; err != nil {
					t.Fatalf("digests %v: write of %d from the driver: %v", dg, size, err)
				}
			}
			got := make([]byte, size)
			var r nvmeof.Request
			if err := ns.PrepareRead(&r, lba, got); err != nil {
				t.Fatal(err)
			}
			if err := q.Do(testCtx(t), &r); err != nil {
				t.Fatalf("digests %v: read of %d: %v", dg, size, err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("digests %v: %d bytes read back differ", dg, size)
			}
		}
		if d.Calls.Load() == 0 {
			t.Fatal("no completion went through the driver")
		}
	}
}

// Large reads arriving in pieces (receives of a few bytes to a few pages):
// the data of each large C2HData PDU is received straight into the
// command's buffer once its header is in, with and without digests, with
// PDUs of one command split (C2HChunk) or whole, and small reads between
// them still go through the receive buffer.
func TestDrivenPlacedReads(t *testing.T) {
	for _, recvMax := range []int{0, 100, 4096, 60000} {
		for _, dg := range []bool{false, true} {
			for _, chunk := range []int{0, 20 << 10} {
				tt := startTarget(t, target.Config{C2HChunk: chunk}, 9, 8<<20)
				_, ns, q, d := drivenQueueRecvMax(t, tt, nvmeof.ControllerConfig{HeaderDigest: dg, DataDigest: dg}, recvMax)
				rng := rand.New(rand.NewPCG(uint64(recvMax), 5))
				for i, size := range []int{4096, 512 << 10, 512, 128 << 10, 16 << 10, 300 << 10} {
					data := make([]byte, size)
					for j := range data {
						data[j] = byte(rng.Uint32())
					}
					lba := uint64(i * 2048)
					var w nvmeof.Request
					if err := ns.PrepareWrite(&w, lba, data, false); err != nil {
						t.Fatal(err)
					}
					if err := q.Do(testCtx(t), &w); err != nil {
						t.Fatalf("write of %d: %v", size, err)
					}
					got := make([]byte, size)
					var r nvmeof.Request
					if err := ns.PrepareRead(&r, lba, got); err != nil {
						t.Fatal(err)
					}
					if err := q.Do(testCtx(t), &r); err != nil {
						t.Fatalf("recvMax %d digests %v chunk %d: read of %d: %v", recvMax, dg, chunk, size, err)
					}
					if !bytes.Equal(got, data) {
						t.Fatalf("recvMax %d digests %v chunk %d: %d bytes read back differ", recvMax, dg, chunk, size)
					}
				}
				n := nvmeof.DrivenPlaced(q)
				if recvMax != 0 && n == 0 {
					t.Errorf("recvMax %d digests %v chunk %d: no C2HData PDU was received in place", recvMax, dg, chunk)
				} else {
					t.Logf("recvMax %d digests %v chunk %d: %d PDUs placed", recvMax, dg, chunk, n)
				}
				// The rest of a placed PDU's data comes with one
				// waiting receive, however many pieces it arrives in.
				if full := d.FullRecvs.Load(); full != int64(n) {
					t.Errorf("recvMax %d digests %v chunk %d: %d receives of the whole rest for %d placed PDUs, want one each", recvMax, dg, chunk, full, n)
				}
			}
		}
	}
}

// Large writes answered by R2Ts, sent in pieces (sends of 100 B to 60 KB,
// resumed where they stopped): the data of each large H2CData PDU is sent
// from the command's buffer, gathered with the headers, with and without
// digests, one PDU per R2T or several (MaxH2CData), and the read back is
// what was written. Several writes in flight at once share sends.
func TestDrivenGatheredWrites(t *testing.T) {
	for _, sendMax := range []int{0, 100, 60000} {
		for _, dg := range []bool{false, true} {
			for _, maxH2C := range []uint32{0, 24 << 10} {
				tt := startTarget(t, target.Config{MaxH2CData: maxH2C}, 9, 8<<20)
				_, ns, q, _ := drivenQueueMax(t, tt, nvmeof.ControllerConfig{HeaderDigest: dg, DataDigest: dg}, 0, sendMax)
				rng := rand.New(rand.NewPCG(uint64(sendMax), 6))
				sizes := []int{4096, 512 << 10, 512, 128 << 10, 16 << 10, 300 << 10}
				datas := make([][]byte, len(sizes))
				var wg sync.WaitGroup
				errs := make(chan error, len(sizes))
				for i, size := range sizes {
					datas[i] = make([]byte, size)
					for j := range datas[i] {
						datas[i][j] = byte(rng.Uint32())
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						var w nvmeof.Request
						if err := ns.PrepareWrite(&w, uint64(i*2048), datas[i], false); err != nil {
							errs <- err
							return
						}
						if err := q.Do(testCtx(t), &w); err != nil {
							errs <- fmt.Errorf("write of %d: %w", size, err)
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatalf("sendMax %d digests %v maxH2C %d: %v", sendMax, dg, maxH2C, err)
				}
				for i, size := range sizes {
					got := make([]byte, size)
					var r nvmeof.Request
					if err := ns.PrepareRead(&r, uint64(i*2048), got); err != nil {
						t.Fatal(err)
					}
					if err := q.Do(testCtx(t), &r); err != nil {
						t.Fatalf("read of %d: %v", size, err)
					}
					if !bytes.Equal(got, datas[i]) {
						t.Fatalf("sendMax %d digests %v maxH2C %d: %d bytes read back differ", sendMax, dg, maxH2C, size)
					}
				}
				if n := nvmeof.DrivenGathers(q); n == 0 {
					t.Errorf("sendMax %d digests %v maxH2C %d: no send took data from a command's buffer", sendMax, dg, maxH2C)
				}
			}
		}
	}
}

// Many commands at once, from several goroutines: the send buffer fills
// and drains, completions interleave.
func TestDrivenConcurrent(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	_, ns, q, _ := drivenQueue(t, tt, nvmeof.ControllerConfig{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat([]byte{byte(g + 1)}, 64<<10)
			for i := range 20 {
				lba := uint64(g*2048 + i*64)
				var w nvmeof.Request
				ns.PrepareWrite(&w, lba, buf, false)
				if err := q.Do(testCtx(t), &w); err != nil {
					errs <- err
					return
				}
				got := make([]byte, len(buf))
				var r nvmeof.Request
				ns.PrepareRead(&r, lba, got)
				if err := q.Do(testCtx(t), &r); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, buf) {
					errs <- errors.New("data differs")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// Shutdown from another goroutine with commands in flight, at varied
// moments (before, while and after responses arrive): each command
// completes once, with success or a path error, and Wait returns only once
// the driver has released the socket (nothing left in flight on it).
func TestDrivenShutdownReleases(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	for i := range 30 {
		_, ns, q, _ := drivenQueue(t, tt, nvmeof.ControllerConfig{})
		done := make(chan error, 16)
		for j := range 16 {
			var w nvmeof.Request
			if j%2 == 0 {
				ns.PrepareWrite(&w, uint64(j*256), make([]byte, 128<<10), false)
			} else {
				ns.PrepareRead(&w, uint64(j*256), make([]byte, 64<<10))
			}
			if err := q.Submit(&w, func(err error) { done <- err }); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Duration(i*i*10) * time.Microsecond)
		q.Shutdown()
		for range 16 {
			select {
			case err := <-done:
				if err != nil && !nvmeof.IsPathError(err) {
					t.Fatalf("run %d: command ended with %v, want success or a path error", i, err)
				}
			case <-time.After(hangDeadline):
				t.Fatalf("run %d: command never completed", i)
			}
		}
		select {
		case <-q.Idle():
		case <-time.After(hangDeadline):
			t.Fatalf("run %d: Wait does not return after Shutdown", i)
		}
		select {
		case err := <-done:
			t.Fatalf("run %d: a command completed twice (%v)", i, err)
		default:
		}
	}
}

// A driver that stops (the ublk queue going away) fails the queue with
// ErrDriverStopped after reaping its operations.
func TestDrivenDriverStops(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	q := c.IOQueues()[0].Queue
	d := nvmeof.NewPollDriver(t)
	d.Start(q.DriverCompletion)
	if err := q.Drive(d, 0); err != nil {
		t.Fatal(err)
	}
	d.Stop(q.StopDriving, q.DriverIdle)
	select {
	case <-q.Idle():
	case <-time.After(hangDeadline):
		t.Fatal("Wait does not return after the driver stopped")
	}
	if err := q.Err(); !errors.Is(err, nvmeof.ErrDriverStopped) {
		t.Fatalf("queue error %v, want ErrDriverStopped", err)
	}
}

// Drive refuses a queue with a command in flight, and the queue goes on
// working on its goroutines.
func TestDriveRefusesBusyQueue(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	ns, err := c.Namespace(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0].Queue
	var w nvmeof.Request
	ns.PrepareWrite(&w, 0, make([]byte, 4096), false)
	w.Defer = true // queued, not sent: in flight for Drive
	done := make(chan error, 1)
	if err := q.Submit(&w, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	d := nvmeof.NewPollDriver(t)
	if err := q.Drive(d, 0); err == nil {
		t.Fatal("Drive took a queue with a command in flight")
	}
	q.Push()
	if err := <-done; err != nil {
		t.Fatalf("write after the refused Drive: %v", err)
	}
}

// gatedConn is a TCP connection whose SyscallConn, which Drive calls once
// the queue is being handed over and before a Driver serves it, waits for
// the test: the moment a ring stopping races the hand-over.
type gatedConn struct {
	*net.TCPConn
	reached, release chan struct{}
}

func (c *gatedConn) SyscallConn() (syscall.RawConn, error) {
	close(c.reached)
	<-c.release
	return c.TCPConn.SyscallConn()
}

// A Driver that stops while Drive is handing the queue to it (attach
// binds the queue to a ring, then calls Drive; the ring stops between)
// fails the hand-over: Drive returns ErrDriverStopped and the queue is
// released (Wait returns) with no operation of the Driver's. Before,
// StopDriving found nothing to stop, Drive then gave the queue to the
// stopped Driver and returned nil, and the queue was never released.
func TestDriveRacingDriverStopFails(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	reached, release := make(chan struct{}), make(chan struct{})
	c := connect(t, tt, nvmeof.ControllerConfig{Dial: func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return &gatedConn{TCPConn: conn.(*net.TCPConn), reached: reached, release: release}, nil
	}})
	q := c.IOQueues()[0].Queue
	d := nvmeof.NewPollDriver(t)
	d.Start(q.DriverCompletion)
	t.Cleanup(func() { d.Stop(q.StopDriving, q.DriverIdle) })
	driveErr := make(chan error, 1)
	go func() { driveErr <- q.Drive(d, 0) }()
	<-reached
	// The ring stops (StopRing, on its thread): it stops the queue bound
	// to it, which it does not drive yet. Its loop goes on reaping
	// meanwhile, so posted functions still run.
	idle := make(chan bool, 1)
	if err := d.Post(func() { q.StopDriving(); idle <- q.DriverIdle() }); err != nil {
		t.Fatal(err)
	}
	if !<-idle {
		t.Fatal("DriverIdle false for a queue not driven yet")
	}
	close(release)
	if err := <-driveErr; !errors.Is(err, nvmeof.ErrDriverStopped) {
		t.Fatalf("Drive after its driver stopped = %v, want ErrDriverStopped", err)
	}
	select {
	case <-q.Idle():
	case <-time.After(hangDeadline):
		t.Fatal("Wait does not return after the hand-over failed")
	}
}

// The same when the Driver stops before Drive even starts (attach bound
// the queue to the ring and is about to call Drive).
func TestDriveAfterDriverStopFails(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	q := c.IOQueues()[0].Queue
	d := nvmeof.NewPollDriver(t)
	d.Start(q.DriverCompletion)
	t.Cleanup(func() { d.Stop(q.StopDriving, q.DriverIdle) })
	stopped := make(chan struct{})
	if err := d.Post(func() { q.StopDriving(); close(stopped) }); err != nil {
		t.Fatal(err)
	}
	<-stopped
	if err := q.Drive(d, 0); !errors.Is(err, nvmeof.ErrDriverStopped) {
		t.Fatalf("Drive after its driver stopped = %v, want ErrDriverStopped", err)
	}
	select {
	case <-q.Idle():
	case <-time.After(hangDeadline):
		t.Fatal("Wait does not return after the hand-over failed")
	}
}

// A Driver that closes with the queue's receive still in flight (a ring
// whose cancelled operations did not complete in time) releases the
// queue without reclaiming it (DriverAbandoned): the queue fails with
// ErrDriverStopped and Wait returns, so that the daemon can exit.
func TestDriverAbandonedReleases(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	q := c.IOQueues()[0].Queue
	d := nvmeof.NewPollDriver(t)
	d.Start(q.DriverCompletion)
	t.Cleanup(func() { d.Stop(q.StopDriving, q.DriverIdle) })
	if err := q.Drive(d, 0); err != nil {
		t.Fatal(err)
	}
	abandoned := make(chan string, 1)
	// Runs after Drive's startDriven (posted first), which armed the
	// receive.
	post := func() {
		fds := d.Fds()
		if len(fds) == 0 {
			abandoned <- "no operation in flight to abandon"
			return
		}
		d.Forget(fds[0]) // the ring closes with the receive in flight
		q.DriverAbandoned()
		if !q.DriverIdle() {
			abandoned <- "DriverIdle false after DriverAbandoned"
			return
		}
		abandoned <- ""
	}
	if err := d.Post(post); err != nil {
		t.Fatal(err)
	}
	if msg := <-abandoned; msg != "" {
		t.Fatal(msg)
	}
	select {
	case <-q.Idle():
	case <-time.After(hangDeadline):
		t.Fatal("Wait does not return after DriverAbandoned")
	}
	if err := q.Err(); !errors.Is(err, nvmeof.ErrDriverStopped) {
		t.Fatalf("queue error %v, want ErrDriverStopped", err)
	}
}

// A driver abandoned while a receive lands in a read command's buffer, or
// a send takes a write command's data from its buffer: that command is
// never completed (its owner would reuse the buffer the kernel may still
// write, or put other data there for the send to take), and Wait returns.
// The same with Fixed data (zero copy: RecvFixed into, or SendFixed from,
// a request's pages).
func TestDriverAbandonedMidTransfer(t *testing.T) {
	for _, tc := range []struct{ write, fixed bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
		write := tc.write
		tt := startTarget(t, target.Config{}, 9, 8<<20)
		c := connect(t, tt, nvmeof.ControllerConfig{})
		ns, err := c.Namespace(testCtx(t), 1)
		if err != nil {
			t.Fatal(err)
		}
		q := c.IOQueues()[0].Queue
		d := nvmeof.NewPollDriver(t)
		// The data moves in many receives or sends.
		d.RecvMax, d.SendMax = 100, 100
		d.Start(q.DriverCompletion)
		t.Cleanup(func() { d.Stop(q.StopDriving, q.DriverIdle) })
		if err := q.Drive(d, 0); err != nil {
			t.Fatal(err)
		}
		var r nvmeof.Request
		transferring := nvmeof.DrivenPlacing
		data := make([]byte, 512<<10)
		switch {
		case write && tc.fixed:
			err, transferring = ns.PrepareWriteFixed(&r, 0, &nvmeof.TestFixed{B: data}, false), nvmeof.DrivenSendingHeld
		case write:
			err, transferring = ns.PrepareWrite(&r, 0, data, false), nvmeof.DrivenSendingHeld
		case tc.fixed:
			err = ns.PrepareReadFixed(&r, 0, &nvmeof.TestFixed{B: data})
		default:
			err = ns.PrepareRead(&r, 0, data)
		}
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		if err := q.Submit(&r, func(err error) { done <- err }); err != nil {
			t.Fatal(err)
		}
		abandoned := make(chan struct{})
		var watch func()
		watch = func() {
			if !transferring(q) {
				if err := d.Post(watch); err != nil {
					t.Error(err)
				}
				return
			}
			d.Forget(d.Fds()[0]) // the ring closes with the operation in flight
			q.DriverAbandoned()
			close(abandoned)
		}
		if err := d.Post(watch); err != nil {
			t.Fatal(err)
		}
		select {
		case <-abandoned:
		case <-time.After(hangDeadline):
			t.Fatalf("write %v: no operation on the command's buffer", write)
		}
		select {
		case <-q.Idle():
		case <-time.After(hangDeadline):
			t.Fatalf("write %v: Wait does not return after DriverAbandoned", write)
		}
		select {
		case err := <-done:
			t.Fatalf("write %v: the command whose buffer an operation in flight may still use completed: %v", write, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// A Drive whose Driver has already stopped (its Post fails) fails the
// queue with ErrDriverStopped, wrapped with the Driver's error: the
// device is going, not the association, so it is no failure of the
// controller's (OnFailure is not called).
func TestDriveOntoStoppedDriverIsNoFailure(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 8<<20)
	var mu sync.Mutex
	var failures []error
	c := connect(t, tt, nvmeof.ControllerConfig{OnFailure: func(err error) {
		mu.Lock()
		failures = append(failures, err)
		mu.Unlock()
	}})
	q := c.IOQueues()[0].Queue
	d := nvmeof.NewPollDriver(t)
	d.Start(q.DriverCompletion)
	d.Stop(func() {}, func() bool { return true })
	if err := q.Drive(d, 0); err == nil {
		t.Fatal("Drive onto a stopped driver succeeded")
	}
	select {
	case <-q.Idle():
	case <-time.After(hangDeadline):
		t.Fatal("Wait does not return after the hand-over failed")
	}
	if err := q.Err(); !errors.Is(err, nvmeof.ErrDriverStopped) {
		t.Fatalf("queue error %v, want ErrDriverStopped", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(failures) != 0 {
		t.Fatalf("OnFailure called with %v: a stopped driver is not the association's failure", failures)
	}
}
