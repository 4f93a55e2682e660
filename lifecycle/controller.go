package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
	"github.com/ublk-nvmeof/ublk-nvmeof/keepalive"
)

// Options are the connect options lifecycle acts on, with the Linux host's
// names and defaults (DefaultOptions).
type Options struct {
	// ReconnectDelay is the time between reconnect attempts
	// (reconnect_delay). Must be positive.
	ReconnectDelay time.Duration
	// CtrlLossTmo is how long to keep reconnecting before the controller
	// is deleted (ctrl_loss_tmo). Negative: forever. As in the Linux host
	// it becomes a number of attempts, ceil(CtrlLossTmo/ReconnectDelay).
	CtrlLossTmo time.Duration
	// FastIOFailTmo is how long after reconnecting began held I/O is
	// failed with EIO (fast_io_fail_tmo). Negative: off, I/O is held
	// until the controller is LIVE again or deleted.
	FastIOFailTmo time.Duration
	// MaxRetries (nvme_max_retries) is how many times an I/O that failed
	// on the path is retried on a new association, and how many times one
	// that failed with a status without DNR is retried on each association
	// (retry.go).
	MaxRetries int
	// ShutdownTimeout, if positive, bounds the shutdown notification the
	// delete sends (CC.SHN, then waiting for CSTS.SHST) below the Conn's
	// own bound (the controller's RTD3E, 5 to 60 s). A hurried delete
	// skips it.
	ShutdownTimeout time.Duration
	// LinkWatch, if set, is run while the controller exists; a link or
	// route going down starts error recovery at once instead of after
	// KATO, and the path coming back while the controller waits to
	// reconnect makes it reconnect at once instead of after
	// reconnect_delay.
	LinkWatch LinkWatcher

	// TeardownHook, if set, is called on the supervisor goroutine before
	// (done false) and after (done true) every teardown step: for tracing,
	// and for tests that land a completion at an exact point of teardown.
	// It delays teardown for as long as it runs.
	TeardownHook func(step Step, done bool)

	Clock  clock.Clock  // nil: the real clock
	Logger *slog.Logger // nil: slog.Default()
}

// DefaultOptions returns the Linux host's defaults: reconnect_delay 10 s,
// ctrl_loss_tmo 600 s, fast_io_fail_tmo off, 5 retries.
func DefaultOptions() Options {
	return Options{
		ReconnectDelay: 10 * time.Second,
		CtrlLossTmo:    600 * time.Second,
		FastIOFailTmo:  -1,
		MaxRetries:     5,
	}
}

// LinkWatcher watches the path to the target. Watch runs until ctx is
// cancelled; it calls down whenever the path fails, and up whenever it comes
// back after a failure. Both only signal.
type LinkWatcher interface {
	Watch(ctx context.Context, down func(error), up func()) error
}

// Controller is one remote controller and the namespace exposed from it.
//
// Its supervisor goroutine is the one place that orders connect, error
// recovery, reconnect and teardown; everything else (the connection's
// error callback, keep-alive failures, the link watch, Delete) only signals
// it.
type Controller struct {
	opts      Options
	connector Connector
	clk       clock.Clock
	log       *slog.Logger
	sm        *StateMachine

	// ctx is cancelled when deletion is requested or the controller
	// deletes itself: it aborts connect attempts and the link watch.
	ctx    context.Context
	cancel context.CancelFunc

	kick      chan struct{} // capacity 1: an error was reported
	linkUp    chan struct{} // capacity 1: the link watch saw the path come back
	deleteReq chan struct{} // closed by Delete
	health    chan struct{} // unbuffered: the supervisor receives where it waits (Health)
	delOnce   sync.Once
	// hurry is cancelled by Hurry: the delete stops waiting for the
	// target and for the block device's openers.
	hurry       context.Context
	hurryCancel context.CancelFunc
	// shutMu orders Hurry's socket shutdown against StepShutdownSockets, so
	// that each association is shut down once, and before WaitIdle.
	shutMu  sync.Mutex
	shut    Conn          // the association whose sockets were shut last
	done    chan struct{} // closed when the supervisor has returned (DEAD)
	started atomic.Bool

	// Owned by the supervisor goroutine (and Start before it runs).
	keeper *keepalive.Keeper

	// resizeMu serializes resizes of the block device (namespace.go).
	resizeMu sync.Mutex

	mu         sync.Mutex
	ns         Namespace // found by the first connect; its size follows resizes
	conn       Conn      // the association; nil while there is none
	gen        uint64    // association generation; errors from older ones are stale
	pendingErr error     // first error reported for gen
	block      Block
	blockTaken bool             // a delete's teardown has looked for block: SetBlock is refused
	crdt       [3]time.Duration // Command Retry Delay Times of the live association
	failfast   bool             // fast_io_fail_tmo expired while reconnecting
	wake       chan struct{}    // closed and replaced when state or failfast changes
	held       int              // Do callers waiting for LIVE
	idle       *sync.Cond       // signalled when inflight drops to zero while draining

	// The I/O fast path, without c.mu (like percpu_ref_tryget_live on
	// q_usage_counter): a Do caller counts itself in inflight, then
	// loads live; it may use the association only if live was set.
	// Teardown clears live first (StepChangeState) and waits for inflight
	// to reach zero (StepWaitCompletions): with both atomic, either the caller saw nil, or
	// teardown sees it counted.
	live     atomic.Pointer[liveConn] // set only while LIVE
	inflight atomic.Int64             // Do callers between enter and exit
	draining atomic.Bool              // teardown waits for inflight to drop to zero
	cause    error                    // why the controller was deleted

	// hook is Options.TeardownHook.
	hook func(step Step, done bool)
}

