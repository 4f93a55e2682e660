// Package keepalive sends the NVMe Keep Alive command (admin opcode 18h) on a
// controller's admin queue every KATO/2, or every KATO/4 when the controller
// supports traffic-based keep-alive (TBKAS), skipping a tick when other
// commands completed since the previous one, as nvme_keep_alive_work does in
// the Linux host.
//
// A Keeper is started and stopped only by lifecycle. Stop is synchronous: it
// cancels the periodic work and waits until the Keeper's goroutines have
// returned, so after Stop no keep-alive is running and none can be submitted.
// That is the ordering the Linux host got wrong twice (the seed thread; fixed
// by e9869c85c811, which runs nvme_stop_keep_alive() at the top of
// nvme_remove_admin_tag_set(), after a54a93d0e359 had moved it later): the
// periodic work must be stopped, synchronously, before anything it uses is
// torn down.
//
// A keep-alive that fails, or does not complete within KATO, is reported
// once on Failed() and the Keeper stops re-arming. Reporting is a channel
// send, not a callback, so that whoever starts error recovery (and therefore
// calls Stop) never runs on the Keeper's own goroutine: no self-join.
package keepalive

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/clock"
)

// ErrTimeout is reported when a keep-alive did not complete within KATO.
var ErrTimeout = errors.New("keep-alive did not complete within KATO")

// Sender sends one Keep Alive command and waits for its completion.
//
// KeepAlive must return promptly once ctx is cancelled, even while the
// command is still in flight. A command it leaves in flight stays accounted
// to the admin queue (its completion handler holds the queue's usage
// reference until it has returned), so teardown waits for it after shutting
// the socket; the Keeper does not.
type Sender interface {
	KeepAlive(ctx context.Context) error
}

// Traffic is what traffic-based keep-alive needs from the connection: a
// sequence number for submitted commands and whether any command submitted
// at or after a mark has completed. Counting only commands submitted since
// the mark mirrors the Linux host (comp_seen is set only for requests issued
// after ka_last_check_time), so the completion of a long-running command
// cannot defer a keep-alive the controller is waiting for.
type Traffic interface {
	// Submitted returns the number of commands submitted so far, i.e. the
	// sequence number the next command will get.
	Submitted() uint64
	// CompletedSince reports whether a command whose sequence number is at
	// least mark has completed.
	CompletedSince(mark uint64) bool
}

// Config configures a Keeper.
type Config struct {
	// KATO is the Keep Alive Timeout the host set in the fabrics Connect
	// command. Zero disables keep-alive: Start returns a stopped Keeper.
	KATO time.Duration
	// Traffic is non-nil when the controller reports traffic-based
	// keep-alive (CTRATT.TBKAS).
	Traffic Traffic
	// MayRearm is asked after every tick; the Keeper re-arms only when it
	// returns true. lifecycle answers "state is LIVE or CONNECTING". Nil
	// means always.
	MayRearm func() bool
	// Clock is the time source; nil means the real clock.
	Clock clock.Clock
	// Logger; nil means slog.Default().
	Logger *slog.Logger
}

// Period returns the keep-alive interval for kato: KATO/2, or KATO/4 with
// traffic-based keep-alive (nvme_keep_alive_work_period).
func Period(kato time.Duration, trafficBased bool) time.Duration {
	p := kato / 2
	if trafficBased {
		p /= 2
	}
	return p
}

// Keeper owns the periodic keep-alive of one admin queue. Its goroutine is
// started by Start and joined by Stop.
type Keeper struct {
	sender Sender
	cfg    Config
	clk    clock.Clock
	log    *slog.Logger

	cancel   context.CancelFunc
	done     chan struct{} // closed when the keep-alive goroutine returned
	failed   chan error    // at most one error, buffered
	stopOnce sync.Once

	sent    atomic.Uint64
	skipped atomic.Uint64
}

