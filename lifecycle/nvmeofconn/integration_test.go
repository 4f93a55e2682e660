package nvmeofconn_test

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// Integration tests: lifecycle driving real nvmeof associations against the
// in-process target over loopback, with the target's fault injection. They
// run on the real clock with short timeouts; nothing asserts a time.

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const testNQN = "nqn.2026-11.io.ublk-nvmeof:lifecycle"

var testHost = nvmeof.HostIdentity{NQN: "nqn.2014-08.org.nvmexpress:uuid:0b3c2d1e-4f5a-4b6c-8d7e-9f0a1b2c3d4e", ID: [16]byte{0x0b, 0x3c}}

var quiet = slog.New(slog.DiscardHandler)

const blockShift = 9

type rig struct {
	t    *testing.T
	tg   *target.Target
	sub  *target.Subsystem
	mem  *target.MemoryBackend
	addr string
	conn *countingConnector
}

func newRig(t *testing.T, cfg target.Config, kato time.Duration) *rig {
	t.Helper()
	cfg.Logger = quiet
	tg := target.New(cfg)
	sub, err := tg.AddSubsystem(testNQN)
	if err != nil {
		t.Fatal(err)
	}
	mem := target.NewMemoryBackend(1 << 20)
	if err := sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: mem, BlockShift: blockShift,
		NGUID: [16]byte{0xa1, 2, 3}, EUI64: [8]byte{0xe1}, UUID: [16]byte{0x55, 1}}); err != nil {
		t.Fatal(err)
	}
	addr, err := tg.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tg.Close() })
	k := &countingConnector{Connector: nvmeofconn.Connector{
		Config: nvmeof.ControllerConfig{Addr: addr.String(), SubsysNQN: testNQN, Host: testHost,
			KATO: kato, IOQueues: 2, QueueSize: 32, IOTimeout: 2 * time.Second, AdminTimeout: 2 * time.Second, Logger: quiet},
		NSID: 1,
	}}
	return &rig{t: t, tg: tg, sub: sub, mem: mem, addr: addr.String(), conn: k}
}

// countingConnector counts connect attempts and can make the host stop
// sending keep-alives.
type countingConnector struct {
	nvmeofconn.Connector
	attempts    atomic.Int32
	noKeepAlive atomic.Bool
}

func (k *countingConnector) Connect(ctx context.Context, onError func(error)) (lifecycle.Conn, error) {
	k.attempts.Add(1)
	c, err := k.Connector.Connect(ctx, onError)
	if err != nil {
		return nil, err
	}
	if k.noKeepAlive.Load() {
		return silentConn{c}, nil
	}
	return c, nil
}

// silentConn is a host that stopped sending keep-alives.
type silentConn struct{ lifecycle.Conn }

func (silentConn) KeepAlive(ctx context.Context) error { return nil }

func (r *rig) start(tweak func(*lifecycle.Options)) *lifecycle.Controller {
	r.t.Helper()
	opts := lifecycle.DefaultOptions()
	opts.Logger = quiet
	opts.ReconnectDelay = 20 * time.Millisecond
	if tweak != nil {
		tweak(&opts)
	}
	c, err := lifecycle.New(r.conn, opts)
	if err != nil {
		r.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.Start(ctx); err != nil {
		r.t.Fatalf("Start: %v", err)
	}
	return c
}

func nvmeConn(c lifecycle.Conn) *nvmeofconn.Conn {
	if s, ok := c.(silentConn); ok {
		return s.Conn.(*nvmeofconn.Conn)
	}
	return c.(*nvmeofconn.Conn)
}

func block(val uint64) []byte {
	b := make([]byte, 1<<blockShift)
	binary.LittleEndian.PutUint64(b, val)
	return b
}

func write(c *lifecycle.Controller, q int, lba, val uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return c.Do(ctx, func(conn lifecycle.Conn) error {
		n := nvmeConn(conn)
		return n.IOQueue(q).Write(ctx, n.NS(), lba, block(val), false)
	})
}

func read(c *lifecycle.Controller, lba uint64) (uint64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	buf := make([]byte, 1<<blockShift)
	err := c.Do(ctx, func(conn lifecycle.Conn) error {
		n := nvmeConn(conn)
		return n.IOQueue(0).Read(ctx, n.NS(), lba, buf)
	})
	return binary.LittleEndian.Uint64(buf), err
}

func (r *rig) stored(lba uint64) uint64 {
	b := make([]byte, 8)
	r.mem.ReadAt(b, int64(lba)<<blockShift)
	return binary.LittleEndian.Uint64(b)
}

// waitEntered waits until the controller has entered s at least n times.
func waitEntered(t *testing.T, c *lifecycle.Controller, s lifecycle.State, n int, counts *stateCounter) {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		ch := counts.changed()
		if counts.get(s) >= n {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("state %v: never entered %v %d times", c.State(), s, n)
		}
	}
}

