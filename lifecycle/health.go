package lifecycle

import (
	"context"
	"errors"
	"fmt"
)

// ErrBusy is wrapped by Health's error when the supervisor did not answer
// in time.
var ErrBusy = errors.New("supervisor did not answer")

// BusyError is Health's answer when the supervisor did not answer before
// ctx ended: it is inside a teardown, a connect attempt, or stuck.
type BusyError struct {
	// State is the controller's state when Health gave up waiting. A
	// supervisor busy in CONNECTING is in a connect attempt, which waits
	// on the network (bounded by the transport's and the commands'
	// timeouts); in any other state it is in teardown or stuck.
	State State
}

func (e *BusyError) Error() string {
	return fmt.Sprintf("%v (controller %v)", ErrBusy, e.State)
}

func (e *BusyError) Unwrap() error { return ErrBusy }

// Health asks the supervisor goroutine itself to answer, and waits until it
// has or ctx ends. The supervisor answers wherever it waits: for trouble
// while LIVE, and for the next attempt while reconnecting. It cannot
// answer while it runs a teardown or a connect attempt, so a teardown step
// that never returns, or a supervisor stuck anywhere else, makes every
// Health call fail: a *BusyError (wrapping ErrBusy) when ctx ends first,
// ErrDeleted once the controller is DEAD. The systemd watchdog is fed from
// it (attach), so a wedged daemon is restarted.
func (c *Controller) Health(ctx context.Context) error {
	select {
	case c.health <- struct{}{}:
		return nil
	case <-c.done:
		return ErrDeleted
	case <-ctx.Done():
		return &BusyError{State: c.State()}
	}
}
