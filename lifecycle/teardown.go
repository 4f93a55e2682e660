package lifecycle

import (
	"context"
	"sync"
)

// Step is one step of teardown, in docs/design.md's order.
type Step int

const (
	// StepChangeState: DELETING or RESETTING. From here Do accepts no new
	// submission: it holds them (RESETTING) or fails them (DELETING).
	StepChangeState Step = iota
	// StepStopKeepAlive: cancel the keep-alive and wait until its
	// goroutine has returned.
	StepStopKeepAlive
	// StepQuiesceBlock: delete: ublk STOP_DEV, which drains in-flight I/O
	// while the association still serves it. Recovery: nothing to do on
	// the ublk side, Do holds new I/O since StepChangeState.
	StepQuiesceBlock
	// StepShutdownController: delete only: the shutdown notification
	// (CC.SHN normal, then CSTS.SHST complete), as the Linux host sends
	// when it deletes a controller. After the ublk side is drained, so no
	// I/O is lost to it; before the sockets are shut, since it is admin
	// commands. Bounded (Conn.ShutdownController, Options.ShutdownTimeout);
	// skipped when the association has failed or the delete is hurried.
	StepShutdownController
	// StepShutdownSockets: every command in flight fails or completes.
	StepShutdownSockets
	// StepWaitCompletions: every completion handler has returned and every
	// Do caller has let go of the association.
	StepWaitCompletions
	// StepFreeIOQueues, then StepFreeAdminQueue: the admin queue last.
	StepFreeIOQueues
	StepFreeAdminQueue
	// StepRemoveBlock: delete only: close rings, unmap, DEL_DEV.
	StepRemoveBlock
	numSteps
)

func (s Step) String() string {
	return [...]string{
		"change-state", "stop-keep-alive", "quiesce-block", "shutdown-controller",
		"shutdown-sockets", "wait-completions", "free-io-queues", "free-admin-queue",
		"remove-block",
	}[s]
}

type teardownMode int

const (
	teardownReset teardownMode = iota
	teardownDelete
)

// teardown is the one place that orders tearing down: delete, and the
// tear-down half of error recovery. Only the supervisor calls it.
//
// The order is the lesson of the seed thread. The Linux host crashed when a
// keep-alive, failed inside its own dispatch as the admin queue was marked
// dying, dropped the queue's last usage reference before its dispatcher had
// returned, and the shutdown path freed the queue under it. It was fixed by
// stopping keep-alive synchronously at the top of
// nvme_remove_admin_tag_set() (e9869c85c811) after a54a93d0e359 had moved
// the stop later and reopened the race. So: keep-alive is stopped, and
// waited for, before sockets are shut and long before the admin queue is
// freed; the queues are freed only after every completion handler has
// returned; the admin queue is freed last. On delete the controller is
// told to shut down (CC.SHN) once the ublk side is drained and before the
// sockets are shut. Do not move a step.
func (c *Controller) teardown(mode teardownMode, reason string) {
	c.mu.Lock()
	conn, block := c.conn, c.block
	if mode == teardownDelete {
		c.blockTaken = true // a later SetBlock is refused: nobody would remove it
	}
	c.mu.Unlock()

	// 1. No new submissions.
	c.step(StepChangeState, func() {
		to := StateResetting
		if mode == teardownDelete {
			to = StateDeleting
		}
		// Close the fast path first: from here enter takes the slow
		// path, which holds or fails the I/O by state.
		c.live.Store(nil)
		if err := c.setState(to, reason); err != nil {
			panic(err) // the supervisor only tears down from a state the table allows
		}
	})

	// 2. Keep-alive stopped synchronously: when Stop returns no keep-alive
	// runs and none can be submitted.
	c.step(StepStopKeepAlive, c.stopKeepAlive)

	// 3. Quiesce the ublk side.
	c.step(StepQuiesceBlock, func() {
		if mode == teardownDelete && block != nil {
			if err := block.Stop(context.Background()); err != nil {
				c.log.Error("stopping block device", "err", err)
			}
		}
	})

	// 4. Delete only: the shutdown notification, bounded.
	c.step(StepShutdownController, func() {
		if mode == teardownDelete && conn != nil {
			c.shutdownController(conn)
		}
	})

	// 5 to 8: shut the sockets, wait, free the I/O queues, then the admin
	// queue.
	if conn != nil {
		c.releaseConn(conn)
	} else {
		for s := StepShutdownSockets; s <= StepFreeAdminQueue; s++ {
			c.step(s, func() {})
		}
	}

	// 9. Delete only: remove the block device.
	c.step(StepRemoveBlock, func() {
		if mode == teardownDelete && block != nil {
			// Ends with Hurry: DEL_DEV then does not wait for the
			// device's openers (the device is gone from /dev anyway).
			if err := block.Remove(c.hurry); err != nil {
				c.log.Error("removing block device", "err", err)
			}
		}
	})
}

