package lifecycle

import (
	"context"
)

// Ref is a usage reference on the live association, taken without waiting
// by TryEnter: the asynchronous form of Do, for the I/O fast path. A block
// request started on the association from the ublk queue thread completes
// on the association's own goroutine; neither blocks on the other.
type Ref struct {
	c    *Controller
	conn Conn
	gen  uint64
}

// TryEnter takes a reference on the live association if the controller is
// LIVE, without waiting and without taking a lock (the same fast path as
// Do's). ok is false otherwise, also for a moment after the state turned
// LIVE, before the association is published: the caller then takes the
// slow path, Do, which holds the I/O while the controller recovers.
//
// The caller must call Exit exactly once, after its last touch of Conn: for
// a command it started asynchronously, from the command's completion
// handler. Teardown waits for that (StepWaitCompletions) after it has shut
// the sockets, so a started command always gets its completion.
func (c *Controller) TryEnter() (Ref, bool) {
	c.inflight.Add(1)
	if l := c.live.Load(); l != nil {
		return Ref{c: c, conn: l.conn, gen: l.gen}, true
	}
	c.exit()
	return Ref{}, false
}

// Conn is the association the reference is on.
func (r Ref) Conn() Conn { return r.conn }

// Exit drops the reference.
func (r Ref) Exit() { r.c.exit() }

// Retry finishes, as Do would, an I/O that failed on r's association with
// err, a path error (Conn.IsPathError) or a status without DNR
// (RetryableStatus). After a path error it reports err (recovery starts)
// and runs fn on a later association, holding the I/O while the controller
// recovers. After a status the controller answered: no recovery; fn runs
// again on the same association if it is still live, after the Command
// Retry Delay the status names (a delete meanwhile fails it with
// ErrDeleted at once). The retries are bounded as Do's, this failure
// counted among them. Call it after r.Exit, on a goroutine that may block.
func (c *Controller) Retry(ctx context.Context, r Ref, err error, fn func(Conn) error) error {
	var t tries
	delay, err := c.next(&t, r.gen, err)
	if err != nil {
		return err
	}
	if err := c.retryWait(ctx, delay); err != nil {
		return err
	}
	return c.do(ctx, t, fn)
}