type stateCounter struct {
	mu    sync.Mutex
	n     map[lifecycle.State]int
	last  []lifecycle.Transition
	moved chan struct{}
}

func countStates(c *lifecycle.Controller) *stateCounter {
	sc := &stateCounter{n: map[lifecycle.State]int{}, moved: make(chan struct{})}
	for _, tr := range c.States().History() {
		sc.n[tr.To]++
	}
	c.States().Observe(func(tr lifecycle.Transition) {
		sc.mu.Lock()
		sc.n[tr.To]++
		sc.last = append(sc.last, tr)
		close(sc.moved)
		sc.moved = make(chan struct{})
		sc.mu.Unlock()
	})
	return sc
}

func (sc *stateCounter) get(s lifecycle.State) int {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.n[s]
}

func (sc *stateCounter) changed() <-chan struct{} {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.moved
}

func TestConnectIODelete(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(nil)
	ns := c.Namespace()
	if ns.NGUID != [16]byte{0xa1, 2, 3} || ns.BlockSize != 512 || ns.Blocks != (1<<20)>>blockShift {
		t.Fatalf("namespace %+v", ns)
	}
	for i := uint64(0); i < 16; i++ {
		if err := write(c, int(i), i, i*7+1); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	for i := uint64(0); i < 16; i++ {
		if v, err := read(c, i); err != nil || v != i*7+1 {
			t.Fatalf("read %d: %d, %v", i, v, err)
		}
	}
	c.Delete()
	if c.State() != lifecycle.StateDead {
		t.Fatalf("state %v", c.State())
	}
	if err := write(c, 0, 0, 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write after delete: %v", err)
	}
	if ids := r.tg.Controllers(); len(ids) != 0 {
		// The target notices the closed connections on its own time;
		// the host side is what this test is about.
		t.Logf("target still lists controllers %v", ids)
	}
}

// Keep-alive runs from the moment the admin queue is connected (Linux
// 4733b65d82bd), not only once every I/O queue is: the target holds the
// first I/O queue's Connect until a Keep Alive has reached it on the admin
// queue. The controller goes LIVE, and keep-alive goes on.
func TestKeepAliveWhileIOQueuesConnect(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	sawKA := make(chan struct{})
	var once sync.Once
	defer r.tg.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Before: func() {
		once.Do(func() { close(sawKA) })
	}})()
	var heldUntilKA atomic.Bool
	// A queue's QID is known to the target only from its Connect.
	defer r.tg.InjectFault(target.Fault{QID: target.AnyQueue, Times: 1, Match: isIOQueueConnect, Before: func() {
		// The deadline only ends the test's wait when no keep-alive
		// comes; nothing is asserted about time.
		select {
		case <-sawKA:
			heldUntilKA.Store(true)
		case <-time.After(10 * time.Second):
		}
	}})()
	c := r.start(nil)
	defer c.Delete()
	if !heldUntilKA.Load() {
		t.Fatal("no keep-alive reached the target while the I/O queues connected")
	}
	if err := write(c, 0, 9, 99); err != nil {
		t.Fatalf("write: %v", err)
	}
	if v, err := read(c, 9); err != nil || v != 99 {
		t.Fatalf("read: %d, %v", v, err)
	}
}