// discardConn tears down an association that was never published: its
// I/O queues failed to connect, or a reconnect found a different
// namespace. The same order from step 2 on: keep-alive (started when the
// admin queue was connected) stopped and waited for first, then the
// sockets shut, the completions waited for, and the queues freed, the
// admin queue last. Nothing on the ublk side: no I/O was on it.
func (c *Controller) discardConn(conn Conn) {
	c.step(StepStopKeepAlive, c.stopKeepAlive)
	c.releaseConn(conn)
}

// stopKeepAlive is step 2: when it returns no keep-alive runs and none can
// be submitted.
func (c *Controller) stopKeepAlive() {
	if c.keeper != nil {
		c.keeper.Stop()
		c.keeper = nil
	}
}

// shutdownController sends the shutdown notification on conn and waits for
// it, at most Options.ShutdownTimeout (when set) on top of the Conn's own
// bound. A failed association, or a hurried delete, is not waited for.
func (c *Controller) shutdownController(conn Conn) {
	c.mu.Lock()
	failed := c.pendingErr
	c.mu.Unlock()
	switch {
	case failed != nil:
		c.log.Debug("no shutdown notification: the association failed", "err", failed)
		return
	case c.hurry.Err() != nil:
		c.log.Debug("no shutdown notification: delete hurried")
		return
	}
	ctx, cancel := context.WithCancel(c.hurry)
	defer cancel()
	var bound sync.WaitGroup
	if d := c.opts.ShutdownTimeout; d > 0 {
		t := c.clk.NewTimer(d)
		bound.Add(1)
		go func() {
			defer bound.Done()
			select {
			case <-t.C():
				cancel()
			case <-ctx.Done():
				t.Stop()
			}
		}()
	}
	err := conn.ShutdownController(ctx)
	cancel()
	bound.Wait()
	if err != nil {
		c.log.Warn("controller shutdown notification did not complete", "err", err)
	}
}

// releaseConn is steps 5 to 8: shut the sockets, wait for every completion
// handler and every Do caller, free the I/O queues, then the admin queue.
// Keep-alive must already be stopped.
func (c *Controller) releaseConn(conn Conn) {
	c.step(StepShutdownSockets, func() { c.shutdown(conn) })
	c.step(StepWaitCompletions, func() {
		conn.WaitIdle()
		c.mu.Lock()
		c.draining.Store(true)
		for c.inflight.Load() > 0 {
			c.idle.Wait()
		}
		c.draining.Store(false)
		c.mu.Unlock()
	})
	c.step(StepFreeIOQueues, conn.FreeIOQueues)
	c.step(StepFreeAdminQueue, func() {
		c.mu.Lock()
		if c.conn == conn {
			c.conn = nil
		}
		c.mu.Unlock()
		conn.FreeAdminQueue()
	})
}

func (c *Controller) step(s Step, fn func()) {
	if c.hook != nil {
		c.hook(s, false)
	}
	c.log.Debug("teardown", "step", s)
	fn()
	if c.hook != nil {
		c.hook(s, true)
	}
}

