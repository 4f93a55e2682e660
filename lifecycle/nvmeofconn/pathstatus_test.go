package nvmeofconn_test

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublk-nvmeof/ublk-nvmeof/lifecycle"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// The Path Related Status values (SCT 3) a write can complete with, over
// TCP from the in-process target. Without DNR each is retried on the same
// association (no recovery, no reconnect) and the write lands; with DNR the
// write fails with that status after one try. A status of another type
// without DNR is retried just the same, and always failing, the write fails
// with EIO after 1+MaxRetries tries. A path status that outlasts those
// retries is a failure of the path: the controller recovers and the write
// lands on the next association; on every association, it fails with EIO
// after MaxRetries of them.
func TestPathStatusOverTCP(t *testing.T) {
	pathStatuses := []nvme.Status{
		nvme.NVME_SC_INTERNAL_PATH_ERROR, nvme.NVME_SC_ANA_PERSISTENT_LOSS, nvme.NVME_SC_ANA_INACCESSIBLE,
		nvme.NVME_SC_ANA_TRANSITION, nvme.NVME_SC_CTRL_PATH_ERROR, nvme.NVME_SC_HOST_PATH_ERROR,
		nvme.NVME_SC_HOST_ABORTED_CMD,
	}
	for _, st := range pathStatuses {
		t.Run(fmt.Sprintf("retried/%#x", uint16(st)), func(t *testing.T) {
			checkRetriedTwice(t, st, 1)
		})
		t.Run(fmt.Sprintf("dnr/%#x", uint16(st)), func(t *testing.T) {
			r, c, writes := pathStatusRig(t, target.Fault{Status: st | nvme.NVME_STATUS_DNR, Times: 1})
			err := write(c, 1, 7, 77)
			var got nvme.Status
			if !errors.As(err, &got) || got.Code() != st || !got.DNR() {
				t.Fatalf("write: %v, want %v with DNR", err, st)
			}
			if n := writes.Load(); n != 1 {
				t.Fatalf("the target saw %d writes, want 1", n)
			}
			if got := r.stored(7); got != 0 {
				t.Fatalf("block 7 = %d: the failed write was applied", got)
			}
			checkNoRecovery(t, r, c)
		})
	}
	t.Run("bounded", func(t *testing.T) {
		r, c, writes := pathStatusRig(t, target.Fault{Status: nvme.NVME_SC_NS_NOT_READY})
		err := write(c, 0, 7, 77)
		if !errors.Is(err, lifecycle.ErrRetriesExhausted) || !errors.Is(err, syscall.EIO) || !errors.Is(err, nvme.NVME_SC_NS_NOT_READY) {
			t.Fatalf("write: %v, want ErrRetriesExhausted (EIO) with Namespace Not Ready", err)
		}
		if n, want := writes.Load(), int32(1+lifecycle.DefaultOptions().MaxRetries); n != want {
			t.Fatalf("the target saw %d writes, want %d", n, want)
		}
		checkNoRecovery(t, r, c)
	})
	t.Run("path-status-outlasting-retries", func(t *testing.T) {
		// Two more than the first association's tries.
		tries := 1 + lifecycle.DefaultOptions().MaxRetries
		r, c, writes := pathStatusRig(t, target.Fault{Status: nvme.NVME_SC_INTERNAL_PATH_ERROR, Times: tries + 2})
		if err := write(c, 0, 7, 77); err != nil {
			t.Fatalf("write: %v, want it retried on the next association", err)
		}
		if n, want := writes.Load(), int32(tries+3); n != want {
			t.Fatalf("the target saw %d writes, want %d", n, want)
		}
		if got := r.stored(7); got != 77 {
			t.Fatalf("block 7 = %d", got)
		}
		checkRecoveries(t, r, c, 1)
	})
	t.Run("path-status-bounded", func(t *testing.T) {
		r, c, writes := pathStatusRig(t, target.Fault{Status: nvme.NVME_SC_ANA_TRANSITION})
		err := write(c, 0, 7, 77)
		if !errors.Is(err, lifecycle.ErrRetriesExhausted) || !errors.Is(err, syscall.EIO) || !errors.Is(err, nvme.NVME_SC_ANA_TRANSITION) {
			t.Fatalf("write: %v, want ErrRetriesExhausted (EIO) with ANA Transition", err)
		}
		k := 1 + lifecycle.DefaultOptions().MaxRetries
		if n, want := writes.Load(), int32(k*k); n != want {
			t.Fatalf("the target saw %d writes, want %d (1+MaxRetries on each of 1+MaxRetries associations)", n, want)
		}
		checkRecoveries(t, r, c, k-1)
	})
	// Any status without DNR is retried (nvme_decide_disposition), on the
	// same association: Namespace Not Ready (a namespace briefly
	// disabled), an Internal Error.
	for _, st := range []nvme.Status{nvme.NVME_SC_NS_NOT_READY, nvme.NVME_SC_INTERNAL} {
		t.Run(fmt.Sprintf("other-type-retried/%#x", uint16(st)), func(t *testing.T) {
			checkRetriedTwice(t, st, 0)
		})
	}
	// The in-process target does not enable Advanced Command Retry: a CRD
	// in its status is not honoured (CRDT is zero), the retry is at once.
	t.Run("crd-without-acre", func(t *testing.T) {
		r, c, writes := pathStatusRig(t, target.Fault{Status: nvme.NVME_SC_NS_NOT_READY | 3<<11, Times: 1})
		if err := write(c, 0, 7, 77); err != nil {
			t.Fatalf("write: %v", err)
		}
		if n := writes.Load(); n != 2 {
			t.Fatalf("the target saw %d writes, want 2", n)
		}
		checkNoRecovery(t, r, c)
	})
}