// New returns a controller in state NEW. Call Start to connect.
func New(connector Connector, opts Options) (*Controller, error) {
	if opts.ReconnectDelay <= 0 {
		return nil, errors.New("lifecycle: reconnect_delay must be positive")
	}
	if opts.MaxRetries < 0 {
		return nil, errors.New("lifecycle: negative MaxRetries")
	}
	clk := opts.Clock
	if clk == nil {
		clk = clock.Real{}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	c := &Controller{
		opts:      opts,
		connector: connector,
		clk:       clk,
		log:       log,
		sm:        NewStateMachine(clk),
		kick:      make(chan struct{}, 1),
		linkUp:    make(chan struct{}, 1),
		deleteReq: make(chan struct{}),
		health:    make(chan struct{}),
		done:      make(chan struct{}),
		wake:      make(chan struct{}),
		hook:      opts.TeardownHook,
	}
	c.idle = sync.NewCond(&c.mu)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.hurry, c.hurryCancel = context.WithCancel(context.Background())
	c.sm.Observe(func(tr Transition) {
		c.log.Info("controller state", "from", tr.From, "to", tr.To, "reason", tr.Reason)
	})
	return c, nil
}

// States is the controller's state machine, to read and observe.
func (c *Controller) States() *StateMachine { return c.sm }

// State returns the current state.
func (c *Controller) State() State { return c.sm.State() }

// Namespace returns the namespace identity found by the first connect,
// with its current size.
func (c *Controller) Namespace() Namespace {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ns
}

// Done is closed when the controller is DEAD and every goroutine it started
// has returned.
func (c *Controller) Done() <-chan struct{} { return c.done }

// Err returns why the controller was deleted, once Done is closed.
func (c *Controller) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cause
}

// SetBlock registers the block device in front of the controller, to be
// stopped and removed when the controller is deleted. Call it once, after
// Start. Once a delete has begun (requested, or the controller deleting
// itself) it returns ErrDeleted and registers nothing: the caller removes
// the block device itself.
func (c *Controller) SetBlock(b Block) error {
	c.mu.Lock()
	if c.blockTaken {
		c.mu.Unlock()
		return ErrDeleted
	}
	c.block = b
	c.mu.Unlock()
	if _, ok := b.(Resizer); ok {
		c.fitBlock() // a device taken over may have another size
	}
	return nil
}

// Start makes the first association and makes the controller LIVE. As with
// the Linux host's connect, a failure of the first connect is not retried:
// the controller goes to DEAD and Start returns the error.
func (c *Controller) Start(ctx context.Context) error {
	if c.started.Swap(true) {
		return errors.New("lifecycle: Start called twice")
	}
	if err := c.setState(StateConnecting, "connect"); err != nil {
		return err
	}
	// The first connect is cancelled by Delete as well as by ctx.
	cctx, stop := context.WithCancel(ctx)
	unlink := context.AfterFunc(c.ctx, stop)
	conn, err := c.connect(cctx)
	unlink()
	stop()
	if err != nil {
		c.remove(fmt.Errorf("connect: %w", err))
		close(c.done)
		return err
	}
	c.mu.Lock()
	c.ns = conn.Namespace()
	c.mu.Unlock()
	c.goLive(conn, "connected")
	go c.run()
	return nil
}

