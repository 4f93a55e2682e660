package attach

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
)

// ServiceNotifier speaks systemd's notification protocol (sd_notify(3)) for
// a Type=notify unit: READY=1 once the device is live, STATUS= with the
// controller state, STOPPING=1 on the way out, and WATCHDOG=1 keep-alives,
// sent only while the daemon answers its own health check (supervisorHealth),
// so a wedged lifecycle misses the watchdog and systemd restarts the
// service. Outside
// systemd (no NOTIFY_SOCKET) every call does nothing.
type ServiceNotifier struct {
	// unsetEnv would remove NOTIFY_SOCKET after the first message; kept
	// false so that a restarted attach in the same process still notifies.
	unsetEnv bool
}

func (n *ServiceNotifier) send(state string) error {
	_, err := daemon.SdNotify(n.unsetEnv, state)
	return err
}

// Ready says the service is up, naming the device and the controller's
// state.
func (n *ServiceNotifier) Ready(device, state string) error {
	return n.send(daemon.SdNotifyReady + "\nSTATUS=" + serviceStatus(device, state))
}

// serviceStatus is the STATUS= line: the device once it exists, and the
// controller's state.
func serviceStatus(device, state string) string {
	if device == "" {
		return "controller " + state
	}
	return "serving " + device + ", controller " + state
}

// Status sets the one-line status systemctl status shows.
func (n *ServiceNotifier) Status(status string) error {
	return n.send("STATUS=" + status)
}

// Stopping says the service is shutting down.
func (n *ServiceNotifier) Stopping() error {
	return n.send(daemon.SdNotifyStopping)
}

// Watchdog sends WATCHDOG=1 at half the unit's WatchdogSec for as long as
// healthy reports true within that half-period, until ctx ends. It returns
// at once when the unit has no watchdog. The caller owns the goroutine it
// runs in and joins it.
func (n *ServiceNotifier) Watchdog(ctx context.Context, healthy func(context.Context) bool) error {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil || interval == 0 {
		return err
	}
	period := interval / 2
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		hctx, cancel := context.WithTimeout(ctx, period)
		ok := healthy(hctx)
		cancel()
		if ok {
			if err := n.send(daemon.SdNotifyWatchdog); err != nil {
				return err
			}
		}
	}
}

// maxConnectAttempt is how long the watchdog lets the lifecycle supervisor
// go without answering while the controller is CONNECTING: it is then in a
// connect attempt, which waits on the network (a TCP connect to a silent
// host gives up after about two minutes of SYN retries, each Fabrics
// command after the admin timeout, 60 s). An attempt longer than this is
// taken for a wedge.
const maxConnectAttempt = 5 * time.Minute

// supervisorHealth is the watchdog's health check: healthy when the
// lifecycle supervisor itself answers a health request before the check's
// deadline (lifecycle.Controller.Health). The supervisor answers wherever
// it waits, so a teardown step that does not return, or a supervisor stuck
// anywhere else, stops WATCHDOG=1 and systemd restarts the daemon; the
// restarted one takes the device over (--recover). The one exception is a
// connect attempt, which may wait on the network for minutes: while the
// controller is CONNECTING the check passes for up to maxConnectAttempt
// after the supervisor last answered.
type supervisorHealth struct {
	lc  interface{ Health(context.Context) error }
	log *slog.Logger
	now func() time.Time

	// Only the watchdog's goroutine calls check.
	lastAnswer time.Time
}

func newSupervisorHealth(lc *lifecycle.Controller, log *slog.Logger) *supervisorHealth {
	return &supervisorHealth{lc: lc, log: log, now: time.Now, lastAnswer: time.Now()}
}

func (h *supervisorHealth) check(ctx context.Context) bool {
	err := h.lc.Health(ctx)
	if err == nil {
		h.lastAnswer = h.now()
		return true
	}
	var busy *lifecycle.BusyError
	if errors.As(err, &busy) && busy.State == lifecycle.StateConnecting && h.now().Sub(h.lastAnswer) < maxConnectAttempt {
		return true // in a connect attempt
	}
	h.log.Error("the controller's supervisor did not answer its health check: not feeding the watchdog", "err", err)
	return false
}
