package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/keepalive"
)

// The fakes model an association the way nvmeof must behave, so that the
// tests can tell a wrong teardown order from a right one:
//   - every command holds a usage reference on its queue from allocation
//     until its completion handler has made its last touch of the queue;
//   - a command that cannot be written (socket shut, or cancelled before
//     the write) is failed inline, like nvme_fail_nonready_command, and
//     still drops its reference only after its last touch;
//   - Shutdown fails every command in flight from a handler goroutine the
//     association owns, and a response arriving after that is dropped;
//   - touching a freed queue, writing to a shut socket, freeing in the
//     wrong order or with references held are recorded as violations.

var (
	errPath    = errors.New("fake: path error")
	errSocket  = errors.New("fake: socket error")
	errTimeout = errors.New("fake: command timeout")
)

type violations struct {
	mu   sync.Mutex
	list []string
}

func (v *violations) add(format string, args ...any) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.list = append(v.list, fmt.Sprintf(format, args...))
}

func (v *violations) check(t *testing.T) {
	t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	for _, s := range v.list {
		t.Error("violation:", s)
	}
}

// dnrError is a connect failure with the DNR bit.
type dnrError struct{}

func (dnrError) Error() string    { return "fake: connect rejected (DNR)" }
func (dnrError) DoNotRetry() bool { return true }

// fakeTarget is the remote controller: one namespace of uint64 "blocks".
type fakeTarget struct {
	v *violations

	mu       sync.Mutex
	ns       Namespace
	kato     time.Duration
	tbkas    bool
	data     map[uint64]uint64
	connects int
	// connectErrs are returned by the next connects, in order; a nil entry
	// succeeds.
	connectErrs []error
	// blockConnect, if set, makes Connect wait for ctx.
	blockConnect bool
	conns        []*fakeConn

	// keepAlives receives every keep-alive written, when set; otherwise
	// keep-alives complete at once.
	keepAlives chan *fakeCmd
	// kaAllocated, if set, is called after a keep-alive was allocated and
	// before it is written (the seed's window).
	kaAllocated func(ctx context.Context)
	// connected is signalled at every successful connect, when set.
	connected chan *fakeConn
	// nsEvents is every association's NamespaceChanged channel
	// (namespace_test.go).
	nsEvents chan Namespace
	// ioConnect, if set, is ConnectIOQueues: called after Connect, with
	// keep-alive running on the admin queue.
	ioConnect func(ctx context.Context, c *fakeConn) error
	// crdt is every association's CRDT.
	crdt [3]time.Duration
	// shutdownHang makes the shutdown notification never complete;
	// shutdownStarted, if set, is closed when one is in flight.
	shutdownHang    bool
	shutdownStarted chan struct{}
}

func newFakeTarget(v *violations) *fakeTarget {
	return &fakeTarget{
		v:        v,
		ns:       Namespace{NSID: 1, NGUID: [16]byte{1, 2, 3}, Blocks: 1 << 20, BlockSize: 4096},
		kato:     4 * time.Second,
		data:     map[uint64]uint64{},
		nsEvents: make(chan Namespace),
	}
}

func (t *fakeTarget) Connect(ctx context.Context, onError func(error)) (Conn, error) {
	t.mu.Lock()
	t.connects++
	var err error
	if len(t.connectErrs) > 0 {
		err = t.connectErrs[0]
		t.connectErrs = t.connectErrs[1:]
	}
	block := t.blockConnect
	t.mu.Unlock()
	if block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, err
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	t.mu.Lock()
	c := &fakeConn{target: t, onError: onError, ns: t.ns, kato: t.kato, pending: map[*fakeCmd]bool{}}
	c.idle = sync.NewCond(&c.mu)
	if t.tbkas {
		c.traffic = &fakeTraffic{}
	}
	t.conns = append(t.conns, c)
	t.mu.Unlock()
	if t.connected != nil {
		t.connected <- c
	}
	return c, nil
}

func (t *fakeTarget) connectCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.connects
}

func (t *fakeTarget) lastConn() *fakeConn {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.conns[len(t.conns)-1]
}

// checkReleased records a violation for every association not released in
// full.
func (t *fakeTarget) checkReleased() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, c := range t.conns {
		c.mu.Lock()
		if !c.adminFreed || !c.ioFreed {
			t.v.add("association %d not freed (io=%v admin=%v)", i, c.ioFreed, c.adminFreed)
		}
		c.mu.Unlock()
	}
}

// fakeCmd is one command in flight on a fake association.
type fakeCmd struct {
	c    *fakeConn
	kind string
	done chan error // buffered 1: the completion, for the submitter
	// inHandler, if set, is called inside the completion handler between
	// its first and last touch of the queue.
	inHandler func()
}

// complete delivers the response to cmd. It returns false if the command
// was no longer in flight (already failed by Shutdown): a late response.
func (cmd *fakeCmd) complete(err error) bool { return cmd.c.complete(cmd, err) }