// Delete deletes the controller, in the teardown order, and waits until it
// is DEAD. It may be called at any time, from any goroutine, any number of
// times.
func (c *Controller) Delete() {
	c.requestDelete()
	if !c.started.Load() {
		return
	}
	<-c.done
}

func (c *Controller) requestDelete() {
	c.delOnce.Do(func() {
		close(c.deleteReq)
		c.cancel()
	})
}

// Hurry makes the delete immediate (an operator's second SIGTERM): it
// requests deletion, if that was not done, and stops waiting for the
// target. The live association's sockets are shut now, so every command in
// flight fails at once instead of when the target answers or its timeout
// fires; the controller is DELETING, so the I/O fails with EIO and is not
// retried, and held I/O fails as in any delete. Removing the block device
// no longer waits for its openers beyond a short budget.
//
// The teardown order is kept: Hurry only does StepShutdownSockets's work
// early, which frees nothing and makes STOP_DEV's drain (StepQuiesceBlock)
// quick, and the shutdown notification (StepShutdownController) is
// skipped or cut short; the queues are still freed only after every
// completion handler and Do caller has returned. Hurry may be called at any
// time, from any goroutine, any number of times; it does not wait (Delete
// or Done does).
func (c *Controller) Hurry() {
	c.hurryCancel()
	c.requestDelete()
	c.mu.Lock()
	conn := c.conn
	c.mu.Unlock()
	if conn != nil {
		c.log.Warn("deleting in a hurry: shutting the sockets, failing I/O in flight")
		c.shutdown(conn)
	}
}

// shutdown shuts conn's sockets unless that was done already: by Hurry,
// or by teardown if Hurry came after conn was released (then Shutdown is
// not called on freed queues).
func (c *Controller) shutdown(conn Conn) {
	c.shutMu.Lock()
	defer c.shutMu.Unlock()
	if c.shut == conn {
		return
	}
	c.shut = conn
	conn.Shutdown()
}

// setState changes the state and wakes every I/O waiting on it.
func (c *Controller) setState(to State, reason string) error {
	if _, err := c.sm.change(to, reason); err != nil {
		c.log.Error("state change rejected", "err", err)
		return err
	}
	c.mu.Lock()
	c.broadcastLocked()
	c.mu.Unlock()
	return nil
}

func (c *Controller) broadcastLocked() {
	close(c.wake)
	c.wake = make(chan struct{})
}

// reportError records err as the reason the association of generation gen
// failed and wakes the supervisor. Errors of an older association, or after
// one was already recorded, are dropped. It never blocks.
func (c *Controller) reportError(gen uint64, err error) {
	c.mu.Lock()
	if gen == c.gen && c.pendingErr == nil {
		c.pendingErr = err
	}
	c.mu.Unlock()
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// connect makes a new association whose errors are reported under a new
// generation: the admin queue, then keep-alive on it, then the I/O queues
// (Connector). A failure after the admin queue was made tears the
// association down here, keep-alive first (discardConn).
func (c *Controller) connect(ctx context.Context) (Conn, error) {
	c.mu.Lock()
	c.gen++
	gen := c.gen
	c.pendingErr = nil
	c.mu.Unlock()
	conn, err := c.connector.Connect(ctx, func(err error) { c.reportError(gen, err) })
	if err != nil {
		return nil, err
	}
	// From the moment the admin queue is up, as the Linux host since
	// 4733b65d82bd: the I/O queues' connects may outlast KATO.
	c.startKeepAlive(conn)
	if err := c.connectIOQueues(ctx, conn, gen); err != nil {
		c.discardConn(conn)
		return nil, err
	}
	return conn, nil
}

// connectIOQueues runs conn.ConnectIOQueues, cut short when the keep-alive
// fails meanwhile: the controller is gone, waiting for the I/O queues'
// connect timeouts would only delay the next attempt. Such a failure is
// also reported, so that it is not lost if the I/O queues connected anyway.
func (c *Controller) connectIOQueues(ctx context.Context, conn Conn, gen uint64) error {
	ictx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	quit := make(chan struct{})
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		select {
		case err := <-c.keepAliveFailed():
			c.reportError(gen, err)
			cancel(err)
		case <-quit:
		}
	}()
	err := conn.ConnectIOQueues(ictx)
	close(quit)
	watch.Wait()
	if err != nil && ctx.Err() == nil {
		if kaErr := context.Cause(ictx); kaErr != nil && kaErr != context.Canceled {
			return fmt.Errorf("connecting I/O queues: %w (%v)", kaErr, err)
		}
	}
	if err != nil {
		return fmt.Errorf("connecting I/O queues: %w", err)
	}
	return nil
}