// Do runs fn on the live association: the I/O path. While the controller
// is RESETTING or CONNECTING (or not yet LIVE) the I/O is held until it is
// LIVE again; it fails with an error wrapping EIO once fast_io_fail_tmo has
// expired, or once the controller is DELETING or DEAD.
//
// fn is retried when it fails
//   - with a path error (Conn.IsPathError: the association failed under
//     it): recovery is started and fn is retried on the next association,
//     up to Options.MaxRetries times;
//   - with an NVMe status without DNR (RetryableStatus: Namespace Not
//     Ready, a Path Related Status, a data digest error on that command,
//     any other): the controller answered, so the association is fine and
//     no recovery is started; fn is retried on the same association after
//     the Command Retry Delay the status names (CRD 1..3: Conn.CRDT), as
//     the Linux host retries it (nvme_decide_disposition,
//     nvme_retry_req), up to Options.MaxRetries times on each
//     association. The wait holds no reference: a delete during it fails
//     the I/O with ErrDeleted at once. A Path Related Status that outlasts
//     those retries is then a failure of the path, as above: recovery,
//     and fn is held for the next association (retry.go).
//
// Any other error, a status with DNR among them, is returned as it is.
//
// fn must not keep the Conn, or anything from it, after it returns: the
// association may be freed as soon as every Do caller has returned.
func (c *Controller) Do(ctx context.Context, fn func(Conn) error) error {
	return c.do(ctx, tries{}, fn)
}

// do is Do for an I/O that has already been through t.
func (c *Controller) do(ctx context.Context, t tries, fn func(Conn) error) error {
	for {
		conn, gen, err := c.enter(ctx, t.failedGen)
		if err != nil {
			return err
		}
		err = c.call(conn, fn)
		switch {
		case err == nil:
			return nil
		case RetryableStatus(err), conn.IsPathError(err):
			// A status first: a Conn may count a path status as a
			// path error too, but the association works (next).
		default:
			return err
		}
		delay, err := c.next(&t, gen, err)
		if err != nil {
			return err
		}
		if err := c.retryWait(ctx, delay); err != nil {
			return err
		}
	}
}

// enter takes a usage reference on the live association, waiting while
// the controller is not LIVE, or while the association is the one of
// generation failedGen (an I/O that failed on the path is retried on the
// next association, not on the one that failed it).
func (c *Controller) enter(ctx context.Context, failedGen uint64) (Conn, uint64, error) {
	for {
		// Fast path: count ourselves in, then look.
		c.inflight.Add(1)
		if l := c.live.Load(); l != nil && l.gen != failedGen {
			return l.conn, l.gen, nil
		}
		c.exit()

		// Slow path: decide by state, or wait for it to change.
		c.mu.Lock()
		if l := c.live.Load(); l != nil && l.gen != failedGen {
			c.mu.Unlock()
			continue
		}
		switch s := c.sm.State(); {
		case s == StateDeleting || s == StateDead:
			c.mu.Unlock()
			return nil, 0, ErrDeleted
		case c.failfast:
			c.mu.Unlock()
			return nil, 0, ErrFastIOFail
		}
		wake := c.wake
		c.held++
		c.mu.Unlock()
		var err error
		select {
		case <-wake:
		case <-ctx.Done():
			err = ctx.Err()
		}
		c.mu.Lock()
		c.held--
		c.mu.Unlock()
		if err != nil {
			return nil, 0, err
		}
	}
}

// Held returns the number of I/Os held, waiting for the controller to be
// LIVE again.
func (c *Controller) Held() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.held
}

// call runs fn with the reference taken by enter and drops it when fn has
// returned, its last touch of conn behind it, even if fn panics.
func (c *Controller) call(conn Conn, fn func(Conn) error) error {
	defer c.exit()
	return fn(conn)
}

func (c *Controller) exit() {
	if c.inflight.Add(-1) == 0 && c.draining.Load() {
		c.mu.Lock()
		c.idle.Broadcast()
		c.mu.Unlock()
	}
}