// wait returns cmd's completion, or ctx's error once ctx ends first: the
// command is then abandoned to the queue (Shutdown fails it), and its
// handler still holds the reference until then.
func (cmd *fakeCmd) wait(ctx context.Context) error {
	select {
	case err := <-cmd.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

type fakeConn struct {
	target  *fakeTarget
	onError func(error)
	ns      Namespace
	kato    time.Duration
	traffic *fakeTraffic

	mu         sync.Mutex
	idle       *sync.Cond
	usage      int // queue usage references
	pending    map[*fakeCmd]bool
	shut       bool
	broken     bool // a socket error happened: nothing more gets through
	ioFreed    bool
	adminFreed bool
	handlers   sync.WaitGroup // Shutdown's handler goroutines
	kaWritten  int
	kaStopped  bool // set by tests once StepStopKeepAlive has returned
	kaActive   int  // KeepAlive calls that have not returned
	// shutdownNotified: ShutdownController was called.
	shutdownNotified bool
	// onWaitIdle, if set, is called when WaitIdle begins.
	onWaitIdle func()
}

// stopKeepAliveReturned is called by tests after StepStopKeepAlive: from
// now on a keep-alive is a violation, and none may still be running.
func (c *fakeConn) stopKeepAliveReturned() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.kaStopped = true
	if c.kaActive != 0 {
		c.target.v.add("%d KeepAlive calls still running after the keep-alive was stopped", c.kaActive)
	}
}

func (c *fakeConn) ConnectIOQueues(ctx context.Context) error {
	c.target.mu.Lock()
	hook := c.target.ioConnect
	c.target.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, c); err != nil {
			return err
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.touchLocked(false, "I/O queue connect")
	return nil
}

func (c *fakeConn) CRDT() [3]time.Duration {
	c.target.mu.Lock()
	defer c.target.mu.Unlock()
	return c.target.crdt
}

func (c *fakeConn) Namespace() Namespace       { return c.ns }
func (c *fakeConn) KATO() time.Duration        { return c.kato }
func (c *fakeConn) IsPathError(err error) bool { return errors.Is(err, errPath) }
func (c *fakeConn) Traffic() keepalive.Traffic {
	if c.traffic == nil {
		return nil
	}
	return c.traffic
}

func (c *fakeConn) touchLocked(admin bool, what string) {
	if admin && c.adminFreed {
		c.target.v.add("%s touched the freed admin queue", what)
	}
	if !admin && c.ioFreed {
		c.target.v.add("%s touched a freed I/O queue", what)
	}
}

func (c *fakeConn) putLocked() {
	c.usage--
	if c.usage < 0 {
		c.target.v.add("queue usage below zero")
	}
	if c.usage == 0 {
		c.idle.Broadcast()
	}
}

// submit allocates a command, then writes it unless the socket is shut (or
// ctx is done): then it is failed inline, before any write.
func (c *fakeConn) submit(ctx context.Context, admin bool, kind string, beforeWrite func(context.Context)) (*fakeCmd, error) {
	c.mu.Lock()
	c.touchLocked(admin, kind+" allocation")
	c.usage++
	c.mu.Unlock()
	if beforeWrite != nil {
		beforeWrite(ctx)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.shut || c.broken || ctx.Err() != nil {
		// nvme_fail_nonready_command: completed inside dispatch; the
		// reference goes only after dispatch's last touch.
		c.touchLocked(admin, kind+" failed in dispatch")
		c.putLocked()
		return nil, errPath
	}
	cmd := &fakeCmd{c: c, kind: kind, done: make(chan error, 1)}
	c.pending[cmd] = true
	if c.traffic != nil && kind != "keep-alive" {
		c.traffic.submit(cmd)
	}
	return cmd, nil
}

func (c *fakeConn) complete(cmd *fakeCmd, err error) bool {
	admin := cmd.kind == "keep-alive" || cmd.kind == "shutdown-notification"
	c.mu.Lock()
	if !c.pending[cmd] {
		c.mu.Unlock()
		return false
	}
	delete(c.pending, cmd)
	c.touchLocked(admin, cmd.kind+" completion handler")
	c.mu.Unlock()
	if cmd.inHandler != nil {
		cmd.inHandler()
	}
	c.mu.Lock()
	c.touchLocked(admin, cmd.kind+" completion handler (last touch)")
	if c.traffic != nil && admin == false {
		c.traffic.complete(cmd)
	}
	cmd.done <- err
	c.putLocked()
	c.mu.Unlock()
	return true
}

func (c *fakeConn) KeepAlive(ctx context.Context) error {
	c.mu.Lock()
	if c.kaStopped || c.shut {
		c.target.v.add("keep-alive submitted after keep-alive was stopped (shut=%v)", c.shut)
	}
	c.kaActive++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.kaActive--
		c.mu.Unlock()
	}()
	cmd, err := c.submit(ctx, true, "keep-alive", c.target.kaAllocated)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.kaWritten++
	c.mu.Unlock()
	if ch := c.target.keepAlives; ch != nil {
		select {
		case ch <- cmd:
		case <-ctx.Done():
			return ctx.Err()
		}
	} else {
		cmd.complete(nil)
	}
	return cmd.wait(ctx)
}

// fault is how a fake I/O misbehaves.
type fault int

const (
	faultNone fault = iota
	faultSocket
	faultLostResponse // applied, no response until the socket is shut
	faultDropped      // not applied, no response until the socket is shut
)

// write is a Write command on an I/O queue.
func (c *fakeConn) write(ctx context.Context, lba, val uint64, f fault) error {
	cmd, err := c.submit(ctx, false, "write", nil)
	if err != nil {
		return err
	}
	switch f {
	case faultNone:
		c.target.mu.Lock()
		c.target.data[lba] = val
		c.target.mu.Unlock()
		cmd.complete(nil)
	case faultSocket:
		c.mu.Lock()
		c.broken = true
		c.mu.Unlock()
		c.onError(errSocket)
		cmd.complete(errPath)
	case faultLostResponse, faultDropped:
		if f == faultLostResponse {
			c.target.mu.Lock()
			c.target.data[lba] = val
			c.target.mu.Unlock()
		}
		c.onError(errTimeout) // the command timeout fires
	}
	return <-cmd.done
}

// ShutdownController is an admin command: allocated and completed (or
// held by the target's shutdownHang until ctx ends) like the others.
func (c *fakeConn) ShutdownController(ctx context.Context) error {
	c.mu.Lock()
	// After Shutdown it is allowed (Hurry shuts the sockets early, and
	// the command then fails at once); after a free it is a violation
	// (submit's touch).
	if c.shutdownNotified {
		c.target.v.add("shutdown notification twice")
	}
	c.shutdownNotified = true
	c.mu.Unlock()
	cmd, err := c.submit(ctx, true, "shutdown-notification", nil)
	if err != nil {
		return err
	}
	c.target.mu.Lock()
	hang, started := c.target.shutdownHang, c.target.shutdownStarted
	c.target.mu.Unlock()
	if started != nil {
		close(started)
	}
	if !hang {
		cmd.complete(nil)
	}
	return cmd.wait(ctx)
}

func (c *fakeConn) Shutdown() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.shut {
		c.target.v.add("Shutdown twice")
	}
	c.shut = true
	for cmd := range c.pending {
		c.handlers.Add(1)
		go func() {
			defer c.handlers.Done()
			cmd.complete(errPath)
		}()
	}
}