// goLive publishes conn and makes the controller LIVE. Keep-alive runs
// already (connect started it).
func (c *Controller) goLive(conn Conn, reason string) {
	crdt := conn.CRDT()
	c.mu.Lock()
	c.conn = conn
	c.crdt = crdt
	c.failfast = false
	c.mu.Unlock()
	if err := c.setState(StateLive, reason); err != nil {
		panic(err) // CONNECTING -> LIVE is always allowed; only the supervisor changes state
	}
	// Open the fast path, and wake the I/O that found LIVE before it was
	// open.
	c.mu.Lock()
	c.live.Store(&liveConn{conn: conn, gen: c.gen})
	c.broadcastLocked()
	c.mu.Unlock()
}

// liveConn is the association I/O may use, with its generation.
type liveConn struct {
	conn Conn
	gen  uint64
}

// startKeepAlive starts keep-alive on conn's admin queue, while
// CONNECTING: it keeps running once LIVE, and stops re-arming in any other
// state; teardown stops it (StepStopKeepAlive).
func (c *Controller) startKeepAlive(conn Conn) {
	c.keeper = keepalive.Start(conn, keepalive.Config{
		KATO:    conn.KATO(),
		Traffic: conn.Traffic(),
		MayRearm: func() bool {
			s := c.sm.State()
			return s == StateLive || s == StateConnecting
		},
		Clock:  c.clk,
		Logger: c.log,
	})
}

// keepAliveFailed returns the running keeper's failure channel, or nil.
func (c *Controller) keepAliveFailed() <-chan error {
	if c.keeper == nil {
		return nil
	}
	return c.keeper.Failed()
}

// run is the supervisor: it waits for trouble while LIVE, and recovers or
// deletes. It owns the link watch goroutine and joins it.
func (c *Controller) run() {
	defer close(c.done)
	var watch sync.WaitGroup
	defer watch.Wait()
	if c.opts.LinkWatch != nil {
		watch.Add(1)
		go func() {
			defer watch.Done()
			err := c.opts.LinkWatch.Watch(c.ctx, func(err error) {
				c.mu.Lock()
				gen := c.gen
				c.mu.Unlock()
				c.reportError(gen, fmt.Errorf("%w: %v", ErrLinkDown, err))
			}, func() {
				select {
				case c.linkUp <- struct{}{}:
				default:
				}
			})
			if err != nil && c.ctx.Err() == nil {
				c.log.Warn("link watch stopped", "err", err)
			}
		}()
	}
	for {
		cause, deleted := c.waitForTrouble()
		if deleted {
			c.remove(errors.New("deleted"))
			return
		}
		if errors.Is(cause, ErrNamespaceChanged) {
			c.remove(cause) // never resume I/O onto a different namespace
			return
		}
		c.log.Warn("controller error, recovering", "err", cause)
		if !c.recoverAndReconnect(cause) {
			return
		}
	}
}

// waitForTrouble waits, while LIVE, for an error of the current association
// or a delete request.
func (c *Controller) waitForTrouble() (cause error, deleted bool) {
	c.mu.Lock()
	nsChanged := namespaceChanges(c.conn)
	c.mu.Unlock()
	for {
		// A delete wins over an error reported at the same time: Hurry
		// shuts the sockets right after requesting it, and the I/O
		// failing from that must not start a recovery.
		select {
		case <-c.deleteReq:
			return nil, true
		default:
		}
		c.mu.Lock()
		err := c.pendingErr
		c.mu.Unlock()
		if err != nil {
			return err, false
		}
		select {
		case <-c.deleteReq:
			return nil, true
		case <-c.kick:
		case <-c.health: // answered (Health)
		case err := <-c.keepAliveFailed():
			return err, false
		case ns := <-nsChanged:
			if err := c.namespaceChanged(ns); err != nil {
				return err, false
			}
		}
	}
}

