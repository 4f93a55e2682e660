package lifecycle

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
)

// stopDrainsIOBlock is a block device whose Stop waits, as ublk's STOP_DEV
// does, until the I/O it holds has completed: here one Do's result.
type stopDrainsIOBlock struct {
	*fakeBlock
	io      <-chan error
	drained chan error // the I/O's result, once Stop saw it
}

func (b *stopDrainsIOBlock) Stop(ctx context.Context) error {
	select {
	case err := <-b.io:
		b.drained <- err
	case <-time.After(10 * time.Second): // a hang, not a time under test
		b.drained <- errors.New("STOP_DEV never drained: the I/O waiting for its Command Retry Delay was not failed")
	}
	return b.fakeBlock.Stop(ctx)
}

// A controller that deletes itself (here: a namespace-changed event finds
// another namespace; also ctrl_loss_tmo) fails an I/O waiting for its
// Command Retry Delay at once with ErrDeleted, as a requested delete does:
// the block device's quiesce (STOP_DEV) waits for that I/O, before the
// controller is cancelled.
func TestRetryDelayEndsWithSelfDelete(t *testing.T) {
	h := newHarness(t, func(o *Options, tgt *fakeTarget) {
		noKeepAlive(o, tgt)
		tgt.crdt = [3]time.Duration{maxRetryDelay}
	})
	tc := newTryCounter(crd(nvme.NVME_SC_NS_NOT_READY, 1))
	res := make(chan error, 1)
	go func() { res <- h.c.Do(context.Background(), tc.fn) }()
	h.waitTimers(1) // the retry waits for CRDT1; the fake clock never gets there
	b := &stopDrainsIOBlock{fakeBlock: h.blk, io: res, drained: make(chan error, 1)}
	h.c.SetBlock(b)

	h.namespaceReplacedEvent()
	h.waitDead()
	if err := <-b.drained; !errors.Is(err, ErrDeleted) {
		t.Fatalf("I/O waiting for its retry when the controller deleted itself: %v, want ErrDeleted", err)
	}
	h.finish()
}
