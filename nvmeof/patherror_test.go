package nvmeof_test

import (
	"errors"
	"fmt"
	"testing"

	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/nvme"
	"github.com/ublk-nvmeof/ublk-nvmeof/nvmeof/target"
)

// Path errors: a failed queue, or a Path Related Status (SCT 3) without
// DNR, also wrapped. A status of another type, or with DNR, is not one.
func TestIsPathError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&nvmeof.QueueError{QID: 1, Err: nvmeof.ErrCommandTimeout}, true},
		{nvme.NVME_SC_INTERNAL_PATH_ERROR, true},
		{nvme.NVME_SC_ANA_PERSISTENT_LOSS, true},
		{nvme.NVME_SC_ANA_INACCESSIBLE, true},
		{nvme.NVME_SC_ANA_TRANSITION, true},
		{nvme.NVME_SC_CTRL_PATH_ERROR, true},
		{nvme.NVME_SC_HOST_PATH_ERROR, true},
		{nvme.NVME_SC_HOST_ABORTED_CMD | nvme.NVME_STATUS_MORE, true},
		{fmt.Errorf("write: %w", nvme.NVME_SC_ANA_TRANSITION), true},
		{nvme.NVME_SC_INTERNAL_PATH_ERROR | nvme.NVME_STATUS_DNR, false},
		{nvme.NVME_SC_ANA_INACCESSIBLE | nvme.NVME_STATUS_DNR, false},
		{nvme.NVME_SC_INTERNAL, false},
		{nvme.NVME_SC_LBA_RANGE | nvme.NVME_STATUS_DNR, false},
		{nvme.NVME_SC_WRITE_FAULT, false},
		{errors.New("other"), false},
		{nil, false},
	} {
		if got := nvmeof.IsPathError(tc.err); got != tc.want {
			t.Errorf("IsPathError(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// Over TCP: a command the target completes with a path status fails with
// that status, a path error unless DNR is set, and the queue stays up.
func TestPathStatusFromTarget(t *testing.T) {
	tt := startTarget(t, target.Config{}, 9, 1<<20)
	c := connect(t, tt, nvmeof.ControllerConfig{})
	ctx := testCtx(t)
	ns, err := c.Namespace(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	q := c.IOQueues()[0]
	isRead := func(cmd *nvme.Command) bool { return cmd.Opcode() == nvme.NVME_CMD_READ }
	for _, st := range []nvme.Status{nvme.NVME_SC_ANA_TRANSITION, nvme.NVME_SC_INTERNAL_PATH_ERROR | nvme.NVME_STATUS_DNR} {
		tt.InjectFault(target.Fault{QID: target.AnyQueue, Match: isRead, Status: st, Times: 1})
		err := q.Read(ctx, ns, 0, make([]byte, 512))
		var got nvme.Status
		if !errors.As(err, &got) || got != st {
			t.Fatalf("read: %v, want %v", err, st)
		}
		if want := !st.DNR(); nvmeof.IsPathError(err) != want {
			t.Fatalf("IsPathError(%v) = %v, want %v", err, !want, want)
		}
	}
	if err := q.Read(ctx, ns, 0, make([]byte, 512)); err != nil {
		t.Fatalf("read after the path statuses: %v (the queue must still work)", err)
	}
}