func isIOQueueConnect(cmd *nvme.Command) bool {
	return cmd.Opcode() == nvme.NVME_FABRICS_COMMAND && cmd.FabricsType() == nvme.NVME_FABRICS_TYPE_CONNECT &&
		cmd.Connect().QID != 0
}

// The target drops keep-alive responses: the keep-alive times out, the
// controller recovers, and I/O issued while recovering completes.
func TestKeepAliveDroppedRecovers(t *testing.T) {
	r := newRig(t, target.Config{}, 400*time.Millisecond)
	c := r.start(nil)
	sc := countStates(c)
	remove := r.tg.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Drop: true, Times: 1})
	defer remove()
	waitEntered(t, c, lifecycle.StateResetting, 1, sc)
	if err := write(c, 0, 5, 55); err != nil {
		t.Fatalf("write during recovery: %v", err)
	}
	waitEntered(t, c, lifecycle.StateLive, 2, sc)
	if r.stored(5) != 55 {
		t.Fatalf("block 5 = %d", r.stored(5))
	}
	c.Delete()
}

// The target's own KATO expires when the host stops sending keep-alives:
// the target deletes its controller and closes the connections, and the
// host recovers.
func TestTargetKATOExpiry(t *testing.T) {
	r := newRig(t, target.Config{}, 300*time.Millisecond)
	r.conn.noKeepAlive.Store(true)
	c := r.start(nil)
	sc := countStates(c)
	waitEntered(t, c, lifecycle.StateResetting, 1, sc)
	r.conn.noKeepAlive.Store(false)
	waitEntered(t, c, lifecycle.StateLive, 2, sc)
	if err := write(c, 0, 1, 11); err != nil {
		t.Fatalf("write after recovery: %v", err)
	}
	c.Delete()
}

// Connections dropped under load: every acknowledged write is on the
// target at the end.
func TestDropConnectionsUnderLoad(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(func(o *lifecycle.Options) { o.MaxRetries = 20 })
	sc := countStates(c)
	const writers = 4
	var acked [writers]atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for v := uint64(1); ; v++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := write(c, w, uint64(w), v); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				acked[w].Store(v)
			}
		}()
	}
	for i := 1; i <= 5; i++ {
		r.tg.DropConnections()
		waitEntered(t, c, lifecycle.StateLive, i+1, sc)
	}
	close(stop)
	wg.Wait()
	for w := 0; w < writers; w++ {
		if got, want := r.stored(uint64(w)), acked[w].Load(); got < want {
			t.Errorf("block %d = %d, last acknowledged %d", w, got, want)
		}
	}
	c.Delete()
}

// The target goes away: after ctrl_loss_tmo the controller is deleted and
// the held I/O fails with EIO.
func TestCtrlLossTmoOverTCP(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(func(o *lifecycle.Options) {
		o.ReconnectDelay = 5 * time.Millisecond
		o.CtrlLossTmo = 15 * time.Millisecond // 3 attempts
	})
	sc := countStates(c)
	r.tg.Close()
	waitEntered(t, c, lifecycle.StateConnecting, 2, sc)
	err := write(c, 0, 1, 1)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("held write: %v, want EIO", err)
	}
	<-c.Done()
	if n := r.conn.attempts.Load(); n != 1+3 {
		t.Fatalf("%d connects, want 1+3", n)
	}
	c.Delete()
}

// A reconnect rejected with DNR (the subsystem is gone) is not retried.
func TestDNRStopsReconnect(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(func(o *lifecycle.Options) { o.CtrlLossTmo = -1 })
	r.tg.RemoveSubsystem(testNQN)
	r.tg.DropConnections()
	<-c.Done()
	if n := r.conn.attempts.Load(); n != 2 {
		t.Fatalf("%d connects, want 2", n)
	}
	if err := c.Err(); err == nil {
		t.Fatal("no cause")
	}
	c.Delete()
}