func (c *fakeConn) WaitIdle() {
	if c.onWaitIdle != nil {
		c.onWaitIdle()
	}
	c.handlers.Wait()
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.shut {
		c.target.v.add("WaitIdle before Shutdown")
	}
	for c.usage > 0 {
		c.idle.Wait()
	}
}

func (c *fakeConn) FreeIOQueues() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.usage != 0 || !c.shut {
		c.target.v.add("I/O queues freed with usage %d, shut %v", c.usage, c.shut)
	}
	if c.kaActive != 0 {
		c.target.v.add("I/O queues freed with %d KeepAlive calls running", c.kaActive)
	}
	if c.ioFreed || c.adminFreed {
		c.target.v.add("I/O queues freed twice or after the admin queue")
	}
	c.ioFreed = true
}

func (c *fakeConn) FreeAdminQueue() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.usage != 0 || !c.shut {
		c.target.v.add("admin queue freed with usage %d, shut %v", c.usage, c.shut)
	}
	if c.kaActive != 0 {
		c.target.v.add("admin queue freed with %d KeepAlive calls running", c.kaActive)
	}
	if !c.ioFreed {
		c.target.v.add("admin queue freed before the I/O queues")
	}
	if c.adminFreed {
		c.target.v.add("admin queue freed twice")
	}
	c.adminFreed = true
}

// fakeTraffic is TBKAS accounting on a fake association.
type fakeTraffic struct {
	mu        sync.Mutex
	next      uint64
	seq       map[*fakeCmd]uint64
	completed uint64 // highest completed seq + 1
}

func (f *fakeTraffic) submit(cmd *fakeCmd) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.seq == nil {
		f.seq = map[*fakeCmd]uint64{}
	}
	f.seq[cmd] = f.next
	f.next++
}

func (f *fakeTraffic) complete(cmd *fakeCmd) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.seq[cmd] + 1; s > f.completed {
		f.completed = s
	}
	delete(f.seq, cmd)
}

func (f *fakeTraffic) Submitted() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.next
}

func (f *fakeTraffic) CompletedSince(mark uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.completed > mark
}

// fakeBlock records Stop and Remove, and checks they come in order.
type fakeBlock struct {
	v       *violations
	mu      sync.Mutex
	stopped bool
	removed bool
}

func (b *fakeBlock) Stop(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped || b.removed {
		b.v.add("block Stop twice or after Remove")
	}
	b.stopped = true
	return nil
}

func (b *fakeBlock) Remove(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.stopped || b.removed {
		b.v.add("block Remove before Stop, or twice")
	}
	b.removed = true
	return nil
}
