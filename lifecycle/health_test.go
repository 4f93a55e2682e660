package lifecycle

import (
	"context"
	"errors"
	"testing"
	"time"
)

// health calls Health with a deadline that only bounds how long the test
// waits for an answer; nothing is asserted about time.
func health(c *Controller, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	return c.Health(ctx)
}

// The supervisor answers Health while it waits (LIVE, and between
// reconnect attempts), not while a teardown step is wedged, and Health
// fails once the controller is DEAD.
func TestHealthStopsWhileTeardownIsWedged(t *testing.T) {
	wedged := make(chan struct{})
	release := make(chan struct{})
	h := newHarness(t, func(o *Options, _ *fakeTarget) {
		o.TeardownHook = func(s Step, done bool) {
			if s == StepShutdownSockets && !done {
				select {
				case <-release:
				default:
					close(wedged)
					<-release
				}
			}
		}
	})
	if err := health(h.c, time.Minute); err != nil {
		t.Fatalf("Health while LIVE: %v", err)
	}

	h.tgt.lastConn().onError(errSocket)
	<-wedged
	for range 3 {
		err := health(h.c, 20*time.Millisecond)
		var busy *BusyError
		if !errors.As(err, &busy) || !errors.Is(err, ErrBusy) || busy.State != StateResetting {
			t.Fatalf("Health while teardown is wedged: %v, want a *BusyError in RESETTING", err)
		}
	}
	close(release)

	h.waitState(StateConnecting)
	h.clk.WaitTimers(1) // the supervisor waits for the next attempt
	if err := health(h.c, time.Minute); err != nil {
		t.Fatalf("Health while waiting to reconnect: %v", err)
	}
	h.clk.Advance(10 * time.Second)
	h.waitState(StateLive)
	if err := health(h.c, time.Minute); err != nil {
		t.Fatalf("Health after reconnecting: %v", err)
	}
	h.finish()
	if err := health(h.c, time.Minute); !errors.Is(err, ErrDeleted) {
		t.Fatalf("Health when DEAD: %v, want ErrDeleted", err)
	}
}