// A reconnect that finds a different namespace behind the same NSID does
// not resume I/O onto it.
func TestNamespaceChangedOverTCP(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(nil)
	r.sub.RemoveNamespace(1)
	other := target.NewMemoryBackend(1 << 20)
	if err := r.sub.AddNamespace(target.NamespaceConfig{NSID: 1, Backend: other, BlockShift: blockShift,
		NGUID: [16]byte{0xbb}, EUI64: [8]byte{0xe1}, UUID: [16]byte{0x55, 1}}); err != nil {
		t.Fatal(err)
	}
	r.tg.DropConnections()
	<-c.Done()
	if err := c.Err(); !errors.Is(err, lifecycle.ErrNamespaceChanged) {
		t.Fatalf("Err() = %v", err)
	}
	c.Delete()
}

// The seed's race against the real host library: a keep-alive is in flight
// (held at the target) as teardown begins, and the target answers it at
// each teardown step. Nothing may panic, hang, race or leak.
func TestKeepAliveInFlightAtEveryTeardownStep(t *testing.T) {
	for _, del := range []bool{false, true} {
		for s := lifecycle.StepChangeState; s <= lifecycle.StepRemoveBlock; s++ {
			for _, done := range []bool{false, true} {
				name := map[bool]string{false: "recovery", true: "delete"}[del] + "/" + s.String() + map[bool]string{false: "/before", true: "/after"}[done]
				t.Run(name, func(t *testing.T) { kaAtStep(t, del, s, done) })
			}
		}
	}
}

func kaAtStep(t *testing.T, del bool, at lifecycle.Step, atDone bool) {
	// KATO leaves the connect (admin setup, then the I/O queues with
	// keep-alive running) time to send the first keep-alive before the
	// target's KATO expires, under -race on a loaded machine too.
	r := newRig(t, target.Config{}, time.Second)
	arrived := make(chan struct{})
	release := make(chan struct{})
	var releaseOnce sync.Once
	doRelease := func() { releaseOnce.Do(func() { close(release) }) }
	defer doRelease()
	var hit atomic.Bool
	var round atomic.Int32
	c := r.start(func(o *lifecycle.Options) {
		// The keep-alive held at the target holds the admin queue, and
		// with it the shutdown notification of a delete: until this
		// bound, when the keep-alive is released only after that step.
		o.ShutdownTimeout = 100 * time.Millisecond
		o.TeardownHook = func(s lifecycle.Step, done bool) {
			if s == lifecycle.StepChangeState && !done {
				round.Add(1)
			}
			if round.Load() == 1 && s == at && done == atDone {
				doRelease()
			}
		}
	})
	// Held from the first keep-alive after Start: keep-alive runs while
	// the I/O queues connect too, and holding one then would hold the
	// connect past the target's KATO.
	remove := r.tg.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Times: 1, Before: func() {
		hit.Store(true)
		close(arrived)
		<-release
	}})
	defer remove()
	sc := countStates(c)
	<-arrived // the keep-alive is in flight
	if del {
		c.Delete()
	} else {
		r.tg.DropConnections()
		waitEntered(t, c, lifecycle.StateLive, 2, sc)
		if err := write(c, 0, 3, 3); err != nil {
			t.Fatalf("write after recovery: %v", err)
		}
		c.Delete()
	}
	if !hit.Load() {
		t.Fatal("the keep-alive never reached the target")
	}
	if c.State() != lifecycle.StateDead {
		t.Fatalf("state %v", c.State())
	}
}

