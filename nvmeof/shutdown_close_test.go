package nvmeof_test

import (
	"errors"
	"sync/atomic"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// After the shutdown notification a controller may close the I/O queues
// (SPDK's nvmf_tgt does; TestSPDKHostLibrary sees it on the real one):
// that is no failure of the association. Before it, the same close is
// one, reported to OnFailure and logged as a warning. The in-process
// target closes an I/O queue's connection when a command arrives on it.
func TestIOQueueClosedAfterShutdownNotification(t *testing.T) {
	for _, notified := range []bool{false, true} {
		name := "before shutdown notification"
		if notified {
			name = "after shutdown notification"
		}
		t.Run(name, func(t *testing.T) {
			tt := startTarget(t, target.Config{}, 9, 1<<20)
			var logs logCapture
			var failures atomic.Int32
			c := connect(t, tt, nvmeof.ControllerConfig{IOQueues: 2, NoKeepAlive: true, Logger: logs.logger(),
				OnFailure: func(error) { failures.Add(1) }})
			ctx := testCtx(t)
			ns, err := c.Namespace(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			if notified {
				if err := c.ShutdownController(ctx); err != nil {
					t.Fatal(err)
				}
			}
			defer tt.InjectFault(target.Fault{QID: target.AnyIOQueue, Match: target.MatchIO(), Close: true})()
			for _, q := range c.IOQueues() {
				var qe *nvmeof.QueueError
				if err := q.Flush(ctx, ns); !errors.As(err, &qe) {
					t.Fatalf("flush on a queue the target closes: %v, want a *QueueError", err)
				}
				<-q.Idle()
			}
			warned := len(logs.matching("level=WARN", "nvme-tcp queue failed"))
			if notified && (failures.Load() != 0 || warned != 0) {
				t.Fatalf("after the shutdown notification: %d failures reported, %d warnings: %q", failures.Load(), warned, logs.matching("queue"))
			}
			if notified && len(logs.matching("level=INFO", "closed after the shutdown notification")) != 2 {
				t.Fatalf("no Info line per closed queue: %q", logs.matching("queue"))
			}
			if !notified && (failures.Load() != 2 || warned != 2) {
				t.Fatalf("before the shutdown notification: %d failures reported, %d warnings, want 2 each", failures.Load(), warned)
			}
		})
	}
}