// checkRetriedTwice: a write on queue q whose first two tries complete
// with st lands on the third try, on the same association.
func checkRetriedTwice(t *testing.T, st nvme.Status, q int) {
	t.Helper()
	r, c, writes := pathStatusRig(t, target.Fault{Status: st, Times: 2})
	if err := write(c, q, 7, 77); err != nil {
		t.Fatalf("write after two %v: %v", st, err)
	}
	if n := writes.Load(); n != 3 {
		t.Fatalf("the target saw %d writes, want 3", n)
	}
	if got := r.stored(7); got != 77 {
		t.Fatalf("block 7 = %d", got)
	}
	checkNoRecovery(t, r, c)
}

// pathStatusRig connects a controller to a target that answers writes with
// fault (on any I/O queue) and counts the writes that reach it.
func pathStatusRig(t *testing.T, fault target.Fault) (*rig, *lifecycle.Controller, *atomic.Int32) {
	t.Helper()
	r := newRig(t, target.Config{}, 5*time.Second)
	c := r.start(nil)
	t.Cleanup(c.Delete)
	// The target applies one fault to a command: the first that matches.
	// The faulted writes are counted by the fault itself, the others by a
	// second one that only counts.
	var writes atomic.Int32
	fault.QID = target.AnyQueue
	fault.Match = isWrite
	fault.Before = func() { writes.Add(1) }
	r.tg.InjectFault(fault)
	r.tg.InjectFault(target.Fault{QID: target.AnyQueue, Match: isWrite, Before: func() { writes.Add(1) }})
	return r, c, &writes
}

// checkNoRecovery checks that the controller is on its first association.
func checkNoRecovery(t *testing.T, r *rig, c *lifecycle.Controller) {
	t.Helper()
	if s := c.State(); s != lifecycle.StateLive {
		t.Fatalf("state %v", s)
	}
	for _, tr := range c.States().History() {
		if tr.To == lifecycle.StateResetting {
			t.Fatalf("recovery started (%s): a path status must not reset the controller", tr.Reason)
		}
	}
	if n := r.conn.attempts.Load(); n != 1 {
		t.Fatalf("%d connects, want 1", n)
	}
}

// checkRecoveries checks that the controller recovered n times and is LIVE
// on its n+1st association.
func checkRecoveries(t *testing.T, r *rig, c *lifecycle.Controller, n int) {
	t.Helper()
	if s := c.State(); s != lifecycle.StateLive {
		t.Fatalf("state %v", s)
	}
	resets := 0
	for _, tr := range c.States().History() {
		if tr.To == lifecycle.StateResetting {
			resets++
		}
	}
	if resets != n {
		t.Fatalf("%d recoveries, want %d", resets, n)
	}
	if got := r.conn.attempts.Load(); got != int32(n+1) {
		t.Fatalf("%d connects, want %d", got, n+1)
	}
}