// Many connect → I/O → teardown cycles over TCP with tiny keep-alive
// intervals and random faults (dropped connections, dropped and delayed
// keep-alive responses); every acknowledged write is verified at the end.
func TestStressOverTCP(t *testing.T) {
	cycles := 60
	if testing.Short() {
		cycles = 10
	}
	// KATO is small, but must exceed how long a connect takes under the
	// race detector: the target's keep-alive timer runs from the admin
	// queue's Connect, and keep-alive starts only when LIVE.
	r := newRig(t, target.Config{}, 250*time.Millisecond)
	var acked, recoveries int
	for i := 0; i < cycles; i++ {
		c := r.start(func(o *lifecycle.Options) {
			o.ReconnectDelay = time.Millisecond
			o.CtrlLossTmo = -1
			o.MaxRetries = 50
		})
		sc := countStates(c)
		var faults []func()
		switch i % 4 {
		case 1:
			faults = append(faults, r.tg.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Drop: true, Times: 1}))
		case 2:
			faults = append(faults, r.tg.InjectFault(target.Fault{QID: 0, Match: target.MatchKeepAlive(), Delay: 100 * time.Millisecond, Times: 1}))
		}
		const writers = 3
		var last [writers]uint64
		var wg sync.WaitGroup
		for w := 0; w < writers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				lba := uint64(i*writers + w)
				for v := uint64(1); v <= 20; v++ {
					if err := write(c, w, lba, v); err != nil {
						if !errors.Is(err, syscall.EIO) {
							t.Errorf("write: %v", err)
						}
						return
					}
					last[w] = v
				}
			}()
		}
		if i%4 == 3 {
			r.tg.DropConnections()
		}
		wg.Wait()
		for _, f := range faults {
			f()
		}
		c.Delete()
		for w := 0; w < writers; w++ {
			if got := r.stored(uint64(i*writers + w)); got < last[w] {
				t.Fatalf("cycle %d: block %d = %d, last acknowledged %d", i, i*writers+w, got, last[w])
			}
			acked += int(last[w])
		}
		recoveries += sc.get(lifecycle.StateResetting)
	}
	t.Logf("%d cycles, %d recoveries, %d writes acknowledged", cycles, recoveries, acked)
	if acked == 0 {
		t.Fatal("no write acknowledged")
	}
}

// Faults on an I/O command: the target drops the response (the command
// times out), closes the connection when the command arrives, or stalls
// past the timeout. Each starts recovery, and the write is retried on the
// next association and acknowledged; it is on the target at the end.
func TestIOFaultsRecover(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault target.Fault
	}{
		{"dropped-response", target.Fault{QID: target.AnyQueue, Match: isWrite, Drop: true, Times: 1}},
		{"closed-connection", target.Fault{QID: target.AnyQueue, Match: isWrite, Close: true, Times: 1}},
		{"stalled-connection", target.Fault{QID: target.AnyQueue, Match: isWrite, Stall: 1500 * time.Millisecond, Times: 1}},
		// A PDU of an unknown type: a protocol error on the host.
		{"hostile-reply", target.Fault{QID: target.AnyQueue, Match: isWrite, Times: 1,
			Reply: func(*nvme.Command) []byte { return []byte{0x7f, 0, 8, 0, 8, 0, 0, 0} }}},
		// The controller terminates the connection: C2HTermReq (type 3,
		// HLEN 24) with FES 1, invalid PDU header field.
		{"c2h-termreq", target.Fault{QID: target.AnyQueue, Match: isWrite, Times: 1,
			Reply: func(*nvme.Command) []byte { return append([]byte{3, 0, 24, 0, 24, 0, 0, 0, 1, 0}, make([]byte, 14)...) }}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, target.Config{}, 5*time.Second)
			r.conn.Config.IOTimeout = 500 * time.Millisecond
			c := r.start(nil)
			sc := countStates(c)
			remove := r.tg.InjectFault(tc.fault)
			defer remove()
			if err := write(c, 0, 9, 99); err != nil {
				t.Fatalf("write: %v", err)
			}
			if sc.get(lifecycle.StateResetting) < 1 {
				t.Fatal("the fault did not start recovery")
			}
			if tc.name == "c2h-termreq" {
				var reason string
				for _, tr := range c.States().History() {
					if tr.To == lifecycle.StateResetting {
						reason = tr.Reason
					}
				}
				if !strings.Contains(reason, "C2HTermReq") {
					t.Fatalf("recovery reason %q, want the C2HTermReq", reason)
				}
			}
			if got := r.stored(9); got != 99 {
				t.Fatalf("block 9 = %d", got)
			}
			c.Delete()
		})
	}
}

func isWrite(cmd *nvme.Command) bool { return cmd.Opcode() == nvme.NVME_CMD_WRITE }
