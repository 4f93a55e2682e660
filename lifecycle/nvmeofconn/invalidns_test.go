package nvmeofconn_test

import (
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle/nvmeofconn"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

func TestIsPathError(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&nvmeof.QueueError{QID: 1, Err: io.EOF}, true},
		{nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR, true},
		{fmt.Errorf("read: %w", nvme.NVME_SC_INVALID_NS), true},
		{nvme.NVME_SC_LBA_RANGE | nvme.NVME_STATUS_DNR, false},
		{nvme.NVME_SC_INVALID_FIELD | nvme.NVME_STATUS_DNR, false},
		{errors.New("other"), false},
	} {
		if got := nvmeofconn.IsPathError(c.err); got != c.want {
			t.Errorf("IsPathError(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// An I/O answered with Invalid Namespace (as SPDK's nvmf_tgt answers once
// the namespace is removed, before its change event arrives) is held and
// retried on the next association, which finds the namespace active: it
// succeeds, after a recovery, instead of failing.
func TestInvalidNamespaceHeldAndRetried(t *testing.T) {
	r := newRig(t, target.Config{}, time.Second)
	c := r.start(nil)
	defer c.Delete()
	sc := countStates(c)
	defer r.tg.InjectFault(target.Fault{QID: target.AnyIOQueue, Match: target.MatchIO(), Times: 1,
		Status: nvme.NVME_SC_INVALID_NS | nvme.NVME_STATUS_DNR})()
	if err := write(c, 0, 3, 33); err != nil {
		t.Fatalf("write answered once with Invalid Namespace: %v", err)
	}
	if r.stored(3) != 33 {
		t.Fatalf("block 3 = %d", r.stored(3))
	}
	if sc.get(lifecycle.StateResetting) != 1 || sc.get(lifecycle.StateLive) != 2 {
		t.Fatalf("RESETTING entered %d times, LIVE %d: want one recovery", sc.get(lifecycle.StateResetting), sc.get(lifecycle.StateLive))
	}
}
