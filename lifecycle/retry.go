package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Status dispositions, as the Linux host's nvme_decide_disposition and
// nvme_retry_req: a command the controller completed with any status
// without the Do Not Retry bit is retried, on the same association (the
// controller answered: no recovery), after the Command Retry Delay the
// status asks for, up to Options.MaxRetries (nvme_max_retries) times on
// each association. Namespace Not Ready, a Path Related Status (SCT 3), a
// data digest error reported on that one command: all are such statuses.
// A status with DNR is returned at once.
//
// When those retries are used up, a Path Related Status is handled as a
// failure of the association (the path is what fails; native multipath
// fails such a request over, nvme_failover_req, and holds it while no
// path is usable): recovery starts and the I/O is held for the next
// association, counted with the association failures. Any other status
// then fails the I/O, as the Linux host does.

// maxRetryDelay bounds the wait before a retry: CRDT is a 16-bit count of
// 100 ms (up to 109 minutes), and a controller's value only holds the I/O.
const maxRetryDelay = time.Minute

// retryableStatus is the part of nvme.Status that decides a disposition.
type retryableStatus interface {
	DNR() bool
	// CRD is the status's Command Retry Delay field: 0 retry at once,
	// 1..3 after CRDT1..3.
	CRD() uint8
}

// RetryableStatus reports whether err carries an NVMe status without DNR
// (an error in its chain has methods DNR() bool and CRD() uint8, as
// nvme.Status): Do and Retry retry such a command on the same association
// after the Command Retry Delay. The I/O fast path hands such a failure to
// Retry, as it does a path error.
func RetryableStatus(err error) bool {
	var s retryableStatus
	return errors.As(err, &s) && !s.DNR()
}

// pathStatus reports whether err carries a Path Related Status (Status
// Code Type 3; NVMe Base Specification 2.0, "Path Related Status Values";
// nvme_is_path_error): an error in its chain has a method
// PathRelated() bool, as nvme.Status, that returns true.
func pathStatus(err error) bool {
	var s interface{ PathRelated() bool }
	return errors.As(err, &s) && s.PathRelated()
}

// tries is what an I/O has been through: its failed tries, counted for
// Options.MaxRetries, and the association it last failed on the path of.
type tries struct {
	// statuses: statuses without DNR on the association the I/O is on;
	// none yet on the next one.
	statuses int
	// paths: failures of the path, each retried on a new association.
	paths int
	// failedGen is the association the I/O failed on the path of (0:
	// none): it is not tried there again.
	failedGen uint64
}

// next counts the failed try err of an I/O on association gen, a status
// without DNR (RetryableStatus) or a failure of the path, and decides what
// follows: the delay before the I/O is tried again, on the same
// association after a status and on the next one (failedGen) after a path
// failure, for which recovery is started here; or the error that ends the
// I/O, wrapping ErrRetriesExhausted and err.
func (c *Controller) next(t *tries, gen uint64, err error) (time.Duration, error) {
	if RetryableStatus(err) {
		if t.statuses < c.opts.MaxRetries {
			// The controller answered: the association works; the
			// I/O stays on it (failedGen stays what it was).
			t.statuses++
			return c.retryDelay(err), nil
		}
		if !pathStatus(err) || t.paths >= c.opts.MaxRetries {
			return 0, fmt.Errorf("%w: %w", ErrRetriesExhausted, err)
		}
		// The path keeps failing it: recover, as after a path error.
		err = fmt.Errorf("path status after %d retries: %w", t.statuses, err)
	}
	c.reportError(gen, err)
	t.failedGen = gen
	t.statuses = 0 // the next association gets its own
	if t.paths >= c.opts.MaxRetries {
		return 0, fmt.Errorf("%w: %w", ErrRetriesExhausted, err)
	}
	t.paths++
	return 0, nil
}

// retryDelay is how long to wait before retrying a command that failed
// with the retryable status err: CRDT[CRD-1] of the live association
// (Conn.CRDT: zero unless Advanced Command Retry is enabled), or none.
func (c *Controller) retryDelay(err error) time.Duration {
	var s retryableStatus
	if !errors.As(err, &s) {
		return 0
	}
	crd := s.CRD()
	if crd == 0 || crd > 3 {
		return 0
	}
	c.mu.Lock()
	d := c.crdt[crd-1]
	c.mu.Unlock()
	return min(d, maxRetryDelay)
}

// retryWait waits d before a retry, holding no reference on any
// association: teardown does not wait for it. A delete ends it at once
// with ErrDeleted (EIO), ctx with its error. That includes a delete the
// controller decides itself (ctrl_loss_tmo, another namespace), which
// cancels c.ctx only once its teardown is done: the block device's
// quiesce in that teardown waits for this I/O, so DELETING ends it.
func (c *Controller) retryWait(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := c.clk.NewTimer(d)
	defer t.Stop()
	for {
		// wake before the state: a change after the look closes it.
		c.mu.Lock()
		wake := c.wake
		c.mu.Unlock()
		if s := c.sm.State(); s == StateDeleting || s == StateDead {
			return ErrDeleted
		}
		select {
		case <-t.C():
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-c.ctx.Done():
			// Cancelled when deletion was requested.
			return ErrDeleted
		case <-wake:
		}
	}
}