// recoverAndReconnect is error recovery: RESETTING, tear the association
// down, CONNECTING, reconnect every reconnect_delay until ctrl_loss_tmo. It
// returns false if the controller was deleted instead.
//
// With a link watch, the path coming back (after this recovery began) ends
// the wait at once. Such an early attempt does not count towards
// ctrl_loss_tmo's number of attempts: a flapping link must not use up in
// seconds what is meant to last ctrl_loss_tmo. The next regular attempt is
// still reconnect_delay after it.
func (c *Controller) recoverAndReconnect(cause error) bool {
	// Only a path that comes back from now on says anything about this
	// failure: forget an earlier one.
	select {
	case <-c.linkUp:
	default:
	}
	c.teardown(teardownReset, cause.Error())
	if err := c.setState(StateConnecting, "reconnecting"); err != nil {
		panic(err) // RESETTING -> CONNECTING is always allowed here
	}
	stopFailfast := c.startFailfast()
	defer stopFailfast()

	attempts := 0 // regular attempts made, for ctrl_loss_tmo
	for {
		if !c.shouldReconnect(attempts) {
			c.remove(fmt.Errorf("ctrl_loss_tmo expired after %d attempts: %w", attempts, cause))
			return false
		}
		t := c.clk.NewTimer(c.opts.ReconnectDelay)
		early := false
	wait:
		for {
			select {
			case <-c.health: // answered (Health); keep waiting
				continue
			case <-c.deleteReq:
				t.Stop()
				c.remove(errors.New("deleted while reconnecting"))
				return false
			case <-t.C():
				attempts++
			case <-c.linkUp:
				t.Stop()
				early = true
				c.log.Info("path to the target is back: reconnecting now, not after reconnect_delay")
			}
			break wait
		}
		conn, err := c.connect(c.ctx)
		if err != nil {
			if c.ctx.Err() != nil {
				c.remove(errors.New("deleted while reconnecting"))
				return false
			}
			if isDNR(err) {
				c.remove(fmt.Errorf("reconnect failed with DNR, not retrying: %w", err))
				return false
			}
			c.log.Warn("reconnect failed", "attempt", attempts, "early", early, "err", err)
			cause = err
			continue
		}
		// The same namespace, perhaps resized (the device follows);
		// never resume I/O onto a different one.
		if err := c.adoptNamespace(conn.Namespace()); err != nil {
			c.discardConn(conn)
			c.remove(err)
			return false
		}
		c.goLive(conn, "reconnected")
		return true
	}
}

// shouldReconnect is nvmf_should_reconnect: ctrl_loss_tmo is a number of
// attempts, ceil(ctrl_loss_tmo / reconnect_delay); negative is forever.
func (c *Controller) shouldReconnect(attempts int) bool {
	if c.opts.CtrlLossTmo < 0 {
		return true
	}
	d := c.opts.ReconnectDelay
	max := int((c.opts.CtrlLossTmo + d - 1) / d)
	return attempts < max
}

// startFailfast arms fast_io_fail_tmo for this reconnect (as the Linux host
// does on RESETTING -> CONNECTING). Its goroutine is joined by the returned
// function; the expired flag itself is cleared only when LIVE again.
func (c *Controller) startFailfast() (stop func()) {
	if c.opts.FastIOFailTmo < 0 {
		return func() {}
	}
	t := c.clk.NewTimer(c.opts.FastIOFailTmo)
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-t.C():
			c.log.Warn("fast_io_fail_tmo expired, failing held I/O")
			c.mu.Lock()
			c.failfast = true
			c.broadcastLocked()
			c.mu.Unlock()
		case <-quit:
			t.Stop()
		}
	}()
	return func() { close(quit); wg.Wait() }
}

// remove deletes the controller: DELETING, teardown, DEAD.
func (c *Controller) remove(cause error) {
	c.mu.Lock()
	c.cause = cause
	c.mu.Unlock()
	select {
	case <-c.deleteReq:
		c.log.Info("deleting controller", "cause", cause) // as asked
	default:
		c.log.Warn("deleting controller", "cause", cause)
	}
	c.teardown(teardownDelete, cause.Error())
	if err := c.setState(StateDead, "deleted"); err != nil {
		panic(err)
	}
	c.cancel()
}