// Start starts sending keep-alives on s. The first one is sent one period
// after Start.
func Start(s Sender, cfg Config) *Keeper {
	k := &Keeper{
		sender: s,
		cfg:    cfg,
		clk:    cfg.Clock,
		log:    cfg.Logger,
		done:   make(chan struct{}),
		failed: make(chan error, 1),
	}
	if k.clk == nil {
		k.clk = clock.Real{}
	}
	if k.log == nil {
		k.log = slog.Default()
	}
	ctx, cancel := context.WithCancel(context.Background())
	k.cancel = cancel
	if cfg.KATO <= 0 {
		close(k.done)
		return k
	}
	go k.run(ctx)
	return k
}

// Stop cancels the keep-alive work and waits until it has returned: when
// Stop returns no keep-alive goroutine runs and none can be submitted. A
// keep-alive in flight is abandoned to the admin queue (see Sender). Stop is
// idempotent and safe to call from any goroutine.
func (k *Keeper) Stop() {
	k.stopOnce.Do(k.cancel)
	<-k.done
}

// Failed receives the error of the first keep-alive that failed or timed
// out. After it, the Keeper no longer sends. Nothing is received once Stop
// has been called before a failure.
func (k *Keeper) Failed() <-chan error { return k.failed }

// Stats returns how many keep-alives were sent and how many ticks were
// skipped because of other traffic.
func (k *Keeper) Stats() (sent, skipped uint64) { return k.sent.Load(), k.skipped.Load() }

func (k *Keeper) mayRearm() bool {
	return k.cfg.MayRearm == nil || k.cfg.MayRearm()
}

func (k *Keeper) run(ctx context.Context) {
	defer close(k.done)
	tbkas := k.cfg.Traffic != nil
	period := Period(k.cfg.KATO, tbkas)
	delay := period
	var mark uint64
	if tbkas {
		mark = k.cfg.Traffic.Submitted()
	}
	for {
		t := k.clk.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C():
		}
		// Stop may have begun while the timer fired: never submit once
		// it has.
		if ctx.Err() != nil {
			return
		}
		if tbkas {
			seen := k.cfg.Traffic.CompletedSince(mark)
			mark = k.cfg.Traffic.Submitted()
			if seen {
				k.skipped.Add(1)
				if !k.mayRearm() {
					k.log.Debug("keep-alive not re-armed: controller not LIVE or CONNECTING")
					return
				}
				delay = period
				continue
			}
		}
		start := k.clk.Now()
		err := k.sendOne(ctx)
		if ctx.Err() != nil {
			// Stopped: a keep-alive cut short by Stop is not a failure.
			return
		}
		if err != nil {
			k.log.Warn("keep-alive failed", "err", err)
			k.failed <- err
			return
		}
		if !k.mayRearm() {
			k.log.Debug("keep-alive not re-armed: controller not LIVE or CONNECTING")
			return
		}
		// Like nvme_keep_alive_finish: the next keep-alive is due one
		// period after this one was sent, not after it completed.
		delay = period - k.clk.Now().Sub(start)
		if delay < 0 {
			delay = 0
		}
	}
}

// sendOne sends one keep-alive and waits for it, for at most KATO. The
// command runs on a goroutine owned and joined here, so that a Sender stuck
// past KATO cannot hold up the timeout and Stop still waits for it.
func (k *Keeper) sendOne(ctx context.Context) error {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	result := make(chan error, 1)
	k.sent.Add(1)
	go func() { result <- k.sender.KeepAlive(kctx) }()

	timeout := k.clk.NewTimer(k.cfg.KATO)
	defer timeout.Stop()
	select {
	case err := <-result:
		if err != nil {
			return fmt.Errorf("keep-alive: %w", err)
		}
		return nil
	case <-timeout.C():
		cancel()
		if err := <-result; err == nil {
			// It completed as the timer fired: not a timeout.
			return nil
		}
		return ErrTimeout
	case <-ctx.Done():
		<-result
		return ctx.Err()
	}
}
